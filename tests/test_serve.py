"""``retinagate serve`` supervises its children: the restart policy on fake processes, and a real
``serve`` whose embedded redis-server is killed while a camera keeps sending."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from retinagate.serve import (
    QUICK_EXITS_REPORTED,
    RESTART_BACKOFF_MAX_S,
    STABLE_AFTER_S,
    Supervisor,
    _Child,
)

ROOT = Path(__file__).resolve().parents[1]


class FakeProcess:
    """Stands in for a Popen: ``exit(code)`` ends it."""

    pids = iter(range(1000, 100000))

    def __init__(self) -> None:
        self.pid = next(self.pids)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def exit(self, code: int) -> None:
        self.returncode = code


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _supervisor(*names: str) -> tuple[Supervisor, Clock, dict[str, list[FakeProcess]]]:
    clock = Clock()
    supervisor = Supervisor({}, clock=clock)
    launched: dict[str, list[FakeProcess]] = {name: [] for name in names}
    for name in names:

        def launch(name: str = name) -> Any:
            process = FakeProcess()
            launched[name].append(process)
            return process

        supervisor.children.append(_Child(name, launch))
    supervisor.start()
    return supervisor, clock, launched


def test_a_child_that_exits_is_started_again_after_a_second_and_the_others_keep_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor, clock, launched = _supervisor("gateway", "worker")
    clock.now = 120.0
    launched["worker"][0].exit(1)

    supervisor.check()
    assert len(launched["worker"]) == 1  # not yet: the backoff
    clock.now += 1.0
    supervisor.check()

    assert len(launched["worker"]) == 2 and len(launched["gateway"]) == 1
    assert launched["gateway"][0].poll() is None
    assert "worker exited with status 1 after 120 s; starting it again in 1 s" in caplog.text


def test_a_child_that_keeps_exiting_at_once_backs_off_to_a_bound_and_is_reported_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor, clock, launched = _supervisor("redis")
    delays = []
    for _ in range(10):
        launched["redis"][-1].exit(1)
        supervisor.check()
        (child,) = supervisor.children
        assert child.restart_at is not None
        delays.append(child.restart_at - clock.now)
        clock.now = child.restart_at
        supervisor.check()

    assert delays == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30] and max(delays) == RESTART_BACKOFF_MAX_S
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 10 - QUICK_EXITS_REPORTED + 1
    assert "redis exited with status 1 0 s after it started, 3 times in a row" in errors[0].getMessage()

    # Up for longer than STABLE_AFTER_S: healthy again, the next restart waits the first delay.
    clock.now += STABLE_AFTER_S
    launched["redis"][-1].exit(-9)
    supervisor.check()
    assert supervisor.children[0].restart_at == clock.now + 1
    assert "redis was killed by SIGKILL after 60 s; starting it again in 1 s" in caplog.text


def test_a_child_that_cannot_be_started_is_tried_again_with_the_same_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor, clock, launched = _supervisor("redis")
    (child,) = supervisor.children
    working = child.launch

    def broken() -> Any:
        raise RuntimeError("embedded Redis exited at start: no space left")

    child.launch = broken
    launched["redis"][0].exit(1)
    supervisor.check()
    clock.now = child.restart_at or 0.0
    supervisor.check()
    assert "redis could not be started (embedded Redis exited at start: no space left)" in caplog.text
    assert child.restart_at == clock.now + 2

    child.launch = working
    clock.now = child.restart_at
    supervisor.check()
    assert len(launched["redis"]) == 2 and child.restart_at is None


def test_children_stop_in_order_with_the_broker_last() -> None:
    clock = Clock()
    supervisor = Supervisor({}, clock=clock)
    stopped: list[str] = []

    class Stoppable(FakeProcess):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def send_signal(self, signum: int) -> None:
            stopped.append(self.name)
            self.returncode = 0

        def wait(self, timeout: float | None = None) -> int:
            return 0

    def launcher(name: str) -> Any:
        return lambda: Stoppable(name)

    supervisor.children = [_Child("gateway", launcher("gateway")), _Child("worker", launcher("worker"))]
    supervisor.children.insert(0, _Child("redis", launcher("redis"), stop_last=True))
    supervisor.start()
    supervisor.stop()
    assert stopped == ["gateway", "worker", "redis"]


# A real `retinagate serve`: gateway, workers, beat and the embedded Redis as processes.


class Serve:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "retinagate", "serve", "--concurrency", "1"],
            cwd=ROOT,
            env=env,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self, name: str) -> list[int]:
        """Pids of the children that serve logged as started under ``name``, in order."""
        return [int(p) for p in re.findall(rf"started {name} \(pid (\d+)\)", self.text())]

    def redis_servers(self) -> list[int]:
        """Pids of serve's redis-server children now running (read from /proc, not from serve's log)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        found = []
        for pid in children.read_text().split() if children.exists() else []:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"redis-server" in command and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                found.append(int(pid))
        return found

    def wait_for(self, check: Any, what: str, timeout: float) -> float:
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > timeout or self.process.poll() is not None:
                raise AssertionError(
                    f"waited {time.monotonic() - started:.0f} s for {what} (serve exit status "
                    f"{self.process.poll()}):\n{self.text()[-5000:]}"
                )
            time.sleep(0.2)
        return time.monotonic() - started

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self._file.close()
        return self.process.returncode


