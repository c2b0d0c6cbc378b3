"""Model activations: an audit of which model was made active, by whom, when, replacing which.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

``retinagate models activate`` (and ``retinagate rescore --model``, and the first worker of a fresh
installation) records each activation here. ``rescore_queued_at`` marks the activation whose
re-scoring a worker has queued, so the archive is re-scored once per activation. Existing active
models get no row: their activation predates the audit.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_activations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("previous_model_id", sa.Integer(), nullable=True),
        sa.Column("activated_by", sa.String(128), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rescore_queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_model_activations_model_id_models"),
        sa.ForeignKeyConstraint(
            ["previous_model_id"], ["models.id"], name="fk_model_activations_previous_model_id_models"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_activations"),
    )
    op.create_index("ix_model_activations_model_id", "model_activations", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_model_activations_model_id", table_name="model_activations")
    op.drop_table("model_activations")
