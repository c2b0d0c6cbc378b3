"""Tests for retinagate.decode: every transfer syntax the gateway accepts, colour, bit depth, bombs."""

from __future__ import annotations

import io
import math
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from retinagate.card import Preprocessing
from retinagate.decode import (
    check_pixel_budget,
    choose_scale,
    decode_image_file,
    decode_instance,
    decode_path,
    is_dicom_file,
)
from retinagate.encoded import MAX_SEQUENCE_DEPTH, MalformedDatasetError
from retinagate.errors import InputError
from retinagate.preprocess import prepare
from retinagate.synth import DicomIdentity, build_dicom, render_fundus

WIDTH, HEIGHT = 640, 480
INPUT = Preprocessing(input_size=224)  # 480 / 2 >= 224: the fast path decodes at 1/2


@pytest.fixture(scope="module")
def photo() -> NDArray[np.uint8]:
    """A synthetic fundus photograph with lesions (RGB)."""
    return render_fundus(np.random.default_rng(7), WIDTH, HEIGHT, ["DR", "MH"], mode="easy").image


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _native(photo: NDArray[np.uint8]) -> Dataset:
    return build_dicom(photo, DicomIdentity.synthetic(), transfer_syntax="explicit_little")


def _jpeg_dataset(photo: NDArray[np.uint8], frames: list[bytes], photometric: str) -> Dataset:
    """A native dataset turned into encapsulated JPEG baseline with the given frames and photometric."""
    ds = _native(photo)
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.PhotometricInterpretation = photometric
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def _pillow_jpeg(image: NDArray[np.uint8], **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def _strip_markers_and_number_components(data: bytes) -> bytes:
    """Removes APP14 (Adobe) and renames component ids to 1, 2, 3 in SOF and SOS: an RGB stream with
    no colour signal at all, which only the DICOM photometric interpretation can disambiguate."""
    out = bytearray(data[:2])
    position = 2
    ids: list[int] = []
    while position < len(data):
        marker = data[position + 1]
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment = bytearray(data[position : position + 2 + length])
        if marker == 0xEE:
            position += 2 + length
            continue
        if marker in (0xC0, 0xC1):
            ids = [segment[10 + 3 * k] for k in range(segment[9])]
            for k in range(segment[9]):
                segment[10 + 3 * k] = k + 1
        if marker == 0xDA:
            for k in range(segment[4]):
                segment[5 + 2 * k] = ids.index(segment[5 + 2 * k]) + 1
            out += segment + data[position + 2 + length :]
            return bytes(out)
        out += segment
        position += 2 + length
    raise AssertionError("no SOS marker")


Transcode = Callable[[Path, str, Path], Path]

#: Encodings written by the ``transcode`` fixture from the native file, as a sender would.
_TRANSCODED = {
    "implicit_little": uid.ImplicitVRLittleEndian,
    "deflated": uid.DeflatedExplicitVRLittleEndian,
    "rle": uid.RLELossless,
    "jpeg_ls": uid.JPEGLSLossless,
    "jpeg_2000_lossless": uid.JPEG2000Lossless,
    "jpeg_2000": uid.JPEG2000,
    "jpeg_lossless_sv1": uid.JPEGLosslessSV1,
    "jpeg_lossless": uid.JPEGLossless,
    "jpeg_extended": uid.JPEGExtended12Bit,
}


def _variant(name: str, photo: NDArray[np.uint8], folder: Path, transcode: Transcode | None = None) -> Path:
    """Writes the synthetic photograph in one encoding and returns the file (``transcode``: the fixture,
    for the encodings in :data:`_TRANSCODED`)."""
    native = _save(_native(photo), folder / "native.dcm")
    target = folder / f"{name}.dcm"
    if name == "explicit_little":
        return native
    if name in _TRANSCODED:
        assert transcode is not None, f"{name} needs the transcode fixture"
        return transcode(native, _TRANSCODED[name], target)
    if name == "jpeg_ybr_full_422":
        return _save(build_dicom(photo, DicomIdentity.synthetic()), target)
    if name == "jpeg_ybr_full":
        return _save(_jpeg_dataset(photo, [_pillow_jpeg(photo, subsampling=0)], "YBR_FULL"), target)
    if name == "jpeg_rgb_adobe":
        return _save(_jpeg_dataset(photo, [_pillow_jpeg(photo, keep_rgb=True)], "RGB"), target)
    if name == "jpeg_rgb_unmarked":
        frame = _strip_markers_and_number_components(_pillow_jpeg(photo, keep_rgb=True))
        return _save(_jpeg_dataset(photo, [frame], "RGB"), target)
    if name == "jpeg_rgb_labelled_jfif":
        # A camera that writes an ordinary JFIF (YCbCr) stream but labels it RGB.
        return _save(_jpeg_dataset(photo, [_pillow_jpeg(photo, subsampling=0)], "RGB"), target)
    if name == "monochrome2":
        return _save(build_dicom(photo[:, :, 1].copy(), transfer_syntax="explicit_little"), target)
    if name == "monochrome2_jpeg":
        return _save(build_dicom(photo[:, :, 1].copy()), target)
    if name == "monochrome1":
        ds = build_dicom(255 - photo[:, :, 1], transfer_syntax="explicit_little")
        ds.PhotometricInterpretation = "MONOCHROME1"
        del ds.PresentationLUTShape
        return _save(ds, target)
    if name == "monochrome2_12bit":
        ds = build_dicom(photo[:, :, 1].copy(), transfer_syntax="explicit_little")
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = (photo[:, :, 1].astype(np.uint16) * 16).tobytes()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
        return _save(ds, target)
    if name == "multiframe_native":
        ds = _native(photo)
        ds.NumberOfFrames = 3
        ds.PixelData = np.stack([photo, photo[::-1].copy(), photo[:, ::-1].copy()]).tobytes()
        return _save(ds, target)
    if name == "multiframe_jpeg":
        frames = [_pillow_jpeg(p, subsampling=1) for p in (photo, photo[::-1].copy(), photo[:, ::-1].copy())]
        return _save(_jpeg_dataset(photo, frames, "YBR_FULL_422"), target)
    raise AssertionError(name)


def _reference(path: Path) -> list[NDArray[np.uint8]]:
    """pydicom's own decode, turned into 8-bit RGB frames the plain way."""
    ds = pydicom.dcmread(path)
    array = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    stack = array if frames > 1 else array[None]
    out = []
    for frame in stack:
        if frame.dtype != np.uint8:
            frame = np.round(frame.astype(np.float64) * 255 / (2 ** int(ds.BitsStored) - 1)).astype(np.uint8)
        if frame.ndim == 2:
            if ds.PhotometricInterpretation == "MONOCHROME1":
                frame = 255 - frame
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        out.append(frame)
    return out


VARIANTS = [
    "explicit_little",
    "implicit_little",
    "deflated",
    "rle",
    "jpeg_ls",
    "jpeg_2000_lossless",
    "jpeg_2000",
    "jpeg_lossless_sv1",
    "jpeg_lossless",
    "jpeg_extended",
    "jpeg_ybr_full_422",
    "jpeg_ybr_full",
    "jpeg_rgb_adobe",
    "jpeg_rgb_unmarked",
    "jpeg_rgb_labelled_jfif",
    "monochrome2",
    "monochrome2_jpeg",
    "monochrome1",
    "monochrome2_12bit",
    "multiframe_native",
    "multiframe_jpeg",
]


@pytest.mark.filterwarnings("ignore:.*JFIF APP marker:UserWarning")  # jpeg_rgb_labelled_jfif, on purpose
@pytest.mark.parametrize("name", VARIANTS)
def test_fast_decode_matches_pydicom_at_the_model_input_size(
    name: str, photo: NDArray[np.uint8], tmp_path: Path, transcode: Transcode
) -> None:
    path = _variant(name, photo, tmp_path, transcode)
    decoded = decode_instance(path, min_side=INPUT.input_size, max_pixels=10**8)
    reference = _reference(path)

    assert decoded.source_shape == (HEIGHT, WIDTH)
    assert decoded.scale == 2
    assert len(decoded.frames) == len(reference)
    for ours, theirs in zip(decoded.frames, reference, strict=True):
        assert ours.shape == (math.ceil(HEIGHT / 2), math.ceil(WIDTH / 2), 3) and ours.dtype == np.uint8
        # The decoded pixels: pydicom's full decode reduced by area to the same size.
        reduced = cv2.resize(theirs, (ours.shape[1], ours.shape[0]), interpolation=cv2.INTER_AREA)
        assert np.abs(ours.astype(int) - reduced.astype(int)).mean() < 1.5
        # What the model sees: both through the training preprocessing.
        assert np.abs(prepare(ours, INPUT).astype(int) - prepare(theirs, INPUT).astype(int)).mean() < 3
    assert "PixelData" not in decoded.header


@pytest.mark.parametrize("name", ["jpeg_ybr_full_422", "jpeg_ybr_full", "jpeg_rgb_adobe", "jpeg_rgb_unmarked"])
def test_jpeg_colour_is_right_for_every_photometric_interpretation(
    name: str, photo: NDArray[np.uint8], tmp_path: Path
) -> None:
    decoded = decode_instance(_variant(name, photo, tmp_path), min_side=0, max_pixels=10**8)

    assert decoded.scale == 8
    original = cv2.resize(photo, decoded.frames[0].shape[1::-1], interpolation=cv2.INTER_AREA)
    per_channel = np.abs(decoded.frames[0].astype(int) - original.astype(int)).mean(axis=(0, 1))
    assert per_channel.max() < 3, per_channel  # a wrong colour transform is off by tens of levels


def test_jpeg_frames_are_decoded_at_the_largest_dct_scale_that_keeps_the_input_size(
    photo: NDArray[np.uint8], tmp_path: Path
) -> None:
    path = _variant("jpeg_ybr_full_422", photo, tmp_path)

    sizes = {side: decode_instance(path, min_side=side, max_pixels=10**8).frames[0].shape[:2] for side in
             (60, 120, 240, 480)}  # fmt: skip

    assert sizes == {60: (60, 80), 120: (120, 160), 240: (240, 320), 480: (480, 640)}


def test_the_display_size_limits_the_dct_scale_too(photo: NDArray[np.uint8], tmp_path: Path) -> None:
    path = _variant("jpeg_ybr_full_422", photo, tmp_path)

    decoded = decode_instance(path, min_side=60, min_long_side=300, max_pixels=10**8)

    assert decoded.scale == 2 and decoded.frames[0].shape[:2] == (240, 320)


def test_choose_scale_picks_the_largest_factor_that_leaves_both_minimums() -> None:
    assert choose_scale(1536, 2048, 224) == 4
    assert choose_scale(1536, 2048, 224, 1024) == 2
    assert choose_scale(1536, 2048, 160) == 8
    assert choose_scale(384, 512, 224) == 1
    with pytest.raises(ValueError, match="min_side"):
        choose_scale(10, 10, -1)


def test_sixteen_bit_frames_are_scaled_by_bits_stored(photo: NDArray[np.uint8], tmp_path: Path) -> None:
    decoded = decode_instance(_variant("monochrome2_12bit", photo, tmp_path), min_side=0, max_pixels=10**8)

    # 12-bit values v*16 scale back to about v: the declared range, not the data's own range.
    small = cv2.resize(photo[:, :, 1], decoded.frames[0].shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.frames[0][:, :, 0].astype(int) - small.astype(int)).mean() < 1.5
    assert (decoded.frames[0][:, :, 0] == decoded.frames[0][:, :, 2]).all()


def test_too_many_pixels_are_refused_before_decoding_without_allocating(
    photo: NDArray[np.uint8], tmp_path: Path
) -> None:
    ds = build_dicom(photo, transfer_syntax="jpeg_baseline")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 50
    path = _save(ds, tmp_path / "bomb.dcm")

    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(InputError, match="decompression bomb"):
        decode_instance(path, min_side=224, max_pixels=100_000_000)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 20 * 1024 * 1024


def test_a_jpeg_frame_larger_than_its_header_says_is_refused(photo: NDArray[np.uint8], tmp_path: Path) -> None:
    frame = bytearray(_pillow_jpeg(photo, subsampling=1))
    sof = frame.index(b"\xff\xc0")
    frame[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    path = _save(_jpeg_dataset(photo, [bytes(frame)], "YBR_FULL_422"), tmp_path / "bomb.dcm")

    with pytest.raises(InputError, match=r"60000x60000.*possible decompression bomb"):
        decode_instance(path, min_side=224, max_pixels=10**8)


def test_a_jpeg_2000_frame_larger_than_its_header_says_is_refused(
    photo: NDArray[np.uint8], tmp_path: Path, transcode: Transcode
) -> None:
    path = _variant("jpeg_2000_lossless", photo, tmp_path, transcode)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 48, 64  # the codestream still says 640 x 480

    with pytest.raises(InputError, match="possible decompression bomb"):
        decode_instance(_save(ds, tmp_path / "lying.dcm"), min_side=32, max_pixels=10**8)


def test_short_native_pixel_data_is_refused(photo: NDArray[np.uint8], tmp_path: Path) -> None:
    path = _variant("explicit_little", photo, tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 1000])

    with pytest.raises(InputError, match="short Pixel Data"):
        decode_instance(truncated, min_side=224, max_pixels=10**8)


def test_a_header_promising_more_frames_than_the_pixel_data_holds_is_refused(
    photo: NDArray[np.uint8], tmp_path: Path
) -> None:
    ds = pydicom.dcmread(_variant("explicit_little", photo, tmp_path))
    ds.NumberOfFrames = 4
    with pytest.raises(InputError, match="short Pixel Data"):
        decode_instance(_save(ds, tmp_path / "frames.dcm"), min_side=224, max_pixels=10**8)

    jpeg = pydicom.dcmread(_variant("jpeg_ybr_full_422", photo, tmp_path))
    jpeg.NumberOfFrames = 3
    with pytest.raises(InputError, match="Basic Offset Table lists 1 frame"):
        decode_instance(_save(jpeg, tmp_path / "offsets.dcm"), min_side=224, max_pixels=10**8)

    jpeg.PixelData = encapsulate([_pillow_jpeg(photo)], has_bot=False)
    with pytest.raises(InputError, match="1 fragment"):
        decode_instance(_save(jpeg, tmp_path / "fragments.dcm"), min_side=224, max_pixels=10**8)


def test_empty_encapsulated_pixel_data_is_refused(photo: NDArray[np.uint8], tmp_path: Path) -> None:
    ds = _jpeg_dataset(photo, [b"\xff\xd8\xff\xd9"], "YBR_FULL_422")
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # a Basic Offset Table and nothing else

    with pytest.raises(InputError, match="no fragments"):
        decode_instance(_save(ds, tmp_path / "empty.dcm"), min_side=224, max_pixels=10**8)


def test_a_deflated_dataset_that_inflates_past_the_cap_is_refused(tmp_path: Path) -> None:
    ds = _native(np.zeros((64, 64, 3), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    ds.ImageComments = "x"  # placeholder; a 64 MB zero-filled private value follows
    ds.add_new(0x00091010, "OB", bytes(64 * 1024 * 1024))
    ds.add_new(0x00090010, "LO", "BOMB")
    path = _save(ds, tmp_path / "deflate-bomb.dcm")
    assert path.stat().st_size < 1024 * 1024

    with pytest.raises(InputError, match="inflates beyond"):
        decode_instance(path, min_side=32, max_pixels=64 * 64)


def test_check_pixel_budget_names_the_bytes_when_deep_frames_exceed_the_byte_cap() -> None:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 1000, 1000, 3, 16
    ds.PixelData = b""

    with pytest.raises(InputError, match="6,000,000 bytes"):
        check_pixel_budget(ds, max_pixels=1_500_000)


def test_missing_image_attributes_are_refused_by_name() -> None:
    ds = Dataset()
    ds.PixelData = b"\x00" * 16
    with pytest.raises(InputError, match="no Rows"):
        check_pixel_budget(ds, max_pixels=100)


def test_a_file_that_is_not_dicom_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_bytes(b"these are not the pixels you are looking for" * 20)

    with pytest.raises(InputError, match="not a DICOM file"):
        decode_path(path, min_side=224, max_pixels=10**8)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_plain_images_decode_with_their_content_hash(suffix: str, photo: NDArray[np.uint8], tmp_path: Path) -> None:
    path = tmp_path / f"photo{suffix}"
    cv2.imwrite(str(path), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])

    decoded = decode_path(path, min_side=120, max_pixels=10**8)

    assert not is_dicom_file(path) and decoded.header is None
    assert decoded.scale == 4 and decoded.source_shape == (HEIGHT, WIDTH)
    original = cv2.resize(photo, decoded.frames[0].shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.frames[0].astype(int) - original.astype(int)).mean() < 2
    assert decoded.content_sha256 is not None and len(decoded.content_sha256) == 64


def test_plain_images_larger_than_the_cap_are_refused_from_their_header(
    photo: NDArray[np.uint8], tmp_path: Path
) -> None:
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), photo)

    with pytest.raises(InputError, match="exceeds the cap"):
        decode_image_file(path, max_pixels=1000)


def test_a_truncated_jpeg_frame_is_refused(photo: NDArray[np.uint8], tmp_path: Path) -> None:
    frame = _pillow_jpeg(photo, subsampling=1)
    path = _save(_jpeg_dataset(photo, [frame[: len(frame) // 2]], "YBR_FULL_422"), tmp_path / "cut.dcm")

    with pytest.raises(InputError, match="a JPEG frame is corrupt or truncated"):
        decode_instance(path, min_side=224, max_pixels=10**8)


@pytest.mark.parametrize("name", ["jpeg_ybr_full_422", "jpeg_rgb_unmarked", "multiframe_jpeg", "monochrome2_jpeg"])
def test_jpeg_baseline_never_goes_through_pydicoms_decoders(
    name: str, photo: NDArray[np.uint8], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _variant(name, photo, tmp_path)

    def refuse(uid: str) -> None:
        raise AssertionError(f"pydicom decoder asked for {uid}: the fast path was not taken")

    monkeypatch.setattr("pydicom.pixels.decoders.base.get_decoder", refuse)
    decoded = decode_instance(path, min_side=INPUT.input_size, max_pixels=10**8)
    assert decoded.scale == 2


def _with_nested_sequences(photo: NDArray[np.uint8], nested: bytes, path: Path) -> Path:
    """A photograph's file with ``nested`` inserted at the start of its dataset (after the meta)."""
    plain = _save(_native(photo), path.with_name("plain.dcm"))
    data = plain.read_bytes()
    (meta_length,) = struct.unpack_from("<L", data, 140)
    start = 144 + meta_length
    path.write_bytes(data[:start] + nested + data[start:])
    return path


def test_sequences_nested_600_deep_are_refused_by_the_gateways_rule_not_a_recursion_error(
    photo: NDArray[np.uint8], tmp_path: Path, nested_sequences: Callable[[int], bytes]
) -> None:
    """Issue 14 defect 7: pydicom recursed into 600 levels and raised RecursionError."""
    path = _with_nested_sequences(photo, nested_sequences(600), tmp_path / "nested.dcm")

    with pytest.raises(MalformedDatasetError, match=f"nested more than {MAX_SEQUENCE_DEPTH} levels deep"):
        decode_instance(path, min_side=224, max_pixels=10**8)


def test_sequences_nested_within_the_limit_still_decode(
    photo: NDArray[np.uint8], tmp_path: Path, nested_sequences: Callable[[int], bytes]
) -> None:
    path = _with_nested_sequences(photo, nested_sequences(MAX_SEQUENCE_DEPTH), tmp_path / "nested.dcm")
    assert decode_instance(path, min_side=224, max_pixels=10**8).source_shape == (HEIGHT, WIDTH)


def test_a_deflated_bomb_behind_a_small_image_stops_at_the_image_it_declares(tmp_path: Path) -> None:
    ds = _native(np.zeros((64, 64, 3), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    ds.PixelData = bytes(64 * 1024 * 1024)  # declared 64 x 64 RGB; the value holds 64 MB of zeros
    path = _save(ds, tmp_path / "deflate-bomb.dcm")
    assert path.stat().st_size < 1024 * 1024

    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="possible deflate bomb"):
            decode_instance(path, min_side=32, max_pixels=10**8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
