"""The ``retinagate`` command's shared behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retinagate.cli import EXIT_MISSING, main
from retinagate.db import upgrade
from retinagate.pacs import free_port
from retinagate.settings import load_settings


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("config", "db", "synth", "train", "evaluate", "export", "score", "gateway", "worker", "rescore",
                    "models", "deliveries", "storage"):
        assert f"    {command}" in out, command


def test_config_show_prints_effective_settings_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RETINAGATE_DATABASE_URL", "postgresql://rg:hunter2@db/rg")
    monkeypatch.setenv("RETINAGATE_GATEWAY_PORT", "4242")
    assert main(["config", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gateway_port"] == 4242
    assert data["database_url"] == "postgresql://rg:*****@db/rg"
    assert main(["config", "show"]) == 0
    text = capsys.readouterr().out
    assert "RETINAGATE_GATEWAY_PORT=4242" in text
    assert "hunter2" not in text
    assert "RESOLVED" not in text  # derived values are not settings an operator could set


def test_config_show_prints_destinations_as_the_variable_reads_them_back(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from retinagate.settings import load_settings

    for given in ("PACS@pacs:104,https://h/dicom-web", '["PACS@pacs:104", {"address": "https://h/dw", "name": "x"}]'):
        monkeypatch.setenv("RETINAGATE_DESTINATIONS", given)
        assert main(["config", "show"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RETINAGATE_DESTINATIONS="))
        shown = line.removeprefix("RETINAGATE_DESTINATIONS=")
        assert load_settings(environ={"RETINAGATE_DESTINATIONS": shown}).destinations == load_settings().destinations


def test_invalid_settings_exit_2_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RETINAGATE_GATEWAY_PORT", "not-a-port")
    assert main(["config", "show"]) == 2
    assert "RETINAGATE_GATEWAY_PORT" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("retinagate")
    result = subprocess.run([str(exe), "config", "show", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["gateway_ae_title"] == "RETINAGATE"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "argv",
    [
        ["results"],
        ["rescore", "--dry-run"],
        ["gateway", "--port", "0"],
        ["worker", "--queues", "deliver"],
        ["deliveries", "list"],
        ["db", "current"],
        ["db", "upgrade"],
    ],
)
def test_every_command_that_opens_an_unreachable_database_exits_3_with_one_line_and_no_password(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there: a PostgreSQL that is down
    monkeypatch.setenv("RETINAGATE_DATABASE_URL", f"postgresql+psycopg://u:secret@127.0.0.1:{port}/x")
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")  # rescore checks that the file exists before the database
    monkeypatch.setenv("RETINAGATE_MODEL_PATH", str(model))

    assert main(argv) == EXIT_MISSING
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert f"cannot reach the database postgresql+psycopg://u:***@127.0.0.1:{port}/x" in line
    assert "secret" not in out + err


def test_an_unreachable_database_prints_no_traceback_from_the_installed_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    env["RETINAGATE_DATABASE_URL"] = f"postgresql+psycopg://u:secret@127.0.0.1:{free_port()}/x"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("retinagate")), "results"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == EXIT_MISSING
    assert len(result.stderr.splitlines()) == 1 and "cannot reach the database" in result.stderr
    assert "Traceback" not in result.stderr and "secret" not in result.stderr


def test_a_read_only_command_on_a_migrated_database_logs_no_library_chatter(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    env |= {"RETINAGATE_DATA_DIR": str(tmp_path / "var"), "RETINAGATE_LOG_LEVEL": "INFO"}
    upgrade(load_settings(environ=env))
    result = subprocess.run(
        [str(Path(sys.executable).with_name("retinagate")), "results"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no results"
    assert "alembic" not in result.stderr and result.stderr == ""

    # -v brings the libraries' messages back.
    verbose = subprocess.run(
        [str(Path(sys.executable).with_name("retinagate")), "-v", "results"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert verbose.returncode == 0 and "alembic" in verbose.stderr


def test_library_chatter_is_kept_at_warning_unless_verbose_or_debug() -> None:
    import logging

    from retinagate.logs import CHATTY_LIBRARIES, setup_logging

    try:
        setup_logging("INFO")
        assert {logging.getLogger(n).level for n in CHATTY_LIBRARIES} == {logging.WARNING}
        setup_logging("INFO", verbose=True)
        assert {logging.getLogger(n).level for n in CHATTY_LIBRARIES} == {logging.INFO}
        setup_logging("DEBUG")
        assert {logging.getLogger(n).level for n in CHATTY_LIBRARIES} == {logging.DEBUG}
        assert logging.getLogger("pynetdicom").level == logging.WARNING  # identifiers: never below WARNING
    finally:
        setup_logging("INFO")
