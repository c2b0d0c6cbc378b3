"""RetinaGate's one settings object.

Settings come from ``RETINAGATE_*`` environment variables and an optional TOML file (``--config`` on
the command line, or ``RETINAGATE_CONFIG``); environment variables win over the file. Each entry point
builds the object once with :func:`load_settings` and passes it down; nothing deeper reads
``os.environ``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from retinagate.destinations import Destination, TlsFiles
from retinagate.destinations import parse as parse_destination
from retinagate.destinations.dimse import check_ae_title

__all__ = ["Settings", "SettingsError", "load_settings"]


class SettingsError(ValueError):
    """Raised when the configuration is invalid; the message names every bad setting."""


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting RetinaGate reads. Field names map to ``RETINAGATE_<NAME>`` variables."""

    model_config = SettingsConfigDict(
        env_prefix="RETINAGATE_",
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    # Where things live.
    config: Path | None = Field(None, description="TOML file with settings (environment variables win).")
    data_dir: Path = Field(Path("var"), description="Root for the database, storage and embedded Redis.")
    database_url: str = Field("", description="SQLAlchemy URL; empty: SQLite file <data_dir>/retinagate.db.")
    broker_url: str = Field("", description="Celery broker (redis://...); empty: embedded Redis under data_dir.")
    storage_dir: Path | None = Field(None, description="Received and produced DICOM files; default <data_dir>/storage.")
    model_path: Path | None = Field(None, description="The ONNX model the worker serves.")
    serve_inactive_model: bool = Field(
        False,
        description="Let a worker serve a model that is not the active one (`retinagate models activate`); "
        "off, such a worker refuses to start.",
    )
    rescore_on_activate: bool = Field(
        True,
        description="The first worker serving a newly activated model queues the re-scoring of stored studies "
        "under it.",
    )

    # Inference.
    providers: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto", description="ONNX Runtime providers: auto tries TensorRT, then CUDA, then CPU."
    )
    intra_op_threads: Annotated[int, Field(ge=0, le=256)] = Field(
        0, description="CPU threads for ONNX Runtime; 0 lets ONNX Runtime choose."
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="Images per inference batch.")
    max_pixels: Annotated[int, Field(ge=1)] = Field(
        100_000_000, description="Cap on Rows x Columns x Frames of an instance, checked before decoding."
    )
    max_instance_bytes: Annotated[int, Field(ge=1024)] = Field(
        512 * 1024 * 1024, description="Largest DICOM instance accepted, in bytes."
    )

    gate: Literal["on", "off"] = Field(
        "on",
        description="Gradability gate: on marks photographs that are not gradable colour fundus photographs "
        "(no circular field of view, greyscale, out of focus, badly exposed, unlike the training data) "
        "'ungradable' instead of scoring them; off scores everything.",
    )

    # Outputs.
    outputs: Annotated[list[str], NoDecode] = Field(
        ["sc", "sr"],
        description="What to send back, any of the registered output kinds (retinagate.outputs.registry): "
        "sc (heatmap Secondary Capture), sr (Comprehensive SR), pm (Parametric Map).",
    )
    display_long_side: Annotated[int, Field(ge=256, le=8192)] = Field(
        1024, description="Long side of the heatmap Secondary Capture, in pixels."
    )
    top_findings: Annotated[int, Field(ge=1, le=29)] = Field(
        3, description="Disease findings drawn on the SC, and Parametric Maps made (one per finding), at most."
    )
    sc_compression: Literal["jpeg", "none"] = Field(
        "jpeg",
        description="Pixels of the heatmap SC: jpeg (JPEG Baseline, about 30x smaller) or none (uncompressed, "
        "for a destination that takes no JPEG).",
    )
    sc_jpeg_quality: Annotated[int, Field(ge=50, le=100)] = Field(
        90, description="JPEG quality (50-100) of the heatmap SC when sc_compression is jpeg."
    )
    deliver_min_probability: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0, description="Deliver outputs only when some finding reaches this probability (0: always)."
    )
    destinations: Annotated[list[Destination], NoDecode] = Field(
        [],
        description="Where outputs go, comma list of AE@host:port (C-STORE) and DICOMweb roots "
        "http(s)://host/path (STOW-RS); or a list (TOML, JSON) whose entries may be tables: address, name, "
        "tls, tls_ca, tls_cert, tls_key, and for STOW-RS username with password_file, or token_file.",
    )
    calling_ae_title: str = Field("RETINAGATE", description="AE title RetinaGate uses when it sends.")
    delivery_tls: bool = Field(
        False, description="Send to the destinations over TLS 1.2 or newer, verifying their certificates."
    )
    delivery_tls_ca: Path | None = Field(
        None, description="CA bundle (PEM) that destination certificates are verified against (default: the system's)."
    )
    delivery_tls_cert: Path | None = Field(
        None, description="Client certificate (PEM) for destinations that require one; set with the key."
    )
    delivery_tls_key: Path | None = Field(None, description="Private key (PEM) of the client certificate.")

    # Gateway.
    gateway_ae_title: str = Field("RETINAGATE", description="AE title the gateway answers to.")
    gateway_host: str = Field("0.0.0.0", description="Address the gateway listens on.")  # noqa: S104
    gateway_port: Annotated[int, Field(ge=1, le=65535)] = Field(11112, description="Port the gateway listens on.")
    gateway_allowed_ae_titles: Annotated[list[str], NoDecode] = Field(
        [], description="Calling AE titles allowed; empty allows any."
    )
    gateway_allowed_networks: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode] = Field(
        [], description="Peer networks allowed (CIDR); empty allows any."
    )
    gateway_tls_cert: Path | None = Field(None, description="Server certificate (PEM); set with key for TLS.")
    gateway_tls_key: Path | None = Field(None, description="Server private key (PEM).")
    gateway_tls_ca: Path | None = Field(None, description="CA bundle for client certificates.")
    gateway_tls_require_client_cert: bool = Field(
        True, description="With a CA bundle: require (true) or only verify offered (false) client certificates."
    )
    gateway_batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(
        8, description="Most instances per score task the gateway sends (one task shares commits and a delivery)."
    )
    gateway_batch_linger: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        0.2, description="Seconds the gateway waits for more instances before sending a score task that is not full."
    )
    gateway_max_associations: Annotated[int, Field(ge=1, le=1000)] = Field(32, description="Concurrent associations.")
    gateway_max_pdu: Annotated[int, Field(ge=0)] = Field(
        262_144, description="Maximum PDU size received (0: unlimited)."
    )
    gateway_acse_timeout: Annotated[float, Field(gt=0)] = Field(30.0, description="ACSE timeout, seconds.")
    gateway_dimse_timeout: Annotated[float, Field(gt=0)] = Field(60.0, description="DIMSE timeout, seconds.")
    gateway_network_timeout: Annotated[float, Field(gt=0)] = Field(60.0, description="Network timeout, seconds.")
    gateway_extra_sop_classes: Annotated[list[str], NoDecode] = Field(
        [], description="Extra storage SOP Class UIDs to accept."
    )
    gateway_duplicate_policy: Literal["keep_first", "replace"] = Field(
        "keep_first", description="What to do with a known SOP Instance UID whose content differs."
    )
    gateway_store_own_outputs: bool = Field(
        False,
        description="Store RetinaGate's own outputs sent back to the gateway (status skipped, never scored); "
        "off, they are acknowledged and dropped.",
    )
    study_quiet_seconds: Annotated[int, Field(ge=0)] = Field(
        300, description="A study counts as complete after this long without new instances."
    )
    study_reports: bool = Field(
        True,
        description="Write and deliver one study-level SR per complete study and model (refer / no referable "
        "finding / ungradable); off, only the per-photograph outputs are made.",
    )

    # Worker. The defaults and the rules between them are explained in the README ("Reliability").
    task_time_limit: Annotated[int, Field(ge=10)] = Field(
        120, description="Hard task time limit, seconds (a batch takes about 1 s on a CPU)."
    )
    visibility_timeout: Annotated[int, Field(ge=60)] = Field(
        1200,
        description="Redis visibility timeout, seconds; must exceed the task time limit plus the longest retry delay.",
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = Field(5, description="Tries before an instance fails.")
    lease_seconds: Annotated[int, Field(ge=10, le=3600)] = Field(
        60,
        description="A worker's claim on an instance or a delivery lasts this long and is renewed every third of "
        "it; the sweeper takes back work whose lease ran out (its worker died).",
    )
    sweep_interval: Annotated[int, Field(ge=5)] = Field(20, description="Seconds between sweeps.")
    stuck_after: Annotated[int, Field(ge=5)] = Field(
        600,
        description="Seconds after which a received or queued instance, or a pending delivery, with no worker on "
        "it is sent again; must exceed the task time limit plus the longest score retry delay.",
    )
    score_backoff: Annotated[float, Field(gt=0)] = Field(
        5.0, description="First score retry delay, seconds; doubles each time."
    )
    score_backoff_max: Annotated[float, Field(gt=0)] = Field(300.0, description="Longest score retry delay.")
    delivery_max_retries: Annotated[int, Field(ge=0, le=100)] = Field(8, description="Delivery retries.")
    delivery_backoff: Annotated[float, Field(gt=0)] = Field(
        2.0, description="First delivery retry delay, seconds; doubles each time."
    )
    delivery_backoff_max: Annotated[float, Field(gt=0)] = Field(600.0, description="Longest delivery retry delay.")
    delivery_probe_interval: Annotated[int, Field(ge=5)] = Field(
        30,
        description="Seconds between probes (C-ECHO, QIDO-RS) of a destination holding deliveries whose retries "
        "ran out; when it answers, they are sent again.",
    )
    rescore_cron: str = Field("0 2 * * *", description="When nightly rescoring runs (cron: min hour dom mon dow).")
    rescore_batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="Instances per rescore task.")
    retention_days: Annotated[int, Field(ge=0, le=36500)] = Field(
        0,
        description="Days a received photograph's file is kept; after that, once its work is finished (scored, "
        "ungradable, failed or skipped, and no delivery pending), a daily prune (03:30 UTC, or `retinagate "
        "storage prune`) removes the file and keeps its row, predictions, outputs and deliveries. 0: keep forever.",
    )

    # Observability.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        0, description="Prometheus metrics port for the gateway (0: off)."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or JSON.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_verbose: bool = Field(
        False,
        description="Libraries' own messages (Celery, Kombu, Alembic, highdicom) and Celery's banners at the log "
        "level too; off, they show from WARNING up (`retinagate -v` turns it on).",
    )

    # Secrets are held as SecretStr so they never print; see masked().
    database_password: SecretStr | None = Field(
        None, description="Password added to the database URL when the URL carries none."
    )

    @field_validator("outputs", mode="before")
    @classmethod
    def _parse_outputs(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("outputs")
    @classmethod
    def _check_outputs(cls, value: list[str]) -> list[str]:
        from retinagate.outputs import registry

        return registry.check(value)

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):  # a JSON list, for tables in the environment
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list of destinations: {exc}") from None
        items = _split_list(value)
        if isinstance(items, list):
            return [parse_destination(i) if isinstance(i, str | dict) else i for i in items]
        return items

    @field_validator("gateway_allowed_ae_titles", "gateway_extra_sop_classes", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("gateway_allowed_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: Any) -> Any:
        items = _split_list(value)
        if isinstance(items, list):
            try:
                return [ipaddress.ip_network(i, strict=False) if isinstance(i, str) else i for i in items]
            except ValueError as exc:
                raise ValueError(f"not a CIDR network: {exc}") from None
        return items

    @field_validator("gateway_ae_title", "calling_ae_title")
    @classmethod
    def _check_own_ae(cls, value: str) -> str:
        return check_ae_title(value, "AE title")

    @field_validator("gateway_allowed_ae_titles")
    @classmethod
    def _check_allowed(cls, value: list[str]) -> list[str]:
        return [check_ae_title(v, "allowed AE title") for v in value]

    @field_validator("rescore_cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a 5-field cron expression (minute hour day month weekday)")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if (self.gateway_tls_cert is None) != (self.gateway_tls_key is None):
            raise ValueError("gateway_tls_cert and gateway_tls_key must be set together")
        if self.gateway_tls_ca is not None and self.gateway_tls_cert is None:
            raise ValueError("gateway_tls_ca needs gateway_tls_cert and gateway_tls_key")
        if (self.delivery_tls_cert is None) != (self.delivery_tls_key is None):
            raise ValueError("delivery_tls_cert and delivery_tls_key must be set together")
        if not self.delivery_tls and any(
            p is not None for p in (self.delivery_tls_ca, self.delivery_tls_cert, self.delivery_tls_key)
        ):
            raise ValueError("delivery_tls_ca, _cert and _key take effect only with delivery_tls=true; set it")
        for destination in self.destinations:
            tls = self.tls_for(destination)
            if tls is not None and destination.cleartext:
                where = "delivery_tls" if tls.source == "delivery_tls" and destination.tls is None else "its tls"
                raise ValueError(f"{where} is on, but {destination.name} would be sent in the clear; use https://")
            if tls is None and (destination.tls_ca is not None or destination.tls_cert is not None):
                raise ValueError(f"destination {destination.name}: tls = false, but tls_ca, _cert or _key is set")
        names = [d.name for d in self.destinations]
        if len(set(names)) < len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"destinations: {', '.join(twice)} named more than once")
        # Celery holds a retry's message unacknowledged until its countdown ends and the task has run:
        # Redis must not hand it to a second worker meanwhile.
        longest_hold = self.task_time_limit + max(self.score_backoff_max, self.delivery_backoff_max)
        if self.visibility_timeout <= longest_hold:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout} s) must exceed task_time_limit plus the longest "
                f"retry delay (score_backoff_max, delivery_backoff_max): {longest_hold:g} s, or Redis hands a "
                "running or waiting task to a second worker"
            )
        # A queued instance waiting out a retry delay has no worker on it: the sweeper must not send it again.
        waiting = self.task_time_limit + self.score_backoff_max
        if self.stuck_after <= waiting:
            raise ValueError(
                f"stuck_after ({self.stuck_after} s) must exceed task_time_limit plus score_backoff_max "
                f"({waiting:g} s), or the sweeper re-sends instances that are waiting for their retry"
            )
        if self.score_backoff > self.score_backoff_max:
            raise ValueError("score_backoff must not exceed score_backoff_max")
        if self.delivery_backoff > self.delivery_backoff_max:
            raise ValueError("delivery_backoff must not exceed delivery_backoff_max")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings reads the environment and the TOML file itself, so tests can pass both in.
        return (init_settings,)

    # Derived locations.
    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'retinagate.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        """Where DICOM files are stored."""
        return self.storage_dir if self.storage_dir is not None else self.data_dir / "storage"

    @property
    def tls_enabled(self) -> bool:
        """Whether the gateway serves TLS."""
        return self.gateway_tls_cert is not None

    def tls_for(self, destination: Destination) -> TlsFiles | None:
        """The client TLS ``destination`` is reached with, None for none: each of its ``tls*``
        settings left out follows the ``delivery_tls*`` setting of the same name, except that giving
        it a CA or a certificate of its own turns its TLS on."""
        own = destination.tls_ca is not None or destination.tls_cert is not None
        if not (destination.tls if destination.tls is not None else own or self.delivery_tls):
            return None
        ca = destination.tls_ca if destination.tls_ca is not None else self.delivery_tls_ca
        own_identity = destination.tls_cert is not None
        cert = destination.tls_cert if own_identity else self.delivery_tls_cert
        key = destination.tls_key if own_identity else self.delivery_tls_key
        return TlsFiles(ca, cert, key, f"destination {destination.name} tls" if own else "delivery_tls")

    def destination(self, name: str) -> Destination | None:
        """The configured destination of that name (what the ``deliveries`` table stores), or None."""
        return next((d for d in self.destinations if d.name == name), None)

    def find_destination(self, text: str) -> Destination | None:
        """The configured destination an operator means by ``text``: its name, or its address in
        any spelling that parses to the same place (``PACS@[::1]:104``, a URL with a trailing ``/``)."""
        if (named := self.destination(text.strip())) is not None:
            return named
        try:
            address = parse_destination(text).address
        except ValueError:
            return None
        return next((d for d in self.destinations if d.address == address), None)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, with secrets and URL passwords masked."""
        data = self.model_dump(mode="json")
        for key in ("database_url", "broker_url"):
            data[key] = _mask_url(data[key])
        if data.get("database_password") is not None:
            data["database_password"] = "*****"  # noqa: S105 - the mask, not a password
        data["destinations"] = [
            {"address": d.address, **d.options} if d.options else d.address for d in self.destinations
        ]
        # Only settings, each of which an environment variable or TOML key sets; derived values such
        # as resolved_database_url would read as RETINAGATE_RESOLVED_* variables that do not exist.
        return data


def _mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1*****@", url)


class _TomlSource(TomlConfigSettingsSource):
    """Reads the TOML file; a ``[retinagate]`` table is used when present, else the top level."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls, toml_file=path)
        if isinstance(self.toml_data.get("retinagate"), dict):
            self.toml_data = self.toml_data["retinagate"]
            self.init_kwargs = self.toml_data


