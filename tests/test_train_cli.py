"""``retinagate train`` and ``retinagate evaluate`` as a user runs them."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from retinagate.card import ModelCard
from retinagate.cli import EXIT_MISSING, EXIT_USAGE, main
from retinagate.labels import LABELS
from train.model import state_dict_sha256

PNG = b"\x89PNG\r\n\x1a\n"


def _train_args(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--epochs", "2",
        "--img-size", "48", "--batch-size", "16", "--no-pretrained", "--workers", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cli_run(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A two-epoch run made through the CLI; returns the run folder and the printed JSON."""
    root = tmp_path_factory.mktemp("cli-run")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setenv("RETINAGATE_DATA_DIR", str(root / "var"))
        extra = ("--json", "--aug-on", "device", "--aug", "strong", "--peak-loss", "0.5", "--peak-sharpness", "3",
                 "--early-share", "0.5", "--early-size", "32")  # fmt: skip
        code = main(_train_args(synth_dataset, root / "run", root / "cache", *extra))
    assert code == 0
    return root / "run", json.loads(stdout.getvalue())


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(cli_run: tuple[Path, dict[str, Any]]) -> None:
    run, summary = cli_run
    assert summary["finished"] and summary["epochs_run"] == 2
    assert 0.0 <= summary["validation"]["macro_auroc"] <= 1.0
    for name in ("curves.png", "roc_curves.png", "auroc_bars.png"):
        assert (run / name).read_bytes()[:8] == PNG, name
    config = json.loads((run / "config.json").read_text())
    assert config["img_size"] == 48 and config["pretrained"] is False
    assert config["peak_loss"] == 0.5 and config["peak_sharpness"] == 3.0
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [r["input_size"] for r in rows] == ["32", "48"]  # the first epoch scaled down (--early-share 0.5)
    assert {"val_macro_auroc", "val_riadd_score", "auroc_Disease_Risk", "auroc_OTHER"} <= set(rows[0])

    card = ModelCard.load(run / "model_card.json")
    best = torch.load(run / "best.pt", weights_only=True)
    assert ModelCard.from_json(best["card"]) == card
    assert card.weights_sha256 == state_dict_sha256(best["model"])
    assert len(card.thresholds) == len(LABELS) and card.preprocessing.input_size == 48
    assert set(card.metrics) >= {"validation", "test", "thresholds"}
    assert card.training_data["images"] == {"train": 144, "val": 48, "test": 48}
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["finished"] and {"optimizer", "scheduler", "scaler", "rng"} <= set(last)


@pytest.mark.slow
def test_evaluate_json_reproduces_the_test_metrics_recorded_in_the_card(
    cli_run: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = cli_run
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = ModelCard.load(run / "model_card.json").metrics["test"]
    assert result["count"] == 48
    assert result["macro_auroc"] == pytest.approx(recorded["macro_auroc"], abs=1e-6)
    assert result["riadd_score"] == pytest.approx(recorded["riadd_score"], abs=1e-6)
    assert set(result["per_label"]) == set(LABELS)


@pytest.mark.slow
def test_evaluate_prints_a_table_with_every_label_and_the_pointing_game(
    cli_run: tuple[Path, dict[str, Any]], synth_dataset: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run, _ = cli_run
    args = ["evaluate", "--checkpoint", str(run / "best.pt"), "--split", "val", "--data", str(synth_dataset)]
    assert main([*args, "--pointing-game"]) == 0
    out = capsys.readouterr().out
    assert "RIADD score" in out and "pointing game" in out
    for label in LABELS:
        assert f"\n{label} " in out

    # Asked for, against a folder whose files fit no mask layout: the error says what was expected.
    (empty := tmp_path / "masks" / "Evaluation").mkdir(parents=True)
    (empty / "scan-drusen.png").write_bytes(b"")
    assert main([*args, "--pointing-game", "--masks", str(tmp_path / "masks")]) != 0
    err = capsys.readouterr().err
    assert "no lesion mask files of the photographs under" in err and "<folders>/<ID>_<COLUMN>.png" in err

    # Laid out right, but no file can be read: asked for, an error naming why; not asked for, "n/a".
    (broken := tmp_path / "broken" / "Evaluation").mkdir(parents=True)
    for mask in (synth_dataset / "masks" / "Evaluation").glob("*.png"):
        (broken / mask.name).write_bytes(b"")
    assert main([*args, "--pointing-game", "--masks", str(tmp_path / "broken")]) != 0
    err = capsys.readouterr().err
    assert "no positive finding of the val split has a readable lesion mask among" in err
    assert "cannot be read" in err
    assert main([*args, "--masks", str(tmp_path / "broken")]) == 0
    assert "n/a (0/0, chance" in capsys.readouterr().out


@pytest.mark.slow
def test_evaluate_scores_disease_risks_map_against_every_lesion_when_asked(
    cli_run: tuple[Path, dict[str, Any]], synth_dataset: Path
) -> None:
    from train.loop import evaluate_checkpoint

    run, _ = cli_run
    diseases, _ = evaluate_checkpoint(run / "best.pt", "val", data=synth_dataset, progress=False)
    risk, _ = evaluate_checkpoint(
        run / "best.pt", "val", data=synth_dataset, pointing_labels=("Disease_Risk",), progress=False
    )
    per_disease = diseases.extra["pointing_game"]["per_label"]
    played = risk.extra["pointing_game"]
    assert "Disease_Risk" not in per_disease and set(played["per_label"]) == {"Disease_Risk"}
    # One pair per photograph with any lesion: at least as many as any one disease has, at most one each.
    assert max(pair["total"] for pair in per_disease.values()) <= played["total"] <= risk.count


@pytest.mark.slow
def test_a_second_train_into_the_same_folder_asks_for_resume(
    cli_run: tuple[Path, dict[str, Any]], synth_dataset: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run, _ = cli_run
    assert main(_train_args(synth_dataset, run, tmp_path / "cache")) == EXIT_USAGE
    assert "--resume" in capsys.readouterr().err


def test_missing_data_folder_exits_3_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_train_args(tmp_path / "nowhere", tmp_path / "run", tmp_path / "cache"))
    assert code == EXIT_MISSING
    assert f"no such folder: {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_labels_csv_without_label_columns_exits_2_naming_them(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,Disease_Risk,DR\nTraining/1.png,1,0\n")
    code = main([
        "train", "--labels-csv", str(labels_csv), "--images", str(synth_dataset), "--out", str(tmp_path / "run"),
        "--no-pretrained",
    ])  # fmt: skip
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "missing label columns ARMD, MH" in err and "OTHER" in err


def test_no_data_at_all_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path / "run")]) == EXIT_USAGE
    assert "--data DIR" in capsys.readouterr().err


