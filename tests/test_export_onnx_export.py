"""ONNX export: a valid graph with the served interface, the card inside, and ONNX Runtime = PyTorch.

The parity checks run on checkpoints that were genuinely trained (a few steps at a strong learning
rate, so that weights and batch-norm statistics lie far from their initial values and the network
amplifies rounding as trained ones do), at several input sizes and both output strides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from numpy.typing import NDArray
from torch import nn

from export.graph import CamModel
from export.onnx_export import (
    compare_with_torch,
    embed_card,
    export_checkpoint,
    export_model,
    parity_tolerance,
    read_card,
    save_model,
)
from retinagate.card import CARD_METADATA_KEY, ModelCard, OodStatistics, Preprocessing
from retinagate.preprocess import prepare
from retinagate.synth import render_fundus
from train.augment import Normalizer
from train.datasets import find_rfmid_splits, read_image
from train.model import CHECKPOINT_FORMAT, create_model, load_checkpoint, random_model, state_dict_sha256
from train.ood import fit_ood_statistics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fundus(synth_dataset: Path, count: int) -> NDArray[np.uint8]:
    from retinagate.card import Preprocessing
    from retinagate.preprocess import prepare

    paths = find_rfmid_splits(synth_dataset)["val"].paths[:count]
    return np.stack([prepare(read_image(p), Preprocessing(input_size=128)) for p in paths])


def _noise(count: int, seed: int = 0, size: int = 128) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def _both(onnx_path: Path, checkpoint: Path, images: NDArray[np.uint8]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ours = session.run(["logits", "probabilities", "cam"], {"image": images})
    model, card, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        theirs = [t.numpy() for t in CamModel(model, card)(torch.from_numpy(images))]
    return ours, theirs


def test_export_is_a_checked_graph_with_uint8_nhwc_input_and_dynamic_batch(random_onnx_model_path: Path) -> None:
    model = onnx.load(str(random_onnx_model_path))

    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (image,) = model.graph.input
    assert image.name == "image"
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [128, 128, 3]
    outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(outputs) == ["logits", "probabilities", "cam"]
    assert all(t.elem_type == onnx.TensorProto.FLOAT for t in outputs.values())
    assert [d.dim_value for d in outputs["cam"].shape.dim[1:]] == [29, 4, 4]
    assert all(t.shape.dim[0].dim_param == "batch" for t in outputs.values())


def test_onnx_runtime_matches_pytorch_within_1e4_on_random_inputs(
    random_checkpoint: Path, random_onnx_model_path: Path
) -> None:
    ours, theirs = _both(random_onnx_model_path, random_checkpoint, _noise(4))

    assert np.abs(theirs[0]).max() > 0.05, "logits too small for the comparison to mean anything"
    assert np.abs(ours[0] - theirs[0]).max() < 1e-4
    assert np.abs(ours[1] - theirs[1]).max() < 1e-5
    assert np.abs(ours[2] - theirs[2]).max() < 1e-4 * max(1.0, float(np.abs(theirs[2]).max()))


def test_onnx_runtime_matches_pytorch_within_1e4_on_synthetic_fundus_photographs(
    trained_checkpoint: Path, onnx_model_path: Path, synth_dataset: Path
) -> None:
    ours, theirs = _both(onnx_model_path, trained_checkpoint, _fundus(synth_dataset, 6))

    assert np.abs(theirs[0]).max() > 1.0
    assert np.abs(ours[0] - theirs[0]).max() < 1e-4
    assert np.abs(ours[1] - theirs[1]).max() < 1e-5
    assert np.abs(ours[2] - theirs[2]).max() < 1e-4 * max(1.0, float(np.abs(theirs[2]).max()))


def test_batch_size_does_not_change_the_results(random_onnx_model_path: Path) -> None:
    session = ort.InferenceSession(str(random_onnx_model_path), providers=["CPUExecutionProvider"])
    images = _noise(5, seed=3)

    together = session.run(["logits"], {"image": images})[0]
    one_by_one = np.concatenate([session.run(["logits"], {"image": images[i : i + 1]})[0] for i in range(5)])

    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-5)


def test_the_model_card_round_trips_through_the_onnx_metadata(trained_checkpoint: Path, onnx_model_path: Path) -> None:
    model, trained_card, _ = load_checkpoint(trained_checkpoint)

    card = read_card(onnx_model_path)

    assert card.labels == trained_card.labels
    assert card.thresholds == trained_card.thresholds
    assert card.preprocessing == trained_card.preprocessing
    assert (card.name, card.version) == (trained_card.name, trained_card.version)
    assert card.metrics == trained_card.metrics
    assert card.precision == "fp32"
    assert card.cam_layer == "forward_features"
    assert card.weights_sha256 == state_dict_sha256(model.state_dict())
    assert {"torch", "onnx", "onnxruntime", "exporter"} <= set(card.software)
    proto = onnx.load(str(onnx_model_path), load_external_data=False)
    assert proto.producer_name == "retinagate-export"
    assert [p.key for p in proto.metadata_props].count(CARD_METADATA_KEY) == 1
    session = ort.InferenceSession(str(onnx_model_path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map[CARD_METADATA_KEY] == card.to_json()


def test_embedding_a_card_again_replaces_the_old_one(random_onnx_model_path: Path) -> None:
    proto = onnx.load(str(random_onnx_model_path))
    card = read_card(random_onnx_model_path).with_updates(version="2.3.4")

    embed_card(proto, card)

    entries = [p for p in proto.metadata_props if p.key == CARD_METADATA_KEY]
    assert len(entries) == 1 and '"version": "2.3.4"' in entries[0].value
    assert proto.model_version == 2_003_004


def test_comparison_with_pytorch_tells_a_matching_export_from_a_different_model(
    random_checkpoint: Path, random_onnx_model_path: Path, tmp_path: Path
) -> None:
    model, card, _ = load_checkpoint(random_checkpoint)
    cam_model = CamModel(model, card)
    images = _noise(3)
    export_model(random_model(card, seed=1), card, tmp_path / "other.onnx")

    same = compare_with_torch(random_onnx_model_path, cam_model, images)
    different = compare_with_torch(tmp_path / "other.onnx", cam_model, images)

    assert same.within() and same.images == 3 and same.ood_score is None
    assert same.tolerance == pytest.approx(parity_tolerance(model)) and 1e-4 < same.tolerance < 2e-4
    assert not different.within()
    assert different.logits_relative > 1e-2


def test_export_rejects_an_opset_older_than_17_or_an_unknown_exporter(random_checkpoint: Path, tmp_path: Path) -> None:
    model, card, _ = load_checkpoint(random_checkpoint)

    with pytest.raises(ValueError, match="opset: 16"):
        export_model(model, card, tmp_path / "m.onnx", opset=16)
    with pytest.raises(ValueError, match="exporter"):
        export_model(model, card, tmp_path / "m.onnx", exporter="jit")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_graph_is_not_written(tmp_path: Path) -> None:
    node = onnx.helper.make_node("Relu", ["missing"], ["y"])
    output = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    broken = onnx.helper.make_model(onnx.helper.make_graph([node], "broken", [], [output]))

    with pytest.raises(onnx.checker.ValidationError):
        save_model(broken, tmp_path / "broken.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_dynamo_exporter_gives_the_same_model(
    random_checkpoint: Path, random_onnx_model_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dynamo.onnx"

    exported = export_checkpoint(random_checkpoint, out, exporter="dynamo")

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert exported.card.software["exporter"] == "dynamo"
    images = _noise(3, seed=7)
    dynamo = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    torchscript = ort.InferenceSession(str(random_onnx_model_path), providers=["CPUExecutionProvider"])
    for ours, theirs in zip(dynamo.run(None, {"image": images}), torchscript.run(None, {"image": images}), strict=True):
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, float(np.abs(theirs).max()))


# Genuinely trained checkpoints: the old check (ONNX Runtime against PyTorch float32, 1e-4 of the
# largest logit) failed on such models; the bound derived from float32 rounding must let them pass.


def _photographs(count: int, size: int, seed: int) -> NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    columns = ("DR", "ARMD", "MH", "ODC")
    preprocessing = Preprocessing(input_size=size)
    return np.stack(
        [prepare(render_fundus(rng, 192, 144, [columns[i % 4]]).image, preprocessing) for i in range(count)]
    )


def _trained_checkpoint(
    path: Path, size: int, stride: Literal[16, 32], recipe: str, seed: int = 0, contrast: float = 0.0
) -> Path:
    """Trains EfficientNet-B0 for a few steps at 64 px and saves it with a card for ``size`` px.

    ``sgd``: ten steps of SGD at learning rate 0.3; ``adamw``: twenty steps of AdamW at 5e-3. Batch
    norm keeps the last batch's statistics (momentum 1), so that they too lie far from initialisation.
    """
    card = ModelCard(
        name=f"trained-{size}-s{stride}",
        version="0.0.1",
        preprocessing=Preprocessing(input_size=size, contrast_sigma=contrast),
        output_stride=stride,
    )
    torch.manual_seed(seed)
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 1.0
    x = Normalizer(card.preprocessing)(torch.from_numpy(_photographs(8, 64, seed)).permute(0, 3, 1, 2))
    y = (torch.rand(8, card.num_labels, generator=torch.Generator().manual_seed(seed)) < 0.3).float()
    optimiser: torch.optim.Optimizer
    if recipe == "sgd":
        optimiser, steps = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), 10
    else:
        optimiser, steps = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0), 20
    model.train()
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    config = {"img_size": size, "output_stride": stride, "contrast_sigma": contrast}
    torch.save(
        {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "card": card.to_json(), "config": config}, path
    )
    return path


@pytest.mark.parametrize(
    ("size", "stride", "recipe", "contrast"),
    [(224, 16, "sgd", 0.0), (288, 32, "adamw", 0.04), (384, 32, "sgd", 0.0)],
    ids=str,
)
def test_trained_checkpoints_export_within_float32_rounding_of_pytorch_in_float64(
    size: int, stride: Literal[16, 32], recipe: str, contrast: float, tmp_path: Path
) -> None:
    """Local contrast normalisation (in the graph, before the classifier) is exported and checked too."""
    checkpoint = _trained_checkpoint(tmp_path / "best.pt", size, stride, recipe, contrast=contrast)
    images = np.concatenate([_noise(2, seed=5, size=size), _photographs(2, size, seed=6)])

    exported = export_checkpoint(checkpoint, tmp_path / "model.onnx")
    agreement = compare_with_torch(tmp_path / "model.onnx", exported.cam_model, images)

    model, card, _ = load_checkpoint(checkpoint)
    assert card.output_stride == stride and exported.card.output_stride == stride
    assert exported.card.preprocessing.contrast_sigma == contrast
    # Far from initialisation (running variances start at 1), and logits of ordinary photographs are large.
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert np.mean([float(m.running_var.log().abs().mean()) for m in batch_norms]) > 0.3
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, cam = session.run(["logits", "cam"], {"image": images})
    assert np.abs(logits[2:]).max() > 5.0
    assert cam.shape == (4, 29, size // stride, size // stride)
    assert agreement.within(), agreement
    assert 0 < agreement.pytorch_relative <= agreement.tolerance


def test_a_card_from_before_output_stride_and_ood_exports_the_three_output_stride_32_graph(
    random_checkpoint: Path, tmp_path: Path
) -> None:
    model, card, _ = load_checkpoint(random_checkpoint)
    old = json.loads(card.to_json())
    del old["output_stride"], old["ood"]
    old_card = ModelCard.from_json(json.dumps(old))

    export_model(model, old_card, tmp_path / "old.onnx")

    outputs = {o.name: o for o in onnx.load(str(tmp_path / "old.onnx")).graph.output}
    assert list(outputs) == ["logits", "probabilities", "cam"]
    assert [d.dim_value for d in outputs["cam"].type.tensor_type.shape.dim[1:]] == [29, 4, 4]
    assert read_card(tmp_path / "old.onnx").ood is None


@pytest.fixture(scope="module")
def ood_export(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CamModel]:
    """The random checkpoint exported with OOD statistics fitted on 24 + 12 synthetic photographs."""
    model, card, _ = load_checkpoint(random_checkpoint)
    statistics = fit_ood_statistics(model, card, _photographs(24, 128, seed=1), _photographs(12, 128, seed=2))
    out = tmp_path_factory.mktemp("ood") / "model.onnx"
    written = export_model(model, card.with_updates(ood=statistics.model_dump(mode="json")), out)
    return out, CamModel(model, written).eval()


def test_the_exported_ood_score_is_the_numpy_formula_on_the_card_statistics(
    ood_export: tuple[Path, CamModel],
) -> None:
    path, cam_model = ood_export
    images = np.concatenate([_photographs(3, 128, seed=3), _noise(2, seed=4)])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities", "cam", "ood_score"]
    (scores,) = session.run(["ood_score"], {"image": images})

    statistics = read_card(path).ood
    assert statistics is not None and statistics == cam_model.card.ood
    with torch.no_grad():
        pooled = cam_model.double().features(torch.from_numpy(images)).mean(dim=(2, 3)).numpy()
    cam_model.float()
    centred = pooled - np.asarray(statistics.mean)
    components = np.asarray(statistics.components)
    z = centred @ components.T
    residual = centred - z @ components
    d2 = (z**2 / np.asarray(statistics.variances)).sum(axis=1) + (residual**2).sum(
        axis=1
    ) / statistics.residual_variance
    assert scores.shape == (5,) and scores.dtype == np.float32
    # Whitening magnifies the float32 rounding of the features by their magnitude over their spread
    # (compare_with_torch bounds that properly); a wrong formula would be off by far more than 1e-3.
    np.testing.assert_allclose(scores, np.sqrt(d2 / statistics.features), rtol=1e-3)
    assert (scores[3:] > statistics.threshold).all()  # noise lies far from fundus photographs


def test_the_ood_score_is_checked_against_pytorch_too(ood_export: tuple[Path, CamModel]) -> None:
    path, cam_model = ood_export

    agreement = compare_with_torch(path, cam_model, np.concatenate([_photographs(2, 128, seed=3), _noise(2)]))

    assert agreement.within()
    assert agreement.ood_score is not None and agreement.ood_relative is not None
    assert agreement.ood_relative <= agreement.tolerance


def test_statistics_for_a_different_feature_width_are_refused(random_checkpoint: Path) -> None:
    model, card, _ = load_checkpoint(random_checkpoint)
    statistics = OodStatistics(
        features=8, rank=1, mean=(0.0,) * 8, components=((1.0,) + (0.0,) * 7,), variances=(1.0,),
        residual_variance=1.0, threshold=2.0,
    )  # fmt: skip

    with pytest.raises(
        ValueError, match=r"ood\.features: the statistics describe 8 features but the classifier reads 1280"
    ):
        CamModel(model, card.with_updates(ood=statistics.model_dump(mode="json")))


def test_comparison_with_pytorch_catches_a_normalisation_off_by_half_a_grey_level(tmp_path: Path) -> None:
    model, card, _ = load_checkpoint(_trained_checkpoint(tmp_path / "best.pt", 96, 32, "adamw"))
    mean = card.preprocessing.mean
    shifted = {**card.preprocessing.model_dump(), "mean": (mean[0] + 0.5 / 255, *mean[1:])}
    export_model(model, card.with_updates(preprocessing=shifted), tmp_path / "shifted.onnx")

    agreement = compare_with_torch(tmp_path / "shifted.onnx", CamModel(model, card), _photographs(2, 96, seed=7))

    assert not agreement.within()
    assert agreement.worst_relative > 10 * agreement.tolerance
