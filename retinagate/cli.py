"""The ``retinagate`` command: one entry point, one subcommand per job.

Each package contributes its subcommands through a ``register(subparsers)`` function in its own
``cli`` module. Those modules import only the standard library at module level, so ``retinagate
--help`` stays fast and the gateway and worker never load PyTorch.

Exit codes: 0 success, 1 the work ran but some of it failed (for example an unreadable input in a
batch), 2 bad usage or invalid settings, 3 a required resource is missing or unreachable (model
file, database, server). A query that matches nothing is an answer, not a failure: it exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = ["EXIT_FAILED", "EXIT_MISSING", "EXIT_OK", "EXIT_USAGE", "CommandError", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING = 3

#: Modules that contribute subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "retinagate.commands",
    "retinagate.scoring_cli",
    "train.cli",
    "export.cli",
    "dicom_gateway.cli",
    "worker.cli",
    "worker.deliveries_cli",
    "worker.models_cli",
    "worker.storage_cli",
    "worker.retrieve_cli",
)


class CommandError(Exception):
    """A failure a user can act on; its message is printed without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Registrar(Protocol):
    def __call__(self, subparsers: Any) -> None: ...


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every package's subcommands."""
    parser = argparse.ArgumentParser(
        prog="retinagate",
        description=(
            "RetinaGate scores retinal fundus photographs for 29 RFMiD conditions, explains each score "
            "with a Grad-CAM heatmap and sends the heatmaps back to PACS as DICOM.\n\n"
            "Start with `retinagate synth var/synth --dicom` for test data, then `retinagate train`, "
            "`retinagate export` and `retinagate serve`."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, metavar="TOML", help="settings file (environment variables RETINAGATE_* win)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the libraries' own messages and Celery's banners too (RETINAGATE_LOG_VERBOSE=true)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that package is not part of this installation
            raise
        register: _Registrar = module.register
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand and returns its exit code."""
    from retinagate.logs import setup_logging
    from retinagate.settings import SettingsError, load_settings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        # Through the environment, so the processes a command starts (serve's children) inherit it.
        os.environ["RETINAGATE_LOG_VERBOSE"] = "true"
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"retinagate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log_level, settings.log_format, verbose=settings.log_verbose)
    handler: Callable[[argparse.Namespace, Any], int] = args.handler
    try:
        return handler(args, settings)
    except CommandError as exc:
        print(f"retinagate {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"retinagate {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from retinagate.db import connect_failure

        message = connect_failure(exc, settings)
        if message is None:
            raise
        print(f"retinagate {args.command}: {message}", file=sys.stderr)
        return EXIT_MISSING
