"""One optimisation step, in fp32 and under bf16 autocast on the CPU, with its auxiliary terms."""

from __future__ import annotations

import pytest
import torch

from retinagate.card import ModelCard, Preprocessing
from train.augment import Normalizer
from train.losses import equivariance_loss, peak_logits
from train.model import class_maps, create_model
from train.step import TrainStep


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_steps_on_one_batch_lower_its_loss_and_advance_schedule_and_ema(precision: str) -> None:
    from timm.utils.model_ema import ModelEmaV3

    torch.manual_seed(0)
    card = ModelCard(preprocessing=Preprocessing(input_size=32))
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    ema = ModelEmaV3(model, decay=0.9)
    step = TrainStep(
        model, optimizer, torch.nn.BCEWithLogitsLoss(), Normalizer(card.preprocessing),
        device=torch.device("cpu"), precision=precision, scheduler=scheduler, grad_clip=1.0, ema=ema,
    )  # fmt: skip
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    targets = (torch.rand(8, 29) < 0.2).to(torch.uint8)
    model.train()
    losses = [float(step(images, targets)) for _ in range(8)]
    assert losses[-1] < losses[0]
    assert step.steps == 8
    assert scheduler.get_last_lr()[0] == pytest.approx(3e-3 / 9)
    ema_weights, weights = ema.module.state_dict(), model.state_dict()
    assert not torch.equal(ema_weights["classifier.weight"], weights["classifier.weight"])


def test_unknown_precision_is_refused() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(), torch.nn.Identity(),
                  device=torch.device("cpu"), precision="fp8")  # fmt: skip


