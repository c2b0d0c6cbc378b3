"""STOW-RS destinations (a DICOMweb root such as ``https://pacs.example.org/dicom-web``).

dicomweb-client does the HTTP: a multipart POST carries the files (up to :data:`REQUEST_BYTES`, split
further on 413), and each answer's Referenced and Failed SOP Sequences say, instance by instance,
what the destination kept. A failed
instance's FailureReason is a DICOM status, judged as a C-STORE status is
(:func:`retinagate.destinations.base.classify_status`). When the whole request fails:

- transient: no connection (refused, timed out, TLS handshake), 408, 429 and every 5xx: retried
  with the same backoff as C-STORE;
- permanent: every other 4xx (400, 401, 403 and 404 for a wrong root or missing rights, 409, 413,
  415): recorded as failed, with the HTTP status in the error.

dicomweb-client's own retries are off: the delivery loop owns retrying, and the sweep's probe (a
QIDO-RS search for one study) says when a destination answers again. ``https`` is always verified,
with our own TLS context: the destination's client TLS when it is on
(:meth:`retinagate.settings.Settings.tls_for`: its CA, its client certificate), else the system's
trust store; never requests' own CA bundle or ``REQUESTS_CA_BUNDLE``. An ``http`` root is plain text
and is refused while TLS is on. HTTP Basic (``username``, ``password_file``) or a bearer token
(``token_file``) authenticate; the secret is read from its file at each send.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

from pydantic import model_validator

from retinagate.destinations.base import Connection, Destination, SendResult, Verdict, classify_status, read_output

__all__ = ["REQUEST_BYTES", "REQUEST_INSTANCES", "StowDestination"]

_SCHEMES = ("http", "https")
#: The most file bytes, and instances, one STOW-RS request carries; a server that finds a request too
#: large (413: nginx's default body limit is 1 MB) gets it split in two until it takes it.
REQUEST_BYTES = 8_000_000
REQUEST_INSTANCES = 64


class StowDestination(Destination):
    """A DICOMweb server that takes STOW-RS, written as its root URL (``https://host/dicom-web``)."""

    protocol: ClassVar[str] = "STOW-RS"
    form: ClassVar[str] = "http(s)://host[:port]/path (STOW-RS)"
    address_fields: ClassVar[frozenset[str]] = frozenset({"url"})

    url: str
    #: HTTP Basic authentication: the user, and a file holding the password.
    username: str | None = None
    password_file: Path | None = None
    #: Bearer authentication (``Authorization: Bearer <token>``): a file holding the token.
    token_file: Path | None = None

    @model_validator(mode="after")
    def _check_auth(self) -> Self:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file must be set together")
        if self.token_file is not None and self.username is not None:
            raise ValueError("choose token_file or username and password_file, not both")
        return self

    def check_files(self) -> None:
        self._authorization()

    def _authorization(self) -> str | None:
        """The ``Authorization`` header, its secret read from its file now (so a rotated token is
        used at the next send), or None without authentication.

        Raises:
            ValueError: Naming the file when it cannot be read or is empty.
        """
        secret_file = self.token_file if self.token_file is not None else self.password_file
        if secret_file is None:
            return None
        field = "token_file" if self.token_file is not None else "password_file"
        try:
            secret = secret_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"destination {self.name}: {field} {secret_file} cannot be read: {exc.__class__.__name__}"
            ) from None
        if not secret:
            raise ValueError(f"destination {self.name}: {field} {secret_file} is empty")
        if self.token_file is not None:
            return f"Bearer {secret}"
        import base64

        return "Basic " + base64.b64encode(f"{self.username}:{secret}".encode()).decode("ascii")

    @classmethod
    def parse(cls, text: str) -> Self | None:
        """Parses a DICOMweb root URL; None for text without a scheme (another kind's form).

        Raises:
            ValueError: For a URL of another scheme, without a host, with credentials (which would
                end up in logs and the database; the server should take the client certificate), or
                with a query or fragment.
        """
        text = text.strip()
        if "://" not in text:
            return None
        parts = urlsplit(text)
        if parts.scheme.lower() not in _SCHEMES:
            raise ValueError(f"destination {text!r}: a DICOMweb root is an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"destination {parts.scheme}://...@{parts.hostname}: credentials do not go in the URL "
                "(they would be logged and stored); use password_file, token_file or a client certificate"
            )
        if not parts.hostname:
            raise ValueError(f"destination {text!r} names no host")
        if parts.query or parts.fragment:
            raise ValueError(f"destination {text!r}: a DICOMweb root has no query or fragment")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise ValueError(f"destination {text!r}: {exc}") from None
        return cls(url=f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}")

    @property
    def address(self) -> str:
        return self.url

    @property
    def cleartext(self) -> bool:
        return self.url.startswith("http://")

    @contextmanager
    def _client(self, connection: Connection, authorization: str | None) -> Iterator[Any]:
        """A dicomweb-client for one send or probe, on an HTTP session closed afterwards."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        with requests.Session() as session:
            if authorization is not None:
                session.headers["Authorization"] = authorization
            if not self.cleartext:
                context = connection.ssl_context if connection.ssl_context is not None else _system_trust()
                session.mount("https://", _adapter_class()(context))
            timeouts = connection.timeouts
            client = DICOMwebClient(self.url, session=session, timeout=(timeouts.connect, timeouts.network))
            client.set_http_retry_params(retry=False)
            yield client

    def send(self, files: Sequence[tuple[int, Path]], connection: Connection) -> dict[int, SendResult]:
        """Sends the files in as few STOW-RS requests as they fit; a result per file from the answers."""
        from pydicom.filereader import read_file_meta_info

        results: dict[int, SendResult] = {}
        instances: list[_Instance] = []
        keys: dict[str, list[int]] = {}
        for key, path in files:
            meta = read_output(path, read_file_meta_info)
            if isinstance(meta, SendResult):
                results[key] = meta
                continue
            uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
            if not uid:
                results[key] = SendResult("failed", error="the output file is unreadable: no SOP Instance UID")
                continue
            if uid not in keys:
                data = read_output(path, Path.read_bytes)
                if isinstance(data, SendResult):
                    results[key] = data
                    continue
                instances.append(_Instance(uid, data))
            keys.setdefault(uid, []).append(key)
        if not instances:
            return results

        try:
            authorization = self._authorization()
        except ValueError as exc:  # its secret file cannot be read: tried again, and probed, until it can
            by_uid = dict.fromkeys(keys, SendResult("retry", error=str(exc)))
        else:
            with self._client(connection, authorization) as client:
                by_uid = self._store(client, instances)
        for uid, result in by_uid.items():
            results.update(dict.fromkeys(keys[uid], result))
        return results

    def _store(self, client: Any, instances: list[_Instance]) -> dict[str, SendResult]:
        """Each instance's result, sent in requests of at most :data:`REQUEST_BYTES` (and
        :data:`REQUEST_INSTANCES`); a request the server finds too large (413) is split in two until
        it holds one instance. No answer at all ends the send: the rest is tried again later."""
        import requests

        results: dict[str, SendResult] = {}
        pending = list(_chunks(instances))
        while pending:
            chunk = pending.pop(0)
            uids = [instance.uid for instance in chunk]
            try:
                answer = _store_files(client, [instance.data for instance in chunk])
            except requests.HTTPError as exc:
                response = exc.response
                status = response.status_code if response is not None else 0
                if status == 413 and len(chunk) > 1:
                    half = len(chunk) // 2
                    pending[:0] = [chunk[:half], chunk[half:]]
                    continue
                answer = _answer_of(response)
                if answer is None:  # no per-instance answer: the request's status decides for every file
                    results.update(
                        dict.fromkeys(uids, SendResult(_http_verdict(status), error=f"STOW-RS answered HTTP {status}"))
                    )
                    continue
            except (requests.ConnectionError, requests.Timeout) as exc:
                rest = [*uids, *(instance.uid for later in pending for instance in later)]
                error = f"no answer from {self.url}: {type(exc).__name__}"
                results.update(dict.fromkeys(rest, SendResult("retry", error=error)))
                break
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:  # a body that is no answer
                error = f"{self.url} gave no STOW-RS answer: {type(exc).__name__}"
                results.update(dict.fromkeys(uids, SendResult("retry", error=error)))
                continue
            try:
                results.update(_verdicts(answer, uids))
            except (ValueError, KeyError, TypeError) as exc:  # sequences whose items are not what STOW-RS writes
                error = f"{self.url} gave no STOW-RS answer: {type(exc).__name__}"
                results.update(dict.fromkeys(uids, SendResult("retry", error=error)))
        return results

    def echo(self, connection: Connection) -> bool:
        """Whether a QIDO-RS search for one study answers with success now."""
        import requests

        try:
            with self._client(connection, self._authorization()) as client:
                client.search_for_studies(limit=1)
        except (requests.RequestException, ValueError):
            return False
        return True


def _verdicts(answer: Any, uids: Sequence[str]) -> dict[str, SendResult]:
    """Each instance's result from a STOW-RS answer. An answer with no body at all (a 200 some servers
    give) means every instance was stored; otherwise an instance is delivered only where the answer
    references it, and one it neither references nor lists as failed is tried again."""
    referenced = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])}
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0x0110))
        for item in answer.get("FailedSOPSequence", [])
    }
    bare = "ReferencedSOPSequence" not in answer and "FailedSOPSequence" not in answer
    results: dict[str, SendResult] = {}
    for uid in uids:
        if uid in failed:
            status = failed[uid]
            results[uid] = SendResult(classify_status(status), status, f"STOW-RS failure reason 0x{status:04X}")
        elif uid in referenced or bare:
            results[uid] = SendResult("delivered")
        else:
            results[uid] = SendResult("retry", error="the STOW-RS answer neither references nor refuses this instance")
    return results


@dataclass(frozen=True)
class _Instance:
    uid: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def _store_files(client: Any, files: list[bytes]) -> Any:
    """dicomweb-client's STOW-RS request, with each file's bytes as they are stored.

    Its public ``store_instances`` takes datasets and encodes each one again: decoding and encoding
    the heatmap SC and the SR took 1.0 s of the 1.45 s it spent sending 64 of them to Orthanc
    (``bench/bench_delivery.py``), and would send bytes other than the ones stored. So this calls the
    two methods ``store_instances`` calls after encoding (the study URL, the multipart POST with its
    answer read), as C-STORE sends the stored bytes; the Orthanc tests cover them.
    """
    from dicomweb_client.web import _Transaction

    url = client._get_studies_url(_Transaction.STORE, None)
    return client._http_post_multipart_application_dicom(url, files)


def _chunks(instances: Sequence[_Instance]) -> Iterator[list[_Instance]]:
    """The instances in order, in requests of at most REQUEST_BYTES (file sizes) and REQUEST_INSTANCES;
    a larger instance goes alone."""
    chunk: list[_Instance] = []
    size = 0
    for instance in instances:
        if chunk and (size + instance.size > REQUEST_BYTES or len(chunk) >= REQUEST_INSTANCES):
            yield chunk
            chunk, size = [], 0
        chunk.append(instance)
        size += instance.size
    if chunk:
        yield chunk


def _http_verdict(status: int) -> Verdict:
    """Whether a failed STOW-RS request is worth another try, by its HTTP status."""
    return "retry" if status in (408, 429) or status >= 500 or status == 0 else "failed"


def _answer_of(response: Any) -> Any:
    """The STOW-RS answer (a pydicom dataset) carried by an error response, None without one."""
    import pydicom

    if response is None or not response.content:
        return None
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in (
        "",  # Orthanc sends its 400 (some instances refused) without a Content-Type
        "application/dicom+json",
        "application/json",
    ):
        return None
    try:
        answer = pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return answer if "ReferencedSOPSequence" in answer or "FailedSOPSequence" in answer else None


def _system_trust() -> ssl.SSLContext:
    """The system's trust store, TLS 1.2 or newer. Made for each send (loading the CAs takes a few
    milliseconds), so that it is the store as it is now (a CA bundle updated in place)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@cache
def _adapter_class() -> type[Any]:
    import requests.adapters

    class ContextAdapter(requests.adapters.HTTPAdapter):
        """An adapter that verifies, and presents the client certificate, with our own TLS context.

        requests would otherwise load its CA bundle into the context (``cert_verify``) and so trust
        more than ``delivery_tls_ca`` names.
        """

        def __init__(self, context: ssl.SSLContext) -> None:
            self._context = context
            super().__init__()

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = self._context
            super().init_poolmanager(*args, **kwargs)

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            """Nothing to add: the context verifies the server and holds the client certificate."""

        def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> Any:
            """requests' pool keys without a CA bundle: urllib3 would load the one ``verify`` names
            (``REQUESTS_CA_BUNDLE``) into our context, for good (requests 2.32 and newer)."""
            host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
            return host_params, pool_kwargs

    return ContextAdapter
