"""Whether a DICOM object is one of RetinaGate's own outputs, so that nothing scores it again.

A PACS routing rule that forwards a study to RetinaGate also forwards the heatmap Secondary Capture
(and SR, Parametric Map) RetinaGate put into that study. Scored, the SC gives another SC, which is
forwarded again: a loop (issue 15 item 2). The gateway (:mod:`dicom_gateway.validate`), the decoder
(:func:`retinagate.decode.read_dataset`, so a worker never scores one stored earlier) and
``retinagate score`` all ask :func:`own_output`; this module is the rule's one home.

The rule. Every output RetinaGate writes (:mod:`retinagate.outputs`) names RetinaGate twice:

- an item of the Contributing Equipment Sequence with Manufacturer ``RetinaGate`` and Purpose of
  Reference DCM 109102 "Processing Equipment" (the model that made it, with its Device UID);
- Manufacturer ``RetinaGate`` in the General Equipment module.

Either one marks an own output. The Contributing Equipment item is the DICOM place for "this equipment
made or changed the object", and systems that process the object further append their own items
rather than drop ours, so it survives a PACS or a viewer re-encoding the SC. No camera names itself
RetinaGate, so neither marker can match a photograph. Weaker signs were considered and left out:
Image Type DERIVED\\SECONDARY (montages and many camera exports carry it), the ``2.25.`` UID root
(any UUID-derived UID has it), the SOP class (cameras send Secondary Capture too).

Only the bytes before Pixel Data are needed, and only pydicom is imported: the gateway process must
not load the output writers (OpenCV, highdicom) for this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["MANUFACTURER", "PROCESSING_EQUIPMENT", "own_output"]

#: The Manufacturer every RetinaGate output carries (also :data:`retinagate.outputs.MANUFACTURER`,
#: which the writers use; ``tests/test_provenance.py`` builds each output kind and checks this rule
#: recognises it, so the two cannot drift apart unnoticed).
MANUFACTURER: Final = "RetinaGate"

#: Purpose of Reference of the Contributing Equipment item RetinaGate adds: (code value, scheme).
PROCESSING_EQUIPMENT: Final = ("109102", "DCM")


def _text(value: object) -> str:
    return str(value or "").strip()


def own_output(ds: Dataset) -> str | None:
    """Why ``ds`` is one of RetinaGate's own outputs, or ``None`` when it is not.

    The reason names the marker found and never any patient data, so callers may log it and show it.
    A dataset whose equipment attributes cannot be read is not called an own output: the caller's
    own checks then refuse or fail it with their reasons.
    """
    try:
        for item in ds.get("ContributingEquipmentSequence") or ():
            if _text(item.get("Manufacturer")) != MANUFACTURER:
                continue
            purposes = item.get("PurposeOfReferenceCodeSequence") or ()
            codes = {(_text(code.get("CodeValue")), _text(code.get("CodingSchemeDesignator"))) for code in purposes}
            if PROCESSING_EQUIPMENT in codes:
                return "RetinaGate's own output (Contributing Equipment names RetinaGate as processing equipment)"
        if _text(ds.get("Manufacturer")) == MANUFACTURER:
            return "RetinaGate's own output (Manufacturer is RetinaGate)"
    except Exception:  # pydicom raises many types for values it cannot read; see the docstring
        return None
    return None
