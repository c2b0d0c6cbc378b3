"""Prometheus metrics of the gateway, served on ``settings.metrics_port`` (0 turns the endpoint off).

The metrics live in prometheus_client's default registry, created once per process: a gateway
restarted inside one process (as tests do) keeps counting on the same series.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "ACTIVE_ASSOCIATIONS",
    "ASSOCIATIONS",
    "BYTES_RECEIVED",
    "DUPLICATES",
    "ENQUEUED",
    "ENQUEUE_FAILURES",
    "INSTANCES_RECEIVED",
    "REJECTS",
    "STORE_SECONDS",
    "start_metrics_server",
    "stop_metrics_server",
]

logger = logging.getLogger(__name__)

INSTANCES_RECEIVED = Counter("retinagate_gateway_instances_received", "Instances stored durably and acknowledged.")
BYTES_RECEIVED = Counter("retinagate_gateway_received_bytes", "Bytes of instances stored durably.")
REJECTS = Counter(
    "retinagate_gateway_rejects",
    "Refused instances and rejected associations, by reason.",
    ["reason"],
)
DUPLICATES = Counter(
    "retinagate_gateway_duplicates",
    "Instances whose SOP Instance UID was already stored, by what was done (identical, kept_first, replaced).",
    ["action"],
)
OWN_OUTPUTS = Counter(
    "retinagate_gateway_own_outputs",
    "RetinaGate's own outputs sent back (a PACS routing loop): acknowledged, neither stored nor scored.",
)
ASSOCIATIONS = Counter("retinagate_gateway_associations", "Associations by outcome.", ["outcome"])
ACTIVE_ASSOCIATIONS = Gauge("retinagate_gateway_active_associations", "Connections being served now.")
ENQUEUED = Counter("retinagate_gateway_enqueued_instances", "Instances handed to the score queue.")
ENQUEUE_FAILURES = Counter(
    "retinagate_gateway_enqueue_failures",
    "Instances left in 'received' because the broker could not take them (the sweeper re-sends them).",
)
STORE_SECONDS = Histogram(
    "retinagate_gateway_store_seconds",
    "Time from a complete C-STORE request to its response.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> Any | None:  # noqa: S104 - scraped from outside
    """Serves ``/metrics`` on ``port`` in a daemon thread; returns the server (None when port is 0).

    Raises:
        ValueError: When ``port`` is outside 0 to 65535 (it names ``metrics_port``).
        OSError: When the port cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics_port is {port}; expected 0 (off) to 65535")
    if port == 0:
        return None
    server, thread = start_http_server(port, addr=host)
    logger.info("metrics on http://%s:%d/metrics (thread %s)", host, port, thread.name)
    return server


def stop_metrics_server(server: Any | None) -> None:
    """Stops a server from :func:`start_metrics_server` (no-op for None)."""
    if server is None:
        return
    stopper = threading.Thread(target=server.shutdown, name="metrics-shutdown", daemon=True)
    stopper.start()
    stopper.join(timeout=5)
    server.server_close()
