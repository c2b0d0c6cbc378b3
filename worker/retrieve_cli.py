"""``retinagate retrieve``: bring archived photographs in from a PACS, to be scored like new ones.

Asks the PACS (C-FIND, Study Root) for the series of photographs (``--modality``, default OP) in
the studies dated ``--since`` to ``--until``, and has it send each series the database does not hold
yet to the gateway by C-MOVE; the gateway stores, queues and scores them as it does everything it
receives. The PACS must know the gateway as a DICOM node (its AE title, RETINAGATE_GATEWAY_AE_TITLE,
with its host and port), and the gateway must accept the PACS's AE title and address. At most
``--limit`` studies move per run; run it again (nightly, say) to go on where it stopped.

Standard library only at module level (see :mod:`retinagate.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import date
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.settings import Settings

__all__ = ["register"]


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def register(subparsers: Any) -> None:
    """Adds ``retrieve``."""
    parser = subparsers.add_parser(
        "retrieve",
        help="bring archived photographs in from a PACS (C-FIND, C-MOVE to the gateway) to be scored",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="PACS",
        help="the PACS: AE@host:port, or the name of a configured C-STORE destination (its TLS settings apply)",
    )
    parser.add_argument("--since", type=_day, metavar="DATE", help="studies dated DATE or later (YYYY-MM-DD)")
    parser.add_argument("--until", type=_day, metavar="DATE", help="studies dated DATE or earlier (YYYY-MM-DD)")
    parser.add_argument("--modality", default="OP", help="modality of the photographs' series (default OP)")
    parser.add_argument("--limit", type=int, default=100, metavar="N", help="move at most N studies (default 100)")
    parser.add_argument("--again", action="store_true", help="move series the database already holds too")
    parser.add_argument("--dry-run", action="store_true", help="find and count, move nothing")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_retrieve)


def _retrieve(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_FAILED, EXIT_MISSING, EXIT_OK, EXIT_USAGE, CommandError
    from retinagate.destinations import parse
    from retinagate.destinations.dimse import DimseDestination
    from worker.cli import _sessions
    from worker.delivery import connection
    from worker.retrieve import PacsUnreachableError, RetrieveError, retrieve

    if args.limit < 1:
        raise CommandError("--limit must be at least 1", EXIT_USAGE)
    if args.since is not None and args.until is not None and args.since > args.until:
        raise CommandError(f"--since {args.since} is after --until {args.until}", EXIT_USAGE)
    source = settings.find_destination(args.source)
    if source is None:
        try:
            source = parse(args.source)
        except ValueError as exc:
            raise CommandError(f"--from: {exc}", EXIT_USAGE) from None
    if not isinstance(source, DimseDestination):
        raise CommandError(f"--from: {source.name} is a {source.protocol} destination; a PACS to retrieve "
                           "from is AE@host:port (C-FIND, C-MOVE)", EXIT_USAGE)  # fmt: skip
    try:
        via = connection(settings, source)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None

    engine, sessions = _sessions(settings)
    try:
        report = retrieve(
            source,
            via,
            sessions,
            move_to=settings.gateway_ae_title,
            since=args.since,
            until=args.until,
            modality=args.modality,
            limit=args.limit,
            again=args.again,
            dry_run=args.dry_run,
        )
    except RetrieveError as exc:
        code = EXIT_MISSING if isinstance(exc, PacsUnreachableError) else EXIT_FAILED
        raise CommandError(f"retrieve from {source.name}: {exc}", code) from None
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **asdict(report)}, indent=2))
    else:
        verb = "would move" if args.dry_run else "moved"
        to_move = report.series - report.skipped
        print(
            f"{report.studies} study(ies), {report.series} {args.modality} series; {report.skipped} already held; "
            f"{verb} {report.moved if not args.dry_run else to_move} series"
            + (
                ""
                if args.dry_run
                else f" ({report.instances_moved} instance(s) sent, {report.instances_failed} failed)"
            )
            + (f"; {report.left} study(ies) left for the next run (--limit)" if report.left else "")
        )
        if report.instances_failed:
            print(
                "some instances were not sent: see the gateway's log (a SOP class it does not take, a refused "
                "association)",
                file=sys.stderr,
            )
    return EXIT_FAILED if report.instances_failed else EXIT_OK
