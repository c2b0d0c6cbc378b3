"""Tests for the Alembic migrations and the ``retinagate db upgrade`` / ``db current`` commands."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from retinagate.cli import main
from retinagate.db import current_revision, downgrade, head_revision, make_engine, upgrade
from retinagate.models import Base, Study
from retinagate.settings import Settings

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
EVERY_TABLE = {*Base.metadata.tables, "alembic_version"}


@pytest.fixture
def cli_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, empty_database_url: str) -> str:
    """Points the CLI's environment at the empty database, with no other RETINAGATE_* setting."""
    for key in list(os.environ):
        if key.startswith("RETINAGATE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("RETINAGATE_DATABASE_URL", empty_database_url)
    return empty_database_url


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _schema_diff(url: str, metadata: sa.MetaData) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_db_upgrade_creates_every_table_in_an_empty_database(cli_database: str) -> None:
    assert main(["db", "upgrade"]) == 0

    assert _tables(cli_database) == EVERY_TABLE


def test_db_upgrade_on_the_default_sqlite_file_creates_it_under_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in list(os.environ):
        if key.startswith("RETINAGATE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))

    assert main(["db", "upgrade"]) == 0

    database = tmp_path / "var" / "retinagate.db"
    assert database.is_file()
    assert _tables(f"sqlite:///{database}") == EVERY_TABLE


def test_second_db_upgrade_is_a_no_op_that_keeps_the_data(cli_database: str) -> None:
    assert main(["db", "upgrade"]) == 0
    engine = make_engine(cli_database)
    with engine.begin() as connection:
        connection.execute(sa.insert(Study).values(study_uid="1.2.3.4"))

    assert main(["db", "upgrade"]) == 0

    with engine.connect() as connection:
        assert connection.execute(sa.select(Study.study_uid)).scalars().all() == ["1.2.3.4"]
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [
            head_revision()
        ]
    engine.dispose()


def test_db_current_prints_nothing_before_and_the_head_revision_after_upgrade(
    cli_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "current"]) == 0
    assert capsys.readouterr().out.strip() == "(empty)"

    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()
    assert main(["db", "current"]) == 0

    assert capsys.readouterr().out.strip() == head_revision() == "0007"


def test_db_current_does_not_create_a_missing_sqlite_file(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()

    assert current_revision(settings) is None
    assert not (tmp_path / "var").exists()


def test_migrated_schema_matches_the_models_exactly(
    empty_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    upgrade(make_settings(database_url=empty_database_url))

    assert _schema_diff(empty_database_url, Base.metadata) == []


def test_schema_comparison_notices_a_model_that_drifted_from_the_migrations(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'drift.db'}"
    upgrade(make_settings(database_url=url))
    drifted = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["instances"].append_column(sa.Column("modality", sa.String(16)))
    drifted.tables["studies"].c.accession.type = sa.String(64)

    diff = _schema_diff(url, drifted)

    assert ("add_column", None, "instances", drifted.tables["instances"].c.modality) in diff
    modified = [change[0] for change in diff if isinstance(change, list)]
    assert any(op[0] == "modify_type" and op[2:4] == ("studies", "accession") for op in modified)


def test_downgrade_to_base_removes_every_table_and_upgrade_restores_them(
    empty_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(database_url=empty_database_url)
    upgrade(settings)

    downgrade(settings, "base")
    assert _tables(empty_database_url) == {"alembic_version"}
    assert current_revision(settings) is None

    upgrade(settings)
    assert _tables(empty_database_url) == EVERY_TABLE
    assert current_revision(settings) == head_revision()


def test_the_gate_revision_marks_existing_predictions_scored_and_its_downgrade_fails_ungradable_instances(
    empty_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(database_url=empty_database_url)
    upgrade(settings, "0001")
    engine = make_engine(empty_database_url)
    now = dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)
    rows = {
        "studies": {"id": 1, "study_uid": "1.2", "first_received_at": now, "last_received_at": now},
        "instances": {"id": 1, "sop_instance_uid": "1.2.3", "study_id": 1, "series_uid": "1.2.4",
                      "sop_class_uid": "1.2.5", "transfer_syntax_uid": "1.2.6", "frames": 1, "storage_key": "k",
                      "sha256": "h", "size_bytes": 1, "received_at": now, "status": "scored",
                      "status_changed_at": now, "attempts": 1},
        "models": {"id": 1, "name": "m", "version": "1", "sha256": "a", "card": {}, "active": True,
                   "registered_at": now},
        "predictions": {"id": 1, "instance_id": 1, "model_id": 1, "probabilities": {}, "findings": [],
                        "timings": {}, "duration_s": 0.1, "created_at": now},
    }  # fmt: skip
    with engine.begin() as connection:
        for name, values in rows.items():
            table = sa.Table(name, sa.MetaData(), autoload_with=connection)
            connection.execute(table.insert().values(**values))

    upgrade(settings)
    with engine.begin() as connection:
        status, reasons, quality = connection.exec_driver_sql("SELECT status, reasons, quality FROM predictions").one()
        assert status == "scored"
        assert [json.loads(v) if isinstance(v, str) else v for v in (reasons, quality)] == [[], {}]
        connection.exec_driver_sql("UPDATE instances SET status = 'ungradable'")
    downgrade(settings, "0001")
    with engine.connect() as connection:
        status, error = connection.exec_driver_sql("SELECT status, last_error FROM instances").one()
    engine.dispose()

    assert (status, error) == ("failed", "not gradable (gradability gate)")
    assert "status" not in {c["name"] for c in sa.inspect(make_engine(empty_database_url)).get_columns("predictions")}


def test_a_prediction_may_have_a_map_per_finding_and_the_downgrade_keeps_the_first_of_each_kind(
    empty_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(database_url=empty_database_url)
    upgrade(settings)
    engine = make_engine(empty_database_url)
    now = dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)
    rows = {
        "studies": [{"id": 1, "study_uid": "1.2", "first_received_at": now, "last_received_at": now}],
        "instances": [{"id": 1, "sop_instance_uid": "1.2.3", "study_id": 1, "series_uid": "1.2.4",
                       "sop_class_uid": "1.2.5", "transfer_syntax_uid": "1.2.6", "frames": 1, "storage_key": "k",
                       "sha256": "h", "size_bytes": 1, "received_at": now, "status": "scored",
                       "status_changed_at": now, "attempts": 1}],
        "models": [{"id": 1, "name": "m", "version": "1", "sha256": "a", "card": {}, "active": True,
                    "registered_at": now}],
        "predictions": [{"id": 1, "instance_id": 1, "model_id": 1, "probabilities": {}, "findings": [],
                         "timings": {}, "duration_s": 0.1, "created_at": now, "status": "scored", "reasons": [],
                         "quality": {}}],
        # Two maps: two findings.
        "outputs": [{"id": n, "prediction_id": 1, "kind": kind, "sop_instance_uid": f"2.25.{n}", "storage_key": "o",
                     "created_at": now} for n, kind in enumerate(("sc", "pm", "pm", "sr"), start=1)],
        "deliveries": [{"id": 1, "output_id": 3, "destination": "PACS@h:104", "status": "pending", "attempts": 0,
                        "updated_at": now}],
    }  # fmt: skip
    with engine.begin() as connection:
        for name, values in rows.items():
            table = sa.Table(name, sa.MetaData(), autoload_with=connection)
            connection.execute(table.insert(), values)

    downgrade(settings, "0005")
    with engine.connect() as connection:
        kept = connection.exec_driver_sql("SELECT id, kind FROM outputs ORDER BY id").all()
        deliveries = connection.exec_driver_sql("SELECT COUNT(*) FROM deliveries").scalar()
    engine.dispose()

    assert [tuple(row) for row in kept] == [(1, "sc"), (2, "pm"), (4, "sr")] and deliveries == 0
    upgrade(settings)
    assert current_revision(settings) == head_revision()


def test_upgrade_leaves_the_applications_logging_alone(make_settings: Callable[..., Settings]) -> None:
    probe = logging.getLogger("retinagate.probe")
    handlers_before = list(logging.getLogger().handlers)

    upgrade(make_settings())

    assert not probe.disabled
    assert logging.getLogger().handlers == handlers_before


def test_alembic_ini_writes_the_postgresql_schema_as_sql_for_administrators() -> None:
    buffer = io.StringIO()
    config = Config(str(MIGRATIONS / "alembic.ini"), output_buffer=buffer)
    config.set_main_option("sqlalchemy.url", "postgresql://db.example/retinagate")

    command.upgrade(config, "head", sql=True)

    sql = buffer.getvalue()
    for table in Base.metadata.tables:
        assert f"CREATE TABLE {table} (" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in sql
    assert "SET version_num='0007'" in sql
