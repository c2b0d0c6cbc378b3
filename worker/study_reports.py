"""Study reports: once a study is complete, one study-level SR per model (:mod:`retinagate.outputs.study`).

A study is due for a report by a model when

1. it is complete: no instance has arrived for ``study_quiet_seconds``
   (:func:`retinagate.studies.completed_studies_query`), and every instance of it is settled under
   the model: scored or ungradable with a prediction by the model, or failed (RetinaGate's own
   outputs stored back, status ``skipped``, are not photographs and do not count);
2. the model has a prediction for at least one of its photographs still in storage (the report
   references them);
3. the model has no report of it yet, or its newest report covered fewer photographs than the study
   now has.

So the same model writes one report per study, and a second one (revision 2, a new SR in the same
series) only when photographs arrived after the first and the study is quiet and settled again: the
first report stays as it was sent, and the new one covers every photograph. A new model (activated,
the archive re-scored) writes its own report of each study once its predictions cover the study.

The beat-scheduled ``study_reports`` task (:func:`worker.tasks.study_reports`, maintenance queue) runs
:func:`write_study_reports` for the active model, at most :data:`STUDY_LIMIT` studies a run;
``retinagate rescore`` runs it for the model it re-scored with. Each report's SR is written durably,
then recorded with its output row and pending deliveries in one transaction; the outputs go to the
``deliver`` task like every other output, whatever ``deliver_min_probability`` (a reader must see
"no referable finding" and "ungradable" too). Writing is idempotent: the SR's UID is derived from
(study, model, revision), and a report another worker recorded first (unique per study, model and
revision) makes this one drop its file.

Cost: :func:`due_studies_query` looks at every quiet study on each run. Measured on SQLite (2-core
machine, 20,000 studies of two photographs, each scored): 30 ms to find the first 51 due, 95 ms
when every study is reported and none is due; it grows with the archive (about 1 s a run at 200,000
studies). Should that matter, bound the candidates by recent predictions (an index on
``predictions (model_id, created_at)``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Final

from sqlalchemy import Select, and_, exists, func, or_, select
from sqlalchemy.exc import IntegrityError

from retinagate.db import session_scope
from retinagate.models import (
    Instance,
    InstanceStatus,
    Model,
    Output,
    Prediction,
    PredictionStatus,
    Study,
    StudyReport,
)
from retinagate.studies import completed_studies_query
from worker.delivery import hand_off, pending_deliveries

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.outputs.identity import ModelIdentity
    from retinagate.outputs.study import EyeResult, Photograph
    from retinagate.settings import Settings
    from retinagate.storage import Storage

__all__ = ["STUDY_LIMIT", "StudyReportOutcome", "active_model_id", "due_studies_query", "write_study_reports"]

logger = logging.getLogger(__name__)

#: Studies one run reports on; with more due, the task runs again at once.
STUDY_LIMIT: Final = 50


@dataclass
class StudyReportOutcome:
    """What one :func:`write_study_reports` call did."""

    #: Study report row ids written.
    written: list[int] = field(default_factory=list)
    #: Their output rows with a delivery to make.
    deliver: list[int] = field(default_factory=list)
    #: Study id to why no report was written for it.
    skipped: dict[int, str] = field(default_factory=dict)
    #: Whether more studies were due than this run took.
    remaining: bool = False


def due_studies_query(model_id: int, quiet_seconds: int, now: datetime | None = None) -> Select[Study]:
    """``SELECT`` of the studies due for a report by the model (see the module docstring), oldest first."""
    counted = Instance.status != InstanceStatus.SKIPPED
    by_model = exists().where(Prediction.instance_id == Instance.id, Prediction.model_id == model_id)
    settled = or_(
        Instance.status == InstanceStatus.FAILED,
        and_(Instance.status.in_([InstanceStatus.SCORED, InstanceStatus.UNGRADABLE]), by_model),
    )
    unsettled = exists().where(Instance.study_id == Study.id, counted, ~settled)
    # A photograph storage retention pruned cannot be referenced: a study needs one still there.
    predicted = exists().where(Instance.study_id == Study.id, counted, Instance.pruned_at.is_(None), by_model)
    photographs = select(func.count(Instance.id)).where(Instance.study_id == Study.id, counted).scalar_subquery()
    covered = (
        select(func.max(StudyReport.instances))
        .where(StudyReport.study_id == Study.id, StudyReport.model_id == model_id)
        .scalar_subquery()
    )
    return completed_studies_query(quiet_seconds, now).where(
        ~unsettled, predicted, or_(covered.is_(None), covered < photographs)
    )


def active_model_id(session: Session) -> int | None:
    """The active model's row id, or None when no model is active."""
    return session.scalar(select(Model.id).where(Model.active.is_(True)).order_by(Model.id).limit(1))


def _identity(model: Model) -> ModelIdentity:
    from retinagate.card import ModelCard
    from retinagate.engine import device_uid
    from retinagate.outputs.identity import ModelIdentity

    card = ModelCard.model_validate(model.card)
    return ModelIdentity(card=card, sha256=model.sha256, device_uid=device_uid(model.sha256))


@dataclass(frozen=True)
class _Study:
    """What a report of one study is built from, read in one short transaction."""

    study_id: int
    revision: int
    instances: int
    headers: Sequence[Dataset]
    photographs: list[Photograph]


