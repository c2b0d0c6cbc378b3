"""Tests for retinagate.pipeline: files in, probabilities, findings and DICOM outputs out."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import uid

from dicom_gateway.sop_classes import TRANSFER_SYNTAXES
from retinagate.engine import Engine
from retinagate.labels import DISEASE_RISK, LABELS
from retinagate.outputs.findings import NO_FINDING, finding_text, summary_lines
from retinagate.outputs.identity import output_uid
from retinagate.outputs.render import retina_heat
from retinagate.pipeline import Pipeline, ScoreFailure, ScoreResult, findings_of
from retinagate.preprocess import find_fov, prepare
from retinagate.settings import Settings
from retinagate.synth import DicomIdentity, build_dicom, render_fundus, write_dicom


@pytest.fixture(scope="module")
def engine(random_onnx_model_path: Path) -> Engine:
    return Engine(random_onnx_model_path, providers="cpu")


@pytest.fixture
def photos() -> list[NDArray[np.uint8]]:
    rng = np.random.default_rng(21)
    return [render_fundus(rng, 448, 336, columns).image for columns in (["DR"], ["MH", "ODC"], [])]


def _score(engine: Engine, settings: Settings, paths: list[Path]) -> list[ScoreResult | ScoreFailure]:
    with Pipeline(engine, settings) as pipeline:
        return pipeline.score_paths(paths)


def test_a_mixed_batch_gives_one_result_per_input_in_order(
    engine: Engine, photos: list[NDArray[np.uint8]], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    jpeg = write_dicom(photos[0], tmp_path / "a.dcm", DicomIdentity.synthetic(0))
    native = write_dicom(photos[1], tmp_path / "b.dcm", DicomIdentity.synthetic(1), transfer_syntax="explicit_little")
    png = tmp_path / "c.png"
    cv2.imwrite(str(png), cv2.cvtColor(photos[2], cv2.COLOR_RGB2BGR))
    junk = tmp_path / "d.dcm"
    junk.write_bytes(b"\x00" * 200)
    assert jpeg is not None and native is not None
    paths = [tmp_path / "a.dcm", tmp_path / "b.dcm", png, junk, tmp_path / "missing.dcm"]

    results = _score(engine, make_settings(batch_size=2), paths)

    assert [r.source for r in results] == [str(p) for p in paths]
    assert [type(r).__name__ for r in results] == ["ScoreResult"] * 3 + ["ScoreFailure"] * 2
    failures = [r for r in results if isinstance(r, ScoreFailure)]
    assert all(f.permanent for f in failures) and "not a DICOM file" in failures[0].error
    scored = [r for r in results if isinstance(r, ScoreResult)]
    assert scored[0].sop_instance_uid == DicomIdentity.synthetic(0).sop_instance_uid
    assert scored[2].sop_instance_uid is None
    for result in scored:
        assert set(result.probabilities) == set(LABELS)
        assert set(result.outputs) == {"sc", "sr"}
        assert {"decode", "preprocess", "infer", "render", "encode", "total"} <= set(result.timings)
        assert all(value >= 0 for value in result.timings.values())


def test_probabilities_are_the_models_on_the_training_preprocessing(
    engine: Engine, photos: list[NDArray[np.uint8]], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    write_dicom(photos[0], tmp_path / "a.dcm", DicomIdentity.synthetic(0), transfer_syntax="explicit_little")

    (result,) = _score(engine, make_settings(outputs=["sr"]), [tmp_path / "a.dcm"])

    expected, _ = engine.predict(prepare(photos[0], engine.card.preprocessing)[None])
    assert isinstance(result, ScoreResult)
    got = np.array([result.probabilities[name] for name in engine.card.labels])
    assert np.abs(got - expected[0]).max() < 1e-4


def test_outputs_have_deterministic_uids_and_reference_the_source(
    engine: Engine, photos: list[NDArray[np.uint8]], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    write_dicom(photos[0], tmp_path / "a.dcm", DicomIdentity.synthetic(0))
    settings = make_settings(outputs=["sc", "sr", "pm"])

    first, second = (_score(engine, settings, [tmp_path / "a.dcm"])[0] for _ in range(2))

    assert isinstance(first, ScoreResult) and isinstance(second, ScoreResult)
    source_uid = DicomIdentity.synthetic(0).sop_instance_uid
    assert {o.kind for o in first.built} == {"sc", "sr", "pm"}
    for output in first.built:
        uid = first.outputs[output.key].SOPInstanceUID
        expected = output_uid(source_uid, engine.sha256, output.kind, output.label)
        assert uid == second.outputs[output.key].SOPInstanceUID == expected
        path = tmp_path / f"{output.key}.dcm"
        first.outputs[output.key].save_as(path, enforce_file_format=True)
        reread = pydicom.dcmread(path)
        assert reread.StudyInstanceUID == DicomIdentity.synthetic(0).study_uid
    sc = pydicom.dcmread(tmp_path / "sc.dcm")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source_uid
    assert first.summary()["outputs"] == {o.key: output_uid(source_uid, engine.sha256, o.kind, o.label)
                                          for o in first.built}  # fmt: skip
    assert sc.Rows > 768 and sc.Columns == 1024  # display size, legend below
    pm = pydicom.dcmread(next(tmp_path.glob("pm.*.dcm")))
    assert (pm.Rows, pm.Columns) == (168, 224)  # a 448 x 336 source: 2 x 2 of its pixels per map pixel


def test_a_multi_frame_instance_is_scored_frame_by_frame(
    engine: Engine, photos: list[NDArray[np.uint8]], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    ds = build_dicom(photos[0], DicomIdentity.synthetic(2), transfer_syntax="explicit_little")
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack(photos).tobytes()
    ds.save_as(tmp_path / "multi.dcm", enforce_file_format=True)

    (result,) = _score(engine, make_settings(), [tmp_path / "multi.dcm"])

    assert isinstance(result, ScoreResult) and len(result.frame_probabilities) == 3
    for name in LABELS:
        assert result.probabilities[name] == max(frame[name] for frame in result.frame_probabilities)
    path = tmp_path / "sr.dcm"
    result.outputs["sr"].save_as(path, enforce_file_format=True)
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    assert [g.source_images[0].referenced_frame_numbers for g in groups] == [[1], [2], [3]]


def test_a_plain_image_gets_an_anonymous_identity_from_its_content(
    engine: Engine, photos: list[NDArray[np.uint8]], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    for name in ("one.png", "two.png"):
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(photos[0], cv2.COLOR_RGB2BGR))

    first, second = _score(engine, make_settings(), [tmp_path / "one.png", tmp_path / "two.png"])

    assert isinstance(first, ScoreResult) and isinstance(second, ScoreResult)
    sc = first.outputs["sc"]
    assert sc.PatientID.startswith("RG-") and "SourceImageSequence" not in sc
    assert sc.SOPInstanceUID == second.outputs["sc"].SOPInstanceUID  # same content, same identity
    path = tmp_path / "sr.dcm"
    first.outputs["sr"].save_as(path, enforce_file_format=True)
    (group,) = hd.sr.srread(path).content.get_image_measurement_groups()
    assert group.source_images[0].referenced_sop_instance_uid == sc.SOPInstanceUID


def test_score_arrays_scores_in_memory_photographs(
    engine: Engine, photos: list[NDArray[np.uint8]], make_settings: Callable[..., Settings]
) -> None:
    with Pipeline(engine, make_settings(outputs=["sr"])) as pipeline:
        results = pipeline.score_arrays([("eye", photos[0]), ("bad", np.zeros((4, 4), dtype=np.uint8))])

    assert isinstance(results[0], ScoreResult) and isinstance(results[1], ScoreFailure)
    assert results[1].permanent


def test_findings_are_the_labels_over_threshold_most_probable_first() -> None:
    labels = (DISEASE_RISK, "DR", "MH", "ODC")
    probabilities = {DISEASE_RISK: 0.9, "DR": 0.6, "MH": 0.95, "ODC": 0.4}

    assert findings_of(probabilities, labels, (0.5, 0.5, 0.5, 0.5)) == ["MH", DISEASE_RISK, "DR"]
    assert findings_of(probabilities, labels, (0.9, 0.7, 0.96, 0.4)) == [DISEASE_RISK, "ODC"]


@pytest.mark.interop
def test_every_output_passes_dciodvfy(
    engine: Engine,
    photos: list[NDArray[np.uint8]],
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    dciodvfy: Callable[[object], list[str]],
) -> None:
    write_dicom(photos[0], tmp_path / "a.dcm", DicomIdentity.synthetic(0))
    cv2.imwrite(str(tmp_path / "b.jpg"), cv2.cvtColor(photos[1], cv2.COLOR_RGB2BGR))

    results = _score(engine, make_settings(outputs=["sc", "sr", "pm"]), [tmp_path / "a.dcm", tmp_path / "b.jpg"])

    problems = {
        f"{r.source}:{kind}": errors
        for r in results
        if isinstance(r, ScoreResult)
        for kind, ds in r.outputs.items()
        if (errors := dciodvfy(ds))
    }
    assert problems == {}


def _marker_centre(sc_png: Path, plain: NDArray[np.uint8]) -> tuple[int, int]:
    """Centre ``(x, y)`` of the ring the SC draws at the shown finding's heatmap peak.

    The marker is a white ring inside a black one: both are matched, so a pale patch of heat as wide
    as the ring (white alone) does not pass for it.
    """
    rendered = cv2.cvtColor(cv2.imread(str(sc_png)), cv2.COLOR_BGR2RGB)[: plain.shape[0]]
    white = ((rendered.min(axis=2) > 200) & (plain.min(axis=2) <= 200)).astype(np.float32)
    black = ((rendered.max(axis=2) < 60) & (plain.max(axis=2) >= 60)).astype(np.float32)
    radius = max(6, plain.shape[1] // 90)  # the marker's radius in outputs.render
    side, centre = 2 * radius + 9, (radius + 4, radius + 4)
    ring = np.zeros((side, side), dtype=np.float32)
    cv2.circle(ring, centre, radius, 1.0, 2)
    halo = np.zeros_like(ring)
    cv2.circle(halo, centre, radius, 1.0, 5)
    halo[ring > 0] = 0.0
    score = cv2.matchTemplate(white, ring, cv2.TM_CCORR) + cv2.matchTemplate(black, halo, cv2.TM_CCORR)
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(x) + centre[0], int(y) + centre[1]


@pytest.mark.slow
def test_the_sc_heatmap_sits_over_the_planted_lesion(
    onnx_model_path: Path, synth_dataset: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    from retinagate.decode import decode_instance
    from retinagate.outputs import Legend, render_heatmaps
    from retinagate.preprocess import prepare_with_geometry
    from train.datasets import find_rfmid_splits
    from train.masks import MaskIndex, photographs

    engine = Engine(onnx_model_path, providers="cpu")
    paths = sorted(p for p in (synth_dataset / "dicom").rglob("*.dcm") if not p.name.startswith("Training"))

    results = _score(engine, make_settings(top_findings=1), paths)
    masks = MaskIndex.scan(synth_dataset / "masks", photographs(find_rfmid_splits(synth_dataset).values()))

    # Half a CAM cell around the lesion: the map is engine.cam_size cells across the model input.
    cell = engine.card.input_size / engine.cam_size[1]
    hits, judged, chance = 0, 0, []
    for path, result in zip(paths, results, strict=True):
        assert isinstance(result, ScoreResult)
        split, image_id = path.stem.split("_", 1)
        shown = [n for n in result.findings if n != DISEASE_RISK][:1]
        mask = masks.mask((synth_dataset / split / f"{image_id}.png").resolve(), shown[0]) if shown else None
        if mask is None:
            continue  # the finding shown is not one planted in this photograph
        png = tmp_path / f"{path.stem}.png"
        cv2.imwrite(str(png), cv2.cvtColor(result.outputs["sc"].pixel_array, cv2.COLOR_RGB2BGR))
        decoded = decode_instance(path, min_side=engine.card.input_size, min_long_side=1024, max_pixels=10**8)
        model_input, geometry = prepare_with_geometry(decoded.frames[0], engine.card.preprocessing)
        geometry = geometry.with_cam(engine.card.cam_grid())  # where the served map's cells sit, as the SC reads them
        plain = render_heatmaps(decoded.frames[0], geometry, [], Legend("", ()))
        plain = plain[: round(mask.shape[0] * 1024 / mask.shape[1])]
        x, y = _marker_centre(png, plain)
        # The picture shows the model's own map: the marker sits where that map, mapped onto the
        # photograph, is at its highest (a plateau where the strongest cell is on the border).
        _, cams = engine.predict(model_input[None])
        fov = find_fov(decoded.frames[0], engine.card.preprocessing.fov_threshold)
        mapped = retina_heat(cams[0, engine.card.labels.index(shown[0])], geometry, plain.shape[:2], fov)
        assert mapped is not None
        peak = mapped[0]
        around = peak[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
        assert around.max() >= 0.99 * peak.max(), (path.name, (x, y), np.unravel_index(np.argmax(peak), peak.shape))
        crop_side = max(geometry.crop[2] - geometry.crop[0], geometry.crop[3] - geometry.crop[1])
        radius = max(1, round(cell / 2 * crop_side / engine.card.input_size))
        near = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2))
        scale = plain.shape[1] / mask.shape[1]
        hits += int(near[min(mask.shape[0] - 1, int(y / scale)), min(mask.shape[1] - 1, int(x / scale))] > 0)
        judged += 1
        x0, y0, x1, y1 = geometry.crop
        chance.append(float(near[y0:y1, x0:x1].mean()))

    assert judged >= 5, f"only {judged} SCs show a planted finding; the model finds too few to judge"
    baseline = float(np.mean(chance))
    assert hits / judged >= 2 * baseline, f"{hits} of {judged} heatmaps over the lesion; chance {baseline:.2f}"


def test_outputs_are_handed_over_as_part10_files_ready_to_write(
    engine: Engine, photos: list[NDArray[np.uint8]], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    write_dicom(photos[0], tmp_path / "a.dcm", DicomIdentity.synthetic(0))

    (result,) = _score(engine, make_settings(outputs=["sc", "sr", "pm"]), [tmp_path / "a.dcm"])

    assert isinstance(result, ScoreResult)
    # In build order: the SR last, as it refers to what was built before it; a map per label mapped.
    maps = len([o for o in result.built if o.kind == "pm"])
    assert [o.kind for o in result.built] == ["sc", *["pm"] * maps, "sr"] and maps >= 1
    assert list(result.encoded) == list(result.outputs) == list(result.output_uids) == [o.key for o in result.built]
    for kind, data in result.encoded.items():
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(data)  # as the worker and the CLI write them: no second serialisation
        reread = pydicom.dcmread(path)
        assert data[128:132] == b"DICM" and reread.file_meta.MediaStorageSOPInstanceUID == reread.SOPInstanceUID
        assert reread.SOPInstanceUID == result.output_uids[kind] == result.outputs[kind].SOPInstanceUID
        assert reread.PatientID == DicomIdentity.synthetic(0).patient_id
    assert np.array_equal(pydicom.dcmread(tmp_path / "sc.dcm").pixel_array, result.outputs["sc"].pixel_array)
    report = hd.sr.srread(tmp_path / "sr.dcm")
    group, *map_groups = report.content.get_image_measurement_groups()  # the frame's, then a group per map
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert len(measured) == len(LABELS) and len(map_groups) == maps
    assert sorted(measured.values()) == sorted(round(p, 6) for p in result.probabilities.values())


def test_warmup_scores_a_synthetic_photograph_and_writes_nothing(
    random_onnx_model_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    with Pipeline(Engine(random_onnx_model_path, providers="cpu"), settings) as pipeline:
        assert pipeline.warmup() > 0.0
    assert not settings.data_dir.exists() or not any(settings.data_dir.rglob("*.dcm"))


def test_warmup_does_not_load_the_development_generator(random_onnx_model_path: Path, tmp_path: Path) -> None:
    """The serving path stays free of development tools (the photograph ships as package data)."""
    code = (
        "import sys\n"
        "from retinagate.engine import Engine\n"
        "from retinagate.pipeline import Pipeline\n"
        "from retinagate.settings import load_settings\n"
        f"settings = load_settings(environ={{'RETINAGATE_DATA_DIR': {str(tmp_path)!r}}})\n"
        f"with Pipeline(Engine({str(random_onnx_model_path)!r}, providers='cpu'), settings) as pipeline:\n"
        "    pipeline.warmup()\n"
        "print(sorted(m for m in sys.modules if m.startswith('retinagate.synth') or m.startswith('retinagate.demo')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout


# What is marked: findings at or over their calibrated threshold, heat on the retina only.


@pytest.fixture
def spy_render(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the pipeline asks the SC renderer to draw: the heatmaps and the legend, per picture."""
    from retinagate.outputs import render_heatmaps

    calls: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> NDArray[np.uint8]:
        calls.append({"heatmaps": list(args[2]), "lines": list(args[3].lines), "header": args[3].header})
        return render_heatmaps(*args, **kwargs)

    monkeypatch.setattr("retinagate.outputs.sc.render_heatmaps", spy)
    return calls


