"""The sweeper: finds work that Redis lost or a dead worker left, from SQL, and sends it again.

SQL is the source of truth and Redis only the transport (the outbox pattern). Each sweep:

- sends to ``score`` again an instance in ``scoring`` whose lease ran out (its worker died; see
  :mod:`worker.lease`), and one ``received`` or ``queued`` whose status has not moved for
  ``stuck_after`` seconds (its message was lost); until the instance has used ``max_attempts``,
  then it is marked failed with its last error;
- sends to ``deliver`` again a ``pending`` or ``retrying`` delivery whose lease ran out (its sender
  died, or the worker that recorded it died before queuing it: a hand-off lease, see
  :mod:`worker.lease`), and one no sender has touched for ``stuck_after`` seconds (``retrying``: also
  the longest backoff);
- probes (C-ECHO, or QIDO-RS for DICOMweb) each destination holding deliveries that failed after
  their retries ran out on transient errors, at most every ``delivery_probe_interval`` seconds; a
  destination that answers
  gets them all again, with a new round of retries. Refusals (a DICOM failure status, an
  association rejected for good) are never re-sent by the sweep: ``retinagate deliveries retry``
  does that by hand, once the cause is fixed.

Attempts: a sweep that re-sends a ``received`` or ``queued`` instance counts one attempt (no task
started, so none counted it); a ``scoring`` instance already counted its attempt when its task
started, so re-sending it adds none. A sweep never resets attempts.

The sweep is a task on the ``maintenance`` queue, which every worker consumes by default (scoring and
sending workers alike), so it does not depend on one kind of worker being alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, or_, select

from retinagate.db import session_scope
from retinagate.models import Delivery, DeliveryStatus, Instance, InstanceStatus, utcnow
from worker.delivery import reopen

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Settings

__all__ = ["SWEEP_LIMIT", "Probe", "SweepOutcome", "batches", "sweep"]

logger = logging.getLogger(__name__)

#: Rows handled per sweep at most, so one sweep stays a short transaction; the next takes the rest.
SWEEP_LIMIT = 1000

Enqueue = Callable[[list[int]], None]
#: Whether a destination, by name (``AE@host:port``, a DICOMweb root), answers now.
Probe = Callable[[str], bool]


@dataclass
class SweepOutcome:
    """Instance ids sent to ``score`` again or failed, and output ids sent to ``deliver`` again."""

    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    redeliver: list[int] = field(default_factory=list)
    #: Destinations that answered the probe and got their failed deliveries again, with how many.
    revived: dict[str, int] = field(default_factory=dict)


def batches(ids: Sequence[int], size: int) -> list[list[int]]:
    """Splits ``ids`` into lists of at most ``size``."""
    if size < 1:
        raise ValueError(f"size: {size} is below 1")
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def _stuck_instances(session: Session, settings: Settings, now: datetime) -> Sequence[Instance]:
    waiting = now - timedelta(seconds=settings.stuck_after)
    # A claim from before leases existed (no lease recorded) is judged by its age, as it was then.
    unleased = now - timedelta(seconds=max(settings.stuck_after, settings.task_time_limit))
    query = (
        select(Instance)
        .where(
            or_(
                and_(
                    Instance.status.in_([InstanceStatus.RECEIVED, InstanceStatus.QUEUED]),
                    Instance.status_changed_at < waiting,
                ),
                and_(Instance.status == InstanceStatus.SCORING, Instance.lease_expires_at < now),
                and_(
                    Instance.status == InstanceStatus.SCORING,
                    Instance.lease_expires_at.is_(None),
                    Instance.status_changed_at < unleased,
                ),
            )
        )
        .order_by(Instance.status_changed_at, Instance.id)
        .limit(SWEEP_LIMIT)
    )
    return session.scalars(query).all()


def _stuck_deliveries(session: Session, settings: Settings, now: datetime) -> Sequence[Delivery]:
    pending = now - timedelta(seconds=settings.stuck_after)
    # A retrying row may be waiting out its backoff: give it the longest backoff and one task run.
    retrying = now - timedelta(
        seconds=max(settings.stuck_after, settings.delivery_backoff_max + settings.task_time_limit)
    )
    open_statuses = [DeliveryStatus.PENDING, DeliveryStatus.RETRYING]
    query = (
        select(Delivery)
        .where(
            Delivery.destination.in_([d.name for d in settings.destinations]),
            or_(
                and_(Delivery.status.in_(open_statuses), Delivery.lease_expires_at < now),
                and_(
                    Delivery.lease_expires_at.is_(None),
                    or_(
                        and_(Delivery.status == DeliveryStatus.PENDING, Delivery.updated_at < pending),
                        and_(Delivery.status == DeliveryStatus.RETRYING, Delivery.updated_at < retrying),
                    ),
                ),
            ),
        )
        .order_by(Delivery.updated_at, Delivery.id)
        .limit(SWEEP_LIMIT)
    )
    return session.scalars(query).all()


def _probe_due(session: Session, settings: Settings, now: datetime) -> dict[str, list[Delivery]]:
    """Retryable failed deliveries not probed for ``delivery_probe_interval``, by destination."""
    due = now - timedelta(seconds=settings.delivery_probe_interval)
    query = (
        select(Delivery)
        .where(
            Delivery.destination.in_([d.name for d in settings.destinations]),
            Delivery.status == DeliveryStatus.FAILED,
            Delivery.retryable.is_(True),
            Delivery.updated_at < due,
        )
        .order_by(Delivery.id)
        .limit(SWEEP_LIMIT)
    )
    found: dict[str, list[Delivery]] = {}
    for row in session.scalars(query):
        found.setdefault(row.destination, []).append(row)
    return found


def _revive(
    settings: Settings, sessions: sessionmaker[Session], probe: Probe, now: datetime, outcome: SweepOutcome
) -> list[int]:
    """Probes destinations with retryable failed deliveries; returns the outputs to send again."""
    with session_scope(sessions) as session:
        destinations = {name: [row.id for row in rows] for name, rows in _probe_due(session, settings, now).items()}
    if not destinations:
        return []
    answered = {name: probe(name) for name in destinations}  # outside any transaction: network waits
    outputs: set[int] = set()
    with session_scope(sessions) as session:
        for name, ids in destinations.items():
            rows = session.scalars(
                select(Delivery).where(Delivery.id.in_(ids), Delivery.status == DeliveryStatus.FAILED)
            ).all()
            if not answered[name]:
                for row in rows:
                    row.updated_at = now  # probed: the next probe waits for the interval
            elif rows:
                outputs |= reopen(rows, now, settings.lease_seconds)
                outcome.revived[name] = len(rows)
    return sorted(outputs)


def sweep(
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue_score: Enqueue,
    enqueue_deliver: Enqueue,
    now: datetime | None = None,
    probe: Probe | None = None,
) -> SweepOutcome:
    """Re-sends stuck work and fails instances out of attempts; see the module docstring.

    Rows are updated (status ``queued``, timestamps moved on) and committed before anything is sent,
    so a worker never picks up a message for a row that still looks stuck. If sending fails, the
    rows are stuck again after ``stuck_after`` and the next sweep tries again.

    Args:
        settings: Timeouts, attempt limits, destinations and the batch size.
        sessions: Database sessions.
        enqueue_score: Sends one ``score`` task for a list of instance ids.
        enqueue_deliver: Sends one ``deliver`` task for a list of output ids.
        now: The current time (tests pass one).
        probe: Whether a destination answers now; default its echo (C-ECHO, QIDO-RS) with the delivery settings
            (:func:`worker.delivery.echo`).
    """
    now = now or utcnow()
    outcome = SweepOutcome()
    with session_scope(sessions) as session:
        for row in _stuck_instances(session, settings, now):
            stuck_in = row.status.value
            if row.attempts >= settings.max_attempts:
                reason = row.last_error or "no result"
                row.status = InstanceStatus.FAILED
                row.last_error = f"{reason} (gave up after {row.attempts} attempts; last stuck in {stuck_in})"[:2000]
                outcome.failed.append(row.id)
            else:
                if row.status != InstanceStatus.SCORING:
                    row.attempts += 1
                row.status = InstanceStatus.QUEUED
                outcome.requeued.append(row.id)
            row.status_changed_at = now
            row.lease_owner = row.lease_expires_at = None
        outputs: set[int] = set()
        for delivery in _stuck_deliveries(session, settings, now):
            delivery.updated_at = now
            delivery.lease_owner = delivery.lease_expires_at = None
            outputs.add(delivery.output_id)

    if probe is None:
        from worker.delivery import echo

        def probe(destination: str) -> bool:
            return echo(settings, destination)

    outputs.update(_revive(settings, sessions, probe, now, outcome))
    outcome.redeliver = sorted(outputs)

    for batch in batches(outcome.requeued, settings.batch_size):
        enqueue_score(batch)
    for batch in batches(outcome.redeliver, 100):
        enqueue_deliver(batch)
    if outcome.requeued or outcome.failed or outcome.redeliver:
        logger.warning(
            "sweep: %d instance(s) sent to score again, %d failed after %d attempts, %d output(s) to deliver again",
            len(outcome.requeued),
            len(outcome.failed),
            settings.max_attempts,
            len(outcome.redeliver),
        )
    for destination, count in outcome.revived.items():
        logger.warning("sweep: %s answers again; %d failed delivery(ies) sent again", destination, count)
    return outcome
