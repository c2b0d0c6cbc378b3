"""Worker throughput: images per second through a real Celery worker on a real Redis server.

What one run measures, for each task batch size (default 1 and 16 instances per ``score`` task):

- a fresh data folder: SQLite database migrated, ``--images`` synthetic Ophthalmic Photography
  instances (2048 x 1536, JPEG baseline, a few distinct fundus photographs under new UIDs) written to
  storage with their Study/Instance rows, as the gateway leaves them;
- ``celery -A worker.app worker`` started as an operator runs it (``--concurrency`` processes, settings
  from ``RETINAGATE_*``), warmed up on a few extra instances so every pool process has loaded the model;
- the clock runs from sending the first score task to the last instance marked ``scored`` in SQL:
  decode, preprocess, inference, heatmap rendering, SC and SR encoding, durable writes of the outputs
  and the SQL rows. No destinations are configured, so no C-STORE is timed.

The model is ``--model`` or, by default, an untrained EfficientNet-B0 exported once into
``.cache/bench/`` (the weights do not change the cost). The table (printed last) gives the throughput
and the mean seconds per image of each pipeline stage, read back from ``predictions.timings``.

Usage: ``python bench/bench_worker.py [--images 64] [--batches 1 16] [--concurrency 2] [--model PATH]``
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from retinagate.pacs import free_port

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("decode", "preprocess", "infer", "render", "encode", "write")


def default_model() -> Path:
    """An untrained model exported once and cached: the cost of scoring does not depend on the weights."""
    path = ROOT / ".cache" / "bench" / "worker-model.onnx"
    if path.is_file():
        return path
    import torch

    from export.onnx_export import export_model
    from retinagate.card import ModelCard
    from train.model import create_model

    torch.manual_seed(0)
    card = ModelCard(version="0.0.0-bench")
    export_model(create_model(card).eval(), card, path)
    return path


class Redis:
    """A throwaway redis-server on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def url(self, database: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def templates(count: int, width: int, height: int) -> list[bytes]:
    """A few distinct camera photographs as Part 10 bytes (JPEG baseline), encoded once."""
    from retinagate.synth import DicomIdentity, build_dicom, render_fundus

    columns = [("DR",), ("ARMD",), ("MH", "DR"), ()]
    out = []
    for index in range(count):
        laterality = "R" if index % 2 == 0 else "L"
        image = render_fundus(np.random.default_rng(index), width, height, columns[index % 4], laterality).image
        ds = build_dicom(image, DicomIdentity.synthetic(index, laterality, seed=5))
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def store_instances(settings: Any, photographs: list[bytes], count: int) -> list[int]:
    """Writes ``count`` instances (new UIDs over the template photographs) and their rows; returns ids."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from retinagate.db import make_engine, session_factory, session_scope, upgrade
    from retinagate.models import Instance, InstanceStatus, Study
    from retinagate.storage import Storage

    upgrade(settings)
    storage = Storage(settings.resolved_storage_dir)
    engine = make_engine(settings)
    ids = []
    with session_scope(session_factory(engine)) as session:
        study = Study(study_uid=str(generate_uid()))
        session.add(study)
        session.flush()
        for index in range(count):
            ds = dcmread(io.BytesIO(photographs[index % len(photographs)]))
            uid = str(generate_uid())
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.StudyInstanceUID = study.study_uid
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            key = storage.new_key("in")
            sha256, size = storage.write_bytes(key, buffer.getvalue())
            row = Instance(
                sop_instance_uid=uid, study_id=study.id, series_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                rows=int(ds.Rows), columns=int(ds.Columns), storage_key=key, sha256=sha256, size_bytes=size,
                status=InstanceStatus.QUEUED,
            )
            session.add(row)
            session.flush()
            ids.append(row.id)
    engine.dispose()
    return ids


def scored(sessions: Any, ids: list[int]) -> int:
    from sqlalchemy import func, select

    from retinagate.db import session_scope
    from retinagate.models import Instance, InstanceStatus

    with session_scope(sessions) as session:
        query = select(func.count()).where(
            Instance.id.in_(ids), Instance.status.in_([InstanceStatus.SCORED, InstanceStatus.FAILED])
        )
        return int(session.scalar(query) or 0)


def stage_means(sessions: Any, ids: list[int]) -> dict[str, float]:
    from sqlalchemy import select

    from retinagate.db import session_scope
    from retinagate.models import Prediction

    with session_scope(sessions) as session:
        timings = list(session.scalars(select(Prediction.timings).where(Prediction.instance_id.in_(ids))))
    return {stage: statistics.fmean(t.get(stage, 0.0) for t in timings) if timings else 0.0 for stage in STAGES}


def wait_all(sessions: Any, ids: list[int], worker: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while scored(sessions, ids) < len(ids):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not finish:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)


def run(batch: int, args: argparse.Namespace, redis: Redis, database: int, photographs: list[bytes],
        model: Path, scratch: Path) -> dict[str, Any]:
    from retinagate.db import make_engine, session_factory
    from retinagate.queue import enqueue_score
    from retinagate.settings import load_settings

    data = scratch / f"batch{batch}"
    env_values = {
        "RETINAGATE_DATA_DIR": str(data),
        "RETINAGATE_BROKER_URL": redis.url(database),
        "RETINAGATE_MODEL_PATH": str(model),
        "RETINAGATE_INTRA_OP_THREADS": str(args.threads),
        "RETINAGATE_BATCH_SIZE": str(max(batch, 1)),
        "RETINAGATE_LOG_LEVEL": "WARNING",
    }
    settings = load_settings(environ=env_values)
    warm = args.concurrency * 2
    ids = store_instances(settings, photographs, warm + args.images)
    warmup, measured = ids[:warm], ids[warm:]
    engine = make_engine(settings)
    sessions = session_factory(engine)
    log = scratch / f"worker-batch{batch}.log"
    env = {**os.environ, **env_values}
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--queues", "score",
             "--concurrency", str(args.concurrency), "--without-mingle", "--without-gossip",
             "--loglevel", "WARNING"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        for instance in warmup:  # one task each, so every pool process loads the model
            enqueue_score(settings, [instance])
        wait_all(sessions, warmup, worker, log, 300)
        started = time.perf_counter()
        for first in range(0, len(measured), batch):
            enqueue_score(settings, measured[first : first + batch])
        wait_all(sessions, measured, worker, log, 1800)
        elapsed = time.perf_counter() - started
        means = stage_means(sessions, measured)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        engine.dispose()
    return {"batch": batch, "tasks": -(-len(measured) // batch), "images": len(measured), "seconds": elapsed,
            "rate": len(measured) / elapsed, **means}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64,
                        help="instances timed per batch size (default 64: whole batches for every process)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="instances per score task")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per process (default 1)")
    parser.add_argument("--size", type=int, nargs=2, default=(2048, 1536), metavar=("W", "H"))
    parser.add_argument("--model", type=Path, help="ONNX model (default: an untrained export, cached)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.concurrency < 1 or any(b < 1 for b in args.batches):
        parser.error("--images, --concurrency and --batches must be at least 1")
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed")

    model = args.model or default_model()
    photographs = templates(4, *args.size)
    scratch = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    redis = Redis(scratch)
    try:
        rows = [run(batch, args, redis, database, photographs, model, scratch)
                for database, batch in enumerate(args.batches, start=1)]
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"\nworker throughput, {args.size[0]}x{args.size[1]} JPEG OP instances, {os.cpu_count()} CPU(s) "
          f"(load average {load:.1f} at the end), {args.concurrency} pool process(es), {args.threads} ONNX "
          f"thread(s) each, model {model.name}")
    header = f"{'batch/task':>10} {'tasks':>6} {'images':>7} {'seconds':>8} {'images/s':>9}  " + " ".join(
        f"{s:>10}" for s in STAGES
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        stages = " ".join(f"{row[s] * 1000:>8.1f}ms" for s in STAGES)
        print(f"{row['batch']:>10} {row['tasks']:>6} {row['images']:>7} {row['seconds']:>8.2f} {row['rate']:>9.2f}  "
              f"{stages}")
    print("(stage columns: mean seconds per image inside the pipeline, from predictions.timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
