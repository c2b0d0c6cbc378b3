"""The served graph: in-graph normalisation, logits equal to the classifier's, and CAM = Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.graph import CamModel, classifier_weight, output_names
from export.onnx_export import export_model, read_card
from retinagate.card import ModelCard, Preprocessing
from retinagate.engine import inspect_model
from retinagate.preprocess import prepare
from retinagate.synth import render_fundus
from train.augment import Normalizer
from train.datasets import find_rfmid_splits, read_image
from train.model import TurnAveraged, create_model, load_checkpoint, random_model


@pytest.fixture(scope="module")
def fundus_images(synth_dataset: Path) -> np.ndarray:
    """Six prepared validation photographs (128 px), with planted lesions."""
    source = find_rfmid_splits(synth_dataset)["val"]
    preprocessing = Preprocessing(input_size=128)
    return np.stack([prepare(read_image(path), preprocessing) for path in source.paths[:6]])


def _minmax(maps: np.ndarray) -> np.ndarray:
    """Per-map min-max normalisation over the last two axes; all-constant maps become all zero."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0)


def _autograd_gradcam(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Grad-CAM on the feature map that feeds the global pool, one backward pass per label.

    Returns the raw maps ``[N, C, h, w]`` and the logits.
    """
    features = model.forward_features(x).detach().requires_grad_(True)
    logits = model.forward_head(features)
    maps = []
    for label in range(logits.shape[1]):
        (gradient,) = torch.autograd.grad(logits[:, label].sum(), features, retain_graph=True)
        weights = gradient.mean(dim=(2, 3), keepdim=True)  # alpha_k^c: gradient averaged over h, w
        maps.append(torch.relu((weights * features).sum(dim=1)))
    return torch.stack(maps, dim=1).detach().numpy(), logits.detach().numpy()


def test_logits_are_exactly_the_classifiers_on_the_same_normalised_input(trained_checkpoint: Path) -> None:
    model, card, _ = load_checkpoint(trained_checkpoint)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8))

    with torch.no_grad():
        logits, probabilities, cam = CamModel(model, card)(images)
        as_in_training = model(Normalizer(card.preprocessing)(images.permute(0, 3, 1, 2)))

    assert torch.equal(logits, as_in_training)
    torch.testing.assert_close(probabilities, torch.sigmoid(logits))
    assert cam.shape == (3, card.num_labels, 4, 4)


def test_normalisation_comes_from_the_card() -> None:
    card = ModelCard(preprocessing=Preprocessing(input_size=64, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0)))
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0)
    image = torch.full((1, 64, 64, 3), 255, dtype=torch.uint8)

    normalised = CamModel(model, card).normalise(image)

    assert normalised.shape == (1, 3, 64, 64)
    torch.testing.assert_close(normalised[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def test_onnx_cam_equals_autograd_gradcam_on_the_pooled_feature_map(
    trained_checkpoint: Path, onnx_model_path: Path, fundus_images: np.ndarray
) -> None:
    model, card, _ = load_checkpoint(trained_checkpoint)
    noise = np.random.default_rng(1).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    images = np.concatenate([fundus_images, noise])
    session = ort.InferenceSession(str(onnx_model_path), providers=["CPUExecutionProvider"])
    (cam,) = session.run(["cam"], {"image": images})

    x = CamModel(model, card).normalise(torch.from_numpy(images))
    gradcam, _ = _autograd_gradcam(model, x)

    assert cam.shape == gradcam.shape == (8, 29, 4, 4)
    ours, theirs = _minmax(cam), _minmax(gradcam)
    assert np.abs(ours - theirs).max() < 1e-3
    # Maps that are all zero (every position negative before the ReLU) must be zero in both.
    zero_ours = cam.max(axis=(2, 3)) == 0
    zero_theirs = gradcam.max(axis=(2, 3)) <= 1e-7 * max(1.0, float(gradcam.max()))
    assert np.array_equal(zero_ours, zero_theirs)
    assert zero_ours.mean() < 0.5, "most maps empty: the comparison would prove little"
    # Up to the positive constant h*w: Grad-CAM's weights are W_c / (h*w).
    np.testing.assert_allclose(cam / (4 * 4), gradcam, rtol=1e-3, atol=1e-4 * float(gradcam.max()))


@pytest.mark.slow
def test_onnx_cam_equals_pytorch_grad_cam_for_every_label(
    trained_checkpoint: Path, onnx_model_path: Path, fundus_images: np.ndarray
) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, card, _ = load_checkpoint(trained_checkpoint)
    images = fundus_images[:1]
    session = ort.InferenceSession(str(onnx_model_path), providers=["CPUExecutionProvider"])
    (cam,) = session.run(["cam"], {"image": images})
    x = CamModel(model, card).normalise(torch.from_numpy(images))
    # timm's bn2 is BatchNorm + SiLU: its output is forward_features(x), the tensor that feeds the pool.
    with torch.no_grad():
        assert torch.equal(
            model.bn2(model.conv_head(model.blocks(model.bn1(model.conv_stem(x))))), model.forward_features(x)
        )

    labels = list(range(card.num_labels))
    with GradCAM(model=model, target_layers=[model.bn2]) as library:
        for n in range(len(images)):
            # One backward pass for all labels: the image repeated, one target per copy.
            theirs = library(
                input_tensor=x[n : n + 1].repeat(len(labels), 1, 1, 1),
                targets=[ClassifierOutputTarget(label) for label in labels],
            )
            for label in labels:
                single = cam[n, label]
                if single.max() == 0:
                    assert theirs[label].max() < 1e-3, f"image {n}, label {label}: library map not empty"
                    continue
                # The library min-max normalises each map, resizes it to the input with cv2, and
                # min-max normalises again (bilinear upsampling never lands exactly on a peak).
                ours = _minmax(cv2.resize(_minmax(single).astype(np.float32), (128, 128)))
                assert np.abs(ours - theirs[label]).max() < 1e-3, f"image {n}, label {label}"


def test_only_an_average_pooled_linear_head_is_accepted() -> None:
    card = ModelCard(preprocessing=Preprocessing(input_size=64))
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0)
    assert classifier_weight(model).shape == (29, 1280)

    mismatched = create_model(card.with_updates(labels=["a", "b"], thresholds=[0.5, 0.5]))
    with pytest.raises(ValueError, match="2 outputs but the card names 29 labels"):
        CamModel(mismatched, card)

    model.classifier = nn.Sequential(nn.Linear(1280, 64), nn.ReLU(), nn.Linear(64, 29))
    with pytest.raises(ValueError, match=r"expected one nn\.Linear"):
        CamModel(model, card)

    pooled_max = create_model(card)
    pooled_max.global_pool.pool_type = "max"
    with pytest.raises(ValueError, match="'max'"):
        CamModel(pooled_max, card)


def test_output_stride_16_gives_a_14x14_cam_at_224_px_that_is_still_exactly_grad_cam(tmp_path: Path) -> None:
    card = ModelCard(preprocessing=Preprocessing(input_size=224), output_stride=16)
    model = random_model(card)
    stride_32 = create_model(card.with_updates(output_stride=32), drop_rate=0.0, drop_path_rate=0.0)
    assert model.state_dict().keys() == stride_32.state_dict().keys()  # the same weights, dilated
    export_model(model, card, tmp_path / "s16.onnx")
    rng = np.random.default_rng(2)
    photographs = [prepare(render_fundus(rng, 320, 240, ["DR"]).image, card.preprocessing) for _ in range(2)]
    images = np.concatenate([np.stack(photographs), rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)])

    session = ort.InferenceSession(str(tmp_path / "s16.onnx"), providers=["CPUExecutionProvider"])
    (cam,) = session.run(["cam"], {"image": images})
    gradcam, _ = _autograd_gradcam(model, CamModel(model, card).normalise(torch.from_numpy(images)))

    assert cam.shape == gradcam.shape == (3, 29, 14, 14)
    assert (cam.max(axis=(2, 3)) > 0).mean() > 0.5, "most maps empty: the comparison would prove little"
    np.testing.assert_allclose(cam / (14 * 14), gradcam, rtol=1e-3, atol=1e-4 * float(gradcam.max()))


def test_outputs_are_the_three_maps_and_scores_then_ood_score_when_the_card_has_statistics() -> None:
    card = ModelCard()

    assert output_names(card) == ("logits", "probabilities", "cam")
    statistics = {
        "features": 2, "rank": 1, "mean": [0, 0], "components": [[1, 0]], "variances": [1], "residual_variance": 1,
        "threshold": 3,
    }  # fmt: skip
    assert output_names(card.with_updates(ood=statistics)) == ("logits", "probabilities", "cam", "ood_score")


@pytest.mark.parametrize(("alignment", "cells"), [("input", 4), ("receptive_field", 5)])
def test_a_rot180_card_serves_both_views_averaged_and_its_cam_is_still_exactly_grad_cam(
    tmp_path: Path, alignment: str, cells: int
) -> None:
    card = ModelCard(preprocessing=Preprocessing(input_size=128), tta="rot180", cam_alignment=alignment)
    model = random_model(card)
    served = CamModel(model, card)
    assert isinstance(served.model, TurnAveraged)
    export_model(model, card, tmp_path / "rot180.onnx")
    rng = np.random.default_rng(4)
    photographs = [prepare(render_fundus(rng, 320, 240, ["MH"]).image, card.preprocessing) for _ in range(2)]
    images = np.concatenate([np.stack(photographs), rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)])
    turned = np.ascontiguousarray(images[:, ::-1, ::-1])

    session = ort.InferenceSession(str(tmp_path / "rot180.onnx"), providers=["CPUExecutionProvider"])
    logits, cam = session.run(["logits", "cam"], {"image": np.concatenate([images, turned])})
    x = served.normalise(torch.from_numpy(images))
    gradcam, _ = _autograd_gradcam(served.model, x)
    with torch.no_grad():
        one_view = (model(x) + model(x.flip(2, 3))) / 2

    np.testing.assert_allclose(logits[:3], one_view.numpy(), rtol=1e-4, atol=1e-4)
    assert (cam.max(axis=(2, 3)) > 0).mean() > 0.25, "maps mostly empty: the comparison would prove little"
    assert cam.shape[2:] == (cells, cells)
    # What serving checks before it takes a model: the CAM's height and width fixed in the graph.
    assert [o.shape for o in session.get_outputs() if o.name == "cam"] == [["batch", card.num_labels, cells, cells]]
    assert inspect_model(tmp_path / "rot180.onnx")[1] == read_card(tmp_path / "rot180.onnx")
    np.testing.assert_allclose(cam[:3] / cells**2, gradcam, rtol=1e-3, atol=1e-4 * float(gradcam.max()))
    # Turning the photograph turns its map, exactly: the served model has no preferred way up.
    np.testing.assert_allclose(cam[3:], cam[:3, :, ::-1, ::-1], rtol=1e-4, atol=1e-4 * float(cam.max()))
