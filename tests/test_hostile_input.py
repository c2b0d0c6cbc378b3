"""Hostile input (issue 14): every input of the issue's list, sent to a real gateway over a real association.

One table, one row per input, each naming the answer the sender must get: a C-STORE status, or the
presentation context refused at negotiation. For each row the test checks what is left behind
(nothing, or exactly one stored instance), and that the same gateway still acknowledges a good
photograph afterwards. Where the gateway accepts an instance it cannot judge without decoding it (a
corrupt JPEG entropy stream, a codestream whose own header declares a huge image), the row names how
the worker ends it: ``failed`` with a specific reason in ``last_error`` (what ``retinagate results``
shows), recorded once, never retried in a loop.

The datasets are sent as the bytes a file holds after its File Meta Information (pynetdicom's
chunked-dataset mode), so malformed ones reach the gateway exactly as written, not repaired by an
encoder on the way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from sqlalchemy import select

from retinagate.db import make_engine, session_factory, session_scope
from retinagate.models import Instance
from retinagate.settings import Settings
from retinagate.storage import Storage
from retinagate.synth import DicomIdentity, build_dicom, render_fundus
from worker.scoring import Scorer, score_instances

OP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG = "1.2.840.10008.1.2.4.50"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
EXPLICIT = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"

#: Presentation context results (PS3.8 9.3.3.2).
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
TRANSFER_SYNTAX_NOT_SUPPORTED = 0x04


@dataclass(frozen=True)
class Payload:
    """What one row sends: the command's UIDs, the context's transfer syntax, the dataset bytes."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes
    #: Sent before ``data`` (the duplicate row's first version), each expected to be answered 0x0000.
    before: tuple[Payload, ...] = ()


@dataclass(frozen=True)
class Hostile:
    """One hostile input and what must come of it.

    Attributes:
        name: The input, as the issue words it.
        make: Builds the payload (or, for negotiation rows, the context to propose).
        status: The C-STORE status, or None when no C-STORE can be sent (context refused).
        context_result: For negotiation rows, the presentation context result.
        stored: Instances stored afterwards (the duplicate row's first version counts).
        worker: For accepted rows, the final instance status and a piece of its ``last_error``.
        settings: Setting overrides for this row's gateway.
    """

    name: str
    make: Callable[[], Payload]
    status: int | None
    context_result: int | None = None
    stored: int = 0
    worker: tuple[str, str | None] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# Inputs --------------------------------------------------------------------------------------------------

_IMAGE = render_fundus(np.random.default_rng(5), 256, 192, (), "R").image


def _photo(syntax: str = "explicit_little", instance: int = 0) -> Dataset:
    return build_dicom(_IMAGE, DicomIdentity.synthetic(0, "R", seed=23, instance=instance), transfer_syntax=syntax)


def _payload(ds: Dataset, data: bytes | None = None, *, syntax: str | None = None) -> Payload:
    syntax = syntax or str(ds.file_meta.TransferSyntaxUID)
    if data is None:
        encoded = encode(ds, syntax == "1.2.840.10008.1.2", True)
        assert encoded is not None
        data = encoded
    return Payload(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, data)


def _truncated() -> Payload:
    whole = _payload(_photo("jpeg_baseline"))
    return Payload(whole.sop_class, whole.sop_instance, JPEG, whole.data[:-500])


def _random_after_preamble() -> Payload:
    ds = _photo()
    return _payload(ds, np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _zero_length() -> Payload:
    return _payload(_photo(), b"")


def _rows_columns_bomb() -> Payload:
    ds = _photo()
    ds.Rows = ds.Columns = 65535
    return _payload(ds)


def _frame_bomb() -> Payload:
    ds = _photo()
    ds.NumberOfFrames = 2**31 - 1
    return _payload(ds)


def _short_pixels() -> Payload:
    ds = _photo()
    ds.PixelData = ds.PixelData[:1000]
    return _payload(ds)


def _frames_more_than_declared() -> Payload:
    ds = _photo()
    ds.PixelData = ds.PixelData * 3  # three frames' worth under NumberOfFrames 1
    return _payload(ds)


def _padded_pixels() -> Payload:
    ds = _photo()
    ds.PixelData = ds.PixelData + b"\x00" * 64  # trailing padding, less than a frame
    return _payload(ds)


def _jpeg_frame(ds: Dataset) -> bytearray:
    return bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))


