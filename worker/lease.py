"""Leases: a worker's claim on the rows it is working on, renewed while it is alive.

An instance in ``scoring`` and a delivery being sent carry the identity of the worker process on
them (``host:pid``) and a lease expiry. While the work runs, a :class:`Renewal` thread in the same
process pushes the expiry forward every third of ``lease_seconds``. A worker that dies (SIGKILL, an
out-of-memory kill, a container restart, Celery's hard time limit) stops renewing; once its leases
have run out, the sweeper sends the work again. A slow but live worker keeps renewing, so its work
is never taken from it.

Why a lease rather than a timeout on the status: the old rule waited ``max(stuck_after,
task_time_limit)`` (15 minutes by default) before it could tell a dead worker from a slow one. A
lease tells them apart within ``lease_seconds`` of the death, whatever the task's length.

The renewal writes only rows that are still this worker's (``lease_owner`` matches), so a row the
sweeper already handed to another worker is never taken back by a late renewal.

A hand-off lease (owner ``handoff:host:pid``) covers the gap between a transaction that records
deliveries and the ``deliver`` message sent after its commit. A worker killed in that gap leaves
deliveries no sender will ever hear of; their hand-off lease runs out and the sweeper sends them
within ``lease_seconds`` plus a sweep, not after ``stuck_after``. A hand-off lease belongs to no
sender: any sender takes the row over at once (:func:`held_by_another`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from retinagate.db import session_scope
from retinagate.models import Delivery, Instance, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["HANDOFF", "Renewal", "expiry", "handoff_owner", "held_by_another", "owner", "renewing"]

logger = logging.getLogger(__name__)

Leased = type[Instance] | type[Delivery]


def owner() -> str:
    """This process's identity in a lease: ``host:pid`` (pids differ between a worker's pool processes)."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


#: The owner prefix of a hand-off lease (see the module docstring).
HANDOFF = "handoff:"


def handoff_owner(holder: str) -> str:
    """The owner of a hand-off lease taken by ``holder`` (an :func:`owner`)."""
    return f"{HANDOFF}{holder}"[:128]


def held_by_another(lease_owner: str | None, lease_expires_at: datetime | None, holder: str, now: datetime) -> bool:
    """Whether a live worker other than ``holder`` holds a row now. A hand-off lease holds nothing
    against a worker taking the row: it only keeps the sweeper away until it runs out."""
    return (
        lease_owner not in (None, holder)
        and not lease_owner.startswith(HANDOFF)
        and lease_expires_at is not None
        and lease_expires_at > now
    )


def expiry(lease_seconds: float, now: datetime | None = None) -> datetime:
    """When a lease taken or renewed now runs out."""
    return (now or utcnow()) + timedelta(seconds=lease_seconds)


class Renewal:
    """A thread that renews this process's leases on ``ids`` of ``table`` until :meth:`stop`.

    Args:
        sessions: Database sessions.
        table: :class:`~retinagate.models.Instance` or :class:`~retinagate.models.Delivery`.
        ids: The rows claimed.
        lease_seconds: The lease; renewed every third of it, so two renewals may fail in a row
            (a database that is briefly away) before the lease runs out.
        holder: The lease owner written at the claim (default: :func:`owner`).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        table: Leased,
        ids: Sequence[int],
        lease_seconds: float,
        holder: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.table = table
        self.ids = list(ids)
        self.lease_seconds = lease_seconds
        self.holder = holder or owner()
        self.renewals = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"retinagate-lease-{table.__tablename__}", daemon=True)

    def start(self) -> Renewal:
        if self.ids:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def renew(self) -> int:
        """Pushes the expiry of the rows still held forward; returns how many were renewed."""
        table = self.table
        with session_scope(self.sessions) as session:
            result = session.execute(
                update(table)
                .where(table.id.in_(self.ids), table.lease_owner == self.holder)
                .values(lease_expires_at=expiry(self.lease_seconds))
                .execution_options(synchronize_session=False)
            )
        self.renewals += 1
        return int(getattr(result, "rowcount", 0) or 0)

    def _run(self) -> None:
        interval = self.lease_seconds / 3.0
        while not self._stopped.wait(interval):
            try:
                self.renew()
            except SQLAlchemyError as exc:  # the database is away: try again at the next interval
                logger.warning(
                    "lease renewal of %d %s failed: %s", len(self.ids), self.table.__tablename__, type(exc).__name__
                )


@contextmanager
def renewing(
    sessions: sessionmaker[Session], table: Leased, ids: Sequence[int], lease_seconds: float, holder: str | None = None
) -> Iterator[Renewal]:
    """Renews the leases on ``ids`` for as long as the block runs."""
    renewal = Renewal(sessions, table, ids, lease_seconds, holder).start()
    try:
        yield renewal
    finally:
        renewal.stop()
