"""What was found, per study and image, read back from SQL for ``retinagate results``.

Per image: its status (``ungradable`` when the gradability gate refused it, with the reasons; when
storage retention removed the photograph, the day it did), the
findings of the active model (or, without one, of the newest prediction) with their probabilities,
which model made them, the latency of each stage from the
SQL timestamps (received, scored, delivered) and the delivery status at every destination.
Per study: each model's newest study report (:mod:`worker.study_reports`), its conclusion, each
eye's Disease_Risk and findings, and its delivery.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from retinagate.labels import DISEASE_RISK
from retinagate.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceStatus,
    Model,
    Output,
    Prediction,
    PredictionStatus,
    Study,
    StudyReport,
)
from retinagate.outputs.findings import NO_FINDING, probability_text, summary_text

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "DestinationStatus",
    "ImageResult",
    "ReportResult",
    "StudyResult",
    "format_results",
    "query_results",
    "to_jsonable",
]

#: The worst status among a destination's outputs decides the destination's status.
_SEVERITY = {
    DeliveryStatus.DELIVERED: 0,
    DeliveryStatus.PENDING: 1,
    DeliveryStatus.RETRYING: 2,
    DeliveryStatus.FAILED: 3,
}


@dataclass(frozen=True)
class DestinationStatus:
    """Delivery of one image's outputs to one destination."""

    destination: str
    status: str
    attempts: int
    last_error: str | None
    delivered_at: datetime | None


@dataclass(frozen=True)
class ImageResult:
    """One instance: status, findings (or why it was not graded), model, stage latencies and deliveries."""

    instance_id: int
    sop_instance_uid: str
    laterality: str | None
    status: str
    attempts: int
    last_error: str | None
    model: str | None
    findings: list[tuple[str, float]]
    top_probability: tuple[str, float] | None
    received_at: datetime
    scored_at: datetime | None
    delivered_at: datetime | None
    deliveries: list[DestinationStatus] = field(default_factory=list)
    #: Why the gradability gate refused it (status ``ungradable``), from the prediction shown.
    reasons: list[str] = field(default_factory=list)
    #: Each finding's threshold in the model's card, so the text prints its probability on the right side.
    thresholds: dict[str, float] = field(default_factory=dict)
    #: When storage retention removed the received photograph (its results stay).
    pruned_at: datetime | None = None
    #: What the result says, as the SC, the SR and ``retinagate score`` word it (empty when not scored).
    summary: str = ""

    @property
    def scored_after_s(self) -> float | None:
        """Seconds from receipt to the prediction."""
        return (self.scored_at - self.received_at).total_seconds() if self.scored_at else None

    @property
    def delivered_after_s(self) -> float | None:
        """Seconds from receipt to the last output delivered everywhere (None until all are)."""
        return (self.delivered_at - self.received_at).total_seconds() if self.delivered_at else None


@dataclass(frozen=True)
class ReportResult:
    """A model's newest study report of a study: conclusion, eyes, delivery."""

    model: str
    revision: int
    conclusion: str
    #: Per eye (R, L, B, U): gradable, photographs, disease_risk, findings as [label, probability].
    eyes: dict[str, Any]
    created_at: datetime
    deliveries: list[DestinationStatus] = field(default_factory=list)
    #: The model's thresholds of the labels shown, so the text prints each probability on its side.
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyResult:
    """A study, its images and its study reports."""

    study_uid: str
    accession: str | None
    images: list[ImageResult]
    reports: list[ReportResult] = field(default_factory=list)


def _pick(predictions: list[Prediction], active_id: int | None) -> Prediction | None:
    for prediction in predictions:
        if prediction.model_id == active_id:
            return prediction
    return max(predictions, key=lambda p: p.created_at, default=None)


def _destinations(outputs: list[Output]) -> tuple[list[DestinationStatus], datetime | None]:
    by_destination: dict[str, list[Delivery]] = defaultdict(list)
    for output in outputs:
        for delivery in output.deliveries:
            by_destination[delivery.destination].append(delivery)
    statuses = []
    all_delivered: list[datetime] = []
    complete = bool(by_destination)
    for destination, rows in sorted(by_destination.items()):
        worst = max(rows, key=lambda d: (_SEVERITY[d.status], d.attempts))
        stamps = [d.delivered_at for d in rows if d.delivered_at is not None]
        done = all(d.status == DeliveryStatus.DELIVERED for d in rows)
        complete = complete and done
        all_delivered += stamps
        statuses.append(
            DestinationStatus(
                destination=destination,
                status=worst.status.value,
                attempts=max(d.attempts for d in rows),
                last_error=worst.last_error,
                delivered_at=max(stamps) if done and stamps else None,
            )
        )
    return statuses, (max(all_delivered) if complete and all_delivered else None)


