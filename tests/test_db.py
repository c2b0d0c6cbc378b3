"""Tests for retinagate.db: engines, sessions, schema checks, and the ORM on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, selectinload

from retinagate.db import (
    SchemaError,
    check_schema,
    make_engine,
    session_factory,
    session_scope,
    upgrade,
)
from retinagate.models import (
    Association,
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceStatus,
    Model,
    Output,
    Prediction,
    Study,
)
from retinagate.settings import Settings

OP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.fixture
def engine(empty_database_url: str, make_settings: Callable[..., Settings]) -> Iterator[sa.Engine]:
    """An engine on a freshly migrated database (SQLite, then PostgreSQL)."""
    settings = make_settings(database_url=empty_database_url)
    upgrade(settings)
    engine = make_engine(settings)
    yield engine
    engine.dispose()


def _instance(study: Study | None, n: int, **fields: object) -> Instance:
    values: dict[str, object] = {
        "sop_instance_uid": f"1.2.826.0.1.3680043.10.1.{n}",
        "series_uid": "1.2.826.0.1.3680043.10.2",
        "sop_class_uid": OP_SOP_CLASS,
        "transfer_syntax_uid": JPEG_BASELINE,
        "storage_key": f"in/{n:04d}.dcm",
        "sha256": f"{n:064x}",
        "size_bytes": 9_000_000 + n,
    }
    if study is not None:
        values["study"] = study
    values.update(fields)
    return Instance(**values)


def _model(sha: str = "ab" * 32) -> Model:
    return Model(name="effnet-b0-rfmid", version="1.0.0", sha256=sha, card={"labels": ["Disease_Risk", "DR"]})


def test_a_study_round_trips_with_instances_predictions_outputs_and_deliveries(engine: sa.Engine) -> None:
    factory = session_factory(engine)
    received = datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=timezone(timedelta(hours=2)))
    with session_scope(factory) as session:
        association = Association(calling_ae="FUNDUS1", called_ae="RETINAGATE", peer_address="10.0.0.7",
                                  peer_port=40001, instances_accepted=2, outcome="released")
        study = Study(study_uid="1.2.826.0.1.3680043.10.0", accession="ACC1")
        left = _instance(study, 1, laterality="L", rows=1536, columns=2048, received_at=received,
                         calling_ae="FUNDUS1")
        right = _instance(study, 2, laterality="R", status=InstanceStatus.SCORED, attempts=1)
        session.add_all([association, study, left, right])
        session.flush()
        left.association_id = association.id
        model = _model()
        prediction = Prediction(instance=left, model=model, probabilities={"Disease_Risk": 0.91, "DR": 0.75},
                                findings=["Disease_Risk", "DR"], timings={"decode": 0.011, "total": 0.05},
                                duration_s=0.05)
        sc = Output(prediction=prediction, kind="sc", sop_instance_uid="2.25.1", storage_key="out/1.dcm")
        sr = Output(prediction=prediction, kind="sr", sop_instance_uid="2.25.2", storage_key="out/2.dcm")
        sc.deliveries.append(Delivery(destination="PACS@10.0.0.9:104", status=DeliveryStatus.DELIVERED,
                                      dimse_status=0, delivered_at=received + timedelta(seconds=3)))
        session.add_all([model, prediction, sc, sr])

    with Session(engine) as session:
        study = session.scalars(
            sa.select(Study).options(
                selectinload(Study.instances)
                .selectinload(Instance.predictions)
                .selectinload(Prediction.outputs)
                .selectinload(Output.deliveries)
            )
        ).one()
        assert study.study_uid == "1.2.826.0.1.3680043.10.0"
        assert study.accession == "ACC1"
        by_side = {i.laterality: i for i in study.instances}
        assert set(by_side) == {"L", "R"}
        left, right = by_side["L"], by_side["R"]
        assert (left.rows, left.columns, left.frames, left.size_bytes) == (1536, 2048, 1, 9_000_001)
        assert left.status is InstanceStatus.RECEIVED and right.status is InstanceStatus.SCORED
        assert right.attempts == 1 and right.predictions == []
        assert left.received_at == received
        assert left.association_id is not None
        assert session.get(Association, left.association_id).peer_address == "10.0.0.7"  # type: ignore[union-attr]

        (prediction,) = left.predictions
        assert prediction.model.card == {"labels": ["Disease_Risk", "DR"]}
        assert prediction.model.active is False
        assert prediction.probabilities == {"Disease_Risk": 0.91, "DR": 0.75}
        assert prediction.findings == ["Disease_Risk", "DR"]
        assert prediction.timings["decode"] == pytest.approx(0.011)
        outputs = {o.kind: o for o in prediction.outputs}
        assert set(outputs) == {"sc", "sr"}
        (delivery,) = outputs["sc"].deliveries
        assert delivery.status is DeliveryStatus.DELIVERED
        assert delivery.attempts == 0 and delivery.dimse_status == 0
        assert delivery.delivered_at == received + timedelta(seconds=3)
        assert outputs["sr"].deliveries == []


def test_timestamps_come_back_timezone_aware_and_as_the_same_instant(engine: sa.Engine) -> None:
    stamp = datetime(2025, 1, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    with session_scope(session_factory(engine)) as session:
        session.add(Study(study_uid="1.2.3", first_received_at=stamp, last_received_at=stamp))

    with Session(engine) as session:
        study = session.scalars(sa.select(Study)).one()
        later = session.scalars(sa.select(Study).where(Study.last_received_at > stamp - timedelta(seconds=1))).all()

    for value in (study.first_received_at, study.last_received_at):
        assert value.tzinfo is not None and value.utcoffset() is not None
        assert value == stamp
        assert value.astimezone(UTC) == datetime(2025, 2, 1, 4, 30, tzinfo=UTC)
    assert len(later) == 1


def test_a_naive_timestamp_is_refused(engine: sa.Engine) -> None:
    with pytest.raises(StatementError, match="naive datetime"), session_scope(session_factory(engine)) as session:
        session.add(Study(study_uid="1.2.3", first_received_at=datetime(2025, 1, 1)))


def test_a_second_prediction_for_the_same_instance_and_model_is_refused(engine: sa.Engine) -> None:
    factory = session_factory(engine)
    with session_scope(factory) as session:
        instance, model = _instance(Study(study_uid="1.2.3"), 1), _model()
        session.add_all([instance, model])
        session.add(Prediction(instance=instance, model=model, probabilities={}, findings=[], duration_s=0.1))

    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.add(Prediction(instance_id=instance.id, model_id=model.id, probabilities={}, findings=[],
                               duration_s=0.2))

    with session_scope(factory) as session:  # the same instance under another model is a new prediction
        other = _model("cd" * 32)
        session.add(other)
        session.add(Prediction(instance_id=instance.id, model=other, probabilities={}, findings=[], duration_s=0.1))
    with Session(engine) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Prediction)) == 2


def test_a_duplicate_sop_instance_uid_is_refused(engine: sa.Engine) -> None:
    factory = session_factory(engine)
    with session_scope(factory) as session:
        study = Study(study_uid="1.2.3")
        session.add(_instance(study, 1))

    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.add(_instance(session.merge(study), 1, storage_key="in/other.dcm"))

    with Session(engine) as session:
        assert session.scalars(sa.select(Instance.storage_key)).all() == ["in/0001.dcm"]


def test_a_second_delivery_of_an_output_to_the_same_destination_is_refused(engine: sa.Engine) -> None:
    factory = session_factory(engine)
    with session_scope(factory) as session:
        prediction = Prediction(instance=_instance(Study(study_uid="1.2.3"), 1), model=_model(),
                                probabilities={}, findings=[], duration_s=0.1)
        output = Output(prediction=prediction, kind="sc", sop_instance_uid="2.25.7", storage_key="o")
        session.add_all([output, Delivery(output=output, destination="PACS@h:104")])

    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.add(Delivery(output_id=output.id, destination="PACS@h:104"))


def test_an_instance_of_a_missing_study_is_refused(engine: sa.Engine) -> None:
    with pytest.raises(IntegrityError), session_scope(session_factory(engine)) as session:
        session.add(_instance(None, 1, study_id=424242))


def test_session_scope_rolls_back_when_the_block_raises(engine: sa.Engine) -> None:
    factory = session_factory(engine)

    with pytest.raises(RuntimeError, match="C-STORE aborted"), session_scope(factory) as session:
        session.add(Study(study_uid="1.2.3"))
        session.flush()
        raise RuntimeError("C-STORE aborted")

    with Session(engine) as session:
        assert session.scalars(sa.select(Study)).all() == []


def test_committed_objects_stay_readable_after_the_session_closes(engine: sa.Engine) -> None:
    with session_scope(session_factory(engine)) as session:
        study = Study(study_uid="1.2.3")
        session.add(study)

    assert study.id is not None  # a task message carries this id after the commit
    assert study.study_uid == "1.2.3"


def test_check_schema_accepts_a_migrated_database(engine: sa.Engine) -> None:
    check_schema(engine)


def test_check_schema_refuses_an_unmigrated_database_and_names_the_upgrade_command(
    empty_database_url: str,
) -> None:
    engine = make_engine(empty_database_url)
    try:
        with engine.connect():
            pass  # an empty database: SQLite makes its file on the first connection
        with pytest.raises(SchemaError, match=r"no RetinaGate schema; run `retinagate db upgrade`"):
            check_schema(engine)
    finally:
        engine.dispose()


def test_check_schema_names_a_missing_sqlite_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "var" / "retinagate.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with pytest.raises(SchemaError, match=r"there is no RetinaGate database at .*RETINAGATE_DATA_DIR"):
            check_schema(engine)
    finally:
        engine.dispose()
    assert not (tmp_path / "var").exists()


def test_check_schema_refuses_a_database_migrated_by_a_newer_version(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")

    with pytest.raises(SchemaError, match=r"revision 9999, which this version of RetinaGate does not know"):
        check_schema(engine)


def test_sqlite_engine_makes_the_folder_on_connecting_and_sets_wal_busy_timeout_foreign_keys_and_normal_sync(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'retinagate.db'}")
    try:
        assert not (tmp_path / "a").exists()  # made when first connecting, not before
        with engine.connect() as connection:
            assert (tmp_path / "a" / "b").is_dir()
            pragma = {name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                      for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")}
    finally:
        engine.dispose()

    assert pragma == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1, "synchronous": 1}


def test_sqlite_database_is_the_file_under_the_data_dir_by_default(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    engine = make_engine(make_settings())

    assert engine.url.database == str((tmp_path / "var" / "retinagate.db").resolve())
    engine.dispose()


def test_postgresql_urls_use_psycopg3_and_take_the_password_from_settings(
    make_settings: Callable[..., Settings],
) -> None:
    secret = "p@ss:w%rd"  # noqa: S105 - a made-up password with characters that need URL escaping
    plain = make_engine(make_settings(database_url="postgresql://rg@db.example:5432/rg", database_password=secret))
    given = make_engine(make_settings(database_url="postgresql://rg:own@db.example/rg", database_password=secret))

    assert plain.url.drivername == "postgresql+psycopg"
    assert plain.url.password == secret
    assert plain.url.host == "db.example" and plain.url.port == 5432
    assert given.url.password == "own"  # noqa: S105 - the URL's own password wins
    assert make_engine("postgres://rg@db.example/rg").url.drivername == "postgresql+psycopg"
    assert make_engine("postgresql+psycopg://rg@db.example/rg").url.drivername == "postgresql+psycopg"


def test_an_unparseable_database_url_names_the_setting() -> None:
    with pytest.raises(ValueError, match="database_url"):
        make_engine("not a url")


@pytest.mark.postgres
def test_postgresql_engine_reconnects_after_its_connections_are_killed(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as connection:
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        admin = make_engine(postgres_url)
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.dispose()

        with engine.connect() as connection:  # the pool's dead connection is noticed, not handed out
            assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()