@pytest.fixture
def serve_env(tmp_path: Path, random_onnx_model_path: Path) -> dict[str, str]:
    from retinagate.pacs import free_port

    values = {
        "RETINAGATE_DATA_DIR": str(tmp_path / "var"),
        "RETINAGATE_MODEL_PATH": str(random_onnx_model_path),
        "RETINAGATE_GATEWAY_HOST": "127.0.0.1",
        "RETINAGATE_GATEWAY_PORT": str(free_port()),
        "RETINAGATE_LOG_LEVEL": "INFO",
        "RETINAGATE_INTRA_OP_THREADS": "1",
    }
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **values}


@pytest.fixture
def running_serve(serve_env: dict[str, str], tmp_path: Path) -> Iterator[Serve]:
    serve = Serve(serve_env, tmp_path / "serve.log")
    try:
        serve.wait_for(lambda: serve.text().count(" ready.") >= 2, "both workers to be ready", 120)
        yield serve
    finally:
        serve.stop()


def _status(env: dict[str, str], sop_instance_uid: str) -> str | None:
    from retinagate.db import make_engine, session_factory, session_scope
    from retinagate.models import Instance
    from retinagate.settings import load_settings

    engine = make_engine(load_settings(environ={k: v for k, v in env.items() if k.startswith("RETINAGATE_")}))
    try:
        with session_scope(session_factory(engine)) as session:
            status = session.scalar(select(Instance.status).where(Instance.sop_instance_uid == sop_instance_uid))
            return None if status is None else str(status.value)
    finally:
        engine.dispose()


def _send(env: dict[str, str], path: Path) -> int:
    from pynetdicom import AE

    ds = dcmread(path)
    ae = AE(ae_title="FUNDUSCAM")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", int(env["RETINAGATE_GATEWAY_PORT"]), ae_title="RETINAGATE")
    assert assoc.is_established, "the gateway refused or did not answer"
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.mark.slow
def test_serve_restarts_its_embedded_redis_when_it_is_killed_and_the_gateway_stays_up(
    running_serve: Serve, serve_env: dict[str, str], camera_files: Any
) -> None:
    """Before, serve never looked at its Redis: killed, it stayed dead, the gateway kept answering
    0x0000 and every photograph stayed `received`."""
    serve = running_serve
    first, second = camera_files(2)
    uid = {path: str(dcmread(path).SOPInstanceUID) for path in (first, second)}
    assert _send(serve_env, first) == 0
    serve.wait_for(lambda: _status(serve_env, uid[first]) == "scored", "the first photograph to be scored", 120)
    (gateway,) = serve.pids("gateway")
    (redis,) = serve.redis_servers()

    os.kill(redis, signal.SIGKILL)
    killed = time.monotonic()
    serve.wait_for(lambda: serve.redis_servers() not in ([], [redis]), "serve to start Redis again", 30)
    print(f"embedded Redis started again {time.monotonic() - killed:.1f} s after SIGKILL")
    assert "redis was killed by SIGKILL after" in serve.text()

    assert _send(serve_env, second) == 0  # the gateway answers the camera throughout
    sent = time.monotonic()
    serve.wait_for(lambda: _status(serve_env, uid[second]) == "scored", "the photograph sent after the restart", 120)
    print(f"photograph sent after the Redis restart scored {time.monotonic() - sent:.1f} s after it was sent")

    assert serve.pids("gateway") == [gateway] and serve.process.poll() is None
    os.kill(gateway, 0)  # still the same gateway process
    assert serve.stop() == 0
