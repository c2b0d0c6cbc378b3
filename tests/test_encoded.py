"""retinagate.encoded: the structure walk (nesting depth) and the streaming, bounded inflate."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from retinagate.encoded import (
    MAX_SEQUENCE_DEPTH,
    DatasetTooLargeError,
    MalformedDatasetError,
    inflate,
    inflate_limit,
    native_pixel_bytes,
    walk,
)
from retinagate.errors import InputError
from retinagate.synth import DicomIdentity, build_dicom


def _photo() -> Dataset:
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    return build_dicom(image, DicomIdentity.synthetic(0, "L"), transfer_syntax="explicit_little")


def _encoded(ds: Dataset) -> bytes:
    raw = encode(ds, False, True)
    assert raw is not None
    return raw


def _deflate(*parts: bytes, zeros: int = 0) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [packer.compress(part) for part in parts]
    block = bytes(1024 * 1024)
    for _ in range(zeros // len(block)):
        out.append(packer.compress(block))
    out.append(packer.flush())
    return b"".join(out)


def _pixel_header(length: int) -> bytes:
    return struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, length)


def test_a_photograph_walks_and_its_pixel_data_is_found() -> None:
    ds = _photo()
    raw = _encoded(ds)
    structure = walk(raw, explicit=True)
    assert structure.pixels is not None
    assert structure.pixels.defined_length == len(ds.PixelData)
    assert structure.pixels.value_offset + len(ds.PixelData) == len(raw)


def test_sequences_nested_up_to_the_limit_pass_and_one_deeper_is_refused(
    nested_sequences: Callable[[int], bytes],
) -> None:
    assert walk(nested_sequences(MAX_SEQUENCE_DEPTH), explicit=True).depth == MAX_SEQUENCE_DEPTH
    with pytest.raises(MalformedDatasetError, match=f"nested more than {MAX_SEQUENCE_DEPTH} levels"):
        walk(nested_sequences(MAX_SEQUENCE_DEPTH + 1), explicit=True)


def test_thousands_of_nested_levels_are_refused_without_recursing_into_them(
    nested_sequences: Callable[[int], bytes],
) -> None:
    with pytest.raises(MalformedDatasetError, match="nested"):
        walk(nested_sequences(5000), explicit=True)


def test_walk_errors_are_input_errors_so_the_worker_fails_the_instance() -> None:
    assert issubclass(MalformedDatasetError, InputError) and issubclass(DatasetTooLargeError, InputError)


def test_short_native_pixel_data_is_reported_when_allowed_and_refused_otherwise() -> None:
    raw = _encoded(_photo())[:-1000]
    with pytest.raises(MalformedDatasetError, match="truncated"):
        walk(raw, explicit=True)
    pixels = walk(raw, explicit=True, allow_short_pixels=True).pixels
    assert pixels is not None and pixels.truncated


def test_big_endian_datasets_walk_with_their_byte_order() -> None:
    element = struct.pack(">HH2sH", 0x0008, 0x0060, b"CS", 2) + b"OP"
    assert walk(element, explicit=True, little_endian=False).end == len(element)
    with pytest.raises(MalformedDatasetError):
        walk(element, explicit=True, little_endian=True)


def test_a_deflated_dataset_inflates_to_its_bytes() -> None:
    raw = _encoded(_photo())
    assert bytes(inflate(_deflate(raw), limit=10_000_000)) == raw


def test_a_deflate_bomb_behind_a_small_image_stops_after_a_few_megabytes() -> None:
    """The issue's 626 KB bomb: a valid header declaring a small image, then hundreds of MB of zeros.

    Before the inflate streamed and tightened its limit, this allocated the whole cap (512 MiB).
    """
    ds = _photo()
    del ds.PixelData
    bomb = _deflate(_encoded(ds), _pixel_header(200 * 1024 * 1024), zeros=200 * 1024 * 1024)
    assert len(bomb) < 300_000

    tracemalloc.start()
    try:
        with pytest.raises(DatasetTooLargeError, match="possible deflate bomb"):
            inflate(bomb, limit=512 * 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_a_header_declaring_an_image_over_the_limit_stops_before_the_pixels() -> None:
    ds = _photo()
    del ds.PixelData
    ds.Rows = ds.Columns = 10_000  # 300 MB of RGB, over a 100 MB limit
    bomb = _deflate(_encoded(ds), _pixel_header(300_000_000), zeros=50 * 1024 * 1024)

    tracemalloc.start()
    try:
        with pytest.raises(DatasetTooLargeError, match="before inflating the pixels"):
            inflate(bomb, limit=100_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_zeros_that_are_not_a_dataset_stop_at_the_first_broken_element() -> None:
    with pytest.raises(MalformedDatasetError, match="no value representation"):
        inflate(_deflate(zeros=64 * 1024 * 1024), limit=512 * 1024 * 1024)


def test_a_corrupt_deflate_stream_is_malformed() -> None:
    with pytest.raises(MalformedDatasetError, match="corrupt"):
        inflate(b"\xff" * 64, limit=1_000_000)


def test_the_inflate_limit_is_the_pixel_budget_plus_room_within_the_instance_cap() -> None:
    assert inflate_limit(300, max_bytes=100) == 100
    assert inflate_limit(300) > 300


def test_native_pixel_bytes_counts_shared_chroma_and_packed_bits() -> None:
    assert native_pixel_bytes(2, 2, 3, 1, 8, "RGB") == 12
    assert native_pixel_bytes(2, 2, 3, 1, 8, "YBR_FULL_422") == 8
    assert native_pixel_bytes(3, 3, 1, 1, 1, "MONOCHROME2") == 2
