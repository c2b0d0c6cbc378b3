"""Storage retention: the received photographs' files go after ``retention_days``; what was found stays.

A site's disk fills with received photographs (a few MB each) long after their results were read.
With ``retention_days`` above 0, :func:`prune` removes the received file (storage key under ``in/``)
of each instance that was received more than that many days ago and whose work is finished:

- its status is ``scored``, ``ungradable``, ``failed`` or ``skipped`` (nothing on its way through
  the gateway or a worker), and
- no delivery of its outputs is still ``pending`` or ``retrying``.

The instance row, its predictions, outputs and deliveries stay, and so do the output files (the
heatmap SC, the SR, the Parametric Map): they are a small part of the disk (a JPEG SC and an SR
against a photograph of several MB) and a failed delivery may still need them (``retinagate
deliveries retry``). The row records ``pruned_at``; such an instance is never scored again
(``rescore`` leaves it out, a score task skips it) and ``retinagate results`` says its photograph
was pruned.

Order, and why: the rows are marked ``pruned_at`` and committed first, the files removed after. A
crash in between leaves a file that no row needs (space, not a lie), which the next run removes: it
first looks again at the files of the rows the last run marked. The reverse order could leave a row
that points at a file that is gone without saying so; a rescore would then claim it, find the file
missing, retry it as a storage fault and finally turn a scored instance into a failed one.

The mark is a conditional update (still finished, still no open delivery), so an instance a score
task claimed between the selection and the update keeps its file. A run handles at most
:data:`PRUNE_LIMIT` instances, so it stays a short transaction; the next run takes the rest. Nothing
here knows Celery: the ``prune`` task (daily, from beat) and ``retinagate storage prune`` call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, func, select, update

from retinagate.db import session_scope
from retinagate.models import Delivery, DeliveryStatus, Instance, InstanceStatus, Output, Prediction, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Settings
    from retinagate.storage import Storage

__all__ = ["FINISHED", "PRUNED_REASON", "PRUNE_LIMIT", "PruneOutcome", "cutoff", "prune"]

logger = logging.getLogger(__name__)

#: Instances marked per run at most; the next run takes the rest.
PRUNE_LIMIT = 1000

#: Statuses after which no worker needs the received file.
FINISHED = (InstanceStatus.SCORED, InstanceStatus.UNGRADABLE, InstanceStatus.FAILED, InstanceStatus.SKIPPED)

#: Why a pruned instance is not scored again (the score path's skip reason).
PRUNED_REASON = "photograph pruned by storage retention (retention_days); it cannot be scored again"

_OPEN_DELIVERY = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)


@dataclass
class PruneOutcome:
    """What one run did (or, in a dry run, would do)."""

    #: Instances received before this time are due.
    cutoff: datetime
    dry_run: bool = False
    #: Instances due at the start of the run (received before the cutoff, work finished, not pruned
    #: yet), and the bytes of their files as recorded when they were received.
    due: int = 0
    due_bytes: int = 0
    #: Instances whose received file this run removed, oldest first (none in a dry run).
    pruned: list[int] = field(default_factory=list)
    pruned_bytes: int = 0
    #: Due instances left for the next run (over the limit; in a dry run, all of them).
    remaining: int = 0
    #: Instances received before the cutoff whose work is not finished (still being scored, or a
    #: delivery still open): their files stay until it is.
    held_back: int = 0
    #: Files of instances an earlier run marked but did not get to remove (it stopped in between).
    leftovers_removed: int = 0
    #: Files that could not be removed (permissions, a read-only volume): the next run tries again.
    errors: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The outcome as plain data (``retinagate storage prune --json``)."""
        return {
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "due": self.due,
            "due_bytes": self.due_bytes,
            "pruned": len(self.pruned),
            "pruned_bytes": self.pruned_bytes,
            "remaining": self.remaining,
            "held_back": self.held_back,
            "leftovers_removed": self.leftovers_removed,
            "errors": len(self.errors),
        }


def cutoff(settings: Settings, now: datetime) -> datetime:
    """Instances received before this time are due for pruning under ``retention_days``."""
    return now - timedelta(days=settings.retention_days)


def _old(before: datetime) -> ColumnElement[bool]:
    return and_(
        Instance.received_at < before,
        Instance.pruned_at.is_(None),
        Instance.storage_key.startswith("in/"),
    )


def _finished() -> ColumnElement[bool]:
    open_delivery = (
        select(Delivery.id)
        .join(Output, Output.id == Delivery.output_id)
        .join(Prediction, Prediction.id == Output.prediction_id)
        .where(Prediction.instance_id == Instance.id, Delivery.status.in_(_OPEN_DELIVERY))
        .exists()
    )
    return and_(Instance.status.in_(FINISHED), ~open_delivery)


