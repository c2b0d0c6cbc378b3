"""Who made an output and what it is called: deterministic UIDs and the model's identity.

Every output UID is derived from its inputs, never drawn at random: the same source instance scored
by the same model file gives the same SOP Instance UID for each kind of output, so a re-run (a worker
retry, a nightly rescore) rewrites the same objects and a PACS never holds duplicates. The UIDs are
UUID-derived (``2.25.<uuid>``, PS3.5 B.2) from name-based (SHA-1) UUIDs; ``pydicom``'s
``generate_uid(prefix=None, entropy_srcs=...)`` cannot be used for this because it ignores its
entropy sources when there is no prefix and returns a random UUID.

Series. The outputs go in one series per (study, eye, model file, kind) (:class:`OutputSeries`):
the Series Instance UID is derived from that tuple, so the right and the left eye never share a
series (a series has one Laterality), and a new model starts new series. The eye is the source's
Image Laterality, else its series' Laterality (R, L or B), else U (unknown, a series of its own).
A series whose objects carry a Frame of Reference (the Parametric Map) has exactly one, derived from
the same tuple. The Series Number is the kind's, plus 10 for the left eye, 20 for both, 30 for
unknown, so a viewer lists the eyes apart; the Series Description starts with the model's version,
which is therefore never cut at 64 characters.

Instance Number. An output's Instance Number is the source's own (:func:`instance_number`), the
position the camera gave the photograph in its series; 1 when the source has none (a plain image
file). It is a pure function of the source, so a retried task, a re-send and a rescore by the same
model write the same number, no counter has to be kept, and the outputs of one eye sort as the
photographs do. Within an output series the numbers rise with the source's; they leave gaps where a
camera numbers both eyes in one series (R 1, 3; L 2, 4), and repeat only if one eye's photographs
of one study come from two source series that both count from 1.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, Protocol

from retinagate.card import ModelCard

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom.dataset import Dataset

__all__ = [
    "AI_DISCLAIMER",
    "MANUFACTURER",
    "ModelIdentity",
    "OutputSeries",
    "acquisition_equipment",
    "code_item",
    "derived_uid",
    "eye_of",
    "instance_number",
    "library_equipment",
    "output_uid",
    "series_uid",
    "software_version",
]


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item: Code Value, Coding Scheme Designator and Code Meaning."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


#: Manufacturer written into every output and its Contributing Equipment.
MANUFACTURER: Final = "RetinaGate"

#: The line every output carries, burned into the Secondary Capture and written into comments.
AI_DISCLAIMER: Final = "AI output - not verified - for review by a qualified reader"

# Fixed namespace for RetinaGate's name-based UUIDs; changing it would change every output UID.
_NAMESPACE: Final = uuid.UUID("6f1d0c3e-5b7a-4d2e-9c41-52e7a0b1c9d4")


def derived_uid(*parts: str) -> str:
    """A ``2.25.`` UID from a name-based UUID over ``parts``: same parts, same UID.

    Raises:
        ValueError: If no part is given or a part is empty.
    """
    if not parts or any(not p for p in parts):
        raise ValueError(f"parts: expected one or more non-empty strings, got {parts!r}")
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(0x1F).join(parts)).int}"


def _check(kind: str, model_sha256: str) -> None:
    from retinagate.outputs.registry import names

    if kind not in names():
        raise ValueError(f"kind is {kind!r}; expected one of {', '.join(names())}")
    _check_sha256(model_sha256)


def _check_sha256(model_sha256: str) -> None:
    if len(model_sha256) != 64 or any(c not in "0123456789abcdef" for c in model_sha256):
        raise ValueError(f"model_sha256 is {model_sha256!r}; expected 64 lowercase hex digits")


def output_uid(source_sop_instance_uid: str, model_sha256: str, kind: str, label: str = "") -> str:
    """SOP Instance UID of the output ``kind`` for one source instance and one model file.

    ``label`` tells apart several outputs of one kind for the same source (a Parametric Map per finding).

    Raises:
        ValueError: If ``kind`` is not a registered output kind, the sha256 is malformed or the source UID is empty.
    """
    _check(kind, model_sha256)
    parts = (source_sop_instance_uid, model_sha256, kind, *((label,) if label else ()))
    return derived_uid("instance", *parts)


#: Eyes as output series are keyed, with what the Series Description says and the Series Number offset.
_EYES: Final = {"R": ("right eye", 0), "L": ("left eye", 10), "B": ("both eyes", 20), "U": ("eye unknown", 30)}


def series_uid(study_instance_uid: str, eye: str, model_sha256: str, kind: str) -> str:
    """Series Instance UID of the outputs of ``kind`` made by one model for one eye in one study.

    Raises:
        ValueError: As :func:`output_uid`, or if ``eye`` is not R, L, B or U.
    """
    _check(kind, model_sha256)
    if eye not in _EYES:
        raise ValueError(f"eye is {eye!r}; expected one of {', '.join(_EYES)}")
    return derived_uid("series", study_instance_uid, eye, model_sha256, kind)


def eye_of(source: Dataset) -> str:
    """The eye a source shows: its Image Laterality, else its series' Laterality (R, L or B); U when neither."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword) or "").strip().upper()
        if value in ("R", "L", "B"):
            return value
    return "U"


