"""Subcommands of the worker: ``worker``, ``beat``, ``rescore`` and ``results``.

Only the standard library is imported here at module level: ``retinagate --help`` must stay fast,
and the heavy imports (Celery, SQLAlchemy, ONNX Runtime) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Settings

__all__ = ["parse_when", "register"]

_QUEUES = ("score", "deliver", "maintenance")


def parse_when(text: str, *, end: bool = False) -> datetime:
    """Parses a ``--since``/``--until`` value: a date (``2026-11-26``) or an ISO 8601 time.

    A time without a zone is UTC. With ``end``, a bare date means the end of that day, so
    ``--until 2026-11-26`` includes the 26th.

    Raises:
        argparse.ArgumentTypeError: When the text is neither.
    """
    value = text.strip()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or ISO 8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if end and len(value) == 10:  # a bare date
        parsed += timedelta(days=1)
    return parsed


def _since(text: str) -> datetime:
    return parse_when(text)


def _until(text: str) -> datetime:
    return parse_when(text, end=True)


def _queues(text: str) -> list[str]:
    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in _QUEUES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"queues: choose from {', '.join(_QUEUES)} (comma list), got {text!r}")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"concurrency: {value} is outside 1-256")
    return value


def register(subparsers: Any) -> None:
    """Adds the worker's subcommands."""
    worker = subparsers.add_parser(
        "worker",
        help="run a Celery worker that scores, delivers, sweeps and re-scores",
        description=(
            "Runs a Celery worker on the configured broker (RETINAGATE_BROKER_URL, or the embedded Redis "
            "of `retinagate serve`). It loads the model (RETINAGATE_MODEL_PATH) once per process. "
            "`celery -A worker.app worker` does the same with Celery's own options."
        ),
    )
    worker.add_argument(
        "--queues",
        type=_queues,
        default=list(_QUEUES),
        metavar="LIST",
        help="queues to consume, comma list of score, deliver, maintenance (default: all)",
    )
    worker.add_argument(
        "--concurrency",
        type=_positive,
        default=None,
        metavar="N",
        help="worker processes, or threads with --pool threads (default: one per CPU core)",
    )
    worker.add_argument(
        "--pool",
        choices=("prefork", "threads"),
        default="prefork",
        help="prefork (default): processes, for scoring; threads: for the deliver and maintenance queues, "
        "whose tasks mostly wait on the network and the PACS",
    )
    worker.add_argument("--beat", action="store_true", help="also run the scheduler in this process (one per site)")
    worker.set_defaults(handler=_worker)

    beat = subparsers.add_parser(
        "beat",
        help="run the scheduler: sweeps for lost work and the nightly re-scoring",
        description=(
            "Sends the sweep task every RETINAGATE_SWEEP_INTERVAL seconds and the rescore task on "
            "RETINAGATE_RESCORE_CRON (UTC). Run exactly one per site."
        ),
    )
    beat.set_defaults(handler=_beat)

    rescore = subparsers.add_parser(
        "rescore",
        help="score stored instances again under a new model and report what changed",
        description=(
            "Registers the model as the active one, scores every scored instance received in the range "
            "that has no prediction from it (here, in this process: no broker needed), and writes a "
            "change report (CSV and JSON) of the instances whose findings differ from the previously "
            "active model's. Old predictions are kept. Deliveries of the new outputs are queued when the "
            "broker is reachable, else the worker's sweeper sends them later."
        ),
    )
    rescore.add_argument("--since", type=_since, metavar="DATE", help="only instances received from DATE on")
    rescore.add_argument("--until", type=_until, metavar="DATE", help="only instances received up to DATE")
    rescore.add_argument("--model", type=Path, metavar="PATH", help="the .onnx model (default: RETINAGATE_MODEL_PATH)")
    rescore.add_argument("--dry-run", action="store_true", help="only count the instances that would be scored")
    rescore.add_argument(
        "--report-dir", type=Path, metavar="DIR", help="where the change report goes (default: <data_dir>/reports)"
    )
    rescore.add_argument("--json", action="store_true", help="print a JSON summary")
    rescore.set_defaults(handler=_rescore)

    results = subparsers.add_parser(
        "results",
        help="show what was found, per study and image, with latencies and delivery status",
    )
    which = results.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    which.add_argument("--since", type=_since, metavar="DATE", help="only instances received from DATE on")
    results.add_argument("--json", action="store_true", help="print JSON")
    results.set_defaults(handler=_results)


