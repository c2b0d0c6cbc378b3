"""The gateway's C-STORE handler over real associations on loopback: durable receive, refusals that
leave nothing behind, duplicates, enqueueing into a real Redis, and logs without patient data."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import logging
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from sqlalchemy import select

from dicom_gateway import handlers, metrics
from dicom_gateway.sop_classes import is_valid_uid
from retinagate import storage as storage_module
from retinagate.db import make_engine, session_factory
from retinagate.models import Association, Instance, InstanceStatus, Study

OP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG = "1.2.840.10008.1.2.4.50"
EXPLICIT = "1.2.840.10008.1.2.1"


def _associate(gateway: Any, calling: str = "CAMERA", contexts: Iterable[tuple[str, str]] = ()) -> Any:
    ae = AE(ae_title=calling)
    for uid, syntax in [(OP, JPEG), (OP, EXPLICIT), *contexts]:
        ae.add_requested_context(uid, [syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    host, port = gateway.address
    assoc = ae.associate(host, port, ae_title=gateway.settings.gateway_ae_title)
    assert assoc.is_established
    return assoc


def _send(gateway: Any, items: Iterable[Path | Dataset], calling: str = "CAMERA") -> list[int]:
    assoc = _associate(gateway, calling)
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def _instances(settings: Any) -> list[Instance]:
    engine = make_engine(settings)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))
    finally:
        engine.dispose()


def _associations(settings: Any) -> list[Association]:
    engine = make_engine(settings)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(select(Association).order_by(Association.id)))
    finally:
        engine.dispose()


def _stored_files(settings: Any) -> list[Path]:
    root = settings.resolved_storage_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def _queued_ids(redis_url: str) -> list[int]:
    import redis

    client = redis.Redis.from_url(redis_url)
    ids: list[int] = []
    for raw in client.lrange("score", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "retinagate.score"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.extend(args[0])
    return ids


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _refused_cleanly(gateway: Any) -> None:
    assert _instances(gateway.settings) == []
    assert _stored_files(gateway.settings) == []


@pytest.fixture
def empty_redis(redis_url: str) -> str:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


def test_a_camera_study_is_stored_durably_and_queued_for_scoring(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]], empty_redis: str
) -> None:
    gateway = start_gateway(broker_url=empty_redis)
    files = camera_files(4)

    assert _send(gateway, files) == [0, 0, 0, 0]

    _wait_for(lambda: all(i.status == InstanceStatus.QUEUED for i in _instances(gateway.settings)))
    rows = _instances(gateway.settings)
    assert len(rows) == 4
    for row, source in zip(rows, files, strict=True):
        stored = gateway.storage.path(row.storage_key)
        data = stored.read_bytes()
        # The content identity is the dataset as sent, our File Meta Information left out.
        sent = encode(dcmread(source), False, True)
        assert sent is not None and data.endswith(sent)
        assert hashlib.sha256(sent).hexdigest() == row.sha256
        assert len(data) == row.size_bytes
        original, received = dcmread(source), dcmread(stored)
        assert received.SOPInstanceUID == original.SOPInstanceUID == row.sop_instance_uid
        assert received.file_meta.TransferSyntaxUID == JPEG == row.transfer_syntax_uid
        assert received.PixelData == original.PixelData
        assert (row.rows, row.columns, row.frames) == (192, 256, 1)
        assert row.calling_ae == "CAMERA"
        assert not row.storage_key.count(row.sop_instance_uid)  # keys are the server's, not the sender's
    assert sorted(_queued_ids(empty_redis)) == [row.id for row in rows]
    assert {row.laterality for row in rows} == {"R", "L"}

    engine = make_engine(gateway.settings)
    with session_factory(engine)() as session:
        study = session.scalars(select(Study)).one()
        assert study.study_uid == dcmread(files[0]).StudyInstanceUID
        assert study.last_received_at >= max(row.received_at for row in rows)
    engine.dispose()
    _wait_for(lambda: _associations(gateway.settings)[0].outcome == "released")
    audit = _associations(gateway.settings)[0]
    assert (audit.calling_ae, audit.called_ae, audit.instances_accepted, audit.instances_refused) == (
        "CAMERA",
        "RETINAGATE",
        4,
        0,
    )
    assert {row.association_id for row in rows} == {audit.id}


@pytest.mark.slow  # the producer takes about 6 s to give up on an unreachable broker
def test_with_the_broker_down_the_instance_is_acknowledged_and_stays_received(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_gateway")
    failures = metrics.ENQUEUE_FAILURES._value.get()
    gateway = start_gateway(broker_url=f"redis://127.0.0.1:{_closed_port()}/0")

    assert _send(gateway, camera_files(2)) == [0, 0]

    _wait_for(lambda: metrics.ENQUEUE_FAILURES._value.get() >= failures + 1)
    assert [row.status for row in _instances(gateway.settings)] == [InstanceStatus.RECEIVED] * 2
    assert all(gateway.storage.path(row.storage_key).is_file() for row in _instances(gateway.settings))
    assert "broker unavailable" in caplog.text


def test_instances_are_queued_once_the_broker_comes_back(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    broker_up = False
    sent: list[list[int]] = []

    def send(ids: Any) -> None:
        if not broker_up:
            raise ConnectionError("broker down")
        sent.append(list(ids))

    gateway = start_gateway(send=send, breaker_seconds=0.3)
    assert _send(gateway, camera_files(2)) == [0, 0]
    _wait_for(lambda: gateway.enqueuer.breaker_open)
    broker_up = True

    _wait_for(lambda: all(i.status == InstanceStatus.QUEUED for i in _instances(gateway.settings)))
    assert sorted(i for batch in sent for i in batch) == [row.id for row in _instances(gateway.settings)]


def test_a_truncated_file_cannot_be_understood_and_leaves_nothing(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = start_gateway()
    source = camera_files(1)[0]
    truncated = source.with_name("truncated.dcm")
    truncated.write_bytes(source.read_bytes()[:-500])
    # Sends the file's bytes as they are, without pydicom re-encoding (and repairing) them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    assert _send(gateway, [truncated]) == [0xC210]
    _refused_cleanly(gateway)


def test_a_rows_columns_bomb_is_refused_as_out_of_resources_and_leaves_nothing(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    ds = dcmread(camera_files(1, transfer_syntax="explicit_little")[0])
    ds.Rows = ds.Columns = 65535

    assert _send(gateway, [ds]) == [0xA700]
    _refused_cleanly(gateway)


def test_short_pixel_data_is_refused_and_leaves_nothing(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    ds = dcmread(camera_files(1, transfer_syntax="explicit_little")[0])
    ds.PixelData = ds.PixelData[:1000]

    assert _send(gateway, [ds]) == [0xA900]
    _refused_cleanly(gateway)


def test_uids_that_differ_from_the_command_are_refused_and_leave_nothing(
    start_gateway: Callable[..., Any],
    camera_files: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    gateway = start_gateway()
    ds = dcmread(camera_files(1)[0])
    # The command's UIDs come from the File Meta Information when the file is sent as it is.
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.1")
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    encoded = encode(ds, False, True)
    assert encoded is not None
    mismatched = tmp_path / "mismatched.dcm"
    mismatched.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + encoded)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    assert _send(gateway, [mismatched]) == [0xA900]
    _refused_cleanly(gateway)


def test_an_unsupported_sop_class_is_refused_at_negotiation(start_gateway: Callable[..., Any]) -> None:
    gateway = start_gateway()
    assoc = _associate(gateway, contexts=[(CT, EXPLICIT)])
    try:
        refused = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == CT]
        assert refused and refused[0].result == 0x03  # abstract syntax not supported
        ct = Dataset()
        ct.SOPClassUID, ct.SOPInstanceUID = CT, "1.2.826.0.1.3680043.8.498.2"
        ct.file_meta = FileMetaDataset()
        ct.file_meta.TransferSyntaxUID = UID(EXPLICIT)
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(ct)
    finally:
        assoc.release()
    _refused_cleanly(gateway)


def test_a_store_for_another_sop_class_on_an_accepted_context_gets_0122(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    ds = dcmread(camera_files(1)[0])
    ds.SOPClassUID = CT
    assoc = _associate(gateway)
    try:
        context = next(cx for cx in assoc.accepted_contexts if cx.transfer_syntax[0] == JPEG)
        request = C_STORE()
        request.MessageID, request.Priority = 7, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CT, ds.SOPInstanceUID
        encoded = encode(ds, False, True)
        assert encoded is not None
        request.DataSet = io.BytesIO(encoded)
        # A conforming client cannot send this, so the test speaks DIMSE itself, pausing the
        # association's reactor first as pynetdicom's own send_* methods do.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        try:
            assoc.dimse.send_msg(request, context.context_id)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert response.Status == 0x0122
    finally:
        assoc.release()
    _refused_cleanly(gateway)


def test_a_duplicate_is_acknowledged_and_not_queued_again(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]], empty_redis: str
) -> None:
    gateway = start_gateway(broker_url=empty_redis)
    source = camera_files(1)[0]
    assert _send(gateway, [source]) == [0]
    _wait_for(lambda: _queued_ids(empty_redis) != [])

    assert _send(gateway, [source]) == [0]

    rows = _instances(gateway.settings)
    assert len(rows) == 1 and len(_stored_files(gateway.settings)) == 1
    time.sleep(0.3)  # a second task would be sent within milliseconds
    assert _queued_ids(empty_redis) == [rows[0].id]


def test_a_resend_of_an_instance_stored_but_never_queued_queues_it(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    # A gateway that crashed between its commit and the enqueue left the row `received`; the camera's
    # re-send used to be acknowledged as a duplicate and left it for the sweep (10 minutes).
    sent: list[int] = []
    gateway = start_gateway(send=sent.extend)
    source = camera_files(1)[0]
    assert _send(gateway, [source]) == [0]
    _wait_for(lambda: len(sent) == 1)
    engine = make_engine(gateway.settings)
    with session_factory(engine)() as session, session.begin():
        session.get_one(Instance, sent[0]).status = InstanceStatus.RECEIVED  # as the crash left it
    engine.dispose()

    assert _send(gateway, [source]) == [0]

    _wait_for(lambda: len(sent) == 2)
    assert sent == [sent[0], sent[0]] and len(_instances(gateway.settings)) == 1
    assert _instances(gateway.settings)[0].status == InstanceStatus.QUEUED


def test_different_content_under_a_known_uid_keeps_the_first_with_a_warning(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway(gateway_duplicate_policy="keep_first")
    source = camera_files(1)[0]
    assert _send(gateway, [source]) == [0]
    first = _instances(gateway.settings)[0]
    changed = dcmread(source)
    changed.SeriesDescription = "re-exported"

    assert _send(gateway, [changed]) == [0xB006]

    rows = _instances(gateway.settings)
    assert [(r.id, r.sha256, r.storage_key) for r in rows] == [(first.id, first.sha256, first.storage_key)]
    assert _stored_files(gateway.settings) == [gateway.storage.path(first.storage_key)]


def test_different_content_under_a_known_uid_replaces_and_rescores_with_the_replace_policy(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    sent: list[int] = []
    gateway = start_gateway(gateway_duplicate_policy="replace", send=sent.extend)
    source = camera_files(1)[0]
    assert _send(gateway, [source]) == [0]
    _wait_for(lambda: _instances(gateway.settings)[0].status == InstanceStatus.QUEUED)
    first = _instances(gateway.settings)[0]
    changed = dcmread(source)
    changed.SeriesDescription = "re-exported"

    assert _send(gateway, [changed]) == [0]

    _wait_for(lambda: len(sent) == 2)
    row = _instances(gateway.settings)[0]
    assert row.id == first.id and row.sha256 != first.sha256
    assert _stored_files(gateway.settings) == [gateway.storage.path(row.storage_key)]
    assert dcmread(gateway.storage.path(row.storage_key)).SeriesDescription == "re-exported"
    assert sent == [row.id, row.id]


def test_a_failed_write_answers_out_of_resources_and_leaves_nothing(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    (gateway.settings.resolved_storage_dir / "in").write_bytes(b"")  # the folder cannot be made: a file is there

    assert _send(gateway, camera_files(1)) == [0xA700]

    assert _instances(gateway.settings) == []
    assert _stored_files(gateway.settings) == [gateway.settings.resolved_storage_dir / "in"]


def test_a_failed_row_commit_removes_the_file_and_answers_out_of_resources(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    database = gateway.settings.resolved_database_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        connection.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON instances BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )

    assert _send(gateway, camera_files(1)) == [0xA700]

    _refused_cleanly(gateway)


def test_refused_instances_are_counted_in_the_audit_row(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway()
    good, bad = camera_files(2, transfer_syntax="explicit_little")
    short = dcmread(bad)
    short.PixelData = short.PixelData[:10]

    assert _send(gateway, [good, short]) == [0, 0xA900]

    _wait_for(lambda: _associations(gateway.settings)[0].outcome == "released")
    audit = _associations(gateway.settings)[0]
    assert (audit.instances_accepted, audit.instances_refused) == (1, 1)


def test_no_patient_data_reaches_the_logs_even_at_debug(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("pynetdicom", "pydicom", "dicom_gateway", "retinagate"):
        caplog.set_level(logging.DEBUG, logger=name)

    def broker_down(ids: Any) -> None:
        raise ConnectionError("broker down")

    gateway = start_gateway(send=broker_down)
    files = camera_files(2)
    source = dcmread(files[0])
    changed = dcmread(files[0])
    changed.SeriesDescription = "re-exported"
    short = dcmread(camera_files(1, study=1, transfer_syntax="explicit_little")[0])
    short.PixelData = short.PixelData[:10]

    assert _send(gateway, [*files, files[0], changed, short]) == [0, 0, 0, 0xB006, 0xA900]
    gateway.stop(grace=5)

    text = caplog.text
    assert "association" in text  # the gateway did log
    for value in (source.PatientName, source.PatientID, source.PatientBirthDate, short.PatientName, short.PatientID):
        assert str(value) not in text


def test_instances_of_one_association_go_out_as_one_score_task_of_at_most_the_batch_size(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    tasks: list[list[int]] = []
    gateway = start_gateway(send=lambda ids: tasks.append(list(ids)), gateway_batch_size=3, gateway_batch_linger=5.0)

    assert _send(gateway, camera_files(4)) == [0, 0, 0, 0]

    _wait_for(lambda: sum(map(len, tasks)) == 4)
    assert [len(task) for task in tasks] == [3, 1]  # a full batch at once, the rest after the linger
    assert sorted(i for task in tasks for i in task) == [row.id for row in _instances(gateway.settings)]


def test_an_identical_resend_after_a_gateway_restart_is_a_duplicate_and_different_content_still_is_not(
    start_gateway: Callable[..., Any],
    make_settings: Callable[..., Any],
    camera_files: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 14 defect 3: the stored file's header named the process, so a re-send after a restart
    was answered 0xB006 ("different content") and discarded."""
    settings = make_settings(gateway_duplicate_policy="keep_first")
    source = camera_files(1)[0]
    first = start_gateway(settings)
    assert _send(first, [source]) == [0]
    first.stop(grace=5)
    stored = _instances(settings)[0]
    # A new process of another release writes another header; the content is what counts.
    monkeypatch.setattr(handlers, "IMPLEMENTATION_CLASS_UID", "1.2.826.0.1.3680043.8.498.99")
    monkeypatch.setattr(handlers, "IMPLEMENTATION_VERSION_NAME", "RETINAGATE_9")
    second = start_gateway(settings)
    changed = dcmread(source)
    changed.SeriesDescription = "re-exported"

    assert _send(second, [source, changed]) == [0, 0xB006]

    rows = _instances(settings)
    assert [(r.id, r.sha256, r.storage_key) for r in rows] == [(stored.id, stored.sha256, stored.storage_key)]
    assert _stored_files(settings) == [second.storage.path(stored.storage_key)]


