"""The tasks in a real Celery worker process on a real Redis server (no eager mode).

Each test runs ``celery -A worker.app worker`` (or ``retinagate worker``) as a subprocess whose
settings come from ``RETINAGATE_*`` variables, on its own Redis database, and a pynetdicom receiver
on loopback as the PACS.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from sqlalchemy import func, select

from retinagate.db import make_engine, session_factory, session_scope, upgrade
from retinagate.models import Delivery, DeliveryStatus, Instance, Model, Output, Prediction
from retinagate.queue import enqueue_score, producer
from retinagate.settings import Settings, load_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
_DATABASES = itertools.cycle(range(8, 16))  # Redis databases for these tests; the gateway's use 0


class Worker:
    """A worker subprocess in its own process group, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start (exit {self.process.poll()}):\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def pool_children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill(self) -> None:
        """SIGKILL to the whole group: the worker and its pool die at once, acknowledging nothing."""
        with contextlib.suppress(ProcessLookupError):  # pool processes may outlive their parent
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        # No warm shutdown after a test: its Redis database is flushed before the next one uses it.
        self.kill()
        self._log_file.close()


@pytest.fixture
def worker_env(tmp_path: Path, redis_url: str) -> Callable[..., tuple[Settings, dict[str, str]]]:
    """Settings and the matching environment for a worker: same data dir, own Redis database."""
    parts = urlsplit(redis_url)
    database = next(_DATABASES)
    broker = urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", ""))
    redis.Redis.from_url(broker).flushdb()

    def make(**overrides: Any) -> tuple[Settings, dict[str, str]]:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "broker_url": broker,
            "log_level": "INFO",
            "intra_op_threads": 2,
            **overrides,
        }
        env_values = {f"RETINAGATE_{k.upper()}": str(v) for k, v in values.items() if v is not None}
        settings = load_settings(environ=env_values)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env_values}
        return settings, env

    return make


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Starts worker subprocesses; stops (or kills) them after the test."""
    started: list[Worker] = []

    def start(env: dict[str, str], *extra: str, cli: str = "celery") -> Worker:
        if cli == "celery":
            argv = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "--concurrency",
                "1",
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "INFO",
                *extra,
            ]
        else:
            argv = [sys.executable, "-m", "retinagate", "worker", "--concurrency", "1", *extra]
        worker = Worker(argv, env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


def _wait(check: Callable[[], bool], what: str, timeout: float, workers: list[Worker]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            logs = "\n".join(w.text()[-2500:] for w in workers)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


class Db:
    """Reads the test database the worker writes."""

    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings)
        self.sessions = session_factory(self.engine)

    def statuses(self, ids: list[int]) -> list[str]:
        with session_scope(self.sessions) as s:
            return [s.get_one(Instance, i).status.value for i in ids]

    def all_delivered(self, expected: int) -> bool:
        with session_scope(self.sessions) as s:
            rows = s.scalars(select(Delivery)).all()
            return len(rows) == expected and all(r.status == DeliveryStatus.DELIVERED for r in rows)

    def snapshot(self) -> dict[str, Any]:
        with session_scope(self.sessions) as s:
            return {
                "predictions": sorted((p.id, p.instance_id, p.model_id) for p in s.scalars(select(Prediction))),
                "outputs": sorted(
                    (o.id, o.prediction_id, o.kind, o.sop_instance_uid, o.storage_key)
                    for o in s.scalars(select(Output))
                ),
                "deliveries": sorted(
                    (d.id, d.output_id, d.destination, d.status.value, d.attempts) for d in s.scalars(select(Delivery))
                ),
            }

    def output_uids(self) -> set[str]:
        with session_scope(self.sessions) as s:
            return set(s.scalars(select(Output.sop_instance_uid)))

    def scored_at(self) -> list[Any]:
        with session_scope(self.sessions) as s:
            return sorted(s.scalars(select(Prediction.created_at)))

    def count(self, model: Any) -> int:
        with session_scope(self.sessions) as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_a_stored_instance_is_scored_once_and_delivered_and_a_second_message_changes_nothing(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]],
    start_worker: Callable[..., Worker],
    worker_store_instance: Callable[..., int],
    worker_receiver: Any,
    random_onnx_model_path: Path,
) -> None:
    receiver = worker_receiver()
    settings, env = worker_env(model_path=random_onnx_model_path, destinations=receiver.destination)
    upgrade(settings)
    ids = [worker_store_instance(settings, study=0, laterality=eye) for eye in ("R", "L")]
    db = Db(settings)
    worker = start_worker(env)

    enqueue_score(settings, ids)  # what the gateway does after the durable write

    _wait(lambda: db.statuses(ids) == ["scored", "scored"], "both instances scored", 90, [worker])
    _wait(lambda: db.all_delivered(4), "4 deliveries (SC and SR of 2 images)", 60, [worker])
    first = db.snapshot()
    assert len(first["predictions"]) == 2 and len(first["outputs"]) == 4
    assert sorted(o[2] for o in first["outputs"]) == ["sc", "sc", "sr", "sr"]
    assert sorted(receiver.received) == sorted(db.output_uids())  # each output exactly once
    assert all(d[3] == "delivered" and d[4] == 1 for d in first["deliveries"])
    stamps = db.scored_at()

    enqueue_score(settings, ids)  # the same task again: a duplicate message, or a sweep

    _wait(lambda: "2 instance(s) skipped (already scored by this model)" in worker.text(), "the re-run", 60, [worker])
    time.sleep(1.0)  # room for a delivery the re-run must not send
    assert db.snapshot() == first  # same rows, same UIDs, same storage keys, deliveries untouched
    assert db.scored_at() == stamps  # not scored again
    assert sorted(receiver.received) == sorted(db.output_uids())


def test_a_destination_that_is_down_then_up_receives_everything_after_retries(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]],
    start_worker: Callable[..., Worker],
    worker_store_instance: Callable[..., int],
    worker_receiver: Any,
    random_onnx_model_path: Path,
) -> None:
    pacs = worker_receiver("PACS", start=False)  # its port is reserved, nothing listens yet
    viewer = worker_receiver("VIEWER")
    settings, env = worker_env(
        model_path=random_onnx_model_path,
        destinations=f"{pacs.destination},{viewer.destination}",
        delivery_backoff=0.5,
        delivery_backoff_max=2,
        delivery_max_retries=20,
    )
    upgrade(settings)
    ids = [worker_store_instance(settings, study=i, size=(512, 384)) for i in range(3)]
    db = Db(settings)
    worker = start_worker(env, cli="retinagate")
    enqueue_score(settings, ids)

    def pacs_retrying() -> bool:
        with session_scope(db.sessions) as s:
            rows = s.scalars(select(Delivery).where(Delivery.destination == pacs.destination)).all()
            return len(rows) == 6 and all(r.status == DeliveryStatus.RETRYING and r.attempts >= 2 for r in rows)

    _wait(pacs_retrying, "the PACS deliveries to be retried", 90, [worker])
    assert sorted(viewer.received) == sorted(db.output_uids())  # the viewer was up all along
    pacs.start()

    _wait(lambda: db.all_delivered(12), "every delivery", 60, [worker])
    assert sorted(pacs.received) == sorted(db.output_uids())
    with session_scope(db.sessions) as s:
        for row in s.scalars(select(Delivery).where(Delivery.destination == pacs.destination)):
            assert row.attempts >= 3 and row.dimse_status == 0 and row.last_error is None


def test_a_worker_killed_while_scoring_leaves_the_task_to_be_redone(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]],
    start_worker: Callable[..., Worker],
    worker_store_instance: Callable[..., int],
    worker_receiver: Any,
    random_onnx_model_path: Path,
) -> None:
    """The pool process dies (SIGKILL) inside the score task: late acknowledgement and
    reject-on-worker-lost put the message back, and the next pool process does the work once."""
    receiver = worker_receiver()
    settings, env = worker_env(
        model_path=random_onnx_model_path,
        destinations=receiver.destination,
        task_time_limit=60,
        visibility_timeout=120,
        score_backoff_max=20,
        delivery_backoff_max=20,
    )
    upgrade(settings)
    (instance,) = [worker_store_instance(settings)]
    db = Db(settings)
    worker = start_worker(env)
    broker = redis.Redis.from_url(settings.broker_url)
    (child,) = worker.pool_children()

    # Hold SQLite's write lock: the task starts, reads, and then blocks on its first write, mid-task.
    lock = sqlite3.connect(settings.data_dir / "retinagate.db", isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")
    try:
        enqueue_score(settings, [instance])
        _wait(lambda: broker.llen("score") == 0 and broker.hlen("unacked") == 1, "the task to be taken", 30, [worker])
        time.sleep(2.0)  # the pool process is now inside the task, waiting for the lock
        os.kill(child, signal.SIGKILL)
        _wait(
            lambda: child not in worker.pool_children() and len(worker.pool_children()) == 1,
            "a new pool process",
            30,
            [worker],
        )
        _wait(lambda: "WorkerLostError" in worker.text(), "the worker to notice", 30, [worker])
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    _wait(lambda: db.statuses([instance]) == ["scored"], "the redone task", 90, [worker])
    _wait(lambda: db.all_delivered(2), "delivery", 60, [worker])
    assert db.count(Prediction) == 1 and db.count(Output) == 2
    assert sorted(receiver.received) == sorted(db.output_uids())
    with session_scope(db.sessions) as s:
        assert s.get_one(Instance, instance).attempts == 1  # the killed run never got to count
    assert broker.hlen("unacked") == 0


def test_a_worker_killed_while_delivering_loses_nothing_the_sweeper_sends_it_again(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]],
    start_worker: Callable[..., Worker],
    worker_store_outputs: Callable[..., list[int]],
    worker_receiver: Any,
) -> None:
    """The whole worker (main process and pool) dies mid-C-STORE. Its message stays unacknowledged in
    Redis (handed out again only after the visibility timeout); the sweeper, run by beat in the
    restarted worker, finds the deliveries whose lease the dead worker stopped renewing and sends
    them again."""
    receiver = worker_receiver()
    receiver.gate.clear()  # the receiver holds its answer: the worker is stuck inside the C-STORE
    settings, env = worker_env(
        destinations=receiver.destination,
        lease_seconds=10,
        sweep_interval=5,
        task_time_limit=30,
        visibility_timeout=600,
        delivery_backoff_max=60,
    )
    outputs = worker_store_outputs(settings, 2)
    db = Db(settings)
    first = start_worker(env, "--queues", "deliver,maintenance")
    producer(settings).send_task("retinagate.deliver", args=[outputs], queue="deliver")

    assert receiver.in_store.wait(60), first.text()[-2000:]
    first.kill()
    with session_scope(db.sessions) as s:
        assert {d.status for d in s.scalars(select(Delivery))} == {DeliveryStatus.PENDING}
    broker = redis.Redis.from_url(settings.broker_url)
    assert broker.hlen("unacked") == 1  # the killed worker's message, not acknowledged
    receiver.gate.set()

    second = start_worker(env, "--queues", "deliver,maintenance", "--beat")
    _wait(lambda: db.all_delivered(2), "the sweeper's redelivery", 60, [first, second])
    assert set(receiver.received) == db.output_uids()


def test_deliveries_whose_retries_ran_out_are_sent_once_the_destination_answers_again(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]],
    start_worker: Callable[..., Worker],
    worker_store_outputs: Callable[..., list[int]],
    worker_receiver: Any,
) -> None:
    """The defect: a PACS down for longer than the retry budget lost its results for good. Now the
    sweep probes it (C-ECHO) and sends everything again once it answers."""
    pacs = worker_receiver("PACS", start=False)  # its port is reserved, nothing listens yet
    settings, env = worker_env(destinations=pacs.destination, delivery_backoff=0.5, delivery_backoff_max=1,
                               delivery_max_retries=1, sweep_interval=5, delivery_probe_interval=5)
    outputs = worker_store_outputs(settings, 2)
    db = Db(settings)
    worker = start_worker(env, "--queues", "deliver,maintenance", "--beat")
    producer(settings).send_task("retinagate.deliver", args=[outputs], queue="deliver")

    def given_up() -> bool:
        with session_scope(db.sessions) as s:
            rows = s.scalars(select(Delivery)).all()
            return len(rows) == 2 and all(r.status == DeliveryStatus.FAILED and r.retryable for r in rows)

    _wait(given_up, "the deliveries to run out of retries", 60, [worker])
    pacs.start()
    _wait(lambda: db.all_delivered(2), "the probe and the second round", 60, [worker])
    assert sorted(pacs.received) == sorted(db.output_uids())
    assert "answers again; 2 failed delivery(ies) sent again" in worker.text()


def test_the_nightly_rescore_task_queues_every_scored_instance_without_a_prediction_in_batches(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]],
    start_worker: Callable[..., Worker],
    worker_store_outputs: Callable[..., list[int]],
    random_onnx_model_path: Path,
) -> None:
    settings, env = worker_env(model_path=random_onnx_model_path, rescore_batch_size=2, log_verbose=True)  # task lines
    worker_store_outputs(settings, 3)  # three instances scored by an older model
    db = Db(settings)
    with session_scope(db.sessions) as s:
        old = {p.instance_id: (p.id, p.model_id, p.probabilities) for p in s.scalars(select(Prediction))}
    # The operator registers and activates the new model (`retinagate models`) before the workers serve it.
    from retinagate.engine import inspect_model
    from worker.registry import activate_model, register_model

    sha256, card = inspect_model(random_onnx_model_path)
    with session_scope(db.sessions) as s:
        activate_model(s, register_model(s, sha256, card, random_onnx_model_path)[0], by="test")
    worker = start_worker(env)

    producer(settings).send_task("retinagate.rescore", queue="score")  # what beat sends at night

    _wait(lambda: db.count(Prediction) == 6, "a prediction from the served model for each instance", 90, [worker])
    with session_scope(db.sessions) as s:
        models = {m.id: m for m in s.scalars(select(Model))}
        (active,) = [m for m in models.values() if m.active]
        assert active.path == str(random_onnx_model_path) and len(models) == 2
        new = {p.instance_id for p in s.scalars(select(Prediction).where(Prediction.model_id == active.id))}
        assert new == set(old)
        kept = {
            p.instance_id: (p.id, p.model_id, p.probabilities)
            for p in s.scalars(select(Prediction).where(Prediction.model_id != active.id))
        }
        assert kept == old
    _wait(lambda: worker.text().count("Task retinagate.score[") >= 4, "the score tasks' log lines", 10, [worker])
    received = [line for line in worker.text().splitlines() if "Task retinagate.score[" in line and "received" in line]
    assert len(received) == 2  # three instances in batches of two


def test_retinagate_beat_sends_the_sweep_and_the_study_reports_on_their_interval(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]], tmp_path: Path
) -> None:
    settings, env = worker_env(sweep_interval=5)
    broker = redis.Redis.from_url(settings.broker_url)
    beat = Worker([sys.executable, "-m", "retinagate", "beat"], env, tmp_path / "beat.log")

    def tasks() -> set[str]:
        return {json.loads(m)["headers"]["task"] for m in broker.lrange("maintenance", 0, -1)}

    try:
        _wait(lambda: {"retinagate.sweep", "retinagate.study_reports"} <= tasks(), "both messages", 30, [beat])
    finally:
        beat.stop()
    assert list(settings.data_dir.glob("celerybeat-schedule*"))  # its schedule lives in the data folder


def test_a_scoring_worker_loads_the_model_as_its_process_starts_and_a_sender_does_not(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]],
    start_worker: Callable[..., Worker],
    random_onnx_model_path: Path,
) -> None:
    settings, env = worker_env(model_path=random_onnx_model_path)
    upgrade(settings)

    scoring = start_worker(env, "--queues", "score", cli="retinagate")
    sender = start_worker(env, "--queues", "deliver,maintenance", "--pool", "threads", cli="retinagate")

    _wait(lambda: "model loaded and pipeline warmed" in scoring.text(), "the preload", 60, [scoring])
    time.sleep(1.0)
    assert "model loaded" not in sender.text() and "registered model" not in sender.text()
    with Db(settings).sessions() as session:  # the preload registered the model as the active one
        assert session.scalar(select(Model.active).where(Model.sha256 != "")) is True


def test_a_study_sent_in_two_associations_within_its_quiet_period_gets_one_study_report_delivered_once(
    worker_env: Callable[..., tuple[Settings, dict[str, str]]],
    start_worker: Callable[..., Worker],
    start_gateway: Callable[..., Any],
    camera_files: Callable[..., list[Path]],
    random_onnx_model_path: Path,
    tmp_path: Path,
) -> None:
    from pynetdicom import AE

    from retinagate.models import StudyReport
    from retinagate.pacs import start_receiver

    pacs = start_receiver(tmp_path / "pacs")  # Orthanc where installed, else the built-in receiver
    try:
        settings, env = worker_env(
            model_path=random_onnx_model_path,
            destinations=f"{pacs.ae_title}@127.0.0.1:{pacs.port}",
            study_quiet_seconds=3,
            sweep_interval=5,
        )
        upgrade(settings)
        db = Db(settings)
        worker = start_worker(env, "--beat")  # beat sends the study reports task every sweep_interval
        gateway = start_gateway(settings)
        host, port = gateway.address
        for path in camera_files(2):  # the right eye, then the left, each in its own association, 1 s apart
            ae = AE(ae_title="CAMERA")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.77.1.5.1", ["1.2.840.10008.1.2.4.50"])
            assoc = ae.associate(host, port, ae_title="RETINAGATE")
            assert assoc.send_c_store(path).Status == 0
            assoc.release()
            time.sleep(1.0)

        def reports_sent() -> list[str]:
            with session_scope(db.sessions) as s:
                uids = set(s.scalars(select(Output.sop_instance_uid).where(Output.kind == "study")))
            return [r.sop_instance_uid for r in pacs.instances() if r.sop_instance_uid in uids]

        _wait(lambda: len(reports_sent()) == 1, "the study report at the PACS", 60, [worker])
        time.sleep(settings.sweep_interval + 1.0)  # the next run of the beat task finds nothing more to report
        assert db.count(StudyReport) == 1 and len(reports_sent()) == 1
        with session_scope(db.sessions) as s:
            report = s.scalars(select(StudyReport)).one()
            assert report.instances == 2 and set(report.eyes) == {"R", "L"}
            (output,) = report.outputs
            assert [(d.status, d.attempts) for d in output.deliveries] == [(DeliveryStatus.DELIVERED, 1)]
            study_uid = report.study.study_uid
        (received,) = [r for r in pacs.instances() if r.sop_instance_uid == output.sop_instance_uid]
        assert received.study_uid == study_uid and received.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.33"
    finally:
        pacs.stop()
