"""OOD statistics: fitted on training photographs, a threshold from validation ones, and a score that
keeps fundus photographs below it and noise, blank frames and patterns above."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch import nn

from retinagate.card import ModelCard, OodStatistics, Preprocessing
from retinagate.preprocess import prepare
from retinagate.synth import render_fundus
from train.augment import Normalizer
from train.model import create_model
from train.ood import OodScore, fit_ood_statistics, ood_images_from_config, pooled_features

SIZE = 64
CARD = ModelCard(preprocessing=Preprocessing(input_size=SIZE))
COLUMNS = ("DR", "ARMD", "MH", "ODC", "TSLN", "OTHER")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photographs(count: int, seed: int) -> NDArray[np.uint8]:
    """Synthetic fundus photographs (a third without lesions, both eyes), prepared as serving prepares them."""
    rng = np.random.default_rng(seed)
    photos = []
    for i in range(count):
        columns = [COLUMNS[i % len(COLUMNS)]] if i % 3 else []
        fundus = render_fundus(rng, 2 * SIZE, 3 * SIZE // 2, columns, "R" if i % 2 else "L")
        photos.append(prepare(fundus.image, CARD.preprocessing))
    return np.stack(photos)


def _odd_inputs() -> dict[str, NDArray[np.uint8]]:
    """Inputs that are clearly not fundus photographs."""
    rng = np.random.default_rng(9)
    y, x = np.mgrid[:SIZE, :SIZE]
    checker = (((y // 8 + x // 8) % 2) * 255).astype(np.uint8)
    return {
        "noise": rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8),
        "flat grey": np.full((1, SIZE, SIZE, 3), 128, np.uint8),
        "black": np.zeros((1, SIZE, SIZE, 3), np.uint8),
        "checkerboard": np.repeat(checker[None, :, :, None], 3, axis=3),
    }


@pytest.fixture(scope="module")
def photographs() -> dict[str, NDArray[np.uint8]]:
    """128 training, 64 validation and 48 held-out synthetic photographs at 64 px."""
    return {"train": _photographs(128, 1), "val": _photographs(64, 2), "test": _photographs(48, 3)}


@pytest.fixture(scope="module")
def trained(photographs: dict[str, NDArray[np.uint8]]) -> nn.Module:
    """EfficientNet-B0 after eight AdamW steps at a strong learning rate on 16 photographs (seconds)."""
    torch.manual_seed(0)
    model = create_model(CARD, drop_rate=0.0, drop_path_rate=0.0)
    x = Normalizer(CARD.preprocessing)(torch.from_numpy(photographs["train"][:16]).permute(0, 3, 1, 2))
    y = (torch.rand(16, CARD.num_labels, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(8):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def statistics(trained: nn.Module, photographs: dict[str, NDArray[np.uint8]]) -> OodStatistics:
    return fit_ood_statistics(trained, CARD, photographs["train"], photographs["val"], fitted_on={"origin": "synth"})


def _scores(model: nn.Module, statistics: OodStatistics, images: NDArray[np.uint8]) -> NDArray[np.float64]:
    with torch.no_grad():
        scores: NDArray[np.float64] = (
            OodScore(statistics).double()(torch.from_numpy(pooled_features(model, CARD, images))).numpy()
        )
    return scores


def _formula(statistics: OodStatistics, pooled: NDArray[np.float64]) -> NDArray[np.float64]:
    """The documented score, written out in numpy."""
    mean = np.asarray(statistics.mean)
    components = np.asarray(statistics.components)
    centred = pooled - mean
    z = centred @ components.T
    residual = centred - z @ components
    d2 = (z**2 / np.asarray(statistics.variances)).sum(axis=1) + (residual**2).sum(
        axis=1
    ) / statistics.residual_variance
    result: NDArray[np.float64] = np.sqrt(d2 / statistics.features)
    return result


def test_held_out_fundus_photographs_score_below_the_threshold_and_unlike_inputs_above(
    trained: nn.Module, statistics: OodStatistics, photographs: dict[str, NDArray[np.uint8]]
) -> None:
    held_out = _scores(trained, statistics, photographs["test"])

    assert (held_out <= statistics.threshold).mean() >= 0.95, np.sort(held_out)
    for name, images in _odd_inputs().items():
        scores = _scores(trained, statistics, images)
        assert (scores > statistics.threshold).all(), f"{name}: {scores} vs threshold {statistics.threshold}"


def test_the_threshold_leaves_at_most_two_percent_of_validation_photographs_above_it(
    statistics: OodStatistics,
) -> None:
    fitted = statistics.fitted_on

    assert fitted["val_above_threshold"] <= 0.02
    assert statistics.threshold == pytest.approx(fitted["margin"] * fitted["val_score_quantile"], rel=1e-3)
    assert (fitted["train_images"], fitted["val_images"], fitted["origin"]) == (128, 64, "synth")
    # Training photographs score about 1 (an RMS distance in standard deviations per feature).
    assert 0.5 < fitted["train_score_median"] < 1.5


def test_the_score_is_the_documented_mahalanobis_distance_under_the_pca_model(
    trained: nn.Module, statistics: OodStatistics, photographs: dict[str, NDArray[np.uint8]]
) -> None:
    images = np.concatenate([photographs["test"][:4], _odd_inputs()["noise"]])
    pooled = pooled_features(trained, CARD, images)

    with torch.no_grad():
        ours = OodScore(statistics).double()(torch.from_numpy(pooled)).numpy()

    # The module holds the statistics as float32 constants, as the graph does; f - mu cancels a little.
    np.testing.assert_allclose(ours, _formula(statistics, pooled), rtol=1e-4)
    components = np.asarray(statistics.components)
    np.testing.assert_allclose(components @ components.T, np.eye(statistics.rank), atol=1e-5)
    assert statistics.features == 1280 and statistics.rank == 16
    assert list(statistics.variances) == sorted(statistics.variances, reverse=True)


def test_rank_is_capped_by_the_number_of_training_photographs(
    trained: nn.Module, photographs: dict[str, NDArray[np.uint8]]
) -> None:
    few = fit_ood_statistics(trained, CARD, photographs["train"][:9], photographs["val"][:5], rank=32)

    assert few.rank == 4  # (9 - 1) // 2: as many sample directions left for the residual as kept
    assert few.residual_variance > 0


def test_too_few_photographs_the_wrong_size_or_bad_parameters_are_value_errors(
    trained: nn.Module, photographs: dict[str, NDArray[np.uint8]]
) -> None:
    train, val = photographs["train"], photographs["val"]

    with pytest.raises(ValueError, match="train_images: 3 photographs"):
        fit_ood_statistics(trained, CARD, train[:3], val)
    with pytest.raises(ValueError, match="val_images: 2 photographs"):
        fit_ood_statistics(trained, CARD, train, val[:2])
    with pytest.raises(ValueError, match=r"train_images: expected uint8 \[N, 64, 64, 3\]"):
        fit_ood_statistics(trained, CARD, train[:, :32, :32], val)
    with pytest.raises(ValueError, match="margin"):
        fit_ood_statistics(trained, CARD, train, val, margin=0.5)
    with pytest.raises(ValueError, match="do not vary"):
        fit_ood_statistics(trained, CARD, np.repeat(train[:1], 10, axis=0), val)


def test_the_splits_named_by_a_training_config_are_read_prepared_and_limited(
    synth_dataset: Path, tmp_path: Path
) -> None:
    config = {"data": str(synth_dataset), "seed": 0, "out": str(tmp_path / "run")}

    found = ood_images_from_config(CARD, config, train_limit=20, val_limit=10)

    assert found is not None
    assert found.train.shape == (20, SIZE, SIZE, 3) and found.val.shape == (10, SIZE, SIZE, 3)
    assert found.origin.endswith("RFMiD_Training_Labels.csv")
    assert not (tmp_path / "run").exists()  # no cache folder of the run here: nothing is written
    assert ood_images_from_config(CARD, {"data": str(tmp_path / "elsewhere")}) is None
    assert ood_images_from_config(CARD, {}) is None


def test_gate_limits_are_fitted_to_the_training_photographs_and_say_what_fitting_cannot_cure(
    synth_dataset: Path, tmp_path: Path
) -> None:
    """Two training photographs replaced by black frames: flagged by the defaults, and still flagged
    (under-exposed) under the fitted limits, which the card's ``fitted_on`` says."""
    import shutil

    import cv2

    from retinagate import gate
    from train.ood import gate_limits_from_config

    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data, ignore=shutil.ignore_patterns("dicom", "masks"))
    for name in ("1.png", "2.png"):
        photograph = data / "Training" / name
        black = np.zeros_like(cv2.imread(str(photograph)))
        assert cv2.imwrite(str(photograph), black)
    config = {"data": str(data), "seed": 0, "out": str(tmp_path / "run")}

    limits = gate_limits_from_config(CARD, config)

    assert limits is not None
    fitted = limits.fitted_on
    assert fitted["photographs"] == 144 and fitted["flagged_by_defaults"] >= 2  # every training photograph
    assert fitted["still_flagged"] >= 2 and fitted["still_reasons"].get(gate.UNDER_EXPOSED, 0) >= 2
    assert "fov_min_area" not in fitted["moved"]  # frames without a field of view move no limit
    assert gate_limits_from_config(CARD, {"data": str(tmp_path / "elsewhere")}) is None
