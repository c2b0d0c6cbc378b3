"""Tests for retinagate.outputs.kind: what every output kind hands back."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from retinagate.outputs.encoding import part10
from retinagate.outputs.kind import BuiltOutput


def _document() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "2.25.7"
    return ds


def test_an_output_built_as_bytes_only_is_read_back_from_its_part10_file() -> None:
    built = BuiltOutput("sr", "2.25.7", "2.25.8", "1.2.840.10008.5.1.4.1.1.88.33", part10(_document()))

    assert built.dataset is None and built.read().SOPInstanceUID == "2.25.7"
    assert built.key == "sr"


def test_outputs_of_one_kind_for_one_photograph_are_told_apart_by_their_label() -> None:
    data = part10(_document())
    maps = [BuiltOutput("pm", f"2.25.{n}", "2.25.9", "1.2.840.10008.5.1.4.1.1.30", data, label=label)
            for n, label in enumerate(("DR", "MH"))]  # fmt: skip

    assert [m.key for m in maps] == ["pm.DR", "pm.MH"]
