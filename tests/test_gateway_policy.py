"""dicom_gateway.policy: allow-lists, the called AE title and TLS, checked with real associations."""

from __future__ import annotations

import ipaddress
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicom_gateway.policy import (
    CALLED_AE_WRONG,
    CALLING_AE_NOT_ALLOWED,
    PEER_NOT_ALLOWED,
    AssociationPolicy,
    tls_context,
)
from retinagate.db import make_engine, session_factory
from retinagate.models import Association
from retinagate.settings import Settings

VERIFICATION = "1.2.840.10008.1.1"


def _associate(gateway: Any, calling: str = "CAMERA", called: str | None = None, tls: Any = None) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    host, port = gateway.address
    return ae.associate(host, port, ae_title=called or gateway.settings.gateway_ae_title, tls_args=tls)


def _audit(settings: Settings, count: int) -> list[Association]:
    engine = make_engine(settings)
    deadline = time.monotonic() + 10
    try:
        while True:
            with session_factory(engine)() as session:
                rows = list(session.scalars(select(Association).order_by(Association.id)))
            if (len(rows) >= count and all(r.outcome != "open" for r in rows)) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)
    finally:
        engine.dispose()


def _rejection(assoc: Any) -> tuple[int, int, int]:
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return int(rj.result), int(rj.result_source), int(rj.diagnostic)


# Policy rules, without a network.


def test_an_empty_policy_allows_any_peer_and_calling_ae() -> None:
    policy = AssociationPolicy(ae_title="RETINAGATE")
    assert policy.check(peer_address="203.0.113.9", calling_ae="ANY", called_ae="RETINAGATE") is None


def test_the_address_is_checked_before_the_ae_titles() -> None:
    policy = AssociationPolicy("RG", frozenset({"CAM"}), (ipaddress.ip_network("10.0.0.0/8"),))
    assert policy.check(peer_address="192.0.2.1", calling_ae="NOPE", called_ae="NOPE") is PEER_NOT_ALLOWED
    assert policy.check(peer_address="10.1.2.3", calling_ae="NOPE", called_ae="RG") is CALLING_AE_NOT_ALLOWED
    assert policy.check(peer_address="10.1.2.3", calling_ae="CAM ", called_ae="OTHER") is CALLED_AE_WRONG
    assert policy.check(peer_address="10.1.2.3", calling_ae="CAM", called_ae="RG  ") is None


