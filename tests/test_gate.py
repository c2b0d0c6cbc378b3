"""The gradability gate: what it refuses and why, what it lets through, and how the pipeline reports it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from retinagate import gate
from retinagate.engine import Engine
from retinagate.pipeline import Pipeline, ScoreResult
from retinagate.preprocess import find_fov
from retinagate.settings import Settings, SettingsError, load_settings
from retinagate.synth import DicomIdentity, render_fundus, write_dicom

Image = NDArray[np.uint8]


def _photographs(count: int, seed: int, width: int = 640, height: int = 480) -> list[Image]:
    """Normal synthetic photographs: the generator varies the camera (illumination, exposure, white
    balance, defocus, noise, a clipped or notched field of view, JPEG quality) and the eye."""
    rng = np.random.default_rng(seed)
    return [render_fundus(rng, width, height, (), "R" if i % 2 else "L").image for i in range(count)]


@pytest.fixture(scope="module")
def normal() -> list[Image]:
    return _photographs(40, seed=2024)


@pytest.fixture(scope="module")
def few(normal: list[Image]) -> list[Image]:
    return normal[:12]


def _diameter(image: Image) -> int:
    x0, _, x1, _ = find_fov(image).box
    return x1 - x0


def _jpeg(image: Image, quality: int = 90) -> Image:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    decoded = np.asarray(cv2.imdecode(data, cv2.IMREAD_COLOR), dtype=np.uint8)
    return np.asarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def _blurred(image: Image, share: float) -> Image:
    """Gaussian blur with a sigma of ``share`` of the field of view's diameter."""
    return _jpeg(np.asarray(cv2.GaussianBlur(image, (0, 0), share * _diameter(image)), dtype=np.uint8))


def _scaled(image: Image, factor: float) -> Image:
    """Every pixel value times ``factor``, clipped: the photograph exposed that much brighter or darker."""
    return _jpeg(np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8))


def _exposed(image: Image, green: float) -> Image:
    """The photograph exposed so that the retina's mean green level is ``green`` (before clipping).

    Green carries the vessels and most lesions. Heavy over- and under-exposure are defined by where it
    ends up, not by a factor: the generator's normal photographs already span a factor of four in
    brightness, so four times a dark one is a normal exposure.
    """
    fov = find_fov(image).coverage() > 0.5
    return _scaled(image, green / float(image[..., 1][fov].mean()))


def _grey(image: Image) -> Image:
    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return _jpeg(np.dstack([luma, luma, luma]))


def _red_free(image: Image) -> Image:
    """A red-free photograph as cameras store it: the green channel, as a green image."""
    out = np.zeros_like(image)
    out[..., 1] = image[..., 1]
    return _jpeg(out)


def _cropped(image: Image, share: float) -> Image:
    """The photograph with ``share`` of the field of view's width cut off on the left."""
    x0, _, x1, _ = find_fov(image).box
    return _jpeg(np.ascontiguousarray(image[:, x0 + round(share * (x1 - x0)) :]))


