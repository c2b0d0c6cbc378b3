"""The training loop: AdamW, warmup + cosine, AMP, EMA, early stopping, resumable checkpoints.

:func:`train` runs a whole training job from a :class:`TrainConfig` and leaves a run folder::

    config.json        the resolved configuration
    metrics.csv        one row per epoch (losses, learning rate, input size, validation metrics, per-label AUROC)
    last.pt            everything needed to resume (model, optimizer, scheduler, grad scaler, EMA,
                       RNG states, epoch, best metric, early-stopping counter, history)
    best.pt            the weights of the best validation epoch (TrainConfig.select_by), with the final card
    model_card.json    the card: thresholds calibrated on validation, metrics, data summary, sha256
    curves.png, roc_curves.png, auroc_bars.png

Reproducibility: every random choice is a function of the run seed. The data order of epoch ``e``
comes from a generator seeded with (seed, e), each sample's augmentation from (seed, e, index) (or,
with augmentation on the GPU, each batch's from (seed, e, batch)), the classifier starts from the
label priors, and the global RNG state (dropout, stochastic depth) is saved in ``last.pt``; so a run
interrupted after any epoch and resumed gives the same weights as an uninterrupted run (bit for bit
on the CPU; GPU kernels chosen by cuDNN autotuning may differ in the last bits).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from retinagate.card import CamGrid, ModelCard, Preprocessing
from retinagate.labels import DIFFUSE_LABELS, DISEASE_LABELS, DISEASE_RISK, LABELS
from retinagate.preprocess import fit_fov_threshold
from train.augment import AUG_LEVELS, Augmenter, BatchAugmenter, Normalizer, sample_seed
from train.calibration import LabelThreshold, calibrate_thresholds
from train.cam import PointingTargets, cam_cells, class_activation_maps, pointing_targets
from train.datasets import CachedSplit, Split, SplitSource, cache_split, evenly_spaced, load_splits, read_image
from train.lesions import lesion_planes
from train.loader import AugmentedImages, LesionPlanes, epoch_loader
from train.losses import LOSSES, PROBE_BALANCES, auto_pos_weight, build_loss
from train.masks import MASK_FOLDER_WORDS, MaskIndex, find_masks, photographs, positive_labels
from train.metrics import Metrics, compute_metrics
from train.model import (
    CHECKPOINT_FORMAT,
    LesionProbe,
    TurnAveraged,
    create_model,
    load_checkpoint,
    served_model,
    state_dict_sha256,
)
from train.step import AUTOCAST_DTYPES, TrainStep

__all__ = [
    "POINTING_ENOUGH",
    "PRECISIONS",
    "Predictions",
    "RunResult",
    "TrainConfig",
    "TrainingError",
    "auto_workers",
    "evaluate_checkpoint",
    "freeze_stages",
    "predict",
    "resolve_device",
    "selection_score",
    "train",
]

logger = logging.getLogger(__name__)

PRECISIONS: Final = ("auto", "fp32", "fp16", "bf16")
#: Strides of the stages a lesion probe may read (EfficientNet-B0's ``blocks.1``, ``blocks.2``, ``blocks.4``).
PROBE_STRIDES: Final = (4, 8, 16)
SELECT_BY: Final = ("auroc", "auroc+pointing")

#: The validation pointing game at which ``auroc+pointing`` stops counting it: past this, the maps point
#: at most lesions and the game's epoch-to-epoch moves are noise (a standard error of about 0.03 on 170
#: pairs), so AUROC alone picks among such epochs. Tuning seeds 11-13, per-epoch test scores: the plain
#: mean picked epochs 16, 14 and 12 (test macro AUROC 0.784 on average, pointing 0.874), this rule 16,
#: 16 and 16 (0.789, 0.874).
POINTING_ENOUGH: Final = 0.8

#: Training photographs an automatic FOV threshold is fitted on: the border of one camera varies little,
#: and decoding and measuring 64 JPEGs of 2048 x 1536 takes about 1 s here.
FOV_FIT_PHOTOGRAPHS: Final = 64


class TrainingError(RuntimeError):
    """A training or evaluation job cannot run as configured; the message says why and what to do."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; written to ``config.json`` and into each checkpoint.

    The defaults are the recipe chosen on hard-mode synthetic photographs (seed 11; reported on a seed
    never tuned on, against the plain baseline of ``bench/bench_recipe.py``; see the README's Model
    section): 288 px (small lesions keep a few pixels), local contrast normalisation in the graph (the
    photograph minus its local mean over the field of view, sigma 4% of the side, times 4: what lifted
    test macro AUROC most, 0.586 to 0.704 on the tuning seed), 20 epochs of AdamW at lr 2e-3 with
    warmup and a cosine decay, the first 10 at 224 px (progressive resizing: more epochs in about the
    time of 16 at 288 px; test macro AUROC up by 0.011 and 0.003 on tuning seeds 11 and 12, and by 0.013
    on the fresh report seed 20261226, in 775 s against 786 s; see the README), batches of 8 (twice
    the steps of 16 in 3-5% more time; test macro AUROC up on each of tuning seeds 11-13 by 0.021 to
    0.040, and by 0.010 on the fresh report seed, where the pointing game fell 0.047; see the README),
    an EMA of the weights, light augmentation (flips, rotation up to 15 degrees, scale 0.95-1.05, mild
    brightness/contrast/saturation jitter) and no dropout or stochastic
    depth, the best epoch chosen by validation macro AUROC and the pointing game together, and, when the
    training photographs have lesion masks, a lesion loss of weight 0.01 that teaches each label's map
    where its lesion is (tuning seed 11: test pointing game 0.420 to 0.885 at the same validation macro
    AUROC, 0.803 to 0.805; weights 0.03 to 1 pointed as well but slowed the classification), and a
    lesion probe on each of the stride-8 and stride-16 stages, weight 1, that those masks teach cell by
    cell where each label's lesions are (one probe at stride 16, weight 0.1, on tuning seeds 11-13:
    validation macro AUROC up by 0.026 to 0.066, test by 0.009 to 0.048; weights 0.3 and then 1, and
    then the second probe at stride 8, each won again on a fresh seed; see the README). Light
    augmentation against flips only was the one change that raised the pointing game on every tuning
    seed of a GPU sweep (``bench/gpu_recipe_sweep.py``, seeds 11-13: 0.377 to 0.475, macro AUROC 0.775
    to 0.799); the ``strong`` level with dropout and stochastic depth slowed learning instead
    (validation macro AUROC 0.53 against 0.60 at epoch 8). On the 2-core machine an epoch over 400
    photographs takes 35 to 49 s at 288 px and 28 to 35 s at 224 px, depending on the day, so the 20
    epochs stay inside the 15-minute budget (775 to 795 s on a slow day; 16 at 288 px took 786 s
    beside them, and 18 at 288 px once took 951 s).

    Attributes:
        out: Run folder.
        data: RFMiD-layout folder (or use ``labels_csv`` + ``images``).
        labels_csv: Generic CSV with a path column and label columns.
        images: Folder the generic CSV's paths start from.
        masks: Lesion mask folder (``<masks>/<image folder>/<ID>_<COLUMN>.png``, or another layout of
            :mod:`train.masks`) for the lesion loss, the pointing game that picks the epoch and the
            report's; default: the data folder's folders that say ``mask`` (:func:`train.masks.find_masks`).
        cache_dir: Preprocessing cache folder; default ``<out>/cache``.
        val_fraction: Validation share for a generic CSV without a ``split`` column.
        test_fraction: Test share for a generic CSV without a ``split`` column.
        epochs: Epochs to train (early stopping may end sooner).
        img_size: Square input side; becomes ``card.preprocessing.input_size``.
        early_size: Input side of the early epochs (progressive resizing: the photographs, normalised
            at ``img_size``, and their lesion planes scaled down on the device before the network;
            cheaper epochs first, the served size at the end); only when smaller than ``img_size``.
        early_share: Share of the epochs (rounded down) trained at ``early_size`` first
            (:attr:`early_epochs`); 0 trains every epoch at ``img_size``.
        contrast_sigma: Local contrast normalisation in the graph (:class:`train.augment.Normalizer`):
            sigma of the local mean as a share of ``img_size``; 0 turns it off.
        contrast_gain: Gain on the difference from the local mean.
        fov_threshold: Level that parts the field of view from the border
            (``card.preprocessing.fov_threshold``); ``None``: fitted to the training photographs when
            the run starts (:func:`retinagate.preprocess.fit_fov_threshold`: the default 20 unless their
            border is brighter), and stored resolved.
        batch_size: Images per optimisation step.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        warmup_epochs: Linear warmup length, in epochs (fractions allowed).
        min_lr_ratio: Final learning rate as a share of ``lr`` at the end of the cosine.
        grad_clip: Gradient-norm clipping; 0 turns it off.
        ema: Keep an exponential moving average of the weights and validate/save it.
        ema_decay: Largest EMA decay (warmed up from 0).
        precision: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16`` (CUDA) or ``bf16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: DataLoader worker processes; -1 picks them (:func:`auto_workers`).
        seed: Seed of every random choice.
        loss: ``bce``, ``asl`` or ``focal``.
        peak_loss: Weight of the same loss on log-sum-exp pooled class maps
            (:func:`train.losses.peak_logits`), which asks each label's map to peak where its evidence
            is; 0 turns it off. Training only: the served head stays average pooling.
        peak_sharpness: Sharpness ``r`` of that pooling (towards the mean as it falls, the maximum as
            it grows).
        equivariance: Weight of :func:`train.losses.equivariance_loss`, which asks each class map to
            turn with the photograph, so that it cannot sit a fixed offset from the lesion; 0 turns it
            off. Training only.
        equivariance_pairs: With it on, the last this many images of each batch are replaced by the
            first ones turned 180 degrees (the batch keeps its size and cost).
        lesion_loss: Weight of :func:`train.losses.lesion_loss`, which asks each positive label's class
            map to put its mass on the label's lesion, when the training split has lesion masks
            (``masks``, :mod:`train.lesions`); 0 turns it off. Training only.
        probe_loss: Weight of :func:`train.losses.lesion_cover_loss`, which asks a 1x1 probe on each
            stage of ``probe_strides`` (:class:`train.model.LesionProbe`) where each label's lesions
            are and are not, when the training split has lesion masks; 0 turns it off. Training only:
            the probes are saved in ``last.pt`` for a resume and are never part of the model.
        probe_strides: Input pixels per cell of the stages the probes read, one probe each, any of 16
            (EfficientNet-B0's ``blocks.4``, 112 channels), 8 (``blocks.2``, 40 channels, four times
            the cells) and 4 (``blocks.1``, 24 channels, sixteen times the cells).
        probe_balance: What weighs the same among the lesion cells of the probes' loss: each cell
            (``cells``), or each positive (photograph, label) pair (``pairs``), so that a retina-wide
            diffuse finding weighs as much as one microaneurysm cluster, not as hundreds of them.
        risk_lesions: With lesion masks, Disease_Risk's lesion is the union of the photograph's lesions
            (:func:`train.step.with_risk_plane`), for the lesion loss and the probes alike; without it,
            Disease_Risk has no mask and its map and probe channel learn only where nothing is.
        diffuse_lesions: With lesion masks, a positive finding seen over the retina as a whole (media
            haze, tessellation: :data:`retinagate.labels.DIFFUSE_LABELS`) that has no mask of its own
            is taken to cover the field of view (:func:`train.lesions.lesion_planes`), and joins
            Disease_Risk's lesion only on a photograph without another (:func:`train.step.with_risk_plane`).
        pos_weight: ``none`` or ``auto`` (negatives/positives per label, capped); with ``auto`` the
            saved classifier bias has log(weight) taken back off, so scores stay log-odds.
        balanced_sampler: Draw images with weights that favour rare labels.
        aug: ``none``, ``flip``, ``light`` or ``strong`` (:mod:`train.augment`).
        aug_on: ``workers`` (per-sample ``transforms.v2`` in loader processes), ``device`` (the same
            recipe batched on the training device, :class:`train.augment.BatchAugmenter`) or ``auto``
            (device on CUDA, where CPU workers cannot keep up; workers on the CPU).
        pretrained: Start from ImageNet weights (timm hub).
        weights: Local timm checkpoint to start from.
        freeze_stages: Freeze the stem and the first K of EfficientNet's 7 block stages.
        patience: Stop after this many epochs without a better validation score (``select_by``); 0 never.
        select_by: What picks ``best.pt`` and drives early stopping: ``auroc`` (validation macro AUROC)
            or ``auroc+pointing`` (the mean of validation macro AUROC and the validation pointing game,
            the game counted up to :data:`POINTING_ENOUGH`, when the data has lesion masks; AUROC alone
            otherwise). A reader sees the heatmap as much
            as the score, and the epoch with the best AUROC is not always the one whose maps point best.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth.
        output_stride: Input pixels per CAM cell: 32 (EfficientNet as designed) or 16 (the last stages
            dilated, a CAM twice as fine, about 1.6x the compute).
        tta: Test-time views, recorded in the card: ``rot180`` (the photograph and its 180-degree
            turn, feature maps averaged before pooling and CAM, :class:`train.model.TurnAveraged`;
            twice the inference compute, the CAM stays exact) or ``none``. The report, the calibrated
            thresholds, ``retinagate evaluate``, the OOD statistics and the exported graph use the
            card's views; training and the per-epoch validation that picks ``best.pt`` use one view
            (the second would add about 5 s an epoch, 10% of the default run).
        channels_last: NHWC memory format (faster convolutions on CUDA and on x86 CPUs).
        name: Model name for the card.
        version: Model version for the card.
    """

    out: Path
    data: Path | None = None
    labels_csv: Path | None = None
    images: Path | None = None
    masks: Path | None = None
    cache_dir: Path | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    epochs: int = 20
    img_size: int = 288
    early_size: int = 224
    early_share: float = 0.5
    contrast_sigma: float = 0.04
    contrast_gain: float = 4.0
    fov_threshold: int | None = None
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    ema: bool = True
    ema_decay: float = 0.998
    precision: str = "auto"
    device: str = "auto"
    workers: int = -1
    seed: int = 0
    loss: str = "bce"
    peak_loss: float = 0.0
    peak_sharpness: float = 5.0
    equivariance: float = 0.0
    equivariance_pairs: int = 4
    lesion_loss: float = 0.01
    probe_loss: float = 1.0
    probe_strides: tuple[int, ...] = (8, 16)
    probe_balance: str = "pairs"
    risk_lesions: bool = True
    diffuse_lesions: bool = True
    pos_weight: str = "none"
    balanced_sampler: bool = False
    aug: str = "light"
    aug_on: str = "auto"
    pretrained: bool = True
    weights: Path | None = None
    freeze_stages: int = 0
    patience: int = 5
    select_by: str = "auroc+pointing"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    output_stride: int = 32
    tta: str = "rot180"
    channels_last: bool = True
    name: str = "retinagate-efficientnet-b0"
    version: str = "0.1.0"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.epochs >= 1, f"epochs is {self.epochs}; expected at least 1")
        need(32 <= self.img_size <= 2048, f"img_size is {self.img_size}; expected 32-2048")
        need(0 <= self.early_share < 1, f"early_share is {self.early_share}; expected 0 <= share < 1 (0: off)")
        need(self.early_size >= 32, f"early_size is {self.early_size}; expected at least 32")
        need(0 <= self.contrast_sigma <= 0.25, f"contrast_sigma is {self.contrast_sigma}; expected 0-0.25 (0: off)")
        need(0 < self.contrast_gain <= 16, f"contrast_gain is {self.contrast_gain}; expected > 0 and <= 16")
        need(self.batch_size >= 2, f"batch_size is {self.batch_size}; expected at least 2 (batch norm)")
        need(self.lr > 0, f"lr is {self.lr}; expected > 0")
        need(self.weight_decay >= 0, f"weight_decay is {self.weight_decay}; expected >= 0")
        need(self.warmup_epochs >= 0, f"warmup_epochs is {self.warmup_epochs}; expected >= 0")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio is {self.min_lr_ratio}; expected 0-1")
        need(self.grad_clip >= 0, f"grad_clip is {self.grad_clip}; expected >= 0 (0 turns clipping off)")
        need(0 < self.ema_decay < 1, f"ema_decay is {self.ema_decay}; expected between 0 and 1")
        need(self.precision in PRECISIONS, f"precision is {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        need(self.workers >= -1, f"workers is {self.workers}; expected -1 (auto) or >= 0")
        need(self.peak_loss >= 0, f"peak_loss is {self.peak_loss}; expected >= 0 (0 turns it off)")
        need(self.lesion_loss >= 0, f"lesion_loss is {self.lesion_loss}; expected >= 0 (0 turns it off)")
        need(self.probe_loss >= 0, f"probe_loss is {self.probe_loss}; expected >= 0 (0 turns it off)")
        # Frozen, but a list (from JSON or the command line) or one stride is stored as the tuple it means.
        strides = [self.probe_strides] if isinstance(self.probe_strides, int) else self.probe_strides
        object.__setattr__(self, "probe_strides", tuple(sorted(set(strides))))
        need(
            bool(self.probe_strides) and set(self.probe_strides) <= set(PROBE_STRIDES),
            f"probe_strides is {self.probe_strides}; expected one or more of {', '.join(map(str, PROBE_STRIDES))}",
        )
        need(
            self.probe_balance in PROBE_BALANCES,
            f"probe_balance is {self.probe_balance!r}; expected one of {', '.join(PROBE_BALANCES)}",
        )
        need(self.equivariance >= 0, f"equivariance is {self.equivariance}; expected >= 0 (0 turns it off)")
        need(
            self.equivariance_pairs >= 1
            and (self.equivariance == 0 or self.equivariance_pairs <= self.batch_size // 2),  # unused when off
            f"equivariance_pairs is {self.equivariance_pairs}; expected 1 to half the batch ({self.batch_size // 2})",
        )
        need(self.peak_sharpness > 0, f"peak_sharpness is {self.peak_sharpness}; expected > 0")
        need(
            self.fov_threshold is None or 0 <= self.fov_threshold <= 255,
            f"fov_threshold is {self.fov_threshold}; expected 0-255 (or auto)",
        )
        need(self.loss in LOSSES, f"loss is {self.loss!r}; expected one of {', '.join(LOSSES)}")
        need(self.pos_weight in ("none", "auto"), f"pos_weight is {self.pos_weight!r}; expected none or auto")
        need(self.aug in AUG_LEVELS, f"aug is {self.aug!r}; expected one of {', '.join(AUG_LEVELS)}")
        need(
            self.aug_on in ("auto", "workers", "device"), f"aug_on is {self.aug_on!r}; expected auto, workers or device"
        )
        need(0 <= self.freeze_stages <= 7, f"freeze_stages is {self.freeze_stages}; expected 0-7")
        need(self.select_by in SELECT_BY, f"select_by is {self.select_by!r}; expected one of {', '.join(SELECT_BY)}")
        need(self.patience >= 0, f"patience is {self.patience}; expected >= 0 (0 turns early stopping off)")
        need(0 <= self.drop_rate < 1, f"drop_rate is {self.drop_rate}; expected 0 <= rate < 1")
        need(self.output_stride in (16, 32), f"output_stride is {self.output_stride}; expected 16 or 32")
        need(self.tta in ("none", "rot180"), f"tta is {self.tta!r}; expected none or rot180")
        need(0 <= self.drop_path_rate < 1, f"drop_path_rate is {self.drop_path_rate}; expected 0 <= rate < 1")

    @property
    def early_epochs(self) -> int:
        """Epochs trained at ``early_size`` before the rest at ``img_size``: ``early_share`` of them,
        rounded down, or none when ``early_size`` is not smaller (``--img-size 224`` runs at 224 throughout)."""
        return math.floor(self.epochs * self.early_share + 1e-9) if self.early_size < self.img_size else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (older or newer runs).

        Runs written before ``select_by`` existed chose their best epoch by AUROC alone, and keep doing
        so when resumed (their stored best score is an AUROC); runs written before ``tta`` existed
        were evaluated on one view, and runs written before ``lesion_loss`` trained without it, and
        keep being so; runs written before ``probe_strides`` probed stride 16 alone, and runs written
        before ``risk_lesions`` gave Disease_Risk no lesion, and runs written before ``diffuse_lesions``
        gave an unmasked diffuse finding none, and runs written before ``probe_balance`` weighed the
        probes' lesion cells each the same; runs written before ``early_share`` trained every
        epoch at ``img_size``, and a resumed one goes on so.
        """
        paths = {"out", "data", "labels_csv", "images", "masks", "cache_dir", "weights"}
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {
            k: (Path(v) if k in paths and v is not None else v) for k, v in data.items() if k in known
        }
        values.setdefault("select_by", "auroc")
        values.setdefault("tta", "none")
        values.setdefault("lesion_loss", 0.0)
        values.setdefault("probe_loss", 0.0)
        values.setdefault("probe_strides", (16,))
        values.setdefault("risk_lesions", False)
        values.setdefault("diffuse_lesions", False)
        values.setdefault("probe_balance", "cells")
        values.setdefault("early_share", 0.0)
        values.setdefault("fov_threshold", Preprocessing().fov_threshold)
        return cls(**values)

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out / "cache"

    def preprocessing(self) -> Preprocessing:
        """The card's recipe; an automatic FOV threshold not yet fitted reads as the default."""
        threshold = {} if self.fov_threshold is None else {"fov_threshold": self.fov_threshold}
        return Preprocessing(
            input_size=self.img_size,
            contrast_sigma=self.contrast_sigma,
            contrast_gain=self.contrast_gain,
            **threshold,
        )


