"""Subcommands of the shared core: ``config``, ``db``, ``synth``."""

from __future__ import annotations

import argparse
import json
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
            "With --dicom, also Ophthalmic Photography DICOM files (JPEG baseline), two eyes per study."
        ),
    )
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--n", type=int, default=120, help="images in total over the three splits (default 120)")
    synth.add_argument(
        "--size", type=int, nargs=2, default=(512, 384), metavar=("W", "H"), help="image size (default 512 384)"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    synth.add_argument("--dicom", action="store_true", help="also write DICOM files under OUT/dicom/")
    synth.add_argument("--json", action="store_true", help="print a JSON summary")
    synth.set_defaults(handler=_synth)


def _config_show(args: argparse.Namespace, settings: Settings) -> int:
    data = settings.masked()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for key, value in data.items():
            shown = ",".join(map(str, value)) if isinstance(value, list) else ("" if value is None else value)
            print(f"RETINAGATE_{key.upper()}={shown}")
    return 0


def _db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.db import upgrade

    upgrade(settings, args.revision)
    return 0


def _db_current(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.db import current_revision

    print(current_revision(settings) or "(empty)")
    return 0


def _synth(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_USAGE, CommandError
    from retinagate.synth import SynthConfig, write_dataset

    try:
        config = SynthConfig(n=args.n, width=args.size[0], height=args.size[1], seed=args.seed, dicom=args.dicom)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    summary = write_dataset(args.out, config)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {summary['images']} images to {args.out} "
            f"({', '.join(f'{k}: {v}' for k, v in summary['splits'].items())})"
        )
        if args.dicom:
            print(f"wrote {summary['dicom_files']} DICOM files in {summary['studies']} studies to {args.out / 'dicom'}")
    return 0
