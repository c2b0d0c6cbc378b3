"""Tests for retinagate.outputs.sc: the heatmap Secondary Capture."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from retinagate.card import ModelCard
from retinagate.decode import decode_instance
from retinagate.outputs.identity import AI_DISCLAIMER, ModelIdentity, output_uid, series_uid
from retinagate.outputs.sc import ScEncoder, build_sc, header_line
from retinagate.synth import DicomIdentity, render_fundus, write_dicom

MODEL = ModelIdentity(card=ModelCard(name="fundus-net", version="1.0.0"), sha256="c" * 64, device_uid="2.25.77")


@pytest.fixture
def source(tmp_path: Path) -> Dataset:
    image = render_fundus(np.random.default_rng(5), 256, 192, ["DR"], "L").image
    path = write_dicom(image, tmp_path / "source.dcm", DicomIdentity.synthetic(3, "L"))
    header = decode_instance(tmp_path / "source.dcm", min_side=64, max_pixels=10**8).header
    assert header is not None and path is not None
    return header


def test_the_header_line_names_the_eye_the_accession_and_the_study_date_and_nothing_of_the_patient(
    source: Dataset,
) -> None:
    date = f"{source.StudyDate[:4]}-{source.StudyDate[4:6]}-{source.StudyDate[6:]}"

    line = header_line(source)

    assert line == f"Left eye   accession {source.AccessionNumber}   study date {date}"
    assert str(source.PatientName) not in line and source.PatientID not in line
    bare = copy.deepcopy(source)
    del bare.ImageLaterality, bare.AccessionNumber, bare.StudyDate
    assert header_line(bare) == "Eye not stated   study date not stated"


def _picture() -> np.ndarray:
    picture = np.zeros((300, 400, 3), dtype=np.uint8)
    picture[:150, :, 0] = 200
    return picture


def test_the_sc_rereads_in_the_source_study_and_references_the_source(source: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    build_sc(_picture(), source, MODEL, compression="none").save_as(path, enforce_file_format=True)

    ds = pydicom.dcmread(path)
    sc = hd.imread(path)
    assert np.array_equal(ds.pixel_array, _picture())
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert ds.get(keyword) == source.get(keyword)
    assert ds.SeriesInstanceUID == series_uid(source.StudyInstanceUID, "L", MODEL.sha256, "sc")
    assert ds.SOPInstanceUID == output_uid(source.SOPInstanceUID, MODEL.sha256, "sc") == sc.SOPInstanceUID
    reference = ds.SourceImageSequence[0]
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    assert ds.Laterality == "L"


def test_the_sc_is_marked_as_derived_unverified_ai_output_with_the_models_identity(source: Dataset) -> None:
    sc = build_sc(_picture(), source, MODEL)

    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert AI_DISCLAIMER in sc.ImageComments
    assert sc.LossyImageCompression == "01"  # the source was JPEG: once lossy, always flagged
    ours = [e for e in sc.ContributingEquipmentSequence if e.Manufacturer == "RetinaGate"]
    assert len(ours) == 1 and ours[0].DeviceUID == "2.25.77" and ours[0].ManufacturerModelName == "fundus-net"
    assert sc.Manufacturer == "RetinaGate"


def test_the_sc_is_jpeg_by_default_flagged_lossy_with_each_step_and_close_to_the_picture(
    source: Dataset, tmp_path: Path
) -> None:
    path = tmp_path / "sc.dcm"
    build_sc(_picture(), source, MODEL).save_as(path, enforce_file_format=True)

    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert path.stat().st_size < _picture().size / 10
    assert np.abs(ds.pixel_array.astype(int) - _picture()).mean() < 2.0
    # The source was JPEG (one step); this is the second lossy step.
    assert ds.LossyImageCompression == "01"
    assert list(ds.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_10918_1"]
    ratios = [float(r) for r in ds.LossyImageCompressionRatio]
    assert ratios[0] == float(source.LossyImageCompressionRatio)
    (frame,) = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    assert ratios[1] == pytest.approx(_picture().size / len(frame), abs=0.01)


def test_an_uncompressed_source_gives_one_lossy_step_and_none_gives_no_lossy_flag(source: Dataset) -> None:
    exact = copy.deepcopy(source)
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in exact:
            delattr(exact, keyword)

    jpeg = build_sc(_picture(), exact, MODEL)
    plain = build_sc(_picture(), exact, MODEL, compression="none")

    assert jpeg.LossyImageCompression == "01" and jpeg.LossyImageCompressionMethod == "ISO_10918_1"
    assert "LossyImageCompression" not in plain and plain.PhotometricInterpretation == "RGB"


def test_a_bad_compression_or_quality_is_refused(source: Dataset) -> None:
    with pytest.raises(ValueError, match="compression"):
        build_sc(_picture(), source, MODEL, compression="png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quality"):
        ScEncoder(MODEL, quality=20)


def test_building_twice_gives_the_same_uids(source: Dataset) -> None:
    first, second = build_sc(_picture(), source, MODEL), build_sc(_picture(), source, MODEL)

    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)


def test_a_picture_that_is_not_rgb_is_refused(source: Dataset) -> None:
    with pytest.raises(ValueError, match="picture"):
        build_sc(np.zeros((10, 10), dtype=np.uint8), source, MODEL)


@pytest.mark.interop
@pytest.mark.parametrize("compression", ["jpeg", "none"])
def test_the_sc_passes_dciodvfy(source: Dataset, dciodvfy: Callable[[object], list[str]], compression: str) -> None:
    assert dciodvfy(build_sc(_picture(), source, MODEL, compression=compression)) == []  # type: ignore[arg-type]


@pytest.mark.parametrize("compression", ["jpeg", "none"])
def test_the_encoder_writes_the_same_sc_as_highdicom_for_every_image(
    source: Dataset, tmp_path: Path, compression: str, plain_json: Callable[..., object]
) -> None:
    def _plain(ds: Dataset) -> object:
        return plain_json(ds, "DateOfSecondaryCapture", "TimeOfSecondaryCapture")

    encoder = ScEncoder(MODEL, compression=compression)  # type: ignore[arg-type]
    others = []
    for index in range(3):
        image = render_fundus(np.random.default_rng(index), 256, 192, ["DR"]).image
        path = tmp_path / f"other{index}.dcm"
        write_dicom(image, path, DicomIdentity.synthetic(index + 5, "R", seed=index))
        header = decode_instance(path, min_side=64, max_pixels=10**8).header
        assert header is not None
        others.append(header)
    sparse = copy.deepcopy(others[2])  # no laterality, no referring physician, not lossy
    for keyword in ("ImageLaterality", "ReferringPhysicianName", "LossyImageCompression"):
        delattr(sparse, keyword)
    cases = [(source, None, True), (others[0], 2, True), (others[1], None, False), (sparse, None, True)]
    for index, (header, frame, references) in enumerate(cases):
        picture = np.random.default_rng(index).integers(0, 255, (100 + index, 80, 3), dtype=np.uint8)

        built = encoder.encode(picture, header, frame_number=frame, references_source=references,
                               description=f"image {index}")  # fmt: skip
        dataset, data = built.read(), built.data

        expected = build_sc(picture, header, MODEL, frame_number=frame, references_source=references,
                            description=f"image {index}", compression=compression)  # type: ignore[arg-type]  # fmt: skip
        assert _plain(pydicom.dcmread(io.BytesIO(data))) == _plain(expected), f"case {index}"
        assert _plain(dataset) == _plain(expected), f"case {index}"
        if compression == "none":
            assert np.array_equal(pydicom.dcmread(io.BytesIO(data)).pixel_array, picture)


@pytest.mark.interop
def test_the_encoded_sc_passes_dciodvfy(
    source: Dataset, tmp_path: Path, dciodvfy: Callable[[object], list[str]]
) -> None:
    for compression in ("jpeg", "none"):
        path = tmp_path / f"sc-{compression}.dcm"
        path.write_bytes(ScEncoder(MODEL, compression=compression).encode(_picture(), source).data)  # type: ignore[arg-type]

        assert dciodvfy(path) == [], compression
