"""Delivery of produced outputs to PACS and viewers, one send per destination and call.

Each destination's outcome is recorded per output in the ``deliveries`` table, under the
destination's name; the destination itself is the typed value of the settings
(:mod:`retinagate.destinations`: C-STORE or STOW-RS), looked up by that name. Its verdict for each
file says whether trying again can help: delivered (success and warnings); retry (no connection, a
transient rejection or status): retried with bounded exponential backoff, then ``failed`` and
``retryable`` for the sweep's probe; failed (a permanent rejection, a SOP class or data set the
destination does not take): recorded, not retried. Which answers are which is the protocol
module's to say.
"""

from __future__ import annotations

import logging
import ssl
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from retinagate.db import session_scope
from retinagate.destinations import Connection, Destination, SendResult, Timeouts, TlsFiles
from retinagate.models import Delivery, DeliveryStatus, Output, utcnow
from worker.lease import expiry, handoff_owner, held_by_another, owner, renewing

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Settings
    from retinagate.storage import Storage

__all__ = [
    "DeliveryOutcome",
    "check_destination",
    "check_destinations",
    "client_tls_context",
    "connection",
    "deliver_outputs",
    "echo",
    "hand_off",
    "pending_deliveries",
    "reopen",
    "retry_delay",
]

logger = logging.getLogger(__name__)

_TLS_CONTEXTS: dict[tuple[str, str, str], ssl.SSLContext] = {}


def client_tls_context(files: TlsFiles | None) -> ssl.SSLContext | None:
    """The client TLS context for ``files`` (:meth:`retinagate.settings.Settings.tls_for`), made
    once per process, or None without TLS.

    TLS 1.2 is the minimum; destination certificates are verified (host name included) against the
    CA file, or the system's trust store when there is none; the certificate and key are offered to
    destinations that ask for a client certificate.

    Raises:
        ValueError: Naming the setting whose file is missing or unreadable.
    """
    if files is None:
        return None
    key = (str(files.ca), str(files.cert), str(files.key))
    if key in _TLS_CONTEXTS:
        return _TLS_CONTEXTS[key]
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if files.ca is None else str(files.ca)
        )
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{files.source}_ca: cannot load {files.ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.cert is not None and files.key is not None:
        from retinagate.tls import load_identity

        load_identity(context, files.cert, files.key, files.source)
    _TLS_CONTEXTS[key] = context
    return context


def check_destinations(settings: Settings) -> None:
    """Loads every destination's TLS files and reads its secret files, as sending will (a worker
    checks them before it starts).

    Raises:
        ValueError: Naming the first setting whose file is missing or unreadable.
    """
    for destination in settings.destinations:
        check_destination(settings, destination)


def check_destination(settings: Settings, destination: Destination) -> None:
    """Loads one destination's TLS files and reads its secret files; raises ``ValueError`` naming
    the setting whose file is missing or unreadable."""
    client_tls_context(settings.tls_for(destination))
    destination.check_files()


def retry_delay(settings: Settings, attempts: int) -> float:
    """Seconds before the next try after ``attempts`` tries: doubling from ``delivery_backoff``, capped."""
    if attempts < 1:
        raise ValueError(f"attempts: {attempts} is below 1")
    return float(min(settings.delivery_backoff * 2.0 ** min(attempts - 1, 62), settings.delivery_backoff_max))


@dataclass
class DeliveryOutcome:
    """What one :func:`deliver_outputs` call did, by delivery row id."""

    delivered: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    #: Outputs with a delivery to try again, and how long to wait first.
    retry_outputs: list[int] = field(default_factory=list)
    retry_in: float = 0.0


def pending_deliveries(
    session: Session, outputs: Sequence[Output], destinations: Sequence[str]
) -> list[tuple[Output, Delivery]]:
    """The delivery rows still to send (``pending`` or ``retrying``) of ``outputs`` to ``destinations``,
    in that order; adds a ``pending`` row where a destination has none (flush for its id).

    One query for the rows of every output, not one per output.
    """
    rows: dict[int, dict[str, Delivery]] = defaultdict(dict)
    query = select(Delivery).where(Delivery.output_id.in_([output.id for output in outputs]))
    for row in session.scalars(query):
        rows[row.output_id][row.destination] = row
    pending: list[tuple[Output, Delivery]] = []
    for output in outputs:
        for destination in destinations:
            known = rows[output.id].get(destination)
            if known is None:
                row = Delivery(output_id=output.id, destination=destination, status=DeliveryStatus.PENDING)
                session.add(row)
            else:
                row = known
            if row.status in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING):
                pending.append((output, row))
    return pending


def hand_off(rows: Iterable[Delivery], lease_seconds: float, now: datetime | None = None) -> None:
    """Puts a hand-off lease (:mod:`worker.lease`) on deliveries about to be queued after the commit,
    so that they are sent again within ``lease_seconds`` and a sweep if the ``deliver`` message is
    never sent (the worker died in between). A row a live sender holds is left to it.

    The cost: a ``deliver`` message still waiting in the queue when the lease runs out gets a second
    one from the sweep; whichever runs second finds the rows sent (or held) and does nothing.
    """
    now, holder = now or utcnow(), owner()
    handoff = handoff_owner(holder)
    for row in rows:
        if not held_by_another(row.lease_owner, row.lease_expires_at, holder, now):
            row.lease_owner, row.lease_expires_at = handoff, expiry(lease_seconds, now)


def reopen(rows: Sequence[Delivery], now: datetime, lease_seconds: float) -> set[int]:
    """Gives failed deliveries a new round of retries (``pending``, attempts back to 0); returns
    their outputs, to be queued for ``deliver`` after the commit. Each carries a hand-off lease
    (:func:`hand_off`: swept within ``lease_seconds`` if that message never goes). The last error
    stays until the next try."""
    outputs: set[int] = set()
    for row in rows:
        row.status = DeliveryStatus.PENDING
        row.attempts = 0
        row.retryable = False
        row.updated_at = now
        outputs.add(row.output_id)
    hand_off(rows, lease_seconds, now)
    return outputs


