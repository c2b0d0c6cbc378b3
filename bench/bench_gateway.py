"""Ingest throughput of the gateway against pynetdicom's bare storescp app, in the same run.

Both receivers get the same files from dcmtk's ``storescu`` over one association on loopback:

- **bare**: ``python -m pynetdicom storescp`` writing each dataset to a folder (decode and re-encode,
  no fsync, no database, no queue);
- **gateway**: ``retinagate gateway`` as an operator runs it: structure and pixel checks, durable
  write (temporary file, fsync, rename, directory fsync), Study/Instance rows committed in SQLite,
  then the score task sent to a real ``redis-server``.

Both use the same maximum PDU (the gateway's default, 256 KiB). Each round starts both receivers
fresh (a new data folder, so the gateway never sees duplicates) and alternates which goes first;
the table reports the median round and the median of the per-round ratios (steadier when the
machine is busy). The gateway's time runs until its last score task is on the Redis queue.

The files are synthetic Ophthalmic Photography instances with one noisy fundus frame, JPEG baseline
at quality 100, about 8 MB each at 2048 x 1536 (the noise stands in for the detail of a real sensor;
a smooth synthetic fundus would compress to about 1 MB).

Usage: ``python bench/bench_gateway.py [--count 20] [--rounds 3] [--width 2048 --height 1536]``
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from retinagate.pacs import free_port

RETINAGATE = [sys.executable, "-c", "import sys; from retinagate.cli import main; sys.exit(main())"]
MAX_PDU = 262_144


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the receiver exited with status {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


def make_templates(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """Writes ``count`` camera photographs: a synthetic fundus under heavy sensor noise, JPEG q100."""
    from retinagate.synth import DicomIdentity, render_fundus, write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        laterality: Literal["R", "L"] = "R" if index % 2 == 0 else "L"
        fundus = render_fundus(rng, width, height, (), laterality).image
        noise = rng.integers(0, 256, fundus.shape, dtype=np.uint8)
        image = (fundus // 8 + noise // 8 * 7).astype(np.uint8)
        identity = DicomIdentity.synthetic(index // 2, laterality, seed=99, instance=index)
        path = folder / f"{index:03d}.dcm"
        write_dicom(image, path, identity, quality=100)
        paths.append(path)
    return paths


def fresh_copies(templates: Sequence[Path], folder: Path) -> list[Path]:
    """The templates with new UIDs, so every round stores new instances."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    out = []
    for path in templates:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def storescu(port: int, called: str, files: Sequence[Path]) -> float:
    """Sends ``files`` on one association; returns when storescu has its last response."""
    started = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aet", "BENCHCAM", "-aec", called, "-xy", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_bare(files: Sequence[Path], workdir: Path) -> float:
    out = workdir / "bare"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out), "-q", "-pdu", str(MAX_PDU)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        elapsed = storescu(port, "STORESCP", files)
    finally:
        stop(process)
    stored = list(out.iterdir())
    if len(stored) != len(files):
        raise RuntimeError(f"the bare app stored {len(stored)} of {len(files)} files")
    return elapsed


def run_gateway(files: Sequence[Path], workdir: Path, redis_url: str) -> float:
    import redis

    from retinagate.db import make_engine, session_factory, upgrade
    from retinagate.models import Instance, InstanceStatus
    from retinagate.settings import load_settings

    data = workdir / "gateway"
    settings = load_settings(environ={}, data_dir=data, broker_url=redis_url)
    upgrade(settings)
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    env.update(
        RETINAGATE_DATA_DIR=str(data), RETINAGATE_BROKER_URL=redis_url, RETINAGATE_LOG_LEVEL="WARNING",
        RETINAGATE_GATEWAY_MAX_PDU=str(MAX_PDU),
    )
    process = subprocess.Popen(
        [*RETINAGATE, "gateway", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        while b"listening on" not in process.stdout.readline():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            select.select([process.stdout], [], [], 0.1)
        engine = make_engine(settings)
        started = time.perf_counter()
        storescu(port, "RETINAGATE", files)
        # Enqueueing is off the C-STORE path: the round ends when the last task is on the queue.
        deadline = time.monotonic() + 60
        while True:
            with session_factory(engine)() as session:
                statuses = list(session.scalars(Instance.__table__.select().with_only_columns(Instance.status)))
            if len(statuses) == len(files) and all(s == InstanceStatus.QUEUED for s in statuses):
                elapsed = time.perf_counter() - started
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway queued {statuses.count(InstanceStatus.QUEUED)} of {len(files)}")
            time.sleep(0.01)
        engine.dispose()
        queued = sum(
            len(json.loads(base64.b64decode(json.loads(m)["body"]))[0][0])
            for m in redis.Redis.from_url(redis_url).lrange("score", 0, -1)
        )
        if queued != len(files):
            raise RuntimeError(f"{queued} instance ids on the score queue, expected {len(files)}")
    finally:
        stop(process)
    return elapsed


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)
    return process, f"redis://127.0.0.1:{port}/0"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=20, help="files per round (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default 3)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    args = parser.parse_args(argv)
    for tool in ("storescu", "redis-server"):
        if shutil.which(tool) is None:
            print(f"bench_gateway: {tool} is not installed", file=sys.stderr)
            return 3

    root = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    redis_process, redis_url = start_redis(root)
    try:
        print(f"writing {args.count} synthetic photographs ({args.width}x{args.height}) ...", file=sys.stderr)
        templates = make_templates(root / "templates", args.count, args.width, args.height)
        megabytes = sum(p.stat().st_size for p in templates) / 1e6
        times: dict[str, list[float]] = {"bare": [], "gateway": []}
        for round_number in range(args.rounds):
            files = fresh_copies(templates, root / f"round{round_number}" / "files")
            order = ["bare", "gateway"] if round_number % 2 == 0 else ["gateway", "bare"]
            for which in order:
                workdir = root / f"round{round_number}" / which
                workdir.mkdir(parents=True)
                seconds = run_bare(files, workdir) if which == "bare" else run_gateway(files, workdir, redis_url)
                times[which].append(seconds)
                print(f"round {round_number + 1}: {which:8s} {seconds:6.2f} s", file=sys.stderr)
    finally:
        stop(redis_process)
        shutil.rmtree(root, ignore_errors=True)

    bare, ours = statistics.median(times["bare"]), statistics.median(times["gateway"])
    print()
    each = megabytes / args.count
    print(f"{args.count} files, {megabytes:.0f} MB ({each:.1f} MB each), median of {args.rounds} rounds")
    print(f"{'receiver':46s} {'seconds':>8s} {'files/s':>8s} {'MB/s':>7s} {'vs bare':>8s}")
    for name, seconds in (
        ("pynetdicom storescp app (bare)", bare),
        ("retinagate gateway (fsync + SQL + Redis)", ours),
    ):
        print(
            f"{name:46s} {seconds:8.2f} {args.count / seconds:8.1f} {megabytes / seconds:7.1f} "
            f"{bare / seconds:7.2f}x"
        )
    paired = statistics.median(b / g for b, g in zip(times["bare"], times["gateway"], strict=True))
    print(f"median of the per-round ratios (each pair run back to back): {paired:.2f}x")
    print(f"goal: gateway >= 0.70x of bare -> {'met' if min(bare / ours, paired) >= 0.7 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
