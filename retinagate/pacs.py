"""A local receiving PACS for the demo and the end-to-end tests.

:class:`Orthanc` runs the real Orthanc server (when installed) with a private configuration on free
ports; :class:`BuiltinReceiver` is a small pynetdicom C-STORE SCP that keeps what it receives in a
folder, for machines without Orthanc. Both answer the same questions: which instances arrived, and
in which study.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from retinagate.serve import stop_process

__all__ = [
    "DICOMWEB_PLUGIN",
    "BuiltinReceiver",
    "Orthanc",
    "ReceivedInstance",
    "Receiver",
    "free_port",
    "start_receiver",
]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class ReceivedInstance:
    """What a receiver holds: identifiers only, and where to fetch the file."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str


class Receiver(Protocol):
    """A DICOM node that RetinaGate delivers to."""

    ae_title: str
    port: int

    def instances(self) -> list[ReceivedInstance]: ...

    def fetch(self, sop_instance_uid: str) -> bytes: ...

    def stop(self) -> None: ...


#: Where Debian's ``orthanc-dicomweb`` package puts Orthanc's DICOMweb plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """A private Orthanc server: DICOM on ``port``, REST on ``http_port``, data in ``workdir``.

    Plain HTTP only: Debian 12's Orthanc serves HTTPS through civetweb 1.15, which calls
    ``SSL_get_peer_certificate``, gone from OpenSSL 3, and dies on the first HTTPS request.

    Args:
        workdir: Folder for the configuration, index and storage (a temporary one when None).
        ae_title: The AE title Orthanc answers to.
        executable: The Orthanc binary (found on PATH or in /usr/sbin when None).
        dicomweb: Load the DICOMweb plugin: STOW-RS, QIDO-RS and WADO-RS under :attr:`dicomweb_url`.
        dicomweb_plugin: The plugin's shared library (:data:`DICOMWEB_PLUGIN` when None).
        users: HTTP Basic users and their passwords; when given, every REST and DICOMweb request must
            authenticate (this object's own requests use the first user).
        extra: More configuration, over the defaults (``DicomModalities``, ``DicomAlwaysAllowMove``).

    Raises:
        FileNotFoundError: When Orthanc, or with ``dicomweb`` its DICOMweb plugin, is not installed.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        ae_title: str = "ORTHANC",
        executable: str | None = None,
        *,
        dicomweb: bool = False,
        dicomweb_plugin: Path | None = None,
        users: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        found = executable or shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
        if found is None:
            raise FileNotFoundError("Orthanc is not installed (Debian package 'orthanc')")
        self.executable = found
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.users = dict(users or {})
        self.config_extra = dict(extra or {})
        self.dicomweb_plugin: Path | None = None
        if dicomweb:
            plugin = Path(dicomweb_plugin) if dicomweb_plugin is not None else DICOMWEB_PLUGIN
            if not plugin.is_file():
                raise FileNotFoundError(
                    f"Orthanc's DICOMweb plugin is not installed (Debian package 'orthanc-dicomweb'): no {plugin}"
                )
            self.dicomweb_plugin = plugin

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (a STOW-RS destination); served when started with ``dicomweb``."""
        return f"{self.url}/dicom-web"

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "RetinaGate demo PACS",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "Plugins": [],
            "StableAge": 1,
        }
        if self.dicomweb_plugin is not None:
            config["Plugins"] = [str(self.dicomweb_plugin)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(self.config_extra)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log = (self.workdir / "orthanc.log").open("wb")
        # DCMTK as Debian builds it keeps Nagle's algorithm on unless TCP_NODELAY=1: each C-STORE response
        # would then wait on a delayed acknowledgement (see retinagate.dicomnet).
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.process = subprocess.Popen(
            [self.executable, str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None:
                    tail = (self.workdir / "orthanc.log").read_text(errors="replace")[-800:]
                    raise RuntimeError(f"Orthanc exited at start: {tail}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout_s:.0f} s") from None
                time.sleep(0.2)

    def _open(self, path: str, data: bytes | None = None, timeout: float = 10) -> bytes:
        """The body of a REST request (POST with ``data``), as the first user when there are users."""
        request = urllib.request.Request(self.url + path, data=data)  # noqa: S310 - loopback URL we built
        if self.users:
            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body: bytes = response.read()
            return body

    def _get(self, path: str) -> Any:
        return json.loads(self._open(path))

    def instances(self) -> list[ReceivedInstance]:
        out = []
        for orthanc_id in self._get("/instances"):
            tags = self._get(f"/instances/{orthanc_id}/simplified-tags")
            out.append(
                ReceivedInstance(
                    sop_instance_uid=tags.get("SOPInstanceUID", ""),
                    sop_class_uid=tags.get("SOPClassUID", ""),
                    study_uid=tags.get("StudyInstanceUID", ""),
                    series_uid=tags.get("SeriesInstanceUID", ""),
                    modality=tags.get("Modality", ""),
                )
            )
        return out

    def _instance_id(self, sop_instance_uid: str) -> str:
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        ids = json.loads(self._open("/tools/find", json.dumps(query).encode()))
        if not ids:
            raise KeyError(sop_instance_uid)
        return str(ids[0])

    def fetch(self, sop_instance_uid: str) -> bytes:
        return self._open(f"/instances/{self._instance_id(sop_instance_uid)}/file", timeout=30)

    def preview(self, sop_instance_uid: str) -> bytes:
        """The PNG Orthanc renders of a stored image (``/instances/{id}/preview``), as a viewer would show it.

        Raises:
            KeyError: If Orthanc holds no such instance.
            urllib.error.HTTPError: If Orthanc cannot render it (415 for pixels it cannot decode).
        """
        return self._open(f"/instances/{self._instance_id(sop_instance_uid)}/preview", timeout=30)

    def stop(self) -> None:
        """Stops the server the way Orthanc asks to be stopped (SIGTERM), waiting for it to exit.

        Orthanc 1.10 takes about 3.4 s to close its HTTP and DICOM servers, however idle.
        """
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Stops the server at once (SIGKILL), for one whose data is thrown away with it.

        A test PACS in a temporary folder gains nothing from :meth:`stop`'s wait; a PACS whose data is
        kept (the demo's) is stopped with :meth:`stop`.
        """
        self._end(signal.SIGKILL)

    def _end(self, signum: signal.Signals) -> None:
        if self.process is not None:
            stop_process(self.process, 15, signum)
        self.process = None


class BuiltinReceiver:
    """A pynetdicom storage SCP that writes every instance it receives into ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "RECEIVER", port: int | None = None) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = port or free_port()
        self._server: Any = None
        self._lock = threading.Lock()
        self._received: dict[str, ReceivedInstance] = {}
        self._files: dict[str, Path] = {}

    def start(self) -> BuiltinReceiver:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        from retinagate.dicomnet import on_connection_open

        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:  # every transfer syntax: a PACS stores what it gets
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open), (evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def _on_store(self, event: Any) -> int:
        ds = event.dataset  # parsed lazily: only the few attributes read below are decoded
        uid = str(ds.SOPInstanceUID)
        # Received names are never paths: files are numbered in arrival order. The bytes are
        # written as they came (a Part 10 file), not re-encoded.
        with self._lock:
            index = len(self._received)
            (self.folder / f"{index:06d}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
            self._received[uid] = ReceivedInstance(
                sop_instance_uid=uid,
                sop_class_uid=str(ds.SOPClassUID),
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                modality=str(ds.get("Modality", "")),
            )
            self._files[uid] = self.folder / f"{index:06d}.dcm"
        return 0x0000

    def instances(self) -> list[ReceivedInstance]:
        with self._lock:
            return list(self._received.values())

    def fetch(self, sop_instance_uid: str) -> bytes:
        with self._lock:
            path: Path = self._files[sop_instance_uid]
        return path.read_bytes()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def start_receiver(workdir: Path, prefer_orthanc: bool = True) -> Orthanc | BuiltinReceiver:
    """Orthanc when installed (and preferred), otherwise the built-in receiver."""
    if prefer_orthanc:
        try:
            return Orthanc(workdir / "orthanc").start()
        except FileNotFoundError:
            pass
    return BuiltinReceiver(workdir / "received").start()
