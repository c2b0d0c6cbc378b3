"""The gateway: a pynetdicom AE with RetinaGate's policy, durable C-STORE handler and enqueuer.

Threads: pynetdicom accepts connections in one thread; each connection gets a thread of ours that
finishes the TLS handshake (so a slow or hostile client never holds up the accept loop), starts the
association, waits for it to end and completes its audit row. The association's own thread runs
the policy check (EVT_REQUESTED) and the DIMSE handlers. One enqueuer thread sends score tasks.

:meth:`Gateway.stop` is the graceful shutdown: stop accepting, let associations in flight finish
(up to a grace period, then abort them), send what is left to the broker, stop.
"""

from __future__ import annotations

import gc
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy import select, update

from dicom_gateway import metrics
from dicom_gateway.audit import ABORTED, OPEN, REJECTED, RELEASED, AssociationRecord, AuditLog
from dicom_gateway.enqueuer import Enqueuer
from dicom_gateway.handlers import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    StoreHandler,
    handle_echo,
)
from dicom_gateway.policy import AssociationPolicy, tls_context
from dicom_gateway.sop_classes import supported_contexts
from retinagate.dicomnet import disable_nagle
from retinagate.models import Instance, InstanceStatus, utcnow
from retinagate.storage import Storage

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.settings import Settings

__all__ = ["Gateway", "quiet_pynetdicom"]

logger = logging.getLogger(__name__)

#: How long aborted associations get to wind down after the grace period.
_ABORT_WAIT_S = 5.0

_local = threading.local()


def quiet_pynetdicom() -> None:
    """Turns off pynetdicom's event logging and identifier logging (patient data stays out of logs).

    Also makes sure C-STORE datasets arrive in memory (the handler writes them itself) and that
    unknown SOP classes are not accepted as storage.
    """
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_RECV_CHUNKED_DATASET = False
    _config.UNRESTRICTED_STORAGE_SERVICE = False


class _RequestHandler(RequestHandler):
    """Serves one connection: runs the association in its thread, then completes the audit row."""

    server: _GatewayServer

    def handle(self) -> None:
        gateway = self.server.gateway
        record = AssociationRecord(
            peer_address=str(self.client_address[0]),
            peer_port=int(self.client_address[1]),
            tls=self.server.ssl_context is not None,
        )
        _local.record, _local.assoc = record, None
        assoc: Any = None
        try:
            super().handle()  # creates the association, fires EVT_CONN_OPEN here, starts its thread
            assoc = _local.assoc
            if assoc is not None:
                assoc.join()
        finally:
            gateway._finish(record, assoc)


#: The audit reason of a connection that never asked for an association.
_NO_REQUEST = "connection closed before an association request"


def _on_conn_close(event: Any) -> None:
    """Lets go at once of a connection closed before it asked for an association.

    A TCP probe (a load balancer's health check, ``nc -z``) connects and closes without a word of
    DICOM. pynetdicom's DUL sees the close (AA-5), but the acceptor's thread still waits
    ``acse_timeout`` for an A-ASSOCIATE-RQ that cannot come, holding a thread and, at stop, the whole
    grace period. ``None`` on the DUL's queue to the user is what that wait reads as "timed out": it
    then ends the association as it would at the timeout (pynetdicom's maintainer suggested the same
    for a failed connection, pydicom/pynetdicom#618).
    """
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


