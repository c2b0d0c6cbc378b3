"""STOW-RS delivery to the real Orthanc and its DICOMweb plugin on loopback, over HTTP and HTTPS: what
the destination says of each file, what Orthanc keeps, and what the deliveries table records."""

from __future__ import annotations

import json
import os
import re
import select as io_select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from retinagate.db import make_engine, session_factory, session_scope
from retinagate.destinations import Connection, SendResult, Timeouts
from retinagate.destinations.stow import StowDestination
from retinagate.models import Delivery, DeliveryStatus, Output
from retinagate.pacs import Orthanc, free_port
from retinagate.settings import Settings
from retinagate.storage import Storage
from worker.delivery import DeliveryOutcome, deliver_outputs, echo

pytestmark = pytest.mark.interop

FAST = Timeouts(connect=2, acse=5, dimse=10, network=10)
PLAIN = Connection(timeouts=FAST)


def _orthanc(workdir: Path, **options: Any) -> Orthanc:
    """A started Orthanc with the DICOMweb plugin; skipped where Orthanc or the plugin is missing (not under CI)."""
    try:
        return Orthanc(workdir, dicomweb=True, **options).start()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}; CI installs it, so this is a broken setup")
        pytest.skip(str(exc))


def _rest(server: Orthanc, method: str, path: str) -> Any:
    request = urllib.request.Request(server.url + path, method=method)  # noqa: S310 - loopback URL we built
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        body = response.read()
    return json.loads(body) if body else None


def _empty(server: Orthanc) -> Orthanc:
    """Deletes everything ``server`` holds (the module's Orthanc is shared by its tests)."""
    for patient in _rest(server, "GET", "/patients"):
        _rest(server, "DELETE", f"/patients/{patient}")
    assert server.instances() == []
    return server


@pytest.fixture(scope="module")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = _orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.kill()  # its data goes with the module: no need to wait for a graceful stop


@pytest.fixture
def orthanc(orthanc_server: Orthanc) -> Orthanc:
    """The module's plain-HTTP Orthanc, emptied."""
    return _empty(orthanc_server)


class TlsFront:
    """TLS in front of a plain HTTP server, as a reverse proxy (nginx) puts it: takes TLS connections on
    :attr:`port` with the certificate of ``context`` and relays their bytes to ``target_port``.

    Orthanc cannot serve HTTPS itself here (see :class:`retinagate.pacs.Orthanc`), so the DICOMweb
    client's TLS is tested against the real Orthanc behind this relay.
    """

    def __init__(self, target_port: int, context: ssl.SSLContext) -> None:
        self.target_port = target_port
        self.context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.handshakes_failed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        client.settimeout(30)
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshakes_failed += 1
            client.close()
            return
        with tls, socket.create_connection(("127.0.0.1", self.target_port), timeout=30) as upstream:
            while True:
                readable, _, _ = io_select.select([tls, upstream], [], [], 30)
                if not readable:
                    return
                try:
                    if tls in readable:
                        data = tls.recv(65536)
                        while data and tls.pending():
                            data += tls.recv(tls.pending())
                        if not data:
                            return
                        upstream.sendall(data)
                    if upstream in readable:
                        data = upstream.recv(65536)
                        if not data:
                            return
                        tls.sendall(data)
                except OSError:
                    return

    def stop(self) -> None:
        self._listener.close()


@pytest.fixture(scope="module")
def tls_front(orthanc_server: Orthanc, pki: Any) -> Iterator[TlsFront]:
    """HTTPS in front of the module's Orthanc: a certificate for 127.0.0.1 from the ``pki`` CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    front = TlsFront(orthanc_server.http_port, context)
    yield front
    front.stop()


@pytest.fixture
def https_root(tls_front: TlsFront, orthanc: Orthanc) -> str:
    """The DICOMweb root of the module's Orthanc (emptied) over HTTPS."""
    return f"https://127.0.0.1:{tls_front.port}/dicom-web"


