"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from retinagate.logs import _StderrHandler
from retinagate.settings import Settings, load_settings


@pytest.fixture
def bench_module() -> Callable[[str], ModuleType]:
    """Loads a script of ``bench/`` by name (they are scripts, not a package)."""

    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve a module's annotations through it
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Builds settings rooted in the test's temporary folder, ignoring the process environment."""

    def build(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "var")
        return load_settings(environ={}, **overrides)

    return build


@pytest.fixture(autouse=True)
def _no_process_log_handler_left() -> Iterator[None]:
    """Takes off, after each test, the stderr handler that a CLI ``main`` installs on the root logger
    (``retinagate.logs.setup_logging``): left on, a later test's server thread that logs after its test
    returned writes past pytest's capture, into the middle of the progress line."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)


_SKIPPED_UNDER_CI: list[str] = []


def _xdist_worker(config: pytest.Config) -> bool:
    """Whether this process is a pytest-xdist worker (``make test`` runs the suite on several)."""
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker: shares the machine's cores out among the workers, so that their
    PyTorch and OpenMP threads (and those of the processes a test starts) do not spin against each
    other, and takes the controller's folder for the shared small model (:class:`_SmallModel`)."""
    if _xdist_worker(config):
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        _SMALL_MODEL.root = Path(config.workerinput["small_model_root"])  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in its controller: every worker gets the one shared small model folder."""
    node.workerinput["small_model_root"] = str(_SMALL_MODEL.folder())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remembers skipped interop and database tests: under CI they must run, not be skipped. (Under
    pytest-xdist the controller gets every worker's reports here.)"""
    if report.skipped and ("interop" in report.keywords or "postgres" in report.keywords):
        _SKIPPED_UNDER_CI.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails a CI run in which an interop (dcmtk, Orthanc, dciodvfy) or PostgreSQL test was skipped;
    stops and removes the shared small model (:class:`_SmallModel`). Both in the one process that
    sees the whole run: the controller under pytest-xdist."""
    if _xdist_worker(session.config):
        return
    _SMALL_MODEL.stop()
    if os.environ.get("CI") and _SKIPPED_UNDER_CI and exitstatus == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI is set and {len(_SKIPPED_UNDER_CI)} interop/PostgreSQL test(s) were skipped: "
                + ", ".join(_SKIPPED_UNDER_CI),
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# PostgreSQL: one throwaway cluster per test session, for the tests marked `postgres`.
# This block is appended to the shared file, hence its imports here and inside the functions.

from typing import NoReturn  # noqa: E402


def _postgres_unavailable(reason: str) -> NoReturn:
    """Skips, except under CI, where a missing PostgreSQL must fail the run instead of hiding tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests fail instead of being skipped")
    pytest.skip(reason)


