"""``retinagate export``: the file it writes is what the engine serves; it reports checks and variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retinagate.cli import main
from retinagate.engine import Engine


def test_export_writes_a_model_the_engine_loads_and_reports_the_pytorch_check(
    random_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "model.onnx"

    assert main(["export", "--checkpoint", str(random_checkpoint), "--out", str(out)]) == 0

    text = capsys.readouterr().out
    engine = Engine(out, providers="cpu")
    assert engine.card.name == "retinagate-random" and engine.card.precision == "fp32"
    assert engine.sha256[:16] in text
    assert "vs PyTorch on" in text and "validation: none" in text
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
    assert fp32["vs_pytorch"]["logits_max_abs_diff"] < 1e-4
    assert fp32["vs_pytorch"]["images"] >= 4
    assert summary["model"] == {"name": "retinagate-random", "version": "0.0.1", "input_size": 128, "labels": 29}
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
