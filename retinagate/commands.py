"""Subcommands of the shared core: ``config``, ``db``, ``synth``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.settings import Settings


def register(subparsers: Any) -> None:
    """Adds the core subcommands."""
    config = subparsers.add_parser("config", help="show the effective settings")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the effective settings, secrets masked")
    show.add_argument("--json", action="store_true", help="print JSON instead of NAME=value lines")
    show.set_defaults(handler=_config_show)

    db = subparsers.add_parser("db", help="manage the SQL schema")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = db_sub.add_parser("upgrade", help="create or migrate the schema to the newest version")
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    upgrade.set_defaults(handler=_db_upgrade)
    current = db_sub.add_parser("current", help="print the schema revision of the database")
    current.set_defaults(handler=_db_current)

    synth = subparsers.add_parser(
        "synth",
        help="write synthetic fundus photographs in the RFMiD layout (and as DICOM)",
        description=(
            "Writes synthetic fundus photographs with planted lesions in the RFMiD folder layout: "
            "Training/, Evaluation/ and Test/ with <ID>.png, lesion masks and RFMiD_*_Labels.csv. "
            "With --dicom, also Ophthalmic Photography DICOM files (JPEG baseline), two eyes per study. "
            "--mode hard (the default) draws realistic photographs: varied anatomy and cameras, lesions "
            "sized to the optic disc, colours shared between conditions, healthy eyes with normal spots; "
            "--mode easy plants one sticker per condition at a fixed place and colour (a quick sanity set)."
        ),
    )
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--n", type=int, default=120, help="images in total over the three splits (default 120)")
    synth.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("W", "H"),
        help="image size (default: hard mode mixes camera sizes from 640 480 to 2048 1536 and square ones; "
        "easy mode 512 384)",
    )
    synth.add_argument(
        "--mode",
        choices=("hard", "easy"),
        default="hard",
        help="hard: realistic photographs (default); easy: one fixed sticker per condition",
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    synth.add_argument("--dicom", action="store_true", help="also write DICOM files under OUT/dicom/")
    synth.add_argument("--json", action="store_true", help="print a JSON summary")
    synth.set_defaults(handler=_synth)

    serve = subparsers.add_parser(
        "serve",
        help="run the gateway, the workers and beat on this machine (embedded Redis when no broker is set)",
        description=(
            "Starts the DICOM gateway, a scoring worker, a sending worker (delivery and maintenance in "
            "threads) and the scheduler as child processes, with an embedded Redis server on a Unix "
            "socket under the data directory when RETINAGATE_BROKER_URL is empty. Migrates the database "
            "first. Ctrl-C stops everything cleanly. In production, run `retinagate gateway`, "
            "`retinagate worker --queues score,maintenance`, `retinagate worker --queues deliver,maintenance "
            "--pool threads` and `retinagate beat` as separate services instead (docs/deploy.md)."
        ),
    )
    serve.add_argument(
        "--concurrency", type=int, default=os.cpu_count() or 1, help="scoring processes (default: one per CPU core)"
    )
    serve.add_argument("--no-beat", action="store_true", help="do not run the scheduler (sweeps, rescoring)")
    serve.set_defaults(handler=_serve)

    demo = subparsers.add_parser(
        "demo",
        help="see the whole product work: synthetic studies in, heatmaps back in a PACS",
        description=(
            "Makes synthetic studies, trains and exports a small model (cached for later runs), starts "
            "`retinagate serve` and a receiving PACS (Orthanc when installed), sends the studies with "
            "dcmtk's storescu, waits for the results, prints them and writes PNG previews under "
            "<data_dir>/demo/previews/."
        ),
    )
    demo.add_argument("--studies", type=int, default=10, help="studies to send, two eyes each (default 10)")
    demo.add_argument("--epochs", type=int, default=18, help="training epochs for the demo model (default 18)")
    demo.add_argument(
        "--train-images", type=int, default=500, help="synthetic images to train the demo model on (default 500)"
    )
    demo.set_defaults(handler=_demo)


def _config_show(args: argparse.Namespace, settings: Settings) -> int:
    data = settings.masked()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for key, value in data.items():
            if isinstance(value, list) and any(isinstance(item, dict) for item in value):
                shown = json.dumps(value)  # tables (destinations with settings of their own) only read as JSON
            elif isinstance(value, list):
                shown = ",".join(map(str, value))
            else:
                shown = "" if value is None else value
            print(f"RETINAGATE_{key.upper()}={shown}")
    return 0


def _db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from alembic.util import CommandError as AlembicError

    from retinagate.cli import EXIT_USAGE, CommandError
    from retinagate.db import current_revision, upgrade

    try:
        upgrade(settings, args.revision)
        revision = current_revision(settings)
    except AlembicError as exc:
        raise CommandError(f"cannot migrate to {args.revision!r}: {exc}", EXIT_USAGE) from None
    # An unreachable database is reported by retinagate.cli.main, as for every command.
    print(f"database schema at revision {revision}")
    return 0


def _db_current(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.db import current_revision

    print(current_revision(settings) or "(empty)")  # an unreachable database: see retinagate.cli.main
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_MISSING, CommandError
    from retinagate.serve import serve

    if settings.model_path is None or not settings.model_path.is_file():
        raise CommandError(
            f"no model to serve: set RETINAGATE_MODEL_PATH to an ONNX file from `retinagate export` "
            f"(now {settings.model_path or 'unset'})",
            EXIT_MISSING,
        )
    try:
        return serve(settings, config=args.config, concurrency=args.concurrency, with_beat=not args.no_beat)
    except (FileNotFoundError, RuntimeError) as exc:
        raise CommandError(str(exc), EXIT_MISSING) from None


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import CommandError
    from retinagate.demo import DemoError, run_demo

    if args.studies < 3 or args.epochs < 1 or args.train_images < 60:
        raise CommandError("--studies must be at least 3, --epochs at least 1, --train-images at least 60", 2)
    try:
        return run_demo(settings, studies=args.studies, epochs=args.epochs, train_images=args.train_images)
    except DemoError as exc:
        raise CommandError(str(exc)) from None


def _synth(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_USAGE, CommandError
    from retinagate.synth import SynthConfig, write_dataset

    width, height = args.size if args.size is not None else (None, None)
    try:
        config = SynthConfig(n=args.n, width=width, height=height, seed=args.seed, dicom=args.dicom, mode=args.mode)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    summary = write_dataset(args.out, config)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {summary['images']} {config.mode} images ({config.size_policy}) to {args.out} "
            f"({', '.join(f'{k}: {v}' for k, v in summary['splits'].items())})"
        )
        if args.dicom:
            print(f"wrote {summary['dicom_files']} DICOM files in {summary['studies']} studies to {args.out / 'dicom'}")
    return 0
