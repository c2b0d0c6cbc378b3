"""``retinagate demo``: the whole product on one machine, from camera to PACS.

Makes synthetic studies, trains a small model on synthetic data (or reuses the one an earlier run
cached), exports it, starts ``retinagate serve`` and a receiving PACS (Orthanc when installed,
otherwise a built-in receiver), sends the studies as a camera would, waits for the heatmaps to come
back, prints what was found and writes PNG previews of the returned Secondary Captures.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retinagate.pacs import BuiltinReceiver, Orthanc, free_port, start_receiver
from retinagate.serve import stop_process
from retinagate.settings import Settings

__all__ = ["DemoError", "run_demo"]

#: Bump when the training recipe below changes, so a cached model is not reused by mistake.
RECIPE = "demo-v4"  # v2: local contrast normalisation; v3: lr 2e-3, best epoch by AUROC and pointing; v4: rot180 views
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22")


class DemoError(RuntimeError):
    """A demo step failed; the message says which and what to look at."""


def _step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def _quiet_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the demo's own steps: their summaries on the console, not their logs
    (``retinagate -v demo`` shows those too), and no progress bars."""
    env = dict(os.environ if base is None else base)
    if env.get("RETINAGATE_LOG_VERBOSE", "").lower() not in ("1", "true", "yes", "on"):
        env["RETINAGATE_LOG_LEVEL"] = "WARNING"
    env["TQDM_DISABLE"] = "1"
    return env


