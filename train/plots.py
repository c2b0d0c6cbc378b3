"""PNG plots of a training run: learning curves, per-label ROC curves, per-label AUROC bars.

Matplotlib runs on its Agg backend (files only, no display), so plots work on servers and in CI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import NDArray

from train.metrics import Metrics, auroc, roc_curve

__all__ = ["plot_auroc_bars", "plot_history", "plot_roc_curves"]


def _values(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [math.nan if row.get(key) is None else float(row[key]) for row in history]


def plot_history(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss (train and validation) and validation AUROC / RIADD score per epoch."""
    epochs = [int(row["epoch"]) for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    left.plot(epochs, _values(history, "train_loss"), marker="o", label="train")
    left.plot(epochs, _values(history, "val_loss"), marker="o", label="validation")
    left.set(title="Loss", xlabel="epoch", ylabel="loss")
    left.legend()
    right.plot(epochs, _values(history, "val_macro_auroc"), marker="o", label="macro AUROC")
    right.plot(epochs, _values(history, "val_disease_risk_auroc"), marker="o", label="Disease_Risk AUROC")
    right.plot(epochs, _values(history, "val_map"), marker="o", label="mAP")
    right.plot(epochs, _values(history, "val_riadd_score"), marker="o", label="RIADD score")
    right.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    right.set(title="Validation", xlabel="epoch", ylim=(0.0, 1.02))
    right.legend(loc="best", fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if epochs:
            axis.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc_curves(y_true: NDArray[np.uint8], y_prob: NDArray[np.floating], labels: Sequence[str], path: Path) -> None:
    """One small ROC panel per label that has both classes; labels without are listed in the title."""
    usable = [c for c in range(len(labels)) if 0 < int(y_true[:, c].sum()) < y_true.shape[0]]
    skipped = [labels[c] for c in range(len(labels)) if c not in usable]
    cols = 6
    rows = max(1, math.ceil(len(usable) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows + 0.6), squeeze=False, constrained_layout=True)
    for axis in axes.flat:
        axis.set_visible(False)
    for axis, c in zip(axes.flat, usable, strict=False):
        fpr, tpr = roc_curve(y_true[:, c], y_prob[:, c])
        area = auroc(y_true[:, c], y_prob[:, c])
        axis.set_visible(True)
        axis.plot(fpr, tpr, linewidth=1.5)
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.7, linestyle=":")
        axis.set_title(f"{labels[c]}: {area:.3f} ({int(y_true[:, c].sum())} pos.)", fontsize=8)
        axis.set(xlim=(0, 1), ylim=(0, 1.01))
        axis.tick_params(labelsize=6)
    title = "Validation ROC curves (label: AUROC, positives)"
    if skipped:
        title += f"\nsingle-class, not shown: {', '.join(skipped)}"
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_auroc_bars(metrics: Metrics, path: Path, *, test: Metrics | None = None) -> None:
    """Horizontal bars of per-label AUROC (validation, and test beside it when given)."""
    labels = list(metrics.labels)
    y = np.arange(len(labels))
    height = 0.4 if test is not None else 0.7
    fig, axis = plt.subplots(figsize=(7, 0.28 * len(labels) + 1.2), constrained_layout=True)
    val = [math.nan if a is None else a for a in metrics.auroc]
    axis.barh(
        y - (height / 2 if test else 0),
        val,
        height=height,
        label=f"validation (macro {metrics.macro_auroc or math.nan:.3f})",
    )
    if test is not None:
        tst = [math.nan if a is None else a for a in test.auroc]
        axis.barh(y + height / 2, tst, height=height, label=f"test (macro {test.macro_auroc or math.nan:.3f})")
    axis.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axis.set_yticks(y, [f"{n} ({p})" for n, p in zip(labels, metrics.positives, strict=True)], fontsize=7)
    axis.invert_yaxis()
    axis.set(xlim=(0, 1), xlabel="AUROC", title="Per-label AUROC (validation positives in brackets)")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
