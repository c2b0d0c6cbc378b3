"""Initial schema: studies, instances, models, predictions, outputs, deliveries, associations.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Generated with ``alembic revision --autogenerate`` against an empty SQLite database and tidied by
hand. Constraint and index names follow the naming convention in ``retinagate.models.Base.metadata``
so later revisions can address them by name on every database. Timestamps are stored as
``DateTime(timezone=True)`` (the models' ``UTCDateTime`` keeps them aware and in UTC); enumerations are
plain strings (``native_enum=False``) so adding a status is a code change, not a type migration.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UID = sa.String(length=64)
AE = sa.String(length=16)


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("calling_ae", AE, nullable=True),
        sa.Column("called_ae", AE, nullable=True),
        sa.Column("peer_address", sa.String(length=64), nullable=True),
        sa.Column("peer_port", sa.Integer(), nullable=True),
        sa.Column("tls", sa.Boolean(), nullable=False),
        _timestamp("started_at"),
        _timestamp("ended_at", nullable=True),
        sa.Column("instances_accepted", sa.Integer(), nullable=False),
        sa.Column("instances_refused", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_associations"),
    )

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=True),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        _timestamp("registered_at"),
        _timestamp("activated_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("sha256", name="uq_models_sha256"),
    )

    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("accession", sa.String(length=16), nullable=True),
        _timestamp("first_received_at"),
        _timestamp("last_received_at"),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("study_uid", name="uq_studies_study_uid"),
    )
    op.create_index("ix_studies_last_received_at", "studies", ["last_received_at"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_uid", UID, nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("transfer_syntax_uid", UID, nullable=False),
        sa.Column("laterality", sa.String(length=2), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("storage_key", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae", AE, nullable=True),
        sa.Column("association_id", sa.Integer(), nullable=True),
        _timestamp("received_at"),
        sa.Column(
            "status",
            sa.Enum(
                "received", "queued", "scoring", "scored", "failed",
                name="instancestatus", native_enum=False, length=16,
            ),
            nullable=False,
        ),
        _timestamp("status_changed_at"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.ForeignKeyConstraint(
            ["association_id"], ["associations.id"], name="fk_instances_association_id_associations"
        ),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_instances_study_id_studies"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
        sa.UniqueConstraint("storage_key", name="uq_instances_storage_key"),
    )
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.create_index("ix_instances_status_changed", "instances", ["status", "status_changed_at"])
    op.create_index("ix_instances_study_id", "instances", ["study_id"])

    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], name="fk_predictions_instance_id_instances"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_predictions_model_id_models"),
        sa.UniqueConstraint("instance_id", "model_id", name="uq_predictions_instance_model"),
    )
    op.create_index("ix_predictions_instance_id", "predictions", ["instance_id"])
    op.create_index("ix_predictions_model_id", "predictions", ["model_id"])

    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Enum("sc", "sr", "pm", name="outputkind", native_enum=False, length=16), nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("storage_key", sa.String(length=255), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_outputs"),
        sa.ForeignKeyConstraint(
            ["prediction_id"], ["predictions.id"], name="fk_outputs_prediction_id_predictions"
        ),
        sa.UniqueConstraint("prediction_id", "kind", name="uq_outputs_prediction_kind"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_outputs_sop_instance_uid"),
    )
    op.create_index("ix_outputs_prediction_id", "outputs", ["prediction_id"])

    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("output_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=300), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending", "delivered", "retrying", "failed",
                name="deliverystatus", native_enum=False, length=16,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("dimse_status", sa.Integer(), nullable=True),
        _timestamp("updated_at"),
        _timestamp("delivered_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.ForeignKeyConstraint(["output_id"], ["outputs.id"], name="fk_deliveries_output_id_outputs"),
        sa.UniqueConstraint("output_id", "destination", name="uq_deliveries_output_destination"),
    )
    op.create_index("ix_deliveries_output_id", "deliveries", ["output_id"])


def downgrade() -> None:
    # Children before parents; an index goes with its table.
    for table in ("deliveries", "outputs", "predictions", "instances", "studies", "models", "associations"):
        op.drop_table(table)
