"""The heatmap Secondary Capture: the rendered picture as a DICOM image in the source's study.

Built with highdicom's :class:`highdicom.sc.SCImage` from the source's patient and study attributes,
in a series per eye and model (:class:`~retinagate.outputs.identity.OutputSeries`). It is marked as what it
is: Image Type ``DERIVED\\SECONDARY``, Burned In Annotation ``YES`` (the legend is in the pixels),
the unverified-AI line in Image Comments and the series description, the source image referenced in
the Source Image Sequence, and the model named in Contributing Equipment with its Device UID.

Pixels are JPEG Baseline by default (``compression="jpeg"``): libjpeg-turbo through OpenCV, 4:2:2
chroma subsampling (what ``YBR_FULL_422`` says), quality 90. A 1024-pixel picture becomes about
100 kB instead of 2.9 MB, which is what the worker writes durably and sends to every destination;
Lossy Image Compression is then ``01`` with this step's ratio and method appended to the source's.
``compression="none"`` keeps the pixels exact (Explicit VR Little Endian) for destinations that
accept no JPEG.

:class:`ScEncoder` makes the same object per image without constructing it with highdicom each
time (about 4 ms, mostly highdicom validating and looking up its IOD tables, plus 3 ms to serialise
the dataset): the attributes that are the same for every picture of a model are taken from one
highdicom-built Secondary Capture and encoded once; per image it sets the patient and study (as
``SCImage.from_ref_dataset`` takes them from the source), UIDs, dates, the pixels and references.
``tests/test_outputs_sc.py`` compares its output with :func:`build_sc`, element for element.

:class:`ScOutput` is the kind the registry lists: it draws the picture of a scored photograph (the
heat of its mapped labels and the legend's wording, or the "Not graded" banner) and encodes it.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit
from pydicom.valuerep import DA, TM

from retinagate.outputs.encoding import copy_with, encode_element, encode_part10, encodings_of
from retinagate.outputs.findings import label_name, summary_lines, summary_text
from retinagate.outputs.identity import (
    AI_DISCLAIMER,
    ModelIdentity,
    OutputSeries,
    acquisition_equipment,
    code_item,
    eye_of,
    instance_number,
    library_equipment,
    output_uid,
)
from retinagate.outputs.kind import BuiltOutput, ScoredPhotograph
from retinagate.outputs.render import HeatmapFinding, Legend, render_heatmaps

if TYPE_CHECKING:
    import highdicom as hd

    from retinagate.settings import Settings

__all__ = [
    "KIND",
    "SERIES_NUMBER",
    "Compression",
    "ScEncoder",
    "ScOutput",
    "build_sc",
    "header_line",
    "source_reference",
]

#: The kind's name in settings, SQL and the registry.
KIND: Final = "sc"

#: Series Number of the heatmap Secondary Captures (of the right eye; see :class:`OutputSeries`).
SERIES_NUMBER: Final = 9901

#: What the Series Description calls the series.
_WHAT: Final = "heatmaps"

#: How the Secondary Capture's pixels are encoded.
Compression = Literal["jpeg", "none"]

#: DCM 121322 "Source image for image processing operation" (CID 7202).
_SOURCE_PURPOSE: Final = ("121322", "DCM", "Source image for image processing operation")


def source_reference(source: Dataset, frame_number: int | None = None) -> Dataset:
    """A Source Image Sequence item pointing at ``source`` (and one of its frames when multi-frame)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None and int(source.get("NumberOfFrames") or 1) > 1:
        item.ReferencedFrameNumber = frame_number
    item.PurposeOfReferenceCodeSequence = [code_item(*_SOURCE_PURPOSE)]
    return item


def _laterality(source: Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword) or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def _values(value: object) -> list[str]:
    """A possibly multi-valued element value as a list of strings (empty when absent)."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _jpeg(picture: NDArray[np.uint8], quality: int) -> bytes:
    """One JPEG Baseline frame of an RGB picture, 4:2:2 chroma subsampling (``YBR_FULL_422``)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422]
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError("OpenCV could not encode the Secondary Capture as JPEG")
    return encoded.tobytes()


