"""Study reports: one study-level result per study and model, delivered as an output.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08

A complete study gets a report per model (``study_reports``: per eye the Disease_Risk and the
findings, and a conclusion), whose SR is an output row like the others, so that deliveries need no
change. Such an output belongs to a study report instead of a prediction: ``outputs.prediction_id``
may be NULL and ``outputs.study_report_id`` says which report. The downgrade removes the study
reports with their outputs and deliveries.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "study_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column(
            "conclusion",
            sa.Enum("refer", "no_referable", "ungradable", name="studyconclusion", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("eyes", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_study_reports_model_id_models"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_study_reports_study_id_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_study_reports"),
        sa.UniqueConstraint("study_id", "model_id", "revision", name="uq_study_reports_study_model_revision"),
    )
    op.create_index("ix_study_reports_study_id", "study_reports", ["study_id"])
    op.create_index("ix_study_reports_model_id", "study_reports", ["model_id"])
    with op.batch_alter_table("outputs") as batch:
        batch.alter_column("prediction_id", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("study_report_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_outputs_study_report_id_study_reports", "study_reports", ["study_report_id"], ["id"]
        )
        batch.create_index("ix_outputs_study_report_id", ["study_report_id"])


_REPORT_OUTPUTS = "SELECT id FROM outputs WHERE prediction_id IS NULL"


def downgrade() -> None:
    op.execute(f"DELETE FROM deliveries WHERE output_id IN ({_REPORT_OUTPUTS})")  # noqa: S608 - fixed SQL
    op.execute(f"DELETE FROM outputs WHERE id IN ({_REPORT_OUTPUTS})")  # noqa: S608 - fixed SQL
    with op.batch_alter_table("outputs") as batch:
        batch.drop_index("ix_outputs_study_report_id")
        batch.drop_constraint("fk_outputs_study_report_id_study_reports", type_="foreignkey")
        batch.drop_column("study_report_id")
        batch.alter_column("prediction_id", existing_type=sa.Integer(), nullable=False)
    op.drop_index("ix_study_reports_model_id", table_name="study_reports")
    op.drop_index("ix_study_reports_study_id", table_name="study_reports")
    op.drop_table("study_reports")
