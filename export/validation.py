"""What an export is checked with: labelled validation photographs, AUROC, and CPU speed.

Validation data is an RFMiD-layout folder (what ``retinagate synth`` writes and RFMiD ships):
``Evaluation/<ID>.png`` with ``RFMiD_Validation_Labels.csv``. Photographs are prepared with the
model card's recipe, exactly as the worker prepares them.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from retinagate.card import ModelCard

__all__ = ["Labelled", "SPLIT_FILES", "macro_auroc", "ort_probabilities", "read_split", "seconds_per_image"]

logger = logging.getLogger(__name__)

#: RFMiD split folder and label file.
SPLIT_FILES = {
    "Training": "RFMiD_Training_Labels.csv",
    "Evaluation": "RFMiD_Validation_Labels.csv",
    "Test": "RFMiD_Testing_Labels.csv",
}
_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Labelled:
    """Prepared images with their 29-label ground truth."""

    images: NDArray[np.uint8]  # [N, S, S, 3]
    labels: NDArray[np.uint8]  # [N, C]
    ids: tuple[str, ...]


def read_split(root: Path, card: ModelCard, split: str = "Evaluation", *, limit: int | None = None) -> Labelled:
    """Reads one split of an RFMiD-layout folder, prepared to the card's input.

    Raises:
        FileNotFoundError: If the folder, its label file or a listed image is missing.
        ValueError: If the split is unknown or the labels are malformed.
    """
    import cv2

    from retinagate.labels import LABELS, labels_from_rfmid_row
    from retinagate.preprocess import prepare

    if split not in SPLIT_FILES:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLIT_FILES)}")
    if card.labels != LABELS:
        raise ValueError("validation: the card's labels are not the RFMiD 29-label scheme this reader maps to")
    root = Path(root)
    table = root / SPLIT_FILES[split]
    if not table.is_file():
        raise FileNotFoundError(f"validation: {table} not found (expected an RFMiD-layout folder)")
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if limit is not None:
        rows = rows[:limit]
    images, labels, ids = [], [], []
    for row in rows:
        image_id = str(row.get("ID", "")).strip()
        path = next((root / split / f"{image_id}{s}" for s in _SUFFIXES if (root / split / f"{image_id}{s}").is_file()), None)
        if path is None:
            raise FileNotFoundError(f"validation: no image for ID {image_id!r} under {root / split}")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"validation: cannot decode {path}")
        images.append(prepare(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), card.preprocessing))
        labels.append(labels_from_rfmid_row(row))
        ids.append(image_id)
    if not images:
        raise ValueError(f"validation: {table} lists no images")
    return Labelled(images=np.stack(images), labels=np.stack(labels), ids=tuple(ids))


def macro_auroc(labels: NDArray[np.uint8], probabilities: NDArray[np.float32]) -> float | None:
    """Mean AUROC over the labels that have both classes in the split (``None`` if none has)."""
    from train.metrics import compute_metrics

    return compute_metrics(labels, probabilities, labels=[str(i) for i in range(labels.shape[1])]).macro_auroc


def ort_probabilities(path: Path, images: NDArray[np.uint8], *, batch_size: int = 16) -> NDArray[np.float32]:
    """Probabilities from an ONNX file on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    out = [
        session.run(["probabilities"], {"image": np.ascontiguousarray(images[i : i + batch_size])})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def seconds_per_image(
    path: Path, images: NDArray[np.uint8], *, batch_size: int = 16, repeats: int = 3, threads: int = 0
) -> float:
    """Best-of-``repeats`` CPU time per image for one batch of ``batch_size`` on ONNX Runtime.

    The best run, not the mean, because other processes on the machine only ever add time.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
    session.run(["probabilities", "cam"], {"image": batch})  # warm-up
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        session.run(["probabilities", "cam"], {"image": batch})
        best = min(best, time.perf_counter() - started)
    return best / batch_size
