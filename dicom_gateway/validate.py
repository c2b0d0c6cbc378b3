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
``0xC210``  ``undecodable``                  truncated or malformed element structure
``0xA900``  ``uid_mismatch``                 dataset SOP Class/Instance UID differs from the command
``0xA900``  ``missing_attribute``            Study/Series UID or an Image Pixel attribute missing
``0xA900``  ``pixel_data_inconsistent``      Pixel Data shorter than declared, or the wrong form
``0x0122``  ``sop_class_not_supported``      the command's SOP class is not one the gateway takes
==========  ===============================  ===================================================

"Out of resources" for sizes: the sender may try again with a smaller instance or another node, and
nothing about the data is wrong. "Does not match SOP class" for inconsistent data: the dataset is
readable but does not describe a decodable image.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from dicom_gateway.sop_classes import ENCAPSULATED_SYNTAXES, is_valid_uid

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

_PIXEL_DATA: Final = 0x7FE00010
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
# Explicit VR elements whose length is 4 bytes, after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_MAX_DEPTH: Final = 32
_HEADER = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")


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


@dataclass
class _PixelLayout:
    defined_length: int | None = None  # native Pixel Data
    fragments: list[int] | None = None  # encapsulated: item lengths, Basic Offset Table first


class _MalformedError(ValueError):
    pass