def test_unreachable_pretrained_weights_exit_3_and_name_the_way_out(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm.models._builder as builder

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    code = main(["train", "--data", str(synth_dataset), "--out", str(tmp_path / "run"), "--pretrained",
                 "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert code == EXIT_MISSING
    err = capsys.readouterr().err
    assert "--weights PATH" in err and "--no-pretrained" in err
    assert not (tmp_path / "cache").exists()  # failed before decoding anything


def test_evaluate_missing_checkpoint_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(tmp_path / "best.pt")]) == EXIT_MISSING
    assert "checkpoint not found" in capsys.readouterr().err


def test_every_training_setting_has_a_flag_that_reaches_the_config(tmp_path: Path) -> None:
    from retinagate.cli import build_parser
    from train.loop import TrainConfig

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    destinations = {action.dest for action in subcommands.choices["train"]._actions}
    assert [f.name for f in dataclasses.fields(TrainConfig) if f.name not in destinations] == []
    # What the flags say is what the run is configured with (config.json is written before the data is
    # looked for, so a missing folder stops the run right after).
    given = ("--aug-on", "workers", "--peak-loss", "0.25", "--contrast-sigma", "0", "--no-ema", "--equivariance", "0.5",
             "--lesion-loss", "0.1", "--masks", str(tmp_path / "lesions"), "--fov-threshold", "35",
             "--probe-strides", "16", "8", "--risk-lesions", "--no-diffuse-lesions",
             "--probe-balance", "cells")  # fmt: skip
    assert main(_train_args(tmp_path / "absent", tmp_path / "run", tmp_path / "cache", *given)) == EXIT_MISSING
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["aug_on"] == "workers" and config["peak_loss"] == 0.25 and config["equivariance"] == 0.5
    assert config["lesion_loss"] == 0.1 and config["masks"] == str(tmp_path / "lesions")
    assert config["contrast_sigma"] == 0.0 and config["ema"] is False and config["img_size"] == 48
    assert config["fov_threshold"] == 35 and config["probe_strides"] == [8, 16] and config["risk_lesions"] is True
    assert config["diffuse_lesions"] is False and config["probe_balance"] == "cells"


def test_every_default_a_flag_names_in_its_help_is_the_configs() -> None:
    """The flags leave unset settings to TrainConfig (argparse.SUPPRESS), so their help repeats its defaults."""
    from retinagate.cli import build_parser
    from train.loop import TrainConfig

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked, wrong = [], []
    for action in subcommands.choices["train"]._actions:
        default = defaults.get(action.dest)
        said = re.search(r"\(default:? ([^\s;)]+)", action.help or "")
        if said is None or default is None or isinstance(default, dataclasses._MISSING_TYPE):
            continue
        word = said.group(1)
        if isinstance(default, bool):
            matches = word == ("on" if default else "off")
        elif isinstance(default, tuple):  # "(default 8 16)"
            listed = re.search(r"\(default:? ([0-9 ]+)\)", action.help or "")
            matches = listed is not None and tuple(int(x) for x in listed.group(1).split()) == default
        elif isinstance(default, (int, float)):
            if not re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", word):
                continue  # a default told in words ("up to 8 on CUDA")
            matches = float(word) == default
        else:
            matches = word == default
        checked.append(action.dest)
        if not matches:
            wrong.append(f"{action.dest}: help says {word}, TrainConfig has {default!r}")
    assert wrong == []
    key_flags = {"probe_loss", "probe_strides", "lesion_loss", "img_size", "epochs", "lr", "ema", "tta", "select_by"}
    assert key_flags <= set(checked)


@pytest.mark.parametrize(("level", "message"), [("300", "300 is outside 0-255"), ("grey", "'grey' is not a level")])
def test_a_fov_threshold_that_is_not_a_level_or_auto_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], level: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_train_args(tmp_path / "data", tmp_path / "run", tmp_path / "cache", "--fov-threshold", level))
    assert exit_info.value.code == EXIT_USAGE
    assert f"--fov-threshold: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
