"""The fault suite's machinery: a deployment of real processes on loopback, and faults to inflict on it.

A :class:`Deployment` is what an operator runs, each piece its own process: ``retinagate gateway``,
``retinagate worker`` and ``retinagate beat``, a private redis-server (no persistence, so a stopped
Redis loses its messages as a crashed one would), Orthanc as the PACS, and dcmtk's storescu as the
camera. Every test gets its own Redis, data folder, database and Orthanc, so a test may stop or kill
any of them. Processes run in their own process groups (``kill`` reaches a worker's pool children too)
and log at DEBUG into ``<tmp>/logs/<name>.log``, appended across restarts, so that
:meth:`Deployment.assert_no_patient_data` can read everything each process ever wrote.

The model is the random-weights export (:func:`random_onnx_model_path`): these tests are about
plumbing, not accuracy, and it takes seconds instead of minutes of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from retinagate.pacs import Orthanc, free_port
from retinagate.serve import stop_process

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Puts the fault tests in one pytest-xdist group (``make test`` runs ``--dist loadgroup``): one
    worker runs them one after another, so no two deployments and their time bounds share the machine,
    while the other workers take the rest of the suite."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.xdist_group("faults"))


#: Settings that make recovery fast enough for a test: sweeps every 5 s, work with no live message sent
#: again after 30 s, short backoffs, destinations whose retries ran out probed every 10 s. The settings
#: validate the relations between them. The worker-kill test runs on the defaults instead.
FAST_RECOVERY = {
    "RETINAGATE_LEASE_SECONDS": "10",
    "RETINAGATE_SWEEP_INTERVAL": "5",
    "RETINAGATE_TASK_TIME_LIMIT": "20",
    "RETINAGATE_SCORE_BACKOFF": "1",
    "RETINAGATE_SCORE_BACKOFF_MAX": "5",
    "RETINAGATE_STUCK_AFTER": "30",
    "RETINAGATE_VISIBILITY_TIMEOUT": "60",
    "RETINAGATE_DELIVERY_BACKOFF": "1",
    "RETINAGATE_DELIVERY_BACKOFF_MAX": "8",
    "RETINAGATE_DELIVERY_PROBE_INTERVAL": "10",
}


def require(tool: str) -> str:
    """The path of an external tool; skips without it (fails under CI, which installs them all)."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin:/usr/lib/postgresql/15/bin")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; CI installs it, so this is a broken setup")
        pytest.skip(f"{tool} is not installed")
    return found


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.5) -> float:
    """Polls ``check`` until it is true; returns the seconds it took, or fails naming ``what``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(every_s)
    return time.monotonic() - started


# --- Redis, PostgreSQL and Orthanc that a test may stop and start again -------------------------------


class RedisServer:
    """A redis-server on a fixed loopback port, without persistence; stop and start it at will."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require("redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10)
        self.process = None


class PostgresCluster:
    """A throwaway PostgreSQL cluster of this test alone, on a fixed loopback port, to stop and start.

    As the session fixture ``postgres_server`` does: under root it runs as ``postgres`` (or
    ``nobody``), trust authentication on 127.0.0.1, fsync off.
    """

    def __init__(self, root: Path) -> None:
        import pwd

        self.bindir = Path(require("pg_ctl")).resolve().parent
        self.root = root
        self.port = free_port()
        self.prefix: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for user in ("postgres", "nobody"):
                try:
                    account = pwd.getpwnam(user)
                    break
                except KeyError:
                    continue
            else:
                pytest.skip("running as root with no unprivileged user to run PostgreSQL")
            os.chown(root, account.pw_uid, account.pw_gid)
            self.prefix = ["runuser", "-u", account.pw_name, "--"]
        self.data, self.log = root / "data", root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/retinagate"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr}\n{tail}")

    def create(self) -> PostgresCluster:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                  "--encoding=UTF8", "--locale=C", "--no-instructions")  # fmt: skip
        self.start()
        import psycopg

        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
            admin.execute('CREATE DATABASE "retinagate"')
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t",
                  "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                        "stop"], capture_output=True, timeout=60, check=False)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


