"""The Parametric Map: the top finding's Grad-CAM as float values on the photograph's pixel grid.

The map is of the most probable disease finding (a label at or over its calibrated threshold); with
no disease finding it is the Disease_Risk map, and its description says it is not a finding. The
caller passes the heat already cut to the retina (:func:`retinagate.outputs.render.retina_heat`).

Viewers that overlay parametric maps (OHIF, 3D Slicer) can show the heatmap over the photograph with
their own colour maps and windowing, unlike the burned-in Secondary Capture. The quantity is coded
DCM 130403 "Gradient-weighted class activation" (CID 217 "Visual Explanation"), the unit UCUM ``1``.
Values are the CAM normalised to its maximum (0 to 1), at the stored photograph's rows and columns.

Why not highdicom's :class:`highdicom.pm.ParametricMap`: it derives the map's geometry from the source
image and, for an Ophthalmic Photography source (an IOD that allows Number of Frames but carries no
functional groups and no frame of reference), fails looking for the source's Shared Functional Groups.
The Parametric Map IOD itself requires a Frame of Reference, Pixel Measures and Plane Position and
Orientation, which a fundus photograph does not have. So the map is built here with pydicom: it gets
the Frame of Reference of its series (one per study, eye, model and kind, derived from those:
PS3.3 C.7.4.1.1.1 allows one per series), an identity orientation at the origin, and a nominal
pixel spacing of 1 mm that the content description states is nominal; everything else follows the
IOD and is checked with dciodvfy.

:class:`PmOutput` is the kind the registry lists; it maps the first mapped label of a graded DICOM source.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, ClassVar, Final

import numpy as np
from numpy.typing import NDArray
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

__all__ = ["KIND", "PARAMETRIC_MAP_STORAGE", "SERIES_NUMBER", "PmOutput", "build_pm"]

#: The kind's name in settings, SQL and the registry.
KIND: Final = "pm"

#: Series Number of the Parametric Maps (of the right eye; see :class:`OutputSeries`).
SERIES_NUMBER: Final = 9903

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
) -> Dataset:
    """Builds the Parametric Map of one finding's heatmap.

    Args:
        heatmap: ``(rows, columns)`` map on the source photograph's pixel grid (any scale; it is
            normalised to its maximum here).
        source: Header of the scored DICOM instance.
        model: The model that scored it.
        label: The label the heatmap explains.
        probability: Its probability, recorded in the content description.
        threshold: The label's calibrated threshold: the description says whether the label is a
            finding (probability at or over it) and prints the probability on the right side of it.
        frame_number: The source frame the map belongs to (1-based), for multi-frame sources.

    Returns:
        The Parametric Map dataset (Explicit VR Little Endian, 32-bit float pixels).

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
    top = float(heat.max(initial=0.0))
    values = np.clip(heat / top, 0.0, 1.0) if np.isfinite(top) and top > 0 else np.zeros_like(heat)

    source_uid = str(source.SOPInstanceUID)
    sop_uid = output_uid(source_uid, model.sha256, KIND)
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
    ds.InstanceNumber = instance_number(source)
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
    ds.ImageType = list(_FRAME_TYPE)
    ds.ContentQualification = "RESEARCH"
    ds.ContentLabel = "GRADCAM"
    ds.ContentDescription = (
        f"Grad-CAM of {label} ({description}), probability {shown}, normalised 0-1; "
        f"pixel spacing nominal. {AI_DISCLAIMER}"
    )[:64]
    ds.ContentCreatorName = ""
    ds.ImageComments = (
        f"Grad-CAM of {label} ({description}), model probability {shown}{verdict}, by {model.name} "
        f"{model.version}; values normalised to 0-1 over the retina, zero outside the field of view; pixel "
        f"spacing is nominal (1 mm per photograph pixel), not a physical measurement. {AI_DISCLAIMER}."
    )
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 32
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
    measures.PixelSpacing = [1.0, 1.0]
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
    voi.WindowCenter = 0.5
    voi.WindowWidth = 1.0
    voi.VOILUTFunction = "LINEAR"
    shared.FrameVOILUTSequence = [voi]
    mapping = Dataset()
    mapping.LUTExplanation = f"Grad-CAM {label} (normalised)"[:64]
    mapping.LUTLabel = "GRADCAM"
    mapping.DoubleFloatRealWorldValueFirstValueMapped = 0.0
    mapping.DoubleFloatRealWorldValueLastValueMapped = 1.0
    mapping.RealWorldValueIntercept = 0.0
    mapping.RealWorldValueSlope = 1.0
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
    position.ImagePositionPatient = [0.0, 0.0, 0.0]
    per_frame.PlanePositionSequence = [position]
    derivation = Dataset()
    derivation.DerivationDescription = f"Grad-CAM of the model's {label} output, mapped onto the photograph"[:1024]
    source_item = source_reference(source, frame_number)
    source_item.SpatialLocationsPreserved = "YES"
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

    ds.FloatPixelData = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return ds


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

    def __init__(self, model: ModelIdentity, settings: Settings) -> None:
        self.model = model

    @classmethod
    def requires(cls, references_source: bool) -> tuple[str, ...]:
        """Nothing."""
        return ()

    def build(self, photo: ScoredPhotograph) -> list[BuiltOutput]:
        """The map of the first mapped label of ``photo`` (none for a plain file or an ungraded photograph)."""
        if not photo.references_source or not photo.gradable or not photo.mapped:
            return []
        label, key = photo.mapped[0], photo.shown_frame
        shape = photo.decoded.source_shape
        heat = retina_heat(photo.cam(label), photo.geometries[key], shape, photo.fovs[key])
        ds = build_pm(
            heat[0] if heat is not None else np.zeros(shape, dtype=np.float32),
            photo.header,
            self.model,
            label=label,
            probability=photo.probabilities[label],
            threshold=photo.thresholds[label],
            frame_number=photo.frame_number,
        )
        return [BuiltOutput(KIND, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), PARAMETRIC_MAP_STORAGE,
                            part10(ds), ds)]  # fmt: skip
