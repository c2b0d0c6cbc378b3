"""``retinagate gateway`` as an operator runs it: a real process, stopped with SIGTERM."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import select as sql_select

from retinagate.db import make_engine, session_factory, upgrade
from retinagate.models import Association, Instance, InstanceStatus
from retinagate.pacs import free_port
from retinagate.settings import Settings

# The console script's entry point, run by this interpreter (``-m retinagate.cli`` would import the
# CLI module twice, as __main__ and as retinagate.cli).
RETINAGATE = [sys.executable, "-c", "import sys; from retinagate.cli import main; sys.exit(main())"]


def _gateway_process(data_dir: Path, port: int, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    environ.update({"RETINAGATE_DATA_DIR": str(data_dir), "RETINAGATE_LOG_LEVEL": "INFO", **env})
    return subprocess.Popen(
        [*RETINAGATE, "gateway", "--host", "127.0.0.1", "--port", str(port)],
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 60) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if text in line:
                return line
        if process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"no {text!r} from the gateway; stderr: {process.communicate()[1][-2000:]}")


def _rows(settings: Settings, model: Any) -> list[Any]:
    engine = make_engine(settings)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(sql_select(model).order_by(model.id)))
    finally:
        engine.dispose()


def test_the_gateway_refuses_to_start_on_a_database_that_was_never_migrated(tmp_path: Path) -> None:
    process = _gateway_process(tmp_path / "var", free_port())
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 3
    assert "retinagate db upgrade" in err


@pytest.mark.slow  # a real process: starting Python with the gateway's imports takes seconds
def test_sigterm_lets_the_open_association_finish_and_exits_0(
    make_settings: Callable[..., Settings], camera_files: Callable[..., list[Path]], redis_url: str
) -> None:
    settings = make_settings(broker_url=redis_url)
    upgrade(settings)
    port = free_port()
    process = _gateway_process(settings.data_dir, port, RETINAGATE_BROKER_URL=redis_url)
    try:
        line = _wait_for_line(process, "listening on")
        assert f"127.0.0.1:{port}" in line and "RETINAGATE" in line
        ae = AE(ae_title="CAMERA")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.77.1.5.1", ["1.2.840.10008.1.2.4.50"])
        assoc = ae.associate("127.0.0.1", port, ae_title="RETINAGATE")
        assert assoc.is_established
        first, second = camera_files(2)
        assert assoc.send_c_store(first).Status == 0

        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None  # waiting for the open association
        assert assoc.send_c_store(second).Status == 0
        assoc.release()

        _out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "finishing open associations" in err
    instances = _rows(settings, Instance)
    assert [i.status for i in instances] == [InstanceStatus.QUEUED, InstanceStatus.QUEUED]
    assert [(a.outcome, a.instances_accepted) for a in _rows(settings, Association)] == [("released", 2)]
    for name in ("SYNTH^P0001", "SYN0001"):
        assert name not in err


def test_help_explains_the_command() -> None:
    done = subprocess.run(
        [*RETINAGATE, "gateway", "--help"], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "SIGTERM" in done.stdout and "--grace" in done.stdout