class ConfiguredOrthanc(Orthanc):
    """:class:`retinagate.pacs.Orthanc` with extra configuration (``AcceptedTransferSyntaxes``, say),
    skipped without Orthanc (failed under CI). Stop and start it again to take a PACS down for a
    while: it keeps its ports and its storage."""

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC", extra: dict[str, Any] | None = None) -> None:
        super().__init__(workdir, ae_title, executable=require("Orthanc"), extra=extra)

    def count(self) -> int:
        """Instances stored, from the REST API's statistics (cheap: no per-instance request)."""
        return int(self._get("/statistics")["CountInstances"])


# --- the camera ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreReport:
    """What storescu reported: its exit status, the DIMSE status of each response in order, its output."""

    returncode: int
    statuses: list[int]
    output: str


class Camera:
    """Writes synthetic photographs with fabricated but distinctive patient data and sends them with storescu.

    Every patient name, id and birth date it writes is remembered in :attr:`patient_data`, for the check
    that no process logs them.
    """

    def __init__(self, folder: Path, tag: str) -> None:
        self.folder = folder
        self.tag = re.sub(r"[^A-Z]", "", tag.upper())[:12] or "FAULT"
        self.storescu = require("storescu")
        self.patient_data: set[str] = set()
        #: Each file written, with its patient name, patient id and birth date.
        self.written: list[tuple[Path, tuple[str, str, str]]] = []
        self._images: dict[tuple[int, int, int], Any] = {}

    def photographs(
        self, count: int, *, study: int, size: tuple[int, int] = (256, 192), transfer_syntax: str = "jpeg_baseline",
        distinct: int = 8,
    ) -> list[Path]:
        """``count`` photographs of one study (both eyes, several per eye), one patient per study.

        Only ``distinct`` pictures are rendered per size and reused under new UIDs: rendering costs more
        than writing, and these tests count instances, not pixels.
        """
        import numpy as np

        from retinagate.synth import DicomIdentity, render_fundus, write_dicom

        paths = []
        birth = f"19{31 + study % 60:02d}{1 + study % 12:02d}{11 + study % 17:02d}"
        for index in range(count):
            laterality = "R" if index % 2 == 0 else "L"
            identity = dataclasses.replace(
                DicomIdentity.synthetic(study, laterality, seed=hash(self.tag) % 10_000, instance=index // 2),
                patient_name=f"{self.tag}^PATIENT{study:03d}",
                patient_id=f"FT{self.tag[:6]}{study:05d}",
                patient_birth_date=birth,
            )
            self.patient_data |= {identity.patient_name, identity.patient_id, birth,
                                  f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"}  # fmt: skip
            key = (size[0], size[1], index % distinct)
            if key not in self._images:
                rng = np.random.default_rng([size[0], index % distinct])
                self._images[key] = render_fundus(rng, size[0], size[1], (), laterality).image
            path = self.folder / f"study{study:03d}" / f"{index:03d}.dcm"
            write_dicom(self._images[key], path, identity, transfer_syntax=transfer_syntax)  # type: ignore[arg-type]
            paths.append(path)
            self.written.append((path, (identity.patient_name, identity.patient_id, birth)))
        return paths

    def command(self, paths: list[Path], port: int, *extra: str) -> list[str]:
        """The storescu command line that sends ``paths`` in one association."""
        return [self.storescu, "-d", "-nh", "-xy", "-aet", "FUNDUSCAM", "-aec", "RETINAGATE", *extra, "127.0.0.1",
                str(port), *map(str, paths)]  # fmt: skip

    def send(self, paths: list[Path], port: int, *extra: str, timeout_s: float = 120) -> StoreReport:
        """Sends ``paths`` in one association and reports each response's status."""
        done = subprocess.run(self.command(paths, port, *extra), capture_output=True, text=True, timeout=timeout_s)
        output = done.stdout + done.stderr
        return StoreReport(done.returncode, parse_statuses(output), output)


_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


def parse_statuses(output: str) -> list[int]:
    """DIMSE statuses of the C-STORE responses, in order, from storescu's ``--debug`` output (its
    ``--verbose`` names a status class, ``Refused: OutOfResources``, not the code)."""
    return [int(code, 16) for code in _STATUS.findall(output)]


# --- the deployment -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class State:
    """SQL's view of the work: instances by status, predictions and outputs, deliveries by status."""

    instances: Counter[str]
    predictions: int
    instances_with_several_predictions: int
    outputs: int
    duplicate_outputs: int
    deliveries: Counter[str]

    @property
    def total(self) -> int:
        return sum(self.instances.values())

    @property
    def done(self) -> int:
        return self.instances["scored"] + self.instances["ungradable"]


class Deployment:
    """Gateway, worker(s) and beat as separate processes around one Redis, one database and one PACS."""

    def __init__(self, root: Path, model: Path, redis: RedisServer, pacs: ConfiguredOrthanc) -> None:
        self.root = root
        self.redis = redis
        self.pacs = pacs
        self.port = free_port()
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
        self.env.update(
            RETINAGATE_DATA_DIR=str(root / "var"),
            RETINAGATE_BROKER_URL=redis.url,
            RETINAGATE_MODEL_PATH=str(model),
            RETINAGATE_GATEWAY_HOST="127.0.0.1",
            RETINAGATE_GATEWAY_PORT=str(self.port),
            RETINAGATE_DESTINATIONS=f"{pacs.ae_title}@127.0.0.1:{pacs.port}",
            RETINAGATE_OUTPUTS="sc,sr",
            # These tests count each photograph's SC and SR; a study report (tests/test_worker_tasks.py)
            # must not join them should a test outlast the default quiet period.
            RETINAGATE_STUDY_QUIET_SECONDS="86400",
            RETINAGATE_LOG_LEVEL="DEBUG",
            RETINAGATE_INTRA_OP_THREADS="1",
        )
        self._engine: Any = None

    #: See :func:`wait_until` (test modules cannot import from a conftest; they reach it here).
    wait_until = staticmethod(wait_until)

    @staticmethod
    def fill(folder: Path) -> Path:
        """See :func:`fill_file_system`."""
        return fill_file_system(folder)

    def fast_recovery(self, **more: str) -> None:
        """Shortens sweeps, leases, stuck timeouts and backoffs (:data:`FAST_RECOVERY`), plus ``more``."""
        self.env.update(FAST_RECOVERY)
        self.env.update(more)

    # processes

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "retinagate", *args], env=self.env, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        with (self.logs / "cli.log").open("a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise AssertionError(f"retinagate {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return done

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Starts ``retinagate <args>`` in a process group of its own, logging to ``logs/<name>.log``."""
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "retinagate", *args], env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.processes[name] = process
        return process

    def up(self, *, worker_args: tuple[str, ...] = ("--concurrency", "1"), beat: bool = True) -> None:
        """Creates the schema and starts gateway, worker and (by default) beat; waits for C-ECHO."""
        self.cli("db", "upgrade")
        self.start_gateway()
        self.start("worker", "worker", *worker_args)
        if beat:
            self.start("beat", "beat")

    def start_gateway(self) -> None:
        self.start("gateway", "gateway")
        self.wait_for_echo()

    def wait_for_echo(self, timeout_s: float = 60) -> None:
        echoscu = require("echoscu")

        def answers() -> bool:
            gateway = self.processes.get("gateway")
            if gateway is not None and gateway.poll() is not None:
                raise AssertionError(f"the gateway exited ({gateway.returncode}):\n{self.log('gateway')[-2000:]}")
            command = [echoscu, "-aet", "FUNDUSCAM", "-aec", "RETINAGATE", "127.0.0.1", str(self.port)]
            return subprocess.run(command, capture_output=True, timeout=30).returncode == 0

        wait_until(answers, timeout_s, f"the gateway answers C-ECHO on port {self.port}", every_s=0.2)

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Sends ``signum`` to a process's whole group (a worker and its pool), and reaps it on SIGKILL."""
        process = self.processes[name]
        os.killpg(process.pid, signum)
        if signum == signal.SIGKILL:
            process.wait(30)

    def alive(self, name: str) -> bool:
        return self.processes[name].poll() is None

    def stop(self) -> dict[str, int | None]:
        """Stops every process (SIGTERM to its group, SIGKILL after 30 s); returns the exit codes.

        The gateway first, so nothing new comes in; then the others together (each a warm shutdown
        of a second or two, which need not wait for one another)."""
        gateway = [self.processes["gateway"]] if "gateway" in self.processes else []
        others = [p for name, p in self.processes.items() if name != "gateway"]
        for group in (gateway, others):
            running = [p for p in group if p.poll() is None]
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            for process in running:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        return {name: p.returncode for name, p in self.processes.items()}

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {path.name}:\n{path.read_text(errors='replace')[-chars:]}"
                         for path in sorted(self.logs.glob("*.log")))  # fmt: skip

    # memory

    def tree(self, name: str) -> list[int]:
        """The pid of a process and of all its descendants."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = [], [self.processes[name].pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def peak_rss_mib(self, name: str) -> dict[int, float]:
        """Peak resident memory (VmHWM) of a process and each of its descendants, in MiB, by pid."""
        peaks = {}
        for pid in self.tree(name):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            if match:
                peaks[pid] = int(match.group(1)) / 1024
        return peaks

    # state

    @property
    def database_url(self) -> str:
        from retinagate.settings import load_settings

        return load_settings(environ=self.env).resolved_database_url

    def state(self) -> State:
        from sqlalchemy import func, select

        from retinagate.db import make_engine, session_factory
        from retinagate.models import Delivery, Instance, Output, Prediction

        if self._engine is None:
            self._engine = make_engine(self.database_url)
        with session_factory(self._engine)() as session:
            instances = Counter({str(s): n for s, n in session.execute(
                select(Instance.status, func.count()).group_by(Instance.status))})  # fmt: skip
            per_instance = select(Prediction.instance_id, func.count()).group_by(Prediction.instance_id)
            several = sum(1 for _, n in session.execute(per_instance) if n > 1)
            outputs = session.execute(select(Output.sop_instance_uid)).scalars().all()
            deliveries = Counter({str(s): n for s, n in session.execute(
                select(Delivery.status, func.count()).group_by(Delivery.status))})  # fmt: skip
            return State(
                instances=instances,
                predictions=session.scalar(select(func.count()).select_from(Prediction)) or 0,
                instances_with_several_predictions=several,
                outputs=len(outputs),
                duplicate_outputs=len(outputs) - len(set(outputs)),
                deliveries=deliveries,
            )

    def assert_one_result_each(self, expected: int) -> None:
        """Every one of ``expected`` instances scored once, with one SC and one SR, and Orthanc holds
        exactly those outputs (no duplicates: a second set would carry other UIDs)."""
        state = self.state()
        assert state.total == expected, (state, self.logs_tail())
        assert state.done == expected, (state, self.logs_tail())
        assert state.predictions == expected and state.instances_with_several_predictions == 0, state
        assert state.outputs == 2 * expected and state.duplicate_outputs == 0, state
        received = self.pacs.instances()
        uids = [r.sop_instance_uid for r in received]
        assert len(uids) == len(set(uids)) == 2 * expected, (len(uids), len(set(uids)), expected)
        classes = Counter(r.sop_class_uid for r in received)
        assert classes[SC_CLASS] == expected, classes

    def assert_no_patient_data(self, camera: Camera) -> None:
        """No process of ours logged a patient name, id or birth date of the camera's photographs."""
        # Not a vacuous check: the values searched for are the ones in the files that were sent.
        first, values = camera.written[0]
        assert all(value.encode() in first.read_bytes() for value in values), (first, values)
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace")
            hits = sorted(value for value in camera.patient_data if value in text)
            assert not hits, f"{path.name} holds patient data: {hits}"

    def deliveries(self) -> list[dict[str, Any]]:
        """Every delivery row, with the kind of its output: destination, kind, status, attempts, errors."""
        from sqlalchemy import select

        from retinagate.db import make_engine, session_factory
        from retinagate.models import Delivery, Output

        if self._engine is None:
            self._engine = make_engine(self.database_url)
        with session_factory(self._engine)() as session:
            rows = session.execute(select(Delivery, Output.kind).join(Output, Delivery.output_id == Output.id))
            return [
                {"destination": d.destination, "kind": str(kind), "status": str(d.status), "attempts": d.attempts,
                 "retryable": d.retryable, "dimse_status": d.dimse_status, "last_error": d.last_error}
                for d, kind in rows
            ]  # fmt: skip

    def received_rows(self) -> dict[str, tuple[str, int]]:
        """Every instance row: its SOP Instance UID by storage key, with the file size it recorded."""
        from sqlalchemy import select

        from retinagate.db import make_engine, session_factory
        from retinagate.models import Instance

        if self._engine is None:
            self._engine = make_engine(self.database_url)
        with session_factory(self._engine)() as session:
            rows = session.execute(select(Instance.storage_key, Instance.sop_instance_uid, Instance.size_bytes))
            return {key: (uid, size) for key, uid, size in rows}

    def assert_storage_matches_rows(self, storage: Path | None = None, *, temporaries: bool = False) -> None:
        """Received files and instance rows agree one to one: no temporary file left (``temporaries``:
        a killed writer's may remain until the next start removes it), no file without a row, no row
        without its complete file (its recorded size, and a dataset that reads to the end)."""
        from pydicom import dcmread

        from retinagate.settings import load_settings

        root = storage or load_settings(environ=self.env).resolved_storage_dir
        files = self.storage_files(root)
        temporary = [p for p in files if p.name.startswith(".") or p.suffix == ".tmp"]
        assert temporaries or not temporary, f"temporary files left in storage: {temporary}"
        files = [p for p in files if p not in temporary]
        received = {p.relative_to(root).as_posix(): p for p in files if p.relative_to(root).parts[0] == "in"}
        rows = self.received_rows()
        if temporaries:
            # Killed between its row's commit and the rename: the next start puts the file in place.
            staged = {(p.parent / p.name.split(".")[1]).relative_to(root).as_posix() for p in temporary}
            staged = {f"{key}.dcm" for key in staged}
            rows = {key: value for key, value in rows.items() if key in received or key not in staged}
        assert set(received) == set(rows), (sorted(set(received) - set(rows)), sorted(set(rows) - set(received)))
        for key, (uid, size) in rows.items():
            path = received[key]
            assert path.stat().st_size == size, (key, path.stat().st_size, size)
            ds = dcmread(path)
            assert str(ds.SOPInstanceUID) == uid
            assert len(ds.PixelData) > 0

    def storage_files(self, storage: Path | None = None) -> list[Path]:
        """Every file in storage (temporary ones included), received or produced."""
        from retinagate.settings import load_settings

        root = storage or load_settings(environ=self.env).resolved_storage_dir
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def deployment(tmp_path: Path, random_onnx_model_path: Path) -> Iterator[Deployment]:
    """A :class:`Deployment` with its own Redis and Orthanc started, its processes not yet (call ``up``).

    Stops everything afterwards, whatever the test left running.
    """
    require("Orthanc")
    require("storescu")
    redis = RedisServer(tmp_path / "redis").start()
    pacs = ConfiguredOrthanc(tmp_path / "orthanc")
    system = None
    try:
        pacs.start()
        system = Deployment(tmp_path, random_onnx_model_path, redis, pacs)
        yield system
    finally:
        if system is not None:
            system.stop()
        pacs.kill()  # thrown away with tmp_path: no need to wait for a graceful stop
        redis.stop()


@pytest.fixture(name="parse_statuses")
def parse_statuses_fixture() -> Callable[[str], list[int]]:
    """:func:`parse_statuses`, for tests that run storescu themselves."""
    return parse_statuses


@pytest.fixture
def camera(tmp_path: Path, request: pytest.FixtureRequest) -> Camera:
    """A :class:`Camera` writing into the test's folder, its patient names tagged with the test's name."""
    return Camera(tmp_path / "camera", request.node.name.removeprefix("test_")[:12])


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own (with an empty database ``retinagate``), to stop and start.

    In a short folder under /tmp: its Unix socket's path must stay under 108 bytes."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("psycopg is not installed")
        pytest.skip("psycopg is not installed")
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="retinagate-faults-pg-")))
    try:
        yield cluster.create()
    finally:
        cluster.destroy()


@pytest.fixture
def make_orthanc(tmp_path: Path) -> Iterator[Callable[..., ConfiguredOrthanc]]:
    """Starts more Orthanc servers: ``make_orthanc(ae_title, extra_config)``; stops them afterwards."""
    started: list[ConfiguredOrthanc] = []

    def make(ae_title: str, extra: dict[str, Any] | None = None) -> ConfiguredOrthanc:
        server = ConfiguredOrthanc(tmp_path / f"orthanc-{ae_title.lower()}", ae_title, extra)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a tmpfs of a given size (``"8m"``) on a new folder and returns the folder; unmounts it after.

    Needs root (or CAP_SYS_ADMIN); skips where mounting is not allowed.
    """
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def fill_file_system(folder: Path) -> Path:
    """Fills the file system holding ``folder`` with one file, to the last block; returns the file."""
    import errno

    filler = folder / "filler.bin"
    with filler.open("wb", buffering=0) as out:
        for chunk in (1 << 20, 4096, 512, 1):
            block = b"\0" * chunk
            while True:
                try:
                    out.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler
