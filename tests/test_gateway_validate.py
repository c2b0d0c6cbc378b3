"""dicom_gateway.validate: which received datasets are refused, and with which status."""

from __future__ import annotations

import hashlib
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pynetdicom.dsutils import encode

from dicom_gateway.validate import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DOES_NOT_MATCH,
    STATUS_OUT_OF_RESOURCES,
    Refusal,
    inspect_dataset,
)
from retinagate.encoded import MAX_SEQUENCE_DEPTH
from retinagate.synth import DicomIdentity, build_dicom

JPEG = "1.2.840.10008.1.2.4.50"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def _photo(transfer_syntax: str = "jpeg_baseline", shape: tuple[int, int] = (96, 128)) -> Dataset:
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    return build_dicom(image, DicomIdentity.synthetic(0, "L"), transfer_syntax=transfer_syntax)


def _inspect(ds: Dataset, data: bytes | None = None, syntax: str = JPEG, **caps: Any) -> Any:
    raw = encode(ds, syntax == IMPLICIT, True) if data is None else data
    assert raw is not None
    return inspect_dataset(
        raw,
        transfer_syntax=syntax,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        max_bytes=caps.get("max_bytes", 10_000_000),
        max_pixels=caps.get("max_pixels", 1_000_000),
    )


def _refusal(ds: Dataset, data: bytes | None = None, syntax: str = JPEG, **caps: Any) -> Refusal:
    with pytest.raises(Refusal) as caught:
        _inspect(ds, data, syntax, **caps)
    return caught.value


def test_a_camera_photograph_passes_and_its_facts_are_read() -> None:
    ds = _photo()
    facts = _inspect(ds)
    assert (facts.rows, facts.columns, facts.frames) == (96, 128, 1)
    assert facts.study_uid == ds.StudyInstanceUID and facts.series_uid == ds.SeriesInstanceUID
    assert facts.laterality == "L"
    assert facts.accession == ds.AccessionNumber


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_uncompressed_photographs_pass_in_both_vr_encodings(syntax: str) -> None:
    assert _inspect(_photo("explicit_little"), syntax=syntax).rows == 96


@pytest.mark.parametrize("cut", [8, 100, 5000, 0.5])
def test_a_truncated_dataset_cannot_be_understood(cut: float) -> None:
    ds = _photo()
    raw = encode(ds, False, True)
    assert raw is not None
    keep = int(len(raw) * cut) if cut < 1 else len(raw) - int(cut)
    refusal = _refusal(ds, raw[:keep])
    assert (refusal.status, refusal.reason) == (STATUS_CANNOT_UNDERSTAND, "undecodable")


def test_a_dataset_larger_than_the_cap_is_refused_as_out_of_resources() -> None:
    refusal = _refusal(_photo(), max_bytes=1024)
    assert (refusal.status, refusal.reason) == (STATUS_OUT_OF_RESOURCES, "too_large")


def test_a_rows_columns_bomb_is_refused_before_anything_is_decoded() -> None:
    ds = _photo("explicit_little")
    ds.Rows = ds.Columns = 65535
    refusal = _refusal(ds, syntax=EXPLICIT, max_pixels=100_000_000)
    assert (refusal.status, refusal.reason) == (STATUS_OUT_OF_RESOURCES, "too_many_pixels")


def test_a_frame_count_bomb_is_refused() -> None:
    ds = _photo()
    ds.NumberOfFrames = 100_000
    assert _refusal(ds, max_pixels=100_000_000).reason == "too_many_pixels"


def test_short_pixel_data_does_not_match_the_declared_image() -> None:
    ds = _photo("explicit_little")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    refusal = _refusal(ds, syntax=EXPLICIT)
    assert (refusal.status, refusal.reason) == (STATUS_DOES_NOT_MATCH, "pixel_data_inconsistent")


def test_encapsulated_pixel_data_with_fewer_frames_than_declared_is_refused() -> None:
    ds = _photo()
    ds.NumberOfFrames = 3
    assert _refusal(ds).reason == "pixel_data_inconsistent"


def test_a_dataset_without_pixel_data_is_refused() -> None:
    ds = _photo()
    del ds.PixelData
    refusal = _refusal(ds)
    assert (refusal.status, refusal.reason) == (STATUS_DOES_NOT_MATCH, "missing_attribute")


def test_uids_that_differ_from_the_command_are_refused() -> None:
    ds = _photo()
    raw = encode(ds, False, True)
    assert raw is not None
    with pytest.raises(Refusal) as caught:
        inspect_dataset(
            raw,
            transfer_syntax=JPEG,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid="1.2.3.4",
            max_bytes=10**7,
            max_pixels=10**7,
        )
    assert (caught.value.status, caught.value.reason) == (STATUS_DOES_NOT_MATCH, "uid_mismatch")


def test_a_missing_study_uid_is_refused() -> None:
    ds = _photo()
    del ds.StudyInstanceUID
    assert _refusal(ds).reason == "missing_attribute"


def test_a_deflated_dataset_is_inflated_and_checked() -> None:
    ds = _photo("explicit_little")
    raw = encode(ds, False, True)
    assert raw is not None
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(raw) + packer.flush()
    assert _inspect(ds, deflated, syntax=DEFLATED).columns == 128


def test_a_deflate_bomb_stops_at_the_size_cap() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(b"\x00" * 50_000_000) + packer.flush()
    assert len(bomb) < 100_000
    refusal = _refusal(_photo(), bomb, syntax=DEFLATED, max_bytes=1_000_000)
    assert (refusal.status, refusal.reason) == (STATUS_OUT_OF_RESOURCES, "too_large")


def test_garbage_bytes_cannot_be_understood() -> None:
    garbage = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert _refusal(_photo(), garbage).status == STATUS_CANNOT_UNDERSTAND


def test_refusal_comments_fit_the_error_comment_element() -> None:
    refusal = Refusal(STATUS_DOES_NOT_MATCH, "x", "y" * 200)
    assert len(refusal.comment) == 64


def test_native_ybr_full_422_needs_two_samples_per_pixel_not_three() -> None:
    ds = _photo("explicit_little")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = ds.PixelData[: 96 * 128 * 2]
    assert _inspect(ds, syntax=EXPLICIT).rows == 96
    ds.PixelData = ds.PixelData[:-2]
    assert _refusal(ds, syntax=EXPLICIT).reason == "pixel_data_inconsistent"


def test_a_basic_offset_table_listing_other_frames_is_refused() -> None:
    ds = _photo()
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame, frame], has_bot=True)
    ds.NumberOfFrames = 2
    assert _inspect(ds).frames == 2
    ds.NumberOfFrames = 1
    with pytest.raises(Refusal, match="Basic Offset Table"):
        _inspect(ds)


def test_sixteen_bit_colour_counts_against_the_decoded_byte_budget() -> None:
    ds = _photo("explicit_little", shape=(100, 100))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = b"\x00" * (100 * 100 * 3 * 2)
    assert _inspect(ds, syntax=EXPLICIT, max_pixels=20_000).rows == 100
    assert _refusal(ds, syntax=EXPLICIT, max_pixels=19_999).reason == "too_many_pixels"


def _deflated(raw: bytes, level: int = 9, zeros: int = 0) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(raw)]
    block = bytes(1024 * 1024)
    parts += [packer.compress(block) for _ in range(zeros // len(block))]
    return b"".join([*parts, packer.flush()])


def test_a_deflate_bomb_is_refused_while_inflating_not_after_at_the_default_caps() -> None:
    """The issue's bomb: 626 KB that inflated to 512 MiB (1.18 GB RSS) before it was refused."""
    ds = _photo("explicit_little")
    del ds.PixelData
    header = encode(ds, False, True)
    assert header is not None
    length = 200 * 1024 * 1024
    bomb = _deflated(header + b"\xe0\x7f\x10\x00OB\x00\x00" + length.to_bytes(4, "little"), zeros=length)
    assert len(bomb) < 300_000

    tracemalloc.start()
    try:
        refusal = _refusal(ds, bomb, syntax=DEFLATED, max_bytes=512 * 1024 * 1024, max_pixels=100_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (refusal.status, refusal.reason) == (STATUS_OUT_OF_RESOURCES, "too_large")
    assert peak < 16 * 1024 * 1024


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize(
    "uid",
    ["1.2.3/../../../etc/passwd", "1.2.3..4", "1.02.3", "1.2." + "3" * 61],
    ids=["path", "empty-component", "leading-zero", "65-chars"],
)
def test_an_invalid_sop_instance_uid_is_refused_like_an_invalid_study_uid(uid: str) -> None:
    ds = _photo()
    ds.SOPInstanceUID = uid
    refusal = _refusal(ds)
    assert (refusal.status, refusal.reason) == (STATUS_DOES_NOT_MATCH, "invalid_uid")
    assert "SOP Instance UID" in refusal.comment

    study = _photo()
    study.StudyInstanceUID = uid
    assert (_refusal(study).status, _refusal(study).reason) == (STATUS_DOES_NOT_MATCH, "invalid_uid")


def test_a_sop_instance_uid_of_64_characters_passes() -> None:
    ds = _photo()
    ds.SOPInstanceUID = "1.2." + "3" * 60
    assert _inspect(ds).sop_instance_uid == ds.SOPInstanceUID


def test_sequences_nested_deeper_than_the_shared_limit_cannot_be_understood(
    nested_sequences: Callable[[int], bytes],
) -> None:
    ds = _photo()
    raw = encode(ds, False, True)
    assert raw is not None
    nested = nested_sequences(MAX_SEQUENCE_DEPTH + 1)
    refusal = _refusal(ds, nested + raw)
    assert (refusal.status, refusal.reason) == (STATUS_CANNOT_UNDERSTAND, "undecodable")
    assert "nested" in str(refusal)


def test_content_identity_is_the_dataset_not_its_deflate_level_nor_any_file_header() -> None:
    ds = _photo("explicit_little")
    raw = encode(ds, False, True)
    assert raw is not None
    plain = _inspect(ds, raw, syntax=EXPLICIT).content_sha256
    assert plain == hashlib.sha256(raw).hexdigest()
    assert _inspect(ds, _deflated(raw, 1), syntax=DEFLATED).content_sha256 == plain
    assert _inspect(ds, _deflated(raw, 9), syntax=DEFLATED).content_sha256 == plain
    ds.SeriesDescription = "re-exported"
    assert _inspect(ds, syntax=EXPLICIT).content_sha256 != plain
