"""SQL schema: the source of truth for everything RetinaGate has received, scored and sent.

SQLAlchemy 2 typed ORM. The schema is created and migrated by Alembic (``retinagate db upgrade``);
these classes describe it. Rows hold internal ids and DICOM UIDs, never patient names or ids.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates

__all__ = [
    "Association",
    "Base",
    "Delivery",
    "DeliveryStatus",
    "Instance",
    "InstanceStatus",
    "Model",
    "ModelActivation",
    "Output",
    "Prediction",
    "PredictionStatus",
    "Study",
    "StudyConclusion",
    "StudyReport",
    "utcnow",
]

UID = String(64)
AE = String(16)


def utcnow() -> datetime:
    """Timezone-aware now, the only clock rows use."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes as UTC and returns them aware, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use retinagate.models.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class InstanceStatus(enum.StrEnum):
    RECEIVED = "received"  # durable on disk and in SQL, not yet handed to the queue
    QUEUED = "queued"  # a score task was sent
    SCORING = "scoring"  # a worker is on it
    SCORED = "scored"  # prediction and outputs written
    UNGRADABLE = "ungradable"  # the gradability gate refused it: outputs say why, no findings (see predictions)
    FAILED = "failed"  # gave up: permanent error or too many attempts (see last_error)
    SKIPPED = "skipped"  # stored on request but never scored: derived AI output, RetinaGate's own (see last_error)


class PredictionStatus(enum.StrEnum):
    SCORED = "scored"  # probabilities and findings
    UNGRADABLE = "ungradable"  # the gate's reasons instead (retinagate.gate)


class StudyConclusion(enum.StrEnum):
    """A study report's conclusion; the rule is in :func:`retinagate.outputs.study.conclude`."""

    REFER = "refer"
    NO_REFERABLE = "no_referable"  # no referable finding in any gradable eye
    UNGRADABLE = "ungradable"  # no eye was gradable


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    RETRYING = "retrying"
    FAILED = "failed"  # permanent refusal or retries exhausted


_naming = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_naming)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


def _enum(cls: type[enum.StrEnum]) -> Enum:
    return Enum(
        cls,
        values_callable=lambda e: [m.value for m in e],
        native_enum=False,
        length=16,
        validate_strings=True,
        name=cls.__name__.lower(),
    )


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    laterality: Mapped[str | None] = mapped_column(String(2))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    storage_key: Mapped[str] = mapped_column(String(255), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    status: Mapped[InstanceStatus] = mapped_column(_enum(InstanceStatus), default=InstanceStatus.RECEIVED)
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: The worker scoring it (``host:pid``) and until when, while ``scoring``; see :mod:`worker.lease`.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    #: When storage retention removed the received file (``retention_days``; see :mod:`worker.retention`).
    #: The row, its predictions, outputs and deliveries stay; the photograph cannot be scored again.
    pruned_at: Mapped[datetime | None] = mapped_column()

    study: Mapped[Study] = relationship(back_populates="instances")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="instance")

    __table_args__ = (Index("ix_instances_status_changed", "status", "status_changed_at"),)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str | None] = mapped_column(String(1024))
    card: Mapped[dict[str, Any]] = mapped_column()
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column()


