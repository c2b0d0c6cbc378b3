"""``retinagate gateway``: run the DICOM gateway until SIGTERM or Ctrl-C.

Only the standard library is imported here; the gateway itself is imported when the command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.settings import Settings

__all__ = ["register"]

DEFAULT_GRACE_S = 20.0


def register(subparsers: Any) -> None:
    """Adds the ``gateway`` subcommand."""
    gateway = subparsers.add_parser(
        "gateway",
        help="run the DICOM gateway (C-STORE SCP) that receives fundus photographs",
        description=(
            "Listens for DICOM associations from fundus cameras and stores each photograph durably "
            "(file and SQL row) before acknowledging it, then queues it for scoring. Settings: "
            "RETINAGATE_GATEWAY_* (AE title, host, port, allow-lists, TLS, limits), "
            "RETINAGATE_METRICS_PORT for Prometheus. The database must be migrated first "
            "(`retinagate db upgrade`). SIGTERM or Ctrl-C stops it gracefully: no new associations, "
            "the ones in flight finish (up to --grace seconds), exit status 0."
        ),
    )
    gateway.add_argument("--host", help="listen address (default: gateway_host)")
    gateway.add_argument("--port", type=int, help="listen port (default: gateway_port)")
    gateway.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        help=(
            "seconds open associations get to finish at shutdown before they are aborted "
            f"(default {DEFAULT_GRACE_S:.0f})"
        ),
    )
    gateway.set_defaults(handler=_gateway)


def _gateway(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_MISSING, EXIT_USAGE, CommandError

    if args.port is not None and not 0 <= args.port <= 65535:
        raise CommandError(f"--port is {args.port}; expected 0 to 65535", EXIT_USAGE)
    if not 0 <= args.grace <= 3600:
        raise CommandError(f"--grace is {args.grace}; expected 0 to 3600 seconds", EXIT_USAGE)

    from retinagate.db import SchemaError, check_schema, make_engine, session_factory

    engine = make_engine(settings)
    try:
        check_schema(engine)
    except SchemaError as exc:
        engine.dispose()
        raise CommandError(str(exc), EXIT_MISSING) from None

    from dicom_gateway.server import Gateway

    bind = (args.host or settings.gateway_host, settings.gateway_port if args.port is None else args.port)
    try:
        gateway = Gateway(settings, sessions=session_factory(engine), bind=bind)
    except ValueError as exc:  # a TLS file that cannot be loaded, a bad extra SOP class
        engine.dispose()
        raise CommandError(str(exc), EXIT_USAGE) from None

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            host, port = gateway.start()
        except OSError as exc:
            raise CommandError(f"cannot listen on {bind[0]}:{bind[1]}: {exc.strerror or exc}", EXIT_MISSING) from None
        tls = "TLS" if settings.tls_enabled else "plain TCP"
        metrics = f", metrics on port {settings.metrics_port}" if settings.metrics_port else ""
        print(f"gateway {settings.gateway_ae_title} listening on {host}:{port} ({tls}){metrics}", flush=True)
        while not stop.wait(0.5):
            pass
        print("gateway stopping: finishing open associations", file=sys.stderr, flush=True)
        gateway.stop(grace=args.grace)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        engine.dispose()
    return 0
