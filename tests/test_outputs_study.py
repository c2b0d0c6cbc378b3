"""Tests for retinagate.outputs.study: the study report's rule and its SR."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from retinagate.card import ModelCard
from retinagate.decode import decode_instance
from retinagate.labels import DISEASE_RISK, LABELS
from retinagate.models import StudyConclusion
from retinagate.outputs.identity import ModelIdentity
from retinagate.outputs.sr import label_concept, probability_concept
from retinagate.outputs.study import (
    CONCLUSION_CODES,
    EyeResult,
    Photograph,
    build_study_report,
    conclude,
    eye_results,
    report_series_uid,
)
from retinagate.synth import DicomIdentity, render_fundus, write_dicom

THRESHOLDS = tuple(0.5 for _ in LABELS)
MODEL = ModelIdentity(
    card=ModelCard(name="fundus-net", version="1.0.0", thresholds=THRESHOLDS), sha256="e" * 64, device_uid="2.25.79"
)


def _scores(**over: float) -> dict[str, float]:
    return {name: over.get(name, 0.1) for name in LABELS}


def _photo(eye: str, **over: float) -> Photograph:
    probabilities = _scores(**over)
    return Photograph(eye, True, probabilities, [n for n in LABELS if probabilities[n] >= 0.5])


def _ungradable(eye: str) -> Photograph:
    return Photograph(eye, False, {}, [])


@pytest.fixture(scope="module")
def photographs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A study's photographs: right, left, right."""
    folder = tmp_path_factory.mktemp("study")
    paths = []
    for index, eye in enumerate(("R", "L", "R")):
        image = render_fundus(np.random.default_rng(index), 256, 192, [], eye).image  # type: ignore[arg-type]
        path = folder / f"{index}.dcm"
        write_dicom(image, path, DicomIdentity.synthetic(3, eye, instance=index // 2))  # type: ignore[arg-type]
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sources(photographs: list[Path]) -> list[Dataset]:
    headers = []
    for path in photographs:
        header = decode_instance(path, min_side=64, max_pixels=10**8).header
        assert header is not None
        headers.append(header)
    return headers


def test_a_finding_in_any_gradable_eye_refers_the_study() -> None:
    assert conclude(eye_results([_photo("R", DR=0.7), _photo("L")])) == StudyConclusion.REFER
    assert conclude(eye_results([_photo("R", **{DISEASE_RISK: 0.5}), _photo("L")])) == StudyConclusion.REFER
    assert conclude(eye_results([_photo("R", OTHER=0.9), _ungradable("L")])) == StudyConclusion.REFER


def test_no_gradable_eye_makes_the_study_ungradable() -> None:
    assert conclude(eye_results([_ungradable("R"), _ungradable("L")])) == StudyConclusion.UNGRADABLE


def test_gradable_eyes_without_findings_are_no_referable_finding_even_beside_an_ungradable_eye() -> None:
    assert conclude(eye_results([_photo("R", DR=0.4999), _photo("L")])) == StudyConclusion.NO_REFERABLE
    assert conclude(eye_results([_photo("R"), _ungradable("L")])) == StudyConclusion.NO_REFERABLE


def test_an_eye_takes_the_highest_probabilities_of_its_gradable_photographs() -> None:
    right, left = eye_results(
        [_photo("R", DR=0.6, **{DISEASE_RISK: 0.3}), _photo("R", DR=0.8, MH=0.55, **{DISEASE_RISK: 0.7}),
         _ungradable("L"), _photo("L", **{DISEASE_RISK: 0.2})]
    )  # fmt: skip
    assert (right.eye, right.photographs, right.gradable) == ("R", 2, True)
    assert right.disease_risk == 0.7
    assert right.findings == (("DR", 0.8), (DISEASE_RISK, 0.7), ("MH", 0.55))
    assert (left.eye, left.photographs, left.gradable, left.disease_risk, left.findings) == ("L", 2, True, 0.2, ())
    assert EyeResult.from_json("R", right.to_json()) == right


def test_eyes_come_right_left_both_unknown_and_bad_input_is_refused() -> None:
    assert [e.eye for e in eye_results([_photo("U"), _photo("L"), _photo("B"), _photo("R")])] == ["R", "L", "B", "U"]
    with pytest.raises(ValueError, match="eye"):
        eye_results([_photo("X")])
    with pytest.raises(ValueError, match="eyes"):
        conclude([])


def test_the_report_gives_each_eye_its_laterality_disease_risk_findings_and_the_conclusion(
    sources: list[Dataset], tmp_path: Path
) -> None:
    eyes = eye_results([_photo("R", DR=0.8, **{DISEASE_RISK: 0.9}), _photo("R"), _ungradable("L")])
    built = build_study_report(sources, MODEL, eyes)
    path = tmp_path / "study.dcm"
    path.write_bytes(built.data)

    report = hd.sr.srread(path)
    right, left, study = report.content.get_image_measurement_groups()
    assert right.finding_sites[0].laterality.meaning == "Right"
    assert left.finding_sites[0].laterality.meaning == "Left"
    measured = {m.name.value: m.value for m in right.get_measurements()}
    assert measured == {probability_concept(DISEASE_RISK).value: 0.9, probability_concept("DR").value: 0.8}
    present = {e.name.value: e.value.meaning for e in right.get_qualitative_evaluations()}
    assert present == {label_concept("DR").value: "Present", label_concept(DISEASE_RISK).value: "Present"}
    assert [e.value.value for e in left.get_qualitative_evaluations()] == ["NOT-GRADED"]
    assert not left.get_measurements()
    (verdict,) = study.get_qualitative_evaluations()
    assert verdict.value.value == CONCLUSION_CODES[StudyConclusion.REFER].value
    # The conclusion in words, each eye worded as a photograph's result is.
    (text,) = [
        item.TextValue
        for item in study[0].ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121077"
    ]
    assert text == (
        "Refer. Right eye: Finding: Diabetic retinopathy (DR) 0.80, threshold 0.50; Disease risk (any abnormality)"
        " 0.90, at or over threshold 0.50. Left eye: Not graded."
    )
    # Each eye's group refers to that eye's photographs only.
    images = {str(ds.SOPInstanceUID): str(ds.ImageLaterality) for ds in sources}
    for group, eye in ((right, "R"), (left, "L")):
        referenced = {img.referenced_sop_instance_uid for img in group.source_images}
        assert {images[uid] for uid in referenced} == {eye}
    ds = report  # the document is in the photographs' study, unverified
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.PatientID == sources[0].PatientID
    assert (ds.VerificationFlag, ds.PreliminaryFlag, ds.CompletionFlag) == ("UNVERIFIED", "PRELIMINARY", "COMPLETE")


@pytest.mark.interop
def test_the_report_passes_dciodvfy_and_dcentvfy_with_its_photographs_and_dsrdump_reads_it(
    sources: list[Dataset],
    photographs: list[Path],
    tmp_path: Path,
    dciodvfy: Callable[[object], list[str]],
    dcentvfy: Callable[[list[Path]], list[str]],
) -> None:
    eyes = eye_results([_photo("R", DR=0.8), _photo("L"), _photo("R")])
    path, revised = tmp_path / "study.dcm", tmp_path / "study.2.dcm"
    path.write_bytes(build_study_report(sources, MODEL, eyes).data)
    revised.write_bytes(build_study_report(sources, MODEL, eyes, revision=2).data)

    assert dciodvfy(path) == [] and dciodvfy(revised) == []
    assert dcentvfy([*photographs, path]) == []
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert dump.returncode == 0, dump.stderr
    assert '(REFER,99RETINAGATE,"Refer")' in dump.stdout
    assert '(24028007,SCT,"Right")' in dump.stdout and '(7771000,SCT,"Left")' in dump.stdout


def test_a_rerun_writes_the_same_object_and_a_later_revision_a_new_one_in_the_same_series(
    sources: list[Dataset],
) -> None:
    eyes = eye_results([_photo("R"), _photo("L")])
    first, again = build_study_report(sources, MODEL, eyes), build_study_report(sources, MODEL, eyes)
    later = build_study_report(sources, MODEL, eyes, revision=2)
    other_model = ModelIdentity(card=MODEL.card, sha256="f" * 64, device_uid="2.25.80")
    other = build_study_report(sources, other_model, eyes)

    assert first.sop_instance_uid == again.sop_instance_uid
    assert later.sop_instance_uid != first.sop_instance_uid
    assert (
        first.series_instance_uid
        == later.series_instance_uid
        == report_series_uid(str(sources[0].StudyInstanceUID), MODEL.sha256)
    )
    assert other.series_instance_uid != first.series_instance_uid
    assert (first.read().InstanceNumber, later.read().InstanceNumber) == (1, 2)
    assert first.series_instance_uid not in {str(ds.SeriesInstanceUID) for ds in sources}
    assert "PredecessorDocumentsSequence" not in first.read()
    (study,) = later.read().PredecessorDocumentsSequence  # revision 2 amends revision 1
    assert study.StudyInstanceUID == sources[0].StudyInstanceUID
    ((series,),) = [study.ReferencedSeriesSequence]
    assert series.SeriesInstanceUID == first.series_instance_uid
    ((instance,),) = [series.ReferencedSOPSequence]
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        first.sop_class_uid,
        first.sop_instance_uid,
    )


def test_sources_of_several_studies_are_refused(sources: list[Dataset]) -> None:
    stranger = Dataset()
    stranger.update(sources[1])
    stranger.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="one study"):
        build_study_report([sources[0], stranger], MODEL, eye_results([_photo("R")]))
    with pytest.raises(ValueError, match="sources"):
        build_study_report([], MODEL, eye_results([_photo("R")]))
