"""Ranking metrics for multi-label fundus classification, and the RIADD challenge score.

Everything is computed in NumPy from ``(N, C)`` ground truth and scores, label by label, so a label
whose validation split holds only one class is reported as ``None`` instead of failing the whole
report (RFMiD's rare labels often have no positive in a split).

The RIADD score is the ranking score of the RIADD 2021 challenge (ISBI), which introduced RFMiD:

* disease screening: AUROC of ``Disease_Risk``;
* disease classification: ``ml_score = (ml_auroc + ml_map) / 2`` over the disease outputs, where
  ``ml_auroc`` is the mean AUROC and ``ml_map`` the mean average precision of the disease columns
  that have positives (columns without any are dropped, as the challenge's evaluation did);
* final: ``score = (disease_risk_auroc + ml_score) / 2``.

The challenge ranked 28 disease columns; this project's 28 disease outputs are the 27 named diseases
plus ``OTHER`` (the union of the 18 rarest RFMiD columns), so the score is the same recipe applied to
the model's own label scheme.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from retinagate.labels import DISEASE_LABELS, DISEASE_RISK, LABELS

__all__ = [
    "Metrics",
    "auroc",
    "average_precision",
    "compute_metrics",
    "roc_curve",
]


def _binary_inputs(y_true: ArrayLike, y_score: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    truth = np.asarray(y_true)
    score = np.asarray(y_score, dtype=np.float64)
    if truth.ndim != 1 or score.ndim != 1 or truth.shape != score.shape:
        raise ValueError(f"y_true {truth.shape} and y_score {score.shape} must be 1-D of the same length")
    if truth.size and not np.isin(truth, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if not np.isfinite(score).all():
        raise ValueError("y_score holds NaN or infinite values")
    return truth.astype(bool), score


def auroc(y_true: ArrayLike, y_score: ArrayLike) -> float | None:
    """Area under the ROC curve; ``None`` when only one class is present.

    Computed as the Mann-Whitney U statistic with tied scores counted half, which equals the
    trapezoidal area under the ROC curve (what scikit-learn reports).
    """
    truth, score = _binary_inputs(y_true, y_score)
    positives = int(truth.sum())
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(score.size, dtype=np.float64)
    # Average rank within each run of tied scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [score.size]))
    average = (starts + ends + 1) / 2.0  # 1-based ranks
    ranks[order] = np.repeat(average, ends - starts)
    rank_sum = ranks[truth].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def average_precision(y_true: ArrayLike, y_score: ArrayLike) -> float | None:
    """Average precision (area under the step-wise precision-recall curve); ``None`` without positives.

    Same definition as scikit-learn's ``average_precision_score``: the mean of the precision at each
    distinct threshold, weighted by the recall gained there.
    """
    truth, score = _binary_inputs(y_true, y_score)
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = np.argsort(-score, kind="mergesort")
    sorted_scores, sorted_truth = score[order], truth[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_pos = np.cumsum(sorted_truth)[last_of_run]
    predicted = last_of_run + 1
    precision = true_pos / predicted
    recall = true_pos / positives
    gained = np.diff(np.r_[0.0, recall])
    return float(np.sum(gained * precision))


def roc_curve(y_true: ArrayLike, y_score: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1).

    Raises:
        ValueError: If only one class is present (the curve is undefined).
    """
    truth, score = _binary_inputs(y_true, y_score)
    positives = int(truth.sum())
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("roc_curve needs both classes in y_true")
    order = np.argsort(-score, kind="mergesort")
    sorted_scores, sorted_truth = score[order], truth[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_pos = np.cumsum(sorted_truth)[last_of_run]
    false_pos = last_of_run + 1 - true_pos
    fpr = np.r_[0.0, false_pos / negatives]
    tpr = np.r_[0.0, true_pos / positives]
    return fpr, tpr


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


@dataclass(frozen=True)
class Metrics:
    """Validation or test metrics of one model on one split.

    Attributes:
        labels: Label names, in output order.
        count: Number of images.
        positives: Positive images per label.
        auroc: Per-label AUROC (``None`` where the split holds one class only).
        average_precision: Per-label average precision (``None`` where there is no positive).
        macro_auroc: Mean AUROC over the labels that have both classes.
        map: Mean average precision over the labels that have positives.
        disease_risk_auroc: AUROC of ``Disease_Risk`` (``None`` if absent or single-class).
        ml_auroc: Mean AUROC over the disease outputs (all but ``Disease_Risk``).
        ml_map: Mean average precision over the disease outputs.
        riadd_score: ``(disease_risk_auroc + (ml_auroc + ml_map) / 2) / 2``, the RIADD ranking score.
        loss: Mean loss on the split, when the caller measured it.
    """

    labels: tuple[str, ...]
    count: int
    positives: tuple[int, ...]
    auroc: tuple[float | None, ...]
    average_precision: tuple[float | None, ...]
    macro_auroc: float | None
    map: float | None
    disease_risk_auroc: float | None
    ml_auroc: float | None
    ml_map: float | None
    riadd_score: float | None
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | None]:
        """The headline numbers (no per-label detail)."""
        return {
            "count": self.count,
            "loss": self.loss,
            "macro_auroc": self.macro_auroc,
            "map": self.map,
            "disease_risk_auroc": self.disease_risk_auroc,
            "ml_auroc": self.ml_auroc,
            "ml_map": self.ml_map,
            "riadd_score": self.riadd_score,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready: the summary plus per-label AUROC, AP and positives."""
        return {
            **self.summary(),
            "per_label": {
                name: {"auroc": a, "average_precision": ap, "positives": p}
                for name, a, ap, p in zip(self.labels, self.auroc, self.average_precision, self.positives, strict=True)
            },
            **self.extra,
        }


def compute_metrics(
    y_true: ArrayLike,
    y_score: ArrayLike,
    labels: Sequence[str] = LABELS,
    *,
    loss: float | None = None,
) -> Metrics:
    """Computes per-label and summary metrics for one split.

    Args:
        y_true: ``(N, C)`` array of 0/1 ground truth.
        y_score: ``(N, C)`` scores (probabilities or logits; only their order matters).
        labels: The ``C`` label names; ``Disease_Risk`` and the disease labels are found by name.
        loss: Mean loss to carry along, if measured.

    Raises:
        ValueError: If the shapes disagree with each other or with ``labels``.
    """
    truth = np.asarray(y_true)
    score = np.asarray(y_score, dtype=np.float64)
    if truth.ndim != 2 or truth.shape != score.shape:
        raise ValueError(f"y_true {truth.shape} and y_score {score.shape} must both be (N, C)")
    if truth.shape[1] != len(labels):
        raise ValueError(f"y_true has {truth.shape[1]} columns for {len(labels)} labels")
    names = tuple(labels)
    aurocs = tuple(auroc(truth[:, c], score[:, c]) for c in range(truth.shape[1]))
    aps = tuple(average_precision(truth[:, c], score[:, c]) for c in range(truth.shape[1]))
    disease = [i for i, name in enumerate(names) if name in DISEASE_LABELS]
    risk = names.index(DISEASE_RISK) if DISEASE_RISK in names else None
    risk_auroc = aurocs[risk] if risk is not None else None
    ml_auroc = _mean([aurocs[i] for i in disease])
    ml_map = _mean([aps[i] for i in disease])
    riadd = None
    if risk_auroc is not None and ml_auroc is not None and ml_map is not None:
        riadd = (risk_auroc + (ml_auroc + ml_map) / 2.0) / 2.0
    return Metrics(
        labels=names,
        count=int(truth.shape[0]),
        positives=tuple(int(v) for v in truth.sum(axis=0)),
        auroc=aurocs,
        average_precision=aps,
        macro_auroc=_mean(aurocs),
        map=_mean(aps),
        disease_risk_auroc=risk_auroc,
        ml_auroc=ml_auroc,
        ml_map=ml_map,
        riadd_score=riadd,
        loss=loss,
    )
