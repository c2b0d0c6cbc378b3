"""The sweeper: finds work that Redis lost, from SQL, and sends it again.

SQL is the source of truth and Redis only the transport (the outbox pattern). An instance whose
status has not moved for ``stuck_after`` seconds while ``received`` or ``queued`` has no live message;
one ``scoring`` for longer than the task time limit belongs to a dead worker. Both are sent to
``score`` again, until the instance has used ``max_attempts``; then it is marked failed with its last
error. Deliveries left ``pending`` or ``retrying`` past the same timeout are sent to ``deliver`` again.

Attempts: a sweep that re-sends a ``received`` or ``queued`` instance counts one attempt (no task
started, so none counted it); a ``scoring`` instance already counted its attempt when its task
started, so re-sending it adds none.
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

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Settings

__all__ = ["SWEEP_LIMIT", "SweepOutcome", "batches", "sweep"]

logger = logging.getLogger(__name__)

#: Rows handled per sweep at most, so one sweep stays a short transaction; the next takes the rest.
SWEEP_LIMIT = 1000

Enqueue = Callable[[list[int]], None]


@dataclass
class SweepOutcome:
    """Instance ids sent to ``score`` again or failed, and output ids sent to ``deliver`` again."""

    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    redeliver: list[int] = field(default_factory=list)


def batches(ids: Sequence[int], size: int) -> list[list[int]]:
    """Splits ``ids`` into lists of at most ``size``."""
    if size < 1:
        raise ValueError(f"size: {size} is below 1")
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def _stuck_instances(session: Session, settings: Settings, now: datetime) -> Sequence[Instance]:
    waiting = now - timedelta(seconds=settings.stuck_after)
    running = now - timedelta(seconds=max(settings.stuck_after, settings.task_time_limit))
    query = (
        select(Instance)
        .where(
            or_(
                and_(
                    Instance.status.in_([InstanceStatus.RECEIVED, InstanceStatus.QUEUED]),
                    Instance.status_changed_at < waiting,
                ),
                and_(Instance.status == InstanceStatus.SCORING, Instance.status_changed_at < running),
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
    query = (
        select(Delivery)
        .where(
            Delivery.destination.in_([str(d) for d in settings.destinations]),
            or_(
                and_(Delivery.status == DeliveryStatus.PENDING, Delivery.updated_at < pending),
                and_(Delivery.status == DeliveryStatus.RETRYING, Delivery.updated_at < retrying),
            ),
        )
        .order_by(Delivery.updated_at, Delivery.id)
        .limit(SWEEP_LIMIT)
    )
    return session.scalars(query).all()


def sweep(
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue_score: Enqueue,
    enqueue_deliver: Enqueue,
    now: datetime | None = None,
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
        outputs: set[int] = set()
        for delivery in _stuck_deliveries(session, settings, now):
            delivery.updated_at = now
            outputs.add(delivery.output_id)
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
    return outcome
