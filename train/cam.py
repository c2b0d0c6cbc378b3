"""Class activation maps in PyTorch, and the pointing game against lesion masks.

EfficientNet-B0 ends in global average pooling and one linear layer, so Grad-CAM on the pooled
feature map equals ``ReLU(sum_k W_ck A_k)`` up to a positive factor (the gradient of logit ``c`` with
respect to ``A`` is ``W_c / (h * w)`` everywhere). :func:`class_activation_maps` computes that for all
labels in one pass; the exported ONNX graph computes the same map.

The pointing game checks where those maps point: for each positive (image, label) pair with a ground
truth lesion mask, the centre of the CAM's strongest cell is mapped back onto the photograph (the
inverse of the crop and resize serving uses) and counts as a hit when it lies within half a cell of the
lesion. ``retinagate synth`` writes such masks (``masks/<Split>/<ID>_<COLUMN>.png``; :mod:`train.masks`
says which other layouts are read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from retinagate.card import CamGrid, ModelCard
from retinagate.labels import DISEASE_LABELS
from retinagate.preprocess import prepare, prepare_with_geometry
from train.augment import Normalizer
from train.datasets import SplitSource, read_image
from train.masks import MaskIndex, read_lesion_mask
from train.model import TurnAveraged, class_maps

__all__ = [
    "PointingGame",
    "PointingTargets",
    "cam_cells",
    "class_activation_maps",
    "pointing_game",
    "pointing_targets",
]


@torch.no_grad()
def class_activation_maps(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and raw CAMs for a normalised ``(N, 3, S, S)`` batch.

    Returns:
        ``logits (N, C)`` and ``cams (N, C, h, w)`` = ReLU of the classifier weights applied to the
        final feature map at each position (not normalised; bias left out).

    Raises:
        TypeError: If the model lacks timm's ``forward_features``/``forward_head``/``get_classifier``.
    """
    if not all(hasattr(model, name) for name in ("forward_features", "forward_head", "get_classifier")):
        raise TypeError(f"{type(model).__name__} is not a timm classifier with forward_features/forward_head")
    features = model.forward_features(images)  # type: ignore[operator]
    logits = model.forward_head(features)  # type: ignore[operator]
    cams = torch.relu(class_maps(features, model.get_classifier()))  # type: ignore[operator]
    return logits, cams


@dataclass(frozen=True)
class PointingGame:
    """Pointing-game result over positive (image, label) pairs that have a lesion mask.

    Attributes:
        hits: Pairs whose strongest CAM cell lies within the tolerance (half a cell) of the lesion.
        total: Pairs counted.
        chance: Expected hit rate of a point drawn uniformly in the field-of-view crop (mean share of
            the crop within the tolerance of a lesion), the baseline to beat.
        per_label: Label name to (hits, total).
    """

    hits: int
    total: int
    chance: float
    per_label: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "hits": self.hits,
            "total": self.total,
            "rate": self.rate,
            "chance": self.chance,
            "per_label": {k: {"hits": h, "total": t} for k, (h, t) in self.per_label.items()},
        }


