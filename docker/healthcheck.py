#!/usr/bin/env python3
"""Container health probes for RetinaGate's images (installed as ``retinagate-healthcheck``).

``gateway``: opens a DICOM association to the gateway on loopback and sends a C-ECHO. An association
the gateway's policy rejects (AE title or address allow-list, association limit) still counts as
healthy: the gateway answered with a DICOM A-ASSOCIATE-RJ, which only a live SCP does. Refused
connections, aborts and timeouts count as unhealthy. With TLS on, the probe speaks TLS and offers the
gateway's own certificate as its client certificate, since loopback liveness is all it checks.

``worker``: pings the Celery workers through the broker and is healthy when a worker on this host
answers. ``retinagate worker`` names its node after its queues (``score@host``,
``deliver-maintenance@host``), so the probe accepts a reply from any node name ending in
``@<this host name>`` rather than guessing the name: in a container, the host name is the
container's own.

``broker``: connects to the configured Celery broker; used by beat, which has no ping of its own.

All read the same ``RETINAGATE_*`` settings as the service they probe. Exit status 0 is healthy,
1 unhealthy, 2 invalid settings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retinagate.settings import Settings

HEALTHY = 0
UNHEALTHY = 1
BAD_SETTINGS = 2

#: What the probe can check, the first argument on its command line.
TARGETS = ("gateway", "worker", "broker")

#: Calling AE title of the probe when the gateway allows any caller.
PROBE_AE_TITLE = "HEALTHCHECK"


def _loopback(host: str) -> str:
    """The address to probe: a wildcard listen address is reached through loopback."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - comparing with the wildcard, not binding to it
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def probe_gateway(settings: Settings, timeout: float = 5.0) -> tuple[int, str]:
    """C-ECHO to the gateway named by ``settings``; returns the exit status and a one-line reason."""
    import logging
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    # The probe's own one-line reason is the report; pynetdicom's rejection/abort errors would repeat it.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    calling = settings.gateway_allowed_ae_titles[0] if settings.gateway_allowed_ae_titles else PROBE_AE_TITLE
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout

    tls_args = None
    if settings.tls_enabled:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # loopback liveness only; the peer is our own gateway
        if settings.gateway_tls_cert is not None and settings.gateway_tls_key is not None:
            context.load_cert_chain(settings.gateway_tls_cert, settings.gateway_tls_key)
        tls_args = (context, "")

    address = _loopback(settings.gateway_host)
    assoc = ae.associate(address, settings.gateway_port, ae_title=settings.gateway_ae_title, tls_args=tls_args)
    if assoc.is_rejected:
        return HEALTHY, f"gateway at {address}:{settings.gateway_port} is up (association rejected by its policy)"
    if not assoc.is_established:
        return UNHEALTHY, f"no DICOM association with {address}:{settings.gateway_port} (refused, aborted or timed out)"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return HEALTHY, f"gateway at {address}:{settings.gateway_port} answered C-ECHO"
    shown = "no response" if code is None else f"status 0x{code:04X}"
    return UNHEALTHY, f"gateway at {address}:{settings.gateway_port} failed C-ECHO ({shown})"


def probe_broker(settings: Settings, timeout: float = 5.0) -> tuple[int, str]:
    """Connects to the Celery broker named by ``settings``."""
    from kombu.connection import Connection

    from retinagate.queue import broker_url

    url = broker_url(settings)
    try:
        options = {"socket_timeout": timeout}
        connection = Connection(url, connect_timeout=timeout, transport_options=options)  # type: ignore[no-untyped-call]
        with connection as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    except Exception as exc:  # kombu raises OperationalError, redis-py its own errors; any means down
        return UNHEALTHY, f"broker unreachable ({type(exc).__name__})"
    return HEALTHY, "broker reachable"


def probe_worker(settings: Settings, timeout: float = 5.0, hostname: str | None = None) -> tuple[int, str]:
    """Broadcasts a Celery ping; healthy when a node on ``hostname`` (default: this host) answers.

    Every worker on the broker answers a broadcast, so the probe waits ``timeout`` seconds for the
    replies and picks this host's from them.
    """
    import socket

    from retinagate.queue import producer

    host = hostname or socket.gethostname()
    try:
        replies = producer(settings).control.ping(timeout=timeout)
    except Exception as exc:  # kombu raises OperationalError, redis-py its own errors; any means down
        return UNHEALTHY, f"broker unreachable ({type(exc).__name__})"
    nodes = sorted(name for reply in replies or [] for name in reply)
    here = [name for name in nodes if name.rpartition("@")[2] == host]
    if here:
        return HEALTHY, f"worker {', '.join(here)} answered ping"
    others = f" (other nodes: {', '.join(nodes)})" if nodes else ""
    return UNHEALTHY, f"no worker on host {host} answered ping within {timeout:g} s{others}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one probe and prints its reason; returns the exit status."""
    parser = argparse.ArgumentParser(prog="retinagate-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=TARGETS, help="what to probe")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per network step (default 5)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be above 0 seconds (got {args.timeout})")

    from retinagate.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"retinagate-healthcheck: {exc}", file=sys.stderr)
        return BAD_SETTINGS
    probe = {"gateway": probe_gateway, "worker": probe_worker, "broker": probe_broker}[args.target]
    status, reason = probe(settings, args.timeout)
    print(reason, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
