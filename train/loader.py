"""From the preprocessing cache to training batches: dataset, epoch loader, worker seeding.

Every random choice of an epoch is a function of (run seed, epoch): the sampler draws from a generator
seeded with them, and each sample is augmented under a seed made from (run seed, epoch, index). So the
batches are the same for any number of workers, and a run resumed at epoch ``e`` sees exactly the
batches an uninterrupted run would have seen.

This module needs only NumPy, PyTorch and torchvision (no project settings or DICOM stack), so GPU
benchmarks can run the real data pipeline on machines with a bare PyTorch install.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler

from train.augment import sample_seed

__all__ = ["Augment", "AugmentedImages", "LesionPlanes", "epoch_loader"]


class Augment(Protocol):
    """What the dataset augments with (:class:`train.augment.Augmenter`): an image alone, or an image
    and its lesion planes moved the same way, each under a seed."""

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor: ...

    def with_planes(
        self, image: torch.Tensor, planes: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class LesionPlanes:
    """The lesion masks of one split's images, carried over to the model input (the localisation loss).

    Attributes:
        cache_file: ``.npy`` holding ``uint8 (P, S, S)``: pair ``p``'s share of each input pixel (0-255).
        offsets: ``(N + 1,)``: image ``i``'s pairs are ``offsets[i]`` to ``offsets[i + 1]``.
        columns: ``(P,)`` label column of each pair.
        per_image: Pairs handed out per image (padded with column -1; further pairs are left out).
    """

    cache_file: Path
    offsets: NDArray[np.intp]
    columns: NDArray[np.intp]
    per_image: int

    def __len__(self) -> int:
        return int(self.columns.shape[0])


class AugmentedImages(Dataset[tuple[torch.Tensor, ...]]):
    """A cache file as a PyTorch dataset: augmented uint8 ``(3, S, S)`` images and uint8 labels.

    With ``lesions``, each item also holds the image's lesion planes, moved as the image was, as
    ``uint8 (K, S, S)``, and their ``(K,)`` label columns (-1 where the image has fewer than ``K``
    pairs), ``K`` being :attr:`LesionPlanes.per_image`.

    The cache is memory-mapped lazily in each process (loader workers map it themselves instead of
    receiving a pickled copy). :meth:`set_epoch` selects the epoch whose random draws come next.

    Args:
        cache_file: ``.npy`` holding ``uint8 (N, S, S, 3)`` images (see :func:`train.datasets.cache_split`).
        labels: ``uint8 (N, C)`` labels.
        augment: The augmentation (:class:`Augment`); ``None`` for none.
        seed: The run seed.
        lesions: The split's lesion planes, or ``None``.
    """

    def __init__(
        self,
        cache_file: Path,
        labels: NDArray[np.uint8],
        augment: Augment | None,
        seed: int,
        lesions: LesionPlanes | None = None,
    ) -> None:
        self.cache_file = Path(cache_file)
        self.labels = np.ascontiguousarray(labels)
        self.augment = augment
        self.seed = seed
        self.lesions = lesions
        self.epoch = 0
        self._images: NDArray[np.uint8] | None = None
        self._planes: NDArray[np.uint8] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose augmentation draws the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = None
        state["_planes"] = None
        return state

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if self._images is None:
            self._images = np.load(self.cache_file, mmap_mode="r")
        image = torch.from_numpy(np.array(self._images[index])).permute(2, 0, 1)
        labels = torch.from_numpy(self.labels[index])
        seed = sample_seed(self.seed, self.epoch, index)
        if self.lesions is None:
            if self.augment is not None:
                image = self.augment(image, seed)
            return image, labels
        planes, columns = self._lesions(index, image.shape[1], image.shape[2])
        if self.augment is not None:
            image, planes = self.augment.with_planes(image, planes, seed)
        return image, labels, planes, columns

    def _lesions(self, index: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        lesions = self.lesions
        assert lesions is not None
        if self._planes is None:
            self._planes = np.load(lesions.cache_file, mmap_mode="r")
        start = int(lesions.offsets[index])
        stop = min(int(lesions.offsets[index + 1]), start + lesions.per_image)
        planes = np.zeros((lesions.per_image, height, width), np.uint8)
        columns = np.full(lesions.per_image, -1, np.int64)
        planes[: stop - start] = self._planes[start:stop]
        columns[: stop - start] = lesions.columns[start:stop]
        return torch.from_numpy(planes), torch.from_numpy(columns)


def _seed_worker(worker_id: int) -> None:
    """Seeds NumPy and ``random`` in a loader worker from the seed PyTorch gave it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def epoch_loader(
    dataset: AugmentedImages,
    epoch: int,
    *,
    seed: int,
    batch_size: int,
    workers: int = 0,
    sample_weights: torch.Tensor | None = None,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """The shuffled (or weighted) training loader of one epoch.

    Workers are not persistent, so each epoch's workers start from that epoch's state. The last
    incomplete batch is dropped (a batch of one would break batch norm).

    Args:
        dataset: The training images.
        epoch: 0-based epoch.
        seed: The run seed.
        batch_size: Images per batch.
        workers: Loader processes (0: load in the calling process).
        sample_weights: Per-image weights for sampling with replacement (balanced sampler).
        pin_memory: Pin batches for faster, asynchronous copies to a GPU.
        prefetch_factor: Batches each worker prepares ahead.
    """
    dataset.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, epoch, -1))
    sampler: Sampler[int]
    if sample_weights is not None:
        sampler = WeightedRandomSampler(sample_weights.tolist(), len(dataset), replacement=True, generator=generator)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        worker_init_fn=_seed_worker,
        generator=generator,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
    )