def _check_model(path: Path | None, *, option: bool = False) -> Path:
    """The model file to serve; ``option`` says whether the command has a ``--model`` option."""
    from retinagate.cli import EXIT_MISSING, EXIT_USAGE, CommandError

    if path is None:
        where = "pass --model or set RETINAGATE_MODEL_PATH" if option else "set RETINAGATE_MODEL_PATH"
        raise CommandError(f"no model: {where} to an ONNX file from `retinagate export`", EXIT_USAGE)
    if not path.is_file():
        raise CommandError(f"model file not found: {path}", EXIT_MISSING)
    return path


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    if "score" in args.queues:
        _check_model(settings.model_path)
    _database(settings).dispose()  # fail now, with a clear message, on a database never migrated
    if "score" in args.queues:
        _start_serving(settings)
    if "deliver" in args.queues:
        _check_destinations(settings)
    from worker.app import create_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    prefork = args.pool == "prefork"
    app = create_app(
        _threads_per_process(settings, args.concurrency if prefork else 1), preload=prefork and "score" in args.queues
    )
    argv = [
        "worker",
        "--pool",
        args.pool,
        "--queues",
        ",".join(args.queues),
        "--loglevel",
        settings.log_level,
        "--without-mingle",
        "--without-gossip",
        "--hostname",  # one node name per queue set, so a scoring and a sending worker can share a host
        f"{'-'.join(args.queues)}@%h",
    ]
    if args.concurrency is not None:
        argv += ["--concurrency", str(args.concurrency)]
    if args.beat:
        argv += ["--beat"]
    return _run_celery(app, argv, quiet=not settings.log_verbose)


def _run_celery(app: Any, argv: list[str], *, quiet: bool = True) -> int:
    """Runs a Celery subcommand on ``app`` and returns its exit status; ``quiet`` leaves out Celery's
    start-up banner (``retinagate -v`` shows it).

    ``Celery.start`` discards the status that its command line returns, so a worker that stopped on
    an "Unrecoverable error" (status 1 inside Celery) used to exit 0, and a supervisor that restarts
    only failed services (Docker's ``on-failure``, systemd's ``Restart=on-failure``) left it dead.
    This is ``Celery.start`` with the status kept.
    """
    import logging

    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app  # the --app option, as Celery.start sets it
    try:
        code = celery_command.main(args=["--quiet", *argv] if quiet else argv, standalone_mode=False)
    finally:
        celery_command.params[0].default = None
    status = code if isinstance(code, int) else 0
    if status != 0:
        logging.getLogger(__name__).error(
            "celery %s stopped with status %d; a supervisor should start it again", argv[0], status
        )
    return status


def _start_serving(settings: Settings) -> None:
    """Refuses to start a scoring worker whose model is not the active one (see worker.registry), and
    queues the re-scoring a newly activated model asks for."""
    from retinagate.cli import EXIT_USAGE, CommandError
    from retinagate.errors import PermanentError
    from retinagate.queue import RESCORE_TASK, SCORE_QUEUE, producer
    from worker.registry import start_serving

    def send_rescore(path: Path) -> None:
        try:
            producer(settings).send_task(RESCORE_TASK, kwargs={"model_path": str(path)}, queue=SCORE_QUEUE, retry=False)
        except Exception as exc:  # kombu raises several unrelated types for "broker unreachable"
            logging.getLogger(__name__).warning(
                "could not queue the re-scoring (%s); the nightly rescore does it", type(exc).__name__
            )

    engine, sessions = _sessions(settings)
    try:
        start_serving(settings, sessions, send_rescore)
    except PermanentError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    finally:
        engine.dispose()


def _check_destinations(settings: Settings) -> None:
    from retinagate.cli import EXIT_MISSING, CommandError
    from worker.delivery import check_destinations

    try:
        check_destinations(settings)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_MISSING) from None


