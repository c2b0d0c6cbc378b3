"""Tests for retinagate.outputs.pm: the Grad-CAM Parametric Map."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from retinagate.card import ModelCard
from retinagate.decode import decode_instance
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


def test_the_map_rereads_with_the_gradcam_quantity_on_the_source_grid(source: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "pm.dcm"
    build_pm(_heat(), source, MODEL, label="DR", probability=0.8).save_as(path, enforce_file_format=True)

    ds = pydicom.dcmread(path)
    pm = hd.pm.ParametricMap.from_dataset(ds)
    values = np.frombuffer(ds.FloatPixelData, dtype="<f4").reshape(120, 160)
    assert np.allclose(values, _heat() / 3.0)
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130403", "DCM")
    derivation = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert pm.SOPInstanceUID == output_uid(source.SOPInstanceUID, MODEL.sha256, "pm")
    assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert ds.ContentQualification == "RESEARCH"


def test_a_map_off_the_source_grid_is_refused(source: Dataset) -> None:
    with pytest.raises(ValueError, match="source image"):
        build_pm(np.zeros((10, 10), dtype=np.float32), source, MODEL, label="DR", probability=0.8)


@pytest.mark.interop
def test_the_map_passes_dciodvfy(source: Dataset, dciodvfy: Callable[[object], list[str]]) -> None:
    assert dciodvfy(build_pm(_heat(), source, MODEL, label="DR", probability=0.8)) == []
