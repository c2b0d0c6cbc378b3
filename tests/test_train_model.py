"""The classifier: starting from a local ImageNet checkpoint, the finer CAM's stride, and the served views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from retinagate.card import CamGrid, ModelCard, Preprocessing
from train.model import (
    CHECKPOINT_FORMAT,
    PretrainedUnavailableError,
    TurnAveraged,
    create_model,
    load_checkpoint,
    random_model,
    served_model,
    state_dict_sha256,
)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A timm EfficientNet-B0 checkpoint with a 1000-class head, as downloaded from the hub."""
    torch.manual_seed(3)
    network = timm.create_model("efficientnet_b0", num_classes=1000)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "efficientnet_b0.ra_in1k.pth"
    torch.save(state, path)
    return path, state


def test_a_local_imagenet_file_gives_its_backbone_and_a_new_29_label_head(
    imagenet_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, state = imagenet_file
    model = create_model(ModelCard(), weights=path)
    loaded = model.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(loaded["blocks.6.0.conv_pwl.weight"], state["blocks.6.0.conv_pwl.weight"])
    assert loaded["classifier.weight"].shape == (29, 1280)


def test_a_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_model(ModelCard(), weights=tmp_path / "absent.pth")


def test_an_unreadable_weights_file_names_the_way_out(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedUnavailableError, match="--no-pretrained"):
        create_model(ModelCard(), weights=broken)


@pytest.mark.parametrize(("stride", "cells"), [(32, 7), (16, 14)])
def test_output_stride_sets_the_cam_grid_at_224_px(stride: int, cells: int) -> None:
    card = ModelCard(preprocessing=Preprocessing(input_size=224), output_stride=stride)
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0).eval()
    with torch.no_grad():
        features = model.forward_features(torch.zeros(1, 3, 224, 224))  # type: ignore[operator]
    assert features.shape[2:] == (cells, cells)


def test_a_rot180_checkpoint_loads_turn_averaged_with_the_plain_models_weights_and_hash(tmp_path: Path) -> None:
    card = ModelCard(preprocessing=Preprocessing(input_size=64), tta="rot180")
    network = random_model(card, seed=2)
    path = tmp_path / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": network.state_dict(), "card": card.to_json()}, path)

    served, loaded_card, _ = load_checkpoint(path)
    old, _, _ = load_checkpoint(_with_card(path, card.with_updates(tta="none")))

    assert loaded_card.tta == "rot180" and isinstance(served, TurnAveraged) and not served.training
    assert not isinstance(old, TurnAveraged)
    written_before = {k: v for k, v in json.loads(card.to_json()).items() if k != "tta"}
    assert ModelCard.from_json(json.dumps(written_before)).tta == "none"  # older cards: one view
    assert state_dict_sha256(served.state_dict()) == state_dict_sha256(network.state_dict())
    assert served_model(served, card) is served  # never wrapped twice
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(served(x).numpy(), ((old(x) + old(x.flip(2, 3))) / 2).numpy(), atol=1e-5)


def _with_card(path: Path, card: ModelCard) -> Path:
    raw = torch.load(path, weights_only=True)
    other = path.with_name("other.pt")
    torch.save({**raw, "card": card.to_json()}, other)
    return other


def _receptive_field(features: torch.Tensor, image: torch.Tensor, cell: int) -> tuple[float, float, float]:
    """Centroid (row, column, in pixel indices) and the variance along rows of the input gradient of
    one feature cell."""
    (gradient,) = torch.autograd.grad(features[0, :, cell, cell].sum(), image)
    weight = gradient[0].abs().sum(dim=0).double()
    pixels = torch.arange(weight.shape[0], dtype=torch.float64)
    total = weight.sum()
    rows, columns = weight.sum(dim=1) / total, weight.sum(dim=0) / total
    row = float((rows * pixels).sum())
    return row, float((columns * pixels).sum()), float((rows * (pixels - row) ** 2).sum())


@pytest.mark.parametrize("alignment", ["receptive_field", "input"])
def test_the_card_places_the_two_view_cam_cells_where_the_paired_receptive_fields_are_centred(alignment: str) -> None:
    # Positive, symmetric kernels and identity batch norm: each cell's receptive field is centred on
    # its geometric centre, which the card's grid must name; the CAM of a trained network reads it so.
    size, cell = 512, 8
    card = ModelCard(preprocessing=Preprocessing(input_size=size), tta="rot180", cam_alignment=alignment)
    network = create_model(card, drop_rate=0.0, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
                module.weight.fill_(1.0)
                module.bias.fill_(0.0)
    image = torch.full((1, 3, size, size), 0.5, requires_grad=True)
    grid = card.cam_grid() or CamGrid.covering(size, size // 32)

    *upright, upright_spread = _receptive_field(network.forward_features(image), image, cell)  # type: ignore[operator]
    *both, both_spread = _receptive_field(served_model(network, card).forward_features(image), image, cell)  # type: ignore[operator]

    # Symmetric padding: the upright view's cell k is centred on pixel 32 k, its turned view's on
    # pixel 32 (k + 1) - 1. The grid names edges (pixel i spans [i, i + 1)), so a cell's centre in
    # pixel indices is origin + k * step - 0.5: aligned, the pair's mean; stretched, the pair 31 px apart.
    assert upright == pytest.approx((32.0 * cell, 32.0 * cell), abs=1.0)
    expected = grid.origin + cell * grid.step - 0.5
    assert both == pytest.approx((expected, expected), abs=1.0)
    # Two fields 1 px apart add 0.25 px^2 of variance to one field's; 31 px apart, 240.
    apart = 1.0 if alignment == "receptive_field" else 31.0
    assert both_spread - upright_spread == pytest.approx(apart**2 / 4, abs=5.0)
    if alignment == "receptive_field":
        assert expected == 32.0 * cell - 0.5


def test_the_lesion_probe_reads_the_stride_16_stage_and_stays_out_of_the_model() -> None:
    from train.model import LesionProbe

    card = ModelCard(preprocessing=Preprocessing(input_size=64))
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0).eval()
    keys = set(model.state_dict())
    probe = LesionProbe(model, 29)
    assert probe.head.in_channels == 112  # EfficientNet-B0's blocks.4
    with pytest.raises(RuntimeError, match="has not run"):
        probe()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        stage = model.blocks[:5](model.bn1(model.conv_stem(images)))
        logits = model(images)
        maps = probe()
        torch.testing.assert_close(maps, probe.head(stage))
    assert maps.shape == (2, 29, 4, 4)
    # The probe adds nothing to what is saved, exported or served.
    assert set(model.state_dict()) == keys
    probe.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits)
    with pytest.raises(RuntimeError, match="has not run"):
        probe()
    with pytest.raises(ValueError, match="no stage at stride 64"):
        LesionProbe(model, 29, reduction=64)


@pytest.mark.parametrize(("stride", "blocks", "channels"), [(8, 3, 40), (4, 2, 24)])
def test_a_probe_on_a_finer_stage_reads_its_block_with_more_cells(stride: int, blocks: int, channels: int) -> None:
    from train.model import LesionProbe

    card = ModelCard(preprocessing=Preprocessing(input_size=64))
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0).eval()
    probe = LesionProbe(model, 29, reduction=stride)  # stride 8: blocks.2; stride 4: blocks.1
    assert probe.head.in_channels == channels and probe.reduction == stride
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        stage = model.blocks[:blocks](model.bn1(model.conv_stem(images)))
        model(images)
        maps = probe()
        torch.testing.assert_close(maps, probe.head(stage))
    assert maps.shape == (2, 29, 64 // stride, 64 // stride)