def _corrupt_entropy(highest: int) -> Callable[[], Payload]:
    """The entropy-coded data after the first bytes of the scan replaced by random bytes below ``highest``
    (256: any byte, so 0xFF and with it misplaced markers occur; 255: never 0xFF, only bad Huffman codes)."""

    def make() -> Payload:
        ds = _photo("jpeg_baseline")
        frame = _jpeg_frame(ds)
        scan = frame.index(b"\xff\xda") + 20
        noise = np.random.default_rng(2).integers(0, highest, len(frame) - scan - 2, dtype=np.uint8).tobytes()
        ds.PixelData = encapsulate([bytes(frame[:scan]) + noise + b"\xff\xd9"])
        return _payload(ds)

    return make


def _jpeg_declaring_a_huge_image() -> Payload:
    ds = _photo("jpeg_baseline")
    frame = _jpeg_frame(ds)
    sof = frame.index(b"\xff\xc0")
    frame[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width in the SOF segment
    ds.PixelData = encapsulate([bytes(frame)])
    return _payload(ds)


def _j2k_declaring_a_huge_image() -> Payload:
    ds = _photo()
    ds.compress(J2K_LOSSLESS)
    frame = _jpeg_frame(ds)
    siz = frame.index(b"\xff\x51")
    frame[siz + 6 : siz + 14] = struct.pack(">II", 60000, 60000)  # Xsiz, Ysiz
    ds.PixelData = encapsulate([bytes(frame)])
    return _payload(ds)


def _encapsulated_frames(declared: int, fragments: int) -> Payload:
    ds = _photo("jpeg_baseline")
    frame = bytes(_jpeg_frame(ds))
    ds.NumberOfFrames = declared
    ds.PixelData = encapsulate([frame] * fragments, has_bot=False)
    return _payload(ds)


def _deeply_nested() -> Payload:
    sequence = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ends = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    depth = 5000
    whole = _payload(_photo())
    # (0040,A730) sorts after everything but Pixel Data; put the nesting where it belongs.
    pixels = whole.data.index(b"\xe0\x7f\x10\x00")
    data = whole.data[:pixels] + (sequence + item) * depth + ends * depth + whole.data[pixels:]
    return Payload(whole.sop_class, whole.sop_instance, EXPLICIT, data)


def _with_uid(keyword: str, value: str) -> Callable[[], Payload]:
    def make() -> Payload:
        ds = _photo()
        setattr(ds, keyword, value)
        return _payload(ds)

    return make


def _mismatched_uids() -> Payload:
    ds = _photo()
    return Payload(OP, "1.2.826.0.1.3680043.8.498.1", EXPLICIT, _payload(ds).data)


def _bits_allocated(bits: int) -> Callable[[], Payload]:
    def make() -> Payload:
        ds = _photo()
        if bits == 1:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            del ds.PlanarConfiguration
            grey = np.asarray(Image.fromarray(_IMAGE).convert("L")) > 60
            ds.PixelData = np.packbits(grey.ravel(), bitorder="little").tobytes()
        else:
            ds.PixelData = (_IMAGE.astype(np.uint32) << 24).tobytes()
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        return _payload(ds)

    return make


def _four_samples() -> Payload:
    ds = _photo()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, "ARGB"
    ds.PixelData = np.dstack([np.full(_IMAGE.shape[:2], 255, np.uint8), _IMAGE]).tobytes()
    return _payload(ds)


def _palette(with_lut: bool) -> Callable[[], Payload]:
    def make() -> Payload:
        ds = _photo()
        quantised = Image.fromarray(_IMAGE).quantize(256)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
        del ds.PlanarConfiguration
        ds.PixelData = np.asarray(quantised, dtype=np.uint8).tobytes()
        if with_lut:
            table = np.asarray(quantised.getpalette()[: 3 * 256], np.uint16).reshape(-1, 3) * 257
            for index, colour in enumerate(("Red", "Green", "Blue")):
                setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
                setattr(ds, f"{colour}PaletteColorLookupTableData", table[:, index].tobytes())
        return _payload(ds)

    return make


def _two_hundred_megabytes() -> Payload:
    ds = _photo()
    ds.Rows, ds.Columns = 8192, 8192  # 8192 x 8192 x 3 = 201 MB of native pixels
    header = encode(ds, False, True)
    assert header is not None
    pixels = header.index(b"\xe0\x7f\x10\x00")
    data = header[:pixels] + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 8192 * 8192 * 3)
    return Payload(str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT, data + bytes(8192 * 8192 * 3))


def _duplicate_with_other_content() -> Payload:
    first = _payload(_photo())
    changed = _photo()
    changed.SeriesDescription = "re-exported"
    return Payload(**{**_payload(changed).__dict__, "before": (first,)})