def _threads_per_process(settings: Settings, concurrency: int | None) -> Settings:
    """Shares the cores among the pool processes when ONNX Runtime's thread count is left to choose.

    Each pool process would otherwise run one inference thread per core (and as many decode and
    encode threads): two processes on two cores ran four busy threads and scored a third slower.
    """
    if settings.intra_op_threads:
        return settings
    cores = os.cpu_count() or 1
    return settings.model_copy(update={"intra_op_threads": max(1, cores // (concurrency or cores))})


def _beat(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import create_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    return _run_celery(app, ["beat", "--loglevel", settings.log_level], quiet=not settings.log_verbose)


def _database(settings: Settings) -> Engine:
    from retinagate.cli import EXIT_MISSING, CommandError
    from retinagate.db import SchemaError, check_schema, make_engine

    engine = make_engine(settings)
    try:
        check_schema(engine)
    except SchemaError as exc:
        engine.dispose()
        raise CommandError(str(exc), EXIT_MISSING) from None
    return engine


def _sessions(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    from retinagate.db import session_factory

    engine = _database(settings)
    return engine, session_factory(engine)


def _rescore(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_FAILED, EXIT_MISSING, CommandError
    from retinagate.db import session_scope

    path = _check_model(args.model if args.model is not None else settings.model_path, option=True)
    engine, sessions = _sessions(settings)
    try:
        if args.dry_run:
            return _rescore_dry_run(args, sessions, path)

        from sqlalchemy import select

        from retinagate.errors import PermanentError, RetryableError
        from retinagate.models import Model, utcnow
        from retinagate.storage import Storage
        from worker.registry import activate_model
        from worker.rescore import ModelRef, change_report, find_unscored, previous_model, report_stem, rescore_inline
        from worker.scoring import Scorer

        with session_scope(sessions) as session:
            active_before = session.scalar(select(Model.id).where(Model.active.is_(True)).limit(1))
        try:
            scorer = Scorer.load(path, settings, sessions, check_active=False)  # activated below
        except (PermanentError, RetryableError) as exc:
            raise CommandError(str(exc), EXIT_MISSING) from None
        with session_scope(sessions) as session:
            model = session.get_one(Model, scorer.model_id)
            activate_model(session, model)
            if active_before is not None and active_before != model.id:
                previous_id: int | None = active_before
            else:
                found = previous_model(session, model)
                previous_id = found.id if found is not None else None
            ids = find_unscored(session, model.id, args.since, args.until)
            model_ref = ModelRef.of(model)

        from tqdm import tqdm

        storage = Storage(settings.resolved_storage_dir)
        with tqdm(total=len(ids), unit="img", desc="rescore", file=sys.stderr, disable=None) as bar:
            outcome = rescore_inline(settings, sessions, storage, scorer, ids, bar.update)
        queued = _queue_deliveries(settings, outcome.deliver)

        with session_scope(sessions) as session:
            old = session.get(Model, previous_id) if previous_id is not None else None
            report = change_report(session, old, session.get_one(Model, model_ref.id), args.since, args.until)
        report_dir = args.report_dir if args.report_dir is not None else settings.data_dir / "reports"
        csv_path, json_path = report.write(report_dir, report_stem(model_ref, utcnow()))
    finally:
        engine.dispose()

    summary = {
        "model": {"id": model_ref.id, "name": model_ref.name, "version": model_ref.version, "sha256": model_ref.sha256},
        "previous_model": (
            {
                "id": report.old_model.id,
                "name": report.old_model.name,
                "version": report.old_model.version,
                "sha256": report.old_model.sha256,
            }
            if report.old_model
            else None
        ),
        "candidates": len(ids),
        "scored": len(outcome.scored),
        "ungradable": len(outcome.ungradable),
        "failed": len(outcome.failed),
        "left_for_worker": len(outcome.retry),
        "deliveries_queued": queued,
        "deliveries_pending": len(outcome.deliver),
        "compared": report.compared,
        "changed": len(report.changed),
        "report_csv": str(csv_path),
        "report_json": str(json_path),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        against = f"{report.old_model.name} {report.old_model.version}" if report.old_model else "no previous model"
        print(
            f"rescored {len(outcome.scored)} of {len(ids)} instance(s) with {model_ref.name} {model_ref.version} "
            f"({len(outcome.ungradable)} not gradable, {len(outcome.failed)} failed, {len(outcome.retry)} left for "
            f"the worker); findings changed for "
            f"{len(report.changed)} of {report.compared} compared with {against}; report: {csv_path}, {json_path}"
        )
    return EXIT_FAILED if outcome.failed or outcome.retry else 0


def _rescore_dry_run(args: argparse.Namespace, sessions: sessionmaker[Session], path: Path) -> int:
    from sqlalchemy import select

    from retinagate.db import session_scope
    from retinagate.engine import file_sha256
    from retinagate.models import Model
    from worker.rescore import find_unscored

    sha256 = file_sha256(path)
    with session_scope(sessions) as session:
        model_id = session.scalar(select(Model.id).where(Model.sha256 == sha256))
        ids = find_unscored(session, model_id, args.since, args.until)
    if args.json:
        print(
            json.dumps(
                {"dry_run": True, "model_sha256": sha256, "registered": model_id is not None, "candidates": len(ids)},
                indent=2,
            )
        )
    else:
        state = "registered" if model_id is not None else "not registered yet"
        print(f"would rescore {len(ids)} instance(s) with {path} (sha256 {sha256[:12]}, {state})")
    return 0


def _queue_deliveries(settings: Settings, output_ids: list[int]) -> int:
    """Sends deliver tasks for the new outputs; returns how many outputs were queued."""
    if not output_ids:
        return 0
    import logging

    from retinagate.queue import DELIVER_QUEUE, DELIVER_TASK, producer

    try:
        app = producer(settings)
        for start in range(0, len(output_ids), 100):
            app.send_task(DELIVER_TASK, args=[output_ids[start : start + 100]], queue=DELIVER_QUEUE, retry=False)
    except Exception as exc:  # kombu raises several unrelated types for "broker unreachable"
        logging.getLogger(__name__).warning(
            "could not queue %d delivery(ies) (%s); they stay pending and the sweeper sends them later",
            len(output_ids),
            type(exc).__name__,
        )
        return 0
    return len(output_ids)


def _results(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.db import session_scope
    from worker.results import format_results, query_results, to_jsonable

    engine, sessions = _sessions(settings)
    try:
        with session_scope(sessions) as session:
            found = query_results(session, study_uid=args.study, since=args.since)
    finally:
        engine.dispose()
    # Nothing found is an answer, whatever the filter: exit 0, as `deliveries list` does (exit 3 is
    # for a database or model that is missing, see retinagate.cli).
    if args.json:
        print(json.dumps(to_jsonable(found), indent=2))
    elif args.study is not None and not found:
        print(f"no study with UID {args.study}")
    else:
        print(format_results(found))
    return 0
