"""Delivery of produced outputs to PACS and viewers: C-STORE SCU, one association per destination.

Each destination's outcome is recorded per output in the ``deliveries`` table. A DICOM answer says
whether trying again can help:

- success (0x0000) and warnings (0xB000 coercion, 0xB006 elements discarded, 0xB007 data set does
  not match SOP class, and the other warning codes) count as delivered;
- transient: no connection (refused, timed out), an association rejected as transient, the
  association aborted or a DIMSE timeout, out of resources (0xA7xx), resource limitation (0x0213),
  processing failure (0x0110), cancel (0xFE00): retried with bounded exponential backoff;
- permanent: an association rejected as permanent, a SOP class or transfer syntax the destination
  does not accept (0x0122, no presentation context), a data set it cannot take (0xA9xx, 0xCxxx)
  and every other failure: recorded as failed, not retried.
"""

from __future__ import annotations

import logging
import ssl
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import select

from retinagate.db import session_scope
from retinagate.models import Delivery, DeliveryStatus, Output, utcnow
from worker.lease import expiry, handoff_owner, held_by_another, owner, renewing

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Destination, Settings
    from retinagate.storage import Storage

__all__ = [
    "DeliveryOutcome",
    "SendResult",
    "Timeouts",
    "classify_status",
    "deliver_outputs",
    "echo",
    "hand_off",
    "pending_deliveries",
    "reopen",
    "retry_delay",
    "send_to",
]

logger = logging.getLogger(__name__)

Verdict = Literal["delivered", "retry", "failed"]

_TRANSIENT_FAILURES = frozenset({0x0110, 0x0213, 0xFE00})
_MAX_CONTEXTS = 128  # presentation contexts one association may propose
_JPEG_HINT = "; for a destination that takes no JPEG, set RETINAGATE_SC_COMPRESSION=none"


def classify_status(status: int) -> Verdict:
    """What a C-STORE response status means for the delivery: delivered, retry later, or failed."""
    from pynetdicom.status import code_to_category

    if status < 0:
        raise ValueError(f"status: {status} is not a DIMSE status (0x0000-0xFFFF)")
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return "delivered"
    if 0xA700 <= status <= 0xA7FF or status in _TRANSIENT_FAILURES:
        return "retry"
    return "failed"