def _negotiation(sop_class: str, syntax: str) -> Callable[[], Payload]:
    return lambda: Payload(sop_class, "1.2.826.0.1.3680043.8.498.3", syntax, b"")


ROWS: list[Hostile] = [
    Hostile("a truncated file", _truncated, 0xC210),
    Hostile("random bytes after a valid preamble and meta", _random_after_preamble, 0xC210),
    Hostile("a zero-length dataset", _zero_length, 0xC210),
    Hostile("a Rows/Columns bomb (65535 x 65535)", _rows_columns_bomb, 0xA700),
    Hostile("a huge NumberOfFrames (2**31 - 1)", _frame_bomb, 0xA700),
    Hostile("short Pixel Data", _short_pixels, 0xA900),
    Hostile("over-long Pixel Data: frames beyond NumberOfFrames", _frames_more_than_declared, 0xA900),
    Hostile("over-long Pixel Data: trailing padding", _padded_pixels, 0x0000, stored=1, worker=("scored", None)),
    Hostile(
        "a corrupt JPEG entropy stream (random bytes)",
        _corrupt_entropy(256),
        0x0000,
        stored=1,
        worker=("failed", "a JPEG frame is corrupt or truncated"),
    ),
    # libjpeg-turbo decodes bad Huffman codes with a warning only, and Pillow does not pass warnings
    # on: the damaged picture reaches the gradability gate, which refuses it with its reasons.
    Hostile(
        "a corrupt JPEG entropy stream (bad Huffman codes, no marker bytes)",
        _corrupt_entropy(255),
        0x0000,
        stored=1,
        worker=("ungradable", None),
    ),
    Hostile(
        "a JPEG header declaring a 60000 x 60000 image",
        _jpeg_declaring_a_huge_image,
        0x0000,
        stored=1,
        worker=("failed", "possible decompression bomb"),
    ),
    Hostile(
        "a JPEG 2000 header declaring a 60000 x 60000 image",
        _j2k_declaring_a_huge_image,
        0x0000,
        stored=1,
        worker=("failed", "possible decompression bomb"),
    ),
    Hostile("encapsulated: NumberOfFrames 3, one frame", lambda: _encapsulated_frames(3, 1), 0xA900),
    Hostile(
        "encapsulated: NumberOfFrames 1, three frames",
        lambda: _encapsulated_frames(1, 3),
        0x0000,
        stored=1,
        worker=("failed", "another image after its end-of-image"),
    ),
    Hostile("sequences nested 5000 levels deep", _deeply_nested, 0xC210),
    Hostile("a SOP Instance UID with '/' and '..'", _with_uid("SOPInstanceUID", "1.2.3/../../etc/passwd"), 0xA900),
    # A command UID over 64 characters cannot be sent: pynetdicom refuses to encode it (the gateway's
    # check of the command's UID is in tests/test_gateway_validate.py); the dataset's are sent here.
    Hostile("a Study Instance UID of 65 characters", _with_uid("StudyInstanceUID", "1." + "4" * 63), 0xA900),
    Hostile("a Study Instance UID with '..'", _with_uid("StudyInstanceUID", "1.2..3"), 0xA900),
    Hostile("a Series Instance UID of 65 characters", _with_uid("SeriesInstanceUID", "1." + "3" * 63), 0xA900),
    Hostile("an unsupported SOP class (CT)", _negotiation(CT, EXPLICIT), None, ABSTRACT_SYNTAX_NOT_SUPPORTED),
    Hostile("Explicit VR Big Endian", _negotiation(OP, BIG_ENDIAN), None, TRANSFER_SYNTAX_NOT_SUPPORTED),
    Hostile("command and dataset SOP Instance UIDs differ", _mismatched_uids, 0xA900),
    Hostile("BitsAllocated 1", _bits_allocated(1), 0x0000, stored=1, worker=("ungradable", None)),
    Hostile("BitsAllocated 32", _bits_allocated(32), 0x0000, stored=1, worker=("scored", None)),
    Hostile("SamplesPerPixel 4 (ARGB)", _four_samples, 0xA900),
    Hostile("PALETTE COLOR with its lookup tables", _palette(True), 0x0000, stored=1, worker=("scored", None)),
    Hostile("PALETTE COLOR without lookup tables", _palette(False), 0xA900),
    Hostile(
        "a 200 MB instance over max_instance_bytes (128 MiB)",
        _two_hundred_megabytes,
        0xA700,
        settings={"max_instance_bytes": 128 * 1024 * 1024},
    ),
    Hostile(
        "a duplicate SOP Instance UID with different content",
        _duplicate_with_other_content,
        0xB006,
        stored=1,
        settings={"gateway_duplicate_policy": "keep_first"},
    ),
]