def test_ipv4_mapped_ipv6_peers_match_ipv4_networks_and_garbage_never_matches() -> None:
    policy = AssociationPolicy("RG", allowed_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    assert policy.address_allowed("::ffff:192.0.2.7")
    assert not policy.address_allowed("2001:db8::1")
    assert not policy.address_allowed("not an address")


def test_the_rejection_codes_are_the_standard_ones() -> None:
    assert (PEER_NOT_ALLOWED.result, PEER_NOT_ALLOWED.source, PEER_NOT_ALLOWED.diagnostic) == (1, 1, 1)
    assert CALLING_AE_NOT_ALLOWED.diagnostic == 3
    assert CALLED_AE_WRONG.diagnostic == 7


def test_tls_is_off_without_a_certificate(make_settings: Callable[..., Settings]) -> None:
    assert tls_context(make_settings()) is None


def test_an_unreadable_certificate_names_the_setting(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="gateway_tls_cert"):
        tls_context(make_settings(gateway_tls_cert=missing, gateway_tls_key=missing))


# Real associations.


def test_an_unknown_calling_ae_is_rejected_and_audited(start_gateway: Callable[..., Any]) -> None:
    gateway = start_gateway(gateway_allowed_ae_titles=["FUNDUSCAM"])

    allowed = _associate(gateway, calling="FUNDUSCAM")
    assert allowed.is_established
    allowed.release()
    assoc = _associate(gateway, calling="INTRUDER")

    assert _rejection(assoc) == (1, 1, 3)
    rejected = _audit(gateway.settings, 2)[-1]
    assert (rejected.calling_ae, rejected.outcome, rejected.reason) == (
        "INTRUDER", "rejected", "calling AE title not recognised",
    )


def test_an_unknown_peer_address_is_rejected(start_gateway: Callable[..., Any]) -> None:
    gateway = start_gateway(gateway_allowed_networks=["10.0.0.0/8", "fd00::/8"])

    assoc = _associate(gateway)

    assert _rejection(assoc) == (1, 1, 1)
    row = _audit(gateway.settings, 1)[0]
    assert (row.peer_address, row.outcome, row.reason) == ("127.0.0.1", "rejected", "peer address not allowed")


def test_an_allowed_peer_network_is_accepted(start_gateway: Callable[..., Any]) -> None:
    gateway = start_gateway(gateway_allowed_networks=["127.0.0.0/8"])
    assoc = _associate(gateway)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_a_wrong_called_ae_is_rejected(start_gateway: Callable[..., Any]) -> None:
    gateway = start_gateway(gateway_ae_title="RETINAGATE")
    assert _rejection(_associate(gateway, called="PACS")) == (1, 1, 7)


def test_associations_over_the_limit_are_rejected_as_transient(start_gateway: Callable[..., Any]) -> None:
    gateway = start_gateway(gateway_max_associations=1)
    first = _associate(gateway)
    assert first.is_established

    second = _associate(gateway)

    assert _rejection(second) == (2, 3, 2)
    first.release()
    rows = _audit(gateway.settings, 2)
    assert sorted((r.outcome, r.reason) for r in rows) == [
        ("rejected", "local limit exceeded"), ("released", None),
    ]


# TLS: the session's PKI (conftest ``pki``): a CA, a server certificate for 127.0.0.1, client certificates.


def _client_tls(pki: Any, cert: Path | None, key: Path | None) -> tuple[ssl.SSLContext, str]:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context, "127.0.0.1"


def _tls_gateway(start_gateway: Callable[..., Any], pki: Any, require: bool = True) -> Any:
    return start_gateway(
        gateway_tls_cert=pki.server_cert, gateway_tls_key=pki.server_key, gateway_tls_ca=pki.ca,
        gateway_tls_require_client_cert=require,
    )


def test_a_tls_gateway_accepts_a_client_with_a_trusted_certificate(
    start_gateway: Callable[..., Any], pki: Any
) -> None:
    gateway = _tls_gateway(start_gateway, pki)

    assoc = _associate(gateway, tls=_client_tls(pki, pki.client_cert, pki.client_key))

    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    row = _audit(gateway.settings, 1)[0]
    assert (row.tls, row.outcome) == (True, "released")


def test_a_tls_gateway_refuses_a_plain_connection(start_gateway: Callable[..., Any], pki: Any) -> None:
    gateway = _tls_gateway(start_gateway, pki)

    assoc = _associate(gateway)

    assert not assoc.is_established
    row = _audit(gateway.settings, 1)[0]
    assert (row.tls, row.outcome) == (True, "rejected")
    assert row.reason is not None and row.reason.startswith("TLS handshake failed")
    # The refused client never held up the accept loop: a trusted client still gets in.
    trusted = _associate(gateway, tls=_client_tls(pki, pki.client_cert, pki.client_key))
    assert trusted.is_established
    trusted.release()


@pytest.mark.parametrize("who", ["stranger", "nobody"])
def test_a_tls_gateway_refuses_clients_without_a_trusted_certificate(
    start_gateway: Callable[..., Any], pki: Any, who: str
) -> None:
    gateway = _tls_gateway(start_gateway, pki)
    cert, key = (pki.stranger_cert, pki.stranger_key) if who == "stranger" else (None, None)

    assert not _associate(gateway, tls=_client_tls(pki, cert, key)).is_established


def test_optional_client_certificates_let_a_client_without_one_in(
    start_gateway: Callable[..., Any], pki: Any
) -> None:
    gateway = _tls_gateway(start_gateway, pki, require=False)
    assoc = _associate(gateway, tls=_client_tls(pki, None, None))
    assert assoc.is_established
    assoc.release()
    assert not _associate(gateway, tls=_client_tls(pki, pki.stranger_cert, pki.stranger_key)).is_established


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_below_1_2_is_refused(start_gateway: Callable[..., Any], pki: Any) -> None:
    gateway = _tls_gateway(start_gateway, pki)
    context, host = _client_tls(pki, pki.client_cert, pki.client_key)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        assoc = _associate(gateway, tls=(context, host))
    except ssl.SSLError:  # this OpenSSL refuses to even offer TLS 1.1
        return
    assert not assoc.is_established