@dataclass(frozen=True)
class PointingTargets:
    """The pointing game's question for one split, asked once and scored against any model's peaks.

    Each positive (image, label) pair with a lesion mask becomes the set of CAM cells whose centre lies
    within reach of the lesion: scoring a model is then a lookup of its strongest cell, so training can
    play the game every epoch at no cost beyond the validation pass.

    Attributes:
        cells: ``(h, w)`` of the CAM the targets were made for.
        images: ``(P,)`` row of each pair's image in the split.
        columns: ``(P,)`` card label column of each pair.
        names: Label name of each pair.
        hit_cells: ``(P, h * w)`` whether the strongest cell at each flat position is a hit.
        shares: ``(P,)`` share of the field-of-view crop within reach of the lesion (the chance rate).
    """

    cells: tuple[int, int]
    images: NDArray[np.intp]
    columns: NDArray[np.intp]
    names: tuple[str, ...]
    hit_cells: NDArray[np.bool_]
    shares: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.names)

    def score(self, peaks: NDArray[np.integer]) -> PointingGame:
        """Scores strongest cells: ``peaks[i, c]`` is the flat argmax of image ``i``'s map of label ``c``.

        ``peaks`` holds one row per image of the split (rows of images without pairs are not read).
        """
        if peaks.ndim != 2 or (len(self) and peaks.shape[0] <= int(self.images.max())):
            raise ValueError(f"peaks has shape {peaks.shape}; expected one row per image of the split")
        chosen = peaks[self.images, self.columns]
        hit = self.hit_cells[np.arange(len(self)), chosen]
        per_label: dict[str, tuple[int, int]] = {}
        for name, scored in zip(self.names, hit, strict=True):
            hits, total = per_label.get(name, (0, 0))
            per_label[name] = (hits + int(scored), total + 1)
        return PointingGame(
            hits=int(hit.sum()),
            total=len(self),
            chance=float(self.shares.mean()) if len(self) else float("nan"),
            per_label=per_label,
        )


def cam_cells(model: nn.Module, input_size: int) -> tuple[int, int]:
    """``(h, w)`` of the model's final feature map (its CAM) at ``input_size``.

    Probes in eval mode (batch norm statistics untouched) and leaves the model's mode as it was.
    """
    parameter = next(model.parameters())
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = torch.zeros(1, 3, input_size, input_size, device=parameter.device, dtype=parameter.dtype)
            shape = model.forward_features(probe).shape  # type: ignore[operator]
    finally:
        model.train(training)
    return int(shape[2]), int(shape[3])


def pointing_targets(
    card: ModelCard,
    source: SplitSource,
    masks: MaskIndex,
    cells: tuple[int, int],
    *,
    two_views: bool,
    labels: Sequence[str] = DISEASE_LABELS,
    tolerance: float | None = None,
) -> PointingTargets:
    """The pointing game's targets for one split (see :func:`pointing_game` for the rule).

    Args:
        card: The model's card (labels, preprocessing and where its CAM's cells sit).
        source: The split.
        masks: Its lesion masks (:func:`train.masks.find_masks`).
        cells: ``(h, w)`` of the model's CAM (:func:`cam_cells`).
        two_views: Whether the maps scored are the two-view average (:class:`train.model.TurnAveraged`)
            or one view's (:meth:`retinagate.card.ModelCard.cam_grid`).
        labels: Labels to score (default: the 28 disease outputs; ``Disease_Risk`` has no lesion).
        tolerance: Hit distance in model-input pixels; ``None``: half a CAM cell.

    Raises:
        ValueError: If a label is not one of the card's labels, or the tolerance is negative.
    """
    if tolerance is not None and tolerance < 0:
        raise ValueError(f"tolerance is {tolerance}; expected >= 0 (model-input pixels)")
    columns = []
    for name in labels:
        if name not in card.labels:
            raise ValueError(f"label {name!r} is not among the card's labels")
        columns.append(card.labels.index(name))
    grid = card.cam_grid(two_views=two_views)
    step = (grid or CamGrid.covering(card.input_size, cells[1])).step
    reach_input = step / 2 if tolerance is None else tolerance
    images: list[int] = []
    pair_columns: list[int] = []
    names: list[str] = []
    hit_cells: list[NDArray[np.bool_]] = []
    shares: list[float] = []
    for i in range(len(source)):
        wanted = [
            (name, column, files)
            for name, column in zip(labels, columns, strict=True)
            if source.labels[i, column] and (files := masks.lookup(source.paths[i], name))
        ]
        if not wanted:
            continue
        _, geometry = prepare_with_geometry(read_image(source.paths[i]), card.preprocessing)
        pairs = [
            (name, column, mask)
            for name, column, files in wanted
            if (mask := read_lesion_mask(files, geometry.source_shape)) is not None and mask.any()
        ]
        geometry = geometry.with_cam(grid)
        x0, y0, x1, y1 = geometry.crop
        reach = reach_input * (x1 - x0) / (geometry.placed[2] - geometry.placed[0])  # photograph pixels
        xs, ys = geometry.cell_centres(cells)
        for name, column, mask in pairs:
            # Distance of every pixel to the nearest lesion pixel (0 on the lesion).
            distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            # Cell centres in photograph coordinates with pixel edges at integers (cell_centres puts
            # centres there), clamped onto the photograph.
            xi = np.clip((np.asarray(xs, np.float64) + 0.5).astype(np.intp), 0, mask.shape[1] - 1)
            yi = np.clip((np.asarray(ys, np.float64) + 0.5).astype(np.intp), 0, mask.shape[0] - 1)
            hit_cells.append((distance[np.ix_(yi, xi)] <= reach).reshape(-1))
            near = distance[y0:y1, x0:x1] <= reach
            shares.append(float(near.mean()) if near.size else 0.0)
            images.append(i)
            pair_columns.append(column)
            names.append(name)
    return PointingTargets(
        cells=cells,
        images=np.asarray(images, np.intp),
        columns=np.asarray(pair_columns, np.intp),
        names=tuple(names),
        hit_cells=np.stack(hit_cells) if hit_cells else np.zeros((0, cells[0] * cells[1]), np.bool_),
        shares=np.asarray(shares, np.float64),
    )


