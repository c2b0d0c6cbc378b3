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


def test_cell_weights_share_each_pixel_between_the_cells_whose_span_it_lies_in() -> None:
    from train.losses import cell_weights

    stretched = cell_weights(64, 2, 16.0, 32.0)  # cells over [0, 32) and [32, 64)
    torch.testing.assert_close(stretched.sum(dim=1), torch.ones(2))
    assert float(stretched[0, :32].min()) == pytest.approx(1 / 32) and float(stretched[0, 32:].max()) == 0.0
    geometric = cell_weights(64, 2, 0.0, 32.0)  # cells over [-16, 16) and [16, 48): the input's edge is outside
    torch.testing.assert_close(geometric.sum(dim=1), torch.tensor([0.5, 1.0]))
    assert float(geometric[:, 48:].sum()) == 0.0
    half = cell_weights(10, 3, 1.5, 3.0)  # [0, 3), [3, 6), [6, 9): a grid off the pixel edges still adds up
    torch.testing.assert_close(half.sum(dim=0)[:9], torch.full((9,), 1 / 3))
    with pytest.raises(ValueError, match="positive"):
        cell_weights(10, 0, 0.0, 3.0)


def _one_lesion(size: int = 64, cells: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A lesion in the bottom-right cell of a 2 x 2 stretched grid, for label 3 of image 0."""
    from train.losses import cell_weights

    planes = torch.zeros(1, 2, size, size, dtype=torch.uint8)
    planes[0, 0, 40:44, 50:54] = 255
    columns = torch.tensor([[3, -1]])
    weights = cell_weights(size, cells, size / cells / 2, size / cells)
    return planes, columns, weights, weights


def test_lesion_loss_is_lowest_when_the_labels_map_peaks_on_its_lesion() -> None:
    from train.losses import lesion_loss

    planes, columns, rows, cols = _one_lesion()
    on, off = torch.zeros(1, 5, 2, 2), torch.zeros(1, 5, 2, 2)
    on[0, 3, 1, 1], off[0, 3, 0, 0] = 6.0, 6.0
    flat = torch.zeros(1, 5, 2, 2)
    losses = [float(lesion_loss(m, planes, columns, rows, cols)) for m in (on, flat, off)]
    assert losses[0] < losses[1] < losses[2]
    assert losses[1] == pytest.approx(math.log(4))
    elsewhere = flat.clone()
    elsewhere[0, 2, 0, 0] = 50.0  # another label's map, and the padding's column -1, do not count
    assert float(lesion_loss(elsewhere, planes, columns, rows, cols)) == pytest.approx(math.log(4))


def test_lesion_loss_skips_pairs_whose_lesion_left_the_input_and_is_zero_without_pairs() -> None:
    from train.losses import lesion_loss

    planes, columns, rows, cols = _one_lesion()
    maps = torch.randn(1, 5, 2, 2, requires_grad=True)
    gone = torch.zeros_like(planes)
    loss = lesion_loss(maps, gone, columns, rows, cols)
    loss.backward()
    assert float(loss.detach()) == 0.0 and maps.grad is not None and float(maps.grad.abs().sum()) == 0.0
    assert float(lesion_loss(maps.detach(), planes, torch.full_like(columns, -1), rows, cols)) == 0.0


def _cover_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 32 px photograph on a 2 x 2 grid of 16 px cells: label 3's lesion fills 4 x 4 pixels of the
    bottom-right cell (6% of it), and the photograph has labels 3 and 4, label 4 with no plane."""
    from train.losses import cell_weights

    planes = torch.zeros(1, 2, 32, 32, dtype=torch.uint8)
    planes[0, 0, 20:24, 24:28] = 255
    columns = torch.tensor([[3, -1]])
    labels = torch.zeros(1, 5)
    labels[0, 3] = labels[0, 4] = 1
    return planes, columns, labels, cell_weights(32, 2, 8.0, 16.0)


def test_lesion_cover_loss_is_lowest_for_a_map_that_lights_only_the_lesions_cell() -> None:
    from train.losses import lesion_cover_loss

    planes, columns, labels, weights = _cover_case()
    right = torch.full((1, 5, 2, 2), -10.0)
    right[0, 3, 1, 1] = 10.0
    wrong = torch.full((1, 5, 2, 2), -10.0)
    wrong[0, 3, 0, 0] = 10.0
    flat = torch.zeros(1, 5, 2, 2)
    losses = [float(lesion_cover_loss(m, planes, columns, labels, weights, weights)) for m in (right, flat, wrong)]
    # A cell 6% covered counts as all lesion, so the right map is all but perfect; a flat map is half
    # right on either side (log 2 twice).
    assert losses[0] < 1e-3 < losses[1] < losses[2]
    assert losses[1] == pytest.approx(2 * math.log(2))


def test_lesion_cover_loss_teaches_absent_labels_everywhere_and_positive_ones_only_where_a_plane_says() -> None:
    from train.losses import lesion_cover_loss

    planes, columns, labels, weights = _cover_case()
    maps = torch.zeros(1, 5, 2, 2, requires_grad=True)
    lesion_cover_loss(maps, planes, columns, labels, weights, weights).backward()
    assert maps.grad is not None
    grad = maps.grad[0]
    assert bool((grad[[0, 1, 2]] > 0).all())  # labels the photograph lacks: pushed down in every cell
    assert float(grad[4].abs().sum()) == 0.0  # label 4 is present but has no plane: nothing is known
    assert float(grad[3, 1, 1]) < 0 and bool((grad[3].flatten()[:3] > 0).all())  # up on the lesion only
    # A lesion that left the input (a rotation) teaches nothing about its label, and the absent
    # labels still teach.
    gone = torch.zeros_like(planes)
    maps.grad = None
    lesion_cover_loss(maps, gone, columns, labels, weights, weights).backward()
    assert float(maps.grad[0, 3].abs().sum()) == 0.0 and bool((maps.grad[0, 0] > 0).all())


def test_balanced_by_pairs_a_retina_wide_plane_weighs_as_much_as_one_small_lesion() -> None:
    from train.losses import cell_weights, lesion_cover_loss

    # Label 1 covers the whole 4 x 4 grid (a diffuse finding over the retina), label 2 one cell.
    planes = torch.zeros(1, 2, 32, 32, dtype=torch.uint8)
    planes[0, 0] = 255
    planes[0, 1, 0:8, 0:8] = 255
    columns = torch.tensor([[1, 2]])
    labels = torch.tensor([[0.0, 1.0, 1.0]])
    weights = cell_weights(32, 4, 4.0, 8.0)
    pull = {}
    for balance in ("cells", "pairs"):
        maps = torch.zeros(1, 3, 4, 4, requires_grad=True)
        lesion_cover_loss(maps, planes, columns, labels, weights, weights, balance=balance).backward()
        assert maps.grad is not None
        pull[balance] = float(maps.grad[0, 2, 0, 0] / maps.grad[0, 1, 0, 0])  # small lesion's cell : one wide cell
    # By cells every lesion cell pulls alike, so the 16 cells of the wide plane hold 16/17 of the
    # lesion half; by pairs each finding holds half of it, and its one cell pulls 16 times as hard.
    assert pull["cells"] == pytest.approx(1.0)
    assert pull["pairs"] == pytest.approx(16.0)
    with pytest.raises(ValueError, match="balance"):
        lesion_cover_loss(maps, planes, columns, labels, weights, weights, balance="area")
