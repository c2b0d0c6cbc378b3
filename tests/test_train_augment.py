"""Augmentation on cached uint8 images, and normalisation from the model card."""

from __future__ import annotations

import pytest
import torch

from retinagate.card import ModelCard, Preprocessing
from train.augment import Augmenter, Normalizer, sample_seed


@pytest.fixture
def image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("level", ["light", "strong"])
def test_augmentation_keeps_shape_and_dtype_and_repeats_for_the_same_seed(level: str, image: torch.Tensor) -> None:
    augment = Augmenter(level)
    first = augment(image, 11)
    assert first.shape == image.shape and first.dtype == torch.uint8
    assert torch.equal(first, augment(image, 11))
    assert not torch.equal(first, augment(image, 12))
    assert not torch.equal(first, image)


def test_augmentation_leaves_the_global_random_state_alone(image: torch.Tensor) -> None:
    state = torch.get_rng_state()
    Augmenter("strong")(image, 5)
    assert torch.equal(torch.get_rng_state(), state)


def test_no_augmentation_returns_the_cached_pixels(image: torch.Tensor) -> None:
    assert Augmenter("none")(image, 3) is image


def test_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="none, flip, light, strong"):
        Augmenter("extreme")


def test_flip_level_only_mirrors_the_image() -> None:
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    mirrors = [image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)]
    seen = set()
    for seed in range(16):
        out = Augmenter("flip")(image, seed)
        matches = [i for i, m in enumerate(mirrors) if torch.equal(out, m)]
        assert matches, "the flip level changed pixels, not only their order"
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_sample_seeds_differ_across_epochs_and_indices() -> None:
    seeds = {sample_seed(0, epoch, index) for epoch in range(5) for index in range(200)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**63 for s in seeds)


