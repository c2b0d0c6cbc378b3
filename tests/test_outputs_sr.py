"""Tests for retinagate.outputs.sr: the TID 1500 Comprehensive SR."""

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
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from retinagate.card import ModelCard
from retinagate.decode import decode_instance
from retinagate.labels import LABELS
from retinagate.outputs.identity import ModelIdentity, output_uid
from retinagate.outputs.pm import build_pm
from retinagate.outputs.sc import build_sc
from retinagate.outputs.sr import (
    FrameScores,
    MapReference,
    SrEncoder,
    build_report,
    build_sr,
    label_concept,
    probability_concept,
)
from retinagate.synth import DicomIdentity, render_fundus, write_dicom

THRESHOLDS = tuple(0.3 if i % 2 else 0.6 for i in range(len(LABELS)))
MODEL = ModelIdentity(
    card=ModelCard(name="fundus-net", version="1.0.0", thresholds=THRESHOLDS), sha256="d" * 64, device_uid="2.25.78"
)
PROBABILITIES = [round(0.03 * i, 2) for i in range(len(LABELS))]


@pytest.fixture
def source(tmp_path: Path) -> Dataset:
    image = render_fundus(np.random.default_rng(6), 256, 192, ["DR"]).image
    write_dicom(image, tmp_path / "source.dcm", DicomIdentity.synthetic(4))
    header = decode_instance(tmp_path / "source.dcm", min_side=64, max_pixels=10**8).header
    assert header is not None
    return header


@pytest.fixture
def sc(source: Dataset) -> Dataset:
    return build_sc(np.zeros((64, 64, 3), dtype=np.uint8), source, MODEL)


def _written(ds: Dataset, tmp_path: Path) -> Path:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_every_label_has_its_probability_and_decision(source: Dataset, sc: Dataset, tmp_path: Path) -> None:
    path = _written(build_sr(source, MODEL, [FrameScores(PROBABILITIES)], sc=sc), tmp_path)

    report = hd.sr.srread(path)
    (group,) = report.content.get_image_measurement_groups()
    measured = {m.name.value: m.value for m in group.get_measurements()}
    assert measured == {probability_concept(n).value: p for n, p in zip(LABELS, PROBABILITIES, strict=True)}
    decisions = {e.name.value: e.value for e in group.get_qualitative_evaluations()}
    for name, probability, threshold in zip(LABELS, PROBABILITIES, THRESHOLDS, strict=True):
        expected = codes.SCT.Present if probability >= threshold else codes.SCT.Absent
        assert decisions[label_concept(name).value] == expected, name
    text = hd.sr.ValueTypeValues.TEXT
    texts = {item.name.meaning: item.value for item in group[0].ContentSequence if item.value_type == text}
    assert (texts["Algorithm Name"], texts["Algorithm Version"]) == ("fundus-net", "1.0.0")


