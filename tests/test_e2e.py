"""The whole system: dcmtk's storescu as the camera, the gateway and a Celery worker as processes,
a real Redis, and Orthanc as the PACS that receives the heatmaps. Once on SQLite, once on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from retinagate.db import make_engine, session_factory
from retinagate.models import Delivery, DeliveryStatus, Instance, InstanceStatus, Output, Prediction
from retinagate.pacs import Orthanc, free_port

pytestmark = [pytest.mark.slow, pytest.mark.interop]

IMAGES = 40
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}


def _require(tool: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; CI installs it, so this is a broken setup")
        pytest.skip(f"{tool} is not installed")
    return found


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    _require("Orthanc")
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.kill()  # its data goes with tmp_path: no need to wait for a graceful stop


def test_the_demo_orthanc_runs_with_nagles_algorithm_off(orthanc: Orthanc) -> None:
    # DCMTK reads TCP_NODELAY from the environment; without it each C-STORE response waits on a
    # delayed acknowledgement (see retinagate.dicomnet).
    assert orthanc.process is not None
    environ = Path(f"/proc/{orthanc.process.pid}/environ").read_bytes().split(b"\0")
    assert b"TCP_NODELAY=1" in environ


def test_a_killed_orthanc_is_gone_at_once_and_frees_its_ports(orthanc: Orthanc) -> None:
    # The tests' throwaway PACS are killed rather than stopped: stop() waits about 3.4 s for Orthanc.
    assert orthanc.process is not None
    process = orthanc.process
    orthanc.kill()
    assert orthanc.process is None and process.returncode == -signal.SIGKILL
    for port in (orthanc.port, orthanc.http_port):
        with socket.socket() as listener:  # binds (SO_REUSEADDR, as servers do) only with no listener left
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen()
    orthanc.kill()  # a second call does nothing


class System:
    """The gateway and a worker as separate processes, as an operator runs them."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "retinagate", *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"retinagate {' '.join(args)} failed:\n{result.stderr[-2000:]}")
        return result

    def start(self, name: str, *args: str) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "retinagate", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def stop(self) -> dict[str, int]:
        codes = {}
        for name, process in self.processes.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            codes[name] = process.returncode
        return codes

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


def _wait_for_echo(port: int, timeout_s: float = 60) -> None:
    echoscu = _require("echoscu")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run([echoscu, "-aec", "RETINAGATE", "127.0.0.1", str(port)], capture_output=True).returncode == 0:
            return
        time.sleep(0.3)
    raise AssertionError(f"the gateway did not answer C-ECHO on port {port}")


def test_every_photograph_sent_with_storescu_comes_back_to_orthanc_as_sc_and_sr_in_its_study(
    tmp_path: Path,
    empty_database_url: str,
    redis_url: str,
    onnx_model_path: Path,
    synth_dataset: Path,
    orthanc: Orthanc,
) -> None:
    storescu = _require("storescu")
    sources = sorted((synth_dataset / "dicom").rglob("*.dcm"))[:IMAGES]
    assert len(sources) == IMAGES

    port = free_port()
    # A Redis database of its own, so leftovers of other tests never reach this worker.
    broker = redis_url.rsplit("/", 1)[0] + ("/1" if empty_database_url.startswith("sqlite") else "/2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    env.update(
        RETINAGATE_DATA_DIR=str(tmp_path / "var"),
        RETINAGATE_DATABASE_URL=empty_database_url,
        RETINAGATE_BROKER_URL=broker,
        RETINAGATE_MODEL_PATH=str(onnx_model_path),
        RETINAGATE_GATEWAY_HOST="127.0.0.1",
        RETINAGATE_GATEWAY_PORT=str(port),
        RETINAGATE_DESTINATIONS=f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}",
        RETINAGATE_OUTPUTS="sc,sr",
    )
    system = System(env, tmp_path)
    system.cli("db", "upgrade")
    import redis

    redis.Redis.from_url(broker).flushdb()
    system.start("gateway", "gateway")
    system.start("worker", "worker", "--concurrency", "1")
    try:
        _wait_for_echo(port)
        sent = subprocess.run(
            [storescu, "-xy", "-aet", "FUNDUSCAM", "-aec", "RETINAGATE", "127.0.0.1", str(port), *map(str, sources)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            received = orthanc.instances()
            if len(received) >= 2 * IMAGES:
                break
            time.sleep(1)
    finally:
        codes = system.stop()
    assert codes == {"gateway": 0, "worker": 0}, (codes, system.log("worker")[-2000:], system.log("gateway")[-2000:])

    received = orthanc.instances()
    by_uid = {r.sop_instance_uid: r for r in received}
    scs = [r for r in received if r.sop_class_uid == SC_CLASS]
    srs = [r for r in received if r.sop_class_uid in COMPREHENSIVE_SR_CLASSES]
    assert (len(scs), len(srs)) == (IMAGES, IMAGES), (system.log("worker")[-3000:], system.log("gateway")[-2000:])

    # SQL matches what the PACS holds: one prediction and one SC + SR per image, all delivered, each
    # output in the study of the photograph it explains.
    engine = make_engine(empty_database_url)
    with session_factory(engine)() as session:
        instances = session.scalars(select(Instance)).all()
        assert len(instances) == IMAGES
        assert {i.status for i in instances} == {InstanceStatus.SCORED}
        assert session.scalar(select(func.count()).select_from(Prediction)) == IMAGES
        outputs = session.scalars(select(Output)).all()
        assert len(outputs) == 2 * IMAGES
        for output in outputs:
            source = output.prediction.instance
            assert by_uid[output.sop_instance_uid].study_uid == source.study.study_uid
        deliveries = session.scalars(select(Delivery)).all()
        assert len(deliveries) == 2 * IMAGES
        assert {d.status for d in deliveries} == {DeliveryStatus.DELIVERED}
    engine.dispose()

    # retinagate reports per-stage latency (received, scored, delivered) from SQL.
    report = json.loads(system.cli("results", "--json").stdout)
    images = [image for study in report for image in study["images"]]
    assert len(images) == IMAGES
    for image in images:
        assert image["received_at"] and image["scored_at"] and image["delivered_at"]
        assert 0 <= image["latency_s"]["scored"] <= image["latency_s"]["delivered"]
