"""Multi-label losses for imbalanced labels: BCE, focal and asymmetric (ASL).

RFMiD is heavily imbalanced (some labels have a handful of positives among 1,920 images), which the
seed paper names as its weakness. Three remedies, selectable with ``--loss`` and combinable with
``--pos-weight auto``:

* ``bce``: binary cross-entropy on logits, optionally with a per-label positive weight.
* ``focal``: Lin et al. 2017; down-weights easy examples by ``(1 - p_t) ** gamma``.
* ``asl``: Ridnik et al. 2021 (asymmetric loss); focuses harder on negatives (``gamma_neg``) than on
  positives (``gamma_pos``) and shifts negative probabilities down by ``clip`` so the many easy
  negatives stop dominating the gradient.

All losses take logits and return the mean over batch and labels, so their magnitudes are comparable
in logs.

:func:`peak_logits` feeds an auxiliary term (``--peak-loss``): the same loss on a log-sum-exp pooling
of each label's class map, which only a few strong cells can satisfy. Average pooling spreads a small
lesion's evidence over every cell of the map; the peak term asks the map itself to rise where the
evidence is and stay low elsewhere (multiple-instance learning, as in Wang et al. 2017's ChestX-ray8
LSE pooling). The served head stays average pooling plus a linear layer, so the exported CAM is still
exactly Grad-CAM.

:func:`lesion_loss` (``--lesion-loss``) uses lesion masks where the data has them: each positive
label's class map is asked, through a softmax over its cells, to put its mass where the label's lesion
lies. Training only, as above.

:func:`lesion_cover_loss` (``--probe-loss``) uses the same masks finer and more directly: a probe on
each stage of ``--probe-strides`` (:class:`train.model.LesionProbe`) is asked, cell by cell, where each
label's lesions are and, for the labels a photograph lacks, that they are nowhere. Training only too.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from numpy.typing import ArrayLike
from torch import nn

from train.model import class_maps

__all__ = [
    "LOSSES",
    "PROBE_BALANCES",
    "AsymmetricLoss",
    "FocalLoss",
    "auto_pos_weight",
    "build_loss",
    "cell_weights",
    "equivariance_loss",
    "lesion_cover_loss",
    "lesion_loss",
    "peak_logits",
]

LossName = Literal["bce", "asl", "focal"]
LOSSES: tuple[LossName, ...] = ("bce", "asl", "focal")


def auto_pos_weight(labels: ArrayLike, cap: float = 30.0) -> torch.Tensor:
    """Per-label positive weight ``negatives / positives``, clamped to ``[1, cap]``.

    Labels without positives in the training split get 1 (nothing to up-weight); the cap keeps a label
    with two positives from dominating the loss.

    Args:
        labels: ``(N, C)`` 0/1 training labels.
        cap: Largest weight.
    """
    array = np.asarray(labels, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"labels has shape {array.shape}; expected (N, C)")
    if cap < 1.0:
        raise ValueError(f"cap is {cap}; expected at least 1")
    positives = array.sum(axis=0)
    negatives = array.shape[0] - positives
    weight = np.where(positives > 0, negatives / np.maximum(positives, 1.0), 1.0)
    return torch.as_tensor(np.clip(weight, 1.0, cap), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Sigmoid focal loss with an optional per-label positive weight."""

    def __init__(self, gamma: float = 2.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma is {gamma}; expected >= 0")
        self.gamma = gamma
        self.pos_weight: torch.Tensor | None
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        prob = torch.sigmoid(logits)
        p_t = prob * targets + (1 - prob) * (1 - targets)
        loss = bce * (1 - p_t).pow(self.gamma)
        if self.pos_weight is not None:
            loss = loss * (1 + (self.pos_weight - 1) * targets)
        return loss.mean()


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL) for multi-label classification, with an optional positive weight."""

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        pos_weight: torch.Tensor | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"gamma_neg ({gamma_neg}) and gamma_pos ({gamma_pos}) must be >= 0")
        if not 0 <= clip < 1:
            raise ValueError(f"clip is {clip}; expected 0 <= clip < 1")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.pos_weight: torch.Tensor | None
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        prob = torch.sigmoid(logits.float())
        prob_neg = (1 - prob + self.clip).clamp(max=1) if self.clip > 0 else 1 - prob
        loss_pos = targets * torch.log(prob.clamp(min=self.eps)) * (1 - prob).pow(self.gamma_pos)
        loss_neg = (1 - targets) * torch.log(prob_neg.clamp(min=self.eps)) * (1 - prob_neg).pow(self.gamma_neg)
        if self.pos_weight is not None:
            loss_pos = loss_pos * self.pos_weight
        return -(loss_pos + loss_neg).mean()


def peak_logits(features: torch.Tensor, classifier: nn.Linear, sharpness: float) -> torch.Tensor:
    """Log-sum-exp pooled class maps: ``(N, K, h, w)`` features to ``(N, C)`` logits.

    The class map of label ``c`` is ``W_c . A(x, y) + b_c`` at each cell (what the CAM shows, with the
    bias); it is pooled as ``(logsumexp(r * map) - log(h * w)) / r``, which is the mean for a flat map
    and tends to the maximum as the sharpness ``r`` grows.

    Raises:
        ValueError: If the sharpness is not positive.
    """
    if sharpness <= 0:
        raise ValueError(f"sharpness is {sharpness}; expected > 0")
    maps = class_maps(features.float(), classifier, bias=True).flatten(2)
    return (torch.logsumexp(sharpness * maps, dim=2) - math.log(maps.shape[2])) / sharpness


def equivariance_loss(maps: torch.Tensor, turned: torch.Tensor) -> torch.Tensor:
    """How far class maps are from turning with the photograph: 1 - centred cosine, averaged.

    ``maps`` are ``(N, C, h, w)`` class maps of N photographs and ``turned`` those of the same
    photographs turned 180 degrees. A network whose evidence for a lesion sits a cell away from it (the
    CAM shifted by a fixed offset, which average pooling cannot see) fails this: turning the photograph
    turns the offset too. Each map is compared after taking off its spatial mean (the logit, which
    pooling already makes agree), so only where it peaks counts; 0 when every map turns exactly.
    """
    back = torch.flip(turned, dims=(2, 3)).flatten(2).float()
    here = maps.flatten(2).float()
    here = here - here.mean(dim=2, keepdim=True)
    back = back - back.mean(dim=2, keepdim=True)
    cosine = F.cosine_similarity(here, back, dim=2, eps=1e-6)
    return (1.0 - cosine).mean()


def cell_weights(size: int, cells: int, origin: float, step: float) -> torch.Tensor:
    """``(cells, size)``: the share of cell ``k`` that input pixel ``i`` fills, along one axis.

    Cell ``k`` spans ``origin + k * step +- step / 2`` input pixels (a :class:`retinagate.card.CamGrid`)
    and pixel ``i`` spans ``[i, i + 1)``; ``R @ plane @ C.T`` with the rows' and the columns' weights is
    then the share of each cell a plane covers, exactly, on any grid (a cell reaching past the input's
    edge counts the outside as uncovered).
    """
    if size < 1 or cells < 1 or step <= 0:
        raise ValueError(f"size {size}, cells {cells}, step {step}: expected positive values")
    start = origin - step / 2 + step * torch.arange(cells, dtype=torch.float64)[:, None]
    pixel = torch.arange(size, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(pixel + 1, start + step) - torch.maximum(pixel, start)).clamp(min=0)
    return (overlap / step).float()


def lesion_loss(
    maps: torch.Tensor, planes: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Where each positive label's class map puts its mass, against where its lesion is.

    For every (image, label) pair with a lesion, the label's class map (``W_c . A`` at each cell, what
    the CAM shows) becomes a distribution over cells by a softmax, the lesion becomes one by the share
    of each cell it covers, and the loss is their cross-entropy, averaged over pairs. A softmax cares
    only where the map is high relative to elsewhere, so the logit, the map's mean under average
    pooling, is left to the classification loss; and a lesion that covers a sliver of a cell asks
    for that cell alone, as the pointing game does. Pairs whose lesion left the input (a rotation)
    are skipped.

    Args:
        maps: ``(N, C, h, w)`` class maps.
        planes: ``(N, K, S, S)`` lesion planes on the input, 0 to 255 (any dtype).
        columns: ``(N, K)`` label column of each plane; -1 for padding.
        rows: ``(h, S)`` cell weights along the height (:func:`cell_weights`).
        cols: ``(w, S)`` cell weights along the width.

    Returns:
        The mean cross-entropy (a scalar); 0 when no pair is left.
    """
    n, k = columns.shape
    h, w = maps.shape[2], maps.shape[3]
    cover = torch.einsum("ha,nkab,wb->nkhw", rows, planes.float() / 255.0, cols).flatten(2)
    mass = cover.sum(dim=2)
    valid = (columns >= 0) & (mass > 1e-3)
    chosen = maps.float().gather(1, columns.clamp(min=0)[:, :, None, None].expand(n, k, h, w)).flatten(2)
    target = cover / mass.clamp(min=1e-3)[:, :, None]
    entropy = -(target * F.log_softmax(chosen, dim=2)).sum(dim=2)
    return (entropy * valid).sum() / valid.sum().clamp(min=1)


