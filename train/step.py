"""One optimisation step: uint8 batch in, updated weights out.

The uint8 batch crosses to the device as is (a quarter of the bytes of float32) and is normalised
there; the forward pass runs under autocast (fp16 with a gradient scaler, or bf16); gradients are
unscaled before clipping; the learning-rate schedule and the weight EMA advance once per step. The
loss stays on the device, so the host never waits for the GPU between steps; callers read it when
they need a number.

Like :mod:`train.loader`, this module needs only PyTorch, so the GPU benchmark times this exact step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from torch import nn

from train.losses import cell_weights, equivariance_loss, lesion_cover_loss, lesion_loss, peak_logits
from train.model import LesionProbe, class_maps

__all__ = ["AUTOCAST_DTYPES", "TrainStep"]

AUTOCAST_DTYPES: Final = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TrainStep:
    """Callable that runs one training step and returns the (detached, on-device) loss.

    Args:
        model: The network, in train mode.
        optimizer: Its optimizer.
        criterion: Loss on ``(logits, float targets)``.
        normalizer: uint8 batch to normalised float (:class:`train.augment.Normalizer`).
        device: Where the model lives.
        precision: ``fp32``, ``fp16`` (needs a scaler to be useful) or ``bf16``.
        scheduler: Stepped after every optimizer step, if given.
        scaler: Gradient scaler for fp16; a disabled scaler (or none) for other precisions.
        grad_clip: Clip the gradient norm to this; 0 turns clipping off.
        channels_last: Convert the batch to NHWC memory format (match a channels_last model).
        ema: Weight EMA with ``update(model, step=...)`` (timm's ``ModelEmaV3``), if any.
        peak_weight: Weight of the auxiliary loss on log-sum-exp pooled class maps
            (:func:`train.losses.peak_logits`); 0 turns it off. Needs a timm classifier
            (``forward_features``, ``forward_head``, ``get_classifier``).
        peak_sharpness: The log-sum-exp sharpness ``r`` of that pooling.
        equivariance_weight: Weight of :func:`train.losses.equivariance_loss`; 0 turns it off.
        equivariance_pairs: With it on, the last this many images of each batch are replaced by the
            first ones turned 180 degrees (the batch keeps its size and cost), and the class maps of
            each pair are asked to turn with the photograph.
        lesion_weight: Weight of :func:`train.losses.lesion_loss` on batches that bring lesion
            planes; 0 turns it off.
        lesion_grid: ``(origin, step)`` in input pixels of the cell centres the lesion loss aims at
            (:class:`retinagate.card.CamGrid`: what the card says a one-view map's cells are).
        probes: Lesion probes (:class:`train.model.LesionProbe`) on the model's stages, each trained with
            :func:`train.losses.lesion_cover_loss` on batches that bring lesion planes (their weights
            must be in the optimizer); a probe's cells are centred on the same grid at its own stride.
        probe_weight: Weight of each probe's loss; 0 turns them off.
        probe_balance: What weighs the same among a probe's lesion cells (``balance`` of
            :func:`train.losses.lesion_cover_loss`): ``cells`` or ``pairs``.
        input_size: Side the network sees, when smaller than the batch's: the normalised photographs
            and their lesion planes are scaled down to it together (area interpolation, so a lesion
            keeps its share of each cell), for the early epochs of progressive resizing; ``None``
            trains at the batch's own size. An attribute, which the loop sets each epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        normalizer: nn.Module,
        *,
        device: torch.device,
        precision: str = "fp32",
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        scaler: torch.amp.GradScaler | None = None,
        grad_clip: float = 0.0,
        channels_last: bool = True,
        ema: Any = None,
        peak_weight: float = 0.0,
        peak_sharpness: float = 5.0,
        equivariance_weight: float = 0.0,
        equivariance_pairs: int = 4,
        lesion_weight: float = 0.0,
        lesion_grid: tuple[float, float] = (16.0, 32.0),
        probes: Sequence[LesionProbe] = (),
        probe_weight: float = 0.0,
        probe_balance: str = "cells",
        risk_column: int | None = None,
        diffuse_columns: Sequence[int] = (),
        input_size: int | None = None,
    ) -> None:
        if precision not in ("fp32", *AUTOCAST_DTYPES):
            raise ValueError(f"precision is {precision!r}; expected fp32, fp16 or bf16")
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.normalizer = normalizer
        self.device = device
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.scheduler = scheduler
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        self.ema = ema
        self.peak_weight = peak_weight
        self.peak_sharpness = peak_sharpness
        self.equivariance_weight = equivariance_weight
        self.equivariance_pairs = equivariance_pairs
        self.lesion_weight = lesion_weight
        self.lesion_grid = lesion_grid
        self.probes = tuple(probes) if probe_weight > 0 else ()
        self.probe_weight = probe_weight
        self.probe_balance = probe_balance
        self.risk_column = risk_column
        self.diffuse_columns = tuple(diffuse_columns)
        self.input_size = input_size
        self._cell_weights: dict[tuple[int, int, float, float], torch.Tensor] = {}
        self.steps = 0
        self._params = [p for p in model.parameters() if p.requires_grad]

    def _weights(self, size: int, cells: int, stride: float | None = None) -> torch.Tensor:
        """Cell weights of the CAM's map, or of a map at ``stride`` on the same grid scaled to it."""
        scale = 1.0 if stride is None else stride / self.lesion_grid[1]
        key = (size, cells, self.lesion_grid[0] * scale, self.lesion_grid[1] * scale)
        if key not in self._cell_weights:
            self._cell_weights[key] = cell_weights(size, cells, key[2], key[3]).to(self.device)
        return self._cell_weights[key]

    def __call__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        planes: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Trains on one batch: uint8 ``(N, 3, S, S)`` images and 0/1 ``(N, C)`` targets, with
        ``(N, K, S, S)`` lesion planes and their ``(N, K)`` label columns when the data has masks."""
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = targets.to(self.device, non_blocking=True).float()
        pairs = min(self.equivariance_pairs, x.shape[0] // 2) if self.equivariance_weight > 0 else 0
        if pairs:
            x = torch.cat([x[:-pairs], torch.flip(x[:pairs], dims=(2, 3))])
            y = torch.cat([y[:-pairs], y[:pairs]])
            if planes is not None and columns is not None:
                planes = torch.cat([planes[:-pairs], torch.flip(planes[:pairs], dims=(2, 3))])
                columns = torch.cat([columns[:-pairs], columns[:pairs]])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        if planes is not None and columns is not None and (self.lesion_weight > 0 or self.probes):
            # Once a step, for the lesion loss and every probe alike.
            planes = planes.to(self.device, non_blocking=True)
            columns = columns.to(self.device, non_blocking=True)
            if self.risk_column is not None:
                planes, columns = with_risk_plane(planes, columns, y, self.risk_column, self.diffuse_columns)
        lesions = self.lesion_weight > 0 and planes is not None and columns is not None
        inputs = self.normalizer(x)
        if self.input_size is not None and self.input_size != inputs.shape[-1]:
            inputs = _scaled(inputs, self.input_size, self.channels_last)
            if planes is not None:
                planes = _scaled(planes.float(), self.input_size, False)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            if self.peak_weight > 0 or pairs or lesions:
                features = self.model.forward_features(inputs)  # type: ignore[operator]
                logits = self.model.forward_head(features)  # type: ignore[operator]
            else:
                logits = self.model(inputs)
        loss: torch.Tensor = self.criterion(logits.float(), y)
        if self.peak_weight > 0:
            peaks = peak_logits(features, self.model.get_classifier(), self.peak_sharpness)  # type: ignore[operator]
            loss = loss + self.peak_weight * self.criterion(peaks, y)
        if pairs:
            maps = class_maps(features.float(), self.model.get_classifier())  # type: ignore[operator]
            loss = loss + self.equivariance_weight * equivariance_loss(maps[:pairs], maps[-pairs:])
        if lesions:
            assert planes is not None and columns is not None
            maps = class_maps(features.float(), self.model.get_classifier())  # type: ignore[operator]
            rows = self._weights(inputs.shape[2], maps.shape[2])
            cols = self._weights(inputs.shape[3], maps.shape[3])
            loss = loss + self.lesion_weight * lesion_loss(maps, planes, columns, rows, cols)
        for probe in self.probes:
            probed = probe()  # read on every step, so that no batch's reading is left for the next
            if planes is not None and columns is not None:
                rows = self._weights(inputs.shape[2], probed.shape[2], probe.reduction)
                cols = self._weights(inputs.shape[3], probed.shape[3], probe.reduction)
                cover = lesion_cover_loss(probed, planes, columns, y, rows, cols, balance=self.probe_balance)
                loss = loss + self.probe_weight * cover
        self.optimizer.zero_grad(set_to_none=True)
        scaled: torch.Tensor = self.scaler.scale(loss)
        torch.autograd.backward(scaled)
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.steps)
        return loss.detach()


def _scaled(batch: torch.Tensor, size: int, channels_last: bool) -> torch.Tensor:
    """An ``(N, C, S, S)`` float batch scaled to ``size x size`` by area interpolation (each output
    pixel the mean of the input it covers; the photograph and its lesion planes alike)."""
    scaled = F.interpolate(batch, size=(size, size), mode="area")
    return scaled.contiguous(memory_format=torch.channels_last) if channels_last else scaled


def with_risk_plane(
    planes: torch.Tensor, columns: torch.Tensor, targets: torch.Tensor, risk: int, diffuse: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds to each photograph a plane of all its lesions, labelled ``risk`` (Disease_Risk's column),
    where the photograph is positive for it and has a lesion plane; ``-1`` (no plane) elsewhere.

    The planes of ``diffuse`` columns (findings over the retina as a whole) join the union only on a
    photograph without any other lesion: beside a focal lesion they would spread its target over the
    retina."""
    placed = columns >= 0
    if diffuse:
        focal = placed & ~torch.isin(columns, torch.as_tensor(diffuse, device=columns.device))
        placed = torch.where(focal.any(dim=1, keepdim=True), focal, placed)
    union = (planes * placed[:, :, None, None].to(planes.dtype)).amax(dim=1, keepdim=True)
    column = torch.where(placed.any(dim=1) & (targets[:, risk] > 0.5), risk, -1).to(columns.dtype)
    return torch.cat([planes, union], dim=1), torch.cat([columns, column[:, None]], dim=1)
