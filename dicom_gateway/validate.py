"""Checks a received C-STORE dataset before anything is written, and says which status refuses it.

The checks run on the encoded bytes as they came off the wire, cheapest first: the size cap, a walk
over the element structure (so a truncated or malformed stream is refused here, not found later by
a worker), the attributes the gateway needs, then the pixel budget (Rows x Columns x Frames against
``max_pixels``) and the Pixel Data length against what Rows, Columns, Samples, Frames and Bits
Allocated declare. Nothing is decoded; Pixel Data is never copied.

Status codes (PS3.4 Annex B.2.3, PS3.7 Annex C) chosen for each refusal:

==========  ===============================  ===================================================
status      reason (metric label)            when
==========  ===============================  ===================================================
``0xA700``  ``too_large``                    more bytes than ``max_instance_bytes``
``0xA700``  ``too_many_pixels``              Rows x Columns x Frames over ``max_pixels``
``0xC210``  ``empty``                        a zero-length dataset
``0xC210``  ``undecodable``                  truncated or malformed element structure, sequences
                                             nested deeper than ``MAX_SEQUENCE_DEPTH`` (32)
``0xA900``  ``uid_mismatch``                 dataset SOP Class/Instance UID differs from the command
``0xA900``  ``missing_attribute``            Study/Series UID or an Image Pixel attribute missing
``0xA900``  ``invalid_uid``                  SOP Instance, Study or Series UID not a valid UID
                                             (digits and dots, no leading zeros, 64 at most)
``0xA900``  ``pixel_data_inconsistent``      Pixel Data shorter than declared, a frame or more
                                             longer (NumberOfFrames undercounts), or the wrong form
``0xA900``  ``unscorable_pixels``            SamplesPerPixel other than 1 or 3, PALETTE COLOR
                                             without its lookup tables
                                             (:func:`retinagate.encoded.unscorable_pixels`)
``0x0122``  ``sop_class_not_supported``      the command's SOP class is not one the gateway takes
==========  ===============================  ===================================================

An instance that passes every check and is one of RetinaGate's own outputs
(:func:`retinagate.provenance.own_output`) is not refused: :attr:`InstanceFacts.own_output` says so,
and the handler acknowledges it without storing it.

"Out of resources" for sizes: the sender may try again with a smaller instance or another node, and
nothing about the data is wrong. "Does not match SOP class" for inconsistent data: the dataset is
readable but does not describe a decodable image.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Final

from dicom_gateway.sop_classes import ENCAPSULATED_SYNTAXES, is_valid_uid
from retinagate import encoded
from retinagate.provenance import own_output

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DOES_NOT_MATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "InstanceFacts",
    "Refusal",
    "inflate",
    "inspect_dataset",
]

STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_DOES_NOT_MATCH: Final = 0xA900
STATUS_CANNOT_UNDERSTAND: Final = 0xC210
STATUS_SOP_CLASS_NOT_SUPPORTED: Final = 0x0122

DEFLATED_SYNTAX: Final = "1.2.840.10008.1.2.1.99"
IMPLICIT_SYNTAX: Final = "1.2.840.10008.1.2"


class Refusal(Exception):  # noqa: N818 - a refusal is an answer to the sender, not an error of ours
    """The dataset is refused with a DIMSE status.

    Attributes:
        status: The C-STORE response status.
        reason: A short label for metrics and the audit table (no patient data).
        comment: Error Comment for the sender, at most 64 characters (no patient data).
    """

    def __init__(self, status: int, reason: str, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.reason = reason
        self.comment = comment[:64]


@dataclass(frozen=True)
class InstanceFacts:
    """What the gateway records about an accepted instance (UIDs and geometry, no patient data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    accession: str | None
    laterality: str | None
    rows: int
    columns: int
    frames: int
    #: The instance's content identity: sha256 of the encoded dataset as received, without any File
    #: Meta Information, inflated when it came deflated (so a re-deflate at another level is the same
    #: content). Our own file header (whose Implementation Class UID and Version Name change with
    #: releases) and the sender's meta never enter it, so an identical re-send to any gateway process,
    #: before or after a restart or upgrade, has the same identity.
    content_sha256: str
    #: Why the instance is one of RetinaGate's own outputs (no patient data), or ``None``.
    own_output: str | None = None


def inflate(data: bytes | bytearray | memoryview, limit: int) -> bytearray:
    """Inflates a Deflated Explicit VR Little Endian dataset, refusing it as soon as it passes ``limit``.

    The inflate streams and tightens its limit to the image the header declares
    (:func:`retinagate.encoded.inflate`), so a deflate bomb costs a few megabytes, not ``limit``.

    Raises:
        Refusal: ``0xA700`` when the inflated dataset would exceed its limit, ``0xC210`` when the
            stream is not valid deflate data or not a dataset.
    """
    try:
        return encoded.inflate(data, limit=limit)
    except encoded.DatasetTooLargeError:
        raise Refusal(STATUS_OUT_OF_RESOURCES, "too_large", "inflated dataset exceeds the size limit") from None
    except encoded.MalformedDatasetError:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "undecodable", "deflated dataset is corrupt") from None


def _check_uid(name: str, uid: str) -> None:
    """The one UID rule of the gateway: present, and valid UID syntax of at most 64 characters.

    A UID is used as an identifier in SQL, in derived output UIDs and in what is sent to a PACS; one
    such as ``1.2.3/../etc`` would make every object derived from it invalid.
    """
    if not uid:
        raise Refusal(STATUS_DOES_NOT_MATCH, "missing_attribute", f"{name} is missing")
    if not is_valid_uid(uid):
        raise Refusal(STATUS_DOES_NOT_MATCH, "invalid_uid", f"{name} is not a valid UID")


