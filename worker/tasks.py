"""The worker's tasks: score, deliver, sweep, study reports, rescore and prune, in Celery's own layout.

The tasks are declared here at module level with :class:`RetinaGateTask` as their base; the app
(:func:`worker.app.create_app`) finds them through ``include=["worker.tasks"]``. What a worker
process builds once (database sessions, storage, the loaded model) is the base class's
:attr:`RetinaGateTask.runtime`, made from the settings the app was configured with; the scoring and
delivery services it calls know nothing of Celery, so ``retinagate rescore`` and ``score`` call them
directly.

Each task takes ids only (row ids, never datasets), and each is idempotent: a message delivered twice
(a worker killed after the work but before the acknowledgement, a sweep that re-sent it) finds the
work done, or redoes it onto the same rows and files. Retries name what they retry and are bounded:

- ``score``: a retryable error (:class:`~retinagate.errors.RetryableError`, a database that is away or
  locked, a failed durable write, the soft time limit) queues the instance again with exponential
  backoff, until it has used ``max_attempts``; a permanent error fails it at once with the reason.
- ``deliver``: a transient DICOM failure is retried per destination with backoff doubling from
  ``delivery_backoff`` up to ``delivery_backoff_max``, at most ``delivery_max_retries`` times;
  a permanent refusal is recorded and not retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Task, shared_task
from sqlalchemy.exc import OperationalError

from retinagate.queue import (
    DELIVER_QUEUE,
    DELIVER_TASK,
    MAINTENANCE_QUEUE,
    PRUNE_TASK,
    RESCORE_TASK,
    SCORE_QUEUE,
    SCORE_TASK,
    STUDY_REPORTS_TASK,
    SWEEP_TASK,
)

__all__ = [
    "RetinaGateTask",
    "deliver",
    "parse_ids",
    "prune",
    "rescore",
    "score",
    "score_delay",
    "study_reports",
    "sweep",
]

if TYPE_CHECKING:
    from retinagate.settings import Settings
    from worker.app import Runtime

logger = logging.getLogger(__name__)


def score_delay(settings: Settings, retries: int) -> float:
    """Seconds before retry number ``retries + 1`` of a score task: doubling from ``score_backoff``, capped."""
    return min(settings.score_backoff * 2.0 ** min(retries, 30), settings.score_backoff_max)


def parse_ids(ids: Any, name: str) -> list[int]:
    """Validates a task's id list (JSON from the broker): positive integers, duplicates dropped.

    Raises:
        TypeError: When ``ids`` is not a list of integers.
        ValueError: When an id is not positive.
    """
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    if not isinstance(ids, list | tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{name}: expected a list of integer row ids, got {type(ids).__name__}")
    bad = [i for i in ids if i < 1]
    if bad:
        raise ValueError(f"{name}: row ids are positive integers, got {bad[:5]}")
    return list(dict.fromkeys(int(i) for i in ids))


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not an ISO 8601 date or time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


class RetinaGateTask(Task):  # type: ignore[misc]  # Celery is untyped
    """The base of RetinaGate's tasks: gives each the worker process's :class:`~worker.app.Runtime`.

    One runtime per app and process, shared by the tasks (the model is loaded once), made on
    first use after the pool has forked (see :func:`worker.app.runtime`).
    """

    @property
    def runtime(self) -> Runtime:
        from worker.app import runtime

        return runtime(self.app)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings


def _task(name: str, queue: str, max_retries: int | None) -> Callable[[Callable[..., Any]], Any]:
    """Celery's ``shared_task`` for RetinaGate's tasks: bound, on :class:`RetinaGateTask`, under a
    fixed name and queue. (Typed here once: Celery's decorator is not.)"""
    decorator: Callable[[Callable[..., Any]], Any] = shared_task(
        name=name, bind=True, base=RetinaGateTask, queue=queue, max_retries=max_retries
    )
    return decorator


# max_retries=None on score and deliver: each retry() call passes its own bound (see the module docstring).


@_task(SCORE_TASK, SCORE_QUEUE, max_retries=None)
def score(self: RetinaGateTask, instance_ids: Any) -> dict[str, int]:
    """Scores instances in one batch, records the results and queues their delivery."""
    from retinagate.errors import PermanentError, RetryableError
    from worker.scoring import score_instances

    ids = parse_ids(instance_ids, "instance_ids")
    state = self.runtime
    settings = state.settings
    try:
        scorer = state.scorer()
        outcome = score_instances(settings, state.sessions, state.storage, scorer, ids)
    except PermanentError as exc:
        # Only configuration problems reach here (per-instance errors are recorded, not raised).
        logger.error("score task for %d instance(s) cannot run: %s", len(ids), exc)
        raise
    except (RetryableError, OperationalError) as exc:
        logger.warning("score task for %d instance(s) will be retried: %s", len(ids), type(exc).__name__)
        raise self.retry(
            exc=exc, countdown=score_delay(settings, self.request.retries), max_retries=settings.max_attempts
        ) from exc
    if outcome.deliver:
        self.app.send_task(DELIVER_TASK, args=[outcome.deliver], queue=DELIVER_QUEUE)
    if outcome.retry:
        # Bounded by each instance's attempts, which score_instances counts and enforces.
        raise self.retry(args=[outcome.retry], countdown=score_delay(settings, self.request.retries), max_retries=None)
    return {
        "scored": len(outcome.scored),
        "ungradable": len(outcome.ungradable),
        "failed": len(outcome.failed),
        "skipped": len(outcome.skipped),
        "deliver": len(outcome.deliver),
    }


@_task(DELIVER_TASK, DELIVER_QUEUE, max_retries=None)
def deliver(self: RetinaGateTask, output_ids: Any) -> dict[str, int]:
    """Sends outputs to every configured destination, retrying transient failures with backoff."""
    from worker.delivery import deliver_outputs, retry_delay

    ids = parse_ids(output_ids, "output_ids")
    state = self.runtime
    settings = state.settings
    try:
        outcome = deliver_outputs(settings, state.sessions, state.storage, ids)
    except OperationalError as exc:
        raise self.retry(
            exc=exc,
            countdown=retry_delay(settings, self.request.retries + 1),
            max_retries=settings.delivery_max_retries,
        ) from exc
    if outcome.retry_outputs:
        # Bounded by each delivery row's attempts, which deliver_outputs counts and enforces.
        raise self.retry(args=[outcome.retry_outputs], countdown=outcome.retry_in, max_retries=None)
    return {"delivered": len(outcome.delivered), "failed": len(outcome.failed)}


@_task(SWEEP_TASK, MAINTENANCE_QUEUE, max_retries=0)
def sweep(self: RetinaGateTask) -> dict[str, int]:
    """Re-sends work that Redis lost or a dead worker left, and fails instances out of attempts."""
    from worker.sweep import sweep as run_sweep

    state = self.runtime
    outcome = run_sweep(
        state.settings,
        state.sessions,
        lambda ids: self.app.send_task(SCORE_TASK, args=[ids], queue=SCORE_QUEUE),
        lambda ids: self.app.send_task(DELIVER_TASK, args=[ids], queue=DELIVER_QUEUE),
    )
    return {
        "requeued": len(outcome.requeued),
        "failed": len(outcome.failed),
        "redeliver": len(outcome.redeliver),
        "revived": sum(outcome.revived.values()),
    }


@_task(STUDY_REPORTS_TASK, MAINTENANCE_QUEUE, max_retries=0)
def study_reports(self: RetinaGateTask) -> dict[str, int]:
    """Writes the study report of every complete study the active model has not reported on, and
    queues their delivery (see :mod:`worker.study_reports`).

    One bounded run (:data:`worker.study_reports.STUDY_LIMIT` studies); when more are due, the task
    sends itself again. A failed run is not retried: beat sends the next one within ``sweep_interval``.
    """
    from retinagate.db import session_scope
    from worker.study_reports import active_model_id, write_study_reports

    state = self.runtime
    with session_scope(state.sessions) as session:
        model_id = active_model_id(session)
    if model_id is None:
        return {"written": 0, "deliver": 0, "skipped": 0}
    outcome = write_study_reports(state.settings, state.sessions, state.storage, model_id)
    if outcome.deliver:
        self.app.send_task(DELIVER_TASK, args=[outcome.deliver], queue=DELIVER_QUEUE)
    if outcome.remaining and outcome.written:
        self.app.send_task(STUDY_REPORTS_TASK, queue=MAINTENANCE_QUEUE)
    return {"written": len(outcome.written), "deliver": len(outcome.deliver), "skipped": len(outcome.skipped)}


@_task(RESCORE_TASK, SCORE_QUEUE, max_retries=0)
def rescore(
    self: RetinaGateTask, since: str | None = None, until: str | None = None, model_path: str | None = None
) -> dict[str, int]:
    """Queues scoring, in batches, of every scored instance in range without a prediction from the model.

    The model is the one this worker serves (``settings.model_path``); it is registered, and made
    active when new. Another model cannot be named here, because the score tasks run on workers
    serving this one: run ``retinagate rescore --model`` for that.
    """
    from retinagate.db import session_scope
    from retinagate.errors import PermanentError
    from worker.rescore import find_unscored
    from worker.sweep import batches

    state = self.runtime
    served = state.settings.model_path
    if model_path is not None and (served is None or Path(model_path).resolve() != served.resolve()):
        raise PermanentError(
            f"model_path: the workers serve {served}, not {model_path}; "
            "set RETINAGATE_MODEL_PATH and restart them, or run `retinagate rescore --model`"
        )
    scorer = state.scorer()
    with session_scope(state.sessions) as session:
        ids = find_unscored(session, scorer.model_id, _when(since, "since"), _when(until, "until"))
    chunks = batches(ids, state.settings.rescore_batch_size)
    for chunk in chunks:
        self.app.send_task(SCORE_TASK, args=[chunk], queue=SCORE_QUEUE)
    logger.info("rescore: %d instance(s) queued in %d task(s) for model id=%s", len(ids), len(chunks), scorer.model_id)
    return {"queued": len(ids), "tasks": len(chunks)}


@_task(PRUNE_TASK, MAINTENANCE_QUEUE, max_retries=0)
def prune(self: RetinaGateTask) -> dict[str, int]:
    """Removes received photographs older than ``retention_days`` whose work is finished (0: does nothing).

    One bounded run (:data:`worker.retention.PRUNE_LIMIT` instances); when more are due, the task
    sends itself again, so a backlog (retention turned on at a busy site) is worked off in short
    transactions rather than one a day. A failed run is not retried: the next day's takes it up.
    """
    from worker.retention import prune as run_prune

    state = self.runtime
    outcome = run_prune(state.settings, state.sessions, state.storage)
    if outcome.remaining and outcome.pruned:
        self.app.send_task(PRUNE_TASK, queue=MAINTENANCE_QUEUE)
    return {
        "pruned": len(outcome.pruned),
        "pruned_bytes": outcome.pruned_bytes,
        "remaining": outcome.remaining,
        "held_back": outcome.held_back,
        "errors": len(outcome.errors),
    }