class _Walker:
    """Walks the element structure of an encoded dataset without decoding values.

    pydicom tolerates a truncated stream (it warns and drops the element), which would let a cut-off
    transfer through as a dataset without Pixel Data; this walk refuses it instead.
    """

    def __init__(self, buffer: bytes | memoryview) -> None:
        self.buffer = buffer
        self.end = len(buffer)
        self.pixels: _PixelLayout | None = None
        self.pixel_offset = len(buffer)  # where the top-level Pixel Data element starts

    def _need(self, pos: int, count: int) -> None:
        if pos + count > self.end:
            raise _MalformedError(f"truncated at byte {pos}")

    def _header(self, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
        self._need(pos, 8)
        group, element = _HEADER.unpack_from(self.buffer, pos)
        tag = group << 16 | element
        if group == 0xFFFE:  # item and delimiter tags carry no VR in either encoding
            return tag, None, _U32.unpack_from(self.buffer, pos + 4)[0], pos + 8
        if not explicit:
            return tag, None, _U32.unpack_from(self.buffer, pos + 4)[0], pos + 8
        vr = bytes(self.buffer[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            self._need(pos, 12)
            return tag, vr, _U32.unpack_from(self.buffer, pos + 8)[0], pos + 12
        if not (vr.isalpha() and vr.isupper()):
            raise _MalformedError(f"no value representation at byte {pos + 4}")
        return tag, vr, _U16.unpack_from(self.buffer, pos + 6)[0], pos + 8

    def dataset(self, pos: int, explicit: bool, depth: int = 0, in_item: bool = False) -> int:
        if depth > _MAX_DEPTH:
            raise _MalformedError("sequences nested too deep")
        while pos < self.end:
            start = pos
            tag, vr, length, pos = self._header(pos, explicit)
            if tag == _PIXEL_DATA and depth == 0:
                self.pixel_offset = start
            if tag == _ITEM_END:
                if not in_item:
                    raise _MalformedError("item delimiter outside an item")
                return pos
            if tag in (_ITEM, _SEQUENCE_END):
                raise _MalformedError("item tag where an element was expected")
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and depth == 0:
                    pos = self._fragments(pos)
                elif vr in (None, b"SQ", b"UN"):
                    # An undefined-length UN holds a sequence encoded implicit VR (PS3.5 6.2.2).
                    pos = self._sequence(pos, explicit and vr != b"UN", depth + 1)
                else:
                    raise _MalformedError(f"undefined length on a {vr!r} element")
            else:
                self._need(pos, length)
                if tag == _PIXEL_DATA and depth == 0:
                    self.pixels = _PixelLayout(defined_length=length)
                pos += length
        if in_item:
            raise _MalformedError("truncated inside a sequence item")
        return pos

    def _sequence(self, pos: int, explicit: bool, depth: int) -> int:
        while True:
            tag, _, length, pos = self._header(pos, explicit=False)
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise _MalformedError("sequence holds something other than items")
            if length == _UNDEFINED:
                pos = self.dataset(pos, explicit, depth, in_item=True)
            else:
                self._need(pos, length)
                pos += length

    def _fragments(self, pos: int) -> int:
        lengths: list[int] = []
        while True:
            tag, _, length, pos = self._header(pos, explicit=False)
            if tag == _SEQUENCE_END:
                self.pixels = _PixelLayout(fragments=lengths)
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise _MalformedError("encapsulated Pixel Data holds something other than defined-length items")
            self._need(pos, length)
            lengths.append(length)
            pos += length


def inflate(data: bytes | memoryview, limit: int) -> bytes:
    """Inflates a Deflated Explicit VR Little Endian dataset, refusing output over ``limit`` bytes.

    Raises:
        Refusal: ``0xA700`` when the inflated dataset would exceed ``limit`` (a deflate bomb gets no
            further than that), ``0xC210`` when the stream is not valid deflate data.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "undecodable", "deflated dataset is corrupt") from None
    if len(out) > limit:
        raise Refusal(STATUS_OUT_OF_RESOURCES, "too_large", "inflated dataset exceeds the size limit")
    return out


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
    data: bytes | memoryview,
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

    if len(data) > max_bytes:
        raise Refusal(STATUS_OUT_OF_RESOURCES, "too_large", f"dataset exceeds {max_bytes} bytes")
    if transfer_syntax == DEFLATED_SYNTAX:
        data = inflate(data, max_bytes)
    explicit = transfer_syntax != IMPLICIT_SYNTAX

    walker = _Walker(data)
    try:
        walker.dataset(0, explicit)
    except _MalformedError as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "undecodable", f"dataset is malformed: {exc}") from None

    try:
        # Only the bytes before Pixel Data are parsed (and copied); the walk has checked the rest.
        ds = read_dataset(io.BytesIO(data[: walker.pixel_offset]), is_implicit_VR=not explicit, is_little_endian=True)
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
    except Exception:  # pydicom raises many types for values it cannot read
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "undecodable", "dataset attributes cannot be decoded") from None

    if dataset_class != sop_class_uid or dataset_instance != sop_instance_uid:
        raise Refusal(STATUS_DOES_NOT_MATCH, "uid_mismatch", "SOP Class/Instance UID differs from the command")
    for name, uid in (("Study Instance UID", study_uid), ("Series Instance UID", series_uid)):
        if not is_valid_uid(uid):
            raise Refusal(STATUS_DOES_NOT_MATCH, "missing_attribute", f"{name} is missing or invalid")
    if rows is None or columns is None or samples is None or bits is None or frames is None:
        raise Refusal(STATUS_DOES_NOT_MATCH, "missing_attribute", "an Image Pixel attribute is missing")
    if min(rows, columns, samples, frames) < 1 or samples not in (1, 3, 4) or not (bits == 1 or bits in (8, 16, 32)):
        raise Refusal(STATUS_DOES_NOT_MATCH, "pixel_data_inconsistent", "Image Pixel attributes out of range")
    # The same budget the worker's decoder enforces (retinagate.decode.check_pixel_budget): pixels,
    # and decoded bytes at most those of 8-bit RGB, so what passes here can be decoded there.
    pixels = rows * columns * frames
    if pixels > max_pixels or pixels * samples * max(bits, 8) // 8 > 3 * max_pixels:
        raise Refusal(STATUS_OUT_OF_RESOURCES, "too_many_pixels", f"Rows x Columns x Frames exceeds {max_pixels}")

    layout = walker.pixels
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
        per_pixel = 2 if photometric == "YBR_FULL_422" and samples == 3 else samples  # chroma shared by 2 pixels
        expected = math.ceil(rows * columns * frames * per_pixel * bits / 8)
        if layout.defined_length is None or layout.defined_length < expected:
            raise Refusal(
                STATUS_DOES_NOT_MATCH, "pixel_data_inconsistent", "Pixel Data shorter than the image it declares"
            )

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
    )