def _dicom_file(folder: Path, name: str, *, without: str | None = None) -> tuple[Path, str]:
    """A small Secondary Capture file (4x4 pixels) in ``folder``, ``without`` one attribute; its path and UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "DW-TEST", "Test^Dicomweb", "OT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(16))
    if without is not None:
        delattr(ds, without)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def _eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Whether ``condition`` holds within ``timeout_s`` (the relay's threads count a moment after the client)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _held(server: Orthanc) -> list[str]:
    return sorted(i.sop_instance_uid for i in server.instances())


def _deliver(settings: Settings, output_ids: list[int]) -> DeliveryOutcome:
    engine = make_engine(settings)
    try:
        storage = Storage(settings.resolved_storage_dir)
        return deliver_outputs(settings, session_factory(engine), storage, output_ids, timeouts=FAST)
    finally:
        engine.dispose()


def _rows_and_uids(settings: Settings, output_ids: list[int]) -> tuple[list[Delivery], list[str]]:
    engine = make_engine(settings)
    try:
        with session_scope(session_factory(engine)) as session:
            rows = list(session.scalars(select(Delivery).order_by(Delivery.output_id)))
            uids = sorted(session.scalars(select(Output.sop_instance_uid).where(Output.id.in_(output_ids))))
    finally:
        engine.dispose()
    return rows, uids


# --- the destination's verdicts, file by file --------------------------------------------------------


def test_stow_rs_delivers_every_file_and_orthanc_keeps_exactly_those(orthanc: Orthanc, tmp_path: Path) -> None:
    files = [_dicom_file(tmp_path, f"f{i}") for i in range(3)]
    destination = StowDestination.parse(orthanc.dicomweb_url)
    assert destination is not None

    results = destination.send([(10 + i, path) for i, (path, _) in enumerate(files)], PLAIN)

    assert sorted(results) == [10, 11, 12]
    assert all(r.verdict == "delivered" and r.error is None for r in results.values()), results
    assert _held(orthanc) == sorted(uid for _, uid in files)
    assert all(orthanc.fetch(uid) == path.read_bytes() for path, uid in files)  # the stored bytes, as they are


def test_a_file_missing_from_storage_fails_and_the_others_are_delivered(orthanc: Orthanc, tmp_path: Path) -> None:
    (first, first_uid), (second, second_uid) = _dicom_file(tmp_path, "a"), _dicom_file(tmp_path, "b")
    destination = StowDestination(url=orthanc.dicomweb_url)

    results = destination.send([(1, first), (2, tmp_path / "gone.dcm"), (3, second)], PLAIN)

    assert results[1].verdict == results[3].verdict == "delivered"
    assert results[2].verdict == "failed" and "missing from storage" in (results[2].error or "")
    assert _held(orthanc) == sorted([first_uid, second_uid])


def test_an_instance_orthanc_refuses_fails_with_its_failure_reason_and_the_others_are_delivered(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    # Orthanc answers 400 when it refused one instance of the request, with the per-instance answer
    # (Referenced and Failed SOP Sequences) in the body: the instance it stored is delivered.
    good, good_uid = _dicom_file(tmp_path, "good")
    bad, _ = _dicom_file(tmp_path, "bad", without="StudyInstanceUID")
    destination = StowDestination(url=orthanc.dicomweb_url)

    results = destination.send([(1, good), (2, bad)], PLAIN)

    assert results[1].verdict == "delivered", results[1]
    assert results[2].verdict == "failed" and results[2].status == 0xC000, results[2]
    assert "0xC000" in (results[2].error or "")
    assert _held(orthanc) == [good_uid]


def test_nothing_listening_is_retried_and_does_not_echo(orthanc: Orthanc, tmp_path: Path) -> None:
    files = [_dicom_file(tmp_path, f"f{i}")[0] for i in range(2)]
    down = StowDestination(url=f"http://127.0.0.1:{free_port()}/dicom-web")

    results = down.send([(1, files[0]), (2, files[1])], PLAIN)

    assert {k: r.verdict for k, r in results.items()} == {1: "retry", 2: "retry"}
    assert all("no answer" in (r.error or "") and "ConnectionError" in (r.error or "") for r in results.values())
    assert down.echo(PLAIN) is False
    assert StowDestination(url=orthanc.dicomweb_url).echo(PLAIN) is True


def test_a_wrong_root_is_failed_with_the_http_status_and_does_not_echo(orthanc: Orthanc, tmp_path: Path) -> None:
    files = [_dicom_file(tmp_path, f"f{i}")[0] for i in range(2)]
    wrong = StowDestination(url=f"{orthanc.url}/not-dicomweb")

    results = wrong.send([(1, files[0]), (2, files[1])], PLAIN)

    assert {k: r.verdict for k, r in results.items()} == {1: "failed", 2: "failed"}
    assert all(r.error == "STOW-RS answered HTTP 404" for r in results.values()), results
    assert wrong.echo(PLAIN) is False
    assert orthanc.instances() == []


# --- the whole delivery: settings, deliveries table, Orthanc ------------------------------------------


def test_deliver_outputs_records_stow_rs_deliveries_and_does_not_send_them_twice(
    orthanc: Orthanc, make_settings: Callable[..., Settings], worker_store_outputs: Callable[..., list[int]]
) -> None:
    settings = make_settings(destinations=orthanc.dicomweb_url)
    outputs = worker_store_outputs(settings, 2)

    outcome = _deliver(settings, outputs)

    rows, uids = _rows_and_uids(settings, outputs)
    assert len(outcome.delivered) == 2 and outcome.failed == outcome.retrying == []
    assert [r.destination for r in rows] == [orthanc.dicomweb_url] * 2
    assert all(r.status == DeliveryStatus.DELIVERED and r.attempts == 1 and r.last_error is None for r in rows)
    assert all(r.delivered_at is not None and r.dimse_status is None for r in rows)
    assert _held(orthanc) == uids

    _empty(orthanc)  # what the second call would send shows up in an empty Orthanc
    again = _deliver(settings, outputs)
    assert again.delivered == again.failed == again.retrying == []
    assert orthanc.instances() == []
    assert [r.attempts for r in _rows_and_uids(settings, outputs)[0]] == [1, 1]


# --- authentication ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An Orthanc whose REST and DICOMweb take only the user ``rg`` (HTTP Basic)."""
    server = _orthanc(tmp_path_factory.mktemp("guarded"), users={"rg": "s3cret"})
    yield server
    server.kill()  # its data goes with the module: no need to wait for a graceful stop


