"""The ONNX Runtime engine: loading, identity, provider choice, input checks and batched prediction."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from retinagate.card import CARD_METADATA_KEY, ModelCard
from retinagate.engine import (
    PROVIDERS,
    Engine,
    ModelFileError,
    ProviderError,
    device_uid,
    file_sha256,
    provider_plans,
)
from retinagate.settings import Settings

SIZE = 128  # the random_onnx_model_path fixture's input size


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, SIZE, SIZE, 3), dtype=np.uint8)


def _with_metadata(source: Path, out: Path, card_json: str | None) -> Path:
    model = onnx.load(str(source))
    kept = [p for p in model.metadata_props if p.key != CARD_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if card_json is not None:
        model.metadata_props.append(onnx.StringStringEntryProto(key=CARD_METADATA_KEY, value=card_json))
    onnx.save(model, str(out))
    return out


def test_engine_reports_card_file_hash_and_a_device_uid_derived_from_it(random_onnx_model_path: Path) -> None:
    engine = Engine(random_onnx_model_path, providers="cpu")

    assert engine.sha256 == hashlib.sha256(random_onnx_model_path.read_bytes()).hexdigest()
    assert engine.sha256 == file_sha256(random_onnx_model_path)
    assert engine.card.name == "retinagate-random"
    assert engine.card.precision == "fp32"
    assert engine.input_size == SIZE
    assert engine.cam_size == (4, 4)
    assert engine.providers == ["CPUExecutionProvider"]
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", engine.device_uid)
    assert len(engine.device_uid) <= 64
    assert engine.device_uid == Engine(random_onnx_model_path).device_uid == device_uid(engine.sha256)
    assert device_uid("0" * 64) != engine.device_uid


def test_predict_returns_probabilities_and_raw_cams_matching_one_plain_session_run(
    random_onnx_model_path: Path,
) -> None:
    engine = Engine(random_onnx_model_path, providers="cpu", batch_size=2)
    images = _images(5)

    probabilities, cams = engine.predict(images)

    session = ort.InferenceSession(str(random_onnx_model_path), providers=["CPUExecutionProvider"])
    logits, expected_probabilities, expected_cams = session.run(["logits", "probabilities", "cam"], {"image": images})
    assert probabilities.dtype == np.float32 and cams.dtype == np.float32
    assert probabilities.shape == (5, 29) and cams.shape == (5, 29, 4, 4)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-6)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), atol=1e-6)
    np.testing.assert_allclose(cams, expected_cams, rtol=1e-5, atol=1e-6)
    assert cams.min() >= 0.0 and cams.max() > 0.0  # ReLU'd, not normalised


def test_predict_of_an_empty_batch_is_empty(random_onnx_model_path: Path) -> None:
    probabilities, cams = Engine(random_onnx_model_path).predict(np.zeros((0, SIZE, SIZE, 3), np.uint8))

    assert probabilities.shape == (0, 29)
    assert cams.shape == (0, 29, 4, 4)


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, SIZE, SIZE, 3), dtype=np.float32),
        np.zeros((2, 64, 64, 3), dtype=np.uint8),
        np.zeros((2, 3, SIZE, SIZE), dtype=np.uint8),
        np.zeros((SIZE, SIZE, 3), dtype=np.uint8),
    ],
    ids=["float32", "wrong-size", "nchw", "no-batch-axis"],
)
def test_predict_refuses_arrays_that_are_not_uint8_nhwc_of_the_card_size(
    random_onnx_model_path: Path, images: np.ndarray
) -> None:
    engine = Engine(random_onnx_model_path)

    with pytest.raises(ValueError, match=re.escape(f"expected uint8 [N, {SIZE}, {SIZE}, 3]")):
        engine.predict(images)


def test_predict_refuses_something_that_is_not_an_array(random_onnx_model_path: Path) -> None:
    with pytest.raises(TypeError, match="numpy array"):
        Engine(random_onnx_model_path).predict([[0, 1, 2]])  # type: ignore[arg-type]


@pytest.mark.parametrize("choice", ["cuda", "tensorrt"])
def test_a_named_provider_that_this_build_lacks_is_an_error_naming_what_is_available(
    random_onnx_model_path: Path, choice: str
) -> None:
    if PROVIDERS[choice] in ort.get_available_providers():
        pytest.skip(f"{PROVIDERS[choice]} is installed here")

    with pytest.raises(ProviderError, match=r"available: .*CPUExecutionProvider") as error:
        Engine(random_onnx_model_path, providers=choice)  # type: ignore[arg-type]

    assert PROVIDERS[choice] in str(error.value)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_a_named_provider_that_does_not_start_is_an_error_not_a_silent_cpu_fallback(
    random_onnx_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Below the unit's boundary: this build claims CUDA, as onnxruntime-gpu does on a machine without
    # a usable GPU; ONNX Runtime then starts the session on the CPU only.
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)

    with pytest.raises(ProviderError, match="CUDAExecutionProvider: not active"):
        Engine(random_onnx_model_path, providers="cuda")
    assert Engine(random_onnx_model_path, providers="auto").providers == ["CPUExecutionProvider"]


def test_auto_tries_tensorrt_then_cuda_then_cpu_with_caches_and_fixed_shapes(tmp_path: Path) -> None:
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    plans = provider_plans("auto", every, input_size=224, batch_size=16, cache_dir=tmp_path)

    assert [p.names for p in plans] == [every, every[1:], every[2:]]
    trt = plans[0].providers[0][1]
    assert plans[0].from_path and not plans[1].from_path
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_timing_cache_enable"] and trt["trt_timing_cache_path"] == str(tmp_path)
    assert trt["trt_profile_min_shapes"] == "image:1x224x224x3"
    assert trt["trt_profile_max_shapes"] == "image:16x224x224x3"
    assert plans[1].providers[0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert [p.names for p in provider_plans("auto", every[2:], input_size=224, batch_size=16)] == [every[2:]]
    assert [p.names for p in provider_plans("cuda", every, input_size=224, batch_size=16)] == [every[1:]]


def test_infer_gives_the_ood_score_of_a_graph_that_has_one_and_none_otherwise(
    random_onnx_model_path: Path, ood_model_variant: Callable[..., Path]
) -> None:
    images = _images(3)
    plain = Engine(random_onnx_model_path, providers="cpu")
    with_ood = Engine(
        ood_model_variant(random_onnx_model_path, threshold=2.5, scale=0.01), providers="cpu", batch_size=2
    )

    without = plain.infer(images)
    scored = with_ood.infer(images)

    assert not plain.has_ood_score and plain.ood_threshold is None and without.ood_scores is None
    assert with_ood.has_ood_score and with_ood.ood_threshold == 2.5 and with_ood.describe()["ood_score"] is True
    assert scored.ood_scores is not None and scored.ood_scores.dtype == np.float32
    np.testing.assert_allclose(scored.ood_scores, images.reshape(3, -1).mean(axis=1) * 0.01, rtol=1e-5)
    np.testing.assert_allclose(scored.probabilities, without.probabilities, atol=1e-6)
    np.testing.assert_allclose(with_ood.predict(images)[1], without.cams, rtol=1e-5, atol=1e-6)


def test_an_ood_score_without_statistics_in_the_card_or_statistics_without_the_output_is_refused(
    random_onnx_model_path: Path, ood_model_variant: Callable[..., Path], tmp_path: Path
) -> None:
    ood_path = ood_model_variant(random_onnx_model_path)
    plain_card = Engine(random_onnx_model_path).card
    ood_card = Engine(ood_path).card
    no_statistics = _with_metadata(ood_path, tmp_path / "no-statistics.onnx", plain_card.to_json())
    no_output = _with_metadata(random_onnx_model_path, tmp_path / "no-output.onnx", ood_card.to_json())

    with pytest.raises(ModelFileError, match="'ood_score' output but the card has no 'ood' statistics"):
        Engine(no_statistics)
    with pytest.raises(ModelFileError, match="the graph has no 'ood_score' output"):
        Engine(no_output)


def test_a_file_without_a_card_is_refused_with_a_hint(random_onnx_model_path: Path, tmp_path: Path) -> None:
    bare = _with_metadata(random_onnx_model_path, tmp_path / "bare.onnx", None)

    with pytest.raises(ModelFileError, match=r"no model card .*retinagate export"):
        Engine(bare)


def test_an_invalid_card_is_refused_naming_the_field(random_onnx_model_path: Path, tmp_path: Path) -> None:
    bad = _with_metadata(random_onnx_model_path, tmp_path / "bad.onnx", '{"thresholds": [0.5]}')

    with pytest.raises(ModelFileError, match="thresholds"):
        Engine(bad)


def test_a_card_that_disagrees_with_the_graph_is_refused(random_onnx_model_path: Path, tmp_path: Path) -> None:
    card = ModelCard().with_updates(preprocessing={"input_size": 224})
    wrong = _with_metadata(random_onnx_model_path, tmp_path / "wrong.onnx", card.to_json())

    with pytest.raises(ModelFileError, match=r"the card needs \[N, 224, 224, 3\]"):
        Engine(wrong)


def test_a_file_that_is_not_onnx_or_missing_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not a model")

    with pytest.raises(ModelFileError, match="not a loadable ONNX model"):
        Engine(garbage)
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Engine(tmp_path / "absent.onnx")


def test_a_pytorch_checkpoint_given_as_the_model_says_to_export_it(random_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"a PyTorch checkpoint.*retinagate export --checkpoint"):
        Engine(random_checkpoint)
    renamed = tmp_path / "model.onnx"  # torch.save's zip archive, whatever its name says
    renamed.write_bytes(random_checkpoint.read_bytes())
    with pytest.raises(ModelFileError, match=r"a PyTorch checkpoint.*retinagate export"):
        Engine(renamed)
    garbage = tmp_path / "best.pt"  # named as a checkpoint: the protobuf error gets the hint too
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"not a loadable ONNX model .*retinagate export"):
        Engine(garbage)


def test_load_takes_model_path_threads_batch_size_and_provider_from_settings(
    random_onnx_model_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(model_path=random_onnx_model_path, providers="cpu", batch_size=3, intra_op_threads=1)

    engine = Engine.load(None, settings)

    assert engine.path == random_onnx_model_path
    assert engine.batch_size == 3
    assert engine.providers == ["CPUExecutionProvider"]
    assert engine.describe()["sha256"] == engine.sha256
    with pytest.raises(ValueError, match="model_path"):
        Engine.load(None, make_settings())


def test_constructor_arguments_are_checked(random_onnx_model_path: Path) -> None:
    with pytest.raises(ValueError, match="providers"):
        Engine(random_onnx_model_path, providers="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        Engine(random_onnx_model_path, batch_size=0)
    with pytest.raises(ValueError, match="intra_op_threads"):
        Engine(random_onnx_model_path, intra_op_threads=-1)


def test_warmup_runs_the_model_and_the_optimised_graph_can_be_saved(
    random_onnx_model_path: Path, tmp_path: Path
) -> None:
    optimised = tmp_path / "optimised.onnx"
    engine = Engine(random_onnx_model_path, optimized_model_path=optimised)

    assert engine.warmup(runs=2) > 0.0
    assert optimised.stat().st_size > 1_000_000


def test_device_uid_needs_a_sha256() -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        device_uid("abc")


def test_the_engine_module_does_not_import_torch() -> None:
    code = "import retinagate.engine, sys; assert 'torch' not in sys.modules, 'torch imported'"

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stderr
