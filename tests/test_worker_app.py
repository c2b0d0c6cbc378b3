"""The Celery app: built from the settings with the reliability options the design asks for."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from celery.schedules import crontab

from retinagate.queue import DELIVER_TASK, RESCORE_TASK, SCORE_TASK, STUDY_REPORTS_TASK, SWEEP_TASK
from retinagate.settings import Settings
from worker.app import create_app, runtime, soft_time_limit

ROOT = Path(__file__).resolve().parents[1]


def test_the_app_acknowledges_late_prefetches_one_and_limits_tasks_below_the_visibility_timeout(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        broker_url="redis://127.0.0.1:1/3", task_time_limit=120, visibility_timeout=300, score_backoff_max=100,
        delivery_backoff_max=100,
    )
    app = create_app(settings)
    conf = app.conf
    assert conf.broker_url == "redis://127.0.0.1:1/3"
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True and not conf.result_backend
    assert conf.task_time_limit == 120 and conf.task_soft_time_limit == soft_time_limit(settings) == 108
    assert conf.broker_transport_options["visibility_timeout"] == 300 > conf.task_time_limit
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert runtime(app).settings is settings and runtime(app) is runtime(app)  # one per app and process


def test_tasks_have_fixed_names_and_their_own_queues(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    expected = {SCORE_TASK: "score", DELIVER_TASK: "deliver", SWEEP_TASK: "maintenance", RESCORE_TASK: "score",
                STUDY_REPORTS_TASK: "maintenance"}
    for name, queue in expected.items():
        assert name in app.tasks
        assert app.amqp.router.route({}, name)["queue"].name == queue
    assert {q.name for q in app.conf.task_queues} == {"score", "deliver", "maintenance"}
    # Each queue on its own exchange and key, so a message reaches exactly one queue.
    for queue in app.conf.task_queues:
        assert queue.exchange.name == queue.name and queue.routing_key == queue.name


def test_beat_sweeps_every_interval_and_rescores_on_the_cron_from_settings(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(sweep_interval=45, rescore_cron="30 3 * * 1-5"))
    schedule = app.conf.beat_schedule
    assert schedule["retinagate-sweep"]["task"] == SWEEP_TASK
    assert schedule["retinagate-sweep"]["schedule"] == 45.0
    reports = schedule["retinagate-study-reports"]
    assert reports["task"] == STUDY_REPORTS_TASK and reports["schedule"] == 45.0
    assert reports["options"]["queue"] == "maintenance"  # every worker consumes it, scoring ones included
    cron = schedule["retinagate-rescore"]["schedule"]
    assert isinstance(cron, crontab) and schedule["retinagate-rescore"]["task"] == RESCORE_TASK
    assert cron.minute == {30} and cron.hour == {3} and cron.day_of_week == {1, 2, 3, 4, 5}


def test_an_impossible_cron_names_the_setting(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="rescore_cron"):
        create_app(make_settings(rescore_cron="61 2 * * *"))


def test_celery_finds_the_module_app_built_lazily_from_the_environment(tmp_path: Path) -> None:
    code = (
        "import sys, worker.app as m\n"
        "assert 'app' not in vars(m), 'built at import'\n"
        "from celery.app.utils import find_app\n"
        "app = find_app('worker.app')\n"
        "print(app.conf.broker_url, app.conf.task_time_limit)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "RETINAGATE_DATA_DIR": str(tmp_path),
        "RETINAGATE_BROKER_URL": "redis://127.0.0.1:9/4",
        "RETINAGATE_TASK_TIME_LIMIT": "77",
    }
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["redis://127.0.0.1:9/4", "77"]


def test_the_worker_cli_module_imports_only_the_standard_library() -> None:
    code = (
        "import sys, worker.cli\n"
        "heavy = {'celery', 'kombu', 'sqlalchemy', 'onnxruntime', 'pydicom', 'pynetdicom', 'numpy', 'torch'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_beat_prunes_storage_daily_at_0330_utc_only_when_retention_is_set(
    make_settings: Callable[..., Settings],
) -> None:
    from retinagate.queue import PRUNE_TASK

    assert "retinagate-prune" not in create_app(make_settings()).conf.beat_schedule

    entry = create_app(make_settings(retention_days=90)).conf.beat_schedule["retinagate-prune"]

    assert entry["task"] == PRUNE_TASK and entry["options"]["queue"] == "maintenance"
    cron = entry["schedule"]
    assert isinstance(cron, crontab) and cron.minute == {30} and cron.hour == {3} and len(cron.day_of_week) == 7


def test_the_prune_task_is_on_the_maintenance_queue_and_prunes_with_the_apps_settings(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]]
) -> None:
    from datetime import timedelta

    from sqlalchemy import select, update

    from retinagate.db import make_engine, session_factory, session_scope
    from retinagate.models import Instance, utcnow
    from retinagate.queue import PRUNE_TASK

    settings = make_settings(retention_days=7)
    worker_store_outputs(settings, 1)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        s.execute(update(Instance).values(received_at=utcnow() - timedelta(days=8)))
    app = create_app(settings)
    assert app.amqp.router.route({}, PRUNE_TASK)["queue"].name == "maintenance"

    result = app.tasks[PRUNE_TASK].apply().get()

    assert result["pruned"] == 1 and result["remaining"] == 0 and result["errors"] == 0
    with session_scope(session_factory(engine)) as s:
        assert s.scalar(select(Instance.pruned_at)) is not None
    engine.dispose()
