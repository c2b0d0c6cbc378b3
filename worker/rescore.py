"""Re-scoring stored instances under a new model, and the report of what changed.

A new model does not replace old predictions: each (instance, model) pair has its own prediction,
so the old one stays for comparison and audit. Re-scoring finds the scored instances in a time range
that have no prediction from the model, scores them (in batches, through the ``score`` task or inline
in ``retinagate rescore``), and the change report lists the instances whose findings differ between
the previously active model and the new one, with both probabilities for every label that changed.
Once its predictions cover a study, the new model writes its own study report of it
(:mod:`worker.study_reports`; inline, ``retinagate rescore`` writes them itself when it is done).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import exists, select
from sqlalchemy.orm import aliased

from retinagate.models import Instance, InstanceStatus, Model, Prediction, Study

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Settings
    from retinagate.storage import Storage
    from worker.scoring import ScoreOutcome, Scorer

__all__ = [
    "ChangeReport",
    "InstanceChange",
    "LabelChange",
    "ModelRef",
    "change_report",
    "find_unscored",
    "previous_model",
    "report_stem",
    "rescore_inline",
]

_CSV_COLUMNS = (
    "instance_id",
    "study_uid",
    "sop_instance_uid",
    "label",
    "old_probability",
    "new_probability",
    "old_present",
    "new_present",
)


def _in_range(query: Any, since: datetime | None, until: datetime | None) -> Any:
    if since is not None:
        query = query.where(Instance.received_at >= since)
    if until is not None:
        query = query.where(Instance.received_at < until)
    return query


def find_unscored(
    session: Session, model_id: int | None, since: datetime | None = None, until: datetime | None = None
) -> list[int]:
    """Ids of scored (or ungradable) instances received in ``[since, until)`` with no prediction from the model.

    Instances still on their way (received, queued, scoring) are left to the normal path, which
    scores them with the worker's model; failed ones failed for their input, not for the model.
    Ungradable ones are gated again: a new model's ``ood_score`` may accept what the old one refused.
    Instances whose photograph storage retention pruned (``pruned_at``) have nothing left to score.
    ``model_id`` None (a model not registered yet) means every scored or ungradable instance in range.
    """
    query = select(Instance.id).where(
        Instance.status.in_([InstanceStatus.SCORED, InstanceStatus.UNGRADABLE]), Instance.pruned_at.is_(None)
    )
    if model_id is not None:
        has_prediction = exists().where(Prediction.instance_id == Instance.id, Prediction.model_id == model_id)
        query = query.where(~has_prediction)
    return list(session.scalars(_in_range(query, since, until).order_by(Instance.id)))


def previous_model(session: Session, model: Model) -> Model | None:
    """The model that was active before ``model``: the most recently activated other one."""
    query = (
        select(Model)
        .where(Model.id != model.id, Model.activated_at.is_not(None))
        .order_by(Model.activated_at.desc(), Model.id.desc())
        .limit(1)
    )
    return session.scalar(query)


@dataclass(frozen=True)
class ModelRef:
    """A model as the report names it."""

    id: int
    name: str
    version: str
    sha256: str

    @classmethod
    def of(cls, model: Model) -> ModelRef:
        """The reference to a ``models`` row."""
        return cls(model.id, model.name, model.version, model.sha256)


@dataclass(frozen=True)
class LabelChange:
    """One label whose present/absent verdict differs between the two models."""

    label: str
    old_probability: float | None
    new_probability: float | None
    old_present: bool
    new_present: bool


@dataclass(frozen=True)
class InstanceChange:
    """An instance whose findings or gradability differ, with each label that changed."""

    instance_id: int
    study_uid: str
    sop_instance_uid: str
    old_findings: list[str]
    new_findings: list[str]
    labels: list[LabelChange]
    #: ``scored`` or ``ungradable`` (the gradability gate's verdict) under each model.
    old_status: str = "scored"
    new_status: str = "scored"


@dataclass
class ChangeReport:
    """Findings compared between two models over the instances both have scored."""

    old_model: ModelRef | None
    new_model: ModelRef
    compared: int = 0
    changed: list[InstanceChange] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (the JSON file's content)."""
        return {
            "old_model": asdict(self.old_model) if self.old_model else None,
            "new_model": asdict(self.new_model),
            "compared": self.compared,
            "changed_count": len(self.changed),
            "changed": [asdict(c) for c in self.changed],
        }

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """Writes ``<stem>.csv`` (one row per changed label) and ``<stem>.json`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = folder / f"{stem}.csv", folder / f"{stem}.json"
        with csv_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(_CSV_COLUMNS)
            for change in self.changed:
                for label in change.labels:
                    writer.writerow(
                        [
                            change.instance_id,
                            change.study_uid,
                            change.sop_instance_uid,
                            label.label,
                            "" if label.old_probability is None else f"{label.old_probability:.6f}",
                            "" if label.new_probability is None else f"{label.new_probability:.6f}",
                            int(label.old_present),
                            int(label.new_present),
                        ]
                    )
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return csv_path, json_path


def _probability(probabilities: dict[str, Any], label: str) -> float | None:
    value = probabilities.get(label)
    return float(value) if value is not None else None


def change_report(
    session: Session,
    old: Model | None,
    new: Model,
    since: datetime | None = None,
    until: datetime | None = None,
) -> ChangeReport:
    """Compares the findings of two models on every instance in range that both have scored."""
    report = ChangeReport(ModelRef.of(old) if old is not None else None, ModelRef.of(new))
    if old is None:
        return report
    old_p, new_p = aliased(Prediction), aliased(Prediction)
    query = (
        select(Instance.id, Instance.sop_instance_uid, Study.study_uid, old_p, new_p)
        .join(Study, Study.id == Instance.study_id)
        .join(old_p, (old_p.instance_id == Instance.id) & (old_p.model_id == old.id))
        .join(new_p, (new_p.instance_id == Instance.id) & (new_p.model_id == new.id))
        .order_by(Instance.id)
    )
    for instance_id, sop_uid, study_uid, before, after in session.execute(_in_range(query, since, until)):
        report.compared += 1
        old_findings, new_findings = list(before.findings), list(after.findings)
        differing = set(old_findings) ^ set(new_findings)
        old_status, new_status = str(before.status), str(after.status)
        if not differing and old_status == new_status:
            continue
        order = {name: i for i, name in enumerate([*new_findings, *old_findings])}
        labels = [
            LabelChange(
                label=name,
                old_probability=_probability(before.probabilities, name),
                new_probability=_probability(after.probabilities, name),
                old_present=name in old_findings,
                new_present=name in new_findings,
            )
            for name in sorted(differing, key=lambda n: order[n])
        ]
        report.changed.append(
            InstanceChange(instance_id, study_uid, sop_uid, old_findings, new_findings, labels, old_status, new_status)
        )
    return report


def report_stem(new: ModelRef, when: datetime) -> str:
    """The file name stem of a report: the new model's short sha256 and the time it was made."""
    return f"rescore-{new.sha256[:12]}-{when.strftime('%Y%m%dT%H%M%SZ')}"


def rescore_inline(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    scorer: Scorer,
    instance_ids: Sequence[int],
    progress: Callable[[int], object] | None = None,
) -> ScoreOutcome:
    """Scores instances in this process, ``rescore_batch_size`` at a time.

    Args:
        progress: Called with the number of instances each finished batch held.

    Returns:
        The batches' outcomes together, the study reports' outputs to deliver among ``deliver``.
    """
    from worker.scoring import ScoreOutcome, score_instances
    from worker.study_reports import write_study_reports
    from worker.sweep import batches

    total = ScoreOutcome()
    for batch in batches(list(instance_ids), settings.rescore_batch_size):
        outcome = score_instances(settings, sessions, storage, scorer, batch)
        total.scored += outcome.scored
        total.ungradable += outcome.ungradable
        total.failed += outcome.failed
        total.retry += outcome.retry
        total.deliver += outcome.deliver
        total.errors.update(outcome.errors)
        if progress is not None:
            progress(len(batch))
    reports = write_study_reports(settings, sessions, storage, scorer.model_id)
    while reports.remaining and reports.written:
        total.deliver += reports.deliver
        reports = write_study_reports(settings, sessions, storage, scorer.model_id)
    total.deliver += reports.deliver
    return total