def _remove(storage: Storage, key: str) -> None:
    """Removes a received file, then its day folders (``in/YYYY/MM/DD``) as they become empty."""
    storage.delete(key)
    top = storage.path("in")
    folder = storage.path(key).parent
    while folder != top and folder.is_relative_to(top):
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): the folders above are not empty either
            break
        folder = folder.parent


def _remove_all(storage: Storage, rows: list[tuple[int, str]], outcome: PruneOutcome) -> list[int]:
    removed = []
    for instance_id, key in rows:
        try:
            _remove(storage, key)
        except (OSError, ValueError) as exc:
            outcome.errors[instance_id] = f"{type(exc).__name__}: {exc}"
            continue
        removed.append(instance_id)
    return removed


def _leftovers(session: Session, storage: Storage, limit: int) -> list[tuple[int, str]]:
    """Rows the latest runs marked whose file is still there (a run stopped between commit and removal)."""
    query = (
        select(Instance.id, Instance.storage_key)
        .where(Instance.pruned_at.is_not(None))
        .order_by(Instance.pruned_at.desc(), Instance.id.desc())
        .limit(limit)
    )
    found = []
    for instance_id, key in session.execute(query):
        try:
            present = storage.path(key).exists()
        except ValueError:  # a key outside the storage folder: never ours to remove
            continue
        if present:
            found.append((instance_id, key))
    return found


def prune(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    limit: int = PRUNE_LIMIT,
) -> PruneOutcome:
    """Removes the received files that ``retention_days`` lets go; see the module docstring.

    Args:
        settings: ``retention_days`` (0: nothing is ever due, and nothing is done).
        sessions: Database sessions.
        storage: The file storage.
        dry_run: Count what is due and change nothing (no row, no file).
        now: The current time (tests pass one).
        limit: Instances marked in this run at most.

    Raises:
        ValueError: When ``limit`` is below 1.
    """
    if limit < 1:
        raise ValueError(f"limit: {limit} is below 1")
    now = now or utcnow()
    before = cutoff(settings, now)
    outcome = PruneOutcome(cutoff=before, dry_run=dry_run)
    if settings.retention_days <= 0:
        return outcome

    with session_scope(sessions) as session:
        leftovers = [] if dry_run else _leftovers(session, storage, limit)
        old = _old(before)
        due, due_bytes, held = session.execute(
            select(
                func.count().filter(_finished()),
                func.sum(Instance.size_bytes).filter(_finished()),
                func.count().filter(~_finished()),
            ).where(old)
        ).one()
        outcome.due, outcome.due_bytes, outcome.held_back = int(due), int(due_bytes or 0), int(held)
        if dry_run:
            outcome.remaining = outcome.due
            return outcome
        candidates = session.execute(
            select(Instance.id, Instance.storage_key, Instance.size_bytes)
            .where(old, _finished())
            .order_by(Instance.received_at, Instance.id)
            .limit(limit)
        ).all()
        ids = [row.id for row in candidates]
        marked: set[int] = set()
        if ids:
            # Conditional: a row claimed (or given a new delivery) since the selection is left alone.
            result = session.execute(
                update(Instance)
                .where(Instance.id.in_(ids), old, _finished())
                .values(pruned_at=now)
                .returning(Instance.id)
                .execution_options(synchronize_session=False)
            )
            marked = {int(i) for i in result.scalars()}
    # Committed: from here no worker uses these files, and a crash leaves them to the next run.
    outcome.leftovers_removed = len(_remove_all(storage, leftovers, outcome))
    sizes = {row.id: int(row.size_bytes) for row in candidates}
    outcome.pruned = _remove_all(
        storage, [(row.id, row.storage_key) for row in candidates if row.id in marked], outcome
    )
    outcome.pruned_bytes = sum(sizes[i] for i in outcome.pruned)
    outcome.remaining = max(0, outcome.due - len(marked))
    if outcome.pruned or outcome.leftovers_removed or outcome.errors:
        logger.info(
            "prune: %d received file(s) removed (%d bytes) from before %s, %d left for the next run, "
            "%d held back, %d leftover(s) removed, %d not removable",
            len(outcome.pruned),
            outcome.pruned_bytes,
            before.date().isoformat(),
            outcome.remaining,
            outcome.held_back,
            outcome.leftovers_removed,
            len(outcome.errors),
        )
    for instance_id, error in outcome.errors.items():
        logger.warning(
            "prune: the file of instance %d was not removed (%s); the next run tries again", instance_id, error
        )
    return outcome
