"""dicom_gateway.server: concurrency, graceful shutdown, metrics and dcmtk interoperability."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import select

from retinagate.db import make_engine, session_factory
from retinagate.models import Association, Instance
from retinagate.pacs import free_port

OP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
JPEG = "1.2.840.10008.1.2.4.50"


def _associate(gateway: Any, calling: str = "CAMERA") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(OP, [JPEG])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    host, port = gateway.address
    assoc = ae.associate(host, port, ae_title=gateway.settings.gateway_ae_title)
    assert assoc.is_established
    return assoc


def _rows(settings: Any, model: Any) -> list[Any]:
    engine = make_engine(settings)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(select(model).order_by(model.id)))
    finally:
        engine.dispose()


def _dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"dcmtk's {tool} is not installed; CI is set, so the interop tests fail instead of skipping")
        pytest.skip(f"dcmtk's {tool} is not installed")
    return path


def test_eight_concurrent_associations_all_succeed(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    studies = [camera_files(3, study=n) for n in range(8)]
    results: dict[int, list[int]] = {}
    start = threading.Barrier(8)

    def camera(n: int) -> None:
        assoc = _associate(gateway, calling=f"CAM{n}")
        start.wait(timeout=30)
        results[n] = [int(assoc.send_c_store(path).Status) for path in studies[n]]
        assoc.release()

    threads = [threading.Thread(target=camera, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert results == {n: [0, 0, 0] for n in range(8)}
    instances = _rows(gateway.settings, Instance)
    assert len(instances) == 24 and len({i.storage_key for i in instances}) == 24
    assert all(gateway.storage.path(i.storage_key).is_file() for i in instances)
    deadline = time.monotonic() + 10
    while any(a.outcome == "open" for a in _rows(gateway.settings, Association)) and time.monotonic() < deadline:
        time.sleep(0.05)
    audits = _rows(gateway.settings, Association)
    assert sorted(a.calling_ae for a in audits) == [f"CAM{n}" for n in range(8)]
    assert {(a.outcome, a.instances_accepted) for a in audits} == {("released", 3)}


def test_stop_refuses_new_connections_and_lets_open_associations_finish(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    first, second = camera_files(2)
    host, port = gateway.address
    assoc = _associate(gateway)
    assert assoc.send_c_store(first).Status == 0

    stopper = threading.Thread(target=gateway.stop, kwargs={"grace": 20})
    stopper.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # wait until the listening socket is closed
        try:
            socket.create_connection((host, port), timeout=0.5).close()
        except OSError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the gateway still accepts connections while stopping")

    assert assoc.send_c_store(second).Status == 0  # the open association still works
    assert stopper.is_alive()
    assoc.release()
    stopper.join(timeout=20)

    assert not stopper.is_alive()
    assert len(_rows(gateway.settings, Instance)) == 2
    assert [(a.outcome, a.instances_accepted) for a in _rows(gateway.settings, Association)] == [("released", 2)]


def test_stop_aborts_associations_still_open_after_the_grace_period(start_gateway: Callable[..., Any]) -> None:
    gateway = start_gateway()
    assoc = _associate(gateway)

    started = time.monotonic()
    gateway.stop(grace=0.5)

    assert time.monotonic() - started < 10
    assert assoc.is_aborted or not assoc.is_established
    assert [a.outcome for a in _rows(gateway.settings, Association)] == ["aborted"]


def test_a_connection_closed_before_asking_for_an_association_is_let_go_at_once(
    start_gateway: Callable[..., Any],
) -> None:
    # A TCP probe (a load balancer's health check, `nc -z`, the demo's wait for the port) connects
    # and closes without a word of DICOM. pynetdicom's acceptor waits its ACSE timeout for an
    # A-ASSOCIATE-RQ all the same, so the connection stayed live and held up a stop for its grace.
    gateway = start_gateway(gateway_acse_timeout=60)
    host, port = gateway.address
    socket.create_connection((host, port), timeout=5).close()
    _associate(gateway).release()  # accepted after the probe, so the probe's connection is counted

    started = time.monotonic()
    gateway.stop(grace=30)

    assert time.monotonic() - started < 10
    assert sorted((a.outcome, a.reason) for a in _rows(gateway.settings, Association)) == [
        ("aborted", "connection closed before an association request"),
        ("released", None),
    ]


def test_metrics_are_served_when_a_port_is_set(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    port = free_port()
    gateway = start_gateway(metrics_port=port)
    assoc = _associate(gateway)
    assert [assoc.send_c_store(p).Status for p in camera_files(2)] == [0, 0]
    assoc.release()

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counter = "retinagate_gateway_instances_received_total"

    for name in (
        "retinagate_gateway_instances_received_total",
        "retinagate_gateway_received_bytes_total",
        "retinagate_gateway_associations_total",
        "retinagate_gateway_enqueue_failures_total",
        "retinagate_gateway_store_seconds_bucket",
    ):
        assert name in text
    received = next(line for line in text.splitlines() if line.startswith(counter))
    assert float(received.split()[-1]) >= 2


@pytest.mark.interop
def test_dcmtk_storescu_sends_a_folder_of_camera_files(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]], tmp_path: Path
) -> None:
    storescu = _dcmtk("storescu")
    gateway = start_gateway(gateway_allowed_ae_titles=["DCMTKCAM"])
    folder = tmp_path / "outbox"
    sent = [p for study in range(3) for p in camera_files(2, study=study, folder=folder / f"s{study}")]
    host, port = gateway.address

    done = subprocess.run(
        [storescu, "-aet", "DCMTKCAM", "-aec", "RETINAGATE", "-xy", "+sd", "+r", host, str(port), str(folder)],
        capture_output=True, text=True, timeout=120, check=False,
    )

    assert done.returncode == 0, done.stderr
    stored = _rows(gateway.settings, Instance)
    assert len(stored) == len(sent) == 6
    assert {i.calling_ae for i in stored} == {"DCMTKCAM"}


@pytest.mark.interop
def test_dcmtk_echoscu_gets_an_echo(start_gateway: Callable[..., Any]) -> None:
    echoscu = _dcmtk("echoscu")
    gateway = start_gateway()
    host, port = gateway.address

    done = subprocess.run(
        [echoscu, "-aec", "RETINAGATE", host, str(port)], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr


@pytest.mark.interop
def test_dcmtk_storescu_is_refused_with_a_wrong_called_ae(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    storescu = _dcmtk("storescu")
    gateway = start_gateway()
    host, port = gateway.address

    done = subprocess.run(
        [storescu, "-aec", "SOMEONE", "-xy", host, str(port), str(camera_files(1)[0])],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert done.returncode != 0
    assert "Called AE Title Not Recognized" in done.stderr + done.stdout
    assert _rows(gateway.settings, Instance) == []


def test_a_dataset_far_over_the_size_cap_aborts_the_association_before_it_is_all_in_memory(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway(max_instance_bytes=100_000)
    over, far_over = camera_files(1, size=(200, 200), transfer_syntax="explicit_little") + camera_files(
        1, study=1, size=(400, 300), transfer_syntax="explicit_little"
    )
    assert 100_000 < over.stat().st_size < 200_000 < far_over.stat().st_size
    ae = AE(ae_title="CAMERA")
    ae.add_requested_context(OP, ["1.2.840.10008.1.2.1"])
    host, port = gateway.address
    assoc = ae.associate(host, port, ae_title="RETINAGATE")

    assert assoc.send_c_store(over).Status == 0xA700  # over the cap: received, then refused
    assert "Status" not in assoc.send_c_store(far_over)  # no answer: the association was aborted

    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established
    while _rows(gateway.settings, Association)[0].outcome == "open" and time.monotonic() < deadline:
        time.sleep(0.05)
    audit = _rows(gateway.settings, Association)[0]
    assert (audit.outcome, audit.instances_refused) == ("aborted", 1)
    assert audit.reason == "dataset over twice max_instance_bytes"
    assert _rows(gateway.settings, Instance) == []


def test_accepted_connections_have_nagles_algorithm_off(
    nagle_spy: Callable[[Any], list[tuple[int, int]]], start_gateway: Callable[..., Any]
) -> None:
    import dicom_gateway.server

    seen = nagle_spy(dicom_gateway.server)
    gateway = start_gateway()
    assoc = _associate(gateway)
    client_port = assoc.dul.socket.socket.getsockname()[1]
    assoc.release()

    assert seen == [(client_port, 1)]
