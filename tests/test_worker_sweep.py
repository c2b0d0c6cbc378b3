"""The sweeper: lost work is found again from SQL, and work out of attempts is failed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from retinagate.db import make_engine, session_factory, session_scope, upgrade
from retinagate.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceStatus,
    Model,
    Output,
    Prediction,
    utcnow,
)
from retinagate.settings import Settings
from worker.lease import HANDOFF
from worker.sweep import batches, sweep


class Sent:
    """Records what the sweeper hands to the queue (the queue itself is outside this unit)."""

    def __init__(self) -> None:
        self.score: list[list[int]] = []
        self.deliver: list[list[int]] = []


@pytest.fixture
def db(make_settings: Callable[..., Settings]) -> Iterator[tuple[Settings, Engine, sessionmaker[Session]]]:
    settings = make_settings(
        stuck_after=60,
        task_time_limit=30,
        score_backoff=1,
        score_backoff_max=20,
        max_attempts=3,
        batch_size=2,
        destinations="PACS@127.0.0.1:104",
        delivery_backoff_max=100,
        lease_seconds=60,
        delivery_probe_interval=120,
    )
    upgrade(settings)
    engine = make_engine(settings)
    yield settings, engine, session_factory(engine)
    engine.dispose()


def _run(
    settings: Settings, sessions: sessionmaker[Session], now: datetime, probe: Callable[[str], bool] | None = None
) -> tuple[Any, Sent]:
    sent = Sent()

    def no_probe(destination: str) -> bool:
        raise AssertionError(f"{destination} probed, though no delivery of it failed after its retries")

    outcome = sweep(settings, sessions, sent.score.append, sent.deliver.append, now=now, probe=probe or no_probe)
    return outcome, sent


def _instance(
    session: Session,
    status: InstanceStatus,
    changed: datetime,
    attempts: int = 0,
    n: int = 0,
    lease: datetime | None = None,
) -> int:
    from retinagate.models import Study

    study = Study(study_uid=f"1.2.3.{n}")
    session.add(study)
    session.flush()
    row = Instance(
        sop_instance_uid=f"1.2.3.{n}.1",
        study_id=study.id,
        series_uid=f"1.2.3.{n}.2",
        sop_class_uid="1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.4.50",
        storage_key=f"in/x/{n}.dcm",
        sha256="0" * 64,
        size_bytes=1,
        status=status,
        status_changed_at=changed,
        received_at=changed,
        attempts=attempts,
        last_error="DecodeError: broken" if attempts else None,
        lease_owner=None if lease is None else "other-host:123",
        lease_expires_at=lease,
    )
    session.add(row)
    session.flush()
    return row.id


def test_instances_stuck_waiting_are_sent_again_in_batches_with_one_more_attempt(
    db: tuple[Settings, Engine, sessionmaker[Session]],
) -> None:
    settings, _, sessions = db
    now = utcnow()
    with session_scope(sessions) as session:
        stuck = [_instance(session, InstanceStatus.RECEIVED, now - timedelta(seconds=61), n=i) for i in range(2)]
        stuck.append(_instance(session, InstanceStatus.QUEUED, now - timedelta(seconds=600), attempts=1, n=2))
        fresh = _instance(session, InstanceStatus.QUEUED, now - timedelta(seconds=30), n=3)

    outcome, sent = _run(settings, sessions, now)

    assert sorted(outcome.requeued) == sorted(stuck) and outcome.failed == []
    assert [len(b) for b in sent.score] == [2, 1] and sorted(i for b in sent.score for i in b) == sorted(stuck)
    with session_scope(sessions) as session:
        rows = {i: session.get_one(Instance, i) for i in [*stuck, fresh]}
        assert [rows[i].attempts for i in stuck] == [1, 1, 2]
        assert all(rows[i].status == InstanceStatus.QUEUED and rows[i].status_changed_at == now for i in stuck)
        assert rows[fresh].attempts == 0 and rows[fresh].status_changed_at < now

    again, sent_again = _run(settings, sessions, now + timedelta(seconds=1))
    assert again.requeued == [] and sent_again.score == []


def test_an_instance_whose_lease_ran_out_is_sent_again_at_once_without_counting_twice(
    db: tuple[Settings, Engine, sessionmaker[Session]],
) -> None:
    settings, _, sessions = db
    now = utcnow()
    with session_scope(sessions) as session:
        # Claimed 20 s ago by a worker that died 1 s after its last renewal: taken back now.
        dead = _instance(
            session,
            InstanceStatus.SCORING,
            now - timedelta(seconds=20),
            attempts=1,
            n=0,
            lease=now - timedelta(seconds=1),
        )
        # Claimed an hour ago by a slow worker that still renews: never taken from it.
        slow = _instance(
            session,
            InstanceStatus.SCORING,
            now - timedelta(hours=1),
            attempts=1,
            n=1,
            lease=now + timedelta(seconds=40),
        )

    outcome, sent = _run(settings, sessions, now)

    assert outcome.requeued == [dead] and sent.score == [[dead]]
    with session_scope(sessions) as session:
        row = session.get_one(Instance, dead)
        assert (row.attempts, row.status, row.lease_owner, row.lease_expires_at) == (
            1,
            InstanceStatus.QUEUED,
            None,
            None,
        )
        assert session.get_one(Instance, slow).status == InstanceStatus.SCORING


def test_a_claim_recorded_before_leases_existed_is_judged_by_its_age(
    db: tuple[Settings, Engine, sessionmaker[Session]],
) -> None:
    settings, _, sessions = db
    now = utcnow()
    with session_scope(sessions) as session:
        dead = _instance(session, InstanceStatus.SCORING, now - timedelta(seconds=61), attempts=1, n=0)
        running = _instance(session, InstanceStatus.SCORING, now - timedelta(seconds=20), attempts=1, n=1)

    outcome, sent = _run(settings, sessions, now)

    assert outcome.requeued == [dead] and sent.score == [[dead]]
    with session_scope(sessions) as session:
        assert session.get_one(Instance, dead).attempts == 1
        assert session.get_one(Instance, running).status == InstanceStatus.SCORING


def test_ungradable_scored_and_failed_instances_are_never_sent_again(
    db: tuple[Settings, Engine, sessionmaker[Session]],
) -> None:
    settings, _, sessions = db
    now = utcnow()
    old = now - timedelta(days=3)
    with session_scope(sessions) as session:
        done = [_instance(session, status, old, attempts=1, n=i) for i, status in
                enumerate((InstanceStatus.UNGRADABLE, InstanceStatus.SCORED, InstanceStatus.FAILED))]  # fmt: skip

    outcome, sent = _run(settings, sessions, now)

    assert outcome.requeued == [] and outcome.failed == [] and sent.score == []
    with session_scope(sessions) as session:
        assert [session.get_one(Instance, i).status for i in done] == [
            InstanceStatus.UNGRADABLE,
            InstanceStatus.SCORED,
            InstanceStatus.FAILED,
        ]


def test_an_instance_out_of_attempts_is_failed_with_its_last_error(
    db: tuple[Settings, Engine, sessionmaker[Session]],
) -> None:
    settings, _, sessions = db
    now = utcnow()
    with session_scope(sessions) as session:
        spent = _instance(session, InstanceStatus.QUEUED, now - timedelta(seconds=100), attempts=3, n=0)
        done = _instance(session, InstanceStatus.SCORED, now - timedelta(days=3), attempts=1, n=1)
        failed = _instance(session, InstanceStatus.FAILED, now - timedelta(days=3), attempts=1, n=2)

    outcome, sent = _run(settings, sessions, now)

    assert outcome.failed == [spent] and outcome.requeued == [] and sent.score == []
    with session_scope(sessions) as session:
        row = session.get_one(Instance, spent)
        assert row.status == InstanceStatus.FAILED
        assert row.last_error is not None
        assert row.last_error.startswith("DecodeError: broken") and "gave up after 3 attempts" in row.last_error
        assert session.get_one(Instance, done).status == InstanceStatus.SCORED
        assert session.get_one(Instance, failed).last_error == "DecodeError: broken"


def test_deliveries_left_pending_or_retrying_too_long_are_sent_again(
    db: tuple[Settings, Engine, sessionmaker[Session]],
) -> None:
    settings, _, sessions = db
    now = utcnow()
    with session_scope(sessions) as session:
        instance = _instance(session, InstanceStatus.SCORED, now, n=0)
        model = Model(name="m", version="1", sha256="b" * 64, card={}, active=True)
        session.add(model)
        session.flush()
        prediction = Prediction(instance_id=instance, model_id=model.id, probabilities={}, findings=[], duration_s=0.1)
        session.add(prediction)
        session.flush()
        outputs = []
        for n, kind in enumerate(("sc", "sr", "pm")):
            output = Output(
                prediction_id=prediction.id, kind=kind, sop_instance_uid=f"9.9.{n}", storage_key=f"out/{n}.dcm"
            )
            session.add(output)
            session.flush()
            outputs.append(output.id)
        rows = [
            (outputs[0], "PACS@127.0.0.1:104", DeliveryStatus.PENDING, 61),  # stuck
            (outputs[1], "PACS@127.0.0.1:104", DeliveryStatus.RETRYING, 100),  # may still be in backoff
            (outputs[2], "PACS@127.0.0.1:104", DeliveryStatus.RETRYING, 131),  # past backoff + time limit
            (outputs[1], "GONE@127.0.0.1:105", DeliveryStatus.PENDING, 999),  # destination no longer configured
            (outputs[2], "GONE@127.0.0.1:105", DeliveryStatus.DELIVERED, 999),
        ]
        for output_id, destination, status, age in rows:
            session.add(
                Delivery(
                    output_id=output_id, destination=destination, status=status, updated_at=now - timedelta(seconds=age)
                )
            )

    outcome, sent = _run(settings, sessions, now)

    assert outcome.redeliver == [outputs[0], outputs[2]] and sent.deliver == [[outputs[0], outputs[2]]]
    again, _ = _run(settings, sessions, now + timedelta(seconds=1))
    assert again.redeliver == []


def _outputs(session: Session, now: datetime, count: int) -> list[int]:
    instance = _instance(session, InstanceStatus.SCORED, now, n=0)
    model = Model(name="m", version="1", sha256="b" * 64, card={}, active=True)
    session.add(model)
    session.flush()
    prediction = Prediction(instance_id=instance, model_id=model.id, probabilities={}, findings=[], duration_s=0.1)
    session.add(prediction)
    session.flush()
    ids = []
    for n, kind in enumerate(("sc", "sr", "pm")[:count]):
        output = Output(prediction_id=prediction.id, kind=kind, sop_instance_uid=f"9.9.{n}", storage_key=f"out/{n}")
        session.add(output)
        session.flush()
        ids.append(output.id)
    return ids


def test_a_delivery_whose_senders_lease_ran_out_is_sent_again_and_a_live_senders_is_left_alone(
    db: tuple[Settings, Engine, sessionmaker[Session]],
) -> None:
    settings, _, sessions = db
    now = utcnow()
    with session_scope(sessions) as session:
        dead, alive = _outputs(session, now, 2)
        for output_id, lease in ((dead, now - timedelta(seconds=1)), (alive, now + timedelta(seconds=30))):
            session.add(
                Delivery(
                    output_id=output_id,
                    destination="PACS@127.0.0.1:104",
                    status=DeliveryStatus.PENDING,
                    updated_at=now - timedelta(hours=2),
                    lease_owner="other:1",
                    lease_expires_at=lease,
                )
            )

    outcome, sent = _run(settings, sessions, now)

    assert outcome.redeliver == [dead] and sent.deliver == [[dead]]
    with session_scope(sessions) as session:
        row = session.scalars(select(Delivery).where(Delivery.output_id == dead)).one()
        assert row.lease_owner is None and row.status == DeliveryStatus.PENDING


def test_failed_deliveries_are_sent_again_when_their_destination_answers_and_refusals_never(
    db: tuple[Settings, Engine, sessionmaker[Session]],
) -> None:
    settings, _, sessions = db
    now = utcnow()
    with session_scope(sessions) as session:
        gave_up, refused = _outputs(session, now, 2)
        session.add(
            Delivery(
                output_id=gave_up,
                destination="PACS@127.0.0.1:104",
                status=DeliveryStatus.FAILED,
                attempts=9,
                retryable=True,
                last_error="no association (gave up after 9 attempts)",
                updated_at=now - timedelta(seconds=121),
            )
        )
        session.add(
            Delivery(
                output_id=refused,
                destination="PACS@127.0.0.1:104",
                status=DeliveryStatus.FAILED,
                attempts=1,
                retryable=False,
                dimse_status=0xA900,
                updated_at=now - timedelta(days=1),
            )
        )
    probed: list[str] = []

    def down(destination: str) -> bool:
        probed.append(destination)
        return False

    outcome, sent = _run(settings, sessions, now, probe=down)
    assert probed == ["PACS@127.0.0.1:104"] and outcome.revived == {} and sent.deliver == []
    # Probed again only after delivery_probe_interval.
    _run(settings, sessions, now + timedelta(seconds=60), probe=down)
    assert len(probed) == 1

    outcome, sent = _run(settings, sessions, now + timedelta(seconds=121), probe=lambda destination: True)

    assert outcome.revived == {"PACS@127.0.0.1:104": 1} and sent.deliver == [[gave_up]]
    with session_scope(sessions) as session:
        rows = {row.output_id: row for row in session.scalars(select(Delivery))}
        assert (rows[gave_up].status, rows[gave_up].attempts, rows[gave_up].retryable) == (
            DeliveryStatus.PENDING,
            0,
            False,
        )
        assert rows[refused].status == DeliveryStatus.FAILED
        # Queued after the commit with a hand-off lease: were that message lost, it goes again once
        # the lease runs out (lease_seconds 60), not after stuck_after.
        assert (rows[gave_up].lease_owner or "").startswith(HANDOFF)
    revived = now + timedelta(seconds=121)
    assert _run(settings, sessions, revived + timedelta(seconds=59))[1].deliver == []
    assert _run(settings, sessions, revived + timedelta(seconds=61))[1].deliver == [[gave_up]]


def test_batches_split_and_refuse_a_zero_size() -> None:
    assert batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert batches([], 3) == []
    with pytest.raises(ValueError, match="size"):
        batches([1], 0)