def _run(argv: Sequence[str], env: dict[str, str] | None = None, log: Path | None = None) -> None:
    """Runs a step; with ``log`` its output goes there (and its tail to the console if it fails)."""
    if log is None:
        result = subprocess.run(list(argv), env=_quiet_env(env), check=False)
    else:
        with log.open("ab") as out:
            result = subprocess.run(list(argv), env=_quiet_env(env), stdout=out, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
    if result.returncode != 0:
        raise DemoError(f"`{' '.join(argv[2:])}` failed with exit status {result.returncode}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "retinagate", *args]


def ensure_model(workdir: Path, *, epochs: int, train_images: int) -> Path:
    """Trains and exports the demo model unless an earlier run cached one for this recipe."""
    model_dir = workdir / "model"
    onnx_path = model_dir / "model.onnx"
    stamp = model_dir / "recipe.json"
    recipe = {"recipe": RECIPE, "epochs": epochs, "train_images": train_images}
    if onnx_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        print(f"reusing the model trained by an earlier run: {onnx_path}")
        return onnx_path
    shutil.rmtree(model_dir, ignore_errors=True)
    data = workdir / "training-data"
    # Easy mode: a model trained for a few CPU minutes finds its stickers, which is what a demo needs.
    _run(_cli("synth", str(data), "--n", str(train_images), "--size", "256", "192", "--seed", "1", "--mode", "easy"))
    run_dir = model_dir / "run"
    log = model_dir / "train.log"  # the training report and the export's checks, kept off the console
    model_dir.mkdir(parents=True, exist_ok=True)
    _run(
        _cli(
            "train", "--data", str(data), "--out", str(run_dir), "--epochs", str(epochs),
            "--img-size", "128", "--batch-size", "32", "--no-pretrained", "--aug", "light",
        ),
        log=log,
    )  # fmt: skip
    _run(_cli("export", "--checkpoint", str(run_dir / "best.pt"), "--out", str(onnx_path)), log=log)
    print(f"trained and exported: {onnx_path} (report: {log})")
    stamp.write_text(json.dumps(recipe))
    return onnx_path


#: What a demo run leaves in the data folder, removed by the next run (the folder's other content,
#: ``demo/`` with the cached model among it, stays).
_SYSTEM_FILES = ("retinagate.db", "retinagate.db-wal", "retinagate.db-shm", "serve.log")
_SYSTEM_FOLDERS = ("storage", "redis", "reports", "trt-cache")


def _system_dir(data_dir: Path, workdir: Path) -> Path:
    """Where the demo runs its system: the data folder itself, so that a plain ``retinagate results``
    afterwards shows the demo's results; but a folder with a database the demo did not make (someone's
    own) is never touched: then ``<workdir>/system``."""
    marker = workdir / "owns-data-dir"
    if (data_dir / "retinagate.db").exists() and not marker.exists():
        system = workdir / "system"
        shutil.rmtree(system, ignore_errors=True)
        print(f"{data_dir} holds a database this demo did not make: the demo runs in {system} instead")
        return system
    for name in _SYSTEM_FILES:
        (data_dir / name).unlink(missing_ok=True)
    for name in _SYSTEM_FOLDERS:
        shutil.rmtree(data_dir / name, ignore_errors=True)
    for schedule in data_dir.glob("celerybeat-schedule*"):
        schedule.unlink(missing_ok=True)
    marker.touch()
    return data_dir


#: Below this test macro AUROC the demo says plainly that its model has learned little.
MEANINGFUL_AUROC = 0.75


def model_quality(workdir: Path) -> str:
    """One line on what the demo model learned (test macro AUROC and pointing game, from its card),
    and plainly when it is little more than chance: a newcomer opens its heatmaps next."""
    card = workdir / "model" / "run" / "model_card.json"
    try:
        test = json.loads(card.read_text())["metrics"]["test"]
        auroc = float(test["macro_auroc"])
    except (OSError, ValueError, KeyError, TypeError):
        return "the demo model's test metrics are not available"
    pointing = test.get("pointing_game") or {}
    point = (
        f", pointing game {pointing['rate']:.2f} (chance {pointing['chance']:.2f})"
        if isinstance(pointing, dict) and pointing.get("total")
        else ""
    )
    line = f"demo model: test macro AUROC {auroc:.2f} on {test.get('count', '?')} synthetic photographs{point}"
    if auroc < MEANINGFUL_AUROC:
        line += (
            "\nnote: this model has learned little (chance is 0.50), so its heatmaps show how RetinaGate "
            "returns results, not what a trained model finds (see README, Model)"
        )
    return line


def _wait_for_echo(port: int, ae_title: str, timeout_s: float) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="DEMOCAM")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # A plain TCP connect first: pynetdicom logs an ERROR for each refused association, and the
        # gateway refusing connections while it starts is the normal course of this wait.
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        except OSError:
            time.sleep(0.5)
            continue
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return
        time.sleep(0.5)
    raise DemoError(f"the gateway did not answer a C-ECHO on port {port} within {timeout_s:.0f} s")


def _send(files: list[Path], port: int, ae_title: str) -> str:
    storescu = shutil.which("storescu")
    if storescu is not None:
        argv = [storescu, "-xy", "-aet", "DEMOCAM", "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)]
        if subprocess.run(argv, check=False).returncode != 0:
            raise DemoError("dcmtk's storescu could not send the studies")
        return "dcmtk storescu"
    from pydicom import dcmread
    from pynetdicom import AE

    ae = AE(ae_title="DEMOCAM")
    for uid in sorted({str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}):
        ae.add_requested_context(uid, ["1.2.840.10008.1.2.4.50"])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise DemoError("could not open an association with the gateway")
    for f in files:
        status = assoc.send_c_store(f)
        if getattr(status, "Status", None) != 0:
            raise DemoError(f"the gateway refused {f.name}")
    assoc.release()
    return "pynetdicom"


def _wait_for_outputs(receiver: Orthanc | BuiltinReceiver, expected: int, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    last = -1
    while time.monotonic() < deadline:
        received = [i for i in receiver.instances() if i.sop_class_uid == SC_CLASS or i.sop_class_uid in SR_CLASSES]
        if len(received) != last:
            print(f"   {len(received)}/{expected} results back in the PACS", flush=True)
            last = len(received)
        if len(received) >= expected:
            return received
        time.sleep(1.0)
    raise DemoError(f"only {last} of {expected} results reached the PACS within {timeout_s:.0f} s")


def _write_previews(receiver: Orthanc | BuiltinReceiver, scs: list[Any], folder: Path) -> list[Path]:
    import io

    import cv2
    from pydicom import dcmread

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n, item in enumerate(sorted(scs, key=lambda i: (i.study_uid, i.sop_instance_uid)), start=1):
        ds = dcmread(io.BytesIO(receiver.fetch(item.sop_instance_uid)))
        pixels = ds.pixel_array
        path = folder / f"heatmap-{n:02d}-{ds.get('ImageLaterality', ds.get('Laterality', 'X'))}.png"
        cv2.imwrite(str(path), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        written.append(path)
    return written


def run_demo(settings: Settings, *, studies: int = 10, epochs: int = 18, train_images: int = 500) -> int:
    """Runs the demo end to end; returns 0 when every image came back scored."""
    started = time.monotonic()
    workdir = (settings.data_dir / "demo").resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    _step("1/6 synthetic camera studies")
    camera = workdir / "camera"
    shutil.rmtree(camera, ignore_errors=True)
    # Easy mode, like the demo model's training data, so that the results show what it finds.
    shape = ("--size", "1024", "768", "--mode", "easy")
    _run(_cli("synth", str(camera), "--n", str(studies * 2), *shape, "--seed", "7", "--dicom"))
    files = sorted((camera / "dicom").rglob("*.dcm"))

    _step("2/6 a model trained on synthetic data")
    model = ensure_model(workdir, epochs=epochs, train_images=train_images)
    print(model_quality(workdir))

    _step("3/6 a receiving PACS")
    receiver = start_receiver(workdir / "pacs-run")
    kind = "Orthanc" if isinstance(receiver, Orthanc) else "the built-in receiver"
    print(f"{kind} listening as {receiver.ae_title} on port {receiver.port}")

    system = _system_dir(settings.data_dir.resolve(), workdir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    env.update(
        RETINAGATE_DATA_DIR=str(system),
        RETINAGATE_MODEL_PATH=str(model),
        RETINAGATE_GATEWAY_HOST="127.0.0.1",
        RETINAGATE_GATEWAY_PORT=str(port),
        RETINAGATE_DESTINATIONS=f"{receiver.ae_title}@127.0.0.1:{receiver.port}",
        RETINAGATE_SWEEP_INTERVAL="5",
    )
    serve: subprocess.Popen[bytes] | None = None
    try:
        _step("4/6 retinagate serve (gateway, workers, beat, embedded Redis)")
        system.mkdir(parents=True, exist_ok=True)
        serve_log = system / "serve.log"
        with serve_log.open("wb") as log:
            serve = subprocess.Popen(_cli("serve"), env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"its log: {serve_log}")
        try:
            _wait_for_echo(port, settings.gateway_ae_title, timeout_s=90)
        except DemoError:
            print(serve_log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise

        _step(f"5/6 a camera sends {len(files)} photographs")
        sent_at = time.monotonic()
        tool = _send(files, port, settings.gateway_ae_title)
        print(f"sent with {tool}")
        results = _wait_for_outputs(receiver, 2 * len(files), timeout_s=240)
        elapsed = time.monotonic() - sent_at
        print(f"all {len(files)} photographs scored and returned in {elapsed:.1f} s")

        _step("6/6 results")
        subprocess.run(_cli("results"), env=_quiet_env(env), check=False)
        previews = _write_previews(receiver, [r for r in results if r.sop_class_uid == SC_CLASS], workdir / "previews")
    finally:
        if serve is not None:
            stop_process(serve, 60, signal.SIGINT)
        receiver.stop()
    again = (
        "retinagate results"
        if system == settings.data_dir.resolve()
        else f"RETINAGATE_DATA_DIR={system} retinagate results"
    )
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; these results again: {again}")
    print(f"heatmap previews: {previews[0].parent}/ ({len(previews)} PNG files), e.g. {previews[0]}")
    return 0
