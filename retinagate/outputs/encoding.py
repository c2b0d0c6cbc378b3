"""Part 10 encoding in pieces: byte templates with slots, for objects made once per image.

pydicom serialises a dataset element by element in Python (about 10 µs per element), and highdicom
builds and validates every content item of an SR on construction: for a 29-label TID 1500 report,
thousands of elements, together far more than decoding and scoring the photograph. Most of those
elements are the same for every image a model scores. A :class:`ByteTemplate` is such an object
encoded once, Explicit VR Little Endian, with *slots* where per-image values go; rendering it joins
the constant bytes with the per-image encoded elements.

Lengths: sequences and items in a template are written with undefined length and closed by
delimitation items (PS3.5 7.5.1), so that a slot's length never has to be propagated to the
elements that contain it. Every DICOM reader supports this encoding; the values read back are those
of the dataset the template was compiled from.

Everything that is not a sequence is encoded by pydicom's own :func:`pydicom.filewriter.
write_data_element`, once per template; the few fast encoders here (:func:`uid_element`,
:func:`ds_element`, :func:`fd_element`) write single per-image values, and the tests compare them
with pydicom's output.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, overload

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import DSdecimal, DSfloat

__all__ = [
    "ByteTemplate",
    "compile_element",
    "compile_item",
    "copy_with",
    "ds_element",
    "encode_element",
    "encode_part10",
    "encodings_of",
    "fd_element",
    "part10",
    "uid_element",
]

UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
_ITEM_END: Final = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END: Final = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
# VRs with a 4-byte length field in Explicit VR (PS3.5 table 7.1-1).
_LONG_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


def _header(tag: int, vr: str, length: int) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)


def uid_element(tag: int, uid: str) -> bytes:
    """A UI element (padded with NUL to even length, as PS3.5 6.2 requires)."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return _header(tag, "UI", len(value)) + value


def ds_element(tag: int, value: DSfloat | DSdecimal) -> bytes:
    """A single-valued DS element, written as pydicom writes it (its original string, space padded)."""
    text = str(getattr(value, "original_string", None) or value).encode("ascii")
    if len(text) % 2:
        text += b" "
    return _header(tag, "DS", len(text)) + text


def fd_element(tag: int, value: float) -> bytes:
    """A single-valued FD element."""
    return _header(tag, "FD", 8) + struct.pack("<d", value)


@overload
def copy_with(dataset: FileMetaDataset, **values: Any) -> FileMetaDataset: ...
@overload
def copy_with(dataset: Dataset, **values: Any) -> Dataset: ...
def copy_with(dataset: Dataset, **values: Any) -> Dataset:
    """A new plain dataset (or file meta) with the same elements, but ``values`` set (``None``: left out).

    ``Dataset(other)`` would share ``other``'s element dictionary, and setting an attribute that is
    already there changes the element object in place: either would change a cached template. Here
    the elements not named are shared (treat them as read-only) and the named ones are new.
    """
    copy = FileMetaDataset() if isinstance(dataset, FileMetaDataset) else Dataset()
    for element in dataset:
        if element.keyword not in values:
            copy.add(element)
    for keyword, value in values.items():
        if value is not None:
            setattr(copy, keyword, value)
    return copy


def encodings_of(character_set: object) -> list[str]:
    """Python codecs for a Specific Character Set value (``None``: the default repertoire)."""
    return list(convert_encodings(character_set))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ByteTemplate:
    """Encoded bytes with named slots; :meth:`render` fills the slots.

    Attributes:
        segments: Constant bytes and slot names, in order.
    """

    segments: tuple[bytes | str, ...]

    @property
    def slots(self) -> frozenset[str]:
        """Names of the slots."""
        return frozenset(s for s in self.segments if isinstance(s, str))

    def render(self, values: Mapping[str, bytes]) -> bytes:
        """The template's bytes with each slot replaced by its encoded value.

        Raises:
            KeyError: If a slot has no value.
        """
        return b"".join([s if isinstance(s, bytes) else values[s] for s in self.segments])


