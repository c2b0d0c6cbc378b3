"""Fuzzing the decode and validate paths: whatever the bytes, a result or one of our error types.

Hostile or broken input must end as a specific refusal (the gateway's :class:`Refusal`, the
decoder's :class:`~retinagate.errors.InputError` and its subclasses), never an uncaught exception of
another type: in the gateway that would be an "internal error", in the worker a crash loop. The cases
are derived from valid small files (mutated bytes, truncations, inserted elements with random tags,
VRs and lengths, deflated bodies), bounded and derandomized so CI runs the same cases every time.
"""

from __future__ import annotations

import contextlib
import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode

from dicom_gateway.validate import Refusal, inspect_dataset
from retinagate import encoded
from retinagate.decode import decode_instance
from retinagate.errors import InputError
from retinagate.synth import DicomIdentity, build_dicom

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG = "1.2.840.10008.1.2.4.50"
SYNTAXES = (EXPLICIT, IMPLICIT, JPEG)

# pydicom warns about the values it reads from mutated bytes; the tests judge outcomes, not warnings.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_VRS = [b"AE", b"CS", b"DS", b"IS", b"LO", b"OB", b"OW", b"SQ", b"UI", b"UL", b"UN", b"US", b"UT", b"\x00\x00", b"zz"]
_LONG = (b"OB", b"OW", b"SQ", b"UN", b"UT")


@functools.cache
def _source(syntax: str) -> tuple[Dataset, bytes, bytes]:
    """A small photograph in ``syntax``: the dataset, its encoded bytes, and a Part 10 header for them."""
    image = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    kind = "jpeg_baseline" if syntax == JPEG else "explicit_little"
    ds = build_dicom(image, DicomIdentity.synthetic(0, "R"), transfer_syntax=kind)
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    raw = encode(ds, syntax == IMPLICIT, True)
    assert raw is not None
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    whole = buffer.getvalue()
    assert whole.endswith(raw)
    return ds, raw, whole[: len(whole) - len(raw)]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file that every example rewrites (hypothesis runs many examples per test call)."""
    return tmp_path_factory.mktemp("fuzz") / "case.dcm"


@st.composite
def _mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def _element(draw: st.DrawFn) -> bytes:
    """An element with a random tag (biased to image, sequence and item groups), VR and length."""
    group = draw(st.sampled_from([0x0008, 0x0028, 0x0040, 0x7FE0, 0xFFFE]) | st.integers(0, 0xFFFF))
    tag = (group, draw(st.integers(0, 0xFFFF)))
    vr = draw(st.sampled_from(_VRS))
    value = draw(st.binary(max_size=64))
    length = draw(st.just(len(value)) | st.just(0xFFFFFFFF) | st.integers(0, 0xFFFFFFFF))
    if vr in _LONG:
        return struct.pack("<HH2sHL", *tag, vr, 0, length) + value
    return struct.pack("<HH2sH", *tag, vr, length & 0xFFFF) + value


@st.composite
def _case(draw: st.DrawFn) -> tuple[str, bytes]:
    """A transfer syntax and the encoded dataset bytes to try under it."""
    syntax = draw(st.sampled_from(SYNTAXES))
    raw = _source(syntax)[1]
    kind = draw(st.sampled_from(["mutate", "truncate", "insert", "deflate"]))
    if kind == "mutate":
        return syntax, draw(_mutated(raw))
    if kind == "truncate":
        return syntax, raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "insert":
        at = draw(st.sampled_from([0, len(raw)]))
        return syntax, raw[:at] + b"".join(draw(st.lists(_element(), min_size=1, max_size=3))) + raw[at:]
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(draw(_mutated(_source(EXPLICIT)[1]))) + packer.flush()
    return DEFLATED, draw(st.just(deflated) | _mutated(deflated))


@FUZZ
@given(case=_case())
def test_the_gateways_checks_answer_a_refusal_or_accept(case: tuple[str, bytes]) -> None:
    syntax, data = case
    ds = _source(EXPLICIT if syntax == DEFLATED else syntax)[0]
    with contextlib.suppress(Refusal):
        inspect_dataset(
            data,
            transfer_syntax=syntax,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            max_bytes=1_000_000,
            max_pixels=100_000,
        )


@FUZZ
@given(case=_case())
def test_the_decoder_returns_frames_or_an_input_error(scratch: Path, case: tuple[str, bytes]) -> None:
    syntax, data = case
    header = _source(EXPLICIT if syntax == DEFLATED else syntax)[2]
    if syntax == DEFLATED:  # the meta names the syntax the body is in (both UIDs take 22 bytes)
        header = header.replace(EXPLICIT.encode() + b"\x00", DEFLATED.encode(), 1)
    scratch.write_bytes(header + data)
    try:
        decoded = decode_instance(scratch, min_side=8, max_pixels=100_000)
    except InputError:
        return
    assert decoded.frames and decoded.frames[0].ndim == 3


@FUZZ
@given(data=st.binary(max_size=2048), explicit=st.booleans())
def test_random_bytes_walk_or_are_malformed(data: bytes, explicit: bool) -> None:
    with contextlib.suppress(encoded.MalformedDatasetError):
        encoded.walk(data, explicit=explicit)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_inflate_or_are_refused(data: bytes) -> None:
    with contextlib.suppress(encoded.MalformedDatasetError, encoded.DatasetTooLargeError):
        encoded.inflate(data, limit=1_000_000)