@dataclass(frozen=True)
class RunResult:
    """What a finished (or paused) training run produced.

    Attributes:
        out: Run folder.
        finished: ``False`` when the run paused after ``stop_after_epochs`` and can be resumed.
        epochs_run: Epochs completed so far (over all sessions).
        best_epoch: Epoch of ``best.pt`` (1-based), or 0 if none yet.
        stopped_early: Whether early stopping ended the run.
        card: The final model card (``None`` while unfinished).
        validation: Validation metrics of the best weights (``None`` while unfinished).
        test: Test metrics of the best weights, when a test split exists.
        seconds: Wall time of this session.
    """

    out: Path
    finished: bool
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    card: ModelCard | None
    validation: Metrics | None
    test: Metrics | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; names a missing CUDA device clearly."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"device is {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda was requested but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"device is {name!r}; expected auto, cpu, cuda or cuda:N")
    return device


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("precision fp16 needs a CUDA device (grad scaler); on the CPU use bf16 or fp32")
    return precision


def freeze_stages(model: nn.Module, stages: int) -> list[nn.Module]:
    """Freezes EfficientNet's stem and its first ``stages`` block stages (partial fine-tuning).

    Returns the frozen modules; the loop keeps them in eval mode so their batch-norm statistics stay
    those of the pretrained weights.

    Raises:
        TrainingError: If the model has no EfficientNet-like ``conv_stem``/``blocks`` or too few stages.
    """
    if stages <= 0:
        return []
    blocks = getattr(model, "blocks", None)
    stem = [getattr(model, name, None) for name in ("conv_stem", "bn1")]
    if not isinstance(blocks, nn.Sequential) or any(m is None for m in stem):
        raise TrainingError(
            f"--freeze-stages needs an EfficientNet-like model (conv_stem, bn1, blocks); got {type(model).__name__}"
        )
    if stages > len(blocks):
        raise TrainingError(f"--freeze-stages is {stages}; this model has {len(blocks)} stages")
    frozen: list[nn.Module] = [m for m in stem if isinstance(m, nn.Module)] + list(blocks[:stages])
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    return frozen


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's split (no decay on biases and normalisation weights), with the decayed group first.

    The order is the one this loop has always given AdamW, so a run started before resumes: an
    optimizer state loads group by group.
    """
    from timm.optim import param_groups_weight_decay  # type: ignore[attr-defined]  # public, not in __all__

    groups: list[dict[str, Any]] = param_groups_weight_decay(model, weight_decay)
    return sorted(groups, key=lambda group: group["weight_decay"] == 0)


def _schedule(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup from ``1 / warmup_steps``, then a cosine to ``min_ratio``, per optimizer step.

    Not timm's ``CosineLRScheduler``: its warmup starts from a fixed learning rate and rises by a
    different step, which would change the measured recipe, and it would change what a checkpoint's
    scheduler state holds, so a run started before could not resume.
    """

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def auto_workers(device: torch.device, cores: int | None = None) -> int:
    """Loader processes for ``--workers -1``.

    On a GPU the host cores only feed it: up to 8 workers. On the CPU every worker takes cores from
    the training step; on 2 cores one worker halved throughput (27.8 against 43.6 img/s inline,
    bench/bench_train.py), so small machines load inline and larger ones spare a quarter of their
    cores, at most 4.
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if device.type == "cuda":
        return min(8, max(0, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)


def _balanced_weights(labels: NDArray[np.uint8]) -> torch.Tensor:
    """Sampling weight per image: the rarest of its disease labels wins (square-root damped).

    Images without disease labels weigh as the "no disease" group does. Square-root damping
    (sampling in proportion to 1/sqrt(frequency)) lifts rare labels without repeating their few
    images so often that the model memorises them.
    """
    disease = np.array([LABELS.index(n) for n in DISEASE_LABELS]) if labels.shape[1] == len(LABELS) else None
    matrix = labels[:, disease] if disease is not None else labels
    counts = matrix.sum(axis=0).astype(np.float64)
    inverse = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
    healthy = ~matrix.any(axis=1)
    per_image = (matrix * inverse).max(axis=1)
    per_image[healthy] = 1.0 / max(1, int(healthy.sum()))
    return torch.as_tensor(np.sqrt(per_image), dtype=torch.double)


def _init_classifier_bias(model: nn.Module, labels: NDArray[np.uint8]) -> None:
    """Starts each output at its training prevalence: bias = logit(positives / images).

    With 29 mostly negative labels, a zero bias starts every output at p = 0.5, and the first
    hundreds of steps go into learning "mostly absent" instead of the lesions; the prior start
    removes that phase (Lin et al. 2017, section 3.3).
    """
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    bias = getattr(classifier, "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.shape != (labels.shape[1],):
        return
    prevalence = np.clip(labels.mean(axis=0), 0.01, 0.99)
    with torch.no_grad():
        bias.copy_(torch.as_tensor(np.log(prevalence / (1 - prevalence)), dtype=bias.dtype))


def _rng_state(device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list | tuple) else value


def _save(payload: dict[str, Any], path: Path) -> None:
    """Writes a checkpoint atomically: a crash leaves the previous file, never half of a new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _batches(images: NDArray[np.uint8], batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        chunk = np.array(images[start : start + batch_size])  # a writable copy off the memory map
        yield torch.from_numpy(chunk).permute(0, 3, 1, 2)  # NHWC bytes: already channels_last


class Predictions(NamedTuple):
    """What :func:`predict` returns.

    Attributes:
        probs: ``float32 (N, C)`` probabilities.
        loss: Mean loss, or ``None`` without labels and a criterion.
        peaks: ``(N, C)`` flat index of the strongest cell of each label's map, when asked for.
    """

    probs: NDArray[np.float32]
    loss: float | None
    peaks: NDArray[np.int64] | None = None


@torch.no_grad()
def predict(
    model: nn.Module,
    images: NDArray[np.uint8],
    preprocessing: Preprocessing,
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 64,
    labels: NDArray[np.uint8] | None = None,
    criterion: nn.Module | None = None,
    progress: bool = False,
    desc: str = "predict",
    peaks: bool = False,
) -> Predictions:
    """Probabilities for ``(N, S, S, 3)`` uint8 model inputs, the mean loss when labels are given, and
    with ``peaks`` the strongest cell of every label's class activation map (for the pointing game).
    """
    from tqdm import tqdm

    model.eval()
    normalizer = Normalizer(preprocessing).to(device)
    dtype = AUTOCAST_DTYPES.get(precision)
    outputs: list[torch.Tensor] = []
    strongest: list[torch.Tensor] = []
    loss_sum, seen = 0.0, 0
    total = math.ceil(images.shape[0] / batch_size)
    for i, batch in enumerate(
        tqdm(_batches(images, batch_size), total=total, desc=desc, leave=False, disable=not progress)
    ):
        x = normalizer(batch.to(device, non_blocking=True))
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if peaks:
                raw, cams = class_activation_maps(model, x)
                strongest.append(cams.flatten(2).argmax(dim=2).cpu())
            else:
                raw = model(x)
        logits = raw.float()
        if labels is not None and criterion is not None:
            y = torch.from_numpy(labels[i * batch_size : i * batch_size + batch.shape[0]]).to(device).float()
            loss_sum += float(criterion(logits, y)) * batch.shape[0]
            seen += batch.shape[0]
        outputs.append(torch.sigmoid(logits).cpu())
    probs = torch.cat(outputs).numpy().astype(np.float32) if outputs else np.zeros((0, 0), np.float32)
    return Predictions(
        probs,
        loss_sum / seen if seen else None,
        torch.cat(strongest).numpy() if strongest else None,
    )


def _training_card(config: TrainConfig) -> ModelCard:
    return ModelCard(
        name=config.name,
        version=config.version,
        preprocessing=config.preprocessing(),
        output_stride=config.output_stride,
        tta=config.tta,
        # The two views paired by where their cells look: possible where the turned view's cells land
        # one cell from the upright view's (the input a multiple of the stride).
        cam_alignment="receptive_field" if config.img_size % config.output_stride == 0 else "input",
    )


def _write_config(out: Path, config: TrainConfig) -> None:
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def _write_metrics_csv(path: Path, history: Sequence[dict[str, Any]], labels: Sequence[str]) -> None:
    columns = [
        "epoch", "lr", "train_loss", "val_loss", "val_macro_auroc", "val_map", "val_disease_risk_auroc",
        "val_riadd_score", "val_pointing", "input_size", "seconds", *[f"auroc_{n}" for n in labels],
    ]  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    tmp.replace(path)


def _software() -> dict[str, str]:
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


class _Run:
    """State of one training session (internal; :func:`train` is the interface)."""

    def __init__(self, config: TrainConfig, *, progress: bool) -> None:
        self.config = config
        self.progress = progress
        self.device = resolve_device(config.device)
        self.precision = _resolve_precision(config.precision, self.device)
        self.card = _training_card(config)
        self.out = config.out

    @cached_property
    def sources(self) -> dict[Split, SplitSource]:
        """The label files read and the images listed (cheap; nothing is decoded yet)."""
        c = self.config
        return load_splits(
            data=c.data,
            labels_csv=c.labels_csv,
            images=c.images,
            seed=c.seed,
            val_fraction=c.val_fraction,
            test_fraction=c.test_fraction,
            skip=[c.resolved_cache_dir, c.out],
        )

    @cached_property
    def masks(self) -> MaskIndex | None:
        """The lesion masks of the photographs (:func:`train.masks.find_masks`, scanned once), or ``None``.

        Masks looked for and not found are logged with what was found, since the lesion loss, the epoch
        choice and the report's pointing game all quietly go without them.
        """
        c = self.config
        folder, sources = _data_folder(c.data, c.labels_csv), self.sources.values()
        index = find_masks(c.masks, folder, photographs(sources), positive_labels(sources))
        if index is None:
            if folder is not None:
                logger.info(
                    "no lesion masks: no folder under %s says %s; the maps learn from the labels alone "
                    "(--masks DIR reads them from another folder)", folder, MASK_FOLDER_WORDS,
                )  # fmt: skip
            return None
        if not index.files:
            logger.warning("%s; training without them", index.describe())
            return None
        logger.info("%s", index.describe())
        return index

    def lesions(self, source: SplitSource) -> LesionPlanes | None:
        """The training split's lesion masks on the input, when a loss that reads them is on and there are any.

        Finding them for the lesion loss changes the card: its one-view maps are then trained to, and
        read at, the cam grid's centres (``localisation`` ``lesion_masks``).
        """
        c = self.config
        if (c.lesion_loss <= 0 and c.probe_loss <= 0) or self.masks is None:
            return None
        planes = lesion_planes(
            source, self.card.preprocessing, self.masks, c.resolved_cache_dir,
            diffuse=DIFFUSE_LABELS if c.diffuse_lesions else (),
        )  # fmt: skip
        if planes is None:
            logger.warning(
                "%s, but none for a positive label of a training photograph (folder %r); the lesion losses are off",
                self.masks.describe(), source.paths[0].parent.name if len(source) else "",
            )  # fmt: skip
            return None
        if c.lesion_loss > 0:
            self.card = self.card.with_updates(localisation="lesion_masks")
        risk = ""
        if c.risk_lesions:
            risk = "; Disease_Risk's lesion: all of them" + (", a diffuse one only alone" if c.diffuse_lesions else "")
        logger.info(
            "%d lesion masks of the training photographs: lesion loss weight %g, probe weight %g on %s %s, "
            "lesion cells balanced by %s%s",
            len(planes), c.lesion_loss, c.probe_loss, "strides" if len(c.probe_strides) > 1 else "stride",
            " and ".join(map(str, c.probe_strides)), c.probe_balance, risk,
        )  # fmt: skip
        return planes

    def fit_fov_threshold(self) -> TrainConfig:
        """Resolves an automatic FOV threshold from the training photographs and returns the configuration
        with it, which the run, its checkpoints and its card then carry.

        At most :data:`FOV_FIT_PHOTOGRAPHS` photographs, evenly spaced through the split, are decoded.
        """
        paths = self.sources["train"].paths
        sample = evenly_spaced(len(paths), FOV_FIT_PHOTOGRAPHS)
        fit = fit_fov_threshold((read_image(paths[i]) for i in sample), default=Preprocessing().fov_threshold)
        (logger.warning if fit.moved else logger.info)("%s", fit.describe())
        self.config = replace(self.config, fov_threshold=fit.threshold)
        self.card = _training_card(self.config)
        return self.config

    def cache(self, sources: dict[Split, SplitSource]) -> dict[Split, CachedSplit]:
        """Decodes and preprocesses each split into the cache, or reuses the cached arrays."""
        cache_dir = self.config.resolved_cache_dir
        return {
            name: cache_split(source, self.card.preprocessing, cache_dir, progress=self.progress)
            for name, source in sources.items()
        }


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Trains a model as ``config`` says and writes the run folder.

    Args:
        config: The run's configuration. When resuming, only ``config.out`` is used: the run
            continues with the configuration stored in ``last.pt``, since the schedule, the data
            order and the augmentation all depend on it.
        resume: Continue from ``<out>/last.pt``.
        stop_after_epochs: Run at most this many epochs in this session, then return with
            ``finished=False``, leaving ``last.pt`` for a later ``resume`` (time-sliced jobs).
        progress: Progress bars on stderr.

    Raises:
        TrainingError: Unusable configuration, an existing run without ``resume``, no run to resume.
        train.datasets.DataSourceError: Unusable data.
        train.model.PretrainedUnavailableError: ImageNet weights cannot be loaded.
    """
    started = time.perf_counter()
    out = Path(config.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    checkpoint: dict[str, Any] | None = None
    if resume:
        if not last_path.is_file():
            raise TrainingError(f"nothing to resume: {last_path} does not exist")
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{last_path} is not a RetinaGate checkpoint")
        stored = TrainConfig.from_dict(checkpoint["config"])
        config = replace(stored, out=out)
        if checkpoint.get("finished"):
            raise TrainingError(f"the run in {out} has already finished; start a new run with another --out")
    elif last_path.exists():
        raise TrainingError(
            f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, config)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    run = _Run(config, progress=progress)
    device, precision = run.device, run.precision
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    sources = run.sources
    if len(sources["train"]) < config.batch_size:
        raise TrainingError(
            f"the training split has {len(sources['train'])} images, fewer than --batch-size {config.batch_size}"
        )
    if config.fov_threshold is None:
        config = run.fit_fov_threshold()
        _write_config(out, config)
    # The model before the cache: a missing pretrained download fails in seconds, not after decoding.
    # A resumed run takes its weights from last.pt and needs no download.
    fresh = checkpoint is None
    model = create_model(
        run.card,
        pretrained=fresh and config.pretrained and config.weights is None,
        weights=config.weights if fresh else None,
        drop_rate=config.drop_rate,
        drop_path_rate=config.drop_path_rate,
    )
    splits = run.cache(sources)
    train_split, val_split = splits["train"], splits["val"]
    lesions = run.lesions(train_split.source)
    labels_train = train_split.labels
    frozen = freeze_stages(model, config.freeze_stages)
    if fresh:
        _init_classifier_bias(model, labels_train)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    pos_weight = auto_pos_weight(labels_train) if config.pos_weight == "auto" else None
    criterion = build_loss(config.loss, pos_weight).to(device)
    ema = None
    if config.ema:
        from timm.utils.model_ema import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True)
    # After the EMA's copy of the model, which must not carry the probe's hook; its weights are
    # trained with the network's, on the same schedule.
    probes = []
    if lesions is not None and config.probe_loss > 0:
        probes = [LesionProbe(model, len(run.card.labels), reduction=s).to(device) for s in config.probe_strides]
    groups = _param_groups(model, config.weight_decay)
    if probes:
        weights = [p for probe in probes for p in probe.parameters()]
        groups.append({"params": weights, "weight_decay": config.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    steps_per_epoch = len(train_split) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, warmup_steps, config.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    labels = run.card.labels
    step = TrainStep(
        model,
        optimizer,
        criterion,
        Normalizer(run.card.preprocessing).to(device),
        device=device,
        precision=precision,
        scheduler=scheduler,
        scaler=scaler,
        grad_clip=config.grad_clip,
        channels_last=config.channels_last,
        ema=ema,
        peak_weight=config.peak_loss,
        peak_sharpness=config.peak_sharpness,
        equivariance_weight=config.equivariance,
        equivariance_pairs=config.equivariance_pairs,
        lesion_weight=config.lesion_loss if lesions is not None else 0.0,
        lesion_grid=_lesion_grid(run.card, model) if lesions is not None else (0.0, 1.0),
        probes=probes,
        probe_weight=config.probe_loss,
        probe_balance=config.probe_balance,
        risk_column=labels.index(DISEASE_RISK) if config.risk_lesions and DISEASE_RISK in labels else None,
        diffuse_columns=[labels.index(n) for n in DIFFUSE_LABELS if n in labels] if config.diffuse_lesions else (),
    )

    start_epoch, best_metric, bad_epochs, best_epoch = 0, -math.inf, 0, 0
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        # One probe's weights, or None, in runs written before there could be several.
        saved = checkpoint["probes"] if "probes" in checkpoint else [checkpoint["probe"]] if probes else []
        for probe, state in zip(probes, saved, strict=True):
            probe.load_state_dict(state)
        start_epoch = int(checkpoint["epoch"])
        bad_epochs = int(checkpoint["bad_epochs"])
        best_epoch = int(checkpoint["best_epoch"])
        step.steps = int(checkpoint["step"])
        history = list(checkpoint["history"])
        # best.pt's epoch scored again by this version's rule (a run started before POINTING_ENOUGH
        # stored an uncapped score), so the epochs after the resume compete with it on the same terms.
        best_metric = next(
            (_history_score(row) for row in history if row["epoch"] == best_epoch), float(checkpoint["best_metric"])
        )
        _set_rng_state(checkpoint["rng"])
        logger.info("resuming %s after epoch %d", out, start_epoch)

    pointing = _selection_targets(config, run.masks, run.card, model, val_split.source)
    on_device = config.aug_on == "device" or (config.aug_on == "auto" and device.type == "cuda")
    batch_augment = BatchAugmenter(config.aug) if on_device and config.aug != "none" else None
    dataset = AugmentedImages(
        train_split.cache_file, labels_train, None if on_device else Augmenter(config.aug), config.seed, lesions
    )
    workers = config.workers if config.workers >= 0 else auto_workers(device)
    sample_weights = _balanced_weights(labels_train) if config.balanced_sampler else None

    from tqdm import tqdm

    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
            break
        epoch_started = time.perf_counter()
        step.input_size = config.early_size if epoch < config.early_epochs else None
        model.train()
        for module in frozen:
            module.eval()
        loader = epoch_loader(
            dataset,
            epoch,
            seed=config.seed,
            batch_size=config.batch_size,
            workers=workers,
            sample_weights=sample_weights,
            pin_memory=device.type == "cuda",
        )
        loss_sum = torch.zeros((), device=device)
        batches = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False, disable=not progress)
        for images, targets, *placed in bar:
            planes, columns = placed if placed else (None, None)
            if batch_augment is not None:
                seed = sample_seed(config.seed, epoch, -2 - batches)  # negative: never a sample index
                images = images.to(device, non_blocking=True)
                if planes is None:
                    images = batch_augment(images, seed)
                else:
                    images, planes = batch_augment.with_planes(images, planes.to(device, non_blocking=True), seed)
            loss_sum += step(images, targets, planes, columns)
            batches += 1
            if progress and batches % 10 == 0:  # reading the loss waits for the device; not every step
                bar.set_postfix(loss=f"{float(loss_sum) / batches:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        train_loss = float(loss_sum) / max(1, batches)

        eval_model = ema.module if ema is not None else model
        probs, val_loss, peaks = predict(
            eval_model, val_split.images, run.card.preprocessing, device=device, precision=precision,
            batch_size=max(config.batch_size, 32), labels=val_split.labels, criterion=criterion,
            progress=progress, desc="validate", peaks=pointing is not None,
        )  # fmt: skip
        metrics = compute_metrics(val_split.labels, probs, run.card.labels, loss=val_loss)
        game = pointing.score(peaks) if pointing is not None and peaks is not None else None
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_macro_auroc": metrics.macro_auroc,
            "val_map": metrics.map,
            "val_disease_risk_auroc": metrics.disease_risk_auroc,
            "val_riadd_score": metrics.riadd_score,
            "val_pointing": game.rate if game is not None else None,
            "input_size": step.input_size or config.img_size,
            "seconds": round(time.perf_counter() - epoch_started, 3),
            **{f"auroc_{n}": a for n, a in zip(metrics.labels, metrics.auroc, strict=True)},
        }
        history.append(row)
        monitor = _history_score(row)
        improved = monitor > best_metric + 1e-6
        if improved:
            best_metric, best_epoch, bad_epochs = monitor, epoch + 1, 0
            _save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": eval_model.state_dict(),
                    "card": run.card.to_json(),
                    "config": config.to_dict(),
                    "epoch": epoch + 1,
                    "metrics": {"validation": metrics.summary()},
                },
                best_path,
            )
        else:
            bad_epochs += 1
        stopped_early = config.patience > 0 and bad_epochs >= config.patience
        finished = stopped_early or epoch + 1 == config.epochs
        _save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "card": run.card.to_json(),
                "config": config.to_dict(),
                "epoch": epoch + 1,
                "step": step.steps,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "probes": [probe.state_dict() for probe in probes],
                "rng": _rng_state(device),
                "best_metric": best_metric,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "history": history,
                "finished": False,
            },
            last_path,
        )
        _write_metrics_csv(out / "metrics.csv", history, run.card.labels)
        logger.info(
            "epoch %d/%d%s: train loss %.4f, val loss %.4f, val macro AUROC %s, RIADD %s%s (%.1f s)%s",
            epoch + 1, config.epochs, f" at {step.input_size} px" if step.input_size else "", row["train_loss"],
            val_loss or float("nan"),
            _fmt(metrics.macro_auroc), _fmt(metrics.riadd_score),
            f", pointing {game.rate:.3f}" if game is not None else "", row["seconds"], " *" if improved else "",
        )  # fmt: skip
        if finished:
            break

    epochs_run = len(history)
    finished = stopped_early or epochs_run >= config.epochs
    if not finished:
        return RunResult(out, False, epochs_run, best_epoch, False, None, None, None,
                         time.perf_counter() - started, history)  # fmt: skip

    card, val_metrics, test_metrics = _finish(run, splits, criterion, history, best_epoch, stopped_early, pointing)
    state = torch.load(last_path, map_location="cpu", weights_only=True)
    state["finished"] = True
    _save(state, last_path)
    return RunResult(out, True, epochs_run, best_epoch, stopped_early, card, val_metrics, test_metrics,
                     time.perf_counter() - started, history)  # fmt: skip


def selection_score(macro_auroc: float | None, pointing: float | None, val_loss: float | None) -> float:
    """The validation score that picks ``best.pt`` and drives early stopping (higher is better).

    The mean of macro AUROC and the pointing game, the game counted up to :data:`POINTING_ENOUGH`;
    AUROC alone without a game (``select_by`` ``auroc``, or no masks); minus the loss without AUROC
    (a split with no positives).
    """
    if macro_auroc is None:
        return -(val_loss or 0.0)
    if pointing is None:
        return macro_auroc
    return (macro_auroc + min(pointing, POINTING_ENOUGH)) / 2


def _history_score(row: dict[str, Any]) -> float:
    """:func:`selection_score` of one epoch's row of the history (``metrics.csv``)."""
    return selection_score(row["val_macro_auroc"], row["val_pointing"], row["val_loss"])


def _lesion_grid(card: ModelCard, model: nn.Module) -> tuple[float, float]:
    """``(origin, step)`` of the one-view cell centres the lesion loss aims at: where the card reads them."""
    grid = card.cam_grid(two_views=False) or CamGrid.covering(card.input_size, cam_cells(model, card.input_size)[1])
    return grid.origin, grid.step


def _data_folder(data: Path | None, labels_csv: Path | None) -> Path | None:
    """The folder whose mask folders are read by default: the RFMiD folder, or the generic CSV's own."""
    return data if data is not None else (Path(labels_csv).parent if labels_csv is not None else None)


def _selection_targets(
    config: TrainConfig, masks: MaskIndex | None, card: ModelCard, model: nn.Module, source: SplitSource
) -> PointingTargets | None:
    """The validation pointing game that picks the best epoch, or ``None`` when AUROC alone does."""
    if config.select_by != "auroc+pointing" or masks is None:
        return None
    # The loop validates one view (the raw model), whatever the card serves.
    targets = pointing_targets(card, source, masks, cam_cells(model, card.input_size), two_views=False)
    if not len(targets):
        return None
    logger.info("best epoch by validation macro AUROC and the pointing game (%d lesions)", len(targets))
    return targets


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _finish(
    run: _Run,
    splits: dict[Split, CachedSplit],
    criterion: nn.Module,
    history: list[dict[str, Any]],
    best_epoch: int,
    stopped_early: bool,
    val_targets: PointingTargets | None = None,
) -> tuple[ModelCard, Metrics, Metrics | None]:
    """Calibrates thresholds on validation, evaluates, writes the card, best.pt and the plots.

    ``val_targets`` are the validation pointing-game targets the loop chose epochs with, if it did.
    """
    from train.plots import plot_auroc_bars, plot_history, plot_roc_curves

    config, out = run.config, run.out
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    pos_weight = getattr(criterion, "pos_weight", None)
    if pos_weight is not None:
        # A positive weight w makes BCE's best logit the log-odds plus log(w): the scores a reader sees
        # would overstate every finding. Taking log(w) off the classifier's bias gives back the
        # log-odds; ranks (AUROC) and the CAM (which leaves the bias out) do not change.
        bias = best["model"]["classifier.bias"]
        best["model"]["classifier.bias"] = bias - torch.log(pos_weight.detach().cpu()).to(bias.dtype)
    model = create_model(run.card, drop_rate=0.0, drop_path_rate=0.0)
    model.load_state_dict(best["model"])
    model = served_model(model, run.card)
    model.to(run.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = criterion.to(run.device)

    # Where the maps point, on photographs the model did not train on: the report names it beside
    # AUROC, since a reader sees the heatmap as much as the score. The strongest cells come from the
    # same pass as the scores, scored as the loop scored them.
    masks = run.masks
    pointing = masks is not None
    cells = cam_cells(model, run.card.input_size)

    def evaluate(
        split: CachedSplit, name: str, targets: PointingTargets | None = None
    ) -> tuple[Metrics, NDArray[np.float32], dict[str, Any]]:
        probs, loss, peaks = predict(
            model, split.images, run.card.preprocessing, device=run.device, precision=run.precision,
            batch_size=max(config.batch_size, 32), labels=split.labels, criterion=criterion,
            progress=run.progress, desc=name, peaks=pointing,
        )  # fmt: skip
        game: dict[str, Any] = {}
        if peaks is not None and masks is not None:
            if targets is None or targets.cells != cells:  # the loop's one-view targets, if they fit
                targets = pointing_targets(
                    run.card, split.source, masks, cells, two_views=isinstance(model, TurnAveraged)
                )
            game = {"pointing_game": targets.score(peaks).to_dict()}
        return compute_metrics(split.labels, probs, run.card.labels, loss=loss), probs, game

    val_metrics, val_probs, val_game = evaluate(splits["val"], "validate", val_targets)
    thresholds = calibrate_thresholds(splits["val"].labels, val_probs, run.card.labels)
    val_metrics = _with_f1(val_metrics, splits["val"].labels, val_probs, [t.threshold for t in thresholds])
    val_metrics = replace(val_metrics, extra={**val_metrics.extra, **val_game})
    test_metrics = None
    if "test" in splits:
        test_metrics, test_probs, test_game = evaluate(splits["test"], "test")
        test_metrics = _with_f1(test_metrics, splits["test"].labels, test_probs, [t.threshold for t in thresholds])
        test_metrics = replace(test_metrics, extra={**test_metrics.extra, **test_game})

    counts = {name: len(split) for name, split in splits.items()}
    positives = splits["train"].labels.sum(axis=0)
    card = run.card.with_updates(
        thresholds=[t.threshold for t in thresholds],
        metrics={
            "validation": val_metrics.to_dict(),
            **({"test": test_metrics.to_dict()} if test_metrics is not None else {}),
            "thresholds": {t.label: _threshold_dict(t) for t in thresholds},
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "stopped_early": stopped_early,
        },
        training_data={
            "source": "rfmid" if config.data is not None else "csv",
            "location": str(config.data or config.labels_csv),
            "label_files": {name: split.source.origin for name, split in splits.items()},
            "images": counts,
            "train_positives": {n: int(p) for n, p in zip(run.card.labels, positives, strict=True)},
            "config": config.to_dict(),
        },
        weights_sha256=state_dict_sha256(best["model"]),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        software=_software(),
    )
    best["card"] = card.to_json()
    best["metrics"] = card.metrics
    _save(best, out / "best.pt")
    card.save(out / "model_card.json")

    plot_history(history, out / "curves.png")
    plot_roc_curves(splits["val"].labels, val_probs, run.card.labels, out / "roc_curves.png")
    plot_auroc_bars(val_metrics, out / "auroc_bars.png", test=test_metrics)
    logger.info(
        "best epoch %d: validation macro AUROC %s, RIADD %s; test macro AUROC %s",
        best_epoch, _fmt(val_metrics.macro_auroc), _fmt(val_metrics.riadd_score),
        _fmt(test_metrics.macro_auroc if test_metrics else None),
    )  # fmt: skip
    return card, val_metrics, test_metrics


def _threshold_dict(t: LabelThreshold) -> dict[str, Any]:
    return {"threshold": t.threshold, "method": t.method, "positives": t.positives, "f1": t.f1,
            "precision": t.precision, "recall": t.recall}  # fmt: skip


def _with_f1(
    metrics: Metrics, truth: NDArray[np.uint8], probs: NDArray[np.float32], thresholds: Sequence[float]
) -> Metrics:
    """Adds F1 at the given thresholds (per label and macro over labels with positives)."""
    predicted = probs >= np.asarray(thresholds, dtype=np.float32)
    actual = truth.astype(bool)
    per_label: dict[str, float | None] = {}
    for c, name in enumerate(metrics.labels):
        positives = int(actual[:, c].sum())
        if positives == 0:
            per_label[name] = None
            continue
        tp = int((predicted[:, c] & actual[:, c]).sum())
        fp = int((predicted[:, c] & ~actual[:, c]).sum())
        per_label[name] = 2 * tp / (2 * tp + fp + (positives - tp))
    present = [v for v in per_label.values() if v is not None]
    extra = {**metrics.extra, "macro_f1": float(np.mean(present)) if present else None, "f1": per_label}
    return replace(metrics, extra=extra)


def evaluate_checkpoint(
    checkpoint: Path,
    split: str = "test",
    *,
    data: Path | None = None,
    labels_csv: Path | None = None,
    images: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    pointing_game: bool | None = None,
    masks: Path | None = None,
    tolerance: float | None = None,
    pointing_labels: Sequence[str] = DISEASE_LABELS,
    progress: bool = True,
) -> tuple[Metrics, ModelCard]:
    """Evaluates a checkpoint on one split, with F1 at the card's thresholds.

    The data location defaults to the one recorded in the checkpoint's training config. The pointing
    game of the model's CAMs against lesion masks (``<masks>/<image folder>/<ID>_<COLUMN>.png`` or
    another layout of :mod:`train.masks`; ``masks`` defaults to the training run's, or the data folder's
    folders that say ``mask``, such as ``masks`` where ``retinagate synth`` writes them) is added under
    ``metrics.extra["pointing_game"]`` whenever the masks exist (``pointing_game=None``), always
    (``True``: missing masks, or none a positive finding of the split can be scored on, are an error)
    or never (``False``); ``tolerance`` is the hit distance in model-input pixels, half a CAM cell by
    default (see :func:`train.cam.pointing_game`); ``pointing_labels`` are the labels it scores
    (``Disease_Risk`` against every lesion of a photograph, :meth:`train.masks.MaskIndex.lookup`).

    Raises:
        TrainingError: Unknown split, split missing from the data, unusable checkpoint.
        train.datasets.DataSourceError: Unusable data.
        FileNotFoundError: No such checkpoint.
    """
    if split not in ("train", "val", "test"):
        raise TrainingError(f"split is {split!r}; expected train, val or test")
    try:
        model, card, raw = load_checkpoint(checkpoint)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    stored = TrainConfig.from_dict(raw.get("config") or {"out": str(Path(checkpoint).parent)})
    if data is None and labels_csv is None:
        data, labels_csv, images = stored.data, stored.labels_csv, stored.images
        masks = masks if masks is not None else stored.masks
    if cache_dir is None:
        cache_dir = stored.resolved_cache_dir
    sources = load_splits(
        data=data, labels_csv=labels_csv, images=images, seed=stored.seed,
        val_fraction=stored.val_fraction, test_fraction=stored.test_fraction, skip=[cache_dir],
    )  # fmt: skip
    if split not in sources:
        raise TrainingError(f"the data has no {split} split (found: {', '.join(sources)})")
    cached = cache_split(sources[split], card.preprocessing, cache_dir, progress=progress)
    target = resolve_device(device)
    model.to(target)
    if stored.channels_last:  # as training evaluated it, so the card's metrics are reproduced exactly
        model.to(memory_format=torch.channels_last)
    probs, _, _ = predict(
        model, cached.images, card.preprocessing, device=target,
        precision="fp16" if target.type == "cuda" else "fp32", batch_size=batch_size,
        progress=progress, desc=f"evaluate {split}",
    )  # fmt: skip
    metrics = _with_f1(compute_metrics(cached.labels, probs, card.labels), cached.labels, probs, card.thresholds)
    folder = _data_folder(data, labels_csv)
    index = None
    if pointing_game is not False:
        index = find_masks(masks, folder, photographs(sources.values()), positive_labels(sources.values()))
    if index is None or not index.files:
        if pointing_game:
            found = index.describe() if index is not None else f"no folder that says {MASK_FOLDER_WORDS} under {folder}"
            raise TrainingError(f"pointing game: {found}; give --masks DIR")
    else:
        from train.cam import pointing_game as play  # the argument of the same name hides the function

        game = play(model, card, cached.source, index, device=target, labels=pointing_labels, batch_size=batch_size,
                    tolerance=tolerance)  # fmt: skip
        if pointing_game and not game.total:  # asked for, and nothing to score: say so, not "n/a"
            raise TrainingError(
                f"pointing game: no positive finding of the {split} split has a readable lesion mask among "
                f"{index.describe()} (unreadable files are named in the warnings above); give --masks DIR"
            )
        metrics = replace(metrics, extra={**metrics.extra, "pointing_game": game.to_dict()})
    return metrics, card