def _postgres_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: PATH first, then /usr/lib/postgresql/<newest>."""
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in folder.parent.name.split(".") if p.isdigit())

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Starts a PostgreSQL cluster on a free loopback port; yields its URL without a database name.

    PostgreSQL refuses to run as root, so under root the cluster runs as the ``postgres`` user (or
    ``nobody``) and its folder belongs to that user. Trust authentication on 127.0.0.1 only; fsync off,
    since the cluster is thrown away.
    """
    import pwd
    import socket

    bindir = _postgres_bindir()
    if bindir is None:
        _postgres_unavailable("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _postgres_unavailable("the psycopg driver is not installed")

    root = Path(tempfile.mkdtemp(prefix="retinagate-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        for user in ("postgres", "nobody"):
            try:
                account = pwd.getpwnam(user)
            except KeyError:
                continue
            break
        else:
            _postgres_unavailable("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL")
        os.chown(root, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", account.pw_name, "--"]
    data, log = root / "data", root / "server.log"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail(f"{Path(args[0]).name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{server_log}")

    run(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        "postgres",
        "--auth=trust",
        "--no-sync",
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


def _create_database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # name made here, never from input
    return f"{server}/{name}"


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> str:
    """URL of the database ``retinagate_test`` on the session's throwaway cluster (shared by tests)."""
    return _create_database(postgres_server, "retinagate_test")


@pytest.fixture
def fresh_postgres_url(postgres_server: str) -> Iterator[str]:
    """URL of a new, empty database for this test alone; dropped afterwards."""
    import uuid

    import psycopg

    name = f"retinagate_{uuid.uuid4().hex[:12]}"
    url = _create_database(postgres_server, name)
    yield url
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database, once as a SQLite file (in a folder not yet made) and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'retinagate.db'}"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


# Worker tests: instances stored as the gateway stores them (file in storage, Study and Instance
# rows), and a C-STORE receiver on loopback that records every arrival, in order, duplicates included.


class WorkerReceiver:
    """A pynetdicom storage SCP for the worker tests.

    ``statuses`` answers C-STOREs in turn (then 0x0000); ``gate`` holds every answer until set;
    ``reject`` (result, source, diagnostic) rejects every association.
    """

    def __init__(
        self, ae_title: str = "PACS", port: int | None = None, syntaxes: list[str] | None = None, tls: Any = None
    ) -> None:
        import threading

        from retinagate.pacs import free_port

        self.syntaxes = syntaxes  # transfer syntaxes it accepts; None: all
        self.tls = tls  # a server ssl.SSLContext, or None for plain TCP
        self.ae_title = ae_title
        self.port = port or free_port()
        self.received: list[str] = []
        self.associations = 0
        self.datasets: dict[str, Any] = {}
        self.statuses: list[int] = []
        self.reject: tuple[int, int, int] | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.in_store = threading.Event()
        self._lock = threading.Lock()
        self._server: Any = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> WorkerReceiver:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, self.syntaxes or ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)  # the sweep's probe of a destination that failed
        ae.dimse_timeout = ae.network_timeout = 60
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested)]
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=self.tls
        )
        return self

    def _on_requested(self, event: Any) -> None:
        with self._lock:
            self.associations += 1
        if self.reject is not None:
            event.assoc.acse.send_reject(*self.reject)
            event.assoc.kill()  # waits for the A-ASSOCIATE-RJ to leave before the socket closes

    def _on_store(self, event: Any) -> int:
        self.in_store.set()
        self.gate.wait(120)
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        with self._lock:
            self.received.append(uid)
            self.datasets[uid] = ds
            return self.statuses.pop(0) if self.statuses else 0x0000

    def stop(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@pytest.fixture
def worker_receiver() -> Iterator[Callable[..., WorkerReceiver]]:
    """Starts :class:`WorkerReceiver` instances (``start=False`` to only reserve a port); stops them all."""
    made: list[WorkerReceiver] = []

    def make(
        ae_title: str = "PACS",
        port: int | None = None,
        start: bool = True,
        syntaxes: list[str] | None = None,
        tls: Any = None,
    ) -> WorkerReceiver:
        receiver = WorkerReceiver(ae_title, port, syntaxes, tls)
        made.append(receiver)
        return receiver.start() if start else receiver

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def worker_store_instance() -> Callable[..., int]:
    """Stores one synthetic photograph as the gateway does; returns the instance row id.

    The schema must exist (``retinagate.db.upgrade(settings)``). Keywords: ``study`` and ``laterality``
    and ``instance`` pick the synthetic identity, ``size`` the photograph (W, H), ``status`` and
    ``received_at`` the row's state.
    """

    def store(
        settings: Settings,
        *,
        study: int = 0,
        laterality: str = "R",
        instance: int | None = None,
        size: tuple[int, int] = (512, 384),
        columns: tuple[str, ...] = (),
        status: str = "queued",
        received_at: Any = None,
    ) -> int:
        import io

        import numpy as np
        from sqlalchemy import select

        from retinagate.db import make_engine, session_factory, session_scope
        from retinagate.models import Instance, InstanceStatus, Study, utcnow
        from retinagate.storage import Storage
        from retinagate.synth import DicomIdentity, build_dicom, render_fundus

        identity = DicomIdentity.synthetic(study, laterality, seed=7, instance=instance)  # type: ignore[arg-type]
        rng = np.random.default_rng([study, 0 if laterality == "R" else 1, instance or 0])
        image = render_fundus(rng, size[0], size[1], columns, laterality).image  # type: ignore[arg-type]
        ds = build_dicom(image, identity)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        storage = Storage(settings.resolved_storage_dir)
        key = storage.new_key("in")
        sha256, size_bytes = storage.write_bytes(key, buffer.getvalue())
        engine = make_engine(settings)
        try:
            with session_scope(session_factory(engine)) as session:
                row = session.scalar(select(Study).where(Study.study_uid == identity.study_uid))
                if row is None:
                    row = Study(study_uid=identity.study_uid, accession=identity.accession_number)
                    session.add(row)
                    session.flush()
                when = received_at or utcnow()
                item = Instance(
                    sop_instance_uid=identity.sop_instance_uid,
                    study_id=row.id,
                    series_uid=identity.series_uid,
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    laterality=laterality,
                    rows=int(ds.Rows),
                    columns=int(ds.Columns),
                    storage_key=key,
                    sha256=sha256,
                    size_bytes=size_bytes,
                    calling_ae="CAMERA",
                    received_at=when,
                    status=InstanceStatus(status),
                    status_changed_at=when,
                )
                session.add(item)
                session.flush()
                return item.id
        finally:
            engine.dispose()

    return store


@pytest.fixture
def worker_store_outputs(worker_store_instance: Callable[..., int]) -> Callable[..., list[int]]:
    """Makes ``count`` scored instances with one output each (a copy of the photograph under a new UID,
    stored under an ``out`` key), as if scored; returns the output row ids. Creates the schema."""

    def make(settings: Settings, count: int) -> list[int]:
        import io

        from pydicom import dcmread
        from pydicom.uid import generate_uid

        from retinagate.db import make_engine, session_factory, session_scope, upgrade
        from retinagate.models import Instance, Model, Output, Prediction
        from retinagate.storage import Storage

        upgrade(settings)
        ids = [worker_store_instance(settings, study=i, size=(256, 192), status="scored") for i in range(count)]
        storage = Storage(settings.resolved_storage_dir)
        engine = make_engine(settings)
        outputs = []
        try:
            with session_scope(session_factory(engine)) as session:
                model = Model(name="m", version="1", sha256="a" * 64, card={}, active=True)
                session.add(model)
                session.flush()
                for instance_id in ids:
                    instance = session.get_one(Instance, instance_id)
                    ds = dcmread(storage.path(instance.storage_key))
                    uid = generate_uid()
                    ds.SOPInstanceUID = uid
                    ds.file_meta.MediaStorageSOPInstanceUID = uid
                    buffer = io.BytesIO()
                    ds.save_as(buffer, enforce_file_format=True)
                    key = storage.new_key("out")
                    storage.write_bytes(key, buffer.getvalue())
                    prediction = Prediction(
                        instance_id=instance_id, model_id=model.id, probabilities={}, findings=[], duration_s=0.0
                    )
                    session.add(prediction)
                    session.flush()
                    output = Output(prediction_id=prediction.id, kind="sc", sop_instance_uid=uid, storage_key=key)
                    session.add(output)
                    session.flush()
                    outputs.append(output.id)
        finally:
            engine.dispose()
        return outputs

    return make


@pytest.fixture
def worker_model_variant(tmp_path: Path) -> Callable[..., Path]:
    """Writes a copy of an exported model with its card changed (a new file, hence a new model):
    ``variant(source, version="...", thresholds={"DR": 0.4})``. The same weights re-released with
    recalibrated thresholds, say."""

    def variant(source: Path, version: str = "variant", thresholds: dict[str, float] | None = None) -> Path:
        import onnx

        from retinagate.card import CARD_METADATA_KEY, ModelCard

        proto = onnx.load(str(source))
        entry = next(p for p in proto.metadata_props if p.key == CARD_METADATA_KEY)
        card = ModelCard.from_json(entry.value)
        values = list(card.thresholds)
        for label, threshold in (thresholds or {}).items():
            values[card.labels.index(label)] = threshold
        entry.value = card.with_updates(version=f"{card.version}-{version}", thresholds=tuple(values)).to_json()
        out = tmp_path / f"{source.stem}-{version}.onnx"
        onnx.save(proto, str(out))
        return out

    return variant


# Redis: one real redis-server per test session on a free loopback port, no persistence. The
# gateway enqueues into it and the worker tests consume from it; tests that need an empty queue
# flush it themselves.


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL (``redis://127.0.0.1:<port>/0``) of a redis-server started for this test session.

    Skips when redis-server is not installed, except under CI, where that fails the run.
    """
    import socket
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server not found; CI is set, so the Redis tests fail instead of being skipped")
        pytest.skip("redis-server not found")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="retinagate-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port} (exit status {process.poll()})")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# Gateway tests: a running dicom_gateway on a free loopback port with a migrated SQLite database,
# and synthetic camera studies (Ophthalmic Photography, JPEG baseline, fabricated patient data).


@pytest.fixture
def start_gateway(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Any]]:
    """Starts ``dicom_gateway.server.Gateway`` instances; each is stopped after the test.

    Call with settings overrides (``broker_url=...``, ``gateway_allowed_ae_titles=[...]``), or with a
    ready ``settings=`` object; ``send=`` and ``breaker_seconds=`` go to the Gateway. Without a
    ``broker_url`` or ``send``, score tasks go nowhere (an unreachable broker takes seconds to fail).
    The schema is created with ``retinagate.db.upgrade``; the gateway listens on 127.0.0.1 (``.address``).
    """
    from retinagate.db import upgrade

    started: list[Any] = []

    def start(
        settings: Settings | None = None, *, send: Any = None, breaker_seconds: float = 15.0, **overrides: Any
    ) -> Any:
        from dicom_gateway.server import Gateway

        settings = settings if settings is not None else make_settings(**overrides)
        if send is None and not settings.broker_url:
            send = list  # takes the ids and drops them
        upgrade(settings)
        gateway = Gateway(settings, bind=("127.0.0.1", 0), send=send, breaker_seconds=breaker_seconds)
        gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop(grace=5)


@pytest.fixture
def camera_files(tmp_path: Path) -> Callable[..., list[Path]]:
    """Writes a synthetic camera study as DICOM files and returns their paths.

    ``make(count=2, study=0, size=(256, 192), transfer_syntax="jpeg_baseline", folder=None)``: both eyes in
    turn, several instances per eye when ``count`` > 2; files go to ``tmp_path/camera/<study>/`` unless
    ``folder`` is given. Patient names are ``SYNTH^P<study+1>`` (fabricated).
    """

    def make(
        count: int = 2,
        study: int = 0,
        size: tuple[int, int] = (256, 192),
        transfer_syntax: str = "jpeg_baseline",
        folder: Path | None = None,
    ) -> list[Path]:
        import numpy as np

        from retinagate.synth import DicomIdentity, render_fundus, write_dicom

        out = folder if folder is not None else tmp_path / "camera" / str(study)
        paths = []
        for index in range(count):
            laterality = "R" if index % 2 == 0 else "L"
            identity = DicomIdentity.synthetic(study, laterality, seed=11, instance=index // 2)
            image = render_fundus(np.random.default_rng([study, index]), size[0], size[1], (), laterality).image
            path = out / f"{study:03d}_{index:03d}.dcm"
            write_dicom(image, path, identity, transfer_syntax=transfer_syntax)
            paths.append(path)
        return paths

    return make


# dciodvfy (dicom3tools): validates DICOM objects against their IODs. Appended by the scoring pipeline.


@pytest.fixture
def dciodvfy(tmp_path: Path) -> Callable[[Any], list[str]]:
    """Returns ``check(dataset_or_path) -> error lines`` from dciodvfy; skips when it is not installed.

    Use it in tests marked ``interop`` (under CI a skipped interop test fails the run). Warnings are
    not returned: only lines starting with ``Error``.
    """
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")

    def check(target: Any) -> list[str]:
        path = Path(target) if isinstance(target, str | Path) else tmp_path / f"dciodvfy-{id(target)}.dcm"
        if not isinstance(target, str | Path):
            target.save_as(path, enforce_file_format=True)
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
        return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]

    return check


@pytest.fixture
def dcentvfy() -> Callable[[Sequence[Path]], list[str]]:
    """Returns ``check(paths) -> error lines`` from dcentvfy (dicom3tools), which checks that the
    patient, study, series and frame of reference attributes agree across files; skips when it is
    not installed. Use it in tests marked ``interop``. Warnings are not returned."""
    if shutil.which("dcentvfy") is None:
        pytest.skip("dcentvfy (dicom3tools) is not installed")

    def check(paths: Sequence[Path]) -> list[str]:
        done = subprocess.run(["dcentvfy", *map(str, paths)], capture_output=True, text=True, timeout=60, check=False)
        return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]

    return check


@pytest.fixture
def dsrdump() -> Callable[[Path], list[str]]:
    """Returns ``check(path) -> problems`` from dcmtk's dsrdump, which parses an SR document and its
    content tree: its error and warning lines, or its exit status when it fails; skips when it is
    not installed. Use it in tests marked ``interop``."""
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (dcmtk) is not installed")

    def check(path: Path) -> list[str]:
        done = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60, check=False)
        problems = [line for line in done.stderr.splitlines() if line.startswith(("E:", "W:", "F:"))]
        return problems if done.returncode == 0 else [f"exit status {done.returncode}", *problems]

    return check


@pytest.fixture
def transcode() -> Callable[[Path, str, Path], Path]:
    """Returns ``transcode(native, syntax, target) -> target``: an uncompressed Part 10 file re-encoded
    in any transfer syntax the gateway accepts (a UID), the way a sender would.

    pydicom's encoders write RLE, JPEG-LS and JPEG 2000; dcmtk's ``dcmcjpeg`` writes the JPEG processes
    (pydicom encodes none but baseline, and a camera's file comes from a real codec). The lossy ones
    say so as a sender must: Lossy Image Compression ``01`` with its ratio and method (dcmcjpeg does that
    itself, and gives the lossy image a new SOP Instance UID). Without dcmcjpeg it skips, or fails
    under CI.
    """
    return _transcode


# Synthetic dataset and a small trained model, shared by the training, export, engine and worker tests.
# Appended by the training helper.


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small easy-mode synthetic RFMiD-layout dataset with masks and DICOM files (240 images, 256 x 192).

    Splits: 144 Training, 48 Evaluation, 48 Test; ``masks/<Split>/<ID>_<COLUMN>.png``; ``dicom/`` holds
    each image as an Ophthalmic Photography DICOM (two eyes per study). Treat it as read-only.
    """
    from retinagate.synth import SynthConfig, write_dataset

    out = tmp_path_factory.mktemp("synth") / "rfmid"
    write_dataset(out, SynthConfig(n=240, width=256, height=192, seed=0, dicom=True, mode="easy"))
    return out


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread for a module (its module fixtures included), for modules that ask with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``: on a shared machine OpenMP's spinning
    threads make such checks 3-10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _SmallModel:
    """The shared small model (tests/small_model.py), trained by a process of its own.

    :func:`pytest_collection_finish` starts it when a collected test needs it, so its minutes of
    training overlap the tests that run first; :func:`trained_checkpoint` waits for its ``status`` file.
    Under pytest-xdist the workers share one folder: the first to get its lock starts the training,
    the others wait on the same file, and the controller, which made the folder, stops the training
    and removes the folder once every worker is done.
    """

    def __init__(self) -> None:
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def folder(self) -> Path:
        """The folder it trains in; made on first use by the process that removes it at the end."""
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="retinagate-small-model-"))
        return self.root

    def start(self) -> None:
        root = self.folder()
        with (root / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (root / "pid").exists():
                return
            script = Path(__file__).with_name("small_model.py")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            with (root / "train.log").open("wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, str(script), str(root)], stdout=log, stderr=subprocess.STDOUT, env=env
                )
            (root / "pid").write_text(str(self.process.pid))

    def wait(self) -> Path:
        self.start()
        root = self.folder()
        status = root / "status"
        while not status.exists() and self._training():
            time.sleep(0.5)
        if not status.exists() or status.read_text() != "ok":
            log = (root / "train.log").read_text(errors="replace")
            pytest.fail(f"training the shared small model failed:\n{log[-4000:]}")
        return root / "run" / "best.pt"

    def _training(self) -> bool:
        """Whether the training process still runs (another worker's child is seen through /proc)."""
        if self.process is not None:
            return self.process.poll() is None
        try:
            stat = Path(f"/proc/{int((self.folder() / 'pid').read_text())}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie's parent has not reaped it yet

    def stop(self) -> None:
        if self.root is None:
            return
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        elif self._training():  # another worker's child: a missing pid file reads as not training
            with contextlib.suppress(ProcessLookupError):
                os.kill(int((self.root / "pid").read_text()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


_SMALL_MODEL = _SmallModel()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts training the shared small model if a collected test needs it (and tests will run)."""
    if session.config.option.collectonly:
        return
    if any("trained_checkpoint" in getattr(item, "fixturenames", ()) for item in session.items):
        _SMALL_MODEL.start()


@pytest.fixture(scope="session")
def trained_checkpoint() -> Path:
    """``best.pt`` of a small model trained from random init on synthetic data (tests/small_model.py:
    128 px, 900 easy-mode training photographs, 4 epochs; thresholds calibrated on validation). The
    run folder around it (``metrics.csv``, ``model_card.json``, plots) is its parent. Read-only.
    """
    return _SMALL_MODEL.wait()


# ONNX exports shared by the export, engine and worker tests. Appended by the export helper.


def _random_checkpoint(path: Path, input_size: int = 128, seed: int = 0) -> Path:
    """Saves a randomly initialised model (:func:`train.model.random_model`) in the checkpoint format."""
    import torch

    from retinagate.card import ModelCard, Preprocessing
    from train.model import CHECKPOINT_FORMAT, random_model

    card = ModelCard(name="retinagate-random", version="0.0.1", preprocessing=Preprocessing(input_size=input_size))
    model = random_model(card, seed)
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "card": card.to_json(), "config": {}}, path)
    return path


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init checkpoint at 128 px (no training); for tests that need plumbing, not accuracy."""
    return _random_checkpoint(tmp_path_factory.mktemp("random-checkpoint") / "random.pt")


@pytest.fixture(scope="session")
def random_onnx_model_path(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export of :func:`random_checkpoint`: a valid RetinaGate ONNX file (128 px) in seconds. Read-only."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("random-onnx") / "random.onnx"
    export_checkpoint(random_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def onnx_model_path(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 export of :func:`trained_checkpoint` (128 px, card in the metadata). Read-only."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_checkpoint(trained_checkpoint, out)
    return out


import datetime as dt  # noqa: E402
import ipaddress  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

# TLS: a CA, a server certificate for 127.0.0.1, and client certificates from that CA and another one.


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca = _certificate("RetinaGate test CA", ca_key, None, ca=True)
    other_ca = _certificate("Stranger CA", other_ca_key, None, ca=True)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    issuer = (ca.subject, ca_key)
    server = _write(folder, "server", _certificate("gateway", server_key, issuer, server=True), server_key)
    client = _write(folder, "client", _certificate("FUNDUSCAM", client_key, (ca.subject, ca_key)), client_key)
    stranger = _write(
        folder, "stranger", _certificate("STRANGER", stranger_key, (other_ca.subject, other_ca_key)), stranger_key
    )
    return Pki(ca_path, *server, *client, *stranger)


# Comparing DICOM objects made two ways (template encoders against highdicom), minus the clock.

#: Values taken from the clock: they differ between two objects made a moment apart.
CLOCK_KEYWORDS = frozenset(
    {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime"}
)


@pytest.fixture
def plain_json() -> Callable[..., object]:
    """``plain(ds, *more_clock_keywords, reread=True)``: the dataset as JSON without the clock's values;
    with ``reread`` as encoded (written and read back), so that what a reader sees is compared."""
    import io

    import pydicom
    from pydicom.datadict import keyword_for_tag

    def plain(ds: Any, *more: str, reread: bool = True) -> object:
        volatile = CLOCK_KEYWORDS | set(more)
        if reread:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))

        def strip(value: object) -> object:
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items() if len(k) != 8 or keyword_for_tag(k) not in volatile}
            if isinstance(value, list):
                return [strip(v) for v in value]
            return value

        return strip(ds.to_json_dict())

    return plain


@pytest.fixture
def nagle_spy(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], list[tuple[int, int]]]:
    """Wraps ``disable_nagle`` where ``module`` calls it; the list it returns gets, per call, the
    socket's peer port and its ``TCP_NODELAY`` value after the real function ran."""
    import socket

    def spy_on(module: Any) -> list[tuple[int, int]]:
        real = module.disable_nagle
        seen: list[tuple[int, int]] = []

        def spy(sock: socket.socket) -> None:
            real(sock)
            seen.append((sock.getpeername()[1], sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

        monkeypatch.setattr(module, "disable_nagle", spy)
        return seen

    return spy_on


# A model with the optional `ood_score [N]` output, for the gradability gate's tests. Appended by the gate.


@pytest.fixture
def ood_model_variant(tmp_path: Path) -> Callable[..., Path]:
    """Writes a copy of an exported model with an ``ood_score`` output and ``ood`` statistics in its card:
    ``variant(source, threshold=2.0, scale=0.04)``. The score is ``scale`` x the image's mean pixel level
    (0-255), so a test picks which images are "out of distribution" by brightness; the card's threshold
    is ``threshold``."""

    def variant(source: Path, threshold: float = 2.0, scale: float = 0.04) -> Path:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from retinagate.card import CARD_METADATA_KEY, ModelCard, OodStatistics

        proto = onnx.load(str(source))
        graph = proto.graph
        graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), "ood_scale"))
        opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
            graph.initializer.append(numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "ood_axes"))
            reduce = helper.make_node("ReduceMean", ["ood_pixels", "ood_axes"], ["ood_level"], keepdims=0)
        else:
            reduce = helper.make_node("ReduceMean", ["ood_pixels"], ["ood_level"], axes=[1, 2, 3], keepdims=0)
        graph.node.extend(
            [
                helper.make_node("Cast", ["image"], ["ood_pixels"], to=TensorProto.FLOAT),
                reduce,
                helper.make_node("Mul", ["ood_level", "ood_scale"], ["ood_score"]),
            ]
        )
        graph.output.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"]))
        entry = next(p for p in proto.metadata_props if p.key == CARD_METADATA_KEY)
        card = ModelCard.from_json(entry.value)
        ood = OodStatistics(
            features=1,
            rank=1,
            mean=(0.0,),
            components=((1.0,),),
            variances=(1.0,),
            residual_variance=1.0,
            threshold=threshold,
            fitted_on={"test": "mean pixel level"},
        )
        entry.value = card.with_updates(version=f"{card.version}-ood", ood=ood.model_dump()).to_json()
        onnx.checker.check_model(proto)
        out = tmp_path / f"{source.stem}-ood-{threshold:g}.onnx"
        onnx.save(proto, str(out))
        return out

    return variant


@pytest.fixture(scope="session")
def nested_sequences() -> Callable[[int], bytes]:
    """``make(depth)``: Explicit VR Little Endian bytes of ``depth`` undefined-length sequences,
    each the only element of an item of the one before (the issue's "600 levels deep" input)."""
    import struct

    def make(depth: int) -> bytes:
        sequence = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        ends = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        return (sequence + item) * depth + ends * depth

    return make


# The transcode fixture's encoders.


import pydicom  # noqa: E402
from pydicom import uid  # noqa: E402

from dicom_gateway.sop_classes import TRANSFER_SYNTAXES  # noqa: E402

#: ``dcmcjpeg`` options per JPEG process.
_DCMCJPEG = {
    uid.JPEGBaseline8Bit: ["+eb"],
    uid.JPEGExtended12Bit: ["+ee"],
    uid.JPEGLossless: ["+el"],
    uid.JPEGLosslessSV1: ["+e1"],
}

#: pydicom encoder options, and the Lossy Image Compression Method of the lossy ones.
_PYDICOM: dict[str, tuple[dict[str, object], str | None]] = {
    uid.RLELossless: ({}, None),
    uid.JPEGLSLossless: ({}, None),
    uid.JPEGLSNearLossless: ({"jls_error": 3}, "ISO_14495_1"),
    uid.JPEG2000Lossless: ({}, None),
    uid.JPEG2000: ({"j2k_cr": [20]}, "ISO_15444_1"),
}


def _transcode(native: Path, syntax: str, target: Path) -> Path:
    """Writes ``native`` (an uncompressed Part 10 file) to ``target`` in ``syntax`` and returns ``target``."""
    if syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"{syntax} is not a transfer syntax the gateway accepts")
    if syntax in _DCMCJPEG:
        return _dcmcjpeg(_DCMCJPEG[uid.UID(syntax)], native, target)
    ds = pydicom.dcmread(native)
    if syntax in _PYDICOM:
        options, lossy_method = _PYDICOM[syntax]
        raw = len(ds.PixelData)
        ds.compress(syntax, **options)  # type: ignore[arg-type]
        if lossy_method is not None:
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = f"{raw / len(ds.PixelData):.2f}"[:16]
            ds.LossyImageCompressionMethod = lossy_method
    else:  # the three native syntaxes differ only in how the file is written
        ds.file_meta.TransferSyntaxUID = uid.UID(syntax)
    ds.save_as(target, enforce_file_format=True)
    return target


def _dcmcjpeg(args: list[str], source: Path, target: Path) -> Path:
    if shutil.which("dcmcjpeg") is None:
        if os.environ.get("CI"):
            pytest.fail("dcmcjpeg (dcmtk) is missing; CI is set, so this fails instead of skipping")
        pytest.skip("dcmcjpeg (dcmtk) is not installed")
    done = subprocess.run(["dcmcjpeg", *args, str(source), str(target)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return target
