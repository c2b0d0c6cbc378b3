"""Delivery throughput: the same outputs sent to the same Orthanc by C-STORE and by STOW-RS.

What one run measures: one photograph (2048 x 1536, synthetic) is scored once by the real pipeline
with an untrained model (the bytes of the outputs do not depend on the weights), and its heatmap SC
and SR are copied under new UIDs into ``--files`` files (half SCs, half SRs), as a ``deliver`` task
of that many outputs finds them in storage. Then, ``--repeats`` times in alternation, the files go to
one private Orthanc (with its DICOMweb plugin, on loopback) through each destination kind's ``send``
as the delivery loop calls it: C-STORE over one association (the reference), and STOW-RS in one
multipart POST. Orthanc is emptied between sends, so each stores every file anew. The table (printed
last) gives files per second, the median over the repeats, and STOW-RS's time as a ratio of C-STORE's.

Usage: ``python bench/bench_delivery.py [--files 64] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_worker import default_model  # noqa: E402  (the cached untrained model)


def outputs(folder: Path, count: int) -> list[tuple[int, Path]]:
    """``count`` output files as the worker writes them: the SC and SR of one photograph, copied."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from retinagate.engine import Engine
    from retinagate.pipeline import Pipeline, ScoreResult
    from retinagate.settings import load_settings
    from retinagate.synth import DicomIdentity, render_fundus, write_dicom

    photo = folder / "photo.dcm"
    write_dicom(render_fundus(np.random.default_rng(3), 2048, 1536).image, photo, DicomIdentity.synthetic(0))
    settings = load_settings(environ={"RETINAGATE_DATA_DIR": str(folder / "var")})
    with Pipeline(Engine(default_model(), providers="cpu"), settings) as pipeline:
        (result,) = pipeline.score_paths([photo])
    assert isinstance(result, ScoreResult), result
    built = {output.kind: output.data for output in result.built}
    files = []
    for n in range(count):
        kind = ("sc", "sr")[n % 2]
        path = folder / f"out{n}.dcm"
        path.write_bytes(built[kind])
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path, enforce_file_format=True)
        files.append((n, path))
    return files


def empty(url: str) -> None:
    with urllib.request.urlopen(url + "/patients", timeout=30) as response:  # noqa: S310 - loopback
        patients = json.loads(response.read())
    for patient in patients:
        request = urllib.request.Request(f"{url}/patients/{patient}", method="DELETE")  # noqa: S310
        urllib.request.urlopen(request, timeout=30).close()  # noqa: S310


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=64, help="outputs per send (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="sends per kind (default 3)")
    args = parser.parse_args()

    from retinagate.destinations import Connection
    from retinagate.destinations.dimse import DimseDestination
    from retinagate.destinations.stow import StowDestination
    from retinagate.pacs import Orthanc

    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as folder:
        files = outputs(Path(folder), args.files)
        megabytes = sum(path.stat().st_size for _, path in files) / 1e6
        orthanc = Orthanc(Path(folder) / "orthanc", dicomweb=True).start()
        try:
            kinds = {
                "C-STORE (reference)": DimseDestination(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.port),
                "STOW-RS": StowDestination(url=orthanc.dicomweb_url),
            }
            seconds: dict[str, list[float]] = {name: [] for name in kinds}
            for _ in range(args.repeats):
                for name, destination in kinds.items():
                    empty(orthanc.url)
                    started = time.perf_counter()
                    results = destination.send(files, Connection("BENCH"))
                    seconds[name].append(time.perf_counter() - started)
                    verdicts = {r.verdict for r in results.values()}
                    if verdicts != {"delivered"}:
                        raise SystemExit(f"{name}: not every file was delivered: {results}")
        finally:
            orthanc.stop()

    reference = statistics.median(seconds["C-STORE (reference)"])
    print(f"\n{args.files} outputs ({megabytes:.1f} MB: SC and SR of a 2048 x 1536 photograph), Orthanc on loopback,")
    print(f"median of {args.repeats} sends each\n")
    print(f"{'kind':<22}{'seconds':>10}{'files/s':>10}{'x C-STORE':>11}")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<22}{median:>10.3f}{args.files / median:>10.1f}{median / reference:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