def test_the_implementation_class_uid_is_the_same_in_every_process() -> None:
    code = "from dicom_gateway.handlers import IMPLEMENTATION_CLASS_UID as u; print(u)"
    uids = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(uids) == 1
    assert is_valid_uid(uids.pop().strip())


def test_a_row_hashed_the_old_way_is_recognised_as_the_same_content_and_brought_up_to_date(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    gateway = start_gateway(gateway_duplicate_policy="keep_first")
    source = camera_files(1)[0]
    assert _send(gateway, [source]) == [0]
    row = _instances(gateway.settings)[0]
    old_style = hashlib.sha256(gateway.storage.path(row.storage_key).read_bytes()).hexdigest()
    with sqlite3.connect(gateway.settings.resolved_database_url.removeprefix("sqlite:///")) as connection:
        connection.execute("UPDATE instances SET sha256 = ? WHERE id = ?", (old_style, row.id))

    assert _send(gateway, [source]) == [0]

    assert [(r.id, r.sha256) for r in _instances(gateway.settings)] == [(row.id, row.sha256)]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_an_invalid_sop_instance_uid_is_refused_and_leaves_nothing(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    """Issue 14 defect 5: ``1.2.3/../../../etc/passwd`` was stored, scored and sent on in SC and SR."""
    gateway = start_gateway()
    ds = dcmread(camera_files(1)[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../../etc/passwd"

    assert _send(gateway, [ds]) == [0xA900]
    _refused_cleanly(gateway)


def test_sequences_nested_too_deep_cannot_be_understood_and_leave_nothing(
    start_gateway: Callable[..., Any],
    nested_sequences: Callable[[int], bytes],
    camera_files: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    gateway = start_gateway()
    source = camera_files(1, transfer_syntax="explicit_little")[0]
    ds = dcmread(source)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    encoded = encode(ds, False, True)
    assert encoded is not None
    nested = tmp_path / "nested.dcm"
    nested.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + nested_sequences(600) + encoded)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    assert _send(gateway, [nested]) == [0xC210]
    _refused_cleanly(gateway)


def test_a_full_volume_during_the_write_answers_out_of_resources_and_leaves_no_partial_file(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = start_gateway()
    real_write = storage_module._HashingWriter.write

    def write_until_full(self: Any, data: bytes | bytearray | memoryview) -> int:
        if self.size > 0:  # the header went out; the volume fills up during the dataset
            real_write(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(storage_module._HashingWriter, "write", write_until_full)
    rejects = metrics.REJECTS.labels(reason="storage_failed")._value.get()

    assert _send(gateway, camera_files(1)) == [0xA700]

    _refused_cleanly(gateway)  # no row, and no file: not even the temporary one
    assert metrics.REJECTS.labels(reason="storage_failed")._value.get() == rejects + 1
    monkeypatch.undo()
    assert _send(gateway, camera_files(1)) == [0]  # service resumes when space returns


def test_an_unreachable_database_answers_out_of_resources_rather_than_acknowledging(
    make_settings: Callable[..., Any], camera_files: Callable[..., list[Path]], tmp_path: Path
) -> None:
    from sqlalchemy import create_engine

    from dicom_gateway.server import Gateway

    settings = make_settings()
    unreachable = create_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'gone.db'}")
    gateway = Gateway(settings, sessions=session_factory(unreachable), bind=("127.0.0.1", 0), send=list)
    gateway.start()
    rejects = metrics.REJECTS.labels(reason="database_failed")._value.get()
    try:
        assert _send(gateway, camera_files(2)) == [0xA700, 0xA700]
    finally:
        gateway.stop(grace=5)
        unreachable.dispose()
    assert metrics.REJECTS.labels(reason="database_failed")._value.get() == rejects + 2
    assert _stored_files(settings) == []


def test_a_replaced_instance_whose_photograph_retention_pruned_has_its_photograph_again(
    start_gateway: Callable[..., Any], camera_files: Callable[..., list[Path]]
) -> None:
    from retinagate.db import make_engine, session_factory, session_scope
    from retinagate.models import Instance, utcnow

    sent: list[int] = []
    gateway = start_gateway(gateway_duplicate_policy="replace", send=sent.extend)
    source = camera_files(1)[0]
    assert _send(gateway, [source]) == [0]
    _wait_for(lambda: len(sent) == 1)
    engine = make_engine(gateway.settings)
    with session_scope(session_factory(engine)) as s:
        row = s.get_one(Instance, sent[0])
        row.pruned_at = utcnow()
        gateway.storage.delete(row.storage_key)
    engine.dispose()
    changed = dcmread(source)
    changed.SeriesDescription = "re-exported"

    assert _send(gateway, [changed]) == [0]

    _wait_for(lambda: len(sent) == 2)
    row = _instances(gateway.settings)[0]
    assert row.pruned_at is None and gateway.storage.path(row.storage_key).is_file()
