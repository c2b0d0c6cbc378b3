"""TLS pieces shared by the gateway (server side) and delivery (client side)."""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["load_identity"]


def load_identity(context: ssl.SSLContext, cert: Path, key: Path, setting: str) -> None:
    """Loads a certificate and its private key into ``context``.

    Args:
        context: The TLS context.
        cert: Certificate (PEM), with its chain.
        key: Private key (PEM).
        setting: Prefix of the settings they came from (``gateway_tls``, ``delivery_tls``), for the message.

    Raises:
        ValueError: Naming both settings and files when either cannot be loaded or they do not match.
    """
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{setting}_cert/{setting}_key: cannot load {cert} with its key {key}: {exc}") from None