def _pixel_element(picture: NDArray[np.uint8], compression: Compression, quality: int) -> tuple[DataElement, float]:
    """Pixel Data for the picture and the compression ratio (0 when uncompressed)."""
    if compression == "none":
        # OB: what pydicom resolves "OB or OW" to for 8-bit pixels in Explicit VR Little Endian.
        return DataElement(0x7FE00010, "OB", np.ascontiguousarray(picture).tobytes()), 0.0
    frame = _jpeg(picture, quality)
    element = DataElement(0x7FE00010, "OB", encapsulate([frame]), is_undefined_length=True)
    return element, picture.size / len(frame)


def _check(picture: NDArray[np.uint8], source: Dataset) -> None:
    if not isinstance(picture, np.ndarray) or picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise ValueError(
            f"picture has shape {getattr(picture, 'shape', None)} and dtype {getattr(picture, 'dtype', None)}; "
            "expected (H, W, 3) uint8 RGB"
        )
    for keyword in ("SOPInstanceUID", "StudyInstanceUID"):
        if not source.get(keyword):
            raise ValueError(f"source has no {keyword}; cannot derive the output's UIDs")


def build_sc(
    picture: NDArray[np.uint8],
    source: Dataset,
    model: ModelIdentity,
    *,
    frame_number: int | None = None,
    references_source: bool = True,
    description: str = "",
    compression: Compression = "jpeg",
    quality: int = 90,
) -> hd.sc.SCImage:
    """Builds the heatmap Secondary Capture.

    Args:
        picture: ``(H, W, 3)`` uint8 RGB picture from :func:`retinagate.outputs.render.render_heatmaps`.
        source: Header of the scored instance (patient, study, SOP Instance UID); for a plain image
            file, the synthetic header the pipeline made for it.
        model: The model that scored it.
        frame_number: The source frame shown (1-based), for multi-frame sources.
        references_source: Whether ``source`` is a real DICOM instance to reference (False for the
            synthetic header of a PNG or JPEG file).
        description: Derivation Description text (what was drawn).
        compression: ``jpeg`` (JPEG Baseline, lossy) or ``none`` (the exact pixels).
        quality: JPEG quality, 50-100.

    Returns:
        The Secondary Capture dataset (JPEG Baseline or Explicit VR Little Endian).

    Raises:
        ValueError: If the picture is not ``(H, W, 3)`` uint8, the source lacks its UIDs, or the
            compression or quality is not one of the above.
    """
    import highdicom as hd

    _check(picture, source)
    _check_compression(compression, quality)
    laterality = _laterality(source)
    series = OutputSeries.of(source, model.sha256, KIND, SERIES_NUMBER)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=picture,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series.uid,
        series_number=series.number,
        sop_instance_uid=output_uid(str(source.SOPInstanceUID), model.sha256, KIND),
        instance_number=instance_number(source),
        manufacturer="RetinaGate",
        laterality=laterality,
        # highdicom wants an orientation for patient-based images; it is replaced below by the
        # source's own (usually empty: a fundus photograph has no defined patient orientation).
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[model.contributing_equipment()],
        series_description=series.description(model, _WHAT),
    )
    orientation: Any = source.get("PatientOrientation") or ""
    sc.PatientOrientation = orientation
    if laterality is None:
        sc.Laterality = ""  # Type 2C for a paired organ: present, empty when the eye is unknown
    model.stamp(sc)
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "YES"  # a fundus photograph can identify a person
    sc.ImageComments = f"{AI_DISCLAIMER}. Model {model.name} {model.version}."[:10240]
    pixels, ratio = _pixel_element(picture, compression, quality)
    sc[0x7FE00010] = pixels
    if compression == "jpeg":
        sc.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        sc.PhotometricInterpretation = "YBR_FULL_422"
    _set_per_image(sc, source, frame_number, references_source, description, ratio)
    return sc


def _check_compression(compression: str, quality: int) -> None:
    if compression not in ("jpeg", "none"):
        raise ValueError(f"compression: {compression!r} is not jpeg or none")
    if not 50 <= quality <= 100:
        raise ValueError(f"quality: {quality} is outside 50-100")