def instance_number(source: Dataset) -> int:
    """The Instance Number of the outputs of ``source``: the source's own, or 1 (see the module docstring)."""
    try:
        number = int(source.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 1
    return number if 1 <= number <= 2**31 - 1 else 1


@dataclass(frozen=True)
class OutputSeries:
    """The series the outputs of one kind go in, for one eye of one study and one model file.

    Attributes:
        study_instance_uid: The source's study.
        eye: R, L, B or U (:func:`eye_of`).
        model_sha256: sha256 of the model file.
        kind: The output kind's name.
        base_number: The kind's Series Number (for the right eye).
    """

    study_instance_uid: str
    eye: str
    model_sha256: str
    kind: str
    base_number: int

    @classmethod
    def of(cls, source: Dataset, model_sha256: str, kind: str, base_number: int) -> OutputSeries:
        """The series of the outputs of ``kind`` made from ``source``."""
        return cls(str(source.StudyInstanceUID), eye_of(source), model_sha256, kind, base_number)

    @property
    def uid(self) -> str:
        """Series Instance UID (:func:`series_uid`)."""
        return series_uid(self.study_instance_uid, self.eye, self.model_sha256, self.kind)

    @property
    def frame_of_reference_uid(self) -> str:
        """The one Frame of Reference UID of the series, derived from the same tuple."""
        return derived_uid("frame-of-reference", self.study_instance_uid, self.eye, self.model_sha256, self.kind)

    @property
    def number(self) -> int:
        """Series Number: the kind's, offset by eye (see the module docstring)."""
        return self.base_number + _EYES[self.eye][1]

    def description(self, model: ModelIdentity, what: str) -> str:
        """Series Description: the model's version first, then ``what``, the eye, the model's name, in 64 characters."""
        return f"{model.version} RetinaGate {what}, {_EYES[self.eye][0]} (unverified AI) {model.name}"[:64]


@lru_cache(maxsize=1)
def software_version() -> str:
    """RetinaGate's installed version (``0+unknown`` when run from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retinagate")
    except PackageNotFoundError:
        return "0+unknown"


class _Scorer(Protocol):
    card: ModelCard
    sha256: str
    device_uid: str


@dataclass(frozen=True)
class ModelIdentity:
    """The model an output came from: its card, its file's sha256 and the Device UID derived from it.

    Attributes:
        card: The model card (name, version, labels, thresholds).
        sha256: sha256 of the model file, 64 lowercase hex digits.
        device_uid: DICOM Device UID of the model (the engine derives it from ``sha256``).
    """

    card: ModelCard
    sha256: str
    device_uid: str

    def __post_init__(self) -> None:
        _check_sha256(self.sha256)
        if not self.device_uid or len(self.device_uid) > 64:
            raise ValueError(f"device_uid is {self.device_uid!r}; expected a DICOM UID of at most 64 characters")

    @classmethod
    def of(cls, engine: _Scorer) -> ModelIdentity:
        """The identity of the model an engine serves."""
        return cls(card=engine.card, sha256=engine.sha256, device_uid=engine.device_uid)

    @property
    def name(self) -> str:
        """The model's name (Manufacturer's Model Name, at most 64 characters)."""
        return self.card.name[:64]

    @property
    def version(self) -> str:
        """The model's version."""
        return self.card.version[:64]

    @property
    def software_versions(self) -> list[str]:
        """Software Versions: RetinaGate's version, then the model's."""
        return [f"retinagate {software_version()}"[:64], f"model {self.card.version}"[:64]]

    @property
    def serial(self) -> str:
        """Device Serial Number: the first 16 hex digits of the model's sha256."""
        return self.sha256[:16]

    def algorithm_parameters(self) -> list[str]:
        """Algorithm parameters recorded in the SR: file identity, input size, precision, thresholds."""
        card = self.card
        thresholds = " ".join(f"{n}={t:.3f}" for n, t in zip(card.labels, card.thresholds, strict=True))
        return [
            f"model sha256 {self.sha256}",
            f"architecture {card.architecture}, input {card.input_size}x{card.input_size}, {card.precision}",
            f"decision thresholds {thresholds}",
            "explanation: Grad-CAM of the last feature map",
        ]

    def observation_context(self) -> hd.sr.ObservationContext:
        """The SR observation context naming this model as the observing device (TID 1004)."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.device_uid,
                name=f"{self.name} {self.version}"[:64],
                manufacturer_name=MANUFACTURER,
                model_name=self.name,
                serial_number=self.serial,
            ),
        )
        return hd.sr.ObservationContext(observer_device_context=observer)

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """The Contributing Equipment item naming this model as processing equipment (with Device UID)."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        item = hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=self.software_versions,
            device_serial_number=self.serial,
            contribution_description=f"AI scoring and Grad-CAM heatmaps ({AI_DISCLAIMER})"[:1024],
        )
        item.DeviceUID = self.device_uid
        return item

    def stamp(self, ds: Any) -> None:
        """Writes the General Equipment attributes of this model into an output dataset.

        The Device UID goes into Contributing Equipment only: the General Equipment module of the
        output IODs has no place for it.
        """
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = self.name
        ds.SoftwareVersions = self.software_versions
        ds.DeviceSerialNumber = self.serial


