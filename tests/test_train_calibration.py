"""Per-label thresholds chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest

from train.calibration import calibrate_thresholds


def f1_score(truth: np.ndarray, predicted: np.ndarray) -> float:
    true_pos = float(np.sum(truth.astype(bool) & predicted))
    return 2 * true_pos / (float(truth.sum()) + float(predicted.sum()))


def test_each_threshold_reaches_the_best_f1_any_cut_could_reach() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, (150, 4))
    prob = np.clip(rng.normal(0.35 + 0.3 * truth, 0.15), 0, 1)
    results = calibrate_thresholds(truth, prob, ["a", "b", "c", "d"])
    for column, result in enumerate(results):
        cuts = np.unique(prob[:, column])
        best = max(f1_score(truth[:, column], prob[:, column] >= cut) for cut in cuts)
        assert result.method == "max_f1"
        assert result.f1 == pytest.approx(best)
        assert result.f1 == pytest.approx(f1_score(truth[:, column], prob[:, column] >= result.threshold))


def test_threshold_sits_between_scores_rather_than_on_one() -> None:
    truth = np.array([[0], [0], [1], [1], [1]])
    prob = np.array([[0.1], [0.2], [0.6], [0.7], [0.8]])
    (result,) = calibrate_thresholds(truth, prob, ["x"])
    assert result.threshold == pytest.approx(0.4)
    assert result.f1 == pytest.approx(1.0)


def test_labels_with_too_few_positives_keep_the_fallback_threshold() -> None:
    truth = np.zeros((40, 2), dtype=np.uint8)
    truth[:2, 0] = 1  # two positives: below min_positives=3
    truth[:10, 1] = 1
    prob = np.linspace(0.0, 1.0, 40)[:, None].repeat(2, axis=1)
    rare, common = calibrate_thresholds(truth, prob, ["rare", "common"], min_positives=3, fallback=0.5)
    assert rare.method == "fallback" and rare.threshold == 0.5 and rare.positives == 2
    assert common.method == "max_f1"


def test_thresholds_are_clamped_to_the_floor() -> None:
    truth = np.array([[1], [1], [1], [0]])
    prob = np.array([[0.001], [0.002], [0.003], [0.0]])  # best cut would be ~0.0005
    (result,) = calibrate_thresholds(truth, prob, ["x"], floor=0.05)
    assert result.threshold == 0.05


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="floor"):
        calibrate_thresholds(np.zeros((2, 1)), np.zeros((2, 1)), ["x"], floor=0.6)
    with pytest.raises(ValueError, match="2 columns for 1 labels"):
        calibrate_thresholds(np.zeros((2, 2)), np.zeros((2, 2)), ["x"])