class _GatewayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved out of the accept loop."""

    gateway: Gateway
    block_on_close = False
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections = 0
        self._connections_lock = threading.Lock()

    def get_request(self) -> tuple[Any, Any]:
        client, address = cast(socket.socket, self.socket).accept()
        disable_nagle(client)  # C-STORE responses go out at once (see retinagate.dicomnet)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        # Counted here, in the accept loop, so a stop that follows never misses a fresh connection.
        with self._connections_lock:
            self._connections += 1
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.gateway.settings.gateway_acse_timeout)
                    request.do_handshake()
                    request.settimeout(None)
                except (OSError, ValueError) as exc:
                    self.gateway._tls_failed(client_address, exc)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections -= 1

    def finish_request(self, request: Any, client_address: Any) -> None:
        _RequestHandler(request, client_address, self)

    def shutdown(self) -> None:
        # pynetdicom's shutdown also unregisters from ae._servers, which make_server never joined.
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def live_connections(self) -> int:
        """Connections accepted and not yet finished (audit row completed)."""
        with self._connections_lock:
            return self._connections


class Gateway:
    """RetinaGate's DICOM gateway.

    Args:
        settings: Everything ``gateway_*``, the caps, the database, storage and broker.
        sessions: Session factory (default: one on ``make_engine(settings)``, disposed at stop).
        send: Sends one score task for a batch of instance ids (default:
            ``retinagate.queue.enqueue_score``).
        bind: ``(host, port)`` to listen on instead of ``gateway_host``/``gateway_port``; port 0
            picks a free port (see :attr:`address`).
        breaker_seconds: How long the enqueuer waits after a broker failure.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sessions: sessionmaker[Session] | None = None,
        send: Callable[[Sequence[int]], None] | None = None,
        bind: tuple[str, int] | None = None,
        breaker_seconds: float = 15.0,
    ) -> None:
        from retinagate.db import make_engine, session_factory
        from retinagate.queue import enqueue_score

        self.settings = settings
        self._engine: Engine | None = None
        if sessions is None:
            self._engine = make_engine(settings)
            sessions = session_factory(self._engine)
        self.sessions = sessions
        self.storage = Storage(settings.resolved_storage_dir)
        self.policy = AssociationPolicy.from_settings(settings)
        self.ssl_context = tls_context(settings)
        self.audit = AuditLog(sessions)
        self._bind = bind or (settings.gateway_host, settings.gateway_port)

        def send_to_broker(ids: Sequence[int]) -> None:
            enqueue_score(settings, ids)

        self.enqueuer = Enqueuer(
            send or send_to_broker,
            self._mark_queued,
            batch_size=settings.gateway_batch_size,
            linger=settings.gateway_batch_linger,
            breaker_seconds=breaker_seconds,
        )
        self._records: dict[Any, AssociationRecord] = {}
        self._records_lock = threading.Lock()
        self.store_handler = StoreHandler(settings, self.storage, sessions, self.enqueuer.submit, self.record_of)
        self._server: _GatewayServer | None = None
        self._thread: threading.Thread | None = None
        self._metrics_server: Any | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` the gateway listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the gateway is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def record_of(self, assoc: Any) -> AssociationRecord | None:
        """The audit record of a running association."""
        with self._records_lock:
            return self._records.get(assoc)

    def _build_ae(self) -> AE:
        settings = self.settings
        ae = AE(ae_title=settings.gateway_ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.supported_contexts = supported_contexts(settings)
        ae.maximum_associations = settings.gateway_max_associations
        ae.maximum_pdu_size = settings.gateway_max_pdu
        ae.acse_timeout = settings.gateway_acse_timeout
        ae.dimse_timeout = settings.gateway_dimse_timeout
        ae.network_timeout = settings.gateway_network_timeout
        # The policy (EVT_REQUESTED) checks AE titles and addresses itself, to audit the reason.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        return ae

    def start(self) -> tuple[str, int]:
        """Starts listening, the enqueuer and (with ``metrics_port``) the metrics endpoint.

        Returns:
            The ``(host, port)`` the gateway listens on.

        Raises:
            OSError: When the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the gateway is already running")
        quiet_pynetdicom()
        # A gateway (or worker) killed in the middle of a write left its temporary file behind.
        stale = self.storage.remove_stale_temporaries(committed=self._has_row)
        if stale:
            logger.warning("finished or removed %d temporary file(s) of writes a killed process left", stale)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, _on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_PDU_RECV, self._on_pdu_received),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self.store_handler),
        ]
        ae = self._build_ae()
        self._metrics_server = metrics.start_metrics_server(self.settings.metrics_port, self.settings.gateway_host)
        try:
            server = cast(
                _GatewayServer,
                ae.make_server(
                    self._bind, evt_handlers=handlers, ssl_context=self.ssl_context, server_class=_GatewayServer
                ),
            )
        except BaseException:
            metrics.stop_metrics_server(self._metrics_server)
            self._metrics_server = None
            raise
        server.gateway = self
        # pynetdicom's server runs a full gc.collect() every 60 polls (dead association threads are
        # cycles); over everything imported and set up by now that took 0.2-0.5 s, with the GIL held
        # and every association stalled. Frozen, those objects are no longer scanned.
        gc.freeze()
        self.enqueuer.start()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="gateway-accept", daemon=True
        )
        self._thread.start()
        host, port = self.address
        logger.info(
            "gateway %s listening on %s:%d (%s, %d storage classes)",
            self.settings.gateway_ae_title,
            host,
            port,
            "TLS" if self.ssl_context else "no TLS",
            len(ae.supported_contexts) - 1,
        )
        return host, port

    def stop(self, grace: float = 20.0) -> None:
        """Graceful shutdown: stop accepting, let associations finish (abort them after ``grace``
        seconds), send what is pending to the broker, release the database."""
        server = self._server
        if server is None:
            return
        server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        deadline = time.monotonic() + grace
        while server.live_connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.live_connections():
            with self._records_lock:
                running = list(self._records)
            logger.warning("aborting %d association(s) still open after %.0f s", len(running), grace)
            for assoc in running:
                try:
                    assoc.abort()
                except Exception as exc:  # it may have ended meanwhile
                    logger.debug("abort failed: %s", type(exc).__name__)
            deadline = time.monotonic() + _ABORT_WAIT_S
            while server.live_connections() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.enqueuer.stop()
        metrics.stop_metrics_server(self._metrics_server)
        self._metrics_server = None
        if self._engine is not None:
            self._engine.dispose()
        self._server = None
        logger.info("gateway stopped")

    # Event handlers. Notification handlers' exceptions are logged by pynetdicom, never raised.

    def _on_conn_open(self, event: Any) -> None:
        record: AssociationRecord = _local.record
        _local.assoc = event.assoc
        with self._records_lock:
            self._records[event.assoc] = record
        metrics.ACTIVE_ASSOCIATIONS.inc()

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        record = self.record_of(assoc)
        request = assoc.requestor.primitive
        calling, called = str(request.calling_ae_title), str(request.called_ae_title)
        if record is not None:
            record.calling_ae, record.called_ae = calling.strip()[:16], called.strip()[:16]
        peer = record.peer_address if record is not None else str(assoc.requestor.address)
        rejection = self.policy.check(peer_address=peer, calling_ae=calling, called_ae=called)
        if rejection is None:
            return
        if record is not None:
            record.outcome, record.reason = REJECTED, rejection.reason
        metrics.REJECTS.labels(reason=rejection.reason.replace(" ", "_")).inc()
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
        assoc.kill()  # waits for the A-ASSOCIATE-RJ to go out, as pynetdicom's own rejections do

    def _on_accepted(self, event: Any) -> None:
        record = self.record_of(event.assoc)
        if record is not None:
            self.audit.opened(record)
            logger.info("%s accepted from %s", record.label, record.peer_address)

    def _on_pdu_received(self, event: Any) -> None:
        # pynetdicom holds a whole dataset in memory before the C-STORE handler sees it, so a sender
        # could exhaust memory with one huge instance. Datasets up to twice max_instance_bytes are
        # received and refused with 0xA700 by the handler; beyond that the association is aborted.
        pdu = event.pdu
        items = getattr(pdu, "presentation_data_value_items", None)
        if not items:
            return
        record = self.record_of(event.assoc)
        if record is None:
            return
        for item in items:
            value = item.presentation_data_value
            if not value or value[0] & 0x01:  # command fragment
                continue
            record.dataset_bytes += len(value) - 1
            if record.dataset_bytes > 2 * self.settings.max_instance_bytes and record.outcome == OPEN:
                record.outcome, record.reason = ABORTED, "dataset over twice max_instance_bytes"
                metrics.REJECTS.labels(reason="too_large_aborted").inc()
                logger.warning("%s: aborting, dataset over twice max_instance_bytes", record.label)
                event.assoc.abort()
                return
            if value[0] & 0x02:  # last fragment of this dataset
                record.dataset_bytes = 0

    def _tls_failed(self, client_address: Any, exc: BaseException) -> None:
        record = AssociationRecord(
            peer_address=str(client_address[0]),
            peer_port=int(client_address[1]),
            tls=True,
            outcome=REJECTED,
            reason=f"TLS handshake failed ({type(exc).__name__})",
        )
        metrics.REJECTS.labels(reason="tls_handshake_failed").inc()
        metrics.ASSOCIATIONS.labels(outcome=REJECTED).inc()
        self.audit.closed(record)
        logger.warning("%s: TLS handshake failed (%s)", record.label, type(exc).__name__)

    def _finish(self, record: AssociationRecord, assoc: Any) -> None:
        if assoc is not None:
            with self._records_lock:
                known = self._records.pop(assoc, None) is not None
            if known:
                metrics.ACTIVE_ASSOCIATIONS.dec()
            if record.outcome == OPEN:
                if assoc.requestor.primitive is None:  # a TCP probe: see _on_conn_close
                    record.outcome, record.reason = ABORTED, _NO_REQUEST
                elif assoc.is_released:
                    record.outcome = RELEASED
                elif assoc.is_rejected:
                    primitive = assoc.acceptor.primitive
                    record.outcome = REJECTED
                    limit = (primitive.result_source, primitive.diagnostic) == (0x03, 0x02)
                    record.reason = (
                        "local limit exceeded"
                        if limit
                        else f"rejected (source {primitive.result_source}, diagnostic {primitive.diagnostic})"
                    )
                    metrics.REJECTS.labels(reason="local_limit_exceeded" if limit else "rejected_other").inc()
                else:
                    record.outcome = ABORTED
                    record.reason = "aborted" if assoc.is_aborted else "connection closed without release"
        else:
            record.outcome, record.reason = ABORTED, _NO_REQUEST
        self.audit.closed(record)
        metrics.ASSOCIATIONS.labels(outcome=record.outcome).inc()
        logger.info(
            "%s ended: %s (%d accepted, %d refused)%s",
            record.label,
            record.outcome,
            record.accepted,
            record.refused,
            f", {record.reason}" if record.reason else "",
        )

    def _has_row(self, key: str) -> bool:
        """Whether an instance row points at storage ``key`` (a write whose row was committed)."""
        with self.sessions() as session:
            return session.scalar(select(Instance.id).where(Instance.storage_key == key).limit(1)) is not None

    def _mark_queued(self, ids: Sequence[int]) -> None:
        now = utcnow()
        with self.sessions() as session, session.begin():
            session.execute(
                update(Instance)
                .where(Instance.id.in_(list(ids)), Instance.status == InstanceStatus.RECEIVED)
                .values(status=InstanceStatus.QUEUED, status_changed_at=now)
            )
