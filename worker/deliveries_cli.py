"""``retinagate deliveries``: see what could not be delivered, and send it again.

The policy (README, "Reliability"): a transient failure is retried with backoff
(``delivery_backoff`` doubling to ``delivery_backoff_max``, ``delivery_max_retries`` times); when the
retries run out the delivery is ``failed`` but ``retryable``, and the sweep probes its destination
(C-ECHO, or a QIDO-RS query for a DICOMweb destination) every ``delivery_probe_interval`` seconds
and sends everything again once it answers.
A refusal (a DICOM failure status, an association rejected for good, a SOP class the destination
does not take) is never re-sent by itself: fix the cause, then run ``retinagate deliveries retry
--refused``.

Standard library only at module level (see :mod:`retinagate.cli`).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.settings import Settings

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Adds ``deliveries list``, ``deliveries retry`` and ``deliveries check``."""
    parser = subparsers.add_parser(
        "deliveries",
        help="list failed deliveries per destination, or send them again",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="deliveries per destination and status")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)

    retry = actions.add_parser(
        "retry", help="send failed deliveries again (those whose retries ran out; --refused adds refusals)"
    )
    retry.add_argument("--destination", metavar="NAME", help="only this configured destination (AE@host:port or URL)")
    retry.add_argument(
        "--refused",
        action="store_true",
        help="also deliveries the destination refused for good (after fixing the cause)",
    )
    retry.add_argument("--json", action="store_true", help="print JSON")
    retry.set_defaults(handler=_retry)

    check = actions.add_parser(
        "check",
        help="whether each configured destination answers now (C-ECHO, QIDO-RS), with its protocol and TLS; "
        "exit status 1 when one does not",
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=_check)


def _sessions(settings: Settings) -> Any:
    from worker.cli import _sessions as sessions

    return sessions(settings)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import func, select

    from retinagate.db import session_scope
    from retinagate.models import Delivery

    engine, sessions = _sessions(settings)
    try:
        with session_scope(sessions) as session:
            query = select(Delivery.destination, Delivery.status, Delivery.retryable, func.count()).group_by(
                Delivery.destination, Delivery.status, Delivery.retryable
            )
            rows = [(d, s.value, bool(r), int(n)) for d, s, r, n in session.execute(query)]
    finally:
        engine.dispose()
    counts: dict[str, dict[str, int]] = {}
    for destination, status, retryable, count in sorted(rows):
        key = "failed (retries ran out)" if status == "failed" and retryable else status
        if status == "failed" and not retryable:
            key = "failed (refused)"
        counts.setdefault(destination, {})
        counts[destination][key] = counts[destination].get(key, 0) + count
    if args.json:
        print(json.dumps(counts, indent=2, sort_keys=True))
        return 0
    if not counts:
        print("no deliveries")
        return 0
    for destination, by_status in counts.items():
        summary = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
        print(f"{destination}: {summary}")
    return 0


def _retry(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from retinagate.cli import EXIT_USAGE, CommandError
    from retinagate.db import session_scope
    from retinagate.models import Delivery, DeliveryStatus, utcnow
    from worker.cli import _queue_deliveries
    from worker.delivery import reopen

    configured = [d.name for d in settings.destinations]
    if args.destination is not None:
        wanted = settings.find_destination(args.destination)
        if wanted is None:
            known = ", ".join(configured) or "none"
            raise CommandError(
                f"--destination: {args.destination} is not a configured destination (RETINAGATE_DESTINATIONS: {known})",
                EXIT_USAGE,
            )
        configured = [wanted.name]
    if not configured:
        raise CommandError("no destinations configured (RETINAGATE_DESTINATIONS)", EXIT_USAGE)

    engine, sessions = _sessions(settings)
    try:
        with session_scope(sessions) as session:
            query = select(Delivery).where(
                Delivery.destination.in_(configured), Delivery.status == DeliveryStatus.FAILED
            )
            if not args.refused:
                query = query.where(Delivery.retryable.is_(True))
            rows = session.scalars(query.order_by(Delivery.id)).all()
            per_destination: dict[str, int] = {}
            for row in rows:
                per_destination[row.destination] = per_destination.get(row.destination, 0) + 1
            outputs = sorted(reopen(rows, utcnow(), settings.lease_seconds))
    finally:
        engine.dispose()
    queued = _queue_deliveries(settings, outputs)
    if args.json:
        print(json.dumps({"reopened": per_destination, "outputs": len(outputs), "queued": queued}, indent=2))
        return 0
    if not per_destination:
        kind = "failed" if args.refused else "failed after their retries ran out"
        print(f"no deliveries {kind}; nothing to send again")
        return 0
    for destination, count in per_destination.items():
        print(f"{destination}: {count} delivery(ies) sent again")
    if queued < len(outputs):
        print("the queue is unreachable: they stay pending, and the sweeper sends them when it is back")
    return 0


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError
    from worker.delivery import check_destination, echo

    if not settings.destinations:
        raise CommandError("no destinations configured (RETINAGATE_DESTINATIONS)", EXIT_USAGE)
    report: list[dict[str, Any]] = []
    for destination in settings.destinations:
        tls = settings.tls_for(destination)
        row: dict[str, Any] = {
            "name": destination.name,
            "protocol": destination.protocol,
            "address": destination.address,
            "tls": "off" if tls is None else f"on ({tls.source}{', CA ' + str(tls.ca) if tls.ca else ''})",
        }
        try:
            check_destination(settings, destination)
        except ValueError as exc:
            row["answers"], row["problem"] = False, str(exc)
        else:
            row["answers"] = echo(settings, destination.name)
        report.append(row)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for row in report:
            state = (
                "answers"
                if row["answers"]
                else f"does not answer{': ' + str(row['problem']) if 'problem' in row else ''}"
            )
            print(f"{row['name']}: {row['protocol']} {row['address']}, TLS {row['tls']}: {state}")
    return EXIT_OK if all(row["answers"] for row in report) else EXIT_FAILED
