"""Per-label decision thresholds, chosen on the validation split.

A single 0.5 cut suits no label of an imbalanced multi-label problem: a rare condition's probability
rarely climbs that high even when the model ranks it well. Each label gets the threshold that maximises
its F1 score on validation. Labels with too few validation positives to trust that choice keep a
fallback threshold, and every threshold is clamped to ``[floor, 1 - floor]`` so no label ends up
firing on (or never firing on) every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["LabelThreshold", "calibrate_thresholds"]


@dataclass(frozen=True)
class LabelThreshold:
    """The chosen threshold of one label and how it was chosen.

    Attributes:
        label: Label name.
        threshold: Probability at or above which the label is reported.
        method: ``"max_f1"`` when tuned on validation, ``"fallback"`` when there were too few positives.
        positives: Validation positives the choice was based on.
        f1: F1 on validation at ``threshold``.
        precision: Precision on validation at ``threshold``.
        recall: Recall on validation at ``threshold``.
    """

    label: str
    threshold: float
    method: Literal["max_f1", "fallback"]
    positives: int
    f1: float
    precision: float
    recall: float


def _scores_at(truth: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[float, float, float]:
    predicted = prob >= threshold
    true_pos = float(np.sum(predicted & truth))
    precision = true_pos / max(1.0, float(predicted.sum()))
    recall = true_pos / max(1.0, float(truth.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return f1, precision, recall


def calibrate_thresholds(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    labels: Sequence[str],
    *,
    min_positives: int = 3,
    fallback: float = 0.5,
    floor: float = 0.05,
) -> list[LabelThreshold]:
    """Chooses one threshold per label by maximising F1 on validation.

    The threshold is placed halfway between the lowest score that is kept positive and the next lower
    score, rather than exactly on a validation score, so it does not hinge on one image.

    Args:
        y_true: ``(N, C)`` 0/1 validation ground truth.
        y_prob: ``(N, C)`` validation probabilities in [0, 1].
        labels: The ``C`` label names.
        min_positives: Labels with fewer validation positives keep ``fallback``.
        fallback: Threshold for labels without enough positives.
        floor: Thresholds are clamped to ``[floor, 1 - floor]``.

    Returns:
        One :class:`LabelThreshold` per label, in label order.

    Raises:
        ValueError: On mismatched shapes or out-of-range arguments (named).
    """
    truth = np.asarray(y_true).astype(bool)
    prob = np.asarray(y_prob, dtype=np.float64)
    if truth.ndim != 2 or truth.shape != prob.shape:
        raise ValueError(f"y_true {truth.shape} and y_prob {prob.shape} must both be (N, C)")
    if truth.shape[1] != len(labels):
        raise ValueError(f"y_true has {truth.shape[1]} columns for {len(labels)} labels")
    if min_positives < 1:
        raise ValueError(f"min_positives is {min_positives}; expected at least 1")
    if not 0.0 <= floor < 0.5:
        raise ValueError(f"floor is {floor}; expected 0 <= floor < 0.5")
    if not floor <= fallback <= 1.0 - floor:
        raise ValueError(f"fallback is {fallback}; expected within [floor, 1 - floor] = [{floor}, {1 - floor}]")

    results: list[LabelThreshold] = []
    for column, name in enumerate(labels):
        t, p = truth[:, column], prob[:, column]
        positives = int(t.sum())
        if positives < min_positives:
            f1, precision, recall = _scores_at(t, p, fallback)
            results.append(LabelThreshold(name, fallback, "fallback", positives, f1, precision, recall))
            continue
        order = np.argsort(-p, kind="mergesort")
        sorted_p, sorted_t = p[order], t[order]
        last_of_run = np.r_[np.flatnonzero(np.diff(sorted_p)), sorted_p.size - 1]
        true_pos = np.cumsum(sorted_t)[last_of_run]
        predicted = last_of_run + 1
        f1_curve = 2 * true_pos / (predicted + positives)
        best = int(np.argmax(f1_curve))  # first maximum: the highest threshold reaching the best F1
        kept = sorted_p[last_of_run[best]]
        below = sorted_p[last_of_run[best] + 1] if last_of_run[best] + 1 < sorted_p.size else 0.0
        threshold = float(np.clip((kept + below) / 2.0, floor, 1.0 - floor))
        f1, precision, recall = _scores_at(t, p, threshold)
        results.append(LabelThreshold(name, threshold, "max_f1", positives, f1, precision, recall))
    return results
