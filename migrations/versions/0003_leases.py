"""Leases: who is working on an instance or a delivery, and until when; retryable failed deliveries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

A worker that claims an instance (status ``scoring``) or a delivery records its identity and a lease
that it renews while it works (``worker.lease``); the sweeper takes back work whose lease expired,
which means its worker died. Rows from before this revision have no lease: the sweeper treats them
by their age, as before. A delivery that failed after exhausting its retries on transient errors is
marked ``retryable``, so that it is sent again once its destination answers; existing failed rows
are left as they are (their reason is in ``last_error``; ``retinagate deliveries retry`` re-sends
them by hand).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("retryable", sa.Boolean(), nullable=False, server_default=sa.text("false")))
        batch.add_column(sa.Column("lease_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
        batch.drop_column("retryable")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
