"""Training-time augmentation on cached uint8 images, and input normalisation.

Augmentation runs after the preprocessing cache, on ``uint8`` ``(3, S, S)`` tensors
(torchvision ``transforms.v2``), so it never pays for PNG decoding. Each sample is augmented under its
own seed, derived from the run seed, the epoch and the sample index: the same run gives the same pixels
whatever the number of loader workers, and a resumed run sees exactly the images an uninterrupted run
would have seen.

Levels (``--aug``):

* ``none``: the cached pixels as they are.
* ``flip``: horizontal and vertical flips only (the plain baseline every recipe is compared with).
* ``light``: flips, small rotation and scale, mild brightness/contrast/saturation jitter.
* ``strong``: flips, any rotation (a fundus photograph has no preferred orientation within its
  circular field of view; rotations move each lesion around the image, which on the easy synthetic
  data made the CAMs point at lesions), scale and shift, stronger brightness/contrast/saturation
  jitter, occasional Gaussian blur (defocus) and sharpness change (camera differences). No hue shift: fundus
  colour varies with exposure and pigmentation, not hue, and torchvision's hue jitter alone costs
  more than the rest of the recipe (about 4 ms per 224 px image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

if TYPE_CHECKING:
    from retinagate.card import Preprocessing

__all__ = ["AUG_LEVELS", "Augmenter", "BatchAugmenter", "Normalizer", "sample_seed"]

AugLevel = Literal["none", "flip", "light", "strong"]
AUG_LEVELS: tuple[AugLevel, ...] = ("none", "flip", "light", "strong")

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample in one epoch, spread over 63 bits (splitmix64 finaliser)."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & ((1 << 64) - 1)
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & ((1 << 64) - 1)
    value ^= value >> 31
    return value & _MASK63


@dataclass(frozen=True)
class _Recipe:
    """Ranges of one augmentation level, shared by the per-sample and the batched augmenter."""

    degrees: float
    scale: tuple[float, float]
    translate: float
    brightness: float
    contrast: float
    saturation: float
    blur_p: float
    blur_sigma: tuple[float, float]
    sharpen_p: float
    sharpness: float


_RECIPES: dict[str, _Recipe] = {
    "flip": _Recipe(0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, 0.0, (0.1, 1.5), 0.0, 1.5),
    "light": _Recipe(15.0, (0.95, 1.05), 0.0, 0.1, 0.1, 0.05, 0.0, (0.1, 1.5), 0.0, 1.5),
    "strong": _Recipe(180.0, (0.9, 1.1), 0.04, 0.25, 0.25, 0.15, 0.25, (0.1, 1.5), 0.25, 1.5),
}


def _transform(level: str) -> nn.Module | None:
    recipe = _RECIPES.get(level)
    if recipe is None:
        return None
    steps: list[nn.Module] = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if recipe.degrees or recipe.translate or recipe.scale != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=recipe.degrees,
                translate=(recipe.translate, recipe.translate) if recipe.translate else None,
                scale=recipe.scale,
            )
        )
    if recipe.brightness or recipe.contrast or recipe.saturation:
        steps.append(
            v2.ColorJitter(brightness=recipe.brightness, contrast=recipe.contrast, saturation=recipe.saturation)
        )
    if recipe.blur_p:
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=recipe.blur_sigma)], p=recipe.blur_p))
    if recipe.sharpen_p:
        steps.append(v2.RandomAdjustSharpness(sharpness_factor=recipe.sharpness, p=recipe.sharpen_p))
    composed: nn.Module = v2.Compose(steps)
    return composed


class Augmenter:
    """Applies one augmentation level to single uint8 ``(3, S, S)`` images, reproducibly.

    Args:
        level: ``none``, ``light`` or ``strong``.

    Raises:
        ValueError: For an unknown level.
    """

    def __init__(self, level: str) -> None:
        if level not in AUG_LEVELS:
            raise ValueError(f"aug is {level!r}; expected one of {', '.join(AUG_LEVELS)}")
        self.level = level
        self._transform = _transform(level)

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """Augments ``image`` with randomness drawn from ``seed`` only (global RNG untouched)."""
        if self._transform is None:
            return image
        # transforms.v2 draws from the global generator; fork it so the sample's seed alone decides.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out: torch.Tensor = self._transform(image)
        return out

    def with_planes(self, image: torch.Tensor, planes: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments ``image`` as :meth:`__call__` does (the same pixels for the same seed), and moves
        ``planes`` (``(K, S, S)`` uint8 lesion masks on the input) as the image moved.

        The planes go through ``transforms.v2`` as a ``Mask``: the geometric steps move them with the
        image (nearest neighbour), the photometric steps leave them alone.
        """
        if self._transform is None:
            return image, planes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out, moved = self._transform(image, tv_tensors.Mask(planes))
        return out, moved.as_subclass(torch.Tensor)


