"""BCE, focal and asymmetric losses, the automatic positive weight, the peak pooling and the turn test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from train.losses import AsymmetricLoss, FocalLoss, auto_pos_weight, build_loss, equivariance_loss, peak_logits


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 29, generator=generator) * 3
    targets = (torch.rand(16, 29, generator=generator) < 0.2).float()
    return logits, targets


def test_focal_loss_with_gamma_zero_is_binary_cross_entropy(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, targets = batch
    weight = torch.linspace(1, 5, 29)
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
    assert FocalLoss(gamma=0.0, pos_weight=weight)(logits, targets) == pytest.approx(float(expected), rel=1e-5)


def test_focal_loss_down_weights_confident_correct_predictions() -> None:
    targets = torch.ones(1, 1)
    easy, hard = torch.tensor([[4.0]]), torch.tensor([[0.0]])
    focal, bce = FocalLoss(gamma=2.0), torch.nn.BCEWithLogitsLoss()
    assert focal(easy, targets) / bce(easy, targets) < focal(hard, targets) / bce(hard, targets)


def test_asymmetric_loss_without_focusing_or_clipping_is_binary_cross_entropy(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    logits, targets = batch
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    loss = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, targets)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_asymmetric_loss_ignores_negatives_already_below_the_clip() -> None:
    targets = torch.zeros(1, 1)
    very_negative = torch.tensor([[-6.0]])  # p = 0.0025 < clip 0.05: shifted to zero loss
    assert float(AsymmetricLoss(clip=0.05)(very_negative, targets)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["bce", "asl", "focal"])
def test_every_loss_gives_finite_gradients_for_extreme_logits(name: str) -> None:
    logits = torch.tensor([[-60.0, 60.0, 0.0], [60.0, -60.0, 0.5]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    loss = build_loss(name, torch.tensor([2.0, 3.0, 4.0]))(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_auto_pos_weight_is_negatives_over_positives_capped_and_one_without_positives() -> None:
    labels = np.zeros((100, 3), dtype=np.uint8)
    labels[:20, 0] = 1  # 80/20 = 4
    labels[:1, 1] = 1  # 99/1, capped at 30
    weight = auto_pos_weight(labels, cap=30.0)
    assert weight.tolist() == pytest.approx([4.0, 30.0, 1.0])


def test_unknown_loss_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="bce, asl, focal"):
        build_loss("hinge")


def _head(features: int = 6, labels: int = 3) -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(features, labels)


def test_peak_logits_of_a_flat_map_are_the_average_pooled_logits() -> None:
    head = _head()
    column = torch.randn(2, 6, 1, 1)
    features = column.expand(2, 6, 4, 5)
    for sharpness in (0.5, 5.0, 50.0):
        torch.testing.assert_close(peak_logits(features, head, sharpness), head(column.flatten(1)))


def test_peak_logits_lie_between_the_mean_and_the_maximum_of_the_class_map() -> None:
    head = _head()
    features = torch.randn(2, 6, 4, 5)
    maps = torch.einsum("nkhw,ck->nchw", features, head.weight).flatten(2) + head.bias[None, :, None]
    mean, peak = maps.mean(2), maps.amax(2)
    soft, sharp = peak_logits(features, head, 1.0), peak_logits(features, head, 1000.0)
    assert torch.all(soft > mean) and torch.all(soft < peak)
    assert torch.all(sharp > soft)
    # At sharpness r the pooled value is within log(h * w) / r of the maximum.
    torch.testing.assert_close(sharp, peak, atol=math.log(20) / 1000, rtol=0)


def test_peak_logits_refuse_a_sharpness_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="sharpness is 0"):
        peak_logits(torch.zeros(1, 6, 2, 2), _head(), 0.0)


def test_equivariance_loss_is_zero_for_maps_that_turn_with_the_photograph_and_not_for_offset_ones() -> None:
    torch.manual_seed(0)
    maps = torch.randn(3, 29, 9, 9)
    turned = torch.flip(maps, dims=(2, 3))
    assert float(equivariance_loss(maps, turned)) == pytest.approx(0.0, abs=1e-6)
    assert float(equivariance_loss(maps, turned + 5.0)) == pytest.approx(0.0, abs=1e-6)  # the mean is the logit's
    # Evidence one cell below its lesion, whichever way up the photograph is: a turn moves it above.
    blob = torch.zeros(1, 1, 9, 9)
    blob[0, 0, 4, 4] = 1.0
    offset = torch.roll(blob, 1, dims=2)
    assert float(equivariance_loss(offset, offset)) > 0.9
    assert float(equivariance_loss(maps, torch.randn(3, 29, 9, 9))) == pytest.approx(1.0, abs=0.1)
