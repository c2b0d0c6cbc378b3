"""One audit row per association: who called, from where, what came of it. No patient data.

An accepted association gets its row when it is accepted (outcome ``open``), so that the instances
it brings can point at it, and the row is completed when the connection ends (``released`` or
``aborted``). A rejected association, or a connection that failed its TLS handshake, gets one
complete row (``rejected``, with the reason). Audit writes never fail an association: an error is
logged and the gateway carries on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Final

from retinagate.models import Association, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["AssociationRecord", "AuditLog"]

logger = logging.getLogger(__name__)

OPEN: Final = "open"
REJECTED: Final = "rejected"
RELEASED: Final = "released"
ABORTED: Final = "aborted"


@dataclass
class AssociationRecord:
    """What the gateway knows about one connection while it lasts.

    Counts are changed only by the association's own thread (the DIMSE handlers run there).
    """

    peer_address: str
    peer_port: int
    tls: bool
    started_at: datetime = field(default_factory=utcnow)
    calling_ae: str | None = None
    called_ae: str | None = None
    row_id: int | None = None
    accepted: int = 0
    refused: int = 0
    outcome: str = OPEN
    reason: str | None = None
    dataset_bytes: int = 0  # of the C-STORE dataset being received (counted by the DUL thread)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def label(self) -> str:
        """How logs name this association: its audit row id, never AE titles or data."""
        return f"association {self.row_id}" if self.row_id is not None else f"connection from {self.peer_address}"


class AuditLog:
    """Writes association rows through a session factory."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def opened(self, record: AssociationRecord) -> None:
        """Inserts the row of an accepted association (outcome ``open``) and sets ``record.row_id``."""
        try:
            with self._sessions() as session, session.begin():
                row = _new_row(record)
                row.outcome = OPEN
                session.add(row)
                session.flush()
                record.row_id = row.id
        except Exception as exc:
            logger.error("could not write the audit row of %s: %s", record.label, type(exc).__name__)

    def closed(self, record: AssociationRecord) -> None:
        """Completes the row (or writes a whole one for a rejected connection) with the outcome."""
        try:
            with self._sessions() as session, session.begin():
                row = session.get(Association, record.row_id) if record.row_id is not None else None
                if row is None:
                    row = _new_row(record)
                    session.add(row)
                row.ended_at = utcnow()
                row.instances_accepted = record.accepted
                row.instances_refused = record.refused
                row.outcome = record.outcome
                row.reason = record.reason[:200] if record.reason else None
                session.flush()
                record.row_id = row.id
        except Exception as exc:
            logger.error("could not complete the audit row of %s: %s", record.label, type(exc).__name__)


def _new_row(record: AssociationRecord) -> Association:
    """The audit row of an association, from what is known when it opens."""
    return Association(
        calling_ae=record.calling_ae,
        called_ae=record.called_ae,
        peer_address=record.peer_address[:64],
        peer_port=record.peer_port,
        tls=record.tls,
        started_at=record.started_at,
    )
