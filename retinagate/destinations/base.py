"""What every destination kind shares: the interface, a send's result, and how this process connects.

A destination is a typed, frozen value parsed once from the settings (``AE@host:port``, an
``https://`` DICOMweb root, ...). Its :attr:`Destination.name` is what the ``deliveries`` table
stores; the sender looks the value up by that name (:meth:`retinagate.settings.Settings.destination`)
and never parses the text again. A kind says whether a file went, should go again later, or cannot
go, in the same three verdicts, so the delivery loop, its retries and the sweep's probes do not know
which protocol carried it.

Importing this module loads pydantic only: the gateway validates settings with it.
"""

from __future__ import annotations

import ssl
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Connection",
    "Destination",
    "SendResult",
    "Timeouts",
    "TlsFiles",
    "Verdict",
    "classify_status",
    "read_output",
]

Verdict = Literal["delivered", "retry", "failed"]

_T = TypeVar("_T")

_TRANSIENT_FAILURES = frozenset({0x0110, 0x0213, 0xFE00})


def classify_status(status: int) -> Verdict:
    """What a DICOM status (a C-STORE response, or a STOW-RS instance's FailureReason) means for the
    delivery: delivered, retry later, or failed.

    Success and warnings are delivered; out of resources (0xA7xx), resource limitation (0x0213),
    processing failure (0x0110) and cancel (0xFE00) are worth another try; every other failure is
    permanent (a SOP class not supported, a data set the destination cannot take).
    """
    from pynetdicom.status import code_to_category

    if status < 0:
        raise ValueError(f"status: {status} is not a DIMSE status (0x0000-0xFFFF)")
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return "delivered"
    if 0xA700 <= status <= 0xA7FF or status in _TRANSIENT_FAILURES:
        return "retry"
    return "failed"


@dataclass(frozen=True)
class SendResult:
    """The result of sending one file: the verdict, the DICOM status when one came back, and why."""

    verdict: Verdict
    status: int | None = None
    error: str | None = None


def read_output(path: Path, read: Callable[[Path], _T]) -> _T | SendResult:
    """``read(path)``, or the failed result of an output file missing from storage or unreadable
    (the same for every protocol: sending again cannot help)."""
    from pydicom.errors import InvalidDicomError

    try:
        return read(path)
    except FileNotFoundError:
        return SendResult("failed", error="the output file is missing from storage")
    except (InvalidDicomError, AttributeError, OSError) as exc:
        return SendResult("failed", error=f"the output file is unreadable: {exc}")


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for the TCP connection, association set-up, each DIMSE answer and the network.

    DICOMweb uses ``connect`` for the connection and ``network`` for each read.
    """

    connect: float = 10.0
    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0


@dataclass(frozen=True)
class TlsFiles:
    """The client TLS of one destination: the CA to verify it against (None: the system's trust
    store), our certificate and key (None: none offered), and the settings they came from."""

    ca: Path | None
    cert: Path | None
    key: Path | None
    source: str = "delivery_tls"


@dataclass(frozen=True)
class Connection:
    """How this process sends, whatever the destination: our AE title, client TLS, timeouts.

    Attributes:
        calling_ae: Our AE title (DIMSE).
        ssl_context: Client TLS (verification, client certificate); None sends DIMSE in the clear and
            verifies ``https`` against the system's trust store.
        timeouts: Network timeouts.
    """

    calling_ae: str = "RETINAGATE"
    ssl_context: ssl.SSLContext | None = None
    timeouts: Timeouts = Timeouts()


class Destination(BaseModel):
    """A node that receives RetinaGate's outputs: one kind of protocol per subclass.

    Subclasses are registered in :mod:`retinagate.destinations.registry`. Besides its address, a
    destination may carry a name of its own and its own TLS: each ``tls*`` field left out follows the
    ``delivery_tls*`` setting of the same name (:meth:`retinagate.settings.Settings.tls_for`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    #: The protocol, as the operator reads it (``C-STORE``, ``STOW-RS``).
    protocol: ClassVar[str]
    #: The form of the setting that names one, for error messages.
    form: ClassVar[str]
    #: The fields :meth:`parse` fills from the address; every other field is a setting of its own.
    address_fields: ClassVar[frozenset[str]]

    label: str | None = Field(None, alias="name", min_length=1, max_length=120)
    tls: bool | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    @abstractmethod
    def parse(cls, text: str) -> Self | None:
        """The destination ``text`` names, None when ``text`` is not this kind's form.

        Raises:
            ValueError: When ``text`` is of this kind's form but wrong (the message says how).
        """

    @property
    @abstractmethod
    def address(self) -> str:
        """Where it is, in the form :meth:`parse` reads (``AE@host:port``, a URL)."""

    @property
    def name(self) -> str:
        """What the ``deliveries`` table stores, logs show and the operator types: the name given in
        the settings, else the address."""
        return self.label if self.label is not None else self.address

    def __str__(self) -> str:
        return self.name

    @property
    def options(self) -> dict[str, Any]:
        """The settings beyond the address (for ``config show``), without those left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=set(self.address_fields))

    @classmethod
    def option_names(cls) -> set[str]:
        """The keys a settings table may give beside ``address``."""
        return {field.alias or name for name, field in cls.model_fields.items() if name not in cls.address_fields}

    @property
    def cleartext(self) -> bool:
        """Whether this destination is always reached in the clear (an ``http://`` URL), whatever its
        TLS settings: a destination whose TLS is on refuses such an address."""
        return False

    @model_validator(mode="after")
    def _check_identity(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self

    def check_files(self) -> None:
        """Reads what the destination reads at each send besides TLS files (a password, a token), so
        that a worker can refuse to start without them. Raises ``ValueError`` naming the file."""

    @abstractmethod
    def send(self, files: Sequence[tuple[int, Path]], connection: Connection) -> dict[int, SendResult]:
        """Sends DICOM files; a :class:`SendResult` for every key of ``files`` (``(key, path)`` pairs)."""

    @abstractmethod
    def echo(self, connection: Connection) -> bool:
        """Whether the destination answers now (C-ECHO, an HTTP query); any failure is a no."""
