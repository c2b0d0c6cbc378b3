"""Storage retention: when a received photograph's file was pruned.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

With ``retention_days`` set, a daily prune (``worker.retention``) removes the received file of an
instance whose work is finished and records the time here; the row, its predictions, outputs and
deliveries stay. Existing rows keep their files: NULL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("pruned_at")