def _set_per_image(
    sc: Dataset, source: Dataset, frame_number: int | None, references_source: bool, description: str, ratio: float
) -> None:
    """The attributes build_sc sets after highdicom's constructor that depend on the image.

    ``ratio`` is this step's JPEG compression ratio (0: the pixels were not compressed here).
    """
    sc.DerivationDescription = (description or "Grad-CAM heatmaps of the model's top findings")[:1024]
    ratios: list[str] = []
    methods: list[str] = []
    source_lossy = str(source.get("LossyImageCompression", "")) == "01"
    if source_lossy:
        # Once lossy, always flagged as lossy (PS3.3 C.7.6.1.1.5), with the earlier steps kept.
        ratios = _values(source.get("LossyImageCompressionRatio"))
        methods = _values(source.get("LossyImageCompressionMethod"))
    if ratio > 0.0:
        ratios.append(f"{ratio:.2f}")
        methods.append("ISO_10918_1")
    if ratio > 0.0 or source_lossy:
        sc.LossyImageCompression = "01"
        if ratios:
            sc.LossyImageCompressionRatio = ratios
        if methods:
            sc.LossyImageCompressionMethod = methods
    if references_source and source.get("SOPClassUID"):
        sc.SourceImageSequence = [source_reference(source, frame_number)]


#: Attributes of the Secondary Capture that differ per image (everything else is the model's).
_PER_IMAGE: Final = frozenset(
    Tag(k)
    for k in (
        "SpecificCharacterSet", "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
        "DateOfSecondaryCapture", "TimeOfSecondaryCapture", "SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber",
        "SeriesNumber", "SeriesDescription",
        "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber",
        "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "ContributingEquipmentSequence", "Rows",
        "Columns", "PixelData", "Laterality", "PatientOrientation", "DerivationDescription",
        "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
        "SourceImageSequence", "PhotometricInterpretation",
    )
)  # fmt: skip


