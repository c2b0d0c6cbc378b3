"""The Comprehensive SR: a TID 1500 Measurement Report of every label's probability and decision.

One measurement group (TID 1501) per scored frame holds, for each of the model's labels, the
probability as a numeric measurement (TID 300, unit UCUM ``1``, "no units") and present/absent by the
card's threshold as a qualitative evaluation (SCT 52101004 Present / 2667000 Absent), with the
algorithm's identity (TID 4019: name, version, parameters including the model file's sha256) and the
source image (and frame) it was measured on. The Image Library lists the source and the heatmap
Secondary Capture, and both are recorded as evidence. The document is UNVERIFIED and PRELIMINARY:
it is AI output awaiting a reader.

Label concepts come from a local coding scheme, ``99RETINAGATE`` (code value = the label name,
meaning = its description), declared in the Coding Scheme Identification Sequence: the RFMiD labels
have no agreed standard codes, and guessing SNOMED codes would be worse than saying so.

Speed: highdicom's SR constructor deep-copies and re-parses the whole content tree and then walks it
for evidence (about 40 ms for 29 labels on one core, more than the whole rest of the pipeline). The
content tree is built with highdicom's templates as usual; the document is constructed around a small
root that holds only the Image Library (which references every instance the tree references, so the
evidence is collected the same way), and the full content sequence is attached afterwards.
``tests/test_outputs_sr.py`` checks that the result equals highdicom's own construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from retinagate.labels import LABEL_DESCRIPTIONS
from retinagate.outputs.identity import (
    MANUFACTURER,
    SERIES_NUMBERS,
    ModelIdentity,
    derived_uid,
    output_uid,
    series_uid,
)

if TYPE_CHECKING:
    import highdicom as hd

__all__ = ["CODING_SCHEME", "FrameScores", "build_report", "build_sr", "label_concept", "probability_concept"]

#: Local coding scheme of RetinaGate's label concepts.
CODING_SCHEME: Final = "99RETINAGATE"

#: Procedure reported: ophthalmic photography (DCM "OP", CID 29/33; TID 1500 allows any code here).
_PROCEDURE: Final = Code("OP", "DCM", "Ophthalmic Photography")


@dataclass(frozen=True)
class FrameScores:
    """The model's output for one frame.

    Attributes:
        probabilities: One probability per card label, in card order.
        frame_number: 1-based frame number in the source, or ``None`` for a single-frame source.
    """

    probabilities: Sequence[float]
    frame_number: int | None = None


@dataclass(frozen=True)
class _Vocabulary:
    """The coded concepts of one label set, made once: highdicom validates each concept it builds."""

    probabilities: tuple[hd.sr.CodedConcept, ...]
    labels: tuple[hd.sr.CodedConcept, ...]
    unit: hd.sr.CodedConcept
    present: hd.sr.CodedConcept
    absent: hd.sr.CodedConcept


@lru_cache(maxsize=8)
def _vocabulary(labels: tuple[str, ...]) -> _Vocabulary:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    concept = hd.sr.CodedConcept.from_code
    return _Vocabulary(
        probabilities=tuple(concept(probability_concept(n)) for n in labels),
        labels=tuple(concept(label_concept(n)) for n in labels),
        unit=concept(codes.UCUM.NoUnits),
        present=concept(codes.SCT.Present),
        absent=concept(codes.SCT.Absent),
    )


def label_concept(label: str) -> Code:
    """The concept of a label (``99RETINAGATE``), used as the name of its qualitative evaluation."""
    meaning = LABEL_DESCRIPTIONS.get(label, label)
    return Code(label[:16], CODING_SCHEME, meaning[:64])


def probability_concept(label: str) -> Code:
    """The concept of a label's probability, used as the name of its numeric measurement."""
    meaning = f"Probability of {LABEL_DESCRIPTIONS.get(label, label).lower()}"
    return Code(f"P-{label}"[:16], CODING_SCHEME, meaning[:64])


def _coding_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    import highdicom as hd

    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=CODING_SCHEME,
        name="RetinaGate fundus labels (RFMiD scheme)",
        responsible_organization=MANUFACTURER,
    )


