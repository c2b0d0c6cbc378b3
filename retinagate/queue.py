"""Names and producers for RetinaGate's task queue.

The gateway and the CLI send tasks by name through a producer-only Celery app, so they never import
the worker's code (and its model runtime). Messages carry row ids, never datasets or pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Final

from celery import Celery

from retinagate.settings import Settings

__all__ = [
    "DELIVER_QUEUE",
    "DELIVER_TASK",
    "MAINTENANCE_QUEUE",
    "PRUNE_TASK",
    "RESCORE_TASK",
    "SCORE_QUEUE",
    "SCORE_TASK",
    "STUDY_REPORTS_TASK",
    "SWEEP_TASK",
    "EnqueueError",
    "broker_url",
    "embedded_socket_path",
    "enqueue_score",
    "producer",
]

logger = logging.getLogger(__name__)

SCORE_TASK: Final = "retinagate.score"
DELIVER_TASK: Final = "retinagate.deliver"
SWEEP_TASK: Final = "retinagate.sweep"
RESCORE_TASK: Final = "retinagate.rescore"
PRUNE_TASK: Final = "retinagate.prune"
STUDY_REPORTS_TASK: Final = "retinagate.study_reports"

SCORE_QUEUE: Final = "score"
DELIVER_QUEUE: Final = "deliver"
MAINTENANCE_QUEUE: Final = "maintenance"

TASK_QUEUES: Final = {
    SCORE_TASK: SCORE_QUEUE,
    DELIVER_TASK: DELIVER_QUEUE,
    SWEEP_TASK: MAINTENANCE_QUEUE,
    RESCORE_TASK: SCORE_QUEUE,  # it serves the scoring workers' model
    PRUNE_TASK: MAINTENANCE_QUEUE,
    STUDY_REPORTS_TASK: MAINTENANCE_QUEUE,  # every worker takes it; never behind a backlog of score tasks
}


class EnqueueError(RuntimeError):
    """The broker could not take the message; the SQL row stays and the sweeper re-sends it."""


def embedded_socket_path(settings: Settings) -> Path:
    """The Unix socket of the embedded Redis server that ``retinagate serve`` starts."""
    return (settings.data_dir / "redis" / "redis.sock").resolve()


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded Redis socket under the data directory."""
    if settings.broker_url:
        return settings.broker_url
    return f"redis+socket://{embedded_socket_path(settings)}"


@cache
def _producer(url: str, visibility_timeout: int) -> Celery:
    app = Celery("retinagate-producer", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        },
        broker_connection_retry=False,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=0,
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def producer(settings: Settings) -> Celery:
    """A producer-only Celery app for the configured broker (one per broker, reused)."""
    return _producer(broker_url(settings), settings.visibility_timeout)


def enqueue_score(settings: Settings, instance_ids: Sequence[int]) -> None:
    """Sends one score task for ``instance_ids``.

    Raises:
        EnqueueError: When the broker cannot be reached; the caller leaves the rows as they are.
    """
    ids = [int(i) for i in instance_ids]
    if not ids:
        return
    try:
        producer(settings).send_task(SCORE_TASK, args=[ids], queue=SCORE_QUEUE, retry=False)
    except Exception as exc:  # kombu raises several unrelated types for "broker unreachable"
        raise EnqueueError(f"could not enqueue score task for {len(ids)} instance(s): {type(exc).__name__}") from exc