def test_normalizer_uses_the_cards_mean_and_std() -> None:
    card = ModelCard(preprocessing=Preprocessing(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0)))
    pixels = torch.tensor([255, 0, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = Normalizer(card.preprocessing)(pixels).flatten().tolist()
    assert out == pytest.approx([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.0) / 1.0], rel=1e-5)


def _disc(size: int, level: float, ramp: float = 0.0, dot: bool = False) -> torch.Tensor:
    """A bright disc on black, optionally with an illumination ramp across it and a small dark dot."""
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    inside = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (0.45 * size) ** 2
    plane = level + ramp * (x / size - 0.5)
    if dot:
        plane = torch.where((x - 0.6 * size) ** 2 + (y - 0.5 * size) ** 2 < 4.0, plane - 60.0, plane)
    return (torch.where(inside, plane, torch.zeros_like(plane)).clamp(0, 255).round().to(torch.uint8)).expand(
        1, 3, -1, -1
    )


@pytest.mark.parametrize("size", [96, 288], ids=["fine", "coarse-local-mean"])
def test_contrast_normalisation_removes_illumination_and_keeps_small_lesions(size: int) -> None:
    on = Normalizer(Preprocessing(input_size=size, contrast_sigma=0.04, mean=(0.5,) * 3, std=(0.5,) * 3))
    off = Normalizer(Preprocessing(input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert (on.factor > 1) == (size == 288)  # the local mean of a wide Gaussian is taken on a coarser grid
    flat, lit = _disc(size, 140.0), _disc(size, 140.0, ramp=80.0)
    inner = slice(size * 5 // 24, size * 19 // 24)
    centre = (slice(None), slice(None), inner, inner)
    # An illumination ramp moves the plain input by up to 40 grey levels; contrast normalisation
    # leaves (nearly) nothing of it, because the local mean follows it.
    assert (off(lit) - off(flat))[centre].abs().max() > 0.15
    assert (on(lit) - on(flat))[centre].abs().max() < 0.04  # uint8 rounding of the ramp, times the gain
    # A 4-pixel dark dot stands out four times as strongly as in the plain input.
    dot = _disc(size, 140.0, dot=True)
    assert float((on(dot) - on(flat)).abs().max()) > 3.0 * float((off(dot) - off(flat)).abs().max())
    # Outside the field of view everything is mid-grey, with no ring from the black border.
    corner = on(lit)[..., :8, :8]
    assert corner.abs().max() < 1e-6
    assert on(flat)[centre].abs().max() < 0.05


def test_a_card_without_contrast_normalises_as_before() -> None:
    preprocessing = Preprocessing(input_size=64)
    assert preprocessing.contrast_sigma == 0.0 and not Normalizer(preprocessing).contrast
    assert "contrast_sigma" in Preprocessing.model_validate({"input_size": 64}).model_dump()


def test_batch_augmenter_gives_each_image_its_own_draw_and_repeats_for_a_seed(image: torch.Tensor) -> None:
    from train.augment import BatchAugmenter

    batch = image.expand(6, -1, -1, -1).contiguous()
    augment = BatchAugmenter("strong")
    out = augment(batch, 9)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    assert torch.equal(out, augment(batch, 9))
    assert not torch.equal(out, augment(batch, 10))
    assert all(not torch.equal(out[0], out[i]) for i in range(1, 6))


def test_batch_augmenter_without_augmentation_only_converts_to_float(image: torch.Tensor) -> None:
    from train.augment import BatchAugmenter

    batch = image[None]
    assert torch.equal(BatchAugmenter("none")(batch, 1), batch.float())


def test_batch_augmenter_light_keeps_a_centred_disc_in_place() -> None:
    """Light augmentation rotates at most 15 degrees about the centre: a centred disc stays put."""
    from train.augment import BatchAugmenter

    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 100).to(torch.uint8) * 200
    batch = disc.expand(8, 3, 64, 64).contiguous()
    out = BatchAugmenter("light")(batch, 3)
    centre, corner = out[:, :, 28:36, 28:36].mean(), out[:, :, :8, :8].mean()
    assert centre > 150 and corner < 5


def _spot(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A grey image with one bright spot off the centre, and its lesion plane."""
    image = torch.full((3, size, size), 60, dtype=torch.uint8)
    image[:, 10:16, 40:46] = 250
    plane = torch.zeros(1, size, size, dtype=torch.uint8)
    plane[0, 10:16, 40:46] = 255
    return image, plane


@pytest.mark.parametrize("level", ["flip", "light", "strong"])
def test_lesion_planes_move_with_the_image_and_leave_its_pixels_as_without_them(level: str) -> None:
    image, plane = _spot()
    augment = Augmenter(level)
    for seed in range(6):
        moved_image, moved = augment.with_planes(image, plane, seed)
        assert torch.equal(moved_image, augment(image, seed))
        assert moved.shape == plane.shape and moved.dtype == torch.uint8 and type(moved) is torch.Tensor
        grey = moved_image.float().mean(dim=0)
        bright = grey > (grey.median() + grey.max()) / 2  # halfway to the spot, whatever the jitter did
        covered = moved[0] > 127
        assert int((bright & covered).sum()) >= 0.7 * int(covered.sum()) > 0


def test_batch_augmenter_moves_lesion_planes_with_the_images_and_keeps_their_pixels() -> None:
    from train.augment import BatchAugmenter

    image, plane = _spot()
    batch, planes = image.expand(6, -1, -1, -1).contiguous(), plane.expand(6, -1, -1, -1).contiguous()
    augment = BatchAugmenter("strong")
    moved_images, moved = augment.with_planes(batch, planes, 4)
    assert torch.equal(moved_images, augment(batch, 4))
    assert moved.shape == planes.shape and moved.dtype == torch.float32
    grey = moved_images.mean(dim=1)
    level = (grey.flatten(1).median(dim=1).values + grey.flatten(1).amax(dim=1)) / 2
    bright, covered = grey > level[:, None, None], moved[:, 0] > 127
    assert int((bright & covered).sum()) >= 0.7 * int(covered.sum()) > 0
    assert torch.equal(BatchAugmenter("none").with_planes(batch, planes, 1)[1], planes.float())