class BatchAugmenter(nn.Module):
    """The same augmentation recipe applied to a whole batch on its device, per-sample parameters.

    For GPU training: per-sample ``transforms.v2`` in loader workers costs about 3 ms of CPU per
    224 px image (strong), more than 16 cores supply at the 4,500 img/s an H100 trains at. Here the
    loader only copies cached bytes; flips, rotation, scale and shift become one ``grid_sample``, the
    colour jitter a few broadcast operations, blur and sharpening grouped convolutions, all on the
    GPU. Parameters come from a generator seeded per batch, so results are reproducible for a seed.

    Input: uint8 or float ``(N, 3, S, S)`` in [0, 255]. Output: float32 in [0, 255] (feed it to
    :class:`Normalizer`).

    Raises:
        ValueError: For an unknown level.
    """

    def __init__(self, level: str) -> None:
        super().__init__()
        if level not in AUG_LEVELS:
            raise ValueError(f"aug is {level!r}; expected one of {', '.join(AUG_LEVELS)}")
        self.level = level
        self.recipe = _RECIPES.get(level)

    def forward(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        return self._augment(images, None, seed)[0]

    def with_planes(self, images: torch.Tensor, planes: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments ``images`` as :meth:`forward` does, and moves ``(N, K, S, S)`` lesion planes with
        them (the same warp, bilinear; colour, blur and sharpening leave them alone). Planes come
        back as float in [0, 255]."""
        x, moved = self._augment(images, planes, seed)
        assert moved is not None
        return x, moved

    def _augment(
        self, images: torch.Tensor, planes: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images.float()
        recipe = self.recipe
        if recipe is None:
            return x, None if planes is None else planes.float()
        n, device = x.shape[0], x.device
        gen = torch.Generator().manual_seed(seed)

        def uniform(low: float, high: float, size: int = n) -> torch.Tensor:
            return (torch.rand(size, generator=gen) * (high - low) + low).to(device)

        def chance(p: float) -> torch.Tensor:
            return (torch.rand(n, generator=gen) < p).to(device)

        # Geometry: output pixel -> input pixel, in normalised coordinates (what affine_grid wants).
        angle = uniform(-recipe.degrees, recipe.degrees) * (math.pi / 180.0)
        scale = uniform(*recipe.scale)
        flip_x = torch.where(chance(0.5), -1.0, 1.0)
        flip_y = torch.where(chance(0.5), -1.0, 1.0)
        shift = uniform(-recipe.translate, recipe.translate, 2 * n).view(n, 2) * 2.0
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos * flip_x, sin * flip_x, -shift[:, 0]], dim=1),
                torch.stack([-sin * flip_y, cos * flip_y, -shift[:, 1]], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if planes is not None:  # one warp for both: the planes ride along as extra channels
            x = torch.cat([x, planes.to(x.device, x.dtype)], dim=1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved = None if planes is None else x[:, 3:]
        x = x[:, :3]

        # Colour, as torchvision's ColorJitter defines each factor (in a fixed order).
        view = (n, 1, 1, 1)
        x = x * uniform(1 - recipe.brightness, 1 + recipe.brightness).view(view)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        contrast = uniform(1 - recipe.contrast, 1 + recipe.contrast).view(view)
        x = contrast * x + (1 - contrast) * gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        saturation = uniform(1 - recipe.saturation, 1 + recipe.saturation).view(view)
        x = (saturation * x + (1 - saturation) * gray).clamp(0, 255)

        if recipe.blur_p > 0:
            sigma = uniform(*recipe.blur_sigma)
            taps = torch.arange(-2, 3, device=device, dtype=x.dtype)
            kernel_1d = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
            kernel_1d = kernel_1d / kernel_1d.sum(dim=1, keepdim=True)
            kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :]).repeat_interleave(3, dim=0)[:, None]
            padded = F.pad(x, (2, 2, 2, 2), mode="reflect").reshape(1, 3 * n, x.shape[2] + 4, x.shape[3] + 4)
            blurred = F.conv2d(padded, kernel, groups=3 * n).view_as(x)
            x = torch.where(chance(recipe.blur_p).view(view), blurred, x)
        if recipe.sharpen_p > 0:
            a, b = 1.0 / 13.0, 5.0 / 13.0
            smooth = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=device, dtype=x.dtype).expand(3, 1, 3, 3)
            soft = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), smooth, groups=3)
            sharp = (soft + recipe.sharpness * (x - soft)).clamp(0, 255)
            x = torch.where(chance(recipe.sharpen_p).view(view), sharp, x)
        return x, moved


class Normalizer(nn.Module):
    """uint8 NCHW batch to float, optionally contrast-normalised, then normalised with the card's mean and std.

    Runs on the training device, after the uint8 batch crossed to it (a quarter of the bytes of
    float32), and inside the exported graph (:class:`export.graph.CamModel`): one formula for both.
    The constants come from the model card only.

    With ``contrast_sigma > 0`` the photograph is first contrast-normalised, as the winning entries
    of Kaggle's diabetic retinopathy challenge did (B. Graham, 2015): the local mean, a Gaussian of
    sigma ``contrast_sigma * input_size``, is subtracted and the difference multiplied by
    ``contrast_gain`` around mid-grey. Illumination, exposure and pigment, which vary between
    cameras and eyes, are removed; lesions, which differ from their neighbourhood, stand out. The
    local mean is taken over the field of view only (a normalised convolution: the blur of the masked
    image divided by the blur of the mask, the mask being pixels brighter than ``fov_threshold`` in
    their brightest channel, as :func:`retinagate.preprocess.find_fov` decides), so the black border
    leaves no bright ring at the edge of the retina, and outside the field of view stays mid-grey.
    """

    mean: torch.Tensor
    std: torch.Tensor
    row: torch.Tensor
    column: torch.Tensor

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        share = float(getattr(preprocessing, "contrast_sigma", 0.0))
        sigma = share * preprocessing.input_size if share > 0 else 0.0
        self.contrast = sigma > 0
        self.gain = float(getattr(preprocessing, "contrast_gain", 4.0))
        self.threshold = float(getattr(preprocessing, "fov_threshold", 20))
        # The local mean is smooth: it is computed on a grid `factor` times coarser (block means), with
        # the Gaussian scaled to match, and interpolated back. A 71-tap blur at 288 px made the whole
        # graph 2.3x slower on ONNX Runtime's CPU depthwise convolution; at a quarter it costs little.
        self.factor = max(1, int(sigma // 3.0))
        coarse = sigma / self.factor
        self.radius = max(1, math.ceil(3.0 * coarse))
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        taps = torch.exp(-(offsets**2) / (2.0 * max(coarse, 1e-6) ** 2))
        taps = (taps / taps.sum()).to(torch.float32)
        # Fixed-shape kernels for the four channels blurred together (RGB times the mask, and the mask):
        # the ONNX exporter needs a convolution's weight shape to be known.
        self.register_buffer("row", taps.view(1, 1, 1, -1).repeat(4, 1, 1, 1))
        self.register_buffer("column", taps.view(1, 1, -1, 1).repeat(4, 1, 1, 1))

    def _local_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The Gaussian-weighted mean of ``x`` over the field of view around every pixel."""
        stacked = torch.cat([x * mask, mask], dim=1)
        if self.factor > 1:
            stacked = F.avg_pool2d(stacked, self.factor)
        stacked = F.conv2d(stacked, self.row, padding=(0, self.radius), groups=4)
        stacked = F.conv2d(stacked, self.column, padding=(self.radius, 0), groups=4)
        local = stacked[:, :3] / stacked[:, 3:].clamp_min(1e-3)
        if self.factor > 1:
            local = F.interpolate(local, size=(x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
        return local

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.dtype)  # float32; float64 when export checks the graph against PyTorch in float64
        if self.contrast:
            mask = (x.amax(dim=1, keepdim=True) > self.threshold).to(x.dtype)
            x = (x - self._local_mean(x, mask)) * (mask * self.gain) + 127.5
        return (x - self.mean) / self.std
