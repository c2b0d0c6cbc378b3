"""Who may open an association with the gateway, and over what kind of connection.

AE titles are labels a camera chooses, not credentials, so they are checked together with the peer's
address (CIDR allow-list) and, for real security, TLS with client certificates. A refused request
gets an A-ASSOCIATE-RJ with the reason the standard defines (PS3.8 9.3.4):

=====================================  ======================  ===============================
check                                  result / source         diagnostic
=====================================  ======================  ===============================
peer address outside the allow-list    permanent / user (1/1)  1: no reason given
calling AE title not in the allow-list permanent / user (1/1)  3: calling AE title not recognised
called AE title not the gateway's      permanent / user (1/1)  7: called AE title not recognised
too many associations (pynetdicom)     transient / pres. (2/3) 2: local limit exceeded
=====================================  ======================  ===============================

The address check answers "no reason given" on purpose: telling a stranger that its address is the
problem helps nobody but the stranger.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from retinagate.tls import load_identity

if TYPE_CHECKING:
    from retinagate.settings import Settings

__all__ = ["AssociationPolicy", "Rejection", "tls_context"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ to send: result, source and diagnostic (PS3.8 9.3.4), plus an audit reason."""

    result: int
    source: int
    diagnostic: int
    reason: str


PEER_NOT_ALLOWED = Rejection(0x01, 0x01, 0x01, "peer address not allowed")
CALLING_AE_NOT_ALLOWED = Rejection(0x01, 0x01, 0x03, "calling AE title not recognised")
CALLED_AE_WRONG = Rejection(0x01, 0x01, 0x07, "called AE title not recognised")


@dataclass(frozen=True)
class AssociationPolicy:
    """The allow-lists and the gateway's own AE title.

    Attributes:
        ae_title: The called AE title the gateway answers to.
        allowed_ae_titles: Calling AE titles allowed; empty allows any.
        allowed_networks: Peer networks allowed; empty allows any.
    """

    ae_title: str
    allowed_ae_titles: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> AssociationPolicy:
        """The policy the settings describe (``gateway_ae_title`` and the two allow-lists)."""
        return cls(
            ae_title=settings.gateway_ae_title,
            allowed_ae_titles=frozenset(settings.gateway_allowed_ae_titles),
            allowed_networks=tuple(settings.gateway_allowed_networks),
        )

    def address_allowed(self, address: str) -> bool:
        """Whether a peer at ``address`` may associate (IPv4-mapped IPv6 addresses count as IPv4)."""
        if not self.allowed_networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.allowed_networks)

    def check(self, *, peer_address: str, calling_ae: str, called_ae: str) -> Rejection | None:
        """The rejection for an association request, or None to go on to context negotiation.

        The address is checked first, so a peer outside the allow-list learns nothing about AE titles.
        """
        if not self.address_allowed(peer_address):
            return PEER_NOT_ALLOWED
        if self.allowed_ae_titles and calling_ae.strip() not in self.allowed_ae_titles:
            return CALLING_AE_NOT_ALLOWED
        if called_ae.strip() != self.ae_title:
            return CALLED_AE_WRONG
        return None


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context the settings describe, or None when TLS is off.

    TLS 1.2 is the minimum. With ``gateway_tls_ca`` set, client certificates are verified against
    it: required when ``gateway_tls_require_client_cert`` is true, else checked only when offered.

    Raises:
        ValueError: Naming the setting whose file is missing or unreadable.
    """
    if settings.gateway_tls_cert is None or settings.gateway_tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_identity(context, settings.gateway_tls_cert, settings.gateway_tls_key, "gateway_tls")
    if settings.gateway_tls_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.gateway_tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"gateway_tls_ca: cannot load {settings.gateway_tls_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if settings.gateway_tls_require_client_cert else ssl.CERT_OPTIONAL
    return context
