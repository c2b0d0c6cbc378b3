"""The ``retinagate`` command's shared behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retinagate.cli import main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("config", "db", "synth", "train", "evaluate", "export", "score", "gateway", "worker", "rescore"):
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
