"""Where outputs go: one module per protocol behind one interface, registered in one place.

``base`` holds the interface (:class:`Destination`: parse, send, echo), the verdict a send gives each
file, and :class:`Connection` (our AE title, client TLS and timeouts); ``dimse`` sends with C-STORE,
``stow`` with STOW-RS; ``registry`` lists them and parses a setting's text into one. The worker's
delivery loop, retries, leases and sweep (:mod:`worker.delivery`, :mod:`worker.sweep`) work on
these values alone and never branch on the protocol.
"""

from __future__ import annotations

from retinagate.destinations.base import (
    Connection,
    Destination,
    SendResult,
    Timeouts,
    TlsFiles,
    Verdict,
    classify_status,
)
from retinagate.destinations.registry import kinds, parse

__all__ = [
    "Connection",
    "Destination",
    "SendResult",
    "Timeouts",
    "TlsFiles",
    "Verdict",
    "classify_status",
    "kinds",
    "parse",
]