def _read(session: Session, storage: Storage, study: Study, model_id: int) -> _Study:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from retinagate.outputs.identity import eye_of
    from retinagate.outputs.study import Photograph

    instances = session.scalars(
        select(Instance)
        .where(Instance.study_id == study.id, Instance.status != InstanceStatus.SKIPPED)
        .order_by(Instance.id)
    ).all()
    predictions = {
        p.instance_id: p
        for p in session.scalars(
            select(Prediction).where(
                Prediction.instance_id.in_([i.id for i in instances]), Prediction.model_id == model_id
            )
        )
    }
    headers = []
    photographs = []
    for instance in instances:
        prediction = predictions.get(instance.id)
        if prediction is None or instance.status == InstanceStatus.FAILED:
            continue
        header = None
        if instance.pruned_at is None:
            try:
                header = dcmread(storage.path(instance.storage_key), stop_before_pixels=True)
            except (OSError, InvalidDicomError) as exc:
                logger.warning("study report: instance id=%s unreadable (%s)", instance.id, type(exc).__name__)
        if header is not None:
            headers.append(header)
            eye = eye_of(header)
        else:
            eye = (instance.laterality or "U").strip().upper()
            eye = eye if eye in ("R", "L", "B") else "U"
        gradable = prediction.status == PredictionStatus.SCORED
        photographs.append(
            Photograph(
                eye=eye,
                gradable=gradable,
                probabilities={k: float(v) for k, v in prediction.probabilities.items()} if gradable else {},
                findings=list(prediction.findings) if gradable else [],
            )
        )
    newest = session.scalar(
        select(func.max(StudyReport.revision)).where(StudyReport.study_id == study.id, StudyReport.model_id == model_id)
    )
    return _Study(study.id, (newest or 0) + 1, len(instances), headers, photographs)


def write_study_reports(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    model_id: int,
    *,
    now: datetime | None = None,
    limit: int = STUDY_LIMIT,
) -> StudyReportOutcome:
    """Writes the report of every study due for one by the model (at most ``limit``), oldest first;
    nothing when ``settings.study_reports`` is off.

    A study whose report cannot be built (photographs' headers highdicom refuses together, such as
    two patients in one study) is skipped with the reason in the outcome and tried again next run.

    Raises:
        ValueError: When ``limit`` is below 1.
        OperationalError: When the database cannot be reached.
    """
    from retinagate.outputs.study import conclude, eye_results

    if limit < 1:
        raise ValueError(f"limit is {limit}; expected 1 or more")
    outcome = StudyReportOutcome()
    if not settings.study_reports:
        return outcome
    with session_scope(sessions) as session:
        model = session.get_one(Model, model_id)
        identity = _identity(model)
        due = session.scalars(due_studies_query(model_id, settings.study_quiet_seconds, now).limit(limit + 1)).all()
        outcome.remaining = len(due) > limit
        studies = [_read(session, storage, study, model_id) for study in due[:limit]]
    for study in studies:
        if not study.headers:
            outcome.skipped[study.study_id] = "no photograph of the study is left in storage to reference"
            logger.warning("study report: study id=%s skipped: its photographs are gone", study.study_id)
            continue
        eyes = eye_results(study.photographs)
        try:
            report_id, output_id = _write(settings, sessions, storage, model_id, identity, study, eyes)
        except (ValueError, TypeError) as exc:  # headers highdicom refuses: the other studies go on
            outcome.skipped[study.study_id] = f"the report could not be built: {exc}"
            logger.warning("study report: study id=%s not built (%s)", study.study_id, type(exc).__name__)
            continue
        if report_id is None:
            outcome.skipped[study.study_id] = "another worker wrote this report first"
            continue
        outcome.written.append(report_id)
        if output_id is not None:
            outcome.deliver.append(output_id)
        logger.info(
            "study report id=%s: study id=%s, model id=%s, revision %d, %s",
            report_id,
            study.study_id,
            model_id,
            study.revision,
            conclude(eyes).value,
        )
    return outcome


def _write(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    model_id: int,
    identity: ModelIdentity,
    study: _Study,
    eyes: Sequence[EyeResult],
) -> tuple[int | None, int | None]:
    """Writes one report's SR durably, then its rows; returns its report id (None when another
    worker recorded the same report first) and its output id when it has a delivery to make."""
    from retinagate.outputs.study import KIND, build_study_report, conclude

    built = build_study_report(study.headers, identity, eyes, study.revision)
    key = storage.new_key("out")
    storage.write_bytes(key, built.data)
    try:
        with session_scope(sessions) as session:
            report = StudyReport(
                study_id=study.study_id,
                model_id=model_id,
                revision=study.revision,
                instances=study.instances,
                conclusion=conclude(eyes),
                eyes={eye.eye: eye.to_json() for eye in eyes},
            )
            session.add(report)
            session.flush()
            output = Output(
                prediction_id=None,
                study_report_id=report.id,
                kind=KIND,
                sop_instance_uid=built.sop_instance_uid,
                storage_key=key,
            )
            session.add(output)
            session.flush()
            destinations = [d.name for d in settings.destinations]
            pending = pending_deliveries(session, [output], destinations) if destinations else []
            hand_off([row for _, row in pending], settings.lease_seconds)  # queued after the commit
            return report.id, (output.id if pending else None)
    except IntegrityError:
        storage.delete(key)
        return None, None
    except BaseException:
        storage.delete(key)
        raise