def _int(value: object) -> int | None:
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str | float):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def inspect_dataset(
    data: bytes | bytearray | memoryview,
    *,
    transfer_syntax: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    max_bytes: int,
    max_pixels: int,
) -> InstanceFacts:
    """Checks one encoded C-STORE dataset against the command and the caps.

    Args:
        data: The dataset as received (no file meta), in ``transfer_syntax``.
        transfer_syntax: The accepted presentation context's transfer syntax UID.
        sop_class_uid: Affected SOP Class UID of the C-STORE command.
        sop_instance_uid: Affected SOP Instance UID of the C-STORE command.
        max_bytes: Largest dataset accepted (``settings.max_instance_bytes``).
        max_pixels: Largest Rows x Columns x Frames accepted (``settings.max_pixels``).

    Returns:
        The facts the instance row records.

    Raises:
        Refusal: With the status to answer; see the module's table.
    """
    from pydicom.filereader import read_dataset

    # The command's UID first: it is what the instance row, duplicates and derived outputs key on.
    _check_uid("SOP Instance UID", sop_instance_uid)
    if len(data) > max_bytes:
        raise Refusal(STATUS_OUT_OF_RESOURCES, "too_large", f"dataset exceeds {max_bytes} bytes")
    if not data:
        # Said outright: an empty dataset would otherwise be refused as a UID mismatch, which sends
        # whoever reads the sender's log looking for the wrong problem.
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "empty", "the dataset is empty")
    if transfer_syntax == DEFLATED_SYNTAX:
        # Bounded by the instance cap and by the decoded-pixel budget the worker enforces.
        data = inflate(data, encoded.inflate_limit(3 * max_pixels, max_bytes))
    explicit = transfer_syntax != IMPLICIT_SYNTAX

    try:
        structure = encoded.walk(data, explicit=explicit)
    except encoded.MalformedDatasetError as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "undecodable", f"dataset is malformed: {exc}") from None
    layout = structure.pixels
    header_end = layout.offset if layout is not None else len(data)

    try:
        # Only the bytes before Pixel Data are parsed (and copied); the walk has checked the rest.
        ds = read_dataset(io.BytesIO(data[:header_end]), is_implicit_VR=not explicit, is_little_endian=True)
        dataset_class = str(ds.get("SOPClassUID", "") or "")
        dataset_instance = str(ds.get("SOPInstanceUID", "") or "")
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        accession = str(ds.get("AccessionNumber", "") or "").strip() or None
        laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
        rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
        samples = _int(ds.get("SamplesPerPixel", 1))
        bits = _int(ds.get("BitsAllocated"))
        frames = _int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
        unscorable = encoded.unscorable_pixels(samples, photometric, ds) if samples is not None else None
        ours = own_output(ds)
    except Exception:  # pydicom raises many types for values it cannot read
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "undecodable", "dataset attributes cannot be decoded") from None

    if dataset_class != sop_class_uid or dataset_instance != sop_instance_uid:
        raise Refusal(STATUS_DOES_NOT_MATCH, "uid_mismatch", "SOP Class/Instance UID differs from the command")
    _check_uid("Study Instance UID", study_uid)
    _check_uid("Series Instance UID", series_uid)
    if rows is None or columns is None or samples is None or bits is None or frames is None:
        raise Refusal(STATUS_DOES_NOT_MATCH, "missing_attribute", "an Image Pixel attribute is missing")
    if min(rows, columns, samples, frames) < 1 or not (bits == 1 or bits in (8, 16, 32)):
        raise Refusal(STATUS_DOES_NOT_MATCH, "pixel_data_inconsistent", "Image Pixel attributes out of range")
    if unscorable is not None:
        raise Refusal(STATUS_DOES_NOT_MATCH, "unscorable_pixels", unscorable)
    # The same budget the worker's decoder enforces (retinagate.decode.check_pixel_budget): pixels,
    # and decoded bytes at most those of 8-bit RGB, so what passes here can be decoded there.
    pixels = rows * columns * frames
    if pixels > max_pixels or pixels * samples * max(bits, 8) // 8 > 3 * max_pixels:
        raise Refusal(STATUS_OUT_OF_RESOURCES, "too_many_pixels", f"Rows x Columns x Frames exceeds {max_pixels}")

    if layout is None:
        raise Refusal(STATUS_DOES_NOT_MATCH, "missing_attribute", "no Pixel Data")
    if transfer_syntax in ENCAPSULATED_SYNTAXES:
        fragments = layout.fragments
        # Each frame needs at least one non-empty fragment after the Basic Offset Table item, and a
        # Basic Offset Table, when there is one, has one 4-byte entry per frame.
        if fragments is None or len(fragments) - 1 < frames or sum(fragments[1:]) == 0:
            raise Refusal(
                STATUS_DOES_NOT_MATCH, "pixel_data_inconsistent", "encapsulated Pixel Data has too few frames"
            )
        if fragments[0] not in (0, 4 * frames):
            raise Refusal(
                STATUS_DOES_NOT_MATCH, "pixel_data_inconsistent", "Basic Offset Table does not match the frames"
            )
    else:
        expected = encoded.native_pixel_bytes(rows, columns, samples, frames, bits, photometric)
        problem = (
            "Pixel Data shorter than the image it declares"
            if layout.defined_length is None
            else encoded.native_length_problem(layout.defined_length, expected, frames)
        )
        if problem is not None:
            raise Refusal(STATUS_DOES_NOT_MATCH, "pixel_data_inconsistent", problem)

    return InstanceFacts(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        accession=accession[:16] if accession else None,
        laterality=laterality if laterality in ("R", "L", "B", "U") else None,
        rows=rows,
        columns=columns,
        frames=frames,
        content_sha256=hashlib.sha256(data).hexdigest(),
        own_output=ours,
    )
