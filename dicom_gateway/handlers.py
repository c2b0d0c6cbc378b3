"""C-ECHO and C-STORE handlers: the durable receive.

A C-STORE is answered 0x0000 only after the instance is safe: checked (see
:mod:`dicom_gateway.validate`), written to a temporary file with its File Meta Information, fsynced,
renamed to a server-generated key, the directory fsynced, and its Study/Instance rows committed.
The score task is sent afterwards by the :class:`~dicom_gateway.enqueuer.Enqueuer`, off this path.
The bytes written are the bytes received (preamble, our File Meta Information, then the dataset as
encoded on the wire), so nothing is decoded or re-encoded here.

Content identity. ``instances.sha256`` is the sha256 of the dataset as received, without any File
Meta Information (inflated when it came deflated; see
:attr:`~dicom_gateway.validate.InstanceFacts.content_sha256`). Our own header is left out on
purpose: it names this implementation (class UID, version name), which may change with a release or
differ between gateways, and an identical re-send must be recognised by any gateway process.
Rows written before this definition hold the sha256 of the whole stored file; the first time such
an instance is sent again with a different-looking identity, the stored file's dataset is hashed
and, when it matches, the row is brought to the new definition and the re-send acknowledged as a
duplicate (see ``StoreHandler._stored_identity``). No migration is needed.

RetinaGate's own outputs (a heatmap SC sent back, typically by a PACS routing rule that forwards
whole studies; see :mod:`retinagate.provenance`) are acknowledged 0x0000 and neither stored nor
scored. Acknowledged, because a refusal makes such a rule retry, or flag the study, for ever; a
0xB006 warning would fill the PACS log with one line per forwarded object for a non-event. Not
stored, because RetinaGate already holds the object (its ``outputs`` row and file), the PACS keeps
its copy, and a stored row would be ``received``, which the sweeper queues for scoring: exactly the
loop this prevents (a "stored, not scored" status would need a new instance status and migration).
The gateway logs the reason with the association's id, never a UID or patient attribute, counts it
in ``retinagate_gateway_own_outputs``, and the association's audit row counts it as accepted.

Handlers never raise: pynetdicom would answer 0xC211 and the sender would learn nothing useful.
A failure to store (a full volume, an unreachable database) answers 0xA700 (out of resources) and
leaves no file and no row: the sender keeps its copy and tries again, where acknowledging would lose
an image the gateway cannot record.

Duplicates (a SOP Instance UID already stored):

- same content: acknowledged 0x0000, not stored or scored again;
- different content, ``gateway_duplicate_policy = "keep_first"``: the first version stays, the new one
  is discarded and answered with the warning 0xB006 (Elements Discarded), so the sender moves on
  but its log shows that this copy was not kept;
- different content, ``"replace"``: the new file is stored under a new key, the row points at it and
  goes back to ``received`` (so it is scored again), and the old file is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Final

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dicom_gateway import metrics
from dicom_gateway.audit import AssociationRecord
from dicom_gateway.sop_classes import storage_sop_classes
from dicom_gateway.validate import (
    DEFLATED_SYNTAX,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    InstanceFacts,
    Refusal,
    inspect_dataset,
)
from retinagate import encoded
from retinagate.errors import InputError
from retinagate.models import Instance, InstanceStatus, Study, utcnow
from retinagate.storage import Storage, StorageError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Settings

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "STATUS_DUPLICATE_DISCARDED",
    "STATUS_SUCCESS",
    "StoreHandler",
    "file_header",
    "handle_echo",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS: Final = 0x0000
STATUS_DUPLICATE_DISCARDED: Final = 0xB006  # Warning: Elements Discarded

#: Identifies RetinaGate in File Meta Information and association negotiation: a fixed 2.25 UID, the
#: same in every process and release (pydicom's ``generate_uid(prefix=None, ...)`` ignores its
#: entropy sources and returns a random UUID, which made it change at every start).
IMPLEMENTATION_CLASS_UID: Final = f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, 'RetinaGate dicom_gateway').int}"
IMPLEMENTATION_VERSION_NAME: Final = "RETINAGATE_1"


def handle_echo(event: Any) -> int:
    """C-ECHO: the gateway is up."""
    return STATUS_SUCCESS


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information for a received dataset.

    Built only from the command and the presentation context, so the same dataset received twice
    gives the same file bytes whoever sent it. It is not part of the content identity (see the
    module docstring).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_file_meta_info(encoded, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + encoded.getvalue()


@dataclass(frozen=True)
class _Stored:
    id: int
    sha256: str
    storage_key: str
    transfer_syntax_uid: str
    status: str


def _answer(status: int, comment: str | None = None) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment[:64]
    return rsp


class StoreHandler:
    """The EVT_C_STORE handler of one gateway.

    Args:
        settings: Caps (``max_instance_bytes``, ``max_pixels``), duplicate policy, extra SOP classes.
        storage: Where files go.
        sessions: Session factory of the RetinaGate database.
        submit: Hands a committed instance id to the enqueuer (must not block).
        record_of: The audit record of an association (None when unknown).
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        sessions: sessionmaker[Session],
        submit: Callable[[int], None],
        record_of: Callable[[Any], AssociationRecord | None],
    ) -> None:
        self._settings = settings
        self._storage = storage
        self._sessions = sessions
        self._submit = submit
        self._record_of = record_of
        self._classes = frozenset(storage_sop_classes(settings.gateway_extra_sop_classes))

    def __call__(self, event: Any) -> Dataset:
        """Handles one C-STORE request; always returns a status, never raises."""
        started = time.perf_counter()
        record = self._record_of(event.assoc)
        label = record.label if record is not None else "association ?"
        try:
            answer = self._store(event, record, label)
        except Refusal as refusal:
            metrics.REJECTS.labels(reason=refusal.reason).inc()
            logger.warning("%s: instance refused, status 0x%04X (%s)", label, refusal.status, refusal.reason)
            answer = _answer(refusal.status, refusal.comment)
        except Exception as exc:  # a handler must answer; the sender retries an out-of-resources refusal
            metrics.REJECTS.labels(reason="internal_error").inc()
            logger.error("%s: instance not stored: %s", label, type(exc).__name__)
            answer = _answer(STATUS_OUT_OF_RESOURCES, "internal error; nothing was stored")
        if record is not None:
            if answer.Status == STATUS_SUCCESS:
                record.accepted += 1
            else:
                record.refused += 1
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        return answer

    def _store(self, event: Any, record: AssociationRecord | None, label: str) -> Dataset:
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        context = event.context
        if sop_class != str(context.abstract_syntax) or sop_class not in self._classes:
            raise Refusal(STATUS_SOP_CLASS_NOT_SUPPORTED, "sop_class_not_supported", "SOP class not supported here")
        transfer_syntax = str(context.transfer_syntax)

        # The dataset exactly as received; a view, so nothing is copied.
        data = request.DataSet.getbuffer()
        try:
            return self._receive(data, sop_class, sop_instance, transfer_syntax, record, label)
        finally:
            data.release()

    def _receive(
        self,
        data: memoryview,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        record: AssociationRecord | None,
        label: str,
    ) -> Dataset:
        facts = inspect_dataset(
            data,
            transfer_syntax=transfer_syntax,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            max_bytes=self._settings.max_instance_bytes,
            max_pixels=self._settings.max_pixels,
        )
        if facts.own_output is not None and not self._settings.gateway_store_own_outputs:
            metrics.OWN_OUTPUTS.inc()
            logger.info("%s: instance acknowledged, not stored or scored: %s", label, facts.own_output)
            return _answer(STATUS_SUCCESS)
        header = file_header(sop_class, sop_instance, transfer_syntax)
        identity = facts.content_sha256
        calling_ae = record.calling_ae if record is not None else None
        association_id = record.row_id if record is not None else None

        # Two tries: a concurrent association may commit the same study or instance first, and the
        # second try then sees it (and treats the instance as the duplicate it is).
        for attempt in (1, 2):
            existing = self._find(sop_instance)
            if existing is not None:
                if identity == existing.sha256 or identity == self._stored_identity(existing):
                    metrics.DUPLICATES.labels(action="identical").inc()
                    if existing.status == InstanceStatus.RECEIVED:
                        # Stored but never queued: a gateway that crashed between its commit and the
                        # enqueue. The camera's re-send is the occasion to queue it now rather than
                        # after the sweep's stuck_after (a second task for it is harmless: a claim
                        # skips work already done or held).
                        logger.info(
                            "%s: duplicate of instance %d acknowledged; it was never queued: queued", label, existing.id
                        )
                        self._submit(existing.id)
                    else:
                        logger.info("%s: duplicate of instance %d acknowledged, not scored again", label, existing.id)
                    return _answer(STATUS_SUCCESS)
                if self._settings.gateway_duplicate_policy == "keep_first":
                    metrics.DUPLICATES.labels(action="kept_first").inc()
                    logger.warning(
                        "%s: instance %d sent again with different content; first version kept (policy keep_first)",
                        label,
                        existing.id,
                    )
                    return _answer(STATUS_DUPLICATE_DISCARDED, "SOP Instance already stored with other content; kept")

            key = self._storage.new_key("in")

            def fill(out: BinaryIO) -> None:
                out.write(header)
                out.write(data)

            # The file is written durably under a temporary name, the row committed, and only then is
            # the file renamed into place: a gateway killed at any point leaves a temporary file and
            # no row (removed at the next start), or a row and its temporary file (put in place at
            # the next start), never a file without a row (see Storage.stage).
            try:
                staged = self._storage.stage(key, fill)
            except StorageError as exc:
                logger.error("%s: durable write failed: %s", label, type(exc.__cause__ or exc).__name__)
                raise Refusal(STATUS_OUT_OF_RESOURCES, "storage_failed", "could not store the instance") from None
            size = staged.size
            try:
                instance_id = self._commit(
                    facts, transfer_syntax, key, identity, size, calling_ae, association_id, existing
                )
            except IntegrityError:
                self._storage.discard(staged)
                if attempt == 2:
                    raise Refusal(STATUS_OUT_OF_RESOURCES, "database_failed", "could not record the instance") from None
                continue
            except Exception as exc:
                self._storage.discard(staged)
                logger.error("%s: instance row not committed (%s); file removed", label, type(exc).__name__)
                raise Refusal(STATUS_OUT_OF_RESOURCES, "database_failed", "could not record the instance") from None
            try:
                self._storage.publish(staged)
            except StorageError as exc:
                # The row stays, and the gateway's next start puts the file in place.
                logger.error(
                    "%s: instance %d not put in place: %s", label, instance_id, type(exc.__cause__ or exc).__name__
                )
                raise Refusal(STATUS_OUT_OF_RESOURCES, "storage_failed", "could not store the instance") from None

            if existing is not None:
                self._storage.delete(existing.storage_key)
                metrics.DUPLICATES.labels(action="replaced").inc()
                logger.warning(
                    "%s: instance %d replaced by new content (policy replace); it will be scored again",
                    label,
                    instance_id,
                )
            else:
                logger.debug("%s: stored instance %d (%d bytes)", label, instance_id, size)
            metrics.INSTANCES_RECEIVED.inc()
            metrics.BYTES_RECEIVED.inc(size)
            if facts.own_output is not None:
                metrics.OWN_OUTPUTS.inc()
                logger.info("%s: instance %d stored, not scored: %s", label, instance_id, facts.own_output)
            else:
                self._submit(instance_id)
            return _answer(STATUS_SUCCESS)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _find(self, sop_instance_uid: str) -> _Stored | None:
        """The stored instance with this UID; refuses with 0xA700 when the database cannot be asked.

        Without the answer the gateway cannot tell a duplicate from a new instance, nor record
        either, so it must not acknowledge.
        """
        try:
            with self._sessions() as session:
                row = session.execute(
                    select(
                        Instance.id,
                        Instance.sha256,
                        Instance.storage_key,
                        Instance.transfer_syntax_uid,
                        Instance.status,
                    ).where(Instance.sop_instance_uid == sop_instance_uid)
                ).first()
        except SQLAlchemyError as exc:
            logger.error("instance lookup failed: %s", type(exc).__name__)
            raise Refusal(STATUS_OUT_OF_RESOURCES, "database_failed", "database unavailable; not stored") from None
        return (
            None
            if row is None
            else _Stored(row.id, row.sha256, row.storage_key, row.transfer_syntax_uid, str(row.status))
        )

    def _stored_identity(self, stored: _Stored) -> str | None:
        """The content identity of a row hashed the old way, and the row brought to this definition.

        Only asked when a re-send's identity differs from the row's, so a row that holds the sha256
        of the whole stored file (our header included, as before this definition) is recognised as
        the same content instead of being answered 0xB006 or replaced. ``None`` for a row of the
        current form (its identity was compared already) or a file that cannot be read as one this
        gateway wrote; the re-send then counts as different content.
        """
        try:
            raw = self._storage.path(stored.storage_key).read_bytes()
        except (OSError, ValueError):
            return None
        start = _dataset_offset(raw)
        if start is None or hashlib.sha256(raw).hexdigest() != stored.sha256:
            return None
        dataset: bytes | bytearray = raw[start:]
        if stored.transfer_syntax_uid == DEFLATED_SYNTAX:
            try:
                dataset = encoded.inflate(dataset, limit=encoded.inflate_limit(3 * self._settings.max_pixels))
            except InputError:
                return None
        identity = hashlib.sha256(dataset).hexdigest()
        try:
            with self._sessions() as session, session.begin():
                session.execute(update(Instance).where(Instance.id == stored.id).values(sha256=identity))
        except SQLAlchemyError as exc:  # the row keeps the old form and is brought up to date next time
            logger.warning("instance %d: content identity not updated: %s", stored.id, type(exc).__name__)
        return identity

    def _commit(
        self,
        facts: InstanceFacts,
        transfer_syntax: str,
        key: str,
        identity: str,
        size: int,
        calling_ae: str | None,
        association_id: int | None,
        existing: _Stored | None,
    ) -> int:
        now = utcnow()
        with self._sessions() as session, session.begin():
            study = session.scalars(select(Study).where(Study.study_uid == facts.study_uid)).first()
            if study is None:
                study = Study(
                    study_uid=facts.study_uid, accession=facts.accession, first_received_at=now, last_received_at=now
                )
                session.add(study)
                session.flush()
            else:
                study.last_received_at = now
                if study.accession is None and facts.accession is not None:
                    study.accession = facts.accession
            instance = session.get(Instance, existing.id) if existing is not None else None
            if instance is None:
                instance = Instance(sop_instance_uid=facts.sop_instance_uid)
                session.add(instance)
            instance.study_id = study.id
            instance.series_uid = facts.series_uid
            instance.sop_class_uid = facts.sop_class_uid
            instance.transfer_syntax_uid = transfer_syntax
            instance.laterality = facts.laterality
            instance.rows = facts.rows
            instance.columns = facts.columns
            instance.frames = facts.frames
            instance.storage_key = key
            instance.pruned_at = None  # a replaced instance has its photograph again
            instance.sha256 = identity
            instance.size_bytes = size
            instance.calling_ae = calling_ae
            instance.association_id = association_id
            instance.received_at = now
            # Derived AI output (our own, sent back) is kept if asked, never scored: a routing loop
            # would otherwise score heatmaps of heatmaps.
            instance.status = InstanceStatus.SKIPPED if facts.own_output is not None else InstanceStatus.RECEIVED
            instance.status_changed_at = now
            instance.attempts = 0
            instance.last_error = f"not scored: {facts.own_output}"[:2000] if facts.own_output is not None else None
            session.flush()
            return instance.id


def _dataset_offset(raw: bytes) -> int | None:
    """Where the dataset starts in a file written with :func:`file_header`, or ``None``.

    The header is preamble, ``DICM`` and a File Meta group that starts with its own Group Length
    (``write_file_meta_info`` always writes it), so its end is read, not parsed.
    """
    if len(raw) < 144 or raw[128:132] != b"DICM" or raw[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return None
    (length,) = struct.unpack_from("<L", raw, 140)
    start = 144 + int(length)
    return start if start <= len(raw) else None
