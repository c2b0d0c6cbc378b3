"""Storage retention: old received photographs go once their work is done; rows, results and outputs stay."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from retinagate.db import make_engine, session_factory, session_scope
from retinagate.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceStatus,
    Output,
    Prediction,
    utcnow,
)
from retinagate.settings import Settings
from retinagate.storage import Storage
from worker.retention import prune

NOW = utcnow()
OLD = NOW - timedelta(days=40)


@dataclass
class Site:
    """A migrated database with scored instances (one SC output each) and their storage."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    instances: list[int]
    outputs: list[int]

    def set(self, instance_id: int, **values: Any) -> None:
        with session_scope(self.sessions) as s:
            row = s.get_one(Instance, instance_id)
            for name, value in values.items():
                setattr(row, name, value)

    def deliver(self, output_id: int, status: DeliveryStatus) -> None:
        with session_scope(self.sessions) as s:
            s.add(Delivery(output_id=output_id, destination="PACS@127.0.0.1:104", status=status))

    def file(self, instance_id: int) -> Path:
        with session_scope(self.sessions) as s:
            return self.storage.path(s.get_one(Instance, instance_id).storage_key)

    def output_file(self, output_id: int) -> Path:
        with session_scope(self.sessions) as s:
            return self.storage.path(s.get_one(Output, output_id).storage_key)

    def pruned_at(self) -> dict[int, datetime | None]:
        with session_scope(self.sessions) as s:
            return {row.id: row.pruned_at for row in s.scalars(select(Instance))}

    def counts(self) -> tuple[int, ...]:
        with session_scope(self.sessions) as s:
            return tuple(
                int(s.scalar(select(func.count()).select_from(t)) or 0)
                for t in (Instance, Prediction, Output, Delivery)
            )

    def prune(self, **kwargs: Any) -> Any:
        kwargs.setdefault("now", NOW)
        return prune(self.settings, self.sessions, self.storage, **kwargs)


@pytest.fixture
def site(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]]
) -> Iterator[Callable[..., Site]]:
    engines = []

    def make(count: int, **overrides: Any) -> Site:
        overrides.setdefault("retention_days", 30)
        settings = make_settings(**overrides)
        outputs = worker_store_outputs(settings, count)
        engine = make_engine(settings)
        engines.append(engine)
        sessions = session_factory(engine)
        with session_scope(sessions) as s:
            instances = [s.get_one(Output, o).prediction.instance_id for o in outputs]
        return Site(settings, sessions, Storage(settings.resolved_storage_dir), instances, outputs)

    yield make
    for engine in engines:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_only_old_finished_and_fully_delivered_photographs_are_removed_and_every_row_and_output_stays(
    site: Callable[..., Site], backend: str, request: pytest.FixtureRequest
) -> None:
    overrides = {"database_url": request.getfixturevalue("fresh_postgres_url")} if backend == "postgresql" else {}
    b = site(6, **overrides)
    delivered, pending, retrying, queued, failed, recent = b.instances
    for instance in b.instances[:-1]:
        b.set(instance, received_at=OLD)
    b.deliver(b.outputs[0], DeliveryStatus.DELIVERED)
    b.deliver(b.outputs[1], DeliveryStatus.PENDING)
    b.deliver(b.outputs[2], DeliveryStatus.RETRYING)
    b.set(queued, status=InstanceStatus.QUEUED)
    b.set(failed, status=InstanceStatus.FAILED)
    before = b.counts()
    sizes = b.file(delivered).stat().st_size + b.file(failed).stat().st_size

    outcome = b.prune()

    assert outcome.pruned == [delivered, failed] and outcome.held_back == 3 and outcome.remaining == 0
    assert outcome.pruned_bytes == sizes
    assert not b.file(delivered).exists() and not b.file(failed).exists()
    assert all(b.file(i).exists() for i in (pending, retrying, queued, recent))
    assert all(b.output_file(o).exists() for o in b.outputs)  # the heatmaps and reports stay
    assert b.counts() == before
    stamps = b.pruned_at()
    assert stamps[delivered] == stamps[failed] == NOW
    assert all(stamps[i] is None for i in (pending, retrying, queued, recent))


def test_a_second_run_finds_nothing_to_do_and_keeps_the_first_runs_stamp(site: Callable[..., Site]) -> None:
    b = site(2)
    for instance in b.instances:
        b.set(instance, received_at=OLD)
    assert b.prune().pruned == b.instances

    again = b.prune(now=NOW + timedelta(days=1))

    assert again.pruned == [] and again.due == 0 and again.leftovers_removed == 0
    assert set(b.pruned_at().values()) == {NOW}


def test_a_dry_run_counts_what_is_due_and_changes_nothing(site: Callable[..., Site]) -> None:
    b = site(3)
    for instance in b.instances[:2]:
        b.set(instance, received_at=OLD)
    sizes = sum(b.file(i).stat().st_size for i in b.instances[:2])

    outcome = b.prune(dry_run=True)

    assert outcome.dry_run and outcome.due == 2 and outcome.due_bytes == sizes and outcome.pruned == []
    assert all(b.file(i).exists() for i in b.instances)
    assert set(b.pruned_at().values()) == {None}


def test_retention_zero_keeps_everything_forever(site: Callable[..., Site]) -> None:
    b = site(1, retention_days=0)
    b.set(b.instances[0], received_at=NOW - timedelta(days=3650))

    outcome = b.prune()

    assert outcome.pruned == [] and outcome.due == 0 and b.file(b.instances[0]).exists()
    assert b.pruned_at() == {b.instances[0]: None}


def test_a_run_marks_at_most_its_limit_oldest_first_and_leaves_the_rest_for_the_next(
    site: Callable[..., Site],
) -> None:
    b = site(3)
    for age, instance in zip((50, 40, 35), b.instances, strict=True):
        b.set(instance, received_at=NOW - timedelta(days=age))

    first = b.prune(limit=2)
    second = b.prune(limit=2)

    assert first.pruned == b.instances[:2] and first.remaining == 1
    assert second.pruned == b.instances[2:] and second.remaining == 0


def test_files_a_run_marked_but_did_not_remove_are_removed_by_the_next(site: Callable[..., Site]) -> None:
    # A run that stopped between its commit and the removal (a killed worker) left rows marked and
    # files on disk: never a row pointing at a missing file without saying so, only space.
    b = site(1)
    instance = b.instances[0]
    b.set(instance, received_at=OLD, pruned_at=NOW)
    assert b.file(instance).exists()

    outcome = b.prune(now=NOW + timedelta(days=1))

    assert outcome.leftovers_removed == 1 and outcome.pruned == [] and not b.file(instance).exists()


def test_day_folders_left_empty_are_removed_and_the_storage_root_stays(site: Callable[..., Site]) -> None:
    b = site(1)
    instance = b.instances[0]
    b.set(instance, received_at=OLD)
    day = b.file(instance).parent

    b.prune()

    assert not day.exists() and (b.storage.root / "in").is_dir()


def test_a_file_that_cannot_be_removed_is_reported_and_tried_again_next_time(
    site: Callable[..., Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = site(1)
    instance = b.instances[0]
    b.set(instance, received_at=OLD)

    def refuse(self: Storage, key: str) -> None:
        raise PermissionError(13, "read-only volume")

    with monkeypatch.context() as m:
        m.setattr(Storage, "delete", refuse)
        failed = b.prune()
    retried = b.prune(now=NOW + timedelta(hours=1))

    assert failed.pruned == [] and list(failed.errors) == [instance] and "read-only" in failed.errors[instance]
    assert retried.leftovers_removed == 1 and not b.file(instance).exists()