def _plan(
    session: Session, settings: Settings, storage: Storage, output_ids: Sequence[int], holder: str
) -> dict[Destination, list[tuple[int, Path]]]:
    """Delivery rows still to send, by destination, leased to ``holder``; adds rows for destinations
    configured since scoring. A row another live sender holds is left to it (a message delivered
    twice, or a sweep that re-sent it, must not send the same file twice at once)."""
    now = utcnow()
    outputs = session.scalars(select(Output).where(Output.id.in_(output_ids)).order_by(Output.id)).all()
    configured = {d.name: d for d in settings.destinations}
    pending = pending_deliveries(session, outputs, list(configured))
    plan: dict[Destination, list[tuple[int, Path]]] = defaultdict(list)
    held = 0
    for output, row in pending:
        if held_by_another(row.lease_owner, row.lease_expires_at, holder, now):
            held += 1
            continue
        row.lease_owner, row.lease_expires_at = holder, expiry(settings.lease_seconds, now)
        session.flush()  # the id of a row added now
        plan[configured[row.destination]].append((row.id, storage.path(output.storage_key)))
    if held:
        logger.info("delivery: %d delivery(ies) held by another sender, left to it", held)
    return plan


def connection(settings: Settings, destination: Destination, timeouts: Timeouts = Timeouts()) -> Connection:
    """How this process reaches ``destination``: our AE title, its client TLS
    (:meth:`retinagate.settings.Settings.tls_for`), ``timeouts``.

    Raises:
        ValueError: When its TLS files cannot be loaded (see :func:`client_tls_context`).
    """
    return Connection(settings.calling_ae_title, client_tls_context(settings.tls_for(destination)), timeouts)


def echo(
    settings: Settings, destination: str, timeouts: Timeouts = Timeouts(connect=5.0, acse=10.0, dimse=10.0)
) -> bool:
    """Whether the configured destination of that name answers now (C-ECHO, a QIDO-RS query), with
    the delivery settings (our calling AE title, TLS). Any failure (refused, timed out, rejected,
    unreadable TLS files, a destination no longer configured) is a no."""
    target = settings.destination(destination)
    if target is None:
        return False
    try:
        return target.echo(connection(settings, target, timeouts))
    except ValueError:
        return False


def deliver_outputs(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    output_ids: Sequence[int],
    *,
    timeouts: Timeouts = Timeouts(),
) -> DeliveryOutcome:
    """Sends outputs to every configured destination that has not received them yet and records it.

    Outputs already delivered (or refused for good) to a destination are not sent again. A transient
    failure leaves the row ``retrying``, until it has been tried ``delivery_max_retries + 1`` times;
    then it is ``failed`` with its last error (``retryable``: the sweep's probe sends it again once
    the destination answers). The rows are leased to this process while they are sent, so the
    sweeper re-sends them soon after a sender dies, and never while it lives. A destination whose
    TLS files cannot be loaded (the worker checked them at start; one changed since) is tried again
    like one that does not answer, with an error naming the setting; the probe sends its deliveries
    again once the files load.
    """
    outcome = DeliveryOutcome()
    ids = list(dict.fromkeys(int(i) for i in output_ids))
    if not ids or not settings.destinations:
        return outcome
    holder = owner()
    with session_scope(sessions) as session:
        plan = _plan(session, settings, storage, ids, holder)

    results: dict[int, SendResult] = {}
    leased = [key for files in plan.values() for key, _ in files]
    with renewing(sessions, Delivery, leased, settings.lease_seconds, holder):
        for destination, files in plan.items():
            try:
                via = connection(settings, destination, timeouts)
            except ValueError as exc:
                sent = {key: SendResult("retry", error=str(exc)) for key, _ in files}
            else:
                sent = destination.send(files, via)
            results.update(sent)
            counts = {v: sum(1 for r in sent.values() if r.verdict == v) for v in ("delivered", "retry", "failed")}
            logger.info(
                "delivery to %s: %d delivered, %d to retry, %d failed",
                destination,
                counts["delivered"],
                counts["retry"],
                counts["failed"],
            )

    now = utcnow()
    retry_attempts: list[int] = []
    retry_outputs: set[int] = set()
    with session_scope(sessions) as session:
        for row in session.scalars(select(Delivery).where(Delivery.id.in_(list(results))).order_by(Delivery.id)):
            result = results[row.id]
            row.attempts += 1
            row.updated_at = now
            row.dimse_status = result.status
            row.last_error = result.error
            row.lease_owner = row.lease_expires_at = None
            if result.verdict == "delivered":
                row.status = DeliveryStatus.DELIVERED
                row.delivered_at = now
                outcome.delivered.append(row.id)
            elif result.verdict == "retry" and row.attempts <= settings.delivery_max_retries:
                row.status = DeliveryStatus.RETRYING
                outcome.retrying.append(row.id)
                retry_attempts.append(row.attempts)
                retry_outputs.add(row.output_id)
            else:
                if result.verdict == "retry":
                    row.last_error = f"{result.error} (gave up after {row.attempts} attempts)"
                row.retryable = result.verdict == "retry"  # the sweep's probe sends it again later
                row.status = DeliveryStatus.FAILED
                outcome.failed.append(row.id)
                logger.warning("delivery id=%s failed: %s", row.id, row.last_error)
    if retry_outputs:
        outcome.retry_outputs = sorted(retry_outputs)
        outcome.retry_in = retry_delay(settings, min(retry_attempts))
    return outcome
