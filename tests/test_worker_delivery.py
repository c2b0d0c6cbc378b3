"""Delivery: C-STORE of outputs to real pynetdicom receivers on loopback, and what SQL records."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from retinagate.db import make_engine, session_factory, session_scope
from retinagate.destinations import Connection, Timeouts, classify_status
from retinagate.destinations import parse as parse_destination
from retinagate.models import Delivery, DeliveryStatus, Output, utcnow
from retinagate.settings import Settings
from retinagate.storage import Storage
from worker.delivery import deliver_outputs, retry_delay
from worker.lease import handoff_owner

FAST = Timeouts(connect=2, acse=5, dimse=10, network=10)
RG = Connection("RG", timeouts=FAST)


def _deliveries(settings: Settings) -> list[Delivery]:
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.output_id, Delivery.destination)))
    engine.dispose()
    return rows


def _uids(settings: Settings, output_ids: list[int]) -> set[str]:
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as session:
        uids = set(session.scalars(select(Output.sop_instance_uid).where(Output.id.in_(output_ids))))
    engine.dispose()
    return uids


def _deliver(settings: Settings, output_ids: list[int]) -> Any:
    engine = make_engine(settings)
    try:
        return deliver_outputs(
            settings,
            session_factory(engine),
            Storage(settings.resolved_storage_dir),
            output_ids,
            timeouts=FAST,
        )
    finally:
        engine.dispose()


def test_outputs_reach_every_destination_over_one_association_each_and_are_not_sent_twice(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]], worker_receiver: Any
) -> None:
    first, second = worker_receiver("PACS"), worker_receiver("VIEWER")
    settings = make_settings(destinations=f"{first.destination},{second.destination}")
    outputs = worker_store_outputs(settings, 3)

    outcome = _deliver(settings, outputs)

    expected = _uids(settings, outputs)
    assert set(first.received) == expected and len(first.received) == 3
    assert set(second.received) == expected and len(second.received) == 3
    assert first.associations == 1 and second.associations == 1
    rows = _deliveries(settings)
    assert len(rows) == 6 and len(outcome.delivered) == 6
    assert all(r.status == DeliveryStatus.DELIVERED and r.attempts == 1 and r.dimse_status == 0 for r in rows)
    assert all(r.delivered_at is not None for r in rows)

    again = _deliver(settings, outputs)
    assert again.delivered == [] and len(first.received) == 3 and first.associations == 1


def test_warning_statuses_count_as_delivered(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]], worker_receiver: Any
) -> None:
    receiver = worker_receiver()
    receiver.statuses = [0xB000, 0xB007, 0xB006]
    settings = make_settings(destinations=receiver.destination)
    outputs = worker_store_outputs(settings, 3)

    outcome = _deliver(settings, outputs)

    rows = _deliveries(settings)
    assert len(outcome.delivered) == 3 and not outcome.retry_outputs
    assert sorted(r.dimse_status or 0 for r in rows) == [0xB000, 0xB006, 0xB007]
    assert all(r.status == DeliveryStatus.DELIVERED for r in rows)


def test_a_refused_data_set_is_failed_at_once_and_not_retried(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]], worker_receiver: Any
) -> None:
    receiver = worker_receiver()
    receiver.statuses = [0xA900, 0x0122]
    settings = make_settings(destinations=receiver.destination)
    outputs = worker_store_outputs(settings, 2)

    outcome = _deliver(settings, outputs)

    assert len(outcome.failed) == 2 and outcome.retry_outputs == []
    rows = _deliveries(settings)
    assert {r.dimse_status for r in rows} == {0xA900, 0x0122}
    assert all(r.status == DeliveryStatus.FAILED and "0x" in (r.last_error or "") for r in rows)
    assert _deliver(settings, outputs).failed == []  # failed rows are not tried again
    assert len(receiver.received) == 2


def test_a_permanently_rejected_association_fails_the_deliveries(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]], worker_receiver: Any
) -> None:
    receiver = worker_receiver()
    receiver.reject = (0x01, 0x01, 0x07)  # rejected-permanent: called AE title not recognised
    settings = make_settings(destinations=receiver.destination)
    outputs = worker_store_outputs(settings, 1)

    outcome = _deliver(settings, outputs)

    assert len(outcome.failed) == 1 and not outcome.retry_outputs
    (row,) = _deliveries(settings)
    assert row.status == DeliveryStatus.FAILED and "rejected" in (row.last_error or "")


def test_transient_failures_are_retried_with_doubling_backoff_then_failed(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]], worker_receiver: Any
) -> None:
    busy = worker_receiver("BUSY")
    busy.reject = (0x02, 0x03, 0x02)  # rejected-transient: local limit exceeded
    down = worker_receiver("DOWN", start=False)  # nothing listens on its port
    full = worker_receiver("FULL")
    full.statuses = [0xA700] * 10  # out of resources
    settings = make_settings(
        destinations=f"{busy.destination},{down.destination},{full.destination}",
        delivery_backoff=1.5,
        delivery_max_retries=2,
    )
    outputs = worker_store_outputs(settings, 1)

    first = _deliver(settings, outputs)
    assert len(first.retrying) == 3 and first.retry_outputs == outputs and first.retry_in == 1.5
    assert {r.status for r in _deliveries(settings)} == {DeliveryStatus.RETRYING}

    second = _deliver(settings, outputs)
    assert len(second.retrying) == 3 and second.retry_in == 3.0

    third = _deliver(settings, outputs)
    assert len(third.failed) == 3 and third.retry_outputs == []
    rows = _deliveries(settings)
    assert all(r.status == DeliveryStatus.FAILED and r.attempts == 3 for r in rows)
    assert all("gave up after 3 attempts" in (r.last_error or "") for r in rows)
    by_destination = {r.destination: r for r in rows}
    assert by_destination[full.destination].dimse_status == 0xA700
    assert "rejected" in (by_destination[busy.destination].last_error or "")


def test_a_destination_added_after_scoring_gets_the_outputs_too(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]], worker_receiver: Any
) -> None:
    receiver = worker_receiver()
    before = make_settings()
    outputs = worker_store_outputs(before, 2)
    assert _deliver(before, outputs).delivered == []  # no destinations: nothing to do

    after = make_settings(destinations=receiver.destination)
    assert len(_deliver(after, outputs).delivered) == 2
    assert set(receiver.received) == _uids(after, outputs)


def test_a_sender_takes_over_deliveries_under_a_hand_off_lease_at_once_but_leaves_a_live_senders_alone(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]], worker_receiver: Any
) -> None:
    receiver = worker_receiver()
    settings = make_settings(destinations=receiver.destination)
    handed_off, sending = worker_store_outputs(settings, 2)
    soon = utcnow() + timedelta(seconds=60)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as session:
        for output_id, holder in ((handed_off, handoff_owner("scorer:1")), (sending, "sender:2")):
            session.add(
                Delivery(
                    output_id=output_id,
                    destination=receiver.destination,
                    status=DeliveryStatus.PENDING,
                    lease_owner=holder,
                    lease_expires_at=soon,
                )
            )
    engine.dispose()

    outcome = _deliver(settings, [handed_off, sending])

    assert len(outcome.delivered) == 1 and set(receiver.received) == _uids(settings, [handed_off])
    rows = {row.output_id: row for row in _deliveries(settings)}
    assert rows[handed_off].status == DeliveryStatus.DELIVERED and rows[handed_off].lease_owner is None
    assert rows[sending].status == DeliveryStatus.PENDING and rows[sending].lease_owner == "sender:2"


def test_a_missing_output_file_fails_that_delivery_only(
    make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]], worker_receiver: Any
) -> None:
    receiver = worker_receiver()
    settings = make_settings(destinations=receiver.destination)
    outputs = worker_store_outputs(settings, 2)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as session:
        key = session.get_one(Output, outputs[0]).storage_key
    engine.dispose()
    Storage(settings.resolved_storage_dir).delete(key)

    outcome = _deliver(settings, outputs)

    assert len(outcome.delivered) == 1 and len(outcome.failed) == 1
    assert len(receiver.received) == 1


def _uncompressed_copy(source: Path, target: Path) -> str:
    """The photograph re-encoded Explicit VR Little Endian under a new UID; returns the UID."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = dcmread(source)
    ds.decompress()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(target, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def test_a_file_goes_as_encoded_when_its_syntax_is_taken_else_converted_or_failed_with_a_hint(
    tmp_path: Path, worker_receiver: Any, camera_files: Callable[..., list[Path]]
) -> None:
    from pydicom import dcmread
    from pydicom.uid import ImplicitVRLittleEndian

    (jpeg,) = camera_files(1)
    plain = tmp_path / "plain.dcm"
    plain_uid = _uncompressed_copy(jpeg, plain)
    everything = worker_receiver("ALL")
    implicit_only = worker_receiver("OLD", syntaxes=[ImplicitVRLittleEndian])

    sent = parse_destination(everything.destination).send([(1, jpeg), (2, plain)], RG)
    old = parse_destination(implicit_only.destination).send([(1, jpeg), (2, plain)], RG)

    assert {r.verdict for r in sent.values()} == {"delivered"}
    assert everything.datasets[plain_uid].PixelData == dcmread(plain).PixelData
    assert old[2].verdict == "delivered" and implicit_only.received == [plain_uid]  # converted on the way
    assert implicit_only.datasets[plain_uid].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert old[1].verdict == "failed" and "RETINAGATE_SC_COMPRESSION=none" in (old[1].error or "")


def _server_tls(pki: Any, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.load_verify_locations(cafile=pki.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_with_delivery_tls_outputs_reach_a_tls_destination_that_checks_our_client_certificate(
    make_settings: Callable[..., Settings],
    worker_store_outputs: Callable[..., list[int]],
    worker_receiver: Any,
    pki: Any,
) -> None:
    secure = worker_receiver("SECURE", tls=_server_tls(pki, require_client_cert=True))
    settings = make_settings(
        destinations=secure.destination,
        delivery_tls=True,
        delivery_tls_ca=pki.ca,
        delivery_tls_cert=pki.client_cert,
        delivery_tls_key=pki.client_key,
    )
    outputs = worker_store_outputs(settings, 2)

    outcome = _deliver(settings, outputs)

    assert len(outcome.delivered) == 2 and set(secure.received) == _uids(settings, outputs)


def test_without_the_client_certificate_or_without_tls_nothing_is_delivered_and_it_is_retried(
    make_settings: Callable[..., Settings],
    worker_store_outputs: Callable[..., list[int]],
    worker_receiver: Any,
    pki: Any,
) -> None:
    secure = worker_receiver("SECURE", tls=_server_tls(pki, require_client_cert=True))
    no_client_cert = make_settings(destinations=secure.destination, delivery_tls=True, delivery_tls_ca=pki.ca)
    outputs = worker_store_outputs(no_client_cert, 1)

    assert _deliver(no_client_cert, outputs).retrying and secure.received == []
    plain = make_settings(destinations=secure.destination, data_dir=no_client_cert.data_dir)
    assert _deliver(plain, outputs).retrying and secure.received == []


def test_each_destination_has_its_own_tls_and_is_recorded_under_its_name(
    make_settings: Callable[..., Settings],
    worker_store_outputs: Callable[..., list[int]],
    worker_receiver: Any,
    pki: Any,
) -> None:
    import json

    local = worker_receiver("LOCAL")  # a PACS on the trusted network, no TLS
    remote = worker_receiver("REMOTE", tls=_server_tls(pki, require_client_cert=True))
    tables = [
        local.destination,
        {"address": remote.destination, "name": "remote", "tls": True, "tls_ca": str(pki.ca),
         "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)},
    ]  # fmt: skip
    settings = make_settings(destinations=json.dumps(tables))  # delivery_tls off: only "remote" uses TLS
    outputs = worker_store_outputs(settings, 2)

    outcome = _deliver(settings, outputs)

    assert len(outcome.delivered) == 4 and not outcome.retrying
    assert set(local.received) == set(remote.received) == _uids(settings, outputs)
    assert {row.destination for row in _deliveries(settings)} == {local.destination, "remote"}
    # The same TLS destination under the global setting, without its own client certificate: refused.
    no_identity = make_settings(
        destinations=json.dumps([{"address": remote.destination, "name": "bare", "tls": True, "tls_ca": str(pki.ca)}]),
        data_dir=settings.data_dir,
    )
    assert _deliver(no_identity, outputs).retrying and len(remote.received) == 2


def test_delivery_tls_files_are_checked_and_named() -> None:
    from retinagate.settings import SettingsError, load_settings
    from worker.delivery import check_destinations, client_tls_context

    with pytest.raises(SettingsError, match="delivery_tls_cert and delivery_tls_key"):
        load_settings(environ={}, delivery_tls=True, delivery_tls_cert="/x.crt")
    with pytest.raises(SettingsError, match="delivery_tls=true"):
        load_settings(environ={}, delivery_tls_ca="/ca.pem")
    with pytest.raises(ValueError, match=r"delivery_tls_ca: cannot load /nowhere/ca\.pem"):
        check_destinations(
            load_settings(environ={}, delivery_tls=True, delivery_tls_ca="/nowhere/ca.pem", destinations="P@h:104")
        )
    with pytest.raises(ValueError, match=r"destination archive tls_ca: cannot load /nowhere/own\.pem"):
        check_destinations(
            load_settings(
                environ={
                    "RETINAGATE_DESTINATIONS": '[{"address": "P@h:104", "name": "archive", "tls": true, '
                    '"tls_ca": "/nowhere/own.pem"}]'
                }
            )
        )
    plain = load_settings(environ={}, destinations="P@h:104")
    assert client_tls_context(plain.tls_for(plain.destinations[0])) is None


def test_a_send_reports_every_file_when_nothing_listens(
    tmp_path: Path, worker_receiver: Any, camera_files: Callable[..., list[Path]]
) -> None:
    down = parse_destination(worker_receiver(start=False).destination)
    (photo,) = camera_files(1)
    results = down.send([(1, tmp_path / "missing.dcm"), (2, photo)], RG)
    assert results[1].verdict == "failed" and "missing" in (results[1].error or "")
    assert results[2].verdict == "retry" and "no association" in (results[2].error or "")
    assert down.echo(RG) is False


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (0x0000, "delivered"),
        (0xB000, "delivered"),
        (0xB006, "delivered"),
        (0xB007, "delivered"),
        (0xA700, "retry"),
        (0xA7FF, "retry"),
        (0x0213, "retry"),
        (0xA900, "failed"),
        (0xC000, "failed"),
        (0x0122, "failed"),
        (0x0124, "failed"),
    ],
)
def test_dimse_statuses_are_classified(status: int, verdict: str) -> None:
    assert classify_status(status) == verdict


def test_retry_delay_doubles_up_to_the_cap(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(delivery_backoff=2.0, delivery_backoff_max=10.0)
    assert [retry_delay(settings, n) for n in (1, 2, 3, 4, 50)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="attempts"):
        retry_delay(settings, 0)


def test_delivery_associations_have_nagles_algorithm_off(
    nagle_spy: Callable[[Any], list[tuple[int, int]]],
    make_settings: Callable[..., Settings],
    worker_store_outputs: Callable[..., list[int]],
    worker_receiver: Any,
) -> None:
    import retinagate.dicomnet

    seen = nagle_spy(retinagate.dicomnet)
    receiver = worker_receiver("PACS")
    settings = make_settings(destinations=receiver.destination)

    assert len(_deliver(settings, worker_store_outputs(settings, 1)).delivered) == 1
    assert seen == [(receiver.port, 1)]
