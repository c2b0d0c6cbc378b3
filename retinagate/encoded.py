"""Rules on an encoded DICOM dataset, applied before pydicom parses it.

The gateway (on the bytes of a C-STORE) and the decoder (on a stored or local file) apply the same
rules here, so what the gateway accepts the worker can read, and a hostile file given to
``retinagate score`` fails with the same message a camera's C-STORE would be refused for:

* :func:`walk` checks the element structure without decoding values: every length stays inside the
  data, items and delimiters sit where they belong, and sequences nest at most
  :data:`MAX_SEQUENCE_DEPTH` levels. pydicom parses nested sequences recursively, so 600 levels of
  undefined-length nesting raise ``RecursionError`` inside it; the walk refuses them first.
* :func:`inflate` inflates a Deflated Explicit VR Little Endian dataset as a stream, in
  :data:`INFLATE_CHUNK` pieces, and stops as soon as the output passes its limit. Once the header
  in front of Pixel Data has come out, the limit tightens to what that header declares (the native
  image size plus :data:`TRAILING_ROOM`), so a 600 KB bomb that declares a small image is refused
  after inflating a few megabytes, not hundreds.
* :func:`native_pixel_bytes` is the one formula for how many bytes native Pixel Data must hold.

Errors are :class:`~retinagate.errors.InputError` subclasses, so a worker marks the instance failed
with the message and the CLI reports it; the gateway maps each class to its DIMSE status.
"""

from __future__ import annotations

import io
import math
import mmap
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from retinagate.errors import InputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: What the walk reads: bytes received, an inflated buffer, or a memory-mapped file.
Encoded = bytes | bytearray | memoryview | mmap.mmap

__all__ = [
    "INFLATE_CHUNK",
    "MAX_SEQUENCE_DEPTH",
    "NON_PIXEL_ROOM",
    "PALETTE_DESCRIPTORS",
    "SCORABLE_SAMPLES",
    "TRAILING_ROOM",
    "DatasetTooLargeError",
    "Encoded",
    "MalformedDatasetError",
    "PixelLayout",
    "Structure",
    "inflate",
    "inflate_limit",
    "native_length_problem",
    "native_pixel_bytes",
    "unscorable_pixels",
    "walk",
]

#: Deepest sequence nesting accepted. Ophthalmic photographs nest three or four levels (a code
#: sequence inside an acquisition context item inside a sequence); 32 leaves room for any real
#: object, and keeps pydicom's recursive reader far from Python's recursion limit.
MAX_SEQUENCE_DEPTH: Final = 32

#: Inflated bytes produced per step of :func:`inflate`: the most it can overshoot its limit.
INFLATE_CHUNK: Final = 1024 * 1024

#: Room for the non-pixel part of a deflated dataset (header, sequences, private data) on top of the
#: decoded pixel budget: far more than any photograph's header, small against the budget.
NON_PIXEL_ROOM: Final = 16 * 1024 * 1024

#: Room after the declared end of Pixel Data for an odd-length pad and trailing elements (Data Set
#: Trailing Padding, Digital Signatures), which photographs rarely carry and never in megabytes.
TRAILING_ROOM: Final = 1024 * 1024

_INPUT_PIECE: Final = 64 * 1024

_PIXEL_DATA: Final = 0x7FE00010
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
# Explicit VR elements whose length is 4 bytes, after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


class MalformedDatasetError(InputError):
    """The element structure is broken (truncated, misplaced items, nested too deep)."""


class DatasetTooLargeError(InputError):
    """The dataset (inflated, for a deflated one) is larger than its limit allows."""


class _TruncatedError(MalformedDatasetError):
    """The data ends inside an element: while inflating this means "wait for more", not "broken"."""


@dataclass
class PixelLayout:
    """Where the top-level Pixel Data is and what form it has.

    Attributes:
        offset: Where its element starts (everything before it is the header).
        value_offset: Where its value starts.
        defined_length: The value length of native Pixel Data; ``None`` when encapsulated.
        fragments: Encapsulated: the item lengths, Basic Offset Table first; ``None`` when native.
        truncated: Native Pixel Data whose value runs past the end of the data (only reported, not
            raised, when :func:`walk` is asked to allow it).
    """

    offset: int
    value_offset: int
    defined_length: int | None = None
    fragments: list[int] | None = None
    truncated: bool = False


@dataclass
class Structure:
    """What :func:`walk` found: the top-level Pixel Data, when there is one."""

    pixels: PixelLayout | None = None
    end: int = 0
    depth: int = 0


