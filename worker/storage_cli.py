"""``retinagate storage prune``: remove received photographs that storage retention lets go.

With ``RETINAGATE_RETENTION_DAYS`` above 0, the received file of each instance received more than
that many days ago whose work is finished (scored, ungradable, failed or skipped, and no delivery
pending) is removed; its row, predictions, outputs and deliveries stay. Beat runs this daily at
03:30 UTC; the command runs it now, until nothing due is left, or shows what it would do
(``--dry-run``).

Standard library only at module level (see :mod:`retinagate.cli`).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.settings import Settings
    from worker.retention import PruneOutcome

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Adds ``storage prune``."""
    parser = subparsers.add_parser(
        "storage",
        help="storage retention: remove received photographs older than RETINAGATE_RETENTION_DAYS",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prune = actions.add_parser(
        "prune",
        help="remove the received files due under retention_days now (results are kept)",
        description="Removes the received files that RETINAGATE_RETENTION_DAYS lets go, in batches, until none "
        "is left; exit 1 when some file could not be removed.",
    )
    prune.add_argument("--dry-run", action="store_true", help="count what is due and change nothing")
    prune.add_argument("--json", action="store_true", help="print JSON")
    prune.set_defaults(handler=_prune)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _run(settings: Settings, dry_run: bool) -> PruneOutcome:
    from retinagate.models import utcnow
    from retinagate.storage import Storage
    from worker.cli import _sessions
    from worker.retention import prune

    engine, sessions = _sessions(settings)
    storage = Storage(settings.resolved_storage_dir)
    now = utcnow()  # one cutoff for every batch
    try:
        total = prune(settings, sessions, storage, dry_run=dry_run, now=now)
        # Each run is one bounded transaction; go on while they make progress.
        while not dry_run and total.remaining and total.pruned:
            more = prune(settings, sessions, storage, now=now)
            if not more.pruned:
                total.remaining = more.remaining
                break
            total.pruned += more.pruned
            total.pruned_bytes += more.pruned_bytes
            total.leftovers_removed += more.leftovers_removed
            total.errors.update(more.errors)
            total.remaining, total.held_back = more.remaining, more.held_back
    finally:
        engine.dispose()
    return total


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_FAILED, EXIT_OK

    if settings.retention_days == 0:
        if args.json:
            print(json.dumps({"retention_days": 0, "pruned": 0}, indent=2))
        else:
            print("storage retention is off (RETINAGATE_RETENTION_DAYS=0): every received file is kept")
        return EXIT_OK
    outcome = _run(settings, args.dry_run)
    if args.json:
        print(json.dumps({"retention_days": settings.retention_days, **outcome.to_dict()}, indent=2))
        return EXIT_FAILED if outcome.errors else EXIT_OK
    before = outcome.cutoff.strftime("%Y-%m-%d %H:%M UTC")
    if args.dry_run:
        print(
            f"would remove {outcome.due} received photograph(s) ({_megabytes(outcome.due_bytes)}) "
            f"received before {before}; their results are kept"
        )
    else:
        print(
            f"removed {len(outcome.pruned)} received photograph(s) ({_megabytes(outcome.pruned_bytes)}) "
            f"received before {before}; their results are kept"
        )
        if outcome.leftovers_removed:
            print(f"removed {outcome.leftovers_removed} file(s) an interrupted earlier run had left")
        if outcome.remaining:
            print(f"{outcome.remaining} due photograph(s) left for the next run")
    if outcome.held_back:
        print(f"{outcome.held_back} older photograph(s) kept until their scoring or delivery finishes")
    if outcome.errors:
        print(f"{len(outcome.errors)} file(s) could not be removed (see the log); the next run tries again")
        return EXIT_FAILED
    return EXIT_OK