class ScEncoder:
    """Makes the heatmap Secondary Capture of one model: the dataset of :func:`build_sc` and its Part 10 bytes.

    The model's constant attributes come from one Secondary Capture built with highdicom per
    character set; one encoder may be used from several threads.

    Args:
        model: The model whose pictures it encodes.
        compression: ``jpeg`` or ``none``, as for :func:`build_sc`.
        quality: JPEG quality, 50-100.

    Raises:
        ValueError: If the compression or quality is not one of those.
    """

    def __init__(self, model: ModelIdentity, *, compression: Compression = "jpeg", quality: int = 90) -> None:
        _check_compression(compression, quality)
        self.model = model
        self.compression: Compression = compression
        self.quality = quality
        self._constants: dict[str, tuple[Dataset, tuple[tuple[int, bytes], ...]]] = {}
        self._processing: Dataset | None = None
        self._lock = threading.Lock()

    def encode(
        self,
        picture: NDArray[np.uint8],
        source: Dataset,
        *,
        frame_number: int | None = None,
        references_source: bool = True,
        description: str = "",
    ) -> BuiltOutput:
        """The Secondary Capture, built: its Part 10 bytes and dataset; arguments and errors as :func:`build_sc`."""
        from highdicom.enum import PatientSexValues

        _check(picture, source)
        # highdicom checks and normalises the source's character set when it builds the reference
        # Secondary Capture; every picture of a source with the same raw value gets that result.
        key = repr(source.get("SpecificCharacterSet"))
        if key not in self._constants:
            with self._lock:
                if key not in self._constants:
                    self._constants[key] = self._compile(picture, source)
        reference, constants = self._constants[key]
        character_set = reference.get("SpecificCharacterSet")

        # As SOPClass.__init__ and SCImage.__init__ set them, from SCImage.from_ref_dataset's arguments.
        sc = Dataset()
        uid = output_uid(str(source.SOPInstanceUID), self.model.sha256, KIND)
        sc.file_meta = copy_with(reference.file_meta, MediaStorageSOPInstanceUID=UID(uid))
        sex = source.get("PatientSex")
        if sex is not None and sex != "":
            sex = PatientSexValues(sex).value
        study_date, study_time = source.get("StudyDate"), source.get("StudyTime")
        sc.PatientID = source.get("PatientID")
        sc.PatientName = source.get("PatientName")
        sc.PatientBirthDate = DA(source.get("PatientBirthDate"))
        sc.PatientSex = sex
        sc.StudyInstanceUID = str(source.StudyInstanceUID)
        sc.AccessionNumber = source.get("AccessionNumber")
        sc.StudyID = source.get("StudyID")
        sc.StudyDate = DA(study_date) if study_date is not None else None
        sc.StudyTime = TM(study_time) if study_time is not None else None
        sc.ReferringPhysicianName = source.get("ReferringPhysicianName")
        series = OutputSeries.of(source, self.model.sha256, KIND, SERIES_NUMBER)
        sc.SeriesInstanceUID = series.uid
        sc.SeriesNumber = series.number
        sc.SeriesDescription = series.description(self.model, _WHAT)
        sc.SOPInstanceUID = uid
        sc.InstanceNumber = instance_number(source)
        now = dt.datetime.now()
        sc.InstanceCreationDate = DA(now.date())
        sc.InstanceCreationTime = TM(now.time())
        if character_set is not None:
            sc.SpecificCharacterSet = character_set
        for keyword in ("ContentDate", "ContentTime"):
            if keyword in reference:
                setattr(sc, keyword, DA(now.date()) if keyword == "ContentDate" else TM(now.time()))
        equipment = [self._processing_equipment(), library_equipment()]
        acquisition = acquisition_equipment(source)
        sc.ContributingEquipmentSequence = equipment if acquisition is None else [acquisition, *equipment]
        sc.DateOfSecondaryCapture = DA(now.date())
        sc.TimeOfSecondaryCapture = TM(now.time())
        sc.Rows, sc.Columns = picture.shape[0], picture.shape[1]
        pixels, ratio = _pixel_element(picture, self.compression, self.quality)
        sc[0x7FE00010] = pixels
        sc.PhotometricInterpretation = reference.PhotometricInterpretation
        # Then what build_sc sets after the constructor.
        laterality = _laterality(source)
        sc.Laterality = laterality or ""
        orientation: Any = source.get("PatientOrientation") or ""
        sc.PatientOrientation = orientation
        _set_per_image(sc, source, frame_number, references_source, description, ratio)

        data = encode_part10(sc, constants)
        for tag in reference.keys():  # noqa: SIM118 - iterating a Dataset yields elements
            if tag not in _PER_IMAGE:
                sc.add(reference[tag])  # shared with the template: the dataset is for reading
        return BuiltOutput(KIND, uid, str(sc.SeriesInstanceUID), str(sc.SOPClassUID), data, sc)

    def _compile(self, picture: NDArray[np.uint8], source: Dataset) -> tuple[Dataset, tuple[tuple[int, bytes], ...]]:
        reference = build_sc(picture, source, self.model, compression=self.compression, quality=self.quality)
        encodings = encodings_of(reference.get("SpecificCharacterSet"))
        constants = tuple((int(tag), encode_element(reference[tag], encodings)) for tag in sorted(reference.keys())
                          if tag not in _PER_IMAGE)  # fmt: skip
        return reference, constants

    def _processing_equipment(self) -> Dataset:
        if self._processing is None:
            self._processing = self.model.contributing_equipment()
        return self._processing


#: How the header line names the eye (:func:`~retinagate.outputs.identity.eye_of`).
_EYES: Final = {"R": "Right eye", "L": "Left eye", "B": "Both eyes", "U": "Eye not stated"}


def header_line(source: Dataset) -> str:
    """Which photograph the picture is, for a reader: the eye, the accession number if any, the study date.

    No patient name or ID: the viewer shows those from the header, and the picture may be shown
    where they should not be.
    """
    parts = [_EYES[eye_of(source)]]
    accession = str(source.get("AccessionNumber") or "").strip()
    if accession:
        parts.append(f"accession {accession}")
    try:
        study_date = DA(source.get("StudyDate") or None)
    except ValueError:
        study_date = None
    parts.append(f"study date {study_date.isoformat()}" if study_date else "study date not stated")
    return "   ".join(parts)