class _Walker:
    """Walks the element structure of an encoded dataset without decoding values.

    pydicom tolerates a truncated stream (it warns and drops the element), which would let a cut-off
    transfer through as a dataset without Pixel Data; this walk refuses it instead. Recursion here is
    bounded by :data:`MAX_SEQUENCE_DEPTH`.
    """

    def __init__(self, buffer: Encoded, start: int, little_endian: bool, allow_short_pixels: bool) -> None:
        self.buffer = buffer
        self.start = start
        self.end = len(buffer)
        self.pixels: PixelLayout | None = None
        self.deepest = 0
        self.allow_short_pixels = allow_short_pixels
        order = "<" if little_endian else ">"
        self._tag = struct.Struct(order + "HH")
        self._u16 = struct.Struct(order + "H")
        self._u32 = struct.Struct(order + "L")

    def _need(self, pos: int, count: int) -> None:
        if pos + count > self.end:
            raise _TruncatedError(f"the dataset is truncated at byte {pos - self.start}")

    def header(self, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
        """``(tag, VR or None, value length, value offset)`` of the element at ``pos``."""
        self._need(pos, 8)
        group, element = self._tag.unpack_from(self.buffer, pos)
        tag = group << 16 | element
        if group == 0xFFFE or not explicit:  # item and delimiter tags carry no VR in either encoding
            return tag, None, self._u32.unpack_from(self.buffer, pos + 4)[0], pos + 8
        vr = bytes(self.buffer[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            self._need(pos, 12)
            return tag, vr, self._u32.unpack_from(self.buffer, pos + 8)[0], pos + 12
        if not (vr.isalpha() and vr.isupper()):
            raise MalformedDatasetError(f"no value representation at byte {pos + 4 - self.start}")
        return tag, vr, self._u16.unpack_from(self.buffer, pos + 6)[0], pos + 8

    def element(self, pos: int, explicit: bool, depth: int) -> int:
        """Checks the element at ``pos`` (and any sequence it holds); returns where the next starts."""
        tag, vr, length, value = self.header(pos, explicit)
        if tag == _ITEM_END or tag in (_ITEM, _SEQUENCE_END):
            raise MalformedDatasetError("an item tag where an element was expected")
        top_pixels = tag == _PIXEL_DATA and depth == 0
        if length == _UNDEFINED:
            if top_pixels:
                end = self._fragments(value)
                self.pixels = PixelLayout(pos, value, fragments=self._fragment_lengths)
                return end
            if vr in (None, b"SQ", b"UN"):
                # An undefined-length UN holds a sequence encoded implicit VR (PS3.5 6.2.2).
                return self._sequence(value, explicit and vr != b"UN", depth + 1)
            raise MalformedDatasetError(f"undefined length on a {vr.decode('ascii', 'replace')} element")
        if top_pixels:
            self.pixels = PixelLayout(pos, value, defined_length=length)
            if self.allow_short_pixels and value + length > self.end:
                self.pixels.truncated = True
                return self.end
        self._need(value, length)
        return value + length

    def dataset(self, pos: int, explicit: bool, depth: int, in_item: bool) -> int:
        if depth > MAX_SEQUENCE_DEPTH:
            raise MalformedDatasetError(f"sequences are nested more than {MAX_SEQUENCE_DEPTH} levels deep")
        self.deepest = max(self.deepest, depth)
        while pos < self.end:
            tag, _, _, after = self.header(pos, explicit)
            if tag == _ITEM_END:
                if not in_item:
                    raise MalformedDatasetError("an item delimiter outside an item")
                return after
            pos = self.element(pos, explicit, depth)
        if in_item:
            raise _TruncatedError("the dataset is truncated inside a sequence item")
        return pos

    def _sequence(self, pos: int, explicit: bool, depth: int) -> int:
        if depth > MAX_SEQUENCE_DEPTH:
            raise MalformedDatasetError(f"sequences are nested more than {MAX_SEQUENCE_DEPTH} levels deep")
        while True:
            tag, _, length, pos = self.header(pos, explicit=False)
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise MalformedDatasetError("a sequence holds something other than items")
            if length == _UNDEFINED:
                pos = self.dataset(pos, explicit, depth, in_item=True)
            else:
                self._need(pos, length)
                pos += length

    def _fragments(self, pos: int) -> int:
        self._fragment_lengths: list[int] = []
        while True:
            tag, _, length, pos = self.header(pos, explicit=False)
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise MalformedDatasetError("encapsulated Pixel Data holds something other than defined-length items")
            self._need(pos, length)
            self._fragment_lengths.append(length)
            pos += length


def walk(
    buffer: Encoded,
    *,
    explicit: bool,
    little_endian: bool = True,
    start: int = 0,
    allow_short_pixels: bool = False,
) -> Structure:
    """Checks the element structure of an encoded dataset, values untouched.

    Args:
        buffer: The encoded dataset (inflated, when it was deflated); a memory map works too.
        explicit: Explicit VR (every syntax but Implicit VR Little Endian).
        little_endian: False only for the retired Explicit VR Big Endian.
        start: Where the dataset begins in ``buffer`` (after the File Meta Information).
        allow_short_pixels: Report native Pixel Data that runs past the end of the data in
            :attr:`PixelLayout.truncated` instead of raising; the decoder then names the missing
            bytes, which says more than "truncated".

    Returns:
        Where the top-level Pixel Data is, and the deepest nesting seen.

    Raises:
        MalformedDatasetError: Naming the first problem (offsets count from ``start``).
    """
    walker = _Walker(buffer, start, little_endian, allow_short_pixels)
    end = walker.dataset(start, explicit, 0, in_item=False)
    return Structure(pixels=walker.pixels, end=end, depth=walker.deepest)


def native_pixel_bytes(rows: int, columns: int, samples: int, frames: int, bits: int, photometric: str) -> int:
    """Bytes native Pixel Data needs for the image its header declares (before the even-length pad).

    ``YBR_FULL_422`` stores two chroma samples shared by each pair of pixels, so two samples per
    pixel rather than three; 1-bit data is packed.
    """
    per_pixel = 2 if photometric.strip().upper() == "YBR_FULL_422" and samples == 3 else samples
    return math.ceil(rows * columns * frames * per_pixel * bits / 8)


#: Samples per pixel the decoder can score: 1 (grey) and 3 (colour). 4 (the retired ARGB and CMYK)
#: cannot be, so the gateway refuses it rather than store an instance that can only fail.
SCORABLE_SAMPLES: Final = frozenset({1, 3})

#: What PALETTE COLOR pixels need to become colours: the three lookup table descriptors (the data
#: elements come with them; a file with descriptors but no data fails in the decoder with its reason).
PALETTE_DESCRIPTORS: Final = (
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
)


def unscorable_pixels(samples: int, photometric: str, dataset: Dataset) -> str | None:
    """Why an image with these Image Pixel attributes can never be scored, or ``None``.

    The gateway's and the decoder's one rule: the gateway refuses such an instance (0xA900) instead of
    storing it for a worker that can only fail it; the decoder fails a file with the same reason.

    Args:
        samples: Samples per Pixel.
        photometric: Photometric Interpretation.
        dataset: The dataset (its header is enough), asked which attributes it has.
    """
    if samples not in SCORABLE_SAMPLES:
        return f"SamplesPerPixel {samples} cannot be scored (1 or 3)"
    if photometric.strip().upper() == "PALETTE COLOR" and not all(k in dataset for k in PALETTE_DESCRIPTORS):
        return "PALETTE COLOR without its lookup tables"
    return None


def native_length_problem(length: int, expected: int, frames: int) -> str | None:
    """Why native Pixel Data of ``length`` bytes does not hold its declared image, or ``None``.

    ``expected`` is :func:`native_pixel_bytes` for all ``frames`` frames. Shorter is a truncated file
    or a lying header. Longer by less than one frame is padding (the even-length pad byte, or a
    writer's slack) that the decoder ignores. Longer by a whole frame or more means NumberOfFrames
    undercounts the frames: scoring the declared ones would silently leave the rest unscored. The
    gateway refuses both (0xA900); the decoder fails both. Messages fit an Error Comment (64).
    """
    if length < expected:
        return "Pixel Data shorter than the image it declares"
    if length - expected >= max(1, expected // max(1, frames)):
        return "Pixel Data holds more frames than NumberOfFrames"
    return None


def inflate_limit(decoded_budget: int, max_bytes: int | None = None) -> int:
    """The most a deflated dataset may inflate to: its pixel budget plus :data:`NON_PIXEL_ROOM`.

    Args:
        decoded_budget: Largest decoded Pixel Data accepted (``3 * max_pixels`` for 8-bit RGB).
        max_bytes: A cap on the whole instance (the gateway's ``max_instance_bytes``), if any.
    """
    limit = decoded_budget + NON_PIXEL_ROOM
    return limit if max_bytes is None else min(limit, max_bytes)


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _declared_end(header: bytes, pixels: PixelLayout) -> int | None:
    """Where a deflated dataset may end at most, from the image its header declares (``None``: unknown).

    An unreadable or incomplete header gives ``None``: the limit then stays as it was, and the full
    check after inflating refuses the header with its own, more specific reason.
    """
    from pydicom.filereader import read_dataset

    try:
        ds = read_dataset(io.BytesIO(header), is_implicit_VR=False, is_little_endian=True)
        rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
        samples, bits = _int(ds.get("SamplesPerPixel")), _int(ds.get("BitsAllocated"))
        frames = _int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.get("PhotometricInterpretation", "") or "")
    except Exception:  # pydicom raises many types for values it cannot read
        return None
    if rows is None or columns is None or samples is None or bits is None or frames is None:
        return None
    return pixels.value_offset + native_pixel_bytes(rows, columns, samples, frames, bits, photometric) + TRAILING_ROOM


class _Inflation:
    """The output of :func:`inflate` so far, its limit, and the walk of its header."""

    def __init__(self, limit: int) -> None:
        self.out = bytearray()
        self.limit = limit
        self._scanner = _Walker(self.out, 0, little_endian=True, allow_short_pixels=True)
        self._position = 0  # start of the first top-level element not yet walked
        self._header_seen = False

    def add(self, chunk: bytes) -> None:
        self.out += chunk
        if len(self.out) > self.limit:
            raise DatasetTooLargeError(
                f"the deflated dataset inflates beyond {self.limit:,} bytes; refusing it (possible deflate bomb)"
            )
        if self._header_seen:
            return
        scanner = self._scanner
        scanner.end = len(self.out)
        try:
            while self._position < scanner.end and scanner.pixels is None:
                self._position = scanner.element(self._position, explicit=True, depth=0)
        except _TruncatedError:
            pass  # the element goes on in the next chunk; broken ones raise MalformedDatasetError
        if scanner.pixels is None:
            return
        self._header_seen = True
        declared = _declared_end(bytes(self.out[: scanner.pixels.offset]), scanner.pixels)
        if declared is None:
            return
        if declared - TRAILING_ROOM > self.limit:
            raise DatasetTooLargeError(
                f"the deflated dataset declares an image that needs more than {self.limit:,} bytes "
                "inflated; refusing it before inflating the pixels"
            )
        self.limit = min(self.limit, declared)
        if len(self.out) > self.limit:
            raise DatasetTooLargeError(
                "the deflated dataset holds more than the image its header declares; refusing it "
                "(possible deflate bomb)"
            )


def inflate(data: bytes | bytearray | memoryview, *, limit: int) -> bytearray:
    """Inflates a Deflated Explicit VR Little Endian dataset as a stream, bounded as it goes.

    Output comes out :data:`INFLATE_CHUNK` bytes at a time (zlib ``max_length``), so memory never
    holds more than the limit plus one chunk; input goes in :data:`_INPUT_PIECE` slices, so zlib's
    unconsumed tail (copied at every step) stays small. The element structure is walked as it
    arrives: a stream that is not a dataset stops at its first broken element, and once the header
    before Pixel Data is out the limit tightens to the end of the image it declares plus
    :data:`TRAILING_ROOM` (a header whose declared image alone passes the limit stops right there).

    Args:
        data: The deflated dataset (raw deflate, no zlib header, PS3.5 A.5).
        limit: Most inflated bytes accepted; see :func:`inflate_limit`.

    Returns:
        The inflated dataset (Explicit VR Little Endian).

    Raises:
        DatasetTooLargeError: As soon as the output passes the limit.
        MalformedDatasetError: When the stream is not valid deflate data or its elements are broken.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    state = _Inflation(limit)
    view = memoryview(data).cast("B")
    try:
        for start in range(0, len(view), _INPUT_PIECE):
            pending: bytes | memoryview = view[start : start + _INPUT_PIECE]
            while pending and not inflater.eof:
                state.add(inflater.decompress(pending, INFLATE_CHUNK))
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        while chunk := inflater.decompress(b"", INFLATE_CHUNK):  # what zlib still holds
            state.add(chunk)
    except zlib.error as exc:
        raise MalformedDatasetError(f"the deflated dataset is corrupt: {exc}") from None
    finally:
        view.release()
    return state.out