def _probabilities(engine: Engine, path: Path, settings: Settings) -> dict[str, float]:
    (result,) = _score(engine, settings, [path])
    assert isinstance(result, ScoreResult)
    return result.probabilities


def test_with_nothing_over_threshold_the_sc_says_so_and_shows_the_unmarked_disease_risk_map_and_the_cli_agrees(
    random_onnx_model_path: Path,
    worker_model_variant: Callable[..., Path],
    photos: list[NDArray[np.uint8]],
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    spy_render: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from retinagate.cli import main

    path = tmp_path / "a.dcm"
    write_dicom(photos[2], path, DicomIdentity.synthetic(0))
    strict = worker_model_variant(random_onnx_model_path, "strict", {name: 1.0 for name in LABELS})
    engine = Engine(strict, providers="cpu")

    (result,) = _score(engine, make_settings(outputs=["sc", "sr", "pm"]), [path])

    assert isinstance(result, ScoreResult) and result.status == "scored" and result.findings == []
    (call,) = spy_render
    (heatmap,) = call["heatmaps"]
    assert heatmap.label == DISEASE_RISK and not heatmap.marked  # shown for context, not as a finding
    assert call["header"].startswith("Right eye   accession SYNA")  # which eye and study, no patient
    said = summary_lines(result.probabilities, dict.fromkeys(LABELS, 1.0))
    assert said[0] == NO_FINDING and call["lines"][: len(said)] == said
    assert call["lines"][len(said)] == "Map: Disease risk (any abnormality) (where the model looked; not a finding)"
    description = result.outputs["sc"].DerivationDescription
    assert description.startswith(f"Grad-CAM heatmaps of the top findings ({'; '.join(said)})")
    (tmp_path / "sr.dcm").write_bytes(result.encoded["sr"])
    group = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()[0]
    (text,) = [i.value for i in group[0].ContentSequence if i.name.value == "121111"]  # DCM Summary
    assert text == "; ".join(said)  # the SR says what the SC says
    assert [o.label for o in result.built if o.kind == "pm"] == [DISEASE_RISK]  # no finding: the risk's map
    pm = result.outputs[f"pm.{DISEASE_RISK}"]
    assert "Grad-CAM of Disease_Risk" in pm.ImageComments and "not a finding" in pm.ImageComments

    for key in [k for k in os.environ if k.startswith("RETINAGATE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    capsys.readouterr()
    assert main(["score", str(path), "--model", str(strict), "--out", str(tmp_path / "out")]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(path))]
    assert f" {'; '.join(said)} " in row  # and so does the CLI


def test_a_probability_just_under_its_threshold_is_not_a_finding_and_no_text_says_it_is(
    random_onnx_model_path: Path,
    worker_model_variant: Callable[..., Path],
    photos: list[NDArray[np.uint8]],
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    spy_render: list[dict[str, Any]],
) -> None:
    path = tmp_path / "a.dcm"
    write_dicom(photos[0], path, DicomIdentity.synthetic(0))
    settings = make_settings(outputs=["sc", "pm"])
    probabilities = _probabilities(Engine(random_onnx_model_path, providers="cpu"), path, settings)
    diseases = sorted((p, n) for n, p in probabilities.items() if n != DISEASE_RISK)
    (p_under, under), (p_over, over) = diseases[-1], diseases[0]  # the most probable is kept under
    thresholds = {name: 1.0 for name in LABELS}
    # Thresholds a hair's breadth away: two decimals would print both probabilities as the thresholds.
    thresholds[under] = p_under + 0.0002
    thresholds[over] = p_over - 0.0002
    engine = Engine(worker_model_variant(random_onnx_model_path, "close", thresholds), providers="cpu")
    spy_render.clear()

    (result,) = _score(engine, settings, [path])

    assert isinstance(result, ScoreResult) and result.findings == [over]
    (call,) = spy_render
    assert [h.label for h in call["heatmaps"]] == [over] and call["heatmaps"][0].marked
    findings_line = call["lines"][0]
    assert findings_line == f"Finding: {finding_text(over, result.probabilities[over], thresholds[over])}"
    assert not any(f"({under})" in line for line in call["lines"])
    printed = float(findings_line.split(f"({over}) ")[1].split(",")[0])
    assert printed >= thresholds[over]
    # The map of the finding only, not of the more probable label under its threshold.
    assert [o.label for o in result.built if o.kind == "pm"] == [over]
    pm = result.outputs[f"pm.{over}"]
    assert f"Grad-CAM of {over} " in pm.ImageComments and "a finding: at or over" in pm.ImageComments


def test_the_parametric_map_is_zero_off_the_retina(
    engine: Engine, photos: list[NDArray[np.uint8]], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    write_dicom(photos[1], tmp_path / "a.dcm", DicomIdentity.synthetic(0), transfer_syntax="explicit_little")

    (result,) = _score(engine, make_settings(outputs=["pm"]), [tmp_path / "a.dcm"])

    assert isinstance(result, ScoreResult)
    pm = result.built[0].read()  # the map of the most probable finding (or of Disease_Risk)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    values = pm.pixel_array * mapping.RealWorldValueSlope
    outside = find_fov(photos[1]).coverage() == 0.0
    cells = outside.reshape(pm.Rows, 2, pm.Columns, 2).all(axis=(1, 3))  # map pixels wholly off the retina
    assert values[cells].max() == 0.0 and values.max() > 0.5


def test_an_instance_nested_too_deep_fails_for_good_with_its_reason_and_the_batch_goes_on(
    engine: Engine,
    make_settings: Callable[..., Settings],
    photos: list[NDArray[np.uint8]],
    tmp_path: Path,
    nested_sequences: Callable[[int], bytes],
) -> None:
    """What the worker records for issue 14's 600-deep file: a failed instance with a reason."""
    good = tmp_path / "good.dcm"
    write_dicom(photos[0], good, DicomIdentity.synthetic(0))
    data = good.read_bytes()
    start = 144 + int.from_bytes(data[140:144], "little")
    nested = tmp_path / "nested.dcm"
    nested.write_bytes(data[:start] + nested_sequences(600) + data[start:])

    failure, result = _score(engine, make_settings(), [nested, good])

    assert isinstance(failure, ScoreFailure) and failure.permanent
    assert "nested more than 32 levels deep" in failure.error
    assert isinstance(result, ScoreResult)


#: A two-eye study: two photographs of the right eye (instances 1 and 2 of its series) and one of the left.
TWO_EYES: dict[str, tuple[str, int]] = {"r1": ("R", 0), "r2": ("R", 1), "l1": ("L", 0)}

#: Lossy encodings: a photograph in one of them says so, and so do the maps made from it.
LOSSY_SYNTAXES = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLSNearLossless, uid.JPEG2000}

#: Transfer syntaxes of (r1, r2, l1), one study per row: together every syntax the gateway accepts.
STUDY_SYNTAXES = [
    pytest.param((uid.JPEGBaseline8Bit, uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian), id="baseline-native"),
    pytest.param((uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1), id="extended-lossless-sv1"),
    pytest.param((uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.RLELossless), id="jpegls-nearlossless-rle"),
    pytest.param((uid.JPEG2000Lossless, uid.JPEG2000, uid.DeflatedExplicitVRLittleEndian), id="j2k-deflated"),
]  # fmt: skip


def test_the_two_eye_studies_cover_every_transfer_syntax_the_gateway_accepts() -> None:
    covered = [syntax for param in STUDY_SYNTAXES for syntax in param.values[0]]  # type: ignore[union-attr]
    assert sorted(covered) == sorted(TRANSFER_SYNTAXES)


def _score_two_eyes(
    engine: Engine,
    photos: list[NDArray[np.uint8]],
    tmp_path: Path,
    settings: Settings,
    syntaxes: tuple[str, str, str] = (uid.JPEGBaseline8Bit, uid.ExplicitVRLittleEndian, uid.JPEGBaseline8Bit),
    transcode: Callable[[Path, str, Path], Path] | None = None,
) -> list[ScoreResult]:
    """The study of :data:`TWO_EYES` written in ``tmp_path`` in ``syntaxes`` (``transcode``: the fixture,
    for any but JPEG Baseline and Explicit VR Little Endian) and scored with outputs sc, sr and pm."""
    for photo, (name, (eye, key)), syntax in zip(photos, TWO_EYES.items(), syntaxes, strict=True):
        identity = DicomIdentity.synthetic(0, eye, instance=key)
        path = tmp_path / f"{name}.dcm"
        if syntax in (uid.JPEGBaseline8Bit, uid.ExplicitVRLittleEndian):
            write_dicom(photo, path, identity, transfer_syntax=syntax)
        else:
            assert transcode is not None, f"{syntax} needs the transcode fixture"
            native = tmp_path / f"{name}.native.dcm"
            write_dicom(photo, native, identity, transfer_syntax="explicit_little")
            transcode(native, syntax, path)
    results = _score(engine, settings.model_copy(update={"outputs": ["sc", "sr", "pm"]}),
                     [tmp_path / f"{n}.dcm" for n in TWO_EYES])  # fmt: skip
    scored = [r for r in results if isinstance(r, ScoreResult)]
    assert len(scored) == len(TWO_EYES)
    return scored


def _inflated(path: Path, transcode: Callable[[Path, str, Path], Path]) -> Path:
    """``path``, or for a Deflated Explicit VR Little Endian file an Explicit VR Little Endian copy of it:
    dicom3tools reads no deflated dataset ("Implicit VR encoding even though supposed to be explicit")."""
    if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID != uid.DeflatedExplicitVRLittleEndian:
        return path
    return transcode(path, uid.ExplicitVRLittleEndian, path.with_suffix(".inflated.dcm"))


@pytest.mark.interop
@pytest.mark.parametrize("syntaxes", STUDY_SYNTAXES)
def test_a_two_eye_study_gets_a_series_per_eye_and_kind_that_dciodvfy_and_dcentvfy_accept(
    syntaxes: tuple[str, str, str],
    engine: Engine,
    photos: list[NDArray[np.uint8]],
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    dciodvfy: Callable[[object], list[str]],
    dcentvfy: Callable[[list[Path]], list[str]],
    transcode: Callable[[Path, str, Path], Path],
) -> None:
    eyes = TWO_EYES
    results = _score_two_eyes(engine, photos, tmp_path, make_settings(), syntaxes, transcode)

    files: list[Path] = []
    series: dict[tuple[str, str], list[pydicom.Dataset]] = {}
    for result in results:
        assert isinstance(result, ScoreResult)
        name = Path(result.source).stem
        for output in result.built:
            path = tmp_path / f"{name}.{output.key}.dcm"
            path.write_bytes(output.data)
            files.append(path)
            series.setdefault((output.kind, eyes[name][0]), []).append(pydicom.dcmread(path, stop_before_pixels=True))
    assert {path.name: errors for path in files if (errors := dciodvfy(path))} == {}
    assert dcentvfy([*(_inflated(tmp_path / f"{n}.dcm", transcode) for n in eyes), *files]) == []
    assert sorted(series) == sorted((kind, eye) for kind in ("sc", "sr", "pm") for eye in ("R", "L"))
    assert len({members[0].SeriesInstanceUID for members in series.values()}) == 6
    for (kind, eye), members in series.items():
        assert len({m.SeriesInstanceUID for m in members}) == 1
        numbers = sorted(m.InstanceNumber for m in members)
        if kind == "pm":  # the source's number times 100 plus the map's rank: 101, 102, ... then 201, ...
            numbers = sorted({n // 100 for n in numbers})
            assert len({m.InstanceNumber for m in members}) == len(members)
        assert numbers == ([1, 2] if eye == "R" else [1])
        assert "unverified AI" in members[0].SeriesDescription and len(members[0].SeriesDescription) <= 64
        if kind == "sc":
            assert {m.Laterality for m in members} == {eye}
        if kind == "pm":
            assert len({m.FrameOfReferenceUID for m in members}) == 1
    assert series["pm", "R"][0].FrameOfReferenceUID != series["pm", "L"][0].FrameOfReferenceUID
    flags = {Path(r.source).stem: pydicom.dcmread(r.source, stop_before_pixels=True) for r in results}
    lossy = {name: ds.get("LossyImageCompression") == "01" for name, ds in flags.items()}
    assert any(lossy.values()) == any(s in LOSSY_SYNTAXES for s in syntaxes)
    for (kind, eye), members in series.items():
        if kind == "pm":  # once lossy, always flagged; a lossless source gives a lossless map
            assert {m.LossyImageCompression == "01" for m in members} == {lossy[n] for n in eyes if eyes[n][0] == eye}


@pytest.mark.interop
@pytest.mark.parametrize("syntaxes", STUDY_SYNTAXES)
def test_each_eyes_sr_gives_a_reader_its_laterality_measurements_finding_codes_and_maps(
    syntaxes: tuple[str, str, str],
    engine: Engine,
    photos: list[NDArray[np.uint8]],
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    dsrdump: Callable[[Path], list[str]],
    transcode: Callable[[Path, str, Path], Path],
) -> None:
    """What an IHE AIR reader needs of each eye's SR, read back with highdicom, in every accepted transfer
    syntax; dsrdump parses each."""
    from pydicom.sr.codedict import codes

    from retinagate.outputs.sr import HEATMAP, label_concept

    results = _score_two_eyes(engine, photos, tmp_path, make_settings(), syntaxes, transcode)

    side = {"R": codes.SCT.Right, "L": codes.SCT.Left}
    every_label = {(c.value, c.scheme_designator) for c in map(label_concept, LABELS)}
    assert ("57190000", "SCT") in every_label  # Myopia, as DICOM PS3.16 CID 4238 codes it
    for result in results:
        eye = TWO_EYES[Path(result.source).stem][0]
        (sr,) = [o for o in result.built if o.kind == "sr"]
        maps = {o.sop_instance_uid: o.label for o in result.built if o.kind == "pm"}
        path = tmp_path / f"{Path(result.source).stem}.sr.dcm"
        path.write_bytes(sr.data)
        assert dsrdump(path) == [], result.source

        frame, *map_groups = hd.sr.srread(path).content.get_image_measurement_groups()

        assert [s.laterality for s in frame.finding_sites] == [side[eye]]
        assert len(frame.get_measurements()) == len(LABELS) == 29
        assert {(e.name.value, e.name.scheme_designator) for e in frame.get_qualitative_evaluations()} == every_label
        referenced = {}
        for group in map_groups:
            (heat,) = [i for i in group[0].ContentSequence if i.ValueType == "IMAGE" and i.name == HEATMAP]
            label = maps[heat.referenced_sop_instance_uid]
            referenced[heat.referenced_sop_instance_uid] = label
            assert group.finding_type == label_concept(label)
            assert [s.laterality for s in group.finding_sites] == [side[eye]]
        assert referenced == maps and maps
        ds = pydicom.dcmread(path)
        (library,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
        listed = {
            entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: {
                d.ConceptCodeSequence[0].CodeValue
                for d in entry.ContentSequence
                if d.ConceptNameCodeSequence[0].CodeValue == "111027"  # Image Laterality
            }
            for group in library.ContentSequence
            for entry in group.ContentSequence
        }
        pictures = {result.sop_instance_uid, *(o.sop_instance_uid for o in result.built if o.kind in ("sc", "pm"))}
        assert listed == {sop: {side[eye].value} for sop in pictures}


@pytest.mark.interop
def test_orthanc_stores_the_sc_and_every_map_and_previews_each_as_a_picture_that_is_not_blank(
    engine: Engine, photos: list[NDArray[np.uint8]], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    import shutil

    from retinagate.destinations import Connection
    from retinagate.destinations.dimse import DimseDestination
    from retinagate.pacs import Orthanc

    if shutil.which("Orthanc") is None and shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin") is None:
        pytest.skip("Orthanc is not installed")
    write_dicom(photos[0], tmp_path / "a.dcm", DicomIdentity.synthetic(0))
    (result,) = _score(engine, make_settings(outputs=["sc", "sr", "pm"]), [tmp_path / "a.dcm"])
    assert isinstance(result, ScoreResult)
    files = []
    for n, output in enumerate(result.built):
        (tmp_path / f"{output.key}.dcm").write_bytes(output.data)
        files.append((n, tmp_path / f"{output.key}.dcm"))

    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        pacs = DimseDestination(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.port)
        sent = pacs.send(files, Connection("RG"))
        assert {r.verdict for r in sent.values()} == {"delivered"}, sent
        stored = {r.sop_instance_uid for r in orthanc.instances()}
        assert stored == {o.sop_instance_uid for o in result.built}
        for output in result.built:
            if output.kind in ("sc", "pm"):
                preview = np.frombuffer(orthanc.preview(output.sop_instance_uid), np.uint8)
                png = cv2.imdecode(preview, cv2.IMREAD_UNCHANGED)
                assert png is not None and png.max() > png.min(), f"{output.key}: blank preview"
    finally:
        orthanc.kill()
