"""The Comprehensive SR: a TID 1500 Measurement Report of every label's probability and decision.

One measurement group (TID 1501) per scored frame holds, for each of the model's labels, the
probability as a numeric measurement (TID 300, unit UCUM ``1``, "no units") and present/absent by the
card's threshold as a qualitative evaluation (SCT 52101004 Present / 272519000 Absent), with the
algorithm's identity (TID 4019: name, version, parameters including the model file's sha256), the eye
as Finding Site (SCT 81745001 Eye) with its Laterality qualifier (SCT 24028007 Right, 7771000 Left,
51440002 Right and left; none for an eye the source does not state) and the source image (and frame)
it was measured on. The group of the frame shown on the SC also holds the photograph's result in words
(DCM 121111 Summary, TEXT): the lines of :func:`retinagate.outputs.findings.summary_lines`, which the
SC's legend, ``retinagate score`` and ``retinagate results`` print too. Each Parametric Map built
before the SR gets a measurement group of its own, the
finding's: the label's concept as its Finding, the same finding site, the label's decision, and the map
referenced as ``99RETINAGATE`` HEATMAP "Heatmap of the finding" (TID 1501 is extensible; DICOM has no
concept for a class activation map of a finding). The Image Library lists the source, the heatmap
Secondary Capture and the maps, each entry with its Image Laterality (DCM 111027), and all are recorded
as evidence. The document is UNVERIFIED and PRELIMINARY: it is AI output awaiting a reader.

A frame the gradability gate refused (:mod:`retinagate.gate`) has no measurements and no findings:
its group says "Gradability: Not graded" (a qualitative evaluation), codes each reason under "Reason
not graded", and gives the reasons' full wording (with their numbers) as a TEXT item of the same
concept. Such documents are built with highdicom directly, not from the byte templates.

Label concepts are SNOMED CT codes where one could be cited (:data:`SNOMED_LABELS`; the README's
table says where each is cited from: DICOM PS3.16 lists only Myopia, in CID 4238), and otherwise come
from a local coding scheme, ``99RETINAGATE`` (code value = the label name, meaning = its description),
declared in the Coding Scheme Identification Sequence: guessing SNOMED codes would be worse than
saying so. The probabilities are always ``99RETINAGATE`` concepts (``P-<label>``): SNOMED CT has no
"probability of" concepts for these findings.

Speed: highdicom's SR constructor deep-copies and re-parses the whole content tree and then walks it
for evidence (about 40 ms for 29 labels on one core, more than the whole rest of the pipeline). The
content tree is built with highdicom's templates as usual; the document is constructed around a small
root that holds only the Image Library (which references every instance the tree references, so the
evidence is collected the same way), and the full content sequence is attached afterwards.
``tests/test_outputs_sr.py`` checks that the result equals highdicom's own construction.

Even so, building (about 35 ms) and serialising (about 20 ms) the document per image costs more than
the rest of the pipeline. :class:`SrEncoder` therefore builds the document with highdicom once per
kind of input (model, number of frames, frame shown, eye, source SOP class and character set, plain
or DICOM source) and compiles it into a byte template (:mod:`retinagate.outputs.encoding`); per image
it fills in only what changes: UIDs and references, dates, the probabilities and present/absent
codes, the Summary text, the patient and study attributes (copied from the source as highdicom
copies them: the root attributes of the Patient and Study modules of the source's IOD) and the
acquisition equipment of the source. The Image Library, whose entries describe the referenced
images, is compiled once per kind of referenced image and eye (references and Frame of Reference
UIDs are filled in), and a map's measurement group once per label, decision, eye and kind of frame
(with 3 maps an SR takes 5.5 ms instead of 16 ms with the groups built by highdicom per image). The
tests compare the encoded document with highdicom's direct construction, element for
element, for images other than the one the template was made from.

:class:`SrOutput` is the kind the registry lists; built after the SC and the maps, it refers to them.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Final

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM, DSfloat

from retinagate.gate import reason_code
from retinagate.labels import LABEL_DESCRIPTIONS
from retinagate.outputs.encoding import (
    ByteTemplate,
    compile_element,
    compile_item,
    copy_with,
    ds_element,
    encode_element,
    encode_part10,
    encodings_of,
    fd_element,
    part10,
    uid_element,
)
from retinagate.outputs.findings import summary_text
from retinagate.outputs.identity import (
    MANUFACTURER,
    ModelIdentity,
    OutputSeries,
    acquisition_equipment,
    derived_uid,
    eye_of,
    instance_number,
    library_equipment,
    output_uid,
)
from retinagate.outputs.kind import BuiltOutput, FrameScores, ScoredPhotograph, highest_probabilities
from retinagate.outputs.pm import KIND as PM_KIND
from retinagate.outputs.pm import PARAMETRIC_MAP_STORAGE
from retinagate.outputs.sc import KIND as SC_KIND

if TYPE_CHECKING:
    import highdicom as hd

    from retinagate.card import ModelCard
    from retinagate.settings import Settings

__all__ = [
    "CODING_SCHEME",
    "COMPREHENSIVE_SR",
    "GRADABILITY",
    "HEATMAP",
    "KIND",
    "NOT_GRADED",
    "NOT_GRADED_REASON",
    "SERIES_NUMBER",
    "SNOMED_LABELS",
    "FrameScores",
    "MapReference",
    "SrEncoder",
    "SrOutput",
    "build_report",
    "build_sr",
    "coding_scheme",
    "finding_sites",
    "label_concept",
    "probability_concept",
]

#: The kind's name in settings, SQL and the registry.
KIND: Final = "sr"

#: Series Number of the SR documents (of the right eye; see :class:`OutputSeries`).
SERIES_NUMBER: Final = 9902

#: What the Series Description calls the series.
_WHAT: Final = "report"

#: Comprehensive SR Storage.
COMPREHENSIVE_SR: Final = "1.2.840.10008.5.1.4.1.1.88.33"

#: Local coding scheme of RetinaGate's label concepts.
CODING_SCHEME: Final = "99RETINAGATE"

#: Procedure reported: ophthalmic photography (DCM "OP", CID 29/33; TID 1500 allows any code here).
_PROCEDURE: Final = Code("OP", "DCM", "Ophthalmic Photography")

#: The gradability of a frame, its one value here (a frame that was graded has measurements instead),
#: and the concept under which each reason is coded and written out.
GRADABILITY: Final = Code("GRADABILITY", CODING_SCHEME, "Gradability of the photograph")
NOT_GRADED: Final = Code("NOT-GRADED", CODING_SCHEME, "Not graded")
NOT_GRADED_REASON: Final = Code("NOT-GRADED-WHY", CODING_SCHEME, "Reason not graded")

#: The reference from a finding's measurement group to the Parametric Map of its heat.
HEATMAP: Final = Code("HEATMAP", CODING_SCHEME, "Heatmap of the finding")

#: SNOMED CT concepts of the labels that have one that could be cited; the other labels keep their
#: ``99RETINAGATE`` concept. Where each code is cited from: the README's table ("What it sends back").
SNOMED_LABELS: Final[dict[str, Code]] = {
    "DR": Code("4855003", "SCT", "Diabetic retinopathy"),
    "ARMD": Code("267718000", "SCT", "Age related macular degeneration"),
    "MYA": Code("57190000", "SCT", "Myopia"),
    "BRVO": Code("24596005", "SCT", "Venous retinal branch occlusion"),
    "LS": Code("1137571003", "SCT", "Chorioretinal scar due to photocoagulation"),
    "ERM": Code("367649002", "SCT", "Epiretinal membrane"),
    "CSR": Code("312956001", "SCT", "Central serous chorioretinopathy"),
    "CRVO": Code("68478007", "SCT", "Central retinal vein occlusion"),
    "ODP": Code("302200001", "SCT", "Pallor of optic disc"),
    "ODE": Code("423341008", "SCT", "Optic disc edema"),
    "PT": Code("232024000", "SCT", "Parafoveal telangiectasia"),
    "EDN": Code("39832008", "SCT", "Retinal exudates"),
    "MHL": Code("232006002", "SCT", "Macular hole"),
    "RP": Code("28835009", "SCT", "Retinitis pigmentosa"),
}

#: The site of every finding (SCT 81745001 Eye, CID 4209), qualified by the eye's laterality (CID 244).
_EYE: Final = Code("81745001", "SCT", "Eye")
_LATERALITY: Final = {
    "R": Code("24028007", "SCT", "Right"),
    "L": Code("7771000", "SCT", "Left"),
    "B": Code("51440002", "SCT", "Right and left"),
}
_IMAGE_LATERALITY: Final = Code("111027", "DCM", "Image Laterality")
_SUMMARY: Final = Code("121111", "DCM", "Summary")


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
    """The concept of a label: its SNOMED CT code (:data:`SNOMED_LABELS`), else its ``99RETINAGATE`` one.

    It names the label's qualitative evaluation, and is the Finding of the map's measurement group.
    """
    if label in SNOMED_LABELS:
        return SNOMED_LABELS[label]
    meaning = LABEL_DESCRIPTIONS.get(label, label)
    return Code(label[:16], CODING_SCHEME, meaning[:64])


def probability_concept(label: str) -> Code:
    """The concept of a label's probability, used as the name of its numeric measurement."""
    meaning = f"Probability of {LABEL_DESCRIPTIONS.get(label, label).lower()}"
    return Code(f"P-{label}"[:16], CODING_SCHEME, meaning[:64])


