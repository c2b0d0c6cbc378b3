"""The study report: one Comprehensive SR per complete study and model, for both eyes, with a conclusion.

Written once a study is complete (no new instance for ``study_quiet_seconds``, every instance
scored, ungradable or failed under the model; :mod:`worker.study_reports` decides when), from the
predictions of all its photographs. It is an output kind of its own shape: built per study, not
per photograph, so it does not implement :class:`retinagate.outputs.kind.OutputKind`, but it hands
back the same :class:`~retinagate.outputs.kind.BuiltOutput`, is stored as an output row and is
delivered like every other output.

Per eye (the photographs' laterality: R, L, B, or U when a photograph states none) the report
gives the highest Disease_Risk probability over the eye's gradable photographs and each label that
is a finding (at or over its calibrated threshold, :func:`retinagate.outputs.findings.findings_of`)
on at least one of them, with its highest probability; an eye none of whose photographs was
gradable says "Not graded". Then the study's conclusion, by this rule (:func:`conclude`):

- **refer** when any gradable eye has a finding: Disease_Risk or any disease label (``OTHER``
  included) at or over its threshold;
- **ungradable** when no eye has a gradable photograph;
- **no referable finding** otherwise.

A photograph that failed (it could not be read) adds nothing, and an eye seen only on failed
photographs is not listed: the rule speaks of what the model saw.

Content (TID 1500 through highdicom's public SR templates): one measurement group (TID 1501) per eye
with a Finding Site of Eye (SCT 81745001) and its laterality when stated, as the per-photograph SR
names it (:func:`retinagate.outputs.sr.finding_sites`); the Disease_Risk probability and the
findings' probabilities as measurements (unit ``1``), each finding as a qualitative evaluation
Present, and the eye's photographs as its source images; then one group for the study whose
qualitative evaluation Conclusion (DCM 121077) carries the conclusion (codes of the ``99RETINAGATE``
scheme: REFER, NO-REFERABLE, UNGRADABLE) and whose text says why. The Image Library lists every
photograph. The label concepts are the per-photograph SR's (:func:`retinagate.outputs.sr.label_concept`).

Identity: the document goes in the study, in one series per (study, model file, kind), Series
Number 9904; its SOP Instance UID is derived from (study, model file, kind, revision), so a re-run
writes the same object. Revision 1 is the first report of a study by a model; a later one (new
photographs arrived after the report, see :mod:`worker.study_reports`) is a new object in the same
series, its Instance Number the revision, and names the revision before it in its Predecessor Documents
Sequence (PS3.3 C.17.2), so a viewer can show which report it amends. The document is UNVERIFIED and
PRELIMINARY.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pydicom.sr.coding import Code

from retinagate.labels import DISEASE_RISK
from retinagate.models import StudyConclusion
from retinagate.outputs.encoding import part10
from retinagate.outputs.findings import summary_text
from retinagate.outputs.identity import MANUFACTURER, ModelIdentity, derived_uid, eye_of
from retinagate.outputs.kind import BuiltOutput
from retinagate.outputs.sr import (
    CODING_SCHEME,
    COMPREHENSIVE_SR,
    GRADABILITY,
    NOT_GRADED,
    finding_sites,
    label_concept,
    probability_concept,
    unverified_sr,
)

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom.dataset import Dataset

__all__ = [
    "CONCLUSION_CODES",
    "EYES",
    "KIND",
    "SERIES_NUMBER",
    "EyeResult",
    "Photograph",
    "build_study_report",
    "conclude",
    "eye_results",
    "report_series_uid",
    "report_uid",
    "why",
]

#: The kind's name in SQL and the registry (:data:`retinagate.outputs.registry.STUDY_KINDS`).
KIND: Final = "study"

#: Series Number of the study reports.
SERIES_NUMBER: Final = 9904

#: Eyes in report order, with what the report calls them.
EYES: Final = {"R": "right eye", "L": "left eye", "B": "both eyes", "U": "eye not stated"}

#: The conclusion's codes (local scheme; no standard code says "refer" for a screening result).
CONCLUSION_CODES: Final = {
    StudyConclusion.REFER: Code("REFER", CODING_SCHEME, "Refer"),
    StudyConclusion.NO_REFERABLE: Code("NO-REFERABLE", CODING_SCHEME, "No referable finding"),
    StudyConclusion.UNGRADABLE: Code("UNGRADABLE", CODING_SCHEME, "Ungradable"),
}

_PROCEDURE: Final = Code("OP", "DCM", "Ophthalmic Photography")
_CONCLUSION: Final = Code("121077", "DCM", "Conclusion")


@dataclass(frozen=True)
class Photograph:
    """One photograph's prediction as the study report reads it.

    Attributes:
        eye: R, L, B or U (:func:`retinagate.outputs.identity.eye_of`).
        gradable: Whether the gradability gate let it through.
        probabilities: Label to probability (empty when not gradable).
        findings: Labels at or over their threshold (the prediction's findings).
    """

    eye: str
    gradable: bool
    probabilities: Mapping[str, float]
    findings: Sequence[str]


@dataclass(frozen=True)
class EyeResult:
    """What the report says of one eye.

    Attributes:
        eye: R, L, B or U.
        photographs: Its photographs with a prediction (gradable or not).
        gradable: Whether at least one of them was gradable.
        disease_risk: The highest Disease_Risk probability over its gradable photographs; ``None``
            when none was gradable or the model has no Disease_Risk label.
        findings: Each label that is a finding on at least one gradable photograph, with its highest
            probability, most probable first.
    """

    eye: str
    photographs: int
    gradable: bool
    disease_risk: float | None
    findings: tuple[tuple[str, float], ...]

    def to_json(self) -> dict[str, Any]:
        """As stored in ``study_reports.eyes``."""
        return {
            "photographs": self.photographs,
            "gradable": self.gradable,
            "disease_risk": self.disease_risk,
            "findings": [[name, probability] for name, probability in self.findings],
        }

    def summary(self, thresholds: Mapping[str, float]) -> str:
        """The eye's result worded as a photograph's is (:func:`retinagate.outputs.findings.summary_text`),
        from its highest probabilities; ``Not graded`` when none of its photographs was gradable."""
        if not self.gradable:
            return "Not graded"
        probabilities = dict(self.findings)
        if self.disease_risk is not None:
            probabilities[DISEASE_RISK] = self.disease_risk
        return summary_text(probabilities, thresholds)

    @classmethod
    def from_json(cls, eye: str, data: Mapping[str, Any]) -> EyeResult:
        """The inverse of :meth:`to_json`."""
        risk = data.get("disease_risk")
        return cls(
            eye=eye,
            photographs=int(data["photographs"]),
            gradable=bool(data["gradable"]),
            disease_risk=None if risk is None else float(risk),
            findings=tuple((str(name), float(p)) for name, p in data.get("findings", [])),
        )


def eye_results(photographs: Iterable[Photograph]) -> list[EyeResult]:
    """Each eye's result, in the order right, left, both, not stated; eyes without photographs left out."""
    by_eye: dict[str, list[Photograph]] = {}
    for photo in photographs:
        if photo.eye not in EYES:
            raise ValueError(f"eye is {photo.eye!r}; expected one of {', '.join(EYES)}")
        by_eye.setdefault(photo.eye, []).append(photo)
    results = []
    for eye in EYES:
        photos = by_eye.get(eye)
        if not photos:
            continue
        graded = [p for p in photos if p.gradable]
        risks = [float(p.probabilities[DISEASE_RISK]) for p in graded if DISEASE_RISK in p.probabilities]
        best: dict[str, float] = {}
        for photo in graded:
            for name in photo.findings:
                best[name] = max(best.get(name, 0.0), float(photo.probabilities[name]))
        findings = tuple(sorted(best.items(), key=lambda item: -item[1]))
        results.append(EyeResult(eye, len(photos), bool(graded), max(risks) if risks else None, findings))
    return results


def conclude(eyes: Sequence[EyeResult]) -> StudyConclusion:
    """The study's conclusion (the rule is in the module docstring).

    Raises:
        ValueError: If there is no eye to conclude on.
    """
    if not eyes:
        raise ValueError("eyes: a study report needs at least one eye with a prediction")
    gradable = [eye for eye in eyes if eye.gradable]
    if not gradable:
        return StudyConclusion.UNGRADABLE
    if any(eye.findings for eye in gradable):
        return StudyConclusion.REFER
    return StudyConclusion.NO_REFERABLE


def why(eyes: Sequence[EyeResult], conclusion: StudyConclusion, thresholds: Mapping[str, float]) -> str:
    """The conclusion in words, then each eye's result: ``Refer. Right eye: Finding: Diabetic retinopathy
    (DR) 0.80, threshold 0.50; Disease risk ... Left eye: Not graded.``"""
    said = " ".join(f"{EYES[eye.eye].capitalize()}: {eye.summary(thresholds)}." for eye in eyes)
    return f"{CONCLUSION_CODES[conclusion].meaning}. {said}"


def report_series_uid(study_instance_uid: str, model_sha256: str) -> str:
    """Series Instance UID of the study reports of one model in one study."""
    return derived_uid("series", study_instance_uid, model_sha256, KIND)


def report_uid(study_instance_uid: str, model_sha256: str, revision: int) -> str:
    """SOP Instance UID of revision ``revision`` of the study report of one model in one study.

    Raises:
        ValueError: If ``revision`` is below 1.
    """
    if revision < 1:
        raise ValueError(f"revision is {revision}; expected 1 or more")
    return derived_uid("instance", study_instance_uid, model_sha256, KIND, str(revision))


def _group(
    model: ModelIdentity,
    study_uid: str,
    revision: int,
    key: str,
    name: str,
    measurements: list[hd.sr.Measurement],
    evaluations: list[hd.sr.QualitativeEvaluation],
    *,
    eye: str | None = None,
    images: Sequence[Dataset] = (),
    text: str | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    import highdicom as hd

    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", study_uid, model.sha256, KIND, key, str(revision)),
            identifier=f"RetinaGate study report, {name}"[:64],
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name, version=model.version, parameters=model.algorithm_parameters(), manufacturer=MANUFACTURER
        ),
        finding_sites=None if eye is None else finding_sites(eye),
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(ds.SOPClassUID), referenced_sop_instance_uid=str(ds.SOPInstanceUID)
            )
            for ds in images
        ]
        or None,
    )
    if text is not None:
        # The conclusion as worded, for a reader: TID 1501 allows TEXT evaluations.
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=_CONCLUSION, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    return group


