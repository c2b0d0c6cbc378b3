"""Tests for retinagate.outputs.identity: deterministic UIDs and the model's identity."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from retinagate.card import ModelCard
from retinagate.outputs.identity import (
    MANUFACTURER,
    ModelIdentity,
    OutputSeries,
    derived_uid,
    instance_number,
    output_uid,
    series_uid,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
SOURCE = "1.2.826.0.1.3680043.8.498.1"


def test_output_uids_are_the_same_for_the_same_source_model_and_kind() -> None:
    first = output_uid(SOURCE, SHA_A, "sc")

    assert first == output_uid(SOURCE, SHA_A, "sc")
    assert UID(first).is_valid and len(first) <= 64 and first.startswith("2.25.")


def test_output_uids_differ_by_source_model_and_kind() -> None:
    uids = {
        output_uid(SOURCE, SHA_A, "sc"),
        output_uid(SOURCE, SHA_A, "sr"),
        output_uid(SOURCE, SHA_A, "pm"),
        output_uid(SOURCE, SHA_B, "sc"),
        output_uid(SOURCE + "2", SHA_A, "sc"),
        series_uid(SOURCE, "R", SHA_A, "sc"),
    }
    assert len(uids) == 6


def test_series_uids_are_one_per_study_eye_model_and_kind() -> None:
    assert series_uid("1.2.3", "R", SHA_A, "sr") == series_uid("1.2.3", "R", SHA_A, "sr")
    others = {series_uid(*parts) for parts in [("1.2.3", "R", SHA_B, "sr"), ("1.2.3", "L", SHA_A, "sr"),
              ("1.2.3", "R", SHA_A, "pm"), ("1.2.4", "R", SHA_A, "sr"), ("1.2.3", "U", SHA_A, "sr")]}  # fmt: skip
    assert len(others) == 5 and series_uid("1.2.3", "R", SHA_A, "sr") not in others
    with pytest.raises(ValueError, match="eye"):
        series_uid("1.2.3", "X", SHA_A, "sr")


def test_the_series_description_keeps_the_model_version_whole_and_fits_64_characters() -> None:
    model = ModelIdentity(card=ModelCard(name="n" * 64, version="2026.12.05-rc1"), sha256=SHA_A, device_uid="2.25.1")
    source = Dataset()
    source.StudyInstanceUID, source.ImageLaterality = "1.2.3", "L"

    series = OutputSeries.of(source, SHA_A, "sc", 9901)
    text = series.description(model, "heatmaps")

    assert len(text) <= 64 and text.startswith("2026.12.05-rc1 RetinaGate heatmaps, left eye (unverified AI)")
    assert series.number == 9911


@pytest.mark.parametrize(("value", "expected"), [(7, 7), (None, 1), ("", 1), (0, 1)])
def test_outputs_take_the_sources_instance_number(value: object, expected: int) -> None:
    source = Dataset()
    if value is not None:
        source.InstanceNumber = value
    assert instance_number(source) == expected


@pytest.mark.parametrize(
    ("kind", "sha", "message"), [("xx", SHA_A, "kind"), ("sc", "abc", "model_sha256"), ("sc", "A" * 64, "model_sha256")]
)
def test_bad_arguments_are_refused_by_name(kind: str, sha: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        output_uid(SOURCE, sha, kind)


def test_derived_uid_refuses_empty_parts() -> None:
    with pytest.raises(ValueError, match="parts"):
        derived_uid("a", "")


def test_contributing_equipment_names_the_model_and_carries_its_device_uid() -> None:
    card = ModelCard(name="fundus-net", version="1.2.0")
    model = ModelIdentity(card=card, sha256=SHA_A, device_uid="2.25.42")

    item = model.contributing_equipment()

    assert item.Manufacturer == MANUFACTURER
    assert item.ManufacturerModelName == "fundus-net"
    assert "model 1.2.0" in item.SoftwareVersions
    assert item.DeviceUID == "2.25.42"
    assert item.DeviceSerialNumber == SHA_A[:16]
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert any(SHA_A in parameter for parameter in model.algorithm_parameters())
