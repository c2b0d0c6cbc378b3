"""Tests for retinagate.outputs.encoding: byte templates with slots and the single-element encoders."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from retinagate.outputs.encoding import (
    compile_element,
    compile_item,
    ds_element,
    encode_element,
    encode_part10,
    encodings_of,
    fd_element,
    uid_element,
)


def _pydicom_bytes(element: DataElement) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, element, ["iso8859"])
    return fp.getvalue()


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _tree() -> Dataset:
    """A small SR-like tree: nested sequences, text, numbers, a UID."""
    root = Dataset()
    root.ValueType = "CONTAINER"
    child = Dataset()
    child.ValueType = "NUM"
    child.ConceptNameCodeSequence = [_code("121401", "Derivation")]
    measured = Dataset()
    measured.NumericValue = DSfloat(0.5, auto_format=True)
    measured.FloatingPointValue = 0.5
    child.MeasuredValueSequence = [measured]
    ref = Dataset()
    ref.UID = "1.2.3.4"
    root.ContentSequence = [child, ref]
    return root


def test_the_single_element_encoders_write_what_pydicom_writes() -> None:
    for value in [0.0, 1.0, 0.5, 0.123456, 1e-6, 0.999999, *np.random.default_rng(0).random(200).round(6)]:
        number = DSfloat(float(value), auto_format=True)
        assert ds_element(0x0040A30A, number) == _pydicom_bytes(DataElement(0x0040A30A, "DS", number)), value
        assert fd_element(0x0040A161, float(value)) == _pydicom_bytes(DataElement(0x0040A161, "FD", float(value)))
    for uid in ("1.2", "1.2.3", "2.25.123456789012345678901234567890123"):
        assert uid_element(0x0040A124, uid) == _pydicom_bytes(DataElement(0x0040A124, "UI", uid))


def test_a_rendered_template_reads_back_with_the_slot_values() -> None:
    root = _tree()
    child, ref = root.ContentSequence
    measured = child.MeasuredValueSequence[0]
    slots = {id(measured["NumericValue"]): "number", id(ref["UID"]): "uid"}
    template = compile_element(root["ContentSequence"], slots, encodings_of(None))
    assert template.slots == {"number", "uid"}

    data = template.render(
        {"number": ds_element(0x0040A30A, DSfloat(0.875, auto_format=True)), "uid": uid_element(0x0040A124, "9.87")}
    )

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.9"
    ds.SOPInstanceUID = "1.2.3.9"
    back = pydicom.dcmread(io.BytesIO(encode_part10(ds, [(0x0040A730, data)])))
    child_back, ref_back = back.ContentSequence
    assert float(child_back.MeasuredValueSequence[0].NumericValue) == 0.875
    assert child_back.MeasuredValueSequence[0].FloatingPointValue == 0.5  # not a slot: as compiled
    assert child_back.ConceptNameCodeSequence[0].CodeMeaning == "Derivation"
    assert ref_back.UID == "9.87"
    assert back.SOPInstanceUID == "1.2.3.9"


def test_a_template_without_slots_encodes_the_same_values_as_pydicom() -> None:
    root = _tree()
    item = compile_item(root, {}, encodings_of(None)).render({})
    sequence = encode_element(DataElement(0x0040A730, "SQ", [root]), encodings_of(None))

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.9"
    back = pydicom.dcmread(io.BytesIO(encode_part10(ds, [(0x0040A730, sequence)])))

    assert item.startswith(b"\xfe\xff\x00\xe0\xff\xff\xff\xff") and item.endswith(b"\xfe\xff\x0d\xe0\x00\x00\x00\x00")
    assert back.ContentSequence[0].to_json_dict() == root.to_json_dict()


def test_part10_refuses_clashing_tags_and_other_transfer_syntaxes() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="also in the dataset"):
        encode_part10(ds, [(0x00080018, uid_element(0x00080018, "1.2.4"))])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    with pytest.raises(ValueError, match="Explicit VR Little Endian"):
        encode_part10(ds)
