"""retinagate.dicomnet: Nagle's algorithm off on DICOM sockets."""

from __future__ import annotations

import socket
from pathlib import Path

from retinagate.dicomnet import disable_nagle


def _nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_tcp_socket_gets_tcp_nodelay() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert _nodelay(sock) == 0
        disable_nagle(sock)
        assert _nodelay(sock) == 1


def test_a_unix_socket_is_left_as_it_is(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s"))
        disable_nagle(sock)  # no TCP options on a Unix socket: no error either
