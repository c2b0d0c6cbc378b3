"""Training-time augmentation on cached uint8 images, and input normalisation.

Augmentation runs after the preprocessing cache, on ``uint8`` ``(3, S, S)`` tensors
(torchvision ``transforms.v2``), so it never pays for PNG decoding. Each sample is augmented under its
own seed, derived from the run seed, the epoch and the sample index: the same run gives the same pixels
whatever the number of loader workers, and a resumed run sees exactly the images an uninterrupted run
would have seen.

Levels (``--aug``):

* ``none``: the cached pixels as they are.
* ``light``: flips, small rotation and scale, mild brightness/contrast/saturation jitter.
* ``strong``: flips, any rotation (a fundus photograph has no preferred orientation within its
  circular field of view), scale and shift, stronger colour jitter, occasional Gaussian blur
  (defocus) and sharpness change (camera differences).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torchvision.transforms import v2

if TYPE_CHECKING:
    from retinagate.card import Preprocessing

__all__ = ["AUG_LEVELS", "Augmenter", "Normalizer", "sample_seed"]

AugLevel = Literal["none", "light", "strong"]
AUG_LEVELS: tuple[AugLevel, ...] = ("none", "light", "strong")

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


def _transform(level: str) -> nn.Module | None:
    if level == "none":
        return None
    if level == "light":
        light: nn.Module = v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                v2.RandomAffine(degrees=15, scale=(0.95, 1.05)),
                v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05),
            ]
        )
        return light
    strong: nn.Module = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(degrees=180, translate=(0.04, 0.04), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.15, hue=0.02),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.25),
            v2.RandomAdjustSharpness(sharpness_factor=1.5, p=0.25),
        ]
    )
    return strong


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


class Normalizer(nn.Module):
    """uint8 NCHW batch to float, scaled to [0, 1] and normalised with the card's mean and std.

    Runs on the training device, after the uint8 batch crossed to it (a quarter of the bytes of
    float32). The constants come from the model card only, the same ones serving uses.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std
