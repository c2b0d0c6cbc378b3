"""Bringing archived photographs in from a PACS: C-FIND for the series, C-MOVE to the gateway.

``retinagate retrieve`` asks a PACS (Study Root query/retrieve) for the studies in a date range that
hold photographs (``ModalitiesInStudy``, default ``OP``), then for each study's series of that
modality, and has the PACS send each series to the gateway by C-MOVE (the move destination is the
gateway's own AE title, which the PACS must know). The photographs then take the gateway's normal
path: stored durably, queued, scored by the active model, delivered. Nothing here scores or stores.

Bounded: one series moves at a time, and a run moves at most ``limit`` studies. Resumable: a series
whose instances the database already holds all of (by the PACS's ``NumberOfSeriesRelatedInstances``)
is skipped, so a run that was stopped, or a nightly run over the same range, moves only what is
missing; ``again`` moves every series anyway (the gateway acknowledges a duplicate with the same
content and does not score it twice). Only identifiers and counts are kept or logged, never a
patient attribute.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from retinagate.db import session_scope
from retinagate.models import Instance

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.destinations import Connection
    from retinagate.destinations.dimse import DimseDestination

__all__ = [
    "PacsUnreachableError",
    "RemoteSeries",
    "RetrieveError",
    "RetrieveReport",
    "find_series",
    "move_series",
    "retrieve",
]

logger = logging.getLogger(__name__)


class RetrieveError(RuntimeError):
    """The PACS refused a query or a move, or stopped answering (the message says which)."""


class PacsUnreachableError(RetrieveError):
    """No association with the PACS: refused, rejected or timed out."""


@dataclass(frozen=True)
class RemoteSeries:
    """A series of photographs the PACS holds: its study, its UID and how many instances it has."""

    study_uid: str
    series_uid: str
    instances: int | None


@dataclass
class RetrieveReport:
    """What one run found and did, by series."""

    studies: int = 0
    series: int = 0
    skipped: int = 0
    moved: int = 0
    instances_moved: int = 0
    instances_failed: int = 0
    failed_series: list[str] = field(default_factory=list)
    #: Studies left for a later run by ``limit``.
    left: int = 0


def _association(source: DimseDestination, connection: Connection, model: Any) -> Any:
    assoc = source.associate(connection, [(model, None)])
    if not assoc.is_established:
        raise PacsUnreachableError(f"no association with {source.address}: rejected, refused or timed out")
    return assoc


def _dicom_date(day: date | None) -> str:
    return "" if day is None else day.strftime("%Y%m%d")


def find_series(
    source: DimseDestination,
    connection: Connection,
    *,
    since: date | None = None,
    until: date | None = None,
    modality: str = "OP",
) -> list[RemoteSeries]:
    """The series of ``modality`` in the studies dated ``[since, until]`` (inclusive), study by study.

    Raises:
        RetrieveError: When there is no association or the PACS answers C-FIND with a failure.
    """
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    find = StudyRootQueryRetrieveInformationModelFind
    assoc = _association(source, connection, find)
    try:
        study_query = Dataset()
        study_query.QueryRetrieveLevel = "STUDY"
        study_query.StudyInstanceUID = ""
        study_query.ModalitiesInStudy = modality
        study_query.StudyDate = (
            f"{_dicom_date(since)}-{_dicom_date(until)}" if since is not None or until is not None else ""
        )
        studies = sorted({str(match.StudyInstanceUID) for match in _matches(assoc, study_query, find)})
        found: list[RemoteSeries] = []
        for study_uid in studies:
            series_query = Dataset()
            series_query.QueryRetrieveLevel = "SERIES"
            series_query.StudyInstanceUID = study_uid
            series_query.SeriesInstanceUID = ""
            series_query.Modality = modality
            series_query.NumberOfSeriesRelatedInstances = ""
            for match in _matches(assoc, series_query, find):
                count = match.get("NumberOfSeriesRelatedInstances")
                found.append(RemoteSeries(study_uid, str(match.SeriesInstanceUID), int(count) if count else None))
        return sorted(set(found), key=lambda s: (s.study_uid, s.series_uid))
    finally:
        if assoc.is_established:
            assoc.release()


def _matches(assoc: Any, query: Any, model: Any) -> list[Any]:
    """The identifiers of a C-FIND's pending answers; raises :class:`RetrieveError` on a failure."""
    matches = []
    for status, identifier in assoc.send_c_find(query, model):
        if "Status" not in status:
            raise RetrieveError("the PACS did not answer a C-FIND (timeout or association aborted)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01) and identifier is not None and "StudyInstanceUID" in identifier:
            matches.append(identifier)
        elif code not in (0x0000, 0xFF00, 0xFF01):
            raise RetrieveError(f"the PACS answered C-FIND with 0x{code:04X}")
    return matches


def move_series(
    source: DimseDestination, connection: Connection, series: RemoteSeries, move_to: str
) -> tuple[int, int]:
    """Has the PACS send one series to the AE title ``move_to``; returns (instances sent, failed).

    Raises:
        RetrieveError: When there is no association, or the PACS refuses the move as a whole (an
            unknown move destination, most often).
    """
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

    move = StudyRootQueryRetrieveInformationModelMove
    assoc = _association(source, connection, move)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = series.study_uid
        query.SeriesInstanceUID = series.series_uid
        completed = failed = 0
        final: int | None = None
        for status, _ in assoc.send_c_move(query, move_to, move):
            if "Status" not in status:
                raise RetrieveError("the PACS did not answer a C-MOVE (timeout or association aborted)")
            final = int(status.Status)
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or 0)
            failed = int(status.get("NumberOfFailedSuboperations", failed) or 0)
        if final is None or (final not in (0x0000, 0xB000) and completed == 0 and failed == 0):
            # 0xA801 is "move destination unknown"; Orthanc says 0xC000 for it.
            raise RetrieveError(
                f"the PACS answered C-MOVE with 0x{final or 0:04X} and sent nothing: does it know the move "
                f"destination {move_to!r} (the gateway's AE title, with its host and port, among its DICOM nodes)?"
            )
        return completed, failed
    finally:
        if assoc.is_established:
            assoc.release()