# Sending -------------------------------------------------------------------------------------------------


def _as_file(payload: Payload, folder: Path, name: str) -> Path:
    """The payload as a file whose dataset bytes are sent unchanged (pynetdicom's chunked mode)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(payload.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(payload.sop_instance)
    meta.TransferSyntaxUID = UID(payload.transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=False)
    path = folder / name
    with path.open("wb") as out:
        out.write(b"\x00" * 128 + b"DICM" + buffer.getvalue())
        out.write(payload.data)
    return path


def _associate(gateway: Any, sop_class: str = OP, syntax: str = EXPLICIT) -> Any:
    ae = AE(ae_title="CAMERA")
    for context in {(OP, EXPLICIT), (OP, JPEG), (OP, J2K_LOSSLESS), (sop_class, syntax)}:
        ae.add_requested_context(*context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    host, port = gateway.address
    assoc = ae.associate(host, port, ae_title=gateway.settings.gateway_ae_title)
    assert assoc.is_established
    return assoc


def _instances(settings: Settings) -> list[Instance]:
    engine = make_engine(settings)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))
    finally:
        engine.dispose()


def _stored_files(settings: Settings) -> list[Path]:
    root = settings.resolved_storage_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    yield


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_each_hostile_input_gets_its_status_leaves_only_what_it_should_and_the_service_stays_up(
    row: Hostile,
    start_gateway: Callable[..., Any],
    make_settings: Callable[..., Settings],
    random_onnx_model_path: Path,
    chunked: None,
    tmp_path: Path,
) -> None:
    settings = make_settings(model_path=random_onnx_model_path, **row.settings)
    gateway = start_gateway(settings)
    payload = row.make()

    assoc = _associate(gateway, payload.sop_class, payload.transfer_syntax)
    try:
        if row.status is None:
            refused = [
                cx
                for cx in assoc.rejected_contexts
                if (cx.abstract_syntax, cx.transfer_syntax[0]) == (payload.sop_class, payload.transfer_syntax)
            ]
            assert [cx.result for cx in refused] == [row.context_result]
        else:
            for index, earlier in enumerate(payload.before):
                assert assoc.send_c_store(_as_file(earlier, tmp_path, f"before-{index}.dcm")).Status == 0x0000
            answer = assoc.send_c_store(_as_file(payload, tmp_path, "hostile.dcm"))
            assert int(answer.Status) == row.status, f"0x{int(answer.Status):04X}"
        # The service is still up: the same association, then a new one, store a good photograph.
        good = _payload(_photo(instance=1))
        assert assoc.send_c_store(_as_file(good, tmp_path, "good-1.dcm")).Status == 0x0000
    finally:
        assoc.release()
    again = _associate(gateway)
    try:
        good = _payload(_photo(instance=2))
        assert again.send_c_store(_as_file(good, tmp_path, "good-2.dcm")).Status == 0x0000
    finally:
        again.release()

    rows = _instances(settings)
    hostile = [r for r in rows if r.sop_instance_uid == payload.sop_instance]
    assert len(hostile) == row.stored
    assert len(rows) == row.stored + 2
    assert len(_stored_files(settings)) == len(rows)  # no file without its row, no temporary file left
    if row.worker is None:
        return

    expected_status, reason = row.worker
    storage = Storage(settings.resolved_storage_dir)
    engine = make_engine(settings)
    sessions = session_factory(engine)
    scorer = Scorer.load(None, settings, sessions)
    try:
        ids = [r.id for r in rows]
        score_instances(settings, sessions, storage, scorer, ids)
        # A second delivery of the same message changes nothing: no retry loop on a permanent failure.
        score_instances(settings, sessions, storage, scorer, ids)
        with session_scope(sessions) as session:
            final = {i.id: (i.status.value, i.attempts, i.last_error) for i in session.scalars(select(Instance))}
    finally:
        scorer.close()
        engine.dispose()
    status, attempts, error = final[hostile[0].id]
    assert status == expected_status, error
    if reason is not None:
        assert error is not None and reason in error
        assert attempts == 1
    others = [final[r.id][0] for r in rows if r.id != hostile[0].id]
    assert set(others) <= {"scored", "ungradable"}  # the rest of the batch is scored all the same
