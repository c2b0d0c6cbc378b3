"""C-STORE destinations (``AE@host:port``): one association per send, TLS when the connection has it.

A DICOM answer says whether trying again can help (:func:`retinagate.destinations.base.classify_status`
for the status codes); besides those:

- transient: no connection (refused, timed out), an association rejected as transient, the
  association aborted or a DIMSE timeout;
- permanent: an association rejected as permanent, a SOP class or transfer syntax the destination
  does not accept (no presentation context).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

from pydantic import Field

from retinagate.destinations.base import Connection, Destination, SendResult, classify_status, read_output

__all__ = ["DimseDestination", "check_ae_title"]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash
_FORM = re.compile(r"\s*([^@]+)@([^:@\s/]+|\[[0-9a-fA-F:]+\]):(\d+)\s*")
_MAX_CONTEXTS = 128  # presentation contexts one association may propose
_JPEG_HINT = "; for a destination that takes no JPEG, set RETINAGATE_SC_COMPRESSION=none"


def check_ae_title(value: str, field: str) -> str:
    """``value`` without surrounding spaces; raises ``ValueError`` naming ``field`` if it is no AE title."""
    stripped = value.strip()
    if not _AE_TITLE.match(stripped):
        raise ValueError(f"{field}: {value!r} is not a DICOM AE title (1 to 16 printable characters)")
    return stripped


class DimseDestination(Destination):
    """A DICOM node that takes C-STORE, written ``AE@host:port``."""

    protocol: ClassVar[str] = "C-STORE"
    form: ClassVar[str] = "AE@host:port (C-STORE)"
    address_fields: ClassVar[frozenset[str]] = frozenset({"ae_title", "host", "port"})

    ae_title: str
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]

    @classmethod
    def parse(cls, text: str) -> Self | None:
        """Parses ``AE@host:port``; None for text without an ``@`` (another kind's form)."""
        if "@" not in text or "://" in text:
            return None
        match = _FORM.fullmatch(text)
        if match is None:
            raise ValueError(f"destination {text!r} is not of the form AE@host:port")
        ae, host, port = match.groups()
        return cls(ae_title=check_ae_title(ae, "destination AE title"), host=host.strip("[]"), port=int(port))

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"{self.ae_title}@{host}:{self.port}"

    def associate(self, connection: Connection, contexts: Iterable[tuple[str, Sequence[str] | None]]) -> Any:
        """A pynetdicom association with this node (established or not: the caller looks), proposing
        ``contexts`` (abstract syntax, and its transfer syntaxes or None for pynetdicom's default),
        with our AE title, TLS and timeouts, and Nagle's algorithm off on its socket."""
        from pynetdicom import AE, evt

        from retinagate.dicomnet import on_connection_open

        ae = AE(ae_title=connection.calling_ae)
        ae.connection_timeout = connection.timeouts.connect
        ae.acse_timeout = connection.timeouts.acse
        ae.dimse_timeout = connection.timeouts.dimse
        ae.network_timeout = connection.timeouts.network
        for abstract, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(abstract)
            else:
                ae.add_requested_context(abstract, list(syntaxes))
        return ae.associate(
            self.host,
            self.port,
            ae_title=self.ae_title,
            tls_args=(connection.ssl_context, self.host) if connection.ssl_context is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)],
        )

    def send(self, files: Sequence[tuple[int, Path]], connection: Connection) -> dict[int, SendResult]:
        """Sends the files over one association, each file's bytes as they are where its own transfer
        syntax is accepted."""
        from pydicom.filereader import read_file_meta_info
        from pydicom.uid import JPEGBaseline8Bit

        results: dict[int, SendResult] = {}
        contexts: dict[tuple[str, tuple[str, ...]], None] = {}
        sendable: list[tuple[int, Path, str, str]] = []
        for key, path in files:
            meta = read_output(path, read_file_meta_info)
            if isinstance(meta, SendResult):
                results[key] = meta
                continue
            sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            contexts.update(dict.fromkeys(_contexts(sop_class, ts)))
            sendable.append((key, path, sop_class, ts))
        if not sendable:
            return results

        if len(contexts) > _MAX_CONTEXTS:
            raise ValueError(
                f"files: {len(contexts)} presentation contexts, more than one association takes ({_MAX_CONTEXTS})"
            )
        assoc = self.associate(connection, contexts)
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            permanent = primitive is not None and primitive.result == 0x01
            reason = (
                f"association rejected ({primitive.result_str}; {primitive.source_str}; {primitive.reason_str})"
                if primitive is not None
                else "association rejected"
            )
            results.update({key: SendResult("failed" if permanent else "retry", error=reason) for key, *_ in sendable})
            return results
        accepted = assoc.acceptor.primitive
        if not assoc.is_established and accepted is not None and accepted.result == 0x00:
            # Accepted, then aborted by pynetdicom because no presentation context was: a configuration
            # mismatch that retrying cannot fix.
            unsupported = "the destination accepts none of the SOP classes or transfer syntaxes offered"
            results.update({key: SendResult("failed", error=unsupported) for key, *_ in sendable})
            return results
        if not assoc.is_established:
            refused = f"no association with {self.address}: connection refused, timed out or aborted"
            results.update({key: SendResult("retry", error=refused) for key, *_ in sendable})
            return results

        try:
            for key, path, sop_class, ts in sendable:
                if not assoc.is_established:
                    results[key] = SendResult("retry", error="the association ended before this file was sent")
                    continue
                try:
                    answer = _send_one(assoc, path, sop_class, ts)
                except ValueError as exc:  # no accepted presentation context for its SOP class or syntax
                    hint = _JPEG_HINT if ts == JPEGBaseline8Bit else ""  # the heatmap SC's syntax by default
                    results[key] = SendResult("failed", error=f"not accepted by the destination: {exc}{hint}")
                    continue
                except (OSError, RuntimeError) as exc:
                    results[key] = SendResult("retry", error=f"sending failed: {exc}")
                    continue
                if "Status" not in answer:
                    results[key] = SendResult("retry", error="no answer: DIMSE timeout or association aborted")
                    continue
                status = int(answer.Status)
                verdict = classify_status(status)
                error = None if verdict == "delivered" else f"C-STORE answered 0x{status:04X}"
                results[key] = SendResult(verdict, status, error)
        finally:
            if assoc.is_established:
                assoc.release()
        return results

    def echo(self, connection: Connection) -> bool:
        """Whether the node answers C-ECHO with success now."""
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        assoc = self.associate(connection, [(Verification, None)])
        if not assoc.is_established:
            return False
        try:
            answer = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        return "Status" in answer and int(answer.Status) == 0x0000


def _contexts(sop_class: str, ts: str) -> list[tuple[str, tuple[str, ...]]]:
    """Presentation contexts to propose for a file: its own transfer syntax alone, so that the file's
    bytes go out as they are, and for uncompressed files a fallback the file can be converted to."""
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    uid = UID(ts)
    exact: list[tuple[str, tuple[str, ...]]] = [(sop_class, (str(uid),))]
    if uid.is_compressed or uid.is_deflated:
        return exact  # pynetdicom cannot re-encode compressed pixel data: offer it as it is
    return [*exact, (sop_class, (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)))]


def _send_one(assoc: Any, path: Path, sop_class: str, ts: str) -> Any:
    """C-STORE of one file: its bytes as they are when its own transfer syntax was accepted (no
    decoding and re-encoding, which costs tens of milliseconds for an SR), else the decoded dataset,
    which pynetdicom converts to an accepted uncompressed syntax."""
    from pydicom import dcmread
    from pynetdicom import _config

    exact = any(cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts for cx in assoc.accepted_contexts)
    if exact:
        _config.STORE_SEND_CHUNKED_DATASET = True  # only this process's SCU sends; read per call
        return assoc.send_c_store(path)
    return assoc.send_c_store(dcmread(path))
