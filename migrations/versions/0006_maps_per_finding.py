"""A Parametric Map per finding: a prediction may have several outputs of one kind.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

The unique constraint on (prediction, kind) goes: a scored photograph gets a Parametric Map for each
finding drawn on its SC. Outputs stay unique by SOP Instance UID, which is derived from the source,
the model, the kind and the map's label. The downgrade keeps the first output of each kind of a
prediction (and its deliveries) and removes the others, so the constraint can come back.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LATER_OF_A_KIND = (
    "SELECT id FROM outputs AS later WHERE EXISTS (SELECT 1 FROM outputs AS earlier "
    "WHERE earlier.prediction_id = later.prediction_id AND earlier.kind = later.kind AND earlier.id < later.id)"
)


def upgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_constraint("uq_outputs_prediction_kind", type_="unique")


def downgrade() -> None:
    op.execute(f"DELETE FROM deliveries WHERE output_id IN ({_LATER_OF_A_KIND})")  # noqa: S608 - fixed SQL
    op.execute(f"DELETE FROM outputs WHERE id IN ({_LATER_OF_A_KIND})")  # noqa: S608 - fixed SQL
    with op.batch_alter_table("outputs") as batch:
        batch.create_unique_constraint("uq_outputs_prediction_kind", ["prediction_id", "kind"])
