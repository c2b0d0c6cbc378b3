"""The Celery application of the worker, built from the settings.

:func:`create_app` makes one configured app; its tasks are declared in :mod:`worker.tasks`
(``include``). ``celery -A worker.app worker`` finds the module-level ``app``, which is built on
first access from the environment (``RETINAGATE_*``), so importing this module stays cheap.

Reliability settings, and why:

- ``task_acks_late`` and ``task_reject_on_worker_lost``: a message is acknowledged only after its task
  ran, so a worker that dies mid-task leaves the message to be delivered again (every task is
  idempotent, so running one twice is harmless).
- ``worker_prefetch_multiplier=1``: a worker holds one message per process, so a dead worker strands
  as little work as possible.
- ``task_time_limit`` below the Redis ``visibility_timeout`` (the settings enforce it): Redis hands an
  unacknowledged message to another worker after the visibility timeout, and a running task must
  never be handed out twice.
- Broker outages: the worker reconnects by itself, retrying without limit, and lets running tasks
  finish (see the comments in :func:`create_app`); :mod:`worker.broker` guards against the kombu
  defect that used to kill a worker whose broker went away with tasks in flight.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from celery import Celery, current_app, signals
from celery.schedules import crontab
from kombu.entity import Exchange, Queue

from retinagate.queue import (
    DELIVER_QUEUE,
    MAINTENANCE_QUEUE,
    PRUNE_TASK,
    RESCORE_TASK,
    SCORE_QUEUE,
    STUDY_REPORTS_TASK,
    SWEEP_TASK,
    TASK_QUEUES,
    broker_url,
)
from retinagate.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.storage import Storage
    from worker.scoring import Scorer

__all__ = ["QUEUES", "Runtime", "create_app", "runtime", "soft_time_limit"]

logger = logging.getLogger(__name__)

#: Every queue a worker consumes unless told otherwise.
QUEUES = (SCORE_QUEUE, DELIVER_QUEUE, MAINTENANCE_QUEUE)


class Runtime:
    """What one worker process builds once and reuses: database sessions, storage and the model.

    Everything is made on first use, after the pool has forked, so no database connection or ONNX
    Runtime session is ever shared between processes.
    """

    def __init__(self, settings: Settings, *, preload: bool = False) -> None:
        self.settings = settings
        #: Load the model in each new pool process, before its first task (see :meth:`preload_scorer`).
        self.preload = preload
        self._db: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._storage: Storage | None = None
        self._scorer: Scorer | None = None
        self._lock = threading.RLock()  # a thread pool (``--pool threads``) shares one runtime

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Session factory for the configured database, its schema checked on first use."""
        with self._lock:
            if self._sessions is None:
                from retinagate.db import check_schema, make_engine, session_factory

                db = make_engine(self.settings)
                check_schema(db)
                self._db, self._sessions = db, session_factory(db)
            return self._sessions

    @property
    def storage(self) -> Storage:
        """The file storage holding received and produced instances."""
        if self._storage is None:
            from retinagate.storage import Storage

            self._storage = Storage(self.settings.resolved_storage_dir)
        return self._storage

    def scorer(self) -> Scorer:
        """The engine and pipeline for ``settings.model_path``, loaded once per process.

        Raises:
            PermanentError: When no model is configured.
            RetryableError: When the model cannot be loaded (missing file, runtime error).
        """
        with self._lock:
            if self._scorer is None:
                from worker.scoring import Scorer

                self._scorer = Scorer.load(self.settings.model_path, self.settings, self.sessions)
            return self._scorer

    def preload_scorer(self) -> None:
        """Loads the model and warms the pipeline (output templates included) ahead of the first task.

        Runs on a thread of a new pool process; a task that arrives meanwhile waits for it (the
        scorer is made under the runtime's lock). A failure is only logged: the first task loads the
        model again and reports the error as tasks do.
        """
        started = time.perf_counter()
        try:
            self.scorer().pipeline.warmup()
        except Exception as exc:
            logger.warning("model preload failed (%s); the first task will load it", type(exc).__name__)
            return
        logger.info("model loaded and pipeline warmed in %.1f s", time.perf_counter() - started)

    def after_fork(self) -> None:
        """Drops what a parent process may have opened; the child makes its own on first use."""
        self._lock = threading.RLock()  # a lock held in the parent at the fork would never be released here
        if self._db is not None:
            # close=False: the connections belong to the parent, closing them here would break it.
            self._db.dispose(close=False)
        self._db = self._sessions = None
        self._scorer = None


#: The runtime of each app in this process (one in a worker; tests make several).
_RUNTIMES: weakref.WeakKeyDictionary[Celery, Runtime] = weakref.WeakKeyDictionary()
_RUNTIMES_LOCK = threading.Lock()


def runtime(app: Any = None) -> Runtime:
    """The :class:`Runtime` of ``app`` (default: the current Celery app) in this process, made on
    first use from the settings :func:`create_app` configured the app with.

    Raises:
        RuntimeError: When the app was not made by :func:`create_app`.
    """
    target = app if app is not None else current_app._get_current_object()
    with _RUNTIMES_LOCK:
        found = _RUNTIMES.get(target)
        if found is None:
            settings = target.conf.get("retinagate_settings")
            if not isinstance(settings, Settings):
                raise RuntimeError("this Celery app was not made by worker.app.create_app")
            found = _RUNTIMES[target] = Runtime(settings, preload=bool(target.conf.get("retinagate_preload")))
        return found