def pointing_game(
    model: nn.Module,
    card: ModelCard,
    source: SplitSource,
    masks: MaskIndex,
    *,
    device: torch.device | str = "cpu",
    labels: Sequence[str] = DISEASE_LABELS,
    batch_size: int = 16,
    tolerance: float | None = None,
) -> PointingGame:
    """Plays the pointing game on one split.

    For each positive (image, label) pair with a lesion mask, the CAM's strongest cell is found on the
    raw ``h x w`` map (what the served graph outputs), its centre is mapped back onto the photograph,
    and the pair is a hit when that centre lies within ``tolerance`` of a lesion pixel. The default
    tolerance is half a CAM cell (``input_size / w / 2`` model-input pixels): the strongest cell lies
    within half a cell of the lesion, so a lesion anywhere in the cell counts, and a finer CAM must
    point more precisely. This is the pointing game of Zhang et al. (2016), whose 15-pixel tolerance
    plays the same role. The chance rate is the share of the field-of-view crop within the same
    distance of a lesion (where a uniformly drawn point would hit).

    Args:
        model: A timm classifier (eval mode is set here).
        card: Its card (labels and preprocessing).
        source: The split.
        masks: Its lesion masks (:func:`train.masks.find_masks`).
        device: Where to run the model.
        labels: Labels to score (default: the 28 disease outputs; ``Disease_Risk`` has no lesion).
        batch_size: Images per forward pass.
        tolerance: Hit distance in model-input pixels; ``None``: half a CAM cell.

    Raises:
        ValueError: If a label is not one of the card's labels, or the tolerance is negative.
    """
    device = torch.device(device)
    model.eval().to(device)
    two_views = isinstance(model, TurnAveraged)
    cells = cam_cells(model, card.input_size)
    targets = pointing_targets(card, source, masks, cells, two_views=two_views, labels=labels, tolerance=tolerance)
    normalizer = Normalizer(card.preprocessing).to(device)
    rows = np.unique(targets.images)
    peaks = np.zeros((len(source), len(card.labels)), np.intp)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = np.stack([prepare(read_image(source.paths[i]), card.preprocessing) for i in chunk])
        _, cams = class_activation_maps(model, normalizer(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)))
        peaks[chunk] = cams.flatten(2).argmax(dim=2).cpu().numpy()
    return targets.score(peaks)
