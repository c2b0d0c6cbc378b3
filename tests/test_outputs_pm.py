"""Tests for retinagate.outputs.pm: the Grad-CAM Parametric Map."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from retinagate.card import ModelCard
from retinagate.decode import decode_instance
from retinagate.outputs.encoding import part10
from retinagate.outputs.identity import ModelIdentity, output_uid
from retinagate.outputs.pm import build_pm
from retinagate.synth import DicomIdentity, render_fundus, write_dicom

MODEL = ModelIdentity(card=ModelCard(name="fundus-net", version="1.0.0"), sha256="e" * 64, device_uid="2.25.79")


@pytest.fixture
def source(tmp_path: Path) -> Dataset:
    image = render_fundus(np.random.default_rng(8), 160, 120, ["DR"]).image
    write_dicom(image, tmp_path / "source.dcm", DicomIdentity.synthetic(5))
    header = decode_instance(tmp_path / "source.dcm", min_side=32, max_pixels=10**8).header
    assert header is not None
    return header


def _heat() -> np.ndarray:
    heat = np.zeros((120, 160), dtype=np.float32)
    heat[20:40, 100:130] = 3.0
    return heat


def test_the_map_rereads_as_integers_whose_real_world_values_are_the_normalised_heat(
    source: Dataset, tmp_path: Path
) -> None:
    path = tmp_path / "pm.dcm"
    build_pm(_heat(), source, MODEL, label="DR", probability=0.8).save_as(path, enforce_file_format=True)

    ds = pydicom.dcmread(path)
    pm = hd.pm.ParametricMap.from_dataset(ds)
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    real = ds.pixel_array * mapping.RealWorldValueSlope + mapping.RealWorldValueIntercept
    assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.shape == (120, 160)  # a small source: its own grid
    assert np.allclose(real, _heat() / 3.0)
    assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == (0, ds.pixel_array.max())
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130403", "DCM")
    derivation = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert pm.SOPInstanceUID == output_uid(source.SOPInstanceUID, MODEL.sha256, "pm", "DR")
    assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert ds.ContentQualification == "RESEARCH"


def test_a_map_off_the_source_grid_is_refused(source: Dataset) -> None:
    with pytest.raises(ValueError, match="source image"):
        build_pm(np.zeros((10, 10), dtype=np.float32), source, MODEL, label="DR", probability=0.8)


@pytest.mark.interop
def test_the_map_passes_dciodvfy(source: Dataset, dciodvfy: Callable[[object], list[str]]) -> None:
    assert dciodvfy(build_pm(_heat(), source, MODEL, label="DR", probability=0.8)) == []


def test_a_2048_by_1536_photographs_map_is_a_256_by_192_grid_of_at_most_500_kb_that_says_how_it_maps(
    source: Dataset,
) -> None:
    large = copy.deepcopy(source)  # the header of a 2048 x 1536 photograph
    large.Rows, large.Columns = 1536, 2048
    heat = np.zeros((1536, 2048), dtype=np.float32)
    heat[800:808, 1600:1608] = 1.0  # one 8 x 8 block: one map pixel

    ds = build_pm(heat, large, MODEL, label="DR", probability=0.8, rank=2)
    data = part10(ds)

    assert len(data) <= 500_000
    assert (ds.Rows, ds.Columns) == (192, 256)
    assert np.argwhere(ds.pixel_array).tolist() == [[100, 200]]
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [8.0, 8.0]
    position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert [float(v) for v in position] == [3.5, 3.5, 0.0]  # the first map pixel's centre in photograph pixels
    assert "rows 8r to 8r+7" in ds.ImageComments
    assert ds.InstanceNumber == 102  # the source's Instance Number 1, map 2


@pytest.mark.parametrize(("label", "probability"), [("DR", 0.8), ("Disease_Risk", 0.1)])
def test_the_content_description_names_the_label_and_keeps_the_ai_line_within_64_characters(
    source: Dataset, label: str, probability: float
) -> None:
    ds = build_pm(_heat(), source, MODEL, label=label, probability=probability, threshold=0.5)

    assert len(ds.ContentDescription) <= 64 and ds.ContentDescription.endswith("unverified AI output")
    assert label in ds.ContentDescription
    assert ("not a finding" in ds.ContentDescription) == (probability < 0.5)
    assert ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel == label


def test_lossy_image_compression_is_carried_over_from_the_source(source: Dataset) -> None:
    lossy = copy.deepcopy(source)
    lossy.LossyImageCompression, lossy.LossyImageCompressionRatio = "01", 12.5
    lossy.LossyImageCompressionMethod = "ISO_10918_1"
    plain = copy.deepcopy(source)
    plain.LossyImageCompression = "00"

    kept = build_pm(_heat(), lossy, MODEL, label="DR", probability=0.8)

    assert (kept.LossyImageCompression, kept.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert float(kept.LossyImageCompressionRatio) == 12.5
    assert build_pm(_heat(), plain, MODEL, label="DR", probability=0.8).LossyImageCompression == "00"