def build_loss(name: str, pos_weight: torch.Tensor | None = None) -> nn.Module:
    """The loss named by ``--loss``.

    Raises:
        ValueError: For an unknown name (lists the known ones).
    """
    if name == "bce":
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    if name == "focal":
        return FocalLoss(pos_weight=pos_weight)
    if name == "asl":
        return AsymmetricLoss(pos_weight=pos_weight)
    raise ValueError(f"loss is {name!r}; expected one of {', '.join(LOSSES)}")


#: What weighs the same within the covered half of :func:`lesion_cover_loss` (``--probe-balance``).
PROBE_BALANCES = ("cells", "pairs")


def lesion_cover_loss(
    maps: torch.Tensor,
    planes: torch.Tensor,
    columns: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    full_cover: float = 0.05,
    balance: str = "cells",
) -> torch.Tensor:
    """Per-cell cross-entropy of a lesion probe's maps against where each label's lesions are.

    The probe (:class:`train.model.LesionProbe`) reads a stage finer than the CAM's, and each of its
    cells says whether the label's lesion is there. Targets: for a label the photograph does not have,
    no cell (known from the labels alone, so every photograph teaches it); for a positive label with a
    lesion plane, the share of each cell the lesion covers, counted as whole from ``full_cover`` on (a
    microaneurysm fills a few percent of a 16-pixel cell); a positive label without a plane, or whose
    lesion left the input, teaches nothing. Lesion cells are rare, so the covered and the uncovered
    cells each weigh half. Within the covered half, ``balance`` says what weighs the same: each cell
    (``cells``: a finding weighs by its area), or each positive (photograph, label) pair (``pairs``: its
    cells are averaged first). By area, one photograph's tessellation or media haze taken to cover
    the retina (``--diffuse-lesions``) holds hundreds of cells and outweighs every focal lesion of the
    batch together, microaneurysms and a branch occlusion's haemorrhages among them.

    Args:
        maps: ``(N, C, h, w)`` probe logits.
        planes: ``(N, K, S, S)`` lesion planes on the input, 0 to 255.
        columns: ``(N, K)`` label column of each plane; -1 for padding.
        labels: ``(N, C)`` 0/1 labels.
        rows: ``(h, S)`` cell weights along the height (:func:`cell_weights`).
        cols: ``(w, S)`` cell weights along the width.
        full_cover: Share of a cell from which it counts as all lesion.
        balance: ``cells`` or ``pairs``, what weighs the same within the covered half.

    Returns:
        The loss (a scalar); 0 when no cell is known.

    Raises:
        ValueError: For an unknown ``balance``.
    """
    if balance not in PROBE_BALANCES:
        raise ValueError(f"balance is {balance!r}; expected one of {', '.join(PROBE_BALANCES)}")
    n, k = columns.shape
    c, h, w = maps.shape[1:]
    cover = torch.einsum("ha,nkab,wb->nkhw", rows, planes.float() / 255.0, cols)
    placed = (columns >= 0) & (cover.flatten(2).sum(dim=2) > 1e-3)
    index = columns.clamp(min=0)
    hit = (cover / full_cover).clamp(max=1.0) * placed[:, :, None, None]
    target = maps.new_zeros(n, c, h, w, dtype=torch.float32)
    target.scatter_reduce_(1, index[:, :, None, None].expand(n, k, h, w), hit, reduce="amax")
    has_plane = maps.new_zeros(n, c, dtype=torch.float32).scatter_reduce(1, index, placed.float(), reduce="amax")
    known = ((labels < 0.5) | (has_plane > 0)).float()[:, :, None, None]
    z = maps.float()
    pulled = (F.softplus(-z) * target * known).sum(dim=(2, 3))  # per (photograph, label)
    weight = (target * known).sum(dim=(2, 3))
    if balance == "pairs":
        counted = (weight > 1e-6).float()
        positive = (pulled / weight.clamp(min=1e-6) * counted).sum() / counted.sum().clamp(min=1)
    else:
        positive = pulled.sum() / weight.sum().clamp(min=1e-6)
    negative = (F.softplus(z) * (1 - target) * known).sum() / ((1 - target) * known).sum().clamp(min=1e-6)
    return positive + negative
