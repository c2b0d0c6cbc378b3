"""What the gateway accepts at association negotiation: storage SOP classes and transfer syntaxes.

Negotiation is the first filter: a camera that proposes a SOP class or an encoding the worker cannot
decode gets that presentation context rejected, so such a dataset never reaches storage or a worker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pynetdicom.presentation import PresentationContext

    from retinagate.settings import Settings

__all__ = [
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "VERIFICATION_SOP_CLASS",
    "storage_sop_classes",
    "supported_contexts",
]

VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"

#: Storage SOP classes fundus devices send, UID to name.
STORAGE_SOP_CLASSES: Final[Mapping[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.7": "Wide Field Ophthalmic Photography Stereographic Projection Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.8": "Wide Field Ophthalmic Photography 3D Coordinates Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}

#: Transfer syntaxes the worker can decode, UID to name; the order is the gateway's preference.
TRANSFER_SYNTAXES: Final[Mapping[str, str]] = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [SV1])",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-Lossless)",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
}

#: Transfer syntaxes whose Pixel Data is encapsulated (compressed frames in items).
ENCAPSULATED_SYNTAXES: Final = frozenset(TRANSFER_SYNTAXES) - {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
}

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# pynetdicom accepts at most 128 presentation contexts per AE; one goes to Verification.
_MAX_STORAGE_CONTEXTS = 127


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a DICOM UID: dot-separated numbers without leading zeros, 64 characters at most."""
    return 0 < len(value) <= 64 and _UID.match(value) is not None


def storage_sop_classes(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The storage SOP classes the gateway accepts: the built-in ones, then ``extra`` (deduplicated).

    Raises:
        ValueError: When an extra entry is not a UID (it names ``gateway_extra_sop_classes``), or the
            total exceeds the 127 presentation contexts an AE can offer besides Verification.
    """
    classes = list(STORAGE_SOP_CLASSES)
    for uid in extra:
        if not is_valid_uid(uid):
            raise ValueError(f"gateway_extra_sop_classes: {uid!r} is not a DICOM UID (digits and dots, 64 at most)")
        if uid == VERIFICATION_SOP_CLASS:
            raise ValueError("gateway_extra_sop_classes: Verification is always accepted; list storage classes only")
        if uid not in classes:
            classes.append(uid)
    if len(classes) > _MAX_STORAGE_CONTEXTS:
        raise ValueError(
            f"gateway_extra_sop_classes: {len(classes)} storage classes in all; at most {_MAX_STORAGE_CONTEXTS}"
        )
    return tuple(classes)


def supported_contexts(settings: Settings) -> list[PresentationContext]:
    """Presentation contexts for the gateway AE: Verification plus each storage class with our syntaxes."""
    from pynetdicom import build_context

    syntaxes = list(TRANSFER_SYNTAXES)
    contexts = [build_context(VERIFICATION_SOP_CLASS, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])]
    contexts += [build_context(uid, syntaxes) for uid in storage_sop_classes(settings.gateway_extra_sop_classes)]
    return contexts