class ModelActivation(Base):
    """Audit of each activation: which model, who made it active, when, and which one it replaced.

    ``rescore_queued_at`` is set by the first worker that serves the new model and queues the
    re-scoring of the archive (``RETINAGATE_RESCORE_ON_ACTIVATE``), so it is queued once.
    """

    __tablename__ = "model_activations"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    previous_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    activated_by: Mapped[str] = mapped_column(String(128))
    activated_at: Mapped[datetime] = mapped_column(default=utcnow)
    rescore_queued_at: Mapped[datetime | None] = mapped_column()


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    #: Label name to probability; multi-frame instances store the per-label maximum over frames.
    probabilities: Mapped[dict[str, Any]] = mapped_column()
    #: Label names at or over their threshold, most probable first.
    findings: Mapped[list[Any]] = mapped_column()
    #: Seconds per stage (decode, preprocess, infer, render, write) and in total.
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    duration_s: Mapped[float] = mapped_column(Float)
    #: ``ungradable`` when the gradability gate refused the image (then no probabilities or findings).
    status: Mapped[PredictionStatus] = mapped_column(
        _enum(PredictionStatus), default=PredictionStatus.SCORED, server_default=PredictionStatus.SCORED.value
    )
    #: The gate's reasons (ungradable), or the frames it left out of a scored multi-frame image.
    reasons: Mapped[list[Any]] = mapped_column(default=list, server_default=text("'[]'"))
    #: The gate's measures (field of view, colour, sharpness, exposure, ood_score); no patient data.
    quality: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="predictions")
    model: Mapped[Model] = relationship()
    outputs: Mapped[list[Output]] = relationship(back_populates="prediction")

    __table_args__ = (UniqueConstraint("instance_id", "model_id", name="uq_predictions_instance_model"),)


class StudyReport(Base):
    """One study-level report of a model: per eye its Disease_Risk and findings, and a conclusion.

    Written once the study is complete (:mod:`worker.study_reports`); a new revision only when
    instances arrived after the last one (``instances`` counts those it covered). Its SR is an
    :class:`Output` row, delivered like the others.
    """

    __tablename__ = "study_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    #: 1 for the first report of the study by the model, then one more for each later one.
    revision: Mapped[int] = mapped_column(Integer)
    #: The study's instances it covered (RetinaGate's own outputs stored back are not counted).
    instances: Mapped[int] = mapped_column(Integer)
    conclusion: Mapped[StudyConclusion] = mapped_column(_enum(StudyConclusion))
    #: Per eye (R, L, B, U): gradable, photographs, Disease_Risk and findings with probabilities.
    eyes: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship()
    model: Mapped[Model] = relationship()
    outputs: Mapped[list[Output]] = relationship(back_populates="study_report")

    __table_args__ = (
        UniqueConstraint("study_id", "model_id", "revision", name="uq_study_reports_study_model_revision"),
    )


class Output(Base):
    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: The prediction it shows; None for a study report's output (``study_report_id`` instead).
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"), index=True)
    study_report_id: Mapped[int | None] = mapped_column(ForeignKey("study_reports.id"), index=True)
    #: The name of a kind in :mod:`retinagate.outputs.registry`.
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    prediction: Mapped[Prediction | None] = relationship(back_populates="outputs")
    study_report: Mapped[StudyReport | None] = relationship(back_populates="outputs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="output")

    # A prediction has one output of most kinds, but a Parametric Map per finding: outputs are told
    # apart by their SOP Instance UID (unique, derived from source, model, kind and label).

    @validates("kind")
    def _check_kind(self, key: str, value: str) -> str:
        from retinagate.outputs import registry

        return registry.check([value], key, known=registry.stored_names())[0]


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))  # the destination's name: AE@host:port, a DICOMweb root
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    dimse_status: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()
    #: ``failed`` after its retries ran out on transient errors (not a refusal): the sweep sends it
    #: again once the destination answers C-ECHO (see :func:`worker.sweep.sweep`).
    retryable: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    #: The sender sending it (``host:pid``) and until when; see :mod:`worker.lease`.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column()

    output: Mapped[Output] = relationship(back_populates="deliveries")

    __table_args__ = (UniqueConstraint("output_id", "destination", name="uq_deliveries_output_destination"),)


class Association(Base):
    """Audit of one DICOM association: who, from where, what came of it. No patient data."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    called_ae: Mapped[str | None] = mapped_column(AE)
    peer_address: Mapped[str | None] = mapped_column(String(64))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column()
    instances_accepted: Mapped[int] = mapped_column(Integer, default=0)
    instances_refused: Mapped[int] = mapped_column(Integer, default=0)
    #: accepted | rejected | aborted | released | open
    outcome: Mapped[str] = mapped_column(String(16), default="open")
    reason: Mapped[str | None] = mapped_column(String(200))
