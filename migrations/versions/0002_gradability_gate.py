"""Gradability gate: a prediction's status, reasons and quality measures.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

An image the gradability gate (``retinagate.gate``) refuses gets a prediction with status
``ungradable``, the gate's reasons and its measures instead of findings; its instance gets the status
``ungradable``. Instance statuses are plain strings (``native_enum=False``, no CHECK constraint, 16
characters), so the new instance status needs no change to the ``instances`` table. Existing
predictions were all graded: the server defaults fill them in as ``scored`` with no reasons.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(
            sa.Column(
                "status",
                sa.Enum("scored", "ungradable", name="predictionstatus", native_enum=False, length=16),
                nullable=False,
                server_default="scored",
            )
        )
        batch.add_column(sa.Column("reasons", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
        batch.add_column(sa.Column("quality", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    # Ungradable instances go back to 'failed' (the old schema knew no better), with the reason kept.
    op.execute(
        "UPDATE instances SET status = 'failed', last_error = 'not gradable (gradability gate)' "
        "WHERE status = 'ungradable'"
    )
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("quality")
        batch.drop_column("reasons")
        batch.drop_column("status")