def build_study_report(
    sources: Sequence[Dataset],
    model: ModelIdentity,
    eyes: Sequence[EyeResult],
    revision: int = 1,
) -> BuiltOutput:
    """Builds the study report (see the module docstring).

    Args:
        sources: Headers of the study's photographs that the report covers (pixel data not needed),
            all of one study; the report takes the patient and study from the first.
        model: The model whose predictions it reports.
        eyes: Each eye's result (:func:`eye_results`).
        revision: 1 for the first report of the study by the model, then 2, 3, ... (each later one
            names the one before as its predecessor).

    Returns:
        The Comprehensive SR (Explicit VR Little Endian) as Part 10 bytes, with its dataset.

    Raises:
        ValueError: If there are no sources or no eyes, or the sources span several studies.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    if not sources:
        raise ValueError("sources: a study report needs the header of at least one photograph")
    study_uid = str(sources[0].StudyInstanceUID)
    if any(str(ds.StudyInstanceUID) != study_uid for ds in sources):
        raise ValueError("sources: the photographs of a study report must all be of one study")
    conclusion = conclude(eyes)
    thresholds = dict(zip(model.card.labels, model.card.thresholds, strict=True))
    unit = codes.UCUM.NoUnits
    groups = []
    for eye in eyes:
        measurements = []
        evaluations = []
        if eye.disease_risk is not None:
            measurements.append(
                hd.sr.Measurement(name=probability_concept(DISEASE_RISK), value=round(eye.disease_risk, 6), unit=unit)
            )
        for name, probability in eye.findings:
            if name != DISEASE_RISK:
                measurements.append(
                    hd.sr.Measurement(name=probability_concept(name), value=round(probability, 6), unit=unit)
                )
            evaluations.append(hd.sr.QualitativeEvaluation(name=label_concept(name), value=codes.SCT.Present))
        if not eye.gradable:
            evaluations.append(hd.sr.QualitativeEvaluation(name=GRADABILITY, value=NOT_GRADED))
        images = [ds for ds in sources if eye_of(ds) == eye.eye]
        groups.append(
            _group(
                model,
                study_uid,
                revision,
                eye.eye,
                EYES[eye.eye],
                measurements,
                evaluations,
                eye=eye.eye,
                images=images,
            )
        )
    verdict = hd.sr.QualitativeEvaluation(name=_CONCLUSION, value=CONCLUSION_CODES[conclusion])
    groups.append(
        _group(model, study_uid, revision, "study", "study", [], [verdict], text=why(eyes, conclusion, thresholds))
    )
    report = hd.sr.MeasurementReport(
        observation_context=model.observation_context(),
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=list(sources),
    )
    uid = report_uid(study_uid, model.sha256, revision)
    series_uid = report_series_uid(study_uid, model.sha256)
    predecessor = None
    if revision > 1:
        predecessor = Dataset()
        predecessor.StudyInstanceUID, predecessor.SeriesInstanceUID = study_uid, series_uid
        predecessor.SOPClassUID = COMPREHENSIVE_SR
        predecessor.SOPInstanceUID = report_uid(study_uid, model.sha256, revision - 1)
    sr = unverified_sr(
        model,
        evidence=list(sources),
        previous_versions=[predecessor] if predecessor is not None else None,
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=uid,
        instance_number=revision,
        series_description=f"{model.version} RetinaGate study report (unverified AI) {model.name}"[:64],
    )
    return BuiltOutput(KIND, uid, series_uid, COMPREHENSIVE_SR, part10(sr), sr)