def soft_time_limit(settings: Settings) -> int:
    """The soft limit: a tenth (at least 5 s) below the hard limit, so a task can record its failure."""
    return settings.task_time_limit - max(5, settings.task_time_limit // 10)


def _rescore_schedule(expression: str) -> crontab:
    minute, hour, day_of_month, month_of_year, day_of_week = expression.split()
    try:
        return crontab(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year, day_of_week=day_of_week
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"rescore_cron: {expression!r} is not a valid cron expression ({exc})") from None


def _schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat's periodic tasks: the sweep, the study reports, the nightly rescore and, with
    ``retention_days``, the daily prune."""
    schedule: dict[str, dict[str, Any]] = {
        "retinagate-sweep": {
            "task": SWEEP_TASK,
            "schedule": float(settings.sweep_interval),
            # A sweep that waited longer than one interval is superseded by the next.
            "options": {"queue": MAINTENANCE_QUEUE, "expires": float(settings.sweep_interval)},
        },
        "retinagate-study-reports": {
            "task": STUDY_REPORTS_TASK,
            # As often as the sweep: a study's report follows its quiet period by at most that much. On
            # the maintenance queue, which scoring workers take too, so that a backlog of score tasks
            # (a rescore of the archive) does not hold reports back until each message expires.
            "schedule": float(settings.sweep_interval),
            "options": {"queue": MAINTENANCE_QUEUE, "expires": float(settings.sweep_interval)},
        },
        "retinagate-rescore": {
            "task": RESCORE_TASK,
            "schedule": _rescore_schedule(settings.rescore_cron),
            # On a scoring worker: the task registers and serves that worker's model.
            "options": {"queue": SCORE_QUEUE},
        },
    }
    if settings.retention_days > 0:
        schedule["retinagate-prune"] = {
            "task": PRUNE_TASK,
            # Daily at a quiet hour; a prune not started within the hour is superseded by the next day's.
            "schedule": crontab(minute=30, hour=3),
            "options": {"queue": MAINTENANCE_QUEUE, "expires": 3600.0},
        }
    return schedule


def _queues() -> list[Queue]:
    # One direct exchange per queue, named like it: the same bindings the producers in
    # retinagate.queue declare. (Without an exchange Celery binds every queue to the default
    # exchange with the default routing key, and a message would land in all of them.)
    return [
        Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
        for name in QUEUES
    ]


def create_app(settings: Settings, *, preload: bool = False) -> Celery:
    """Builds the worker's Celery app with its tasks, queues and beat schedule.

    ``preload``: each prefork pool process loads the model as it starts (for scoring workers), so
    that the first image does not wait a second or two for the model and the output templates.

    Raises:
        ValueError: When ``rescore_cron`` is not a valid cron expression.
    """
    from worker.broker import guard_detached_channels

    guard_detached_channels()  # a broker outage with tasks in flight must not kill the worker
    app = Celery("retinagate", broker=broker_url(settings), include=["worker.tasks"], set_as_current=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule file there
    app.conf.update(
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
        },
        broker_connection_retry_on_startup=True,
        # After a connection loss, retry for as long as it takes (every 2, 4, ... up to 30 s): a worker
        # without its broker has nothing else to do, and Celery's default (give up after 100 tries,
        # about 45 minutes) would turn a long Redis outage into a dead worker.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Let a task that is running when the broker connection drops finish. Redis hands its message
        # out again only after the visibility timeout, which the settings keep above the task time
        # limit, so no second copy can run meanwhile; cancelling would only throw the work away (a
        # killed scoring process, an instance left in `scoring`), and the thread pool of the sender
        # cannot cancel at all. The finished task's acknowledgement fails on the lost connection
        # ("Couldn't ack" in the log) and the idempotent task runs again after the visibility timeout
        # if Redis kept the message.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=soft_time_limit(settings),
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_queues=_queues(),
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
        timezone="UTC",
        beat_schedule=_schedule(settings),
        beat_schedule_filename=str((settings.data_dir / "celerybeat-schedule").resolve()),
    )
    # What the tasks' base class builds each process's runtime from (see runtime()).
    app.conf.retinagate_settings = settings
    app.conf.retinagate_preload = preload
    import worker.tasks  # noqa: F401  # declares the shared tasks, so this app has them before a worker starts

    return app


def _on_setup_logging(**_: Any) -> None:
    # Connecting this signal stops Celery from configuring logging itself; use RetinaGate's setup.
    from retinagate.logs import setup_logging

    try:
        settings = runtime().settings
    except RuntimeError:  # another app is current: RetinaGate's defaults
        setup_logging()
        return
    setup_logging(settings.log_level, settings.log_format, verbose=settings.log_verbose)


def _on_process_init(**_: Any) -> None:
    try:
        state = runtime()
    except RuntimeError:  # another app is current: nothing of ours to reset
        return
    state.after_fork()
    if state.preload:
        # On a thread: this signal must return quickly, or Celery thinks the process failed to start.
        threading.Thread(target=state.preload_scorer, name="retinagate-preload", daemon=True).start()


signals.setup_logging.connect(_on_setup_logging, weak=False, dispatch_uid="retinagate.setup_logging")
signals.worker_process_init.connect(_on_process_init, weak=False, dispatch_uid="retinagate.worker_process_init")


def __getattr__(name: str) -> Any:
    # ``celery -A worker.app`` reads ``worker.app.app``; build it only then, from the environment.
    if name == "app":
        app = create_app(load_settings())
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
