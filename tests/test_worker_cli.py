"""The worker's subcommands: argument checks, exit codes, and the dry run of `retinagate rescore`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from retinagate.cli import EXIT_MISSING, EXIT_USAGE, main
from retinagate.db import upgrade
from retinagate.settings import Settings
from worker.cli import parse_when


def test_dates_are_utc_and_an_until_date_includes_its_whole_day() -> None:
    assert parse_when("2026-11-26") == datetime(2026, 11, 26, tzinfo=UTC)
    assert parse_when("2026-11-26", end=True) == datetime(2026, 11, 27, tzinfo=UTC)
    assert parse_when("2026-11-26T08:30:00+01:00") == datetime(2026, 11, 26, 7, 30, tzinfo=UTC)
    assert parse_when("2026-11-26T08:30", end=True) == datetime(2026, 11, 26, 8, 30, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="YYYY-MM-DD"):
        parse_when("yesterday")


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--queues", "score,bogus"],
        ["worker", "--concurrency", "0"],
        ["rescore", "--since", "last week"],
        ["results", "--study", "1.2", "--since", "2026-01-01"],
    ],
)
def test_bad_arguments_exit_with_the_usage_code(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == EXIT_USAGE


def test_worker_and_rescore_without_a_model_say_how_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("RETINAGATE_MODEL_PATH", raising=False)
    assert main(["worker"]) == EXIT_USAGE
    assert "RETINAGATE_MODEL_PATH" in capsys.readouterr().err
    assert main(["rescore", "--model", str(tmp_path / "absent.onnx")]) == EXIT_MISSING
    assert "model file not found" in capsys.readouterr().err


def test_commands_on_a_database_never_migrated_say_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    assert main(["results"]) == EXIT_MISSING
    assert "retinagate db upgrade" in capsys.readouterr().err


def test_a_dry_run_counts_the_scored_instances_a_new_model_would_score_and_changes_nothing(
    make_settings: Callable[..., Settings],
    worker_store_instance: Callable[..., int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings = make_settings()
    upgrade(settings)
    for study, status in enumerate(["scored", "scored", "queued", "failed"]):
        worker_store_instance(settings, study=study, size=(128, 96), status=status)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not loaded by a dry run, only hashed")
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(settings.data_dir))

    assert main(["rescore", "--model", str(model), "--dry-run", "--json"]) == 0

    summary = json.loads(capsys.readouterr().out)
    assert summary["candidates"] == 2 and summary["registered"] is False and summary["dry_run"] is True
    assert main(["rescore", "--model", str(model), "--dry-run", "--until", "2000-01-01"]) == 0
    assert "would rescore 0 instance(s)" in capsys.readouterr().out
    assert not (settings.data_dir / "reports").exists()