#: What :meth:`highdicom.ContributingEquipment.for_image_acquisition` reads, but the date and time.
_ACQUISITION_KEYS: Final = ("SOPClassUID", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
                            "DeviceSerialNumber", "InstitutionName", "InstitutionalDepartmentName",
                            "InstitutionAddress", "StationName")  # fmt: skip
_ACQUISITION: dict[tuple[str, ...], Dataset | None] = {}
_ACQUISITION_LOCK = threading.Lock()


def acquisition_equipment(source: Dataset) -> Dataset | None:
    """highdicom's Contributing Equipment item for the equipment that acquired ``source``.

    The same item as :meth:`highdicom.ContributingEquipment.for_image_acquisition` (``None`` where
    that raises, as highdicom's constructors then add none), made once per camera: highdicom looks
    the SOP class up in its IOD tables on every call (about 1 ms), and a site has few cameras. The
    contribution date and time are the source's and are set per call.
    """
    import highdicom as hd
    from pydicom.valuerep import DT

    from retinagate.outputs.encoding import copy_with

    key = tuple(repr(source.get(k)) for k in _ACQUISITION_KEYS)
    if key in _ACQUISITION:
        cached = _ACQUISITION[key]
    else:
        try:
            cached = hd.ContributingEquipment.for_image_acquisition(source)
        except Exception:  # highdicom's own rule: no acquisition item when it cannot make one
            cached = None
        with _ACQUISITION_LOCK:
            if len(_ACQUISITION) >= 256:  # a bound, should a site have very many cameras
                _ACQUISITION.clear()
            _ACQUISITION[key] = cached
    if cached is None:
        return None
    # The contribution date and time, derived as for_image_acquisition derives them.
    when = source.get("AcquisitionDateTime")
    if when is None:
        date, time_ = source.get("AcquisitionDate"), source.get("AcquisitionTime")
        if isinstance(date, dt.date) and isinstance(time_, dt.time):
            when = dt.datetime.combine(date, time_)
    item = copy_with(cached, ContributionDateTime=None if when is None else DT(when))
    return item


_LIBRARY: list[Dataset] = []


def library_equipment() -> Dataset:
    """highdicom's Contributing Equipment item naming itself, as its SOP constructors add it.

    The same item as :meth:`highdicom.ContributingEquipment.for_highdicom`, with this moment as the
    contribution date and time; made once, since highdicom validates every attribute it builds.
    """
    import highdicom as hd
    from pydicom.valuerep import DT

    from retinagate.outputs.encoding import copy_with

    if not _LIBRARY:
        _LIBRARY.append(hd.ContributingEquipment.for_highdicom())
    return copy_with(_LIBRARY[0], ContributionDateTime=DT(dt.datetime.now()))