def test_the_sr_references_the_source_and_the_sc(source: Dataset, sc: Dataset, tmp_path: Path) -> None:
    ds = pydicom.dcmread(_written(build_sr(source, MODEL, [FrameScores(PROBABILITIES)], sc=sc), tmp_path))

    report = hd.sr.srread(_written(ds, tmp_path))
    (group,) = report.content.get_image_measurement_groups()
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, sc.SOPInstanceUID}
    assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert ds.SOPInstanceUID == output_uid(source.SOPInstanceUID, MODEL.sha256, "sr")
    assert (ds.VerificationFlag, ds.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY")


def test_the_shortcut_construction_equals_highdicoms_own(
    source: Dataset, sc: Dataset, plain_json: Callable[..., object]
) -> None:
    ours = build_sr(source, MODEL, [FrameScores(PROBABILITIES)], sc=sc)
    report = build_report(source, MODEL, [FrameScores(PROBABILITIES)], sc=sc)
    theirs = hd.sr.ComprehensiveSR(
        evidence=[source, sc],
        content=report[0],
        series_instance_uid=ours.SeriesInstanceUID,
        series_number=ours.SeriesNumber,
        sop_instance_uid=ours.SOPInstanceUID,
        instance_number=1,
        manufacturer="RetinaGate",
        is_complete=True,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[MODEL.contributing_equipment()],
        coding_schemes=list(ours.CodingSchemeIdentificationSequence),
        series_description=ours.SeriesDescription,
    )
    MODEL.stamp(theirs)

    assert plain_json(ours, "SeriesDate", "SeriesTime", reread=False) == plain_json(
        theirs, "SeriesDate", "SeriesTime", reread=False
    )


def test_multi_frame_sources_get_a_measurement_group_per_frame(source: Dataset, sc: Dataset, tmp_path: Path) -> None:
    frames = [FrameScores(PROBABILITIES, 1), FrameScores(list(reversed(PROBABILITIES)), 2)]
    source = Dataset(source)  # a copy that claims two frames
    source.NumberOfFrames = 2

    report = hd.sr.srread(_written(build_sr(source, MODEL, frames, sc=sc), tmp_path))

    groups = report.content.get_image_measurement_groups()
    assert [g.source_images[0].referenced_frame_numbers for g in groups] == [[1], [2]]


def test_for_a_plain_image_the_measurements_refer_to_the_sc(source: Dataset, sc: Dataset, tmp_path: Path) -> None:
    report = hd.sr.srread(
        _written(build_sr(source, MODEL, [FrameScores(PROBABILITIES)], sc=sc, references_source=False), tmp_path)
    )

    (group,) = report.content.get_image_measurement_groups()
    assert group.source_images[0].referenced_sop_instance_uid == sc.SOPInstanceUID


@pytest.mark.parametrize(
    ("probabilities", "message"), [([0.5] * 3, "29 labels"), ([1.5] * len(LABELS), "expected 0 to 1")]
)
def test_bad_scores_are_refused(source: Dataset, sc: Dataset, probabilities: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_sr(source, MODEL, [FrameScores(probabilities)], sc=sc)


@pytest.mark.interop
def test_the_sr_passes_dciodvfy(source: Dataset, sc: Dataset, dciodvfy: Callable[[object], list[str]]) -> None:
    assert dciodvfy(build_sr(source, MODEL, [FrameScores(PROBABILITIES)], sc=sc)) == []


# The template encoder: the same document as highdicom's construction, for every image.


def _sources(tmp_path: Path, count: int) -> list[Dataset]:
    """Sources of different patients, eyes and studies (the template is made from the first)."""
    headers = []
    for index in range(count):
        image = render_fundus(np.random.default_rng(index), 256, 192, ["DR"]).image
        path = tmp_path / f"source{index}.dcm"
        write_dicom(image, path, DicomIdentity.synthetic(index, "L" if index % 2 else "R", seed=index))
        header = decode_instance(path, min_side=64, max_pixels=10**8).header
        assert header is not None
        headers.append(header)
    return headers


def test_the_encoder_writes_highdicoms_document_for_every_image(
    tmp_path: Path, plain_json: Callable[..., object]
) -> None:
    encoder = SrEncoder(MODEL)
    rng = np.random.default_rng(1)
    for index, source in enumerate(_sources(tmp_path, 3)):
        sc = build_sc(np.zeros((64 + index, 64, 3), dtype=np.uint8), source, MODEL)
        scores = [FrameScores([float(p) for p in rng.random(len(LABELS))])]

        built = encoder.encode(source, scores, sc=sc)

        ours = pydicom.dcmread(io.BytesIO(built.data))
        assert built.sop_instance_uid == ours.SOPInstanceUID == ours.file_meta.MediaStorageSOPInstanceUID
        assert plain_json(ours) == plain_json(build_sr(source, MODEL, scores, sc=sc)), f"image {index}"


def test_the_encoded_document_equals_highdicoms_direct_construction(
    tmp_path: Path, plain_json: Callable[..., object]
) -> None:
    first, source = _sources(tmp_path, 2)
    sc = build_sc(np.zeros((64, 64, 3), dtype=np.uint8), source, MODEL)
    encoder = SrEncoder(MODEL)
    encoder.encode(first, [FrameScores(list(reversed(PROBABILITIES)))],
                   sc=build_sc(np.zeros((64, 64, 3), dtype=np.uint8), first, MODEL))  # fmt: skip

    data = encoder.encode(source, [FrameScores(PROBABILITIES)], sc=sc).data

    ours = pydicom.dcmread(io.BytesIO(data))
    report = build_report(source, MODEL, [FrameScores(PROBABILITIES)], sc=sc)
    schemes = build_sr(source, MODEL, [FrameScores(PROBABILITIES)], sc=sc).CodingSchemeIdentificationSequence
    theirs = hd.sr.ComprehensiveSR(
        evidence=[source, sc],
        content=report[0],
        series_instance_uid=ours.SeriesInstanceUID,
        series_number=ours.SeriesNumber,
        sop_instance_uid=ours.SOPInstanceUID,
        instance_number=1,
        manufacturer="RetinaGate",
        is_complete=True,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[MODEL.contributing_equipment()],
        coding_schemes=list(schemes),
        series_description=ours.SeriesDescription,
    )
    MODEL.stamp(theirs)
    assert plain_json(ours) == plain_json(theirs)


def test_the_encoder_handles_plain_images_multi_frame_sources_and_sparse_headers(
    tmp_path: Path, plain_json: Callable[..., object]
) -> None:
    encoder = SrEncoder(MODEL)
    first, second = _sources(tmp_path, 2)
    frames = [FrameScores(PROBABILITIES, 1), FrameScores(list(reversed(PROBABILITIES)), 2)]
    sparse = copy.deepcopy(second)  # no referring physician, no character set, no acquisition equipment
    for keyword in ("ReferringPhysicianName", "SpecificCharacterSet", "Manufacturer"):
        delattr(sparse, keyword)
    multi = copy.deepcopy(second)
    multi.NumberOfFrames = 2
    cases = [
        (first, [FrameScores(PROBABILITIES)], False),
        (second, [FrameScores(PROBABILITIES)], False),
        (first, frames, True),
        (multi, frames, True),
        (sparse, [FrameScores(PROBABILITIES)], True),
    ]
    for index, (source, scores, references_source) in enumerate(cases):
        sc = build_sc(np.zeros((64, 64, 3), dtype=np.uint8), source, MODEL, references_source=references_source)

        data = encoder.encode(source, scores, sc=sc, references_source=references_source).data

        expected = build_sr(source, MODEL, scores, sc=sc, references_source=references_source)
        assert plain_json(pydicom.dcmread(io.BytesIO(data))) == plain_json(expected), f"case {index}"


def _maps(source: Dataset, labels: tuple[str, ...]) -> list[MapReference]:
    heat = np.linspace(0, 1, source.Rows * source.Columns, dtype=np.float32).reshape(source.Rows, source.Columns)
    return [MapReference(label, build_pm(heat, source, MODEL, label=label, probability=0.5, rank=rank))
            for rank, label in enumerate(labels, start=1)]  # fmt: skip


def test_the_encoder_writes_highdicoms_document_with_the_maps_of_each_image(
    tmp_path: Path, plain_json: Callable[..., object]
) -> None:
    """Maps vary in number and Frame of Reference (one per eye and study) from image to image."""
    encoder = SrEncoder(MODEL)
    rng = np.random.default_rng(2)
    # Images 2 and 3 reuse the templates of images 0 and 1 (same eye, labels and decisions), with their own UIDs.
    draws = [[FrameScores([float(p) for p in rng.random(len(LABELS))])] for _ in range(2)]
    for index, source in enumerate(_sources(tmp_path, 4)):
        sc = build_sc(np.zeros((64, 64, 3), dtype=np.uint8), source, MODEL)
        maps = _maps(source, ("DR", "MYA") if index % 2 == 0 else ("MH",))
        scores = draws[index % 2]

        built = encoder.encode(source, scores, sc=sc, maps=maps)

        expected = build_sr(source, MODEL, scores, sc=sc, maps=maps)
        assert plain_json(pydicom.dcmread(io.BytesIO(built.data))) == plain_json(expected), f"image {index}"


def test_each_map_is_its_findings_heatmap_in_the_eyes_finding_group(
    source: Dataset, sc: Dataset, tmp_path: Path
) -> None:
    maps = _maps(source, ("DR", "MYA"))
    path = tmp_path / "sr.dcm"
    path.write_bytes(SrEncoder(MODEL).encode(source, [FrameScores(PROBABILITIES)], sc=sc, maps=maps).data)

    frame, *groups = hd.sr.srread(path).content.get_image_measurement_groups()

    eye = codes.SCT.Left if source.ImageLaterality == "L" else codes.SCT.Right
    assert [site.laterality for site in frame.finding_sites] == [eye]
    assert [(g.finding_type.value, g.finding_type.scheme_designator) for g in groups] == [
        ("4855003", "SCT"),
        ("57190000", "SCT"),
    ]
    assert label_concept("MYA") == codes.SCT.Myopia  # DICOM PS3.16 CID 4238 Refractive Error Type
    for group, reference in zip(groups, maps, strict=True):
        (heat,) = [i for i in group[0].ContentSequence if i.ValueType == "IMAGE" and i.name.value == "HEATMAP"]
        assert heat.referenced_sop_instance_uid == reference.dataset.SOPInstanceUID
        (decision,) = group.get_qualitative_evaluations()
        index = LABELS.index(reference.label)
        assert decision.value == (codes.SCT.Present if PROBABILITIES[index] >= THRESHOLDS[index] else codes.SCT.Absent)


def test_the_encoded_document_rereads_with_highdicom(source: Dataset, sc: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    path.write_bytes(SrEncoder(MODEL).encode(source, [FrameScores(PROBABILITIES)], sc=sc).data)

    report = hd.sr.srread(path)

    (group,) = report.content.get_image_measurement_groups()
    measured = {m.name.value: m.value for m in group.get_measurements()}
    assert measured == {probability_concept(n).value: p for n, p in zip(LABELS, PROBABILITIES, strict=True)}
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID


def test_the_encoder_refuses_bad_scores_like_the_builder(source: Dataset, sc: Dataset) -> None:
    with pytest.raises(ValueError, match="29 labels"):
        SrEncoder(MODEL).encode(source, [FrameScores([0.5] * 3)], sc=sc)
    with pytest.raises(ValueError, match="sc: a plain image"):
        SrEncoder(MODEL).encode(source, [FrameScores(PROBABILITIES)], references_source=False)


@pytest.mark.interop
def test_the_encoded_sr_passes_dciodvfy(
    source: Dataset, sc: Dataset, tmp_path: Path, dciodvfy: Callable[[object], list[str]]
) -> None:
    path = tmp_path / "sr.dcm"
    path.write_bytes(SrEncoder(MODEL).encode(source, [FrameScores(PROBABILITIES)], sc=sc).data)

    assert dciodvfy(path) == []


def test_encoding_from_several_threads_keeps_every_document_its_own_identity(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sources = _sources(tmp_path, 4)
    encoder = SrEncoder(MODEL)
    pictures = {id(s): build_sc(np.zeros((64, 64, 3), dtype=np.uint8), s, MODEL) for s in sources}

    def encode(index: int) -> tuple[Dataset, bytes]:
        source = sources[index % len(sources)]
        return source, encoder.encode(source, [FrameScores(PROBABILITIES)], sc=pictures[id(source)]).data

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(encode, range(40)))

    for source, data in done:
        ds = pydicom.dcmread(io.BytesIO(data))
        expected = output_uid(source.SOPInstanceUID, MODEL.sha256, "sr")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == expected
        assert ds.PatientID == source.PatientID
        equipment = ds.ContributingEquipmentSequence[0]
        assert equipment.ContributionDateTime == source.AcquisitionDateTime  # the source's, not another's


def test_the_readme_tables_every_snomed_code_the_sr_writes_as_written() -> None:
    import re

    from retinagate.outputs.sr import SNOMED_LABELS

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^  \| (\w+) \| (\d+) \| ([^|]+?) \|", readme, flags=re.MULTILINE)

    assert {label: (code, meaning) for label, code, meaning in rows} == {
        label: (code.value, code.meaning) for label, code in SNOMED_LABELS.items()
    }