def _group(
    scores: FrameScores, model: ModelIdentity, source: Dataset, measured_on: Dataset
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    import highdicom as hd

    card = model.card
    if len(scores.probabilities) != card.num_labels:
        raise ValueError(
            f"probabilities: {len(scores.probabilities)} values for {card.num_labels} labels; need one per label"
        )
    frame = scores.frame_number
    frame_key = str(frame or 1)
    words = _vocabulary(tuple(card.labels))
    measurements = []
    evaluations = []
    for index, (label, probability, threshold) in enumerate(
        zip(card.labels, scores.probabilities, card.thresholds, strict=True)
    ):
        value = float(probability)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"probabilities[{label}] is {value}; expected 0 to 1")
        measurements.append(hd.sr.Measurement(name=words.probabilities[index], value=round(value, 6), unit=words.unit))
        decision = words.present if value >= threshold else words.absent
        evaluations.append(hd.sr.QualitativeEvaluation(name=words.labels[index], value=decision))
    frames = [frame] if frame is not None and measured_on is source else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", str(source.SOPInstanceUID), model.sha256, frame_key),
            identifier=f"RetinaGate {model.name} frame {frame_key}"[:64],
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name, version=model.version, parameters=model.algorithm_parameters(), manufacturer=MANUFACTURER
        ),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(measured_on.SOPClassUID),
                referenced_sop_instance_uid=str(measured_on.SOPInstanceUID),
                referenced_frame_numbers=frames,
            )
        ],
    )


def build_report(
    source: Dataset,
    model: ModelIdentity,
    frames: Sequence[FrameScores],
    *,
    sc: Dataset | None = None,
    references_source: bool = True,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree (see :func:`build_sr`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not frames:
        raise ValueError("frames: expected the scores of at least one frame")
    measured_on = source if references_source else sc
    if measured_on is None:
        raise ValueError("sc: a plain image file has no DICOM source, so the SR must reference the Secondary Capture")
    library = [d for d in ((source if references_source else None), sc) if d is not None]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=f"{model.name} {model.version}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=model.name,
            serial_number=model.serial,
        ),
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURE,
        imaging_measurements=[_group(f, model, source, measured_on) for f in frames],
        referenced_images=library,
    )


def build_sr(
    source: Dataset,
    model: ModelIdentity,
    frames: Sequence[FrameScores],
    *,
    sc: Dataset | None = None,
    references_source: bool = True,
) -> hd.sr.ComprehensiveSR:
    """Builds the Comprehensive SR of one scored instance.

    Args:
        source: Header of the scored instance (patient, study, UIDs); for a plain image file, the
            synthetic header the pipeline made for it.
        model: The model that scored it.
        frames: Scores of each frame, in frame order.
        sc: The heatmap Secondary Capture made for the same instance, referenced and listed as
            evidence (required when ``references_source`` is False).
        references_source: Whether ``source`` is a real DICOM instance to reference; False for the
            synthetic header of a PNG or JPEG file, whose measurements then refer to the SC (the
            only DICOM picture of that photograph).

    Returns:
        The SR document (Explicit VR Little Endian), UNVERIFIED and PRELIMINARY.

    Raises:
        ValueError: If a frame has the wrong number of probabilities, one is outside 0-1, or a
            required reference is missing.
    """
    import highdicom as hd

    report = build_report(source, model, frames, sc=sc, references_source=references_source)
    root = report[0]
    content = root.ContentSequence
    # Construct around a root holding only the Image Library (see the module docstring); every
    # instance the full tree references is in the library, so the evidence comes out the same.
    root.ContentSequence = [item for item in content if _is_library(item)]
    evidence = [d for d in ((source if references_source else None), sc) if d is not None]
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=root,
            series_instance_uid=series_uid(str(source.StudyInstanceUID), model.sha256, "sr"),
            series_number=SERIES_NUMBERS["sr"],
            sop_instance_uid=output_uid(str(source.SOPInstanceUID), model.sha256, "sr"),
            instance_number=int(frames[0].frame_number or 1),
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[model.contributing_equipment()],
            coding_schemes=[_coding_scheme()],
            series_description=f"RetinaGate report (unverified AI) {model.name} {model.version}"[:64],
        )
    finally:
        root.ContentSequence = content
    model.stamp(sr)
    sr.ContentSequence = content
    sr._content = report  # keeps highdicom's view of the content consistent with the dataset
    return sr


def _is_library(item: Dataset) -> bool:
    names = item.get("ConceptNameCodeSequence") or []
    return bool(names) and names[0].get("CodeValue") == "111028"  # DCM 111028 Image Library