def _thresholds(card: dict[str, Any], names: list[str]) -> dict[str, float]:
    """The card's threshold for each of ``names`` (a card without them gives none)."""
    labels, values = card.get("labels") or [], card.get("thresholds") or []
    known = dict(zip(labels, values, strict=False))
    return {name: float(known[name]) for name in names if name in known}


def query_results(
    session: Session, *, study_uid: str | None = None, since: datetime | None = None
) -> list[StudyResult]:
    """Studies (one, or those with instances received since a time, or all) with their images.

    Args:
        study_uid: Only this study.
        since: Only instances received at or after this time.
    """
    active_id = session.scalar(select(Model.id).where(Model.active.is_(True)).limit(1))
    query = (
        select(Instance)
        .join(Study, Study.id == Instance.study_id)
        .options(
            selectinload(Instance.study),
            selectinload(Instance.predictions).selectinload(Prediction.model),
            selectinload(Instance.predictions).selectinload(Prediction.outputs).selectinload(Output.deliveries),
        )
        .order_by(Study.study_uid, Instance.received_at, Instance.id)
    )
    if study_uid is not None:
        query = query.where(Study.study_uid == study_uid)
    if since is not None:
        query = query.where(Instance.received_at >= since)

    studies: dict[int, StudyResult] = {}
    for instance in session.scalars(query):
        prediction = _pick(list(instance.predictions), active_id)
        deliveries: list[DestinationStatus] = []
        delivered_at = None
        findings: list[tuple[str, float]] = []
        top = None
        reasons: list[str] = []
        thresholds: dict[str, float] = {}
        summary = ""
        if prediction is not None:
            deliveries, delivered_at = _destinations(prediction.outputs)
            probabilities = {k: float(v) for k, v in prediction.probabilities.items()}
            findings = [(name, probabilities.get(name, float("nan"))) for name in prediction.findings]
            top_name = max(probabilities, key=lambda k: probabilities[k], default=None)
            top = (top_name, probabilities[top_name]) if top_name is not None else None
            if prediction.status == PredictionStatus.UNGRADABLE:
                reasons, top = [str(r) for r in prediction.reasons], None
            thresholds = _thresholds(prediction.model.card, prediction.findings)
            every = _thresholds(prediction.model.card, list(prediction.model.card.get("labels") or []))
            if prediction.status != PredictionStatus.UNGRADABLE and every:  # a card without thresholds: findings
                summary = summary_text(probabilities, every)
        image = ImageResult(
            instance_id=instance.id,
            sop_instance_uid=instance.sop_instance_uid,
            laterality=instance.laterality,
            status=instance.status.value,
            attempts=instance.attempts,
            last_error=instance.last_error,
            model=f"{prediction.model.name} {prediction.model.version}" if prediction is not None else None,
            findings=findings,
            top_probability=top,
            received_at=instance.received_at,
            scored_at=prediction.created_at if prediction is not None else None,
            delivered_at=delivered_at,
            deliveries=deliveries,
            reasons=reasons if instance.status == InstanceStatus.UNGRADABLE else [],
            thresholds=thresholds,
            pruned_at=instance.pruned_at,
            summary=summary,
        )
        study = studies.get(instance.study_id)
        if study is None:
            study = studies[instance.study_id] = StudyResult(instance.study.study_uid, instance.study.accession, [])
        study.images.append(image)
    _add_reports(session, studies)
    return list(studies.values())


