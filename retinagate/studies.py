"""Study completeness: a study counts as complete once no instance has arrived for a quiet period.

Cameras send a study as a burst of instances with no end marker, so "complete" can only mean
"quiet for ``settings.study_quiet_seconds``". The gateway sets ``studies.last_received_at`` on
every stored instance; :func:`completed_studies_query` turns that into SQL (a ``SELECT`` any
caller can extend, join or wrap in a view) and :func:`completed_studies` runs it. A query
rather than a database view, so the rule lives in one place and the quiet period stays a setting.
The worker's study results (:mod:`worker.study_results`) extend it with what a model has scored.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Select, select

from retinagate.models import Study, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["completed_studies", "completed_studies_query"]


def completed_studies_query(quiet_seconds: int, now: datetime | None = None) -> Select[Study]:
    """``SELECT`` of the studies whose last instance arrived at least ``quiet_seconds`` ago, oldest first.

    Raises:
        ValueError: When ``quiet_seconds`` is negative or ``now`` is naive.
    """
    if quiet_seconds < 0:
        raise ValueError(f"quiet_seconds is {quiet_seconds}; expected 0 or more")
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware (use retinagate.models.utcnow())")
    cutoff = (now or utcnow()) - timedelta(seconds=quiet_seconds)
    return select(Study).where(Study.last_received_at <= cutoff).order_by(Study.last_received_at, Study.id)


def completed_studies(session: Session, quiet_seconds: int, now: datetime | None = None) -> list[Study]:
    """The studies quiet for ``quiet_seconds`` (``settings.study_quiet_seconds``), oldest first."""
    return list(session.scalars(completed_studies_query(quiet_seconds, now)))
