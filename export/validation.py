"""What an export is checked with: labelled validation photographs, AUROC, and CPU speed.

Validation data is found the way training finds it (:func:`train.datasets.load_splits`): an
RFMiD-layout folder, or the generic CSV + image folder recorded in the checkpoint's training config.
Photographs are prepared with the model card's recipe, exactly as the worker prepares them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from retinagate.card import ModelCard

__all__ = [
    "Labelled",
    "macro_auroc",
    "ort_outputs",
    "read_validation",
    "seconds_per_image",
    "validation_from_config",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labelled:
    """Prepared images with their ground truth."""

    images: NDArray[np.uint8]  # [N, S, S, 3]
    labels: NDArray[np.uint8]  # [N, C]
    origin: str  # where the labels came from, for reports


def read_validation(
    card: ModelCard,
    *,
    data: Path | None = None,
    labels_csv: Path | None = None,
    images: Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    limit: int | None = None,
) -> Labelled:
    """Reads the validation split of an RFMiD folder (``data``) or a generic CSV, prepared for ``card``.

    Raises:
        ValueError: If the source is unusable (``train.datasets.DataSourceError``) or empty.
    """
    from retinagate.labels import LABELS
    from retinagate.preprocess import prepare
    from train.datasets import load_splits, read_image

    if card.labels != LABELS:
        raise ValueError("validation: the card's labels are not the 29-label RFMiD scheme the data readers map to")
    # test_fraction too: a generic CSV's rows are split by one hash, so it moves the validation share.
    splits = load_splits(
        data=data,
        labels_csv=labels_csv,
        images=images,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    source = splits["val"]
    count = len(source) if limit is None else min(limit, len(source))
    if count == 0:
        raise ValueError(f"validation: {source.origin} has no validation images")
    prepared = np.stack([prepare(read_image(path), card.preprocessing) for path in source.paths[:count]])
    return Labelled(images=prepared, labels=source.labels[:count], origin=source.origin)


def validation_from_config(card: ModelCard, config: Mapping[str, Any], *, limit: int | None = None) -> Labelled | None:
    """The validation split named by a checkpoint's training config, or ``None`` if it is not on this machine."""
    data, labels_csv, images = (config.get(key) for key in ("data", "labels_csv", "images"))
    if data is None and labels_csv is None:
        return None
    paths = [Path(p) for p in (data, labels_csv) if p is not None]
    if not all(p.exists() for p in paths):
        logger.info("the training data named in the checkpoint is not here; no validation")
        return None
    return read_validation(
        card,
        data=Path(data) if data is not None else None,
        labels_csv=Path(labels_csv) if labels_csv is not None else None,
        images=Path(images) if images is not None else None,
        seed=int(config.get("seed", 0)),
        val_fraction=float(config.get("val_fraction", 0.2)),
        test_fraction=float(config.get("test_fraction", 0.0)),
        limit=limit,
    )


def macro_auroc(labels: NDArray[np.uint8], probabilities: NDArray[np.floating]) -> float | None:
    """Mean AUROC over the labels that have both classes in the split (``None`` if none has)."""
    from train.metrics import compute_metrics

    names = [f"label{i}" for i in range(labels.shape[1])]
    return compute_metrics(labels, probabilities, labels=names).macro_auroc


def _cpu_session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_outputs(
    path: Path, images: NDArray[np.uint8], *, batch_size: int = 16
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``probabilities`` and ``cam`` from an ONNX file on ONNX Runtime's CPU provider."""
    session = _cpu_session(path)
    probabilities, cams = [], []
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size])
        p, c = session.run(["probabilities", "cam"], {"image": batch})
        probabilities.append(p)
        cams.append(c)
    return np.concatenate(probabilities).astype(np.float32), np.concatenate(cams).astype(np.float32)


def seconds_per_image(
    path: Path, images: NDArray[np.uint8], *, batch_size: int = 16, repeats: int = 3, threads: int = 0
) -> float:
    """Best-of-``repeats`` CPU time per image for one batch of ``batch_size`` on ONNX Runtime.

    The best run, not the mean: other processes on the machine only ever add time.
    """
    session = _cpu_session(path, threads)
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
    session.run(["probabilities", "cam"], {"image": batch})  # warm-up
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        session.run(["probabilities", "cam"], {"image": batch})
        best = min(best, time.perf_counter() - started)
    return best / batch_size