@dataclass(frozen=True)
class SendResult:
    """The result of one C-STORE: the verdict, the DIMSE status when one came back, and why."""

    verdict: Verdict
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for the TCP connection, association set-up, each DIMSE answer and the network."""

    connect: float = 10.0
    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0


def _contexts(sop_class: str, ts: str) -> list[tuple[str, tuple[str, ...]]]:
    """Presentation contexts to propose for a file: its own transfer syntax alone, so that the file's
    bytes go out as they are, and for uncompressed files a fallback the file can be converted to."""
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    uid = UID(ts)
    exact: list[tuple[str, tuple[str, ...]]] = [(sop_class, (str(uid),))]
    if uid.is_compressed or uid.is_deflated:
        return exact  # pynetdicom cannot re-encode compressed pixel data: offer it as it is
    return [*exact, (sop_class, (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)))]


def _send_one(assoc: Any, path: Path, sop_class: str, ts: str) -> Any:
    """C-STORE of one file: its bytes as they are when its own transfer syntax was accepted (no
    decoding and re-encoding, which costs tens of milliseconds for an SR), else the decoded dataset,
    which pynetdicom converts to an accepted uncompressed syntax."""
    from pydicom import dcmread
    from pynetdicom import _config

    exact = any(cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts for cx in assoc.accepted_contexts)
    if exact:
        _config.STORE_SEND_CHUNKED_DATASET = True  # only this process's SCU sends; read per call
        return assoc.send_c_store(path)
    return assoc.send_c_store(dcmread(path))


def send_to(
    destination: Destination,
    files: Sequence[tuple[int, Path]],
    *,
    calling_ae: str,
    ssl_context: ssl.SSLContext | None = None,
    timeouts: Timeouts = Timeouts(),
) -> dict[int, SendResult]:
    """Sends DICOM files to one destination over one association.

    Args:
        destination: Where to send.
        files: ``(key, path)`` pairs; the key names each file in the result.
        calling_ae: Our AE title.
        ssl_context: A client TLS context; None sends in the clear.
        timeouts: Network timeouts.

    Returns:
        A :class:`SendResult` for every key.
    """
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import JPEGBaseline8Bit
    from pynetdicom import AE, evt

    from retinagate.dicomnet import on_connection_open

    results: dict[int, SendResult] = {}
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    sendable: list[tuple[int, Path, str, str]] = []
    for key, path in files:
        try:
            meta = read_file_meta_info(path)
            sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        except FileNotFoundError:
            results[key] = SendResult("failed", error="the output file is missing from storage")
            continue
        except (InvalidDicomError, AttributeError, OSError) as exc:
            results[key] = SendResult("failed", error=f"the output file is unreadable: {exc}")
            continue
        contexts.update(dict.fromkeys(_contexts(sop_class, ts)))
        sendable.append((key, path, sop_class, ts))
    if not sendable:
        return results

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(
            f"files: {len(contexts)} presentation contexts, more than one association takes ({_MAX_CONTEXTS})"
        )
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))

    tls_args = (ssl_context, destination.host) if ssl_context is not None else None
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)],
    )
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        permanent = primitive is not None and primitive.result == 0x01
        reason = (
            f"association rejected ({primitive.result_str}; {primitive.source_str}; {primitive.reason_str})"
            if primitive is not None
            else "association rejected"
        )
        results.update({key: SendResult("failed" if permanent else "retry", error=reason) for key, *_ in sendable})
        return results
    accepted = assoc.acceptor.primitive
    if not assoc.is_established and accepted is not None and accepted.result == 0x00:
        # Accepted, then aborted by pynetdicom because no presentation context was: a configuration
        # mismatch that retrying cannot fix.
        unsupported = "the destination accepts none of the SOP classes or transfer syntaxes offered"
        results.update({key: SendResult("failed", error=unsupported) for key, *_ in sendable})
        return results
    if not assoc.is_established:
        refused = f"no association with {destination}: connection refused, timed out or aborted"
        results.update({key: SendResult("retry", error=refused) for key, *_ in sendable})
        return results

    try:
        for key, path, sop_class, ts in sendable:
            if not assoc.is_established:
                results[key] = SendResult("retry", error="the association ended before this file was sent")
                continue
            try:
                answer = _send_one(assoc, path, sop_class, ts)
            except ValueError as exc:  # no accepted presentation context for its SOP class or syntax
                hint = _JPEG_HINT if ts == JPEGBaseline8Bit else ""  # the heatmap SC's syntax by default
                results[key] = SendResult("failed", error=f"not accepted by the destination: {exc}{hint}")
                continue
            except (OSError, RuntimeError) as exc:
                results[key] = SendResult("retry", error=f"sending failed: {exc}")
                continue
            if "Status" not in answer:
                results[key] = SendResult("retry", error="no answer: DIMSE timeout or association aborted")
                continue
            status = int(answer.Status)
            verdict = classify_status(status)
            error = None if verdict == "delivered" else f"C-STORE answered 0x{status:04X}"
            results[key] = SendResult(verdict, status, error)
    finally:
        if assoc.is_established:
            assoc.release()
    return results


_TLS_CONTEXTS: dict[tuple[str, str, str], ssl.SSLContext] = {}


def client_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for delivery the settings describe (made once per process), or None.

    TLS 1.2 is the minimum; destination certificates are verified (host name included) against
    ``delivery_tls_ca``, or the system's trust store when it is not set; ``delivery_tls_cert`` and
    ``_key`` are offered to destinations that ask for a client certificate.

    Raises:
        ValueError: Naming the setting whose file is missing or unreadable.
    """
    if not settings.delivery_tls:
        return None
    key = (str(settings.delivery_tls_ca), str(settings.delivery_tls_cert), str(settings.delivery_tls_key))
    if key in _TLS_CONTEXTS:
        return _TLS_CONTEXTS[key]
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if settings.delivery_tls_ca is None else str(settings.delivery_tls_ca)
        )
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"delivery_tls_ca: cannot load {settings.delivery_tls_ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.delivery_tls_cert is not None and settings.delivery_tls_key is not None:
        from retinagate.tls import load_identity

        load_identity(context, settings.delivery_tls_cert, settings.delivery_tls_key, "delivery_tls")
    _TLS_CONTEXTS[key] = context
    return context


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
) -> dict[str, list[tuple[int, Path]]]:
    """Delivery rows still to send, by destination, leased to ``holder``; adds rows for destinations
    configured since scoring. A row another live sender holds is left to it (a message delivered
    twice, or a sweep that re-sent it, must not send the same file twice at once)."""
    now = utcnow()
    outputs = session.scalars(select(Output).where(Output.id.in_(output_ids)).order_by(Output.id)).all()
    pending = pending_deliveries(session, outputs, [str(d) for d in settings.destinations])
    plan: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    held = 0
    for output, row in pending:
        if held_by_another(row.lease_owner, row.lease_expires_at, holder, now):
            held += 1
            continue
        row.lease_owner, row.lease_expires_at = holder, expiry(settings.lease_seconds, now)
        session.flush()  # the id of a row added now
        plan[row.destination].append((row.id, storage.path(output.storage_key)))
    if held:
        logger.info("delivery: %d delivery(ies) held by another sender, left to it", held)
    return plan


def echo(
    settings: Settings, destination: str, timeouts: Timeouts = Timeouts(connect=5.0, acse=10.0, dimse=10.0)
) -> bool:
    """Whether ``destination`` (``AE@host:port``) answers C-ECHO now, with the delivery settings
    (our calling AE title, TLS). Any failure (refused, timed out, rejected, unreadable TLS files) is
    a no."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from retinagate.settings import Destination

    target = Destination.parse(destination)
    try:
        ssl_context = client_tls_context(settings)
    except ValueError:
        return False
    ae = AE(ae_title=settings.calling_ae_title)
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.add_requested_context(Verification)
    tls_args = (ssl_context, target.host) if ssl_context is not None else None
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return False
    try:
        answer = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    return "Status" in answer and int(answer.Status) == 0x0000


def deliver_outputs(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    output_ids: Sequence[int],
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeouts: Timeouts = Timeouts(),
) -> DeliveryOutcome:
    """Sends outputs to every configured destination that has not received them yet and records it.

    Outputs already delivered (or refused for good) to a destination are not sent again. A transient
    failure leaves the row ``retrying``, until it has been tried ``delivery_max_retries + 1`` times;
    then it is ``failed`` with its last error (``retryable``: the sweep's probe sends it again once
    the destination answers). The rows are leased to this process while they are sent, so the
    sweeper re-sends them soon after a sender dies, and never while it lives. ``ssl_context``
    defaults to the settings' (see :func:`client_tls_context`).

    Raises:
        ValueError: When the settings' TLS files cannot be loaded (see :func:`client_tls_context`).
    """
    from retinagate.settings import Destination

    if ssl_context is None:
        ssl_context = client_tls_context(settings)
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
            sent = send_to(
                Destination.parse(destination),
                files,
                calling_ae=settings.calling_ae_title,
                ssl_context=ssl_context,
                timeouts=timeouts,
            )
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