class ScOutput:
    """The heatmap Secondary Capture as an output kind (:class:`retinagate.outputs.kind.OutputKind`).

    A graded photograph gets the shown frame with the heat of the mapped labels and a legend of its
    findings; one the gate refused gets the first frame, unheated, under a "Not graded" banner.

    Args:
        model: The model whose pictures it makes.
        settings: Gives ``sc_compression``, ``sc_jpeg_quality`` and ``display_long_side``.
    """

    name: ClassVar[str] = KIND
    display_resolution: ClassVar[bool] = True
    dicom_only: ClassVar[bool] = False

    def __init__(self, model: ModelIdentity, settings: Settings) -> None:
        self.model = model
        self.long_side = settings.display_long_side
        self.encoder = ScEncoder(model, compression=settings.sc_compression, quality=settings.sc_jpeg_quality)

    @classmethod
    def requires(cls, references_source: bool) -> tuple[str, ...]:
        """Nothing: the picture is made from the photograph alone."""
        return ()

    def build(self, photo: ScoredPhotograph) -> list[BuiltOutput]:
        """The Secondary Capture of ``photo``; its drawing time is added to ``photo.timings["render"]``."""
        started = time.perf_counter()
        picture, description = self._graded(photo) if photo.gradable else self._not_graded(photo)
        photo.timings["render"] = photo.timings.get("render", 0.0) + time.perf_counter() - started
        built = self.encoder.encode(
            picture,
            photo.header,
            frame_number=photo.frame_number,
            references_source=photo.references_source,
            description=description,
        )
        return [built]

    def _model_line(self) -> str:
        card = self.model.card
        return f"{card.name} {card.version} (sha256 {self.model.sha256[:12]})"

    def _graded(self, photo: ScoredPhotograph) -> tuple[NDArray[np.uint8], str]:
        probs, limits = photo.probabilities, photo.thresholds
        heatmaps = [HeatmapFinding(name, probs[name], photo.cam(name), marked=probs[name] >= limits[name])
                    for name in photo.mapped]  # fmt: skip
        key = photo.shown_frame
        picture = render_heatmaps(
            photo.decoded.frames[key],
            photo.geometries[key],
            heatmaps,
            self._legend(photo),
            long_side=self.long_side,
            fov=photo.fovs[key],
        )
        summary = summary_text(photo.photograph_probabilities, limits)
        return picture, f"Grad-CAM heatmaps of the top findings ({summary}); {self.model.name} {self.model.version}"

    def _legend(self, photo: ScoredPhotograph) -> Legend:
        """The photograph's summary (:func:`~retinagate.outputs.findings.summary_lines`), then what the map shows."""
        probs, limits = photo.probabilities, photo.thresholds
        lines = summary_lines(photo.photograph_probabilities, limits)
        if not photo.shown and photo.mapped:
            name = photo.mapped[0]
            context = " (where the model looked; not a finding)" if probs[name] < limits[name] else ""
            lines.append(f"Map: {label_name(name)}{context}")
        if photo.frame_number is not None:
            lines.append(f"Frame {photo.frame_number} of {photo.decoded.number_of_frames}")
        return Legend(model=self._model_line(), lines=tuple(lines), header=header_line(photo.header))

    def _not_graded(self, photo: ScoredPhotograph) -> tuple[NDArray[np.uint8], str]:
        reasons = photo.reasons
        lines = [f"Not graded: {'; '.join(reasons)}", "No findings are reported for this photograph"]
        if photo.decoded.number_of_frames > 1:
            lines.append(f"Frame 1 of {photo.decoded.number_of_frames}")
        picture = render_heatmaps(
            photo.decoded.frames[0],
            photo.geometries[0],
            [],
            Legend(model=self._model_line(), lines=tuple(lines), header=header_line(photo.header)),
            long_side=self.long_side,
            fov=photo.fovs[0],
            banner=f"Not graded: {reasons[0]}" if reasons else "Not graded",
        )
        return picture, f"Not graded ({'; '.join(reasons)}); no findings; {self.model.name} {self.model.version}"