def _model_and_batch(n: int) -> tuple[torch.nn.Module, Normalizer, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A 64 px B0 with BCE, and a random uint8 batch of ``n`` images with 0/1 targets (seeded)."""
    torch.manual_seed(0)
    card = ModelCard(preprocessing=Preprocessing(input_size=64))
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0)
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8)
    targets = (torch.rand(n, 29) < 0.3).to(torch.uint8)
    return model, Normalizer(card.preprocessing), torch.nn.BCEWithLogitsLoss(), images, targets


def test_the_peak_term_adds_the_loss_of_the_log_sum_exp_pooled_class_maps() -> None:
    model, normalizer, criterion, images, targets = _model_and_batch(4)
    model.train()
    with torch.no_grad():  # batch norm uses the batch's statistics in train mode, so this is the step's forward
        features = model.forward_features(normalizer(images))
        logits = model.forward_head(features)
        expected = criterion(logits, targets.float()) + 0.5 * criterion(
            peak_logits(features, model.get_classifier(), 3.0), targets.float()
        )
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), criterion, normalizer,
                     device=torch.device("cpu"), channels_last=False, peak_weight=0.5, peak_sharpness=3.0)  # fmt: skip
    torch.testing.assert_close(step(images, targets), expected)


def test_the_equivariance_term_turns_the_first_images_into_the_last_places_and_compares_their_maps() -> None:
    model, normalizer, criterion, images, targets = _model_and_batch(6)
    batch = torch.cat([images[:4], torch.flip(images[:2], dims=(2, 3))])
    labels = torch.cat([targets[:4], targets[:2]]).float()
    model.train()
    with torch.no_grad():
        features = model.forward_features(normalizer(batch))
        maps = class_maps(features, model.get_classifier())
        expected = criterion(model.forward_head(features), labels) + 0.25 * equivariance_loss(maps[:2], maps[4:])
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), criterion, normalizer,
                     device=torch.device("cpu"), channels_last=False, equivariance_weight=0.25,
                     equivariance_pairs=2)  # fmt: skip
    torch.testing.assert_close(step(images, targets), expected)


def test_the_lesion_term_adds_the_lesion_loss_of_the_class_maps_on_the_steps_grid() -> None:
    from train.losses import cell_weights, lesion_loss

    model, normalizer, criterion, images, targets = _model_and_batch(4)
    planes = torch.zeros(4, 2, 64, 64, dtype=torch.uint8)
    planes[0, 0, 8:12, 40:44] = 255
    planes[2, 0, 50:60, 5:9] = 128
    columns = torch.tensor([[4, -1], [-1, -1], [7, -1], [-1, -1]])
    model.train()
    with torch.no_grad():
        features = model.forward_features(normalizer(images))
        maps = class_maps(features, model.get_classifier())
        weights = cell_weights(64, 2, 0.0, 32.0)
        expected = criterion(model.forward_head(features), targets.float()) + 0.5 * lesion_loss(
            maps, planes, columns, weights, weights
        )
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), criterion, normalizer,
                     device=torch.device("cpu"), channels_last=False, lesion_weight=0.5,
                     lesion_grid=(0.0, 32.0))  # fmt: skip
    torch.testing.assert_close(step(images, targets, planes, columns), expected)
    # Without planes (data without masks) the step is the classification loss alone.
    with torch.no_grad():
        plain = criterion(model(normalizer(images)), targets.float())
    torch.testing.assert_close(step(images, targets), plain)


def test_the_probe_term_adds_the_cover_loss_of_the_stride_16_stage_on_the_grid_at_half_the_step() -> None:
    from train.losses import cell_weights, lesion_cover_loss
    from train.model import LesionProbe

    model, normalizer, criterion, images, targets = _model_and_batch(4)
    probe = LesionProbe(model, 29)
    planes = torch.zeros(4, 2, 64, 64, dtype=torch.uint8)
    planes[0, 0, 8:12, 40:44] = 255
    columns = torch.tensor([[4, -1], [-1, -1], [-1, -1], [-1, -1]])
    targets[0, 4] = 1
    model.train()
    with torch.no_grad():
        logits = model(normalizer(images))
        weights = cell_weights(64, 4, 0.0, 16.0)  # the CAM's grid (0, 32) at stride 16
        expected = criterion(logits, targets.float()) + 0.5 * lesion_cover_loss(
            probe(), planes, columns, targets.float(), weights, weights
        )
    before = probe.head.weight.detach().clone()
    optimizer = torch.optim.SGD([*model.parameters(), *probe.parameters()], lr=0.1)
    step = TrainStep(model, optimizer, criterion, normalizer, device=torch.device("cpu"), channels_last=False,
                     lesion_grid=(0.0, 32.0), probes=[probe], probe_weight=0.5)  # fmt: skip
    torch.testing.assert_close(step(images, targets, planes, columns), expected)
    assert not torch.equal(probe.head.weight, before)  # the probe learns with the network
    # Without planes (data without masks) the step is the classification loss alone, and the probe's
    # reading of the batch is spent, not left for the next step.
    with torch.no_grad():
        plain = criterion(model(normalizer(images)), targets.float())
    torch.testing.assert_close(step(images, targets, None, None), plain)
    with pytest.raises(RuntimeError, match="has not run"):
        probe()


def test_probes_on_two_stages_each_add_their_cover_loss_at_the_weight() -> None:
    from train.losses import cell_weights, lesion_cover_loss
    from train.model import LesionProbe

    model, normalizer, criterion, images, targets = _model_and_batch(4)
    probes = [LesionProbe(model, 29, reduction=8), LesionProbe(model, 29, reduction=16)]
    planes = torch.zeros(4, 1, 64, 64, dtype=torch.uint8)
    planes[1, 0, 30:33, 20:23] = 255  # a microaneurysm-sized lesion
    columns = torch.tensor([[-1], [6], [-1], [-1]])
    targets[1, 6] = 1
    model.train()
    with torch.no_grad():
        logits = model(normalizer(images))
        expected = criterion(logits, targets.float())
        for probe in probes:
            cells = 64 // probe.reduction
            weights = cell_weights(64, cells, 0.0, float(probe.reduction))  # the CAM's grid (0, 32) at the stride
            expected = expected + 0.5 * lesion_cover_loss(probe(), planes, columns, targets.float(), weights, weights)
    optimizer = torch.optim.SGD([p for module in (model, *probes) for p in module.parameters()], lr=0.0)
    step = TrainStep(model, optimizer, criterion, normalizer, device=torch.device("cpu"), channels_last=False,
                     lesion_grid=(0.0, 32.0), probes=probes, probe_weight=0.5)  # fmt: skip
    torch.testing.assert_close(step(images, targets, planes, columns), expected)


def test_the_risk_plane_is_every_lesion_of_a_photograph_that_is_positive_for_disease_risk() -> None:
    from train.step import with_risk_plane

    planes = torch.zeros(3, 2, 8, 8, dtype=torch.uint8)
    planes[0, 0, 1, 1], planes[0, 1, 5, 6] = 255, 128  # two lesions of two labels
    planes[1, 0, 2, 2] = 255  # a padding plane (column -1) holds nothing that counts
    planes[2, 0, 3, 3] = 255  # a lesion, but the labels say Disease_Risk is negative
    columns = torch.tensor([[3, 7], [-1, -1], [5, -1]])
    targets = torch.zeros(3, 29)
    targets[:, 0] = torch.tensor([1.0, 1.0, 0.0])
    moved, labelled = with_risk_plane(planes, columns, targets, 0)
    assert labelled.tolist() == [[3, 7, 0], [-1, -1, -1], [5, -1, -1]]
    torch.testing.assert_close(moved[:, :2], planes)
    union = torch.zeros(8, 8, dtype=torch.uint8)
    union[1, 1], union[5, 6] = 255, 128
    torch.testing.assert_close(moved[0, 2], union)


def test_a_diffuse_finding_joins_the_risk_plane_only_of_a_photograph_without_a_focal_lesion() -> None:
    from train.step import with_risk_plane

    planes = torch.zeros(2, 2, 8, 8, dtype=torch.uint8)
    planes[0, 0, 1, 1] = 255  # a focal lesion (column 1) ...
    planes[0, 1, 2:6, 2:6] = planes[1, 0, 2:6, 2:6] = 255  # ... and the retina of a diffuse finding (column 7)
    columns = torch.tensor([[1, 7], [7, -1]])
    targets = torch.ones(2, 29)
    moved, labelled = with_risk_plane(planes, columns, targets, 0, diffuse=(3, 7))
    assert labelled.tolist() == [[1, 7, 0], [7, -1, 0]]
    torch.testing.assert_close(moved[0, 2], planes[0, 0])  # beside the lesion: the lesion alone
    torch.testing.assert_close(moved[1, 2], planes[1, 0])  # alone: the retina
    everything, _ = with_risk_plane(planes, columns, targets, 0)
    torch.testing.assert_close(everything[0, 2], planes[0].amax(dim=0))


def test_with_the_risk_column_the_step_aims_disease_risk_at_the_union_of_lesions() -> None:
    from train.losses import cell_weights, lesion_cover_loss, lesion_loss
    from train.model import LesionProbe
    from train.step import with_risk_plane

    model, normalizer, criterion, images, targets = _model_and_batch(4)
    probe = LesionProbe(model, 29)
    planes = torch.zeros(4, 1, 64, 64, dtype=torch.uint8)
    planes[1, 0, 30:33, 20:23] = 255
    columns = torch.tensor([[-1], [6], [-1], [-1]])
    targets[1, 6] = targets[1, 0] = 1
    model.train()
    with torch.no_grad():
        features = model.forward_features(normalizer(images))
        logits = model.forward_head(features)
        both, labelled = with_risk_plane(planes, columns, targets.float(), 0)
        maps = class_maps(features, model.get_classifier())
        cam = cell_weights(64, 2, 0.0, 32.0)
        fine = cell_weights(64, 4, 0.0, 16.0)
        expected = (
            criterion(logits, targets.float())
            + 0.5 * lesion_loss(maps, both, labelled, cam, cam)
            + 0.5 * lesion_cover_loss(probe(), both, labelled, targets.float(), fine, fine)
        )
    optimizer = torch.optim.SGD([*model.parameters(), *probe.parameters()], lr=0.0)
    step = TrainStep(model, optimizer, criterion, normalizer, device=torch.device("cpu"), channels_last=False,
                     lesion_weight=0.5, lesion_grid=(0.0, 32.0), probes=[probe], probe_weight=0.5,
                     risk_column=0)  # fmt: skip
    torch.testing.assert_close(step(images, targets, planes, columns), expected)


def test_at_a_smaller_input_size_the_photographs_and_their_planes_are_scaled_down_together() -> None:
    from train.losses import cell_weights, lesion_loss

    model, normalizer, criterion, images, targets = _model_and_batch(4)
    planes = torch.zeros(4, 1, 64, 64, dtype=torch.uint8)
    planes[0, 0, 8:16, 40:48] = 255
    columns = torch.tensor([[4], [-1], [-1], [-1]])
    seen: list[tuple[int, ...]] = []
    model.conv_stem.register_forward_hook(lambda _m, inputs, _out: seen.append(tuple(inputs[0].shape)))
    model.train()
    with torch.no_grad():
        small = torch.nn.functional.interpolate(normalizer(images), size=(32, 32), mode="area")
        features = model.forward_features(small)
        maps = class_maps(features, model.get_classifier())
        scaled = torch.nn.functional.interpolate(planes.float(), size=(32, 32), mode="area")
        assert scaled[0, 0].sum() == pytest.approx(planes[0, 0].float().sum() / 4)  # the lesion keeps its share
        weights = cell_weights(32, 1, 0.0, 32.0)
        expected = criterion(model.forward_head(features), targets.float()) + 0.5 * lesion_loss(
            maps, scaled, columns, weights, weights
        )
    seen.clear()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), criterion, normalizer,
                     device=torch.device("cpu"), channels_last=False, lesion_weight=0.5, lesion_grid=(0.0, 32.0),
                     input_size=32)  # fmt: skip
    torch.testing.assert_close(step(images, targets, planes, columns), expected)
    assert seen == [(4, 3, 32, 32)]
    # Back at the batch's own size (the loop's later epochs) the network sees it whole.
    step.input_size = None
    step(images, targets, planes, columns)
    assert seen[-1] == (4, 3, 64, 64)