def _add_reports(session: Session, studies: dict[int, StudyResult]) -> None:
    """Adds each model's newest study report to the studies, oldest model first."""
    query = (
        select(StudyReport)
        .where(StudyReport.study_id.in_(list(studies)))
        .options(selectinload(StudyReport.model), selectinload(StudyReport.outputs).selectinload(Output.deliveries))
        .order_by(StudyReport.study_id, StudyReport.model_id, StudyReport.revision.desc())
    )
    seen: set[tuple[int, int]] = set()
    for report in session.scalars(query):
        if (report.study_id, report.model_id) in seen:
            continue
        seen.add((report.study_id, report.model_id))
        deliveries, _ = _destinations(report.outputs)
        shown = [str(name) for eye in report.eyes.values() for name, _ in eye.get("findings", [])]
        studies[report.study_id].reports.append(
            ReportResult(
                model=f"{report.model.name} {report.model.version}",
                revision=report.revision,
                conclusion=report.conclusion.value,
                eyes=dict(report.eyes),
                created_at=report.created_at,
                deliveries=deliveries,
                thresholds=_thresholds(report.model.card, [DISEASE_RISK, *shown]),
            )
        )


def _report_line(report: ReportResult) -> str:
    """``study report (model m 1, revision 1): refer | R: Finding: ...; Disease risk ... | L: Not graded | ...``,
    each eye worded as an image is (:meth:`retinagate.outputs.study.EyeResult.summary`)."""
    from retinagate.models import StudyConclusion
    from retinagate.outputs.study import CONCLUSION_CODES, EyeResult

    eyes = [f"{eye}: {EyeResult.from_json(eye, data).summary(report.thresholds)}" for eye, data in report.eyes.items()]
    sent = "; ".join(f"{d.destination} {d.status}" for d in report.deliveries) or "not sent"
    conclusion = CONCLUSION_CODES[StudyConclusion(report.conclusion)].meaning.lower()
    return (
        f"  study report (model {report.model}, revision {report.revision}): {conclusion} | {' | '.join(eyes)} | {sent}"
    )


def to_jsonable(results: list[StudyResult]) -> list[dict[str, Any]]:
    """The results as JSON-ready data (times in ISO 8601, latencies in seconds)."""

    def convert(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value

    out = []
    for study in results:
        data = convert(asdict(study))
        for image, raw in zip(data["images"], study.images, strict=True):
            image.pop("thresholds")
            image["findings"] = [{"label": n, "probability": p} for n, p in raw.findings]
            image["top_probability"] = (
                {"label": raw.top_probability[0], "probability": raw.top_probability[1]}
                if raw.top_probability
                else None
            )
            image["latency_s"] = {"scored": raw.scored_after_s, "delivered": raw.delivered_after_s}
        out.append(data)
    return out


def _latency(stage: str, seconds: float | None) -> str:
    """``scored +1.2s``, or ``not scored`` for a stage not reached (yet)."""
    return f"not {stage}" if seconds is None else f"{stage} +{seconds:.1f}s"


def format_results(results: list[StudyResult]) -> str:
    """A plain-text table: one block per study, one line per image."""
    if not results:
        return "no results"
    lines = []
    for study in results:
        accession = f" (accession {study.accession})" if study.accession else ""
        lines.append(f"study {study.study_uid}{accession}: {len(study.images)} image(s)")
        lines += [_report_line(report) for report in study.reports]
        for image in study.images:
            if image.status == InstanceStatus.UNGRADABLE.value:
                found = "not graded: " + ("; ".join(image.reasons) or "-")
            elif image.summary:
                found = image.summary
            elif image.findings:
                found = ", ".join(
                    f"{name} {probability_text(p, image.thresholds[name]) if name in image.thresholds else f'{p:.2f}'}"
                    for name, p in image.findings
                )
            elif image.top_probability is not None:
                found = f"{NO_FINDING} (top {image.top_probability[0]} {image.top_probability[1]:.2f})"
            else:
                found = "-"
            sent = "; ".join(f"{d.destination} {d.status}" for d in image.deliveries) or "not sent"
            pruned = f", photograph pruned {image.pruned_at.date().isoformat()}" if image.pruned_at else ""
            lines.append(
                f"  {image.sop_instance_uid} {image.laterality or '-'} {image.status}"
                f"{' (' + (image.last_error or '') + ')' if image.status in ('failed', 'skipped') else ''}{pruned}"
                f" | {found} | model {image.model or '-'}"
                f" | {_latency('scored', image.scored_after_s)}, {_latency('delivered', image.delivered_after_s)}"
                f" | {sent}"
            )
    return "\n".join(lines)
