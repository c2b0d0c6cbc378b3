"""Turns a DICOM instance or an image file into the RGB pixels the model and the outputs need.

Two rules shape this module:

* **Check before decoding.** Rows x Columns x Samples x Frames x bits is checked against a cap and
  against the Pixel Data that is actually there (:func:`check_pixel_budget`), and every compressed
  frame's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE header) must agree with Rows and
  Columns before a decoder sees it. A decompression bomb or a truncated file becomes an
  :class:`~retinagate.errors.InputError` naming the problem, never an out-of-memory. Deflated
  datasets are inflated here with a bound, because pydicom inflates them without one, and the
  element structure is walked before pydicom parses it (:mod:`retinagate.encoded`, the rules the
  gateway applies), so a file nested too deep is refused rather than crashing pydicom's recursion.
  A JPEG frame's marker structure is walked too (:func:`_check_jpeg_structure`), because
  libjpeg-turbo decodes a corrupt entropy-coded segment without raising.
* **Never score RetinaGate's own outputs.** :func:`read_dataset` refuses one
  (:class:`OwnOutputError`, the rule in :mod:`retinagate.provenance`), so a heatmap SC that reached
  storage some other way fails with that reason instead of being scored into an SC of an SC.
* **Decode no more than is needed.** JPEG baseline and extended 8-bit frames (what fundus cameras
  send) are decoded straight from the encapsulated bytes by libjpeg-turbo through Pillow's
  ``draft``, at the largest DCT scale (1/2, 1/4 or 1/8) that still leaves the requested size: the
  decoder then skips most of the inverse DCT and the colour conversion of pixels nobody looks at.
  Every other transfer syntax goes through pydicom (pylibjpeg, openjpeg, pyjpegls, RLE) and is
  area-reduced to the same scale afterwards, so callers see one contract.

Colour. For JPEG, the codestream decides the colour transform when it says so: a JFIF marker means
YCbCr, an Adobe marker states the transform, component ids ``R``, ``G``, ``B`` mean RGB. libjpeg-turbo
follows exactly these rules, and so does pydicom (it warns when the DICOM header disagrees). Only a
stream without any of these signals is ambiguous: libjpeg-turbo would assume YCbCr, while DICOM says a
photometric interpretation of ``RGB`` means the stream has no colour transform, and pydicom follows
the header. In that one case the stream is decoded without conversion (Pillow's ``YCbCr`` draft
mode returns the stored components unchanged), so the result always matches pydicom's own decode.

Bit depth. Frames deeper than 8 bits are scaled linearly from the declared range
(``BitsStored``) to 0-255: the same photograph always gives the same pixels, whatever else is in the
frame, unlike a percentile window. Signed data is shifted to unsigned first. MONOCHROME1 is
inverted, and single-channel images are repeated into three channels (red-free photographs).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import cv2
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom import encaps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from retinagate import encoded
from retinagate.errors import InputError
from retinagate.provenance import own_output

__all__ = [
    "DCT_SCALES",
    "DecodedImage",
    "OwnOutputError",
    "check_pixel_budget",
    "choose_scale",
    "decode_dataset",
    "decode_image_file",
    "decode_instance",
    "decode_path",
    "is_dicom_file",
    "own_output_of_file",
    "read_dataset",
]

logger = logging.getLogger(__name__)

#: Reduction factors libjpeg-turbo's scaled IDCT offers (also used for the area reduction of other
#: transfer syntaxes, so every path returns the same sizes).
DCT_SCALES: Final = (8, 4, 2, 1)

#: Values up to this size are read with the header; larger ones (native Pixel Data) are read only
#: after the budget check has passed.
_DEFER_SIZE: Final = 64 * 1024

_JPEG_FAST_SYNTAXES: Final = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
_JPEG_SOF: Final = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
_JPEG_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD9)})
_RGB_COMPONENT_IDS: Final = (ord("R"), ord("G"), ord("B"))
_PLAIN_SIGNATURES: Final = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")

#: A marker where entropy-coded data ends: 0xFF followed by neither 0x00 (a stuffed 0xFF data byte),
#: a restart marker (0xD0-0xD7) nor another 0xFF (fill bytes before a marker).
_JPEG_MARKER_AFTER_SCAN: Final = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: Markers that may follow a scan in a sequential JPEG (ISO 10918-1): tables (DHT, DAC, DQT), the
#: restart interval, DNL, another scan, comments and application segments. Anything else is corruption.
_JPEG_BETWEEN_SCANS: Final = frozenset({0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)})
_JPEG_EOI: Final = 0xD9
_CORRUPT_JPEG: Final = "a JPEG frame is corrupt or truncated"

Frame = NDArray[np.uint8]


class OwnOutputError(InputError):
    """The instance is one of RetinaGate's own outputs (:func:`retinagate.provenance.own_output`).

    Permanent, like every :class:`~retinagate.errors.InputError`: a worker marks the instance
    failed with this reason, and ``retinagate score`` skips such files before they get here.
    """


@dataclass(frozen=True)
class DecodedImage:
    """The frames of one instance or image file, ready for preprocessing and display.

    Attributes:
        frames: One ``(H, W, 3)`` uint8 RGB array per frame, reduced by ``scale`` (each side is
            ``ceil(source side / scale)``).
        source_shape: ``(rows, columns)`` of the stored image.
        scale: The reduction factor applied (1, 2, 4 or 8).
        header: The DICOM dataset without its Pixel Data; ``None`` for PNG and JPEG files.
        source: The file the pixels came from (for messages), or ``"<dataset>"``.
        timings: Seconds spent reading and decoding, keyed ``read`` and ``decode``.
        content_sha256: sha256 of a PNG or JPEG file's bytes (its identity, as it has no UIDs);
            ``None`` for DICOM.
    """

    frames: list[Frame]
    source_shape: tuple[int, int]
    scale: int
    header: Dataset | None
    source: str
    timings: dict[str, float] = field(default_factory=dict)
    content_sha256: str | None = None

    @property
    def number_of_frames(self) -> int:
        """How many frames the instance holds."""
        return len(self.frames)


def choose_scale(rows: int, columns: int, min_side: int, min_long_side: int = 0) -> int:
    """The largest reduction factor that still leaves the requested size.

    The field of view of a fundus photograph is at most as large as the photograph's short side,
    so keeping ``min_side`` pixels on the short side keeps at least the model's input size across
    the field of view after cropping.

    Args:
        rows: Image height.
        columns: Image width.
        min_side: Pixels the short side must keep (the model's input size).
        min_long_side: Pixels the long side must keep (the display size of the Secondary Capture);
            0 for no constraint.

    Returns:
        One of :data:`DCT_SCALES`.

    Raises:
        ValueError: If a size is not positive or a minimum is negative.
    """
    if rows < 1 or columns < 1:
        raise ValueError(f"image size is {columns}x{rows}; expected positive sizes")
    if min_side < 0 or min_long_side < 0:
        raise ValueError(f"min_side={min_side}, min_long_side={min_long_side}; expected 0 or more")
    short, long = min(rows, columns), max(rows, columns)
    for scale in DCT_SCALES:
        if math.ceil(short / scale) >= min_side and math.ceil(long / scale) >= min_long_side:
            return scale
    return 1


# --------------------------------------------------------------------------------------------------
# Budget checks
# --------------------------------------------------------------------------------------------------


def _int_attribute(ds: Dataset, keyword: str, default: int | None = None, low: int = 1, high: int = 2**32) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise InputError(f"the instance has no {keyword}; it is not an image that can be scored")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{keyword} is {value!r}; expected a whole number") from None
    if not low <= number <= high:
        raise InputError(f"{keyword} is {number}; expected {low} to {high}")
    return number


def _pixel_data_length(ds: Dataset) -> int | None:
    """Length of a native Pixel Data value without reading it (deferred elements keep their length)."""
    if "PixelData" not in ds:
        return None
    raw = ds.get_item("PixelData", keep_deferred=True)
    if raw is None:
        return None
    value = raw.value
    if value is not None:
        return len(value)
    length = getattr(raw, "length", None)
    return int(length) if length is not None else None


def check_pixel_budget(ds: Dataset, max_pixels: int, *, max_bytes: int | None = None) -> None:
    """Refuses an instance whose pixels would be too large or are not all there, before decoding.

    Checks Rows x Columns x Frames against ``max_pixels`` and Rows x Columns x Samples x Frames x
    bits against ``max_bytes``, then checks the Pixel Data itself: native data must hold at least the
    expected number of bytes; encapsulated data must hold non-empty fragments, at least one per frame,
    and a Basic Offset Table (when present) with one entry per frame.

    Args:
        ds: The dataset; its Pixel Data may still be deferred.
        max_pixels: Cap on Rows x Columns x Frames.
        max_bytes: Cap on the decoded size in bytes; defaults to ``3 * max_pixels`` (8-bit RGB).

    Raises:
        InputError: Naming what is too large or missing.
        ValueError: If a cap is not positive.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels is {max_pixels}; expected 1 or more")
    budget = 3 * max_pixels if max_bytes is None else max_bytes
    if budget < 1:
        raise ValueError(f"max_bytes is {budget}; expected 1 or more")
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if kinds:
            raise InputError(f"the instance holds {kinds[0]}, which is not a photograph; nothing to score")
        raise InputError("the instance has no Pixel Data; it is not an image that can be scored")
    rows = _int_attribute(ds, "Rows", high=65535)
    columns = _int_attribute(ds, "Columns", high=65535)
    samples = _int_attribute(ds, "SamplesPerPixel", high=4)
    frames = _int_attribute(ds, "NumberOfFrames", default=1, high=2**31)
    bits = _int_attribute(ds, "BitsAllocated", high=64)
    pixels = rows * columns * frames
    if pixels > max_pixels:
        raise InputError(
            f"{columns}x{rows} pixels x {frames} frame(s) = {pixels:,} pixels exceeds the cap of "
            f"{max_pixels:,} (max_pixels); refusing to decode (possible decompression bomb)"
        )
    decoded = pixels * samples * max(bits, 8) // 8
    if decoded > budget:
        raise InputError(
            f"{columns}x{rows} x {samples} sample(s) x {frames} frame(s) x {bits} bits = {decoded:,} bytes "
            f"exceeds the cap of {budget:,} bytes; refusing to decode (possible decompression bomb)"
        )
    transfer_syntax = _transfer_syntax(ds)
    if not transfer_syntax.is_encapsulated:
        expected = _expected_native_length(ds, rows, columns, samples, frames, bits)
        actual = _pixel_data_length(ds)
        if actual is None or actual < expected:
            raise InputError(
                f"short Pixel Data: {actual or 0:,} bytes where {columns}x{rows} x {samples} sample(s) x "
                f"{frames} frame(s) x {bits} bits needs {expected:,}; the file is truncated or its header is wrong"
            )
        problem = encoded.native_length_problem(actual, expected, frames)
        if problem is not None:
            raise InputError(
                f"{problem}: {actual:,} bytes where {frames} frame(s) need {expected:,}; scoring the declared "
                "frames would leave the rest unscored"
            )
        return
    _check_fragments(ds.PixelData, frames)


def _expected_native_length(ds: Dataset, rows: int, columns: int, samples: int, frames: int, bits: int) -> int:
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    return encoded.native_pixel_bytes(rows, columns, samples, frames, bits, photometric)


def _check_fragments(data: bytes, frames: int) -> None:
    try:
        offsets = encaps.parse_basic_offsets(data)
        fragments, _ = encaps.parse_fragments(data[8 + 4 * len(offsets) :])
    except (ValueError, struct.error) as exc:
        raise InputError(f"the encapsulated Pixel Data is malformed: {exc}") from None
    if fragments == 0:
        raise InputError("the encapsulated Pixel Data holds no fragments; the file is truncated or empty")
    if offsets and len(offsets) != frames:
        raise InputError(f"the Basic Offset Table lists {len(offsets)} frame(s) but NumberOfFrames is {frames}")
    if fragments < frames:
        raise InputError(
            f"the encapsulated Pixel Data holds {fragments} fragment(s) for {frames} frame(s); "
            "every frame needs at least one"
        )


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        raise InputError("the instance has no Transfer Syntax UID in its file meta information")
    return UID(str(uid))


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` looks like DICOM rather than a PNG or JPEG file (by its first bytes)."""
    with Path(path).open("rb") as handle:
        head = handle.read(132)
    if head[128:132] == b"DICM":
        return True
    return not any(head.startswith(signature) for signature in _PLAIN_SIGNATURES)


def _dataset_start(handle: BinaryIO) -> tuple[int, UID | None, FileMetaDataset]:
    """Where the dataset starts after any preamble and File Meta Information, and its syntax."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    handle.seek(0)
    read_preamble(handle, True)  # force: a file without the preamble is read from its first byte
    meta = _read_file_meta_info(handle)
    uid = meta.get("TransferSyntaxUID")
    return handle.tell(), (UID(str(uid)) if uid else None), meta


def _check_structure(data: mmap.mmap, start: int, syntax: UID | None) -> None:
    """Walks the element structure before pydicom parses it (:func:`retinagate.encoded.walk`).

    pydicom reads nested sequences recursively, so undefined-length nesting a few hundred levels
    deep raises ``RecursionError`` inside it; the walk applies the gateway's nesting rule first.
    Native Pixel Data that runs past the end of the file is left to :func:`check_pixel_budget`,
    which names the missing bytes.
    """
    if syntax is None:  # no File Meta Information: guess the VR encoding as pydicom does
        explicit, little = bytes(data[start + 4 : start + 6]).isalpha(), True
    else:
        explicit, little = syntax != ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    try:
        encoded.walk(data, explicit=explicit, little_endian=little, start=start, allow_short_pixels=True)
    except encoded.MalformedDatasetError as exc:
        if syntax is None:
            raise encoded.MalformedDatasetError(
                f"not a DICOM file: no File Meta Information, and the bytes are not a DICOM dataset ({exc})"
            ) from None
        raise encoded.MalformedDatasetError(f"the DICOM dataset is malformed: {exc}") from None


def _read_deflated(handle: BinaryIO, start: int, meta: FileMetaDataset, max_inflated: int) -> Dataset:
    """Reads a deflated dataset, inflating at most ``max_inflated`` bytes (pydicom has no bound)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    handle.seek(start)
    body = encoded.inflate(handle.read(), limit=max_inflated)
    try:
        encoded.walk(body, explicit=True)
    except encoded.MalformedDatasetError as exc:
        raise encoded.MalformedDatasetError(f"the DICOM dataset is malformed: {exc}") from None
    buffer = DicomBytesIO(bytes(body))
    del body
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    ds = read_dataset(cast(BinaryIO, buffer), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = meta
    return ds


def read_dataset(path: Path | str, *, max_pixels: int, max_bytes: int | None = None) -> Dataset:
    """Reads a DICOM file with its Pixel Data deferred, checks the pixel budget, then reads the pixels.

    The element structure is walked first (:func:`retinagate.encoded.walk`, the gateway's rule),
    so a malformed or too deeply nested file fails here with a message, not inside pydicom.

    Args:
        path: The DICOM file (Part 10 format; files without the preamble are read too).
        max_pixels: See :func:`check_pixel_budget`.
        max_bytes: See :func:`check_pixel_budget`.

    Returns:
        The dataset with its Pixel Data loaded.

    Raises:
        InputError: If the file is not DICOM, is malformed, is truncated or fails the budget check.
    """
    budget = 3 * max_pixels if max_bytes is None else max_bytes
    try:
        with Path(path).open("rb") as handle:
            try:
                start, syntax, meta = _dataset_start(handle)
            except (InvalidDicomError, EOFError, ValueError, struct.error) as exc:
                raise InputError(f"not a readable DICOM file: its File Meta Information is broken ({exc})") from None
            if Path(path).stat().st_size <= start:
                raise InputError("not a DICOM file: it holds no dataset")
            if syntax == DeflatedExplicitVRLittleEndian:
                ds = _read_deflated(handle, start, meta, encoded.inflate_limit(budget))
            else:
                # Mapped, not read: the walk touches element headers only, never pixel values.
                with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    _check_structure(data, start, syntax)
                handle.seek(0)
                ds = pydicom.dcmread(handle, defer_size=_DEFER_SIZE, force=True)
                if syntax is None and "SOPClassUID" not in ds and "PixelData" not in ds:
                    raise InputError("not a DICOM file: no DICM prefix and no recognisable dataset")
                _refuse_own_output(ds)
                check_pixel_budget(ds, max_pixels, max_bytes=max_bytes)
                # Loads the deferred native Pixel Data now that its declared size is acceptable.
                declared = _pixel_data_length(ds)
                pixel_data = ds.PixelData
                if declared is not None and len(pixel_data) < declared:
                    raise InputError(
                        f"short Pixel Data: the file ends {declared - len(pixel_data):,} bytes before the Pixel Data "
                        "does (truncated)"
                    )
                return ds
    except InputError:
        raise
    except (InvalidDicomError, EOFError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror or exc}") from None
    _refuse_own_output(ds)
    check_pixel_budget(ds, max_pixels, max_bytes=max_bytes)
    return ds


def own_output_of_file(path: Path | str) -> str | None:
    """Why a DICOM file is one of RetinaGate's own outputs (:mod:`retinagate.provenance`), or ``None``.

    For callers that skip such files rather than fail them (``retinagate score``). Reads only the
    header, after the same structure walk as :func:`read_dataset`. ``None`` also for a file that
    cannot be read this way (decoding it then reports why) and for a deflated file (RetinaGate
    never writes one; should one arrive, :func:`read_dataset` still refuses it as an own output).
    """
    try:
        with Path(path).open("rb") as handle:
            start, syntax, _ = _dataset_start(handle)
            if syntax == DeflatedExplicitVRLittleEndian or Path(path).stat().st_size <= start:
                return None
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _check_structure(data, start, syntax)
            handle.seek(0)
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
    except Exception:  # unreadable here means "not known to be ours"; the decoder says what is wrong
        return None
    return own_output(ds)


def _refuse_own_output(ds: Dataset) -> None:
    reason = own_output(ds)
    if reason is not None:
        raise OwnOutputError(f"{reason}; not scored, so that a routing loop cannot form")


# --------------------------------------------------------------------------------------------------
# Codestream headers
# --------------------------------------------------------------------------------------------------


def _jpeg_size(frame: bytes) -> tuple[int, int, int]:
    """``(width, height, components)`` from a JPEG, JPEG lossless or JPEG-LS start-of-frame marker."""
    if frame[:2] != b"\xff\xd8":
        raise InputError("a JPEG frame does not start with an SOI marker")
    position, end = 2, len(frame)
    while position + 4 <= end:
        if frame[position] != 0xFF:
            raise InputError("a JPEG frame has garbage between its markers")
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        if marker in _JPEG_SOF:
            if position + 10 > end:
                break
            height, width = struct.unpack(">HH", frame[position + 5 : position + 9])
            return width, height, frame[position + 9]
        if marker == 0xDA or length < 2:
            break
        position += 2 + length
    raise InputError("a JPEG frame has no start-of-frame marker before its image data")


def _j2k_size(frame: bytes) -> tuple[int, int, int]:
    """``(width, height, components)`` from a JPEG 2000 SIZ marker (raw codestream or JP2 file)."""
    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0 or start + 42 > len(frame):
        raise InputError("a JPEG 2000 frame has no SIZ marker")
    x_siz, y_siz, x_off, y_off = struct.unpack(">IIII", frame[start + 8 : start + 24])
    (components,) = struct.unpack(">H", frame[start + 40 : start + 42])
    return x_siz - x_off, y_siz - y_off, components


def _check_jpeg_structure(frame: bytes) -> None:
    """Refuses an ISO 10918-1 JPEG frame whose marker structure is broken, or that holds a second image.

    Pillow (libjpeg-turbo) decodes a corrupt entropy-coded segment without raising: it warns, fills
    what it cannot decode with grey, and returns a picture that would then be scored. Corruption that
    replaces bytes shows as a misplaced marker (random bytes hold 0xFF followed by a non-zero byte
    every few hundred bytes; pylibjpeg-libjpeg reports the same as "misplaced marker segment"), or as
    a frame with no end-of-image. A second start-of-image after the end-of-image is a frame that
    disagrees with NumberOfFrames (several images where one frame is declared). Flipped bits inside
    the Huffman codes that leave the marker structure intact are not found here: they decode to a
    damaged picture, which the gradability gate judges. One regular-expression scan per scan segment,
    in C: measured 0.34 ms per MB (0.13 ms for a 2048x1536 quality-95 frame of 0.4 MB, on the 2-core
    machine), against 2.9-3.5 ms to decode that frame at 1/8-1/4.
    """
    position, end = 2, len(frame)
    while True:
        if position + 2 > end:
            raise InputError(f"{_CORRUPT_JPEG}: it ends without an end-of-image marker")
        if frame[position] != 0xFF:
            raise InputError(f"{_CORRUPT_JPEG}: garbage between its markers at byte {position}")
        marker = frame[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker == _JPEG_EOI:
            break
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        if position + 4 > end:
            raise InputError(f"{_CORRUPT_JPEG}: it ends inside a marker segment")
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        if length < 2:
            raise InputError(f"{_CORRUPT_JPEG}: the marker segment at byte {position} has length {length}")
        position += 2 + length
        if marker != 0xDA:
            continue
        found = _JPEG_MARKER_AFTER_SCAN.search(frame, position)
        if found is None:
            raise InputError(f"{_CORRUPT_JPEG}: it ends inside its entropy-coded data")
        position = found.start()
        following = frame[position + 1]
        if following != _JPEG_EOI and following not in _JPEG_BETWEEN_SCANS:
            raise InputError(
                f"{_CORRUPT_JPEG}: misplaced marker 0xFF{following:02X} in its entropy-coded data at byte {position}"
            )
    if frame.find(b"\xff\xd8", position + 2) >= 0:
        raise InputError("a JPEG frame holds another image after its end-of-image; NumberOfFrames undercounts them")


def _check_codestream(frame: bytes, transfer_syntax: UID, rows: int, columns: int, samples: int, bits: int) -> None:
    """Refuses a compressed frame whose own header disagrees with Rows and Columns (a bomb)."""
    if not frame:
        raise InputError("an encapsulated frame is empty")
    if transfer_syntax == RLELossless:
        if len(frame) < 64:
            raise InputError("an RLE frame is shorter than its 64-byte header")
        (segments,) = struct.unpack("<I", frame[:4])
        if segments != samples * max(1, bits // 8):
            raise InputError(f"an RLE frame has {segments} segment(s); expected {samples * max(1, bits // 8)}")
        return
    if transfer_syntax in JPEG2000TransferSyntaxes:
        width, height, components = _j2k_size(frame)
    elif transfer_syntax in JPEGTransferSyntaxes or transfer_syntax in JPEGLSTransferSyntaxes:
        width, height, components = _jpeg_size(frame)
        if transfer_syntax in JPEGTransferSyntaxes:
            _check_jpeg_structure(frame)
    else:
        return  # other encapsulated syntaxes (video) are refused by the decoder anyway
    if (width, height) != (columns, rows) or components != samples:
        raise InputError(
            f"a compressed frame is {width}x{height} with {components} component(s) but the header says "
            f"{columns}x{rows} with {samples}; refusing to decode (possible decompression bomb)"
        )


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _to_rgb8(arr: NDArray[Any], photometric: str, bits_stored: int, signed: bool) -> Frame:
    """Scales a decoded frame to uint8 and gives it three channels."""
    if arr.dtype != np.uint8 or bits_stored < 8:
        values = arr.astype(np.float32)
        if signed:
            values += float(1 << (bits_stored - 1))
        top = float((1 << bits_stored) - 1)
        arr = cv2.convertScaleAbs(values, alpha=255.0 / top)  # saturates to 0-255
    if arr.ndim == 2:
        if photometric == "MONOCHROME1":
            arr = 255 - arr
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def _reduce(frame: Frame, scale: int) -> Frame:
    """Area-reduces a full-size frame to the size libjpeg-turbo's DCT scaling would give."""
    if scale == 1:
        return frame
    height, width = frame.shape[:2]
    size = (math.ceil(width / scale), math.ceil(height / scale))
    return np.ascontiguousarray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))


def _untransformed_rgb(image: Any, photometric: str) -> bool:
    """Whether libjpeg-turbo would wrongly colour-convert this stream (see the module docstring)."""
    info = image.info
    if "jfif" in info or "adobe" in info or "adobe_transform" in info:
        return False
    ids = tuple(layer[0] for layer in getattr(image, "layer", ()))
    if ids == _RGB_COMPONENT_IDS:
        return False
    return photometric == "RGB"


def _decode_jpeg_frame(frame: bytes, scale: int, photometric: str, samples: int, size: tuple[int, int]) -> Frame:
    """Decodes one JPEG frame with libjpeg-turbo at ``1/scale`` (DCT scaling)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(frame), formats=("JPEG",)) as image:
            layers = int(getattr(image, "layers", 0))
            if image.size != size or layers != samples:
                raise InputError(
                    f"a JPEG frame is {image.size[0]}x{image.size[1]} with {layers} component(s) but "
                    f"the header says {size[0]}x{size[1]} with {samples}; refusing to decode"
                )
            mode = "L" if samples == 1 else ("YCbCr" if _untransformed_rgb(image, photometric) else "RGB")
            target = (max(1, size[0] // scale), max(1, size[1] // scale))
            image.draft(mode, target)
            arr = np.asarray(image)
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"a JPEG frame cannot be decoded: {exc}") from None
    expected = (math.ceil(size[1] / scale), math.ceil(size[0] / scale))
    if arr.shape[:2] != expected:  # a decoder without DCT scaling; reduce by area instead
        arr = _reduce(arr, scale) if arr.shape[:2] == (size[1], size[0]) else cv2.resize(arr, expected[::-1])
    if arr.ndim == 2 and photometric == "MONOCHROME1":
        arr = 255 - arr
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr)


def _encapsulated_frames(ds: Dataset, frames: int) -> Iterator[bytes]:
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    count = 0
    try:
        for frame in encaps.generate_frames(ds.PixelData, number_of_frames=frames, extended_offsets=extended):
            count += 1
            if count > frames:
                return
            yield frame
    except (ValueError, struct.error) as exc:
        raise InputError(f"the encapsulated Pixel Data is malformed: {exc}") from None
    if count < frames:
        raise InputError(f"the encapsulated Pixel Data holds {count} frame(s) but NumberOfFrames is {frames}")


def decode_dataset(ds: Dataset, *, min_side: int, min_long_side: int = 0, source: str = "<dataset>") -> DecodedImage:
    """Decodes every frame of a dataset whose pixel budget has been checked.

    Args:
        ds: A dataset that passed :func:`check_pixel_budget`, Pixel Data loaded.
        min_side: Pixels the short side must keep (see :func:`choose_scale`).
        min_long_side: Pixels the long side must keep.
        source: Name used in messages.

    Returns:
        The decoded frames; ``header`` is a copy of ``ds`` without Pixel Data.

    Raises:
        InputError: If the transfer syntax or photometric interpretation cannot be decoded, or a
            frame is corrupt or disagrees with the header.
    """
    import time

    started = time.perf_counter()
    transfer_syntax = _transfer_syntax(ds)
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.SamplesPerPixel)
    frames = int(ds.get("NumberOfFrames") or 1)
    bits = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored") or bits)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    unscorable = encoded.unscorable_pixels(samples, photometric, ds)
    if unscorable is not None:
        raise InputError(f"{unscorable}; the gateway refuses such instances too")
    scale = choose_scale(rows, columns, min_side, min_long_side)
    decoded: list[Frame] = []
    if transfer_syntax.is_encapsulated:
        for frame in _encapsulated_frames(ds, frames):
            _check_codestream(frame, transfer_syntax, rows, columns, samples, bits)
            if transfer_syntax in _JPEG_FAST_SYNTAXES and bits == 8:
                decoded.append(_decode_jpeg_frame(frame, scale, photometric, samples, (columns, rows)))
        if len(decoded) == frames:
            return _finish(ds, decoded, (rows, columns), scale, source, started)
        decoded = []
    decoded = [_reduce(frame, scale) for frame in _pydicom_frames(ds, photometric, bits_stored, signed)]
    if len(decoded) != frames:
        raise InputError(f"decoded {len(decoded)} frame(s) but NumberOfFrames is {frames}")
    return _finish(ds, decoded, (rows, columns), scale, source, started)


def _pydicom_frames(ds: Dataset, photometric: str, bits_stored: int, signed: bool) -> Iterator[Frame]:
    """Every other transfer syntax: pydicom's decoders, then YBR to RGB and scaling to 8 bits."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.pixels.processing import apply_color_lut, convert_color_space

    try:
        decoder = get_decoder(_transfer_syntax(ds))
    except NotImplementedError as exc:
        raise InputError(f"transfer syntax {_transfer_syntax(ds).name} is not supported: {exc}") from None
    if not decoder.is_available:
        raise InputError(f"no decoder is installed for {_transfer_syntax(ds).name}")
    try:
        for arr, meta in decoder.iter_array(ds, as_rgb=True):
            current = str(meta.get("photometric_interpretation", photometric))
            if current == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
                current, depth, is_signed = "RGB", 16 if arr.dtype != np.uint8 else 8, False
            else:
                depth, is_signed = bits_stored, signed
            if current in ("YBR_FULL", "YBR_FULL_422") and arr.ndim == 3:
                arr = convert_color_space(arr, current, "RGB")
            elif arr.ndim == 3 and current not in ("RGB", "YBR_ICT", "YBR_RCT"):
                raise InputError(f"photometric interpretation {current} is not supported")
            yield _to_rgb8(arr, current, depth, is_signed)
    except InputError:
        raise
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError, KeyError, OSError) as exc:
        raise InputError(f"the pixel data cannot be decoded: {type(exc).__name__}: {exc}") from None


def _finish(
    ds: Dataset, frames: list[Frame], shape: tuple[int, int], scale: int, source: str, started: float
) -> DecodedImage:
    import time

    header = Dataset()
    for tag in ds.keys():  # noqa: SIM118 - keys() does not convert raw elements, iteration does
        if tag != 0x7FE00010:
            # Raw elements stay raw: most are never read, and converting them all cost milliseconds.
            header[tag] = ds.get_item(tag)
    header.file_meta = getattr(ds, "file_meta", FileMetaDataset())
    return DecodedImage(
        frames=frames,
        source_shape=shape,
        scale=scale,
        header=header,
        source=source,
        timings={"decode": time.perf_counter() - started},
    )


def decode_instance(
    path: Path | str, *, min_side: int, max_pixels: int, min_long_side: int = 0, max_bytes: int | None = None
) -> DecodedImage:
    """Reads, checks and decodes one DICOM file.

    Args:
        path: The DICOM file.
        min_side: Pixels the short side must keep (the model's input size).
        max_pixels: Cap on Rows x Columns x Frames (see :func:`check_pixel_budget`).
        min_long_side: Pixels the long side must keep (the Secondary Capture's display size).
        max_bytes: Cap on the decoded size; defaults to ``3 * max_pixels``.

    Returns:
        The decoded frames and the header without Pixel Data.

    Raises:
        InputError: If the file is unreadable, too large, truncated or cannot be decoded.
    """
    import time

    started = time.perf_counter()
    ds = read_dataset(path, max_pixels=max_pixels, max_bytes=max_bytes)
    read_s = time.perf_counter() - started
    decoded = decode_dataset(ds, min_side=min_side, min_long_side=min_long_side, source=str(path))
    decoded.timings["read"] = read_s
    return decoded


def decode_image_file(
    path: Path | str, *, min_side: int = 0, max_pixels: int = 100_000_000, min_long_side: int = 0
) -> DecodedImage:
    """Decodes a PNG or JPEG photograph (JPEG at a reduced DCT scale, like DICOM JPEG frames).

    The EXIF orientation of a JPEG is applied, as a photo viewer would. 16-bit PNGs are scaled to
    8 bits; an alpha channel is dropped.

    Args:
        path: The image file.
        min_side: Pixels the short side must keep.
        max_pixels: Cap on width x height, checked from the file header before decoding.
        min_long_side: Pixels the long side must keep.

    Returns:
        A :class:`DecodedImage` with one frame and no DICOM header.

    Raises:
        InputError: If the file is not a readable image or is larger than the cap.
    """
    import time

    from PIL import Image, ImageOps

    started = time.perf_counter()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(
                    f"{width}x{height} = {width * height:,} pixels exceeds the cap of {max_pixels:,} (max_pixels)"
                )
            scale = choose_scale(height, width, min_side, min_long_side)
            if image.format == "JPEG":
                if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation swaps the axes
                    width, height = height, width
                image.draft("RGB", (max(1, image.size[0] // scale), max(1, image.size[1] // scale)))
                rgb = image.convert("RGB") if image.mode != "RGB" else image
                transposed = ImageOps.exif_transpose(rgb)
                frame = np.asarray(transposed if transposed is not None else rgb)
            else:
                arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
                if arr is None:
                    raise InputError("the image cannot be decoded")
                frame = _reduce(np.asarray(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), dtype=np.uint8), scale)
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"not a readable PNG or JPEG image: {exc}") from None
    return DecodedImage(
        frames=[np.ascontiguousarray(frame, dtype=np.uint8)],
        source_shape=(height, width),
        scale=scale,
        header=None,
        source=str(path),
        timings={"decode": time.perf_counter() - started},
        content_sha256=hashlib.sha256(data).hexdigest(),
    )


def decode_path(
    path: Path | str, *, min_side: int, max_pixels: int, min_long_side: int = 0, max_bytes: int | None = None
) -> DecodedImage:
    """Decodes a DICOM file or a PNG/JPEG photograph, telling them apart by their first bytes.

    Raises:
        InputError: See :func:`decode_instance` and :func:`decode_image_file`.
    """
    try:
        dicom = is_dicom_file(Path(path))
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror or exc}") from None
    if dicom:
        return decode_instance(
            path, min_side=min_side, max_pixels=max_pixels, min_long_side=min_long_side, max_bytes=max_bytes
        )
    return decode_image_file(path, min_side=min_side, max_pixels=max_pixels, min_long_side=min_long_side)
