"""`retinagate storage prune`: storage retention run by hand, with a summary a person or a script reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from retinagate.cli import main
from retinagate.db import make_engine, session_factory, session_scope
from retinagate.models import Instance, utcnow
from retinagate.settings import Settings, load_settings
from retinagate.storage import Storage


def _site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retention_days: int) -> Settings:
    env = {"RETINAGATE_DATA_DIR": str(tmp_path / "var"), "RETINAGATE_RETENTION_DAYS": str(retention_days)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(environ=env)


def _files(settings: Settings) -> list[str]:
    return list(Storage(settings.resolved_storage_dir).iter_keys("in"))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_store_outputs: Callable[..., list[int]]) -> Settings:
    """Three scored photographs with retention at 30 days: two received 40 days ago, one today."""
    settings = _site(tmp_path, monkeypatch, 30)
    worker_store_outputs(settings, 3)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        ids = sorted(s.scalars(select(Instance.id)))
        s.execute(update(Instance).where(Instance.id.in_(ids[:2])).values(received_at=utcnow() - timedelta(days=40)))
    engine.dispose()
    return settings


def test_prune_removes_the_due_photographs_and_prints_a_summary(
    site: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["storage", "prune"]) == 0

    out = capsys.readouterr().out
    assert out.startswith("removed 2 received photograph(s) (") and "their results are kept" in out
    assert len(_files(site)) == 1
    assert main(["storage", "prune"]) == 0
    assert capsys.readouterr().out.startswith("removed 0 received photograph(s) (0.0 MB)")


def test_a_dry_run_says_what_would_go_and_removes_nothing(site: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["storage", "prune", "--dry-run"]) == 0

    assert capsys.readouterr().out.startswith("would remove 2 received photograph(s) (")
    assert len(_files(site)) == 3


def test_json_gives_the_counts(site: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["storage", "prune", "--json"]) == 0

    data = json.loads(capsys.readouterr().out)
    assert data["retention_days"] == 30 and data["pruned"] == 2 and data["remaining"] == 0
    assert data["pruned_bytes"] > 0 and data["errors"] == 0 and data["dry_run"] is False


def test_with_retention_off_nothing_is_removed_and_it_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _site(tmp_path, monkeypatch, 0)

    assert main(["storage", "prune"]) == 0

    assert "retention is off (RETINAGATE_RETENTION_DAYS=0)" in capsys.readouterr().out
    assert not (tmp_path / "var").exists()  # it did not even open a database


def test_an_unmigrated_database_is_exit_3_with_the_command_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _site(tmp_path, monkeypatch, 30)

    assert main(["storage", "prune"]) == 3

    assert "retinagate db upgrade" in capsys.readouterr().err
