"""The heatmap Secondary Capture: the rendered picture as a DICOM image in the source's study.

Built with highdicom's :class:`highdicom.sc.SCImage` from the source's patient and study attributes,
in a new series per model (:func:`~retinagate.outputs.identity.series_uid`). It is marked as what it
is: Image Type ``DERIVED\\SECONDARY``, Burned In Annotation ``YES`` (the legend is in the pixels),
the unverified-AI line in Image Comments and the series description, the source image referenced in
the Source Image Sequence, and the model named in Contributing Equipment with its Device UID.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from retinagate.outputs.identity import AI_DISCLAIMER, SERIES_NUMBERS, ModelIdentity, output_uid, series_uid

if TYPE_CHECKING:
    import highdicom as hd

__all__ = ["build_sc", "source_reference"]

#: DCM 121322 "Source image for image processing operation" (CID 7202).
_SOURCE_PURPOSE: Final = ("121322", "DCM", "Source image for image processing operation")


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def source_reference(source: Dataset, frame_number: int | None = None) -> Dataset:
    """A Source Image Sequence item pointing at ``source`` (and one of its frames when multi-frame)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None and int(source.get("NumberOfFrames") or 1) > 1:
        item.ReferencedFrameNumber = frame_number
    item.PurposeOfReferenceCodeSequence = [_code_item(*_SOURCE_PURPOSE)]
    return item


def _laterality(source: Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword) or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def build_sc(
    picture: NDArray[np.uint8],
    source: Dataset,
    model: ModelIdentity,
    *,
    frame_number: int | None = None,
    references_source: bool = True,
    description: str = "",
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

    Returns:
        The Secondary Capture dataset (Explicit VR Little Endian).

    Raises:
        ValueError: If the picture is not ``(H, W, 3)`` uint8 or the source lacks its UIDs.
    """
    import highdicom as hd

    if not isinstance(picture, np.ndarray) or picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise ValueError(
            f"picture has shape {getattr(picture, 'shape', None)} and dtype {getattr(picture, 'dtype', None)}; "
            "expected (H, W, 3) uint8 RGB"
        )
    for keyword in ("SOPInstanceUID", "StudyInstanceUID"):
        if not source.get(keyword):
            raise ValueError(f"source has no {keyword}; cannot derive the output's UIDs")
    laterality = _laterality(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=picture,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid(str(source.StudyInstanceUID), model.sha256, "sc"),
        series_number=SERIES_NUMBERS["sc"],
        sop_instance_uid=output_uid(str(source.SOPInstanceUID), model.sha256, "sc"),
        instance_number=int(frame_number or 1),
        manufacturer="RetinaGate",
        laterality=laterality,
        # highdicom wants an orientation for patient-based images; it is replaced below by the
        # source's own (usually empty: a fundus photograph has no defined patient orientation).
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[model.contributing_equipment()],
        series_description=f"RetinaGate heatmaps (unverified AI) {model.name} {model.version}"[:64],
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
    sc.DerivationDescription = (description or "Grad-CAM heatmaps of the model's top findings")[:1024]
    if str(source.get("LossyImageCompression", "")) == "01":
        # Once lossy, always flagged as lossy (PS3.3 C.7.6.1.1.5).
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(sc, keyword, source.get(keyword))
    if references_source and source.get("SOPClassUID"):
        sc.SourceImageSequence = [source_reference(source, frame_number)]
    return sc
