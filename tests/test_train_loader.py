"""Training batches from the cache: reproducible for a seed and epoch, whatever the worker count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retinagate.card import Preprocessing
from train.augment import Augmenter
from train.datasets import CachedSplit, cache_split, find_rfmid_splits
from train.loader import AugmentedImages, epoch_loader


@pytest.fixture(scope="module")
def cached(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> CachedSplit:
    source = find_rfmid_splits(synth_dataset)["val"]
    return cache_split(source, Preprocessing(input_size=48), tmp_path_factory.mktemp("loader"), progress=False)


def test_augmented_images_depend_only_on_seed_epoch_and_index(cached: CachedSplit) -> None:
    dataset = AugmentedImages(cached.cache_file, cached.labels, Augmenter("strong"), seed=1)
    dataset.set_epoch(2)
    image, labels = dataset[5]
    assert image.shape == (3, 48, 48) and image.dtype == torch.uint8
    np.testing.assert_array_equal(labels.numpy(), cached.labels[5])
    _ = dataset[4]  # other samples in between change nothing
    again, _ = dataset[5]
    assert torch.equal(again, image)
    dataset.set_epoch(3)
    other, _ = dataset[5]
    assert not torch.equal(other, image)


def test_without_augmentation_the_cached_pixels_come_through(cached: CachedSplit) -> None:
    dataset = AugmentedImages(cached.cache_file, cached.labels, None, seed=0)
    image, _ = dataset[3]
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), cached.images[3])


def test_batches_are_the_same_for_any_number_of_workers(cached: CachedSplit) -> None:
    dataset = AugmentedImages(cached.cache_file, cached.labels, Augmenter("strong"), seed=4)

    def batches(workers: int, epoch: int) -> list[torch.Tensor]:
        return [images for images, _ in epoch_loader(dataset, epoch, seed=4, batch_size=8, workers=workers)]

    inline, parallel = batches(0, 1), batches(2, 1)
    assert len(inline) == 48 // 8
    assert all(torch.equal(a, b) for a, b in zip(inline, parallel, strict=True))
    assert not torch.equal(batches(0, 2)[0], inline[0])


def test_weighted_sampling_draws_heavy_images_more_often(cached: CachedSplit) -> None:
    dataset = AugmentedImages(cached.cache_file, cached.labels, None, seed=0)
    weights = torch.full((len(dataset),), 1e-6, dtype=torch.double)
    weights[7] = 1.0
    (images, _), *_ = list(epoch_loader(dataset, 0, seed=0, batch_size=8, sample_weights=weights))
    expected = torch.from_numpy(np.array(cached.images[7])).permute(2, 0, 1)
    assert all(torch.equal(image, expected) for image in images)
