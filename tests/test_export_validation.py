"""What exports are judged with: the validation split, macro AUROC and CPU timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.validation import macro_auroc, ort_outputs, read_validation, seconds_per_image, validation_from_config
from retinagate.card import ModelCard, Preprocessing

CARD = ModelCard(preprocessing=Preprocessing(input_size=128))


def test_validation_split_is_read_and_prepared_to_the_card(synth_dataset: Path) -> None:
    validation = read_validation(CARD, data=synth_dataset, limit=5)

    assert validation.images.shape == (5, 128, 128, 3) and validation.images.dtype == np.uint8
    assert validation.labels.shape == (5, 29)
    assert validation.origin.endswith("RFMiD_Validation_Labels.csv")


def test_training_config_leads_to_the_validation_split_only_when_the_data_is_here(
    synth_dataset: Path, tmp_path: Path
) -> None:
    found = validation_from_config(CARD, {"data": str(synth_dataset), "seed": 0}, limit=3)

    assert found is not None and len(found.images) == 3
    assert validation_from_config(CARD, {"data": str(tmp_path / "elsewhere")}) is None
    assert validation_from_config(CARD, {}) is None


def test_a_folder_that_is_not_a_dataset_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RFMiD"):
        read_validation(CARD, data=tmp_path)


def test_macro_auroc_averages_labels_with_both_classes() -> None:
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=np.uint8)
    perfect = np.array([[0.9, 0.1, 0.5], [0.2, 0.1, 0.5], [0.8, 0.1, 0.5], [0.1, 0.1, 0.5]])

    assert macro_auroc(labels, perfect) == 1.0
    assert macro_auroc(labels, 1 - perfect) == 0.0
    assert macro_auroc(np.zeros((3, 2), np.uint8), np.zeros((3, 2))) is None


def test_outputs_and_timing_come_from_onnx_runtime(random_onnx_model_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)

    probabilities, cams = ort_outputs(random_onnx_model_path, images, batch_size=2)
    seconds = seconds_per_image(random_onnx_model_path, images, batch_size=2, repeats=1)

    assert probabilities.shape == (3, 29) and cams.shape == (3, 29, 4, 4)
    assert 0 < seconds < 5
