"""``retinagate export``: the file it writes is what the engine serves; it reports checks and variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from retinagate.card import ModelCard, Preprocessing
from retinagate.cli import main
from retinagate.engine import Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_export_writes_a_model_the_engine_loads_and_reports_the_pytorch_check(
    random_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "model.onnx"

    assert main(["export", "--checkpoint", str(random_checkpoint), "--out", str(out)]) == 0

    text = capsys.readouterr().out
    engine = Engine(out, providers="cpu")
    assert engine.card.name == "retinagate-random" and engine.card.precision == "fp32"
    assert engine.sha256[:16] in text
    assert "vs PyTorch (float64) on" in text and "validation: none" in text
    assert "ood_score: none: the checkpoint's training config names no training data" in text
    assert engine.predict(np.zeros((1, 128, 128, 3), np.uint8))[0].shape == (1, 29)
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no temporary files left


def test_json_summary_names_the_file_its_hash_and_the_agreement_with_pytorch(
    random_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.onnx"

    assert main(["export", "--checkpoint", str(random_checkpoint), "--out", str(out), "--json"]) == 0

    summary = json.loads(capsys.readouterr().out)
    (fp32,) = summary["variants"]
    assert fp32["path"] == str(out) and fp32["sha256"] == Engine(out).sha256
    check = fp32["vs_pytorch"]
    assert check["reference"] == "pytorch float64" and check["images"] >= 4
    assert check["logits_max_abs_diff"] < 1e-4
    assert max(check["logits_max_relative_diff"], check["cam_max_relative_diff"]) <= check["tolerance"] < 1e-3
    assert check["ood_score_max_abs_diff"] is None and summary["ood"] is None
    assert summary["model"] == {
        "name": "retinagate-random",
        "version": "0.0.1",
        "input_size": 128,
        "labels": 29,
        "output_stride": 32,
        "tta": "none",
        "cam_alignment": "input",
        "localisation": "labels",
    }
    assert summary["validation"] is None and fp32["auroc"] is None


def test_int8_without_calibration_photographs_is_a_usage_error(
    random_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", "--checkpoint", str(random_checkpoint), "--out", str(tmp_path / "m.onnx"), "--int8"])

    assert code == 2
    assert "--int8 needs --calibration" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_a_missing_checkpoint_exits_3_and_a_file_that_is_not_one_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--checkpoint", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "m.onnx")]) == 3
    assert "no such file" in capsys.readouterr().err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    assert main(["export", "--checkpoint", str(garbage), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_variants_report_auroc_change_on_the_training_validation_split_and_cpu_speedup(
    trained_checkpoint: Path, synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.onnx"
    args = ["export", "--checkpoint", str(trained_checkpoint), "--out", str(out), "--fp16", "--int8"]
    args += ["--calibration", str(synth_dataset / "Test"), "--calibration-count", "16", "--int8-target-db", "0"]
    args += ["--validation-limit", "48"]

    assert main([*args, "--json"]) == 0

    summary = json.loads(capsys.readouterr().out)
    fp32, fp16, int8 = summary["variants"]
    # No --validation given: the split is found through the checkpoint's training config (48 of it used).
    assert summary["validation"]["images"] == 48
    assert fp32["auroc"] > 0.5
    assert abs(fp16["auroc_change"]) < 0.01
    assert fp16["probabilities_max_abs_diff_vs_fp32"] < 0.01
    assert int8["auroc_change"] is not None and int8["calibration_images"] == 16
    assert int8["cpu_speedup"] > 0 and int8["cpu_ms_per_image"]["int8"] > 0
    assert int8["int8_convolutions"] == "81/81"  # --int8-target-db 0: everything but the head
    for variant, precision in ((fp16, "fp16"), (int8, "int8")):
        engine = Engine(Path(variant["path"]))
        assert engine.card.precision == precision and engine.sha256 == variant["sha256"]
    assert Path(fp16["path"]).name == "model.fp16.onnx" and Path(int8["path"]).name == "model.int8.onnx"


def _checkpoint_naming_data(path: Path, data: Path) -> Path:
    """A random-weights checkpoint (64 px) whose training config names ``data``."""
    from train.model import CHECKPOINT_FORMAT, random_model

    card = ModelCard(name="retinagate-random", version="0.0.1", preprocessing=Preprocessing(input_size=64))
    config = {"data": str(data), "seed": 0, "out": str(path.parent / "run"), "img_size": 64}
    state = random_model(card).state_dict()
    torch.save({"format": CHECKPOINT_FORMAT, "model": state, "card": card.to_json(), "config": config}, path)
    return path


def _outputs(path: Path) -> list[str]:
    return [o.name for o in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()]


def test_export_fits_ood_statistics_on_the_training_data_the_checkpoint_names(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _checkpoint_naming_data(tmp_path / "best.pt", synth_dataset)
    out = tmp_path / "model.onnx"

    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--json"]) == 0

    summary = json.loads(capsys.readouterr().out)
    assert _outputs(out) == ["logits", "probabilities", "cam", "ood_score"]
    card = Engine(out).card
    assert card.ood is not None and summary["ood"]["threshold"] == card.ood.threshold > 0
    fitted = summary["ood"]["fitted_on"]
    assert (fitted["train_images"], fitted["val_images"]) == (144, 48)  # the synthetic dataset's splits
    assert fitted["val_above_threshold"] <= 0.02 and fitted["origin"].endswith("RFMiD_Training_Labels.csv")
    assert summary["ood_note"].startswith("fitted on 144 training photographs")
    # The same training photographs, decoded, fit the gradability gate's limits.
    assert card.gate is not None and card.gate.fitted_on["photographs"] == 144
    assert summary["gate"] == card.gate.model_dump(mode="json")
    assert summary["gate_note"].startswith("fitted to 144 training photographs")
    check = summary["variants"][0]["vs_pytorch"]
    assert check["ood_score_max_relative_diff"] is not None
    assert check["ood_score_max_relative_diff"] <= check["tolerance"]


def test_export_without_the_training_data_here_says_so_and_writes_the_three_output_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = _checkpoint_naming_data(tmp_path / "best.pt", tmp_path / "gone")
    out = tmp_path / "model.onnx"

    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--json"]) == 0

    summary = json.loads(capsys.readouterr().out)
    assert _outputs(out) == ["logits", "probabilities", "cam"]
    assert summary["ood"] is None and Engine(out).card.ood is None
    warnings = [r.getMessage() for r in caplog.records if "without ood_score" in r.getMessage()]
    assert warnings == [f"exporting without ood_score: {summary['ood_note']}"]
    assert "is not on this machine" in warnings[0] and str(tmp_path / "gone") in warnings[0]
    assert summary["gate"] is None and Engine(out).card.gate is None  # the gate keeps its defaults
    assert summary["gate_note"] == "defaults: the training photographs named by the checkpoint are not on this machine"


def test_no_ood_leaves_the_score_out_even_when_the_training_data_is_here(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _checkpoint_naming_data(tmp_path / "best.pt", synth_dataset)
    out = tmp_path / "model.onnx"

    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--no-ood"]) == 0

    assert "ood_score: off" in capsys.readouterr().out
    assert _outputs(out) == ["logits", "probabilities", "cam"]