def test_basic_authentication_reads_the_password_from_its_file_and_a_wrong_one_is_refused(
    guarded: Orthanc, tmp_path: Path
) -> None:
    (photo, uid), (other, other_uid) = _dicom_file(tmp_path, "a"), _dicom_file(tmp_path, "b")
    password = tmp_path / "password"
    password.write_text("wrong\n")
    destination = StowDestination(url=guarded.dicomweb_url, username="rg", password_file=password)
    assert destination.send([(1, photo)], PLAIN)[1] == SendResult("failed", error="STOW-RS answered HTTP 401")
    assert destination.echo(PLAIN) is False
    assert StowDestination(url=guarded.dicomweb_url).send([(1, photo)], PLAIN)[1].verdict == "failed"

    password.write_text("s3cret\n")  # read at each send: a rotated secret needs no restart
    assert destination.send([(1, photo)], PLAIN)[1].verdict == "delivered" and destination.echo(PLAIN)
    password.unlink()
    gone = destination.send([(2, other)], PLAIN)[2]
    assert gone.verdict == "retry" and f"password_file {password} cannot be read" in (gone.error or "")
    assert not destination.echo(PLAIN)
    assert _held(guarded) == [uid] and other_uid not in _held(guarded)


def test_a_sender_refuses_to_start_when_a_destinations_secret_file_is_missing(
    guarded: Orthanc,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from retinagate.cli import EXIT_MISSING, main
    from retinagate.db import upgrade
    from retinagate.settings import load_settings

    table = {"address": guarded.dicomweb_url, "name": "guarded", "username": "rg", "password_file": "/nowhere/pw"}
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("RETINAGATE_DESTINATIONS", json.dumps([table]))
    upgrade(load_settings())

    assert main(["worker", "--queues", "deliver"]) == EXIT_MISSING
    assert "destination guarded: password_file /nowhere/pw cannot be read" in capsys.readouterr().err


@pytest.fixture
def odd_server() -> Iterator[tuple[str, list[dict[str, str]], list[tuple[int, str, bytes]]]]:
    """A DICOMweb root on loopback that answers each request with the next (status, content type, body)
    of a list the test fills, and records each request's headers: servers that are not Orthanc."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict[str, str]] = []
    answers: list[tuple[int, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(dict(self.headers))
            status, content_type, body = answers.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer  # noqa: N815 - the names http.server calls

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", seen, answers
    server.shutdown()


def test_a_bearer_token_goes_in_the_header_and_an_answer_that_is_no_stow_answer_is_tried_again(
    odd_server: tuple[str, list[dict[str, str]], list[tuple[int, str, bytes]]], tmp_path: Path
) -> None:
    root, seen, answers = odd_server
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    photo, uid = _dicom_file(tmp_path, "a")
    destination = StowDestination(url=root, token_file=token)

    answers.append((200, "application/dicom+json", b"not json"))
    garbage = destination.send([(1, photo)], PLAIN)[1]
    assert garbage.verdict == "retry" and "gave no STOW-RS answer" in (garbage.error or ""), garbage
    assert seen[-1]["Authorization"] == "Bearer t0ken"

    answers.append((200, "application/dicom+json", b"{}"))  # no sequences at all: a bare success
    assert destination.send([(1, photo)], PLAIN)[1].verdict == "delivered"
    silent = json.dumps({"00081199": {"vr": "SQ", "Value": []}}).encode()  # references nothing
    answers.append((200, "application/dicom+json", silent))
    assert destination.send([(1, photo)], PLAIN)[1].verdict == "retry"
    answers.append((503, "text/plain", b"busy"))
    assert destination.send([(1, photo)], PLAIN)[1] == SendResult("retry", error="STOW-RS answered HTTP 503")
    answers.append((200, "application/dicom+json", b"[]"))
    assert destination.echo(PLAIN) and seen[-1]["Authorization"] == "Bearer t0ken"
    assert uid  # the file was a real instance throughout


def _stored(*uids: str) -> bytes:
    """A STOW-RS answer that references ``uids``."""
    answer = Dataset()
    answer.ReferencedSOPSequence = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPInstanceUID = uid
        answer.ReferencedSOPSequence.append(item)
    return answer.to_json().encode()


def test_files_go_in_bounded_requests_and_a_request_too_large_is_split_until_the_server_takes_it(
    odd_server: tuple[str, list[dict[str, str]], list[tuple[int, str, bytes]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import retinagate.destinations.stow as stow

    root, seen, answers = odd_server
    monkeypatch.setattr(stow, "REQUEST_INSTANCES", 2)
    files = [_dicom_file(tmp_path, f"f{i}") for i in range(3)]
    (_, a), (_, b), (_, c) = files
    # Requests of at most two: [a, b] is too large for the server (413), then [a], [b], then [c].
    answers += [(413, "text/html", b"too large"), (200, "application/dicom+json", _stored(a)),
                (200, "application/dicom+json", _stored(b)), (200, "application/dicom+json", _stored(c))]  # fmt: skip

    results = StowDestination(url=root).send([(n, path) for n, (path, _) in enumerate(files)], PLAIN)

    assert {n: r.verdict for n, r in results.items()} == {0: "delivered", 1: "delivered", 2: "delivered"}
    assert len(seen) == 4 and answers == []
    answers.append((413, "text/html", b"too large"))  # one instance the server still finds too large: refused
    lone = StowDestination(url=root).send([(0, files[0][0])], PLAIN)[0]
    assert lone == SendResult("failed", error="STOW-RS answered HTTP 413")


# --- HTTPS ---------------------------------------------------------------------------------------------


def test_https_delivery_verifies_the_server_against_delivery_tls_ca(
    orthanc: Orthanc,
    https_root: str,
    pki: Any,
    make_settings: Callable[..., Settings],
    worker_store_outputs: Callable[..., list[int]],
) -> None:
    settings = make_settings(destinations=https_root, delivery_tls=True, delivery_tls_ca=pki.ca)
    outputs = worker_store_outputs(settings, 2)

    outcome = _deliver(settings, outputs)

    rows, uids = _rows_and_uids(settings, outputs)
    assert len(outcome.delivered) == 2, rows
    assert all(r.status == DeliveryStatus.DELIVERED and r.destination == https_root for r in rows)
    assert _held(orthanc) == uids
    assert echo(settings, https_root) is True


def test_https_without_delivery_tls_verifies_against_the_system_trust_store(
    orthanc: Orthanc,
    https_root: str,
    pki: Any,
    make_settings: Callable[..., Settings],
    worker_store_outputs: Callable[..., list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The system's trust store (as Connection documents it) is OpenSSL's default CA file, named here by
    # SSL_CERT_FILE: the test CA is in it. requests' own bundle (certifi, unless REQUESTS_CA_BUNDLE) is not.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    settings = make_settings(destinations=https_root)
    outputs = worker_store_outputs(settings, 1)

    outcome = _deliver(settings, outputs)

    rows, uids = _rows_and_uids(settings, outputs)
    assert len(outcome.delivered) == 1, rows
    assert _held(orthanc) == uids


@pytest.mark.parametrize("trust", ["system", "another CA"])
def test_https_to_an_untrusted_certificate_is_retried_and_sends_nothing(
    orthanc: Orthanc,
    https_root: str,
    tls_front: TlsFront,
    pki: Any,
    trust: str,
    make_settings: Callable[..., Settings],
    worker_store_outputs: Callable[..., list[int]],
) -> None:
    # Without delivery_tls, https roots are verified against the system's trust store, which does not hold
    # the test CA; with a CA bundle that did not issue the server's certificate, likewise. The TLS
    # handshake fails: no connection, so retried (the certificate may be renewed, the bundle fixed).
    tls = {} if trust == "system" else {"delivery_tls": True, "delivery_tls_ca": pki.stranger_cert}
    settings = make_settings(destinations=https_root, **tls)
    outputs = worker_store_outputs(settings, 2)
    refused = tls_front.handshakes_failed

    outcome = _deliver(settings, outputs)

    rows, _ = _rows_and_uids(settings, outputs)
    assert len(outcome.retrying) == 2 and outcome.delivered == [], rows
    assert all(r.status == DeliveryStatus.RETRYING and "SSLError" in (r.last_error or "") for r in rows), rows
    assert orthanc.instances() == []
    assert echo(settings, https_root) is False
    assert _eventually(lambda: tls_front.handshakes_failed >= refused + 2)  # the send's and the echo's


def test_delivery_tls_ca_is_the_only_trust_whatever_requests_ca_bundle_says(
    orthanc: Orthanc,
    https_root: str,
    pki: Any,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    worker_store_outputs: Callable[..., list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # requests passes REQUESTS_CA_BUNDLE to urllib3, which would load it into the delivery TLS context
    # (made once per process): the CA it names must not be trusted, now or in a later send.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca))
    bundle = tmp_path / "not-the-issuer.pem"  # a CA file of this test's own: the context cache is per path
    bundle.write_bytes(pki.stranger_cert.read_bytes())
    settings = make_settings(destinations=https_root, delivery_tls=True, delivery_tls_ca=bundle)
    outputs = worker_store_outputs(settings, 1)

    first, second = _deliver(settings, outputs), _deliver(settings, outputs)

    assert len(first.retrying) == 1 and len(second.retrying) == 1, (first, second)
    assert orthanc.instances() == []
    assert echo(settings, https_root) is False


def test_settings_refuse_an_http_root_while_delivery_tls_is_on(
    make_settings: Callable[..., Settings], pki: Any
) -> None:
    root = f"http://127.0.0.1:{free_port()}/dicom-web"
    message = f"delivery_tls is on, but {root} would be sent in the clear; use https://"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_settings(destinations=root, delivery_tls=True, delivery_tls_ca=pki.ca)
    https = make_settings(destinations=root.replace("http://", "https://"), delivery_tls=True, delivery_tls_ca=pki.ca)
    assert [d.name for d in https.destinations] == [root.replace("http://", "https://")]


# --- the test server itself ------------------------------------------------------------------------------


def test_orthanc_names_the_debian_package_when_the_dicomweb_plugin_is_missing(tmp_path: Path) -> None:
    try:
        Orthanc(tmp_path, dicomweb=False)
    except FileNotFoundError:
        pytest.skip("Orthanc is not installed")
    with pytest.raises(FileNotFoundError, match="'orthanc-dicomweb'"):
        Orthanc(tmp_path, dicomweb=True, dicomweb_plugin=tmp_path / "libOrthancDicomWeb.so")
    assert Orthanc(tmp_path).dicomweb_plugin is None  # off by default: no plugin needed