def coding_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """The declaration of the local coding scheme (Coding Scheme Identification Sequence item)."""
    import highdicom as hd

    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=CODING_SCHEME,
        name="RetinaGate fundus labels (RFMiD scheme)",
        responsible_organization=MANUFACTURER,
    )


def unverified_sr(model: ModelIdentity, **fields: Any) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR as RetinaGate writes every one (a photograph's or a study's): complete, not
    final, unverified AI output in Explicit VR Little Endian, the model as Contributing Equipment, the
    local coding scheme declared, and stamped with the model (:meth:`ModelIdentity.stamp`).

    Args:
        model: The model that produced the content.
        fields: The rest of ``highdicom.sr.ComprehensiveSR``'s arguments (evidence, content, series
            and instance identity, series description).
    """
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR(
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[model.contributing_equipment()],
        coding_schemes=[coding_scheme()],
        **fields,
    )
    model.stamp(sr)
    return sr


def _checked(scores: FrameScores, card: ModelCard) -> list[float]:
    """The probabilities of one frame as floats, checked: one per label, each 0 to 1 (none if not graded)."""
    if scores.not_graded:
        if len(scores.probabilities):
            raise ValueError("probabilities: a frame that was not graded has none")
        return []
    if len(scores.probabilities) != card.num_labels:
        raise ValueError(
            f"probabilities: {len(scores.probabilities)} values for {card.num_labels} labels; need one per label"
        )
    values = [float(p) for p in scores.probabilities]
    for label, value in zip(card.labels, values, strict=True):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"probabilities[{label}] is {value}; expected 0 to 1")
    return values


def finding_sites(eye: str) -> list[hd.sr.FindingSite]:
    """The eye as the finding site, with its laterality when the source states one (TID 1501 row 8).

    The study report (:mod:`retinagate.outputs.study`) names each eye the same way.
    """
    import highdicom as hd

    return [hd.sr.FindingSite(anatomic_location=_EYE, laterality=_LATERALITY.get(eye))]


def _source_image(scores: FrameScores, source: Dataset, measured_on: Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    import highdicom as hd

    frame = scores.frame_number
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(measured_on.SOPClassUID),
        referenced_sop_instance_uid=str(measured_on.SOPInstanceUID),
        referenced_frame_numbers=[frame] if frame is not None and measured_on is source else None,
    )


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=model.algorithm_parameters(), manufacturer=MANUFACTURER
    )


def _group(
    scores: FrameScores, model: ModelIdentity, source: Dataset, measured_on: Dataset
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    import highdicom as hd

    card = model.card
    frame_key = str(scores.frame_number or 1)
    words = _vocabulary(tuple(card.labels))
    measurements = []
    evaluations = []
    values = _checked(scores, card)
    for index, (value, threshold) in enumerate(zip(values, card.thresholds[: len(values)], strict=True)):
        measurements.append(hd.sr.Measurement(name=words.probabilities[index], value=round(value, 6), unit=words.unit))
        decision = words.present if value >= threshold else words.absent
        evaluations.append(hd.sr.QualitativeEvaluation(name=words.labels[index], value=decision))
    if scores.not_graded:
        evaluations.append(hd.sr.QualitativeEvaluation(name=GRADABILITY, value=NOT_GRADED))
        for reason in dict.fromkeys(scores.not_graded):
            code, meaning = reason_code(reason)
            evaluations.append(
                hd.sr.QualitativeEvaluation(name=NOT_GRADED_REASON, value=Code(code, CODING_SCHEME, meaning))
            )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", str(source.SOPInstanceUID), model.sha256, frame_key),
            identifier=f"RetinaGate {model.name} frame {frame_key}"[:64],
        ),
        algorithm_id=_algorithm(model),
        finding_sites=finding_sites(eye_of(source)),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[_source_image(scores, source, measured_on)],
    )
    if scores.not_graded:
        # The reasons as worded (with their measurements), for a reader: TID 1501 allows TEXT evaluations.
        text = "; ".join(dict.fromkeys(scores.not_graded))
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=NOT_GRADED_REASON, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    return group


def photograph_summary(frames: Sequence[FrameScores], card: ModelCard) -> str | None:
    """The photograph's summary (:func:`~retinagate.outputs.findings.summary_text`) of its graded frames'
    highest probabilities; ``None`` when no frame was graded."""
    highest = highest_probabilities(frames, card.labels)
    return summary_text(highest, dict(zip(card.labels, card.thresholds, strict=True))) if highest else None


@dataclass(frozen=True)
class MapReference:
    """A Parametric Map of one label's heat, as the SR refers to it.

    Attributes:
        label: The label whose heat it maps.
        dataset: The map (its UIDs, size and Frame of Reference are read).
    """

    label: str
    dataset: Dataset


def _map_group(
    reference: MapReference, scores: FrameScores, model: ModelIdentity, source: Dataset, measured_on: Dataset
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The measurement group of one mapped label: the finding, its decision, the eye and the map of its heat."""
    import highdicom as hd

    card = model.card
    words = _vocabulary(tuple(card.labels))
    index = card.labels.index(reference.label)
    values = _checked(scores, card)
    if not values:
        raise ValueError(f"maps: the map of {reference.label} belongs to a frame that was not graded")
    decision = words.present if values[index] >= card.thresholds[index] else words.absent
    frame_key = str(scores.frame_number or 1)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", str(source.SOPInstanceUID), model.sha256, frame_key, reference.label),
            identifier=f"RetinaGate {model.name} frame {frame_key} {reference.label} heatmap"[:64],
        ),
        finding_type=words.labels[index],
        algorithm_id=_algorithm(model),
        finding_sites=finding_sites(eye_of(source)),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=words.labels[index], value=decision)],
        source_images=[_source_image(scores, source, measured_on)],
    )
    pm = reference.dataset
    group[0].ContentSequence.append(
        hd.sr.ImageContentItem(
            name=HEATMAP,
            referenced_sop_class_uid=str(pm.SOPClassUID),
            referenced_sop_instance_uid=str(pm.SOPInstanceUID),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _library_entry(ds: Dataset, eye: str) -> hd.sr.ContainerContentItem:
    """One Image Library Group (TID 1601) holding one image with its descriptors (TID 1602) and laterality.

    highdicom's :class:`~highdicom.sr.ImageLibraryEntryDescriptors` describes the images whose SOP
    class it maps to a modality; the Parametric Map is not among them, so its descriptors (modality,
    Frame of Reference, rows, columns) are written here with highdicom's content items.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    relation = hd.sr.RelationshipTypeValues
    extra = []
    if eye in _LATERALITY:
        side = _LATERALITY[eye]
        extra.append(hd.sr.CodeContentItem(_IMAGE_LATERALITY, side, relationship_type=relation.HAS_ACQ_CONTEXT))
    descriptors: hd.sr.ContentSequence
    if str(ds.SOPClassUID) == PARAMETRIC_MAP_STORAGE:
        pixels = hd.sr.CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
        context = relation.HAS_ACQ_CONTEXT
        items: list[hd.sr.ContentItem] = [
            hd.sr.CodeContentItem(name=codes.DCM.Modality, value=codes.DCM.Other, relationship_type=context)
        ]
        if "FrameOfReferenceUID" in ds:
            reference = str(ds.FrameOfReferenceUID)
            items.append(hd.sr.UIDRefContentItem(codes.DCM.FrameOfReferenceUID, reference, relationship_type=context))
        items += [
            hd.sr.NumContentItem(name=name, value=value, unit=pixels, relationship_type=context)
            for name, value in ((codes.DCM.PixelDataRows, ds.Rows), (codes.DCM.PixelDataColumns, ds.Columns))
        ]
        descriptors = hd.sr.ContentSequence([*items, *extra])
    else:
        descriptors = hd.sr.ImageLibraryEntryDescriptors(ds, additional_descriptors=extra)
    image = hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT"),  # as highdicom names it
        referenced_sop_class_uid=str(ds.SOPClassUID),
        referenced_sop_instance_uid=str(ds.SOPInstanceUID),
        relationship_type=relation.CONTAINS,
    )
    image.ContentSequence = descriptors
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=relation.CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence([image])
    return group


def _image_library(images: Sequence[Dataset], eye: str) -> hd.sr.ContainerContentItem:
    """The Image Library (TID 1600): a group per image, each entry with its Image Laterality."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([_library_entry(ds, eye) for ds in images])
    return library


def build_report(
    source: Dataset,
    model: ModelIdentity,
    frames: Sequence[FrameScores],
    *,
    sc: Dataset | None = None,
    maps: Sequence[MapReference] = (),
    shown_frame: int = 0,
    references_source: bool = True,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree (see :func:`build_sr`)."""
    import highdicom as hd

    if not frames:
        raise ValueError("frames: expected the scores of at least one frame")
    if not 0 <= shown_frame < len(frames):
        raise ValueError(f"shown_frame is {shown_frame}; expected 0 to {len(frames) - 1}")
    measured_on = source if references_source else sc
    if measured_on is None:
        raise ValueError("sc: a plain image file has no DICOM source, so the SR must reference the Secondary Capture")
    groups = [_group(f, model, source, measured_on) for f in frames]
    summary = photograph_summary(frames, model.card)
    if summary:
        # The photograph's result as the SC, `retinagate score` and `results` word it (DCM 121111 Summary),
        # in the group of the frame shown.
        contains = hd.sr.RelationshipTypeValues.CONTAINS
        groups[shown_frame][0].ContentSequence.append(hd.sr.TextContentItem(_SUMMARY, summary, contains))
    groups += [_map_group(m, frames[shown_frame], model, source, measured_on) for m in maps]
    report = hd.sr.MeasurementReport(
        observation_context=model.observation_context(),
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
    )
    # The library goes where highdicom puts its own: before the Imaging Measurements.
    content = report[0].ContentSequence
    at = next(i for i, item in enumerate(content) if _concept(item) == (_MEASUREMENTS, "DCM"))
    content.insert(at, _image_library(_evidence_of(source, sc, maps, references_source), eye_of(source)))
    return report


def _evidence_of(
    source: Dataset, sc: Dataset | None, maps: Sequence[MapReference], references_source: bool
) -> list[Dataset]:
    """The instances the SR references, in Image Library order: the source, the SC, the maps."""
    return [d for d in ((source if references_source else None), sc, *(m.dataset for m in maps)) if d is not None]


def build_sr(
    source: Dataset,
    model: ModelIdentity,
    frames: Sequence[FrameScores],
    *,
    sc: Dataset | None = None,
    maps: Sequence[MapReference] = (),
    shown_frame: int = 0,
    references_source: bool = True,
) -> hd.sr.ComprehensiveSR:
    """Builds the Comprehensive SR of one scored instance.

    Args:
        source: Header of the scored instance (patient, study, UIDs, laterality); for a plain image
            file, the synthetic header the pipeline made for it.
        model: The model that scored it.
        frames: Scores of each frame, in frame order.
        sc: The heatmap Secondary Capture made for the same instance, referenced and listed as
            evidence (required when ``references_source`` is False).
        maps: The Parametric Maps made for the same instance, each the heatmap of its label: each
            gets its finding's measurement group and an Image Library entry.
        shown_frame: Index in ``frames`` of the frame the maps were made from.
        references_source: Whether ``source`` is a real DICOM instance to reference; False for the
            synthetic header of a PNG or JPEG file, whose measurements then refer to the SC (the
            only DICOM picture of that photograph).

    Returns:
        The SR document (Explicit VR Little Endian), UNVERIFIED and PRELIMINARY.

    Raises:
        ValueError: If a frame has the wrong number of probabilities, one is outside 0-1, a map
            belongs to a frame that was not graded, or a required reference is missing.
    """

    report = build_report(source, model, frames, sc=sc, maps=maps, shown_frame=shown_frame,
                          references_source=references_source)  # fmt: skip
    root = report[0]
    content = root.ContentSequence
    # Construct around a root holding only the Image Library (see the module docstring); every
    # instance the full tree references is in the library, so the evidence comes out the same.
    root.ContentSequence = [item for item in content if _is_library(item)]
    evidence = _evidence_of(source, sc, maps, references_source)
    series = OutputSeries.of(source, model.sha256, KIND, SERIES_NUMBER)
    try:
        sr = unverified_sr(
            model,
            evidence=evidence,
            content=root,
            series_instance_uid=series.uid,
            series_number=series.number,
            sop_instance_uid=output_uid(str(source.SOPInstanceUID), model.sha256, KIND),
            instance_number=instance_number(source),
            series_description=series.description(model, _WHAT),
        )
    finally:
        root.ContentSequence = content
    sr.ContentSequence = content
    sr._content = report  # keeps highdicom's view of the content consistent with the dataset
    return sr


def _is_library(item: Dataset) -> bool:
    names = item.get("ConceptNameCodeSequence") or []
    return bool(names) and names[0].get("CodeValue") == "111028"  # DCM 111028 Image Library


# The fast path (see the module docstring).

_CONTENT_SEQUENCE: Final = 0x0040A730
_UID: Final = 0x0040A124
_NUMERIC_VALUE: Final = 0x0040A30A
_FLOATING_POINT_VALUE: Final = 0x0040A161
_TEXT_VALUE: Final = 0x0040A160
_TRACKING_UID: Final = "112040"  # DCM Tracking Unique Identifier
_FRAME_OF_REFERENCE: Final = "112227"  # DCM Frame of Reference UID
_MEASUREMENTS: Final = "126010"  # DCM Imaging Measurements

#: What highdicom's SOPClass takes from the first evidence item, as ``evidence[0].<keyword>``: a
#: source without one of these goes the slow way (and gets highdicom's error).
_FROM_SOURCE: Final = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                       "AccessionNumber", "StudyID", "StudyDate", "StudyTime")  # fmt: skip
#: Top-level attributes that differ per document and are therefore not template constants.
_PER_DOCUMENT: Final = frozenset(
    Tag(k)
    for k in (
        *_FROM_SOURCE, "ReferringPhysicianName", "SpecificCharacterSet", "InstanceCreationDate",
        "InstanceCreationTime", "ContentDate", "ContentTime", "SOPInstanceUID", "SeriesInstanceUID",
        "SeriesNumber", "SeriesDescription", "InstanceNumber", "ContributingEquipmentSequence",
        "CurrentRequestedProcedureEvidenceSequence",
        "PertinentOtherEvidenceSequence", "ContentSequence",
    )
)  # fmt: skip
#: What :class:`highdicom.sr.ImageLibraryEntryDescriptors` reads of a referenced image, but its UIDs
#: (the Frame of Reference UID is a slot of the library's template).
_LIBRARY_KEYS: Final = ("SOPClassUID", "Rows", "Columns", "PatientOrientation",
                        "ImagerPixelSpacing", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
                        "SliceThickness")  # fmt: skip


class _Recorder(Dataset):
    """A source holding only its SOP class and instance UIDs that records every other tag looked up in it."""

    def __init__(self, sop_class_uid: str) -> None:
        super().__init__()
        self.looked_up: set[int] = set()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = "2.25.0"

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, slice):
            self.looked_up.add(int(Tag(key)))
        return super().__getitem__(key)


@lru_cache(maxsize=32)
def _copied_tags(sop_class_uid: str) -> frozenset[int]:
    """Tags highdicom copies from a source of this SOP class: root attributes of its Patient and Study modules.

    Found once per SOP class by letting highdicom's public
    :meth:`highdicom.SOPClass.copy_patient_and_study_information` copy from a source that records
    which tags are asked for (and holds none of them), so this is highdicom's own list.

    Raises:
        KeyError: If highdicom does not know the SOP class.
    """
    import highdicom as hd

    target = hd.SOPClass(
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        series_number=1,
        sop_instance_uid="2.25.3",
        sop_class_uid=sop_class_uid,
        instance_number=1,
        modality="OT",
    )
    probe = _Recorder(sop_class_uid)
    held = {int(tag) for tag in probe.keys()}  # noqa: SIM118 - iterating a Dataset yields elements
    probe.looked_up.clear()
    target.copy_patient_and_study_information(probe)
    return frozenset(probe.looked_up - held)


def _signature(ds: Dataset, keywords: Sequence[str]) -> tuple[str, ...]:
    return tuple(repr(ds.get(k)) for k in keywords)


def _sop_reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


@dataclass(frozen=True)
class _Template:
    """One kind of SR document, compiled: what is the same for every image, and where the rest goes."""

    file_meta: FileMetaDataset
    constants: tuple[tuple[int, bytes], ...]
    content: ByteTemplate
    character_set: Any
    encodings: list[str]


class SrEncoder:
    """Encodes the SR of one model from byte templates; same document as :func:`build_sr`, Part 10 bytes.

    Templates are made on first use for each kind of input and kept (a handful per model); one
    encoder may be used from several threads.

    Args:
        model: The model whose SR documents it writes.
    """

    def __init__(self, model: ModelIdentity) -> None:
        self.model = model
        self._templates: dict[tuple[object, ...], _Template] = {}
        self._libraries: dict[tuple[object, ...], ByteTemplate] = {}
        self._map_groups: dict[tuple[object, ...], ByteTemplate] = {}
        self._lock = threading.Lock()
        self._processing: Dataset | None = None
        self._decisions: tuple[bytes, bytes] | None = None

    def encode(
        self,
        source: Dataset,
        frames: Sequence[FrameScores],
        *,
        sc: Dataset | None = None,
        maps: Sequence[MapReference] = (),
        shown_frame: int = 0,
        references_source: bool = True,
    ) -> BuiltOutput:
        """The SR, built: its UIDs and Part 10 bytes; arguments and errors as :func:`build_sr`."""
        card = self.model.card
        if not frames:
            raise ValueError("frames: expected the scores of at least one frame")
        if not 0 <= shown_frame < len(frames):
            raise ValueError(f"shown_frame is {shown_frame}; expected 0 to {len(frames) - 1}")
        values = [_checked(f, card) for f in frames]
        measured_on = source if references_source else sc
        if measured_on is None:
            raise ValueError(
                "sc: a plain image file has no DICOM source, so the SR must reference the Secondary Capture"
            )
        uid = output_uid(str(source.SOPInstanceUID), self.model.sha256, KIND)
        series = OutputSeries.of(source, self.model.sha256, KIND, SERIES_NUMBER)
        evidence = _evidence_of(source, sc, maps, references_source)
        # highdicom takes the patient, study and acquisition equipment from the first evidence item.
        first = evidence[0]
        # A frame not graded carries reasons whose wording varies: no template, highdicom directly.
        if any(f.not_graded for f in frames) or not self._fast_path_applies(first):
            document = build_sr(source, self.model, frames, sc=sc, maps=maps, shown_frame=shown_frame,
                                references_source=references_source)  # fmt: skip
            return BuiltOutput(KIND, uid, series.uid, COMPREHENSIVE_SR, part10(document), document)

        # highdicom checks and normalises the character set when it builds the template's document;
        # every source with the same raw value gets that result.
        frame_numbers = tuple(f.frame_number for f in frames)
        eye = eye_of(source)
        key = (frame_numbers, references_source, str(first.SOPClassUID), repr(first.get("SpecificCharacterSet")),
               None if sc is None else str(sc.SOPClassUID), eye, shown_frame)  # fmt: skip
        template = self._templates.get(key)
        if template is None:
            with self._lock:
                template = self._templates.get(key) or self._compile(
                    key, source, frames, sc=sc, shown_frame=shown_frame, references_source=references_source
                )
        character_set = template.character_set

        # Top level: as highdicom's SOPClass and _SR constructors set it.
        ds = Dataset()
        ds.file_meta = copy_with(template.file_meta, MediaStorageSOPInstanceUID=UID(uid))
        now = dt.datetime.now()
        ds.InstanceCreationDate = DA(now.date())
        ds.InstanceCreationTime = TM(now.time())
        ds.ContentDate = DA(now.date())
        ds.ContentTime = TM(now.time())
        if character_set is not None:
            ds.SpecificCharacterSet = character_set
        ds.SOPInstanceUID = uid
        ds.SeriesInstanceUID = series.uid
        ds.SeriesNumber = series.number
        ds.SeriesDescription = series.description(self.model, _WHAT)
        ds.InstanceNumber = instance_number(source)
        for keyword in _FROM_SOURCE:
            setattr(ds, keyword, first.get(keyword))
        ds.ReferringPhysicianName = first.get("ReferringPhysicianName")
        for tag in _copied_tags(str(first.SOPClassUID)):
            if tag in first:
                ds.add(first[tag])
        equipment = [self._processing_equipment(), library_equipment()]
        acquisition = acquisition_equipment(first)
        ds.ContributingEquipmentSequence = equipment if acquisition is None else [acquisition, *equipment]
        same, other = _evidence(evidence, str(first.StudyInstanceUID))
        if same:
            ds.CurrentRequestedProcedureEvidenceSequence = same
        if other:
            ds.PertinentOtherEvidenceSequence = other

        # Content: the template with this image's references and values.
        slots = {"library": self._library(evidence, eye, template.encodings)}
        present, absent = self._decision_bytes(template.encodings)
        sha = self.model.sha256
        for g, (scores, row) in enumerate(zip(frames, values, strict=True)):
            frame_key = str(scores.frame_number or 1)
            slots[f"track:{g}"] = uid_element(_UID, derived_uid("tracking", str(source.SOPInstanceUID), sha, frame_key))
            image = _source_image(scores, source, measured_on)
            slots[f"src:{g}"] = encode_element(image["ReferencedSOPSequence"], template.encodings)
            for i, (value, threshold) in enumerate(zip(row, card.thresholds, strict=True)):
                rounded = round(value, 6)
                slots[f"num:{g}:{i}"] = ds_element(_NUMERIC_VALUE, DSfloat(rounded, auto_format=True))
                slots[f"fp:{g}:{i}"] = fd_element(_FLOATING_POINT_VALUE, rounded)
                slots[f"code:{g}:{i}"] = present if value >= threshold else absent
        summary = photograph_summary(frames, card)
        slots["summary"] = encode_element(DataElement(_TEXT_VALUE, "UT", summary), template.encodings)
        slots["maps"] = b"".join(
            self._map_group(m, frames[shown_frame], source, measured_on, template.encodings) for m in maps
        )
        data = encode_part10(ds, [*template.constants, (_CONTENT_SEQUENCE, template.content.render(slots))])
        return BuiltOutput(KIND, uid, series.uid, COMPREHENSIVE_SR, data)

    @staticmethod
    def _fast_path_applies(source: Dataset) -> bool:
        """Whether the source has everything the template path copies, valid as highdicom checks it."""
        if any(k not in source for k in (*_FROM_SOURCE, "SOPClassUID", "SOPInstanceUID")):
            return False
        try:
            _copied_tags(str(source.SOPClassUID))
            DA(source.PatientBirthDate)
            DA(source.StudyDate)
            TM(source.StudyTime)
        except (KeyError, ValueError, TypeError):
            return False
        return str(source.PatientSex or "") in ("M", "F", "O", "")

    def _compile(
        self,
        key: tuple[object, ...],
        source: Dataset,
        frames: Sequence[FrameScores],
        *,
        sc: Dataset | None,
        shown_frame: int,
        references_source: bool,
    ) -> _Template:
        """Builds this kind of document with highdicom and compiles it into a template."""
        import highdicom as hd

        reference = build_sr(source, self.model, frames, sc=sc, shown_frame=shown_frame,
                             references_source=references_source)  # fmt: skip
        character_set = reference.get("SpecificCharacterSet")
        first = source if references_source or sc is None else sc
        variable = _PER_DOCUMENT | _copied_tags(str(first.SOPClassUID))
        encodings = encodings_of(character_set)
        constants = tuple((int(tag), encode_element(reference[tag], encodings)) for tag in sorted(reference.keys())
                          if tag not in variable)  # fmt: skip
        slots: dict[int, str] = {}
        codes_of = {probability_concept(n).value: i for i, n in enumerate(self.model.card.labels)}
        labels_of = {
            (c.value, c.scheme_designator): i for i, c in enumerate(map(label_concept, self.model.card.labels))
        }
        groups = 0
        for item in reference.ContentSequence:
            if _is_library(item):
                slots[id(item)] = "library"
                continue
            if _concept(item) != (_MEASUREMENTS, "DCM"):
                continue
            # Where the maps' measurement groups go (built per image): after the frames' groups.
            placeholder = hd.sr.ContainerContentItem(
                name=HEATMAP, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            item.ContentSequence.append(placeholder)
            slots[id(item.ContentSequence[-1])] = "maps"
            for g, group in enumerate(item.ContentSequence[:-1]):
                groups += 1
                for entry in group.ContentSequence:
                    value, scheme = _concept(entry)
                    kind = entry.ValueType
                    if kind == "UIDREF" and (value, scheme) == (_TRACKING_UID, "DCM"):
                        slots[id(entry[_UID])] = f"track:{g}"
                    elif kind == "TEXT" and (value, scheme) == (_SUMMARY.value, "DCM"):
                        slots[id(entry[_TEXT_VALUE])] = "summary"
                    elif kind == "IMAGE":
                        slots[id(entry["ReferencedSOPSequence"])] = f"src:{g}"
                    elif kind == "NUM" and scheme == CODING_SCHEME:
                        measured = entry.MeasuredValueSequence[0]
                        slots[id(measured[_NUMERIC_VALUE])] = f"num:{g}:{codes_of[value]}"
                        slots[id(measured[_FLOATING_POINT_VALUE])] = f"fp:{g}:{codes_of[value]}"
                    elif kind == "CODE" and (value, scheme) in labels_of:
                        slots[id(entry["ConceptCodeSequence"])] = f"code:{g}:{labels_of[value, scheme]}"
        content = compile_element(reference["ContentSequence"], slots, encodings)
        expected = 3 + groups * (2 + 3 * self.model.card.num_labels)  # library, maps, summary, the groups
        if groups != len(frames) or len(content.slots) != expected:
            raise RuntimeError(f"SR template: found {len(content.slots)} slots, expected {expected}")
        template = _Template(reference.file_meta, constants, content, character_set, encodings)
        self._templates[key] = template
        return template

    def _library(self, evidence: Sequence[Dataset], eye: str, encodings: list[str]) -> bytes:
        """The Image Library item for these referenced images (compiled once per kind of image and eye)."""
        key = (tuple((*_signature(d, _LIBRARY_KEYS), "FrameOfReferenceUID" in d) for d in evidence), eye,
               tuple(encodings))  # fmt: skip
        template = self._libraries.get(key)
        if template is None:
            item = _image_library(evidence, eye)
            slots: dict[int, str] = {}
            for j, group in enumerate(item.ContentSequence):  # one group per image, in evidence order
                (entry,) = group.ContentSequence
                slots[id(entry["ReferencedSOPSequence"])] = f"ref:{j}"
                for descriptor in entry.ContentSequence:
                    if _concept(descriptor) == (_FRAME_OF_REFERENCE, "DCM"):
                        slots[id(descriptor[_UID])] = f"for:{j}"
            template = compile_item(item, slots, encodings)
            expected = len(evidence) + sum("FrameOfReferenceUID" in d for d in evidence)
            if len(template.slots) != expected:
                raise RuntimeError(f"Image Library template: {len(template.slots)} slots for {expected}")
            self._libraries[key] = template
        values = {}
        for j, d in enumerate(evidence):
            values[f"ref:{j}"] = encode_element(DataElement(0x00081199, "SQ", [_sop_reference(d)]), encodings)
            if "FrameOfReferenceUID" in d:
                values[f"for:{j}"] = uid_element(_UID, str(d.FrameOfReferenceUID))
        return template.render(values)

    def _map_group(
        self, reference: MapReference, scores: FrameScores, source: Dataset, measured_on: Dataset, encodings: list[str]
    ) -> bytes:
        """The encoded measurement group of one map (compiled once per label, decision, eye and kind of frame)."""
        card = self.model.card
        index = card.labels.index(reference.label)
        present = _checked(scores, card)[index] >= card.thresholds[index]
        on_source = measured_on is source
        key = (reference.label, present, eye_of(source), scores.frame_number, on_source, str(measured_on.SOPClassUID),
               str(reference.dataset.SOPClassUID), tuple(encodings))  # fmt: skip
        template = self._map_groups.get(key)
        if template is None:
            (item,) = _map_group(reference, scores, self.model, source, measured_on)
            slots: dict[int, str] = {}
            for entry in item.ContentSequence:
                concept = _concept(entry)
                if entry.ValueType == "UIDREF" and concept == (_TRACKING_UID, "DCM"):
                    slots[id(entry[_UID])] = "track"
                elif entry.ValueType == "IMAGE":
                    heat = concept == (HEATMAP.value, HEATMAP.scheme_designator)
                    slots[id(entry["ReferencedSOPSequence"])] = "heat" if heat else "source"
            template = compile_item(item, slots, encodings)
            if template.slots != {"track", "source", "heat"}:
                raise RuntimeError(f"SR map group template: found slots {sorted(template.slots)}")
            self._map_groups[key] = template
        frame_key = str(scores.frame_number or 1)
        uid = derived_uid("tracking", str(source.SOPInstanceUID), self.model.sha256, frame_key, reference.label)
        image = _source_image(scores, source, measured_on)
        return template.render({
            "track": uid_element(_UID, uid),
            "source": encode_element(image["ReferencedSOPSequence"], encodings),
            "heat": encode_element(DataElement(0x00081199, "SQ", [_sop_reference(reference.dataset)]), encodings),
        })  # fmt: skip

    def _processing_equipment(self) -> Dataset:
        if self._processing is None:
            self._processing = self.model.contributing_equipment()
        return self._processing

    def _decision_bytes(self, encodings: list[str]) -> tuple[bytes, bytes]:
        """The encoded Concept Code Sequence of Present and of Absent."""
        if self._decisions is None:
            import highdicom as hd

            words = _vocabulary(tuple(self.model.card.labels))
            self._decisions = tuple(  # type: ignore[assignment]
                encode_element(hd.sr.QualitativeEvaluation(name=words.labels[0], value=v)[0]["ConceptCodeSequence"],
                               encodings)
                for v in (words.present, words.absent)
            )  # fmt: skip
        assert self._decisions is not None
        return self._decisions


def _concept(item: Dataset) -> tuple[str, str]:
    names = item.get("ConceptNameCodeSequence") or []
    if not names:
        return "", ""
    return str(names[0].get("CodeValue", "")), str(names[0].get("CodingSchemeDesignator", ""))


def _evidence(evidence: Sequence[Dataset], study_uid: str) -> tuple[list[Dataset], list[Dataset]]:
    """Current Requested Procedure and Pertinent Other Evidence items, grouped as highdicom groups them."""
    seen: set[str] = set()
    groups: tuple[dict[tuple[str, str], list[Dataset]], ...] = (defaultdict(list), defaultdict(list))
    for ds in evidence:
        if ds.SOPInstanceUID in seen:
            continue
        seen.add(ds.SOPInstanceUID)
        target = groups[0] if ds.StudyInstanceUID == study_uid else groups[1]
        target[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(_sop_reference(ds))

    def references(group: dict[tuple[str, str], list[Dataset]]) -> list[Dataset]:
        studies: dict[str, list[Dataset]] = defaultdict(list)
        for (study, series), items in group.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series
            series_item.ReferencedSOPSequence = items
            studies[study].append(series_item)
        out = []
        for study, series_items in studies.items():
            study_item = Dataset()
            study_item.StudyInstanceUID = study
            study_item.ReferencedSeriesSequence = series_items
            out.append(study_item)
        return out

    return references(groups[0]), references(groups[1])


class SrOutput:
    """The Comprehensive SR as an output kind (:class:`retinagate.outputs.kind.OutputKind`).

    It records every frame's scores (or why it was not graded) and refers to the Secondary Capture
    and the Parametric Maps built before it, if any (each map from its finding's measurement group).
    A plain image file has no DICOM source, so its SR needs the SC.

    Args:
        model: The model whose documents it writes.
        settings: Not used: the SR has no settings of its own.
    """

    name: ClassVar[str] = KIND
    display_resolution: ClassVar[bool] = False
    dicom_only: ClassVar[bool] = False

    def __init__(self, model: ModelIdentity, settings: Settings) -> None:
        self.encoder = SrEncoder(model)

    @classmethod
    def requires(cls, references_source: bool) -> tuple[str, ...]:
        """The SC for a plain image file (the only DICOM picture of it for the measurements to refer to)."""
        return () if references_source else (SC_KIND,)

    def build(self, photo: ScoredPhotograph) -> list[BuiltOutput]:
        """The SR of ``photo``."""
        sc = photo.first(SC_KIND)
        maps = [MapReference(o.label, o.read()) for o in photo.built if o.kind == PM_KIND]
        # The maps are of the shown frame: its place among the frames the SR records.
        shown = next((i for i, f in enumerate(photo.frame_scores) if f.frame_number == photo.frame_number), 0)
        document = self.encoder.encode(photo.header, photo.frame_scores, sc=None if sc is None else sc.read(),
                                       maps=maps, shown_frame=shown,
                                       references_source=photo.references_source)  # fmt: skip
        return [document]