def load_settings(
    config: Path | str | None = None, environ: dict[str, str] | None = None, **overrides: Any
) -> Settings:
    """Builds the settings from the environment and an optional TOML file.

    Args:
        config: TOML file; falls back to ``RETINAGATE_CONFIG``.
        environ: The environment to read (default: the process environment). Entry points pass
            nothing; tests pass a dictionary.
        **overrides: Values that win over everything else (used by tests and the CLI).

    Raises:
        SettingsError: Naming each invalid setting and why.
    """
    import os

    env = dict(os.environ if environ is None else environ)
    path = Path(config) if config else (Path(env["RETINAGATE_CONFIG"]) if env.get("RETINAGATE_CONFIG") else None)
    file_values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise SettingsError(f"config: the TOML file {path} does not exist")
        try:
            file_values = dict(_TomlSource(Settings, path)())
        except Exception as exc:
            raise SettingsError(f"config: cannot read {path}: {exc}") from None
    env_values = {
        key[len("RETINAGATE_") :].lower(): value
        for key, value in env.items()
        if key.startswith("RETINAGATE_") and key != "RETINAGATE_CONFIG"
    }
    unknown = sorted(k for k in {*file_values, *env_values} if k not in Settings.model_fields)
    if unknown:
        names = ", ".join(f"RETINAGATE_{k.upper()}" for k in unknown)
        raise SettingsError(f"unknown setting(s): {names}")
    values = {**file_values, **env_values, **overrides}
    if path is not None:
        values["config"] = path
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            env_name = f"RETINAGATE_{name.split('.')[0].upper()}" if err["loc"] else "settings"
            got = _mask_url(repr(err.get("input")))  # a URL's password stays out of the message
            problems.append(f"{env_name}: {err['msg']} (got {got})")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
