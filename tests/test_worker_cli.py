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
    err = capsys.readouterr().err
    assert "set RETINAGATE_MODEL_PATH" in err and "retinagate export" in err
    assert "--model" not in err  # the worker has no such option
    assert main(["rescore"]) == EXIT_USAGE
    assert "pass --model or set RETINAGATE_MODEL_PATH" in capsys.readouterr().err
    assert main(["rescore", "--model", str(tmp_path / "absent.onnx")]) == EXIT_MISSING
    assert "model file not found" in capsys.readouterr().err


def test_commands_on_a_database_never_migrated_say_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    assert main(["results"]) == EXIT_MISSING
    assert "retinagate db upgrade" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["results"], ["deliveries", "list"], ["worker", "--queues", "deliver"]])
def test_a_command_finding_no_database_file_says_so_and_creates_nothing(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "elsewhere"
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(data_dir))
    assert main(argv) == EXIT_MISSING
    (line,) = capsys.readouterr().err.splitlines()
    assert f"there is no RetinaGate database at {(data_dir / 'retinagate.db').resolve()}" in line
    assert "RETINAGATE_DATA_DIR" in line and "retinagate db upgrade" in line
    assert not data_dir.exists()  # neither an empty database file nor its folder left behind


def test_a_database_file_without_the_schema_is_told_apart_from_a_missing_one(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(settings.data_dir))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "retinagate.db").touch()
    assert main(["results"]) == EXIT_MISSING
    assert "has no RetinaGate schema; run `retinagate db upgrade`" in capsys.readouterr().err


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


def test_scoring_processes_share_the_cores_unless_the_thread_count_is_set(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.cli import _threads_per_process

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert _threads_per_process(make_settings(), 2).intra_op_threads == 4
    assert _threads_per_process(make_settings(), None).intra_op_threads == 1  # one process per core
    assert _threads_per_process(make_settings(), 16).intra_op_threads == 1
    assert _threads_per_process(make_settings(intra_op_threads=3), 2).intra_op_threads == 3


def test_the_worker_passes_its_pool_queues_and_a_node_name_per_queue_set_to_celery(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from worker import cli

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read here")
    settings = make_settings(model_path=model)
    upgrade(settings)
    started: list[list[str]] = []
    monkeypatch.setattr(cli, "_run_celery", lambda app, argv, quiet=True: started.append(argv) or 0)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())

    args = parser.parse_args(["worker", "--queues", "deliver,maintenance", "--pool", "threads", "--concurrency", "8"])
    assert args.handler(args, settings) == 0

    (argv,) = started
    assert argv[argv.index("--pool") + 1] == "threads"
    assert argv[argv.index("--queues") + 1] == "deliver,maintenance"
    assert argv[argv.index("--hostname") + 1] == "deliver-maintenance@%h"
    assert argv[argv.index("--concurrency") + 1] == "8"


_FAILING_WORKER = """
import sys
from celery import Celery, bootsteps
from worker.cli import _run_celery

class Broken(bootsteps.StartStopStep):
    def start(self, worker):
        raise RuntimeError("a bootstep that cannot start")

app = Celery("broken", broker="memory://", set_as_current=True)
app.steps["worker"].add(Broken)
sys.exit(_run_celery(app, ["worker", "--pool", "solo", "--without-mingle", "--without-gossip"]))
"""


def test_a_worker_stopped_by_an_unrecoverable_error_exits_with_a_failure_status(tmp_path: Path) -> None:
    """Celery.start drops the status of its command line, so `retinagate worker` used to exit 0 after
    "Unrecoverable error", and a supervisor restarting only failed services left it dead."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_WORKER], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    output = done.stdout + done.stderr
    assert "Unrecoverable error" in output
    assert done.returncode == 1, output[-3000:]
