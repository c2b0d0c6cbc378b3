"""dicom_gateway.sop_classes: what the gateway offers at negotiation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pynetdicom import AE

from dicom_gateway.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, storage_sop_classes, supported_contexts
from retinagate.settings import Settings

FUNDUS_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # Ophthalmic Photography 16 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic
    "1.2.840.10008.5.1.4.1.1.77.1.5.7",  # Wide Field OP, stereographic projection
    "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Wide Field OP, 3D coordinates
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
}
DECODABLE = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
}
CT = "1.2.840.10008.5.1.4.1.1.2"


def test_every_fundus_class_is_offered_with_every_decodable_syntax(make_settings: Callable[..., Settings]) -> None:
    offered = supported_contexts(make_settings())
    contexts = {str(cx.abstract_syntax): set(map(str, cx.transfer_syntax)) for cx in offered}
    assert FUNDUS_CLASSES <= set(STORAGE_SOP_CLASSES) <= set(contexts)
    assert set(TRANSFER_SYNTAXES) == DECODABLE
    assert all(contexts[uid] == DECODABLE for uid in STORAGE_SOP_CLASSES)
    assert "1.2.840.10008.1.1" in contexts  # Verification


def test_extra_classes_are_added_once_and_must_be_uids() -> None:
    assert storage_sop_classes([CT, CT])[-1] == CT
    assert storage_sop_classes([CT]).count(CT) == 1
    with pytest.raises(ValueError, match="gateway_extra_sop_classes"):
        storage_sop_classes(["1.2.3.04"])
    with pytest.raises(ValueError, match="gateway_extra_sop_classes"):
        storage_sop_classes(["1.2.840.10008.1.1"])
    with pytest.raises(ValueError, match="at most 127"):
        storage_sop_classes([f"1.2.3.{n}" for n in range(200)])


@pytest.mark.parametrize(
    ("syntax", "accepted"),
    [("1.2.840.10008.1.2.4.50", True), ("1.2.840.10008.1.2.4.201", False), ("1.2.840.10008.1.2.2", False)],
)
def test_transfer_syntaxes_the_worker_cannot_decode_are_refused_at_negotiation(
    start_gateway: Callable[..., Any], syntax: str, accepted: bool
) -> None:
    gateway = start_gateway(gateway_extra_sop_classes=[CT])
    ae = AE(ae_title="CAMERA")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(CT, [syntax])
    host, port = gateway.address
    assoc = ae.associate(host, port, ae_title="RETINAGATE")
    try:
        assert any(cx.abstract_syntax == CT for cx in assoc.accepted_contexts) is accepted
    finally:
        assoc.release()
