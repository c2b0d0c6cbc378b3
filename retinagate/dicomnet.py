"""TCP settings for DICOM associations, shared by the gateway, delivery and the built-in receiver.

pynetdicom leaves Nagle's algorithm on. A DIMSE exchange writes a small command PDU, then the
dataset, then waits for the peer's small response: with Nagle on at either end, a write's last
partial segment waits for the peer's delayed acknowledgement (40 ms on Linux), several times per
C-STORE. Measured on loopback with eight heatmap SC and SR objects per association: 0.34 s against
0.17 s to the built-in receiver, and 0.59 s against 0.41 s to Orthanc (0.07 s when Orthanc's DCMTK
also disables it, with ``TCP_NODELAY=1`` in its environment).
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["disable_nagle", "on_connection_open"]


def disable_nagle(sock: socket.socket) -> None:
    """Sends each write at once (``TCP_NODELAY``); a socket that is not TCP is left as it is."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def on_connection_open(event: Any) -> None:
    """pynetdicom ``EVT_CONN_OPEN`` handler that disables Nagle's algorithm on the association's socket."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        disable_nagle(sock)
