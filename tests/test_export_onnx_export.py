"""ONNX export: a valid graph with the served interface, the card inside, and ONNX Runtime = PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from numpy.typing import NDArray

from export.graph import CamModel
from export.onnx_export import compare_with_torch, embed_card, export_checkpoint, export_model, read_card, save_model
from retinagate.card import CARD_METADATA_KEY
from train.datasets import find_rfmid_splits, read_image
from train.model import load_checkpoint, state_dict_sha256


def _fundus(synth_dataset: Path, count: int) -> NDArray[np.uint8]:
    from retinagate.card import Preprocessing
    from retinagate.preprocess import prepare

    paths = find_rfmid_splits(synth_dataset)["val"].paths[:count]
    return np.stack([prepare(read_image(p), Preprocessing(input_size=128)) for p in paths])


def _noise(count: int, seed: int = 0) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 128, 128, 3), dtype=np.uint8)


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
    random_checkpoint: Path, random_onnx_model_path: Path, onnx_model_path: Path
) -> None:
    model, card, _ = load_checkpoint(random_checkpoint)
    cam_model = CamModel(model, card)
    images = _noise(3)

    same = compare_with_torch(random_onnx_model_path, cam_model, images)
    other = compare_with_torch(onnx_model_path, cam_model, images)

    assert same.within(1e-4) and same.images == 3
    assert not other.within(1e-4)
    assert other.logits > 1e-2


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