def _scene(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image:
    """A natural-looking outdoor scene: sky, textured ground, objects; no dark border, no circle."""
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    image = np.broadcast_to((1 - rows) * np.array([90, 150, 230]) + rows * np.array([200, 220, 240]),
                            (height, width, 3)).copy()  # fmt: skip
    texture = cv2.resize(rng.standard_normal((height // 8, width // 8)).astype(np.float32), (width, height))
    horizon = height // 2 + int(rng.integers(-60, 60))
    image[horizon:] = np.array([70, 120, 50]) + 35 * texture[horizon:, :, None]
    for _ in range(10):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(image, centre, int(rng.integers(10, 70)), colour, -1)
    return _jpeg(np.clip(image, 0, 255).astype(np.uint8))


def _document(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image:
    """A scanned page: dark text on white."""
    image = np.full((height, width, 3), 245, np.uint8)
    for row in range(40, height - 30, 22):
        x = 30
        while x < width - 80:
            letters = int(rng.integers(3, 10))
            cv2.putText(image, "w" * letters, (x, row), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (20, 20, 20), 1)
            x += letters * 11 + 12
    return _jpeg(image)


def _card_on_a_desk(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image:
    """A bright rectangle (a printed card, a screen) on a dark background: a dark border, but no circle."""
    image = np.zeros((height, width, 3), np.uint8)
    left, top = int(rng.integers(40, 120)), int(rng.integers(30, 80))
    cv2.rectangle(image, (left, top), (width - left, height - top), (205, 120, 70), -1)
    return _jpeg(image)


def _reasons(images: list[Image]) -> list[tuple[str, ...]]:
    return [gate.assess(image).reasons for image in images]


# The decode checks, photograph by photograph.


def test_normal_photographs_of_varied_acquisition_are_gradable(normal: list[Image]) -> None:
    verdicts = [gate.assess(image) for image in normal]

    flagged = [v.reasons for v in verdicts if not v.gradable]
    assert len(flagged) <= 0.02 * len(normal), flagged
    assert all(v.status == "scored" for v in verdicts if v.gradable)


def test_mildly_soft_photographs_pass_and_heavily_blurred_ones_are_out_of_focus(few: list[Image]) -> None:
    soft = _reasons([_blurred(image, 0.003) for image in few])
    blurred = _reasons([_blurred(image, 0.015) for image in few])

    assert soft == [()] * len(few)
    assert blurred == [(gate.OUT_OF_FOCUS,)] * len(few)


def test_focus_does_not_depend_on_the_photographs_size(few: list[Image]) -> None:
    image = few[0]
    large = np.asarray(cv2.resize(image, (1920, 1440), interpolation=cv2.INTER_CUBIC), dtype=np.uint8)
    large_blurred = _blurred(large, 0.015)

    small, big = gate.assess(image).measures["sharpness"], gate.assess(_jpeg(large)).measures["sharpness"]
    assert abs(small - big) < 0.15
    assert gate.assess(large_blurred).reasons == (gate.OUT_OF_FOCUS,)


def test_a_greyscale_or_red_free_copy_is_not_a_colour_photograph(few: list[Image]) -> None:
    assert _reasons([_grey(image) for image in few]) == [(gate.NOT_COLOUR,)] * len(few)
    for reasons in _reasons([_red_free(image) for image in few]):
        assert reasons[0] in (gate.NOT_COLOUR, gate.UNDER_EXPOSED)  # green alone is dark, too


def test_heavily_over_and_under_exposed_photographs_are_refused_as_such(few: list[Image]) -> None:
    over = _reasons([_exposed(image, 235.0) for image in few])  # green at the top: red and much of green clip
    under = _reasons([_exposed(image, 10.0) for image in few])  # the vessels' contrast is 1-2 grey levels

    assert over == [(gate.OVER_EXPOSED,)] * len(few)
    assert under == [(gate.UNDER_EXPOSED,)] * len(few)


def test_a_photograph_one_stop_off_is_still_gradable(few: list[Image]) -> None:
    gamma_stop = 2 ** (1 / 2.2)  # one stop of light in gamma-encoded values
    assert _reasons([_scaled(image, gamma_stop) for image in few[:6]]) == [()] * 6
    assert _reasons([_scaled(image, 1 / gamma_stop) for image in few[6:]]) == [()] * 6


def test_a_fundus_cut_off_on_the_left_or_right_has_no_circular_field_of_view(few: list[Image]) -> None:
    assert _reasons([_cropped(image, 0.2) for image in few]) == [(gate.NO_FOV,)] * len(few)
    mirrored = [np.ascontiguousarray(_cropped(image, 0.2)[:, ::-1]) for image in few[:4]]
    assert _reasons(mirrored) == [(gate.NO_FOV,)] * 4


def test_a_field_of_view_clipped_top_and_bottom_or_notched_is_normal(few: list[Image]) -> None:
    rng = np.random.default_rng(5)
    tall = render_fundus(rng, 640, 600).image  # its circle is clipped to 480 rows below
    clipped = np.ascontiguousarray(tall[60:540])
    notched = few[1].copy()
    (cx, cy), radius = _circle_of(notched)
    for angle in (0.3, 2.2):
        point = (round(cx + radius * math.cos(angle)), round(cy + radius * math.sin(angle)))
        cv2.circle(notched, point, round(0.04 * radius * 2), (0, 0, 0), -1)

    assert gate.assess(_jpeg(clipped)).gradable
    verdict = gate.assess(_jpeg(notched))
    assert verdict.gradable, verdict


def _circle_of(image: Image) -> tuple[tuple[float, float], float]:
    x0, y0, x1, y1 = find_fov(image).box
    return ((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0) / 2


def test_images_that_are_not_fundus_photographs_have_no_circular_field_of_view() -> None:
    rng = np.random.default_rng(9)
    others = [make(rng) for make in (_scene, _document, _card_on_a_desk) for _ in range(5)]

    assert _reasons(others) == [(gate.NO_FOV,)] * len(others)


def test_a_black_frame_is_under_exposed_and_measures_are_reported() -> None:
    verdict = gate.assess(np.zeros((480, 640, 3), np.uint8))

    assert verdict.reasons == (gate.UNDER_EXPOSED,) and verdict.status == "ungradable"


def test_the_measures_name_each_check(normal: list[Image]) -> None:
    measures = gate.assess(normal[0]).measures

    assert {"fov_area", "fov_contained", "fov_filled", "fov_side_cut", "fov_visible", "chroma", "red_over_green",
            "sharpness", "level", "clipped_high", "clipped_low"} <= set(measures)  # fmt: skip
    assert all(isinstance(v, float) and math.isfinite(v) for v in measures.values())


# The model's ood_score.


def test_an_ood_score_over_the_threshold_is_a_reason_with_numbers_that_never_read_equal() -> None:
    base = gate.Verdict((), {"level": 90.0})

    assert gate.with_ood(base, 1.9, 2.1).gradable
    assert gate.with_ood(base, 3.24, 2.1).reasons == ("unlike the training photographs (ood 3.2 > 2.1)",)
    assert gate.with_ood(base, 2.14, 2.1).reasons == ("unlike the training photographs (ood 2.14 > 2.10)",)
    assert gate.with_ood(base, float("nan"), 2.1).reasons[0].startswith("unlike the training photographs")
    assert gate.with_ood(base, 5.0, 2.1).measures == {"level": 90.0, "ood_score": 5.0, "ood_threshold": 2.1}
    assert gate.with_ood(base, None, 2.1) is base and gate.with_ood(base, 3.0, None) is base


def test_each_reason_has_a_short_code() -> None:
    reasons = [gate.NO_FOV, gate.NOT_COLOUR, gate.OUT_OF_FOCUS, gate.OVER_EXPOSED, gate.UNDER_EXPOSED]
    codes = [gate.reason_code(r)[0] for r in [*reasons, "unlike the training photographs (ood 3.2 > 2.1)"]]

    assert codes == ["NO-FOV", "NOT-COLOUR", "OUT-OF-FOCUS", "OVER-EXPOSED", "UNDER-EXPOSED", "OUT-OF-DISTRIB"]
    assert all(len(code) <= 16 for code in codes)


# Settings.


def test_limits_fitted_to_a_softer_camera_pass_its_photographs_and_still_refuse_heavy_blur(
    normal: list[Image],
) -> None:
    """A camera (or generator) softer than the synthetic one: the defaults flag a quarter or more of its
    normal photographs; limits fitted to its training photographs pass its other normal photographs,
    and a heavily blurred copy is still out of focus."""
    soft_camera = [_blurred(image, 0.009) for image in normal]
    verdicts = [gate.assess(image) for image in soft_camera]
    limits = gate.fit_limits(verdicts)

    assert sum(not v.gradable for v in verdicts) >= len(normal) // 4
    assert limits.fitted_on["flagged_by_defaults"] == sum(not v.gradable for v in verdicts)
    assert set(limits.fitted_on["moved"]) == {"min_sharpness"}
    assert limits.min_sharpness < gate.MIN_SHARPNESS
    assert limits.model_dump(exclude={"min_sharpness", "fitted_on"}) == gate.DEFAULT_LIMITS.model_dump(
        exclude={"min_sharpness", "fitted_on"}
    )
    held_out = [_blurred(image, 0.009) for image in _photographs(20, seed=77)]
    assert sum(not gate.assess(image, limits=limits).gradable for image in held_out) <= 1
    heavy = [gate.assess(_blurred(image, 0.015), limits=limits).reasons for image in soft_camera[:8]]
    assert heavy == [(gate.OUT_OF_FOCUS,)] * 8


def test_a_tail_of_soft_training_photographs_does_not_let_heavy_blur_through(normal: list[Image]) -> None:
    """A camera (or generator) whose photographs are mostly sharp with a tail of soft ones: the 1 %
    quantile sits in the tail, and 10 % below it blurred copies of its typical photographs would pass.
    The focus limit stays at 0.6 of the median sharpness: its typical photographs pass, and copies
    blurred by 1.2 % of the diameter are refused, some of which the quantile alone would have let through."""
    camera = [_blurred(image, 0.013 if i < 4 else 0.004) for i, image in enumerate(normal)]
    verdicts = [gate.assess(image) for image in camera]
    sharpness = [v.measures["sharpness"] for v in verdicts]
    limits = gate.fit_limits(verdicts)

    moved = limits.fitted_on["moved"]["min_sharpness"]
    quantile_alone = moved["quantile"] * (1 - gate.FIT_MARGIN)
    floor = gate.FIT_FOCUS_FLOOR * np.median(sharpness)
    assert limits.min_sharpness == moved["floor"] == pytest.approx(floor, abs=1e-6)
    assert quantile_alone < limits.min_sharpness < gate.MIN_SHARPNESS
    assert all(gate.assess(image, limits=limits).gradable for image in camera[4:])
    heavy = [gate.assess(_blurred(image, 0.012), limits=limits) for image in camera[4:16]]
    assert [v.reasons for v in heavy] == [(gate.OUT_OF_FOCUS,)] * 12
    assert any(v.measures["sharpness"] >= quantile_alone for v in heavy)


def test_limits_fitted_to_photographs_the_defaults_pass_are_the_defaults(normal: list[Image]) -> None:
    limits = gate.fit_limits(gate.assess(image) for image in normal)
    assert limits.fitted_on["moved"] == {} and limits.fitted_on["photographs"] == len(normal)
    assert limits.model_dump(exclude={"fitted_on"}) == gate.DEFAULT_LIMITS.model_dump(exclude={"fitted_on"})


def test_photographs_without_a_field_of_view_move_no_limit(few: list[Image]) -> None:
    """Black frames among the training photographs are refused whatever the limits; fitted to, they
    would only turn the area check off."""
    black = [np.zeros_like(few[0])] * 4
    limits = gate.fit_limits(gate.assess(image) for image in [*few, *black])
    assert limits.fitted_on["flagged_by_defaults"] == 4 and limits.fitted_on["moved"] == {}


def test_limits_fitted_to_a_darker_camera_still_refuse_an_under_exposed_copy(few: list[Image]) -> None:
    dark_camera = [_scaled(image, 0.4) for image in few]
    limits = gate.fit_limits(gate.assess(image) for image in dark_camera)

    assert limits.min_level < gate.MIN_LEVEL and set(limits.fitted_on["moved"]) == {"min_level"}
    assert all(gate.assess(image, limits=limits).gradable for image in dark_camera)
    under = [gate.assess(_exposed(image, 10.0), limits=limits).reasons for image in dark_camera[:4]]
    assert under == [(gate.UNDER_EXPOSED,)] * 4


def test_the_gate_setting_is_on_by_default_and_anything_but_on_or_off_is_refused() -> None:
    assert load_settings(environ={}).gate == "on"
    assert load_settings(environ={"RETINAGATE_GATE": "off"}).gate == "off"
    with pytest.raises(SettingsError, match="RETINAGATE_GATE"):
        load_settings(environ={"RETINAGATE_GATE": "maybe"})


# Through the pipeline.


@pytest.fixture(scope="module")
def engine(random_onnx_model_path: Path) -> Engine:
    return Engine(random_onnx_model_path, providers="cpu")


@pytest.fixture
def score(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., list[Any]]]:
    pipelines: list[Pipeline] = []

    def run(engine: Any, paths: list[Path], **overrides: Any) -> list[Any]:
        pipeline = Pipeline(engine, make_settings(**overrides))
        pipelines.append(pipeline)
        return pipeline.score_paths(paths)

    yield run
    for pipeline in pipelines:
        pipeline.close()


def _dicom(image: Image, path: Path, index: int = 0) -> Path:
    write_dicom(image, path, DicomIdentity.synthetic(index))
    return path


def test_an_ungradable_photograph_gets_reasons_and_an_sc_and_sr_that_say_why_but_no_findings(
    engine: Engine,
    few: list[Image],
    tmp_path: Path,
    score: Callable[..., list[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from retinagate.outputs import render_heatmaps

    drawn: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Image:
        drawn.append({"findings": list(args[2]), "legend": args[3], **kwargs})
        return render_heatmaps(*args, **kwargs)

    monkeypatch.setattr("retinagate.outputs.sc.render_heatmaps", spy)
    blurred = _dicom(_blurred(few[0], 0.015), tmp_path / "blurred.dcm")

    (result,) = score(engine, [blurred], outputs=["sc", "sr", "pm"])

    assert isinstance(result, ScoreResult)
    assert result.status == "ungradable" and not result.gradable
    assert result.reasons == [gate.OUT_OF_FOCUS]
    assert result.findings == [] and result.probabilities == {}
    assert result.quality["sharpness"] < gate.MIN_SHARPNESS
    summary = result.summary()
    assert summary["status"] == "ungradable" and summary["reasons"] == [gate.OUT_OF_FOCUS]
    assert set(result.outputs) == {"sc", "sr"}  # no map of a photograph that was not graded
    (call,) = drawn
    assert call["findings"] == [] and call["banner"] == "Not graded: out of focus"
    assert call["legend"].lines[0] == "Not graded: out of focus"
    sc = result.outputs["sc"]
    assert sc.DerivationDescription.startswith("Not graded (out of focus); no findings")
    sr = result.outputs["sr"]
    group = _groups(sr)[0]
    concepts = [(item.ValueType, item.ConceptNameCodeSequence[0].CodeValue) for item in group.ContentSequence]
    assert ("CODE", "GRADABILITY") in concepts and ("TEXT", "NOT-GRADED-WHY") in concepts
    assert not any(kind == "NUM" for kind, _ in concepts)  # no probabilities, no findings
    ours = [item for item in group.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue in ("GRADABILITY", "NOT-GRADED-WHY")]  # fmt: skip
    values = [item.TextValue if item.ValueType == "TEXT" else item.ConceptCodeSequence[0].CodeValue for item in ours]
    assert values == ["NOT-GRADED", "OUT-OF-FOCUS", "out of focus"]
    (tmp_path / "sr.dcm").write_bytes(result.encoded["sr"])
    (read,) = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()  # highdicom reads it back
    evaluations = [(e.name.value, e.value.value) for e in read.get_qualitative_evaluations()]
    assert evaluations == [("GRADABILITY", "NOT-GRADED"), ("NOT-GRADED-WHY", "OUT-OF-FOCUS")]
    assert read.get_measurements() == []


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(measurements.ContentSequence)


def test_a_model_without_an_ood_score_still_gates_on_the_decode_checks(
    engine: Engine, few: list[Image], tmp_path: Path, score: Callable[..., list[Any]]
) -> None:
    paths = [_dicom(few[2], tmp_path / "ok.dcm", 1), _dicom(_grey(few[3]), tmp_path / "grey.dcm", 2)]

    good, grey = score(engine, paths)

    assert not engine.has_ood_score
    assert good.status == "scored" and "ood_score" not in good.quality and len(good.probabilities) == 29
    assert grey.status == "ungradable" and grey.reasons == [gate.NOT_COLOUR]


def test_an_ood_score_over_the_cards_threshold_makes_the_photograph_ungradable(
    random_onnx_model_path: Path,
    ood_model_variant: Callable[..., Path],
    few: list[Image],
    tmp_path: Path,
    score: Callable[..., list[Any]],
) -> None:
    path = _dicom(few[4], tmp_path / "eye.dcm")
    strict = Engine(ood_model_variant(random_onnx_model_path, threshold=0.5, scale=0.04), providers="cpu")
    lenient = Engine(ood_model_variant(random_onnx_model_path, threshold=500.0, scale=0.04), providers="cpu")

    (refused,) = score(strict, [path])
    (accepted,) = score(lenient, [path])

    assert refused.status == "ungradable"
    (reason,) = refused.reasons
    assert reason.startswith("unlike the training photographs (ood ") and reason.endswith(" > 0.5)")
    assert refused.quality["ood_score"] > 0.5 and refused.quality["ood_threshold"] == 0.5
    assert accepted.status == "scored" and accepted.quality["ood_score"] == refused.quality["ood_score"]


def test_with_the_gate_off_everything_is_scored(
    engine: Engine, few: list[Image], tmp_path: Path, score: Callable[..., list[Any]]
) -> None:
    (result,) = score(engine, [_dicom(_blurred(few[5], 0.015), tmp_path / "blurred.dcm")], gate="off")

    assert result.status == "scored" and result.reasons == [] and result.quality == {}


def test_a_multi_frame_instance_is_scored_on_its_gradable_frames_and_names_the_others(
    engine: Engine, few: list[Image], tmp_path: Path, score: Callable[..., list[Any]]
) -> None:
    from retinagate.synth import build_dicom

    frames = [few[6], _blurred(few[7], 0.015)]
    ds = build_dicom(frames[0], DicomIdentity.synthetic(3), transfer_syntax="explicit_little")
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(tmp_path / "multi.dcm", enforce_file_format=True)

    (result,) = score(engine, [tmp_path / "multi.dcm"])

    assert result.status == "scored" and result.reasons == ["frame 2: out of focus"]
    assert len(result.frame_probabilities) == 1
    graded, refused = _groups(result.outputs["sr"])
    assert any(item.ValueType == "NUM" for item in graded.ContentSequence)
    assert not any(item.ValueType == "NUM" for item in refused.ContentSequence)


def test_the_pipeline_gates_with_the_limits_in_the_models_card(
    random_onnx_model_path: Path, normal: list[Image], tmp_path: Path, score: Callable[..., list[Any]]
) -> None:
    """A photograph the default limits call out of focus is scored by a model whose card's limits were
    fitted to photographs like it."""
    import onnx

    from export.onnx_export import embed_card

    soft = [_blurred(image, 0.009) for image in normal]
    limits = gate.fit_limits(gate.assess(image) for image in soft)
    image = next(image for image in soft if gate.assess(image).reasons == (gate.OUT_OF_FOCUS,))
    assert gate.assess(image, limits=limits).gradable
    model = onnx.load(str(random_onnx_model_path))
    fitted = Engine(random_onnx_model_path, providers="cpu").card.with_updates(gate=limits.model_dump(mode="json"))
    embed_card(model, fitted)
    onnx.save(model, str(tmp_path / "fitted.onnx"))
    path = _dicom(image, tmp_path / "soft.dcm")

    (default,) = score(Engine(random_onnx_model_path, providers="cpu"), [path], outputs=["sr"])
    (scored,) = score(Engine(tmp_path / "fitted.onnx", providers="cpu"), [path], outputs=["sr"])

    assert default.status == "ungradable" and default.reasons == [gate.OUT_OF_FOCUS]
    assert scored.status == "scored" and scored.probabilities
