"""The Parametric Maps: a finding's Grad-CAM as 16-bit integers on a coarse grid over the photograph.

One map per disease finding drawn on the Secondary Capture (a label at or over its calibrated
threshold, most probable first, at most ``top_findings``); with no disease finding, one map of
Disease_Risk, whose description says whether it is a finding. Each is labelled with its label
(Content Label, LUT Label, Content Description) and has its own SOP Instance UID. The caller passes
the heat already cut to the retina (:func:`retinagate.outputs.render.retina_heat`).

Pixels. The CAM has 7 (or 14) cells across the retina, so the map keeps no more than
:data:`GRID_LONG_SIDE` pixels on its long side: each map pixel is the mean of a square of
photograph pixels (8 x 8 for a 2048 x 1536 photograph: a 256 x 192 map of about 100 kB, where the
float map at full size was 12.6 MB). Values are unsigned 16-bit, 0 to 1000, with a Real World Value
Mapping (slope 0.001) to the CAM normalised to its maximum; highdicom's ParametricMap takes unsigned
8- or 16-bit pixels with integer value ranges in its mappings, and dciodvfy accepts 16 bits only for
this IOD. Integer pixels are what Orthanc (and dcmtk's dcmj2pnm) can render: Orthanc's preview of
the float map answered 415. The pixel-to-photograph mapping is explicit: Pixel Spacing is the
square's side in photograph pixels (nominal 1 mm each), Image Position the centre of the first
square, and Image Comments say which rows and columns each map pixel covers. Lossy Image
Compression is the source's: a map made from a lossy photograph is flagged as lossy.

The quantity is coded DCM 130403 "Gradient-weighted class activation" (CID 217 "Visual
Explanation"), the unit UCUM ``1``.

Why not highdicom's :class:`highdicom.pm.ParametricMap`: it derives the map's geometry from the source
image and, for an Ophthalmic Photography source (an IOD that allows Number of Frames but carries no
functional groups and no frame of reference), fails looking for the source's Shared Functional Groups.
The Parametric Map IOD itself requires a Frame of Reference, Pixel Measures and Plane Position and
Orientation, which a fundus photograph does not have. So the map is built here with pydicom: it gets
the Frame of Reference of its series (one per study, eye, model and kind, derived from those:
PS3.3 C.7.4.1.1.1 allows one per series), an identity orientation, and the nominal geometry above,
which the Image Comments state is nominal; everything else follows the IOD and is checked with
dciodvfy.

:class:`PmOutput` is the kind the registry lists; it maps each mapped label of a graded DICOM source.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING, ClassVar, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from retinagate.labels import LABEL_DESCRIPTIONS
from retinagate.outputs.encoding import part10
from retinagate.outputs.findings import probability_text, threshold_text
from retinagate.outputs.identity import (
    AI_DISCLAIMER,
    ModelIdentity,
    OutputSeries,
    code_item,
    derived_uid,
    instance_number,
    output_uid,
)
from retinagate.outputs.kind import BuiltOutput, ScoredPhotograph
from retinagate.outputs.render import retina_heat
from retinagate.outputs.sc import source_reference

if TYPE_CHECKING:
    from retinagate.settings import Settings

__all__ = [
    "GRID_LONG_SIDE",
    "KIND",
    "PARAMETRIC_MAP_STORAGE",
    "SERIES_NUMBER",
    "PmOutput",
    "block_mean",
    "build_pm",
    "content_description",
    "grid_step",
    "map_instance_number",
]

#: The kind's name in settings, SQL and the registry.
KIND: Final = "pm"

#: Series Number of the Parametric Maps (of the right eye; see :class:`OutputSeries`).
SERIES_NUMBER: Final = 9903

#: The map's long side at most, in its pixels: the CAM has 7 (or 14) cells across the retina, so
#: 256 pixels leave each cell tens of pixels to blend across, in about 100 kB of 16-bit pixels.
GRID_LONG_SIDE: Final = 256

#: The stored value of the hottest point (normalised heat 1.0); the mapping's slope is its inverse.
_LAST_VALUE: Final = 1000

#: Parametric Map Storage SOP Class.
PARAMETRIC_MAP_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.30"

_GRADCAM: Final = ("130403", "DCM", "Gradient-weighted class activation")  # CID 217
_QUANTITY: Final = ("246205007", "SCT", "Quantity")
_NO_UNITS: Final = ("1", "UCUM", "no units")
_RETINA: Final = ("5665001", "SCT", "Retina")
_FRAME_TYPE: Final = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
_PATIENT_MODULES: Final = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
_OPTIONAL_COPIED: Final = ("IssuerOfPatientID", "PatientAge", "StudyDescription", "PatientWeight", "PatientSize")


def build_pm(
    heatmap: NDArray[np.floating],
    source: Dataset,
    model: ModelIdentity,
    *,
    label: str,
    probability: float,
    threshold: float | None = None,
    frame_number: int | None = None,
    rank: int = 1,
) -> Dataset:
    """Builds the Parametric Map of one label's heatmap.

    Args:
        heatmap: ``(rows, columns)`` map on the source photograph's pixel grid (any scale; it is
            normalised to its maximum here, then averaged onto the map's coarser grid).
        source: Header of the scored DICOM instance.
        model: The model that scored it.
        label: The label the heatmap explains.
        probability: Its probability, recorded in the content description.
        threshold: The label's calibrated threshold: the description says whether the label is a
            finding (probability at or over it) and prints the probability on the right side of it.
        frame_number: The source frame the map belongs to (1-based), for multi-frame sources.
        rank: The map's place among the maps of the same photograph (1: the most probable label),
            1 to 99; it makes the Instance Number (see :func:`map_instance_number`).

    Returns:
        The Parametric Map dataset (Explicit VR Little Endian, 16-bit unsigned pixels).

    Raises:
        ValueError: If the heatmap is not 2-D, does not match the source's rows and columns, or the
            source lacks its UIDs.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap has shape {heat.shape}; expected (rows, columns)")
    rows, columns = int(source.get("Rows") or 0), int(source.get("Columns") or 0)
    if heat.shape != (rows, columns):
        raise ValueError(f"heatmap is {heat.shape}; the source image is {(rows, columns)} (rows, columns)")
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not source.get(keyword):
            raise ValueError(f"source has no {keyword}; a Parametric Map must reference a DICOM image")
    if not 1 <= rank <= 99:
        raise ValueError(f"rank is {rank}; expected 1 to 99")
    top = float(heat.max(initial=0.0))
    values = np.clip(heat / top, 0.0, 1.0) if np.isfinite(top) and top > 0 else np.zeros_like(heat)
    step = grid_step((rows, columns))
    stored = np.rint(block_mean(values, step) * _LAST_VALUE).astype("<u2")

    source_uid = str(source.SOPInstanceUID)
    sop_uid = output_uid(source_uid, model.sha256, KIND, label)
    now = dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(PARAMETRIC_MAP_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 192")
    ds.SOPClassUID = PARAMETRIC_MAP_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")

    # Patient and study: the source's.
    for keyword in _PATIENT_MODULES:
        setattr(ds, keyword, source.get(keyword, ""))
    for keyword in _OPTIONAL_COPIED:
        if keyword in source:
            setattr(ds, keyword, source.get(keyword))

    # Series and equipment: a series per eye and model in the source's study.
    series = OutputSeries.of(source, model.sha256, KIND, SERIES_NUMBER)
    ds.Modality = "OT"
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description(model, "Grad-CAM maps")
    ds.InstanceNumber = map_instance_number(source, rank)
    model.stamp(ds)
    ds.ContributingEquipmentSequence = [model.contributing_equipment()]

    # The photograph's own pixel grid, nominally (see the module docstring); one frame of reference
    # per series, as PS3.3 C.7.4.1.1.1 allows.
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""

    # Image.
    description = LABEL_DESCRIPTIONS.get(label, label)
    if threshold is None:
        shown, verdict = f"{probability:.3f}", ""
    else:
        shown = probability_text(probability, threshold, digits=3)
        side = "a finding: at or over" if probability >= threshold else "not a finding: under"
        verdict = f" ({side} threshold {threshold_text(threshold)})"
    finding = threshold is None or probability >= threshold
    ds.ImageType = list(_FRAME_TYPE)
    ds.ContentQualification = "RESEARCH"
    ds.ContentLabel = f"CAM_{label.upper()}"[:16]
    ds.ContentDescription = content_description(label, finding)
    ds.ContentCreatorName = ""
    ds.ImageComments = (
        f"Grad-CAM of {label} ({description}), model probability {shown}{verdict}, by {model.name} "
        f"{model.version}. Stored values 0-{_LAST_VALUE} are the heat normalised to 0-1 over the retina "
        f"(Real World Value Mapping), zero outside the field of view. Grid: pixel (r, c) is the mean over "
        f"photograph rows {step}r to {step}r+{step - 1} and columns {step}c to {step}c+{step - 1} (the last "
        f"row and column of cells clipped to the photograph); pixel spacing is nominal ({step} mm per map "
        f"pixel, 1 mm per photograph pixel), not a physical measurement. {AI_DISCLAIMER}."
    )
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    _copy_lossy_compression(source, ds)
    ds.PresentationLUTShape = "IDENTITY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 1
    ds.AcquisitionContextSequence = []

    # Dimensions: one frame, indexed by its (only) position.
    organization = derived_uid("dimension-organization", sop_uid)
    ds.DimensionOrganizationSequence = [Dataset()]
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = organization
    index = Dataset()
    index.DimensionOrganizationUID = organization
    index.DimensionIndexPointer = 0x00200032  # Image Position (Patient)
    index.FunctionalGroupPointer = 0x00209113  # Plane Position Sequence
    index.DimensionDescriptionLabel = "Image Position"
    ds.DimensionIndexSequence = [index]
    ds.DimensionOrganizationType = "3D"

    # Functional groups shared by the single frame.
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [float(step), float(step)]
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared.PlaneOrientationSequence = [orientation]
    anatomy = Dataset()
    anatomy.FrameLaterality = series.eye
    anatomy.AnatomicRegionSequence = [code_item(*_RETINA)]
    shared.FrameAnatomySequence = [anatomy]
    transform = Dataset()
    transform.RescaleIntercept = 0
    transform.RescaleSlope = 1
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = [transform]
    frame_type = Dataset()
    frame_type.FrameType = list(_FRAME_TYPE)
    shared.ParametricMapFrameTypeSequence = [frame_type]
    voi = Dataset()
    voi.WindowCenter = _LAST_VALUE / 2
    voi.WindowWidth = _LAST_VALUE
    voi.VOILUTFunction = "LINEAR"
    shared.FrameVOILUTSequence = [voi]
    mapping = Dataset()
    mapping.LUTExplanation = f"Grad-CAM of {label}, normalised 0-1"[:64]
    mapping.LUTLabel = label[:16]
    mapping.add(DataElement(0x00409216, "US", 0))  # Real World Value First Value Mapped
    mapping.add(DataElement(0x00409211, "US", _LAST_VALUE))  # Real World Value Last Value Mapped
    mapping.RealWorldValueIntercept = 0.0
    mapping.RealWorldValueSlope = 1.0 / _LAST_VALUE
    mapping.MeasurementUnitsCodeSequence = [code_item(*_NO_UNITS)]
    quantity = Dataset()
    quantity.ValueType = "CODE"
    quantity.ConceptNameCodeSequence = [code_item(*_QUANTITY)]
    quantity.ConceptCodeSequence = [code_item(*_GRADCAM)]
    mapping.QuantityDefinitionSequence = [quantity]
    shared.RealWorldValueMappingSequence = [mapping]
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = Dataset()
    content = Dataset()
    content.DimensionIndexValues = [1]
    per_frame.FrameContentSequence = [content]
    position = Dataset()
    # The centre of the map's first pixel, in photograph pixels (nominal mm) from the first's centre.
    position.ImagePositionPatient = [(step - 1) / 2, (step - 1) / 2, 0.0]
    per_frame.PlanePositionSequence = [position]
    derivation = Dataset()
    derivation.DerivationDescription = (
        f"Grad-CAM of the model's {label} output, mapped onto the photograph and averaged over "
        f"{step} x {step} photograph pixels per map pixel"
    )[:1024]
    source_item = source_reference(source, frame_number)
    source_item.SpatialLocationsPreserved = "YES" if step == 1 else "NO"
    derivation.SourceImageSequence = [source_item]
    derivation.DerivationCodeSequence = [code_item(*_GRADCAM)]  # CID 7203 is extensible
    per_frame.DerivationImageSequence = [derivation]
    ds.PerFrameFunctionalGroupsSequence = [per_frame]

    # Common Instance Reference: the source's series and instance.
    referenced = Dataset()
    referenced.SeriesInstanceUID = source.SeriesInstanceUID
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source_uid
    referenced.ReferencedInstanceSequence = [instance]
    ds.ReferencedSeriesSequence = [referenced]

    ds.add(DataElement(0x7FE00010, "OW", np.ascontiguousarray(stored).tobytes()))
    return ds


def grid_step(shape: tuple[int, int]) -> int:
    """Photograph pixels per map pixel along each side: the fewest that keep the map's long side
    within :data:`GRID_LONG_SIDE`."""
    return max(1, math.ceil(max(shape) / GRID_LONG_SIDE))


def block_mean(values: NDArray[np.floating], step: int) -> NDArray[np.float32]:
    """The mean of each ``step`` x ``step`` block (the last row and column of blocks clipped to the array)."""
    rows, columns = values.shape
    out_rows, out_columns = -(-rows // step), -(-columns // step)
    padded = np.full((out_rows * step, out_columns * step), np.nan, dtype=np.float32)
    padded[:rows, :columns] = values
    blocks = padded.reshape(out_rows, step, out_columns, step)
    means: NDArray[np.float32] = np.nanmean(blocks, axis=(1, 3)).astype(np.float32)
    return means


def map_instance_number(source: Dataset, rank: int) -> int:
    """Instance Number of a map: the source's (:func:`~retinagate.outputs.identity.instance_number`)
    times 100 plus the map's rank, so a photograph's maps follow each other and never share a number."""
    return min(instance_number(source) * 100 + rank, 2**31 - 1)


def content_description(label: str, finding: bool) -> str:
    """Content Description: what is mapped and that it is unverified AI output, within 64 characters."""
    what = "finding" if finding else "not a finding"
    return f"Grad-CAM of {label[:14]} ({what}); unverified AI output"


def _copy_lossy_compression(source: Dataset, ds: Dataset) -> None:
    """Lossy Image Compression as the source says: once lossy, always flagged (PS3.3 C.7.6.1.1.5)."""
    if str(source.get("LossyImageCompression", "")) != "01":
        ds.LossyImageCompression = "00"
        return
    ds.LossyImageCompression = "01"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if source.get(keyword):
            setattr(ds, keyword, source.get(keyword))


class PmOutput:
    """The Parametric Map as an output kind (:class:`retinagate.outputs.kind.OutputKind`).

    Made for a graded DICOM source only: it shares the source image's pixel grid, which a plain
    image file (no DICOM source) and a photograph the gate refused (no heat) do not give.

    Args:
        model: The model whose maps it makes.
        settings: Not used: the map has no settings of its own.
    """

    name: ClassVar[str] = KIND
    display_resolution: ClassVar[bool] = False
    dicom_only: ClassVar[bool] = True

    def __init__(self, model: ModelIdentity, settings: Settings) -> None:
        self.model = model

    @classmethod
    def requires(cls, references_source: bool) -> tuple[str, ...]:
        """Nothing."""
        return ()

    def build(self, photo: ScoredPhotograph) -> list[BuiltOutput]:
        """A map per mapped label of ``photo``: each disease finding drawn on the SC (most probable
        first, at most ``top_findings``), or with none the Disease_Risk map; none for a plain file or
        a photograph that was not graded."""
        if not photo.references_source or not photo.gradable:
            return []
        key, shape = photo.shown_frame, photo.decoded.source_shape
        built = []
        for rank, label in enumerate(photo.mapped, start=1):
            heat = retina_heat(photo.cam(label), photo.geometries[key], shape, photo.fovs[key])
            ds = build_pm(
                heat[0] if heat is not None else np.zeros(shape, dtype=np.float32),
                photo.header,
                self.model,
                label=label,
                probability=photo.probabilities[label],
                threshold=photo.thresholds[label],
                frame_number=photo.frame_number,
                rank=rank,
            )
            built.append(BuiltOutput(KIND, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), PARAMETRIC_MAP_STORAGE,
                                     part10(ds), ds, label=label))  # fmt: skip
        return built