class _Compiler:
    """Walks a dataset tree and emits bytes, leaving slots open (keyed by object identity)."""

    def __init__(self, slots: Mapping[int, str], encodings: list[str]) -> None:
        self._slots = slots
        self._encodings = encodings
        self._segments: list[bytes | str] = []
        self._pending = bytearray()

    def template(self) -> ByteTemplate:
        if self._pending:
            self._segments.append(bytes(self._pending))
            self._pending = bytearray()
        return ByteTemplate(tuple(self._segments))

    def _slot(self, name: str) -> None:
        if self._pending:
            self._segments.append(bytes(self._pending))
            self._pending = bytearray()
        self._segments.append(name)

    def element(self, element: DataElement) -> None:
        name = self._slots.get(id(element))
        if name is not None:
            self._slot(name)
        elif element.VR == "SQ":
            self._pending += _header(int(element.tag), "SQ", UNDEFINED)
            for item in element.value:
                self.item(item)
            self._pending += _SEQUENCE_END
        else:
            fp = DicomBytesIO()
            fp.is_little_endian = True
            fp.is_implicit_VR = False
            write_data_element(fp, element, self._encodings)
            self._pending += fp.getvalue()

    def item(self, item: Dataset) -> None:
        name = self._slots.get(id(item))
        if name is not None:
            self._slot(name)
            return
        self._pending += _ITEM
        for tag in sorted(item.keys()):
            self.element(item[tag])
        self._pending += _ITEM_END


def compile_element(element: DataElement, slots: Mapping[int, str], encodings: list[str]) -> ByteTemplate:
    """Encodes one element (a sequence with everything in it) with the given elements and items left as slots.

    Args:
        element: The element to encode.
        slots: ``id()`` of an element or sequence item inside ``element`` to the slot's name; the
            value given for the slot at :meth:`ByteTemplate.render` replaces the whole element or item.
        encodings: Python codecs of the dataset's Specific Character Set (:func:`encodings_of`).
    """
    compiler = _Compiler(slots, encodings)
    compiler.element(element)
    return compiler.template()


def compile_item(item: Dataset, slots: Mapping[int, str], encodings: list[str]) -> ByteTemplate:
    """Like :func:`compile_element`, for one sequence item (its item and delimitation tags included)."""
    compiler = _Compiler(slots, encodings)
    compiler.item(item)
    return compiler.template()


def encode_element(element: DataElement, encodings: list[str]) -> bytes:
    """One element, encoded (sequences with undefined lengths, like templates)."""
    return compile_element(element, {}, encodings).render({})


def encode_part10(dataset: Dataset, tail: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """Part 10 bytes of ``dataset`` (which must have its ``file_meta``) merged with pre-encoded elements.

    Args:
        dataset: The elements to encode here, and the file meta information.
        tail: ``(tag, bytes)`` of top-level elements already encoded, none of whose tags is in ``dataset``.

    Raises:
        ValueError: If a tail element's tag is also in ``dataset``, or the transfer syntax is not
            Explicit VR Little Endian or an encapsulated one (whose data set is encoded that way).
    """
    syntax = UID(dataset.file_meta.get("TransferSyntaxUID", ""))
    if syntax != ExplicitVRLittleEndian and not (syntax.is_encapsulated and not syntax.is_deflated):
        raise ValueError("file_meta: TransferSyntaxUID must be Explicit VR Little Endian or an encapsulated one")
    pieces = list(tail)
    clash = [tag for tag, _ in pieces if tag in dataset]
    if clash:
        raise ValueError(f"tail: tags {[hex(t) for t in clash]} are also in the dataset")
    encodings = encodings_of(dataset.get("SpecificCharacterSet"))
    for tag in dataset.keys():  # noqa: SIM118 - iterating a Dataset yields elements
        element = dataset[tag]
        value = element.value
        if element.VR in ("OB", "OW") and isinstance(value, bytes) and len(value) % 2 == 0:
            # Pixel data: header and value as they are, copied once (by the final join); encapsulated
            # pixel data (items already encoded) has an undefined length and ends with a delimiter.
            if element.is_undefined_length:
                pieces += [(int(tag), _header(int(tag), element.VR, UNDEFINED)), (int(tag), value + _SEQUENCE_END)]
            else:
                pieces += [(int(tag), _header(int(tag), element.VR, len(value))), (int(tag), value)]
        else:
            pieces.append((int(tag), encode_element(element, encodings)))
    pieces.sort(key=lambda piece: piece[0])  # stable: a header stays before its value
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, dataset.file_meta, enforce_standard=True)
    return b"".join([fp.getvalue(), *(data for _, data in pieces)])


def part10(dataset: Dataset) -> bytes:
    """Part 10 bytes of a whole dataset (with its ``file_meta``), written by pydicom."""
    from pydicom import dcmwrite

    fp = DicomBytesIO()
    dcmwrite(fp, dataset, enforce_file_format=True)
    return fp.getvalue()