def _held(session: Session, series_uids: Sequence[str], chunk: int = 500) -> dict[str, int]:
    """How many instances of each series the database holds (series it has none of are left out)."""
    held: dict[str, int] = {}
    for start in range(0, len(series_uids), chunk):
        query = (
            select(Instance.series_uid, func.count(Instance.id))
            .where(Instance.series_uid.in_(series_uids[start : start + chunk]))
            .group_by(Instance.series_uid)
        )
        held.update({uid: int(count) for uid, count in session.execute(query)})
    return held


def retrieve(
    source: DimseDestination,
    connection: Connection,
    sessions: sessionmaker[Session],
    *,
    move_to: str,
    since: date | None = None,
    until: date | None = None,
    modality: str = "OP",
    limit: int = 100,
    again: bool = False,
    dry_run: bool = False,
) -> RetrieveReport:
    """Finds the photographs' series (:func:`find_series`) and moves those the database lacks.

    Args:
        source: The PACS.
        connection: Our AE title, TLS, timeouts.
        sessions: The database, to see which series are already held.
        move_to: The gateway's AE title (the PACS's name for it).
        limit: The most studies one run moves; the rest are counted in ``left``.
        again: Move series already held too.
        dry_run: Find and count, move nothing.

    Raises:
        RetrieveError: When the PACS cannot be queried, or refuses a move as a whole.
    """
    report = RetrieveReport()
    found = find_series(source, connection, since=since, until=until, modality=modality)
    with session_scope(sessions) as session:
        held = _held(session, [s.series_uid for s in found])
    missing = [s for s in found if again or s.instances is None or held.get(s.series_uid, 0) < s.instances]
    report.studies = len({s.study_uid for s in found})
    report.series = len(found)
    report.skipped = len(found) - len(missing)
    studies = sorted({s.study_uid for s in missing})
    chosen, report.left = set(studies[:limit]), max(0, len(studies) - limit)
    for series in missing:
        if series.study_uid not in chosen or dry_run:
            continue
        sent, failed = move_series(source, connection, series, move_to)
        report.moved += 1
        report.instances_moved += sent
        report.instances_failed += failed
        if failed:
            report.failed_series.append(series.series_uid)
        logger.info("retrieve: series moved, %d instance(s) sent, %d failed", sent, failed)
    return report
