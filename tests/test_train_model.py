"""The classifier: starting from a local ImageNet checkpoint, and the finer CAM's stride."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from retinagate.card import ModelCard, Preprocessing
from train.model import PretrainedUnavailableError, create_model


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
