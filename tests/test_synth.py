"""Synthetic fundus data: RFMiD layout, planted lesions with masks, DICOM photographs, two modes."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from retinagate.cli import main
from retinagate.labels import (
    DISEASE_LABELS,
    LABELS,
    NAMED_DISEASES,
    OTHER,
    OTHER_COLUMNS,
    RFMID_COLUMNS,
    labels_from_rfmid_row,
)
from retinagate.synth import (
    CAMERA_SIZES,
    CSV_NAMES,
    LESION_KINDS,
    LESION_STYLES,
    OP_8BIT_SOP_CLASS,
    SPLITS,
    DicomIdentity,
    Fundus,
    Mode,
    SynthConfig,
    plan_dataset,
    render_fundus,
    write_dataset,
    write_dicom,
)

Eye = Literal["R", "L"]


def read_png(path: Path) -> NDArray[np.uint8]:
    """A PNG as written: (H, W, 3) RGB or (H, W) grey."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert data is not None, path
    pixels = np.asarray(data, dtype=np.uint8)
    return np.asarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), dtype=np.uint8) if pixels.ndim == 3 else pixels


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def render(column: str, seed: int, size: tuple[int, int] = (320, 240), eye: Eye = "R") -> Fundus:
    return render_fundus(np.random.default_rng(seed), size[0], size[1], (column,), eye)


def eye_frame(fovea: Iterable[float], disc: Iterable[float]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Unit vectors of a photograph: temporal (disc towards fovea) and superior (perpendicular, upwards)."""
    temporal = np.asarray(list(fovea), float) - np.asarray(list(disc), float)
    temporal /= np.linalg.norm(temporal)
    superior = np.array([temporal[1], -temporal[0]])
    return temporal, superior if superior[1] < 0 else -superior


def quadrant(point: Iterable[float], fovea: Iterable[float], disc: Iterable[float]) -> tuple[int, int]:
    """(temporal +1 / nasal -1, superior +1 / inferior -1) of a point about the disc and the disc-fovea line."""
    temporal, superior = eye_frame(fovea, disc)
    offset = np.asarray(list(point), float) - np.asarray(list(disc), float)
    return int(np.sign(offset @ temporal)), int(np.sign(offset @ superior))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Twelve hard-mode images (8/2/2) at 320 x 256 with DICOM, written once for the module."""
    out = tmp_path_factory.mktemp("synth")
    summary = write_dataset(out, SynthConfig(n=12, width=320, height=256, seed=3, dicom=True))
    return out, summary


@pytest.fixture(scope="module")
def manifest(dataset: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((dataset[0] / "synth.json").read_text())
    return data


@pytest.fixture(scope="module")
def easy_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Twelve easy-mode images at 320 x 256 and their manifest."""
    out = tmp_path_factory.mktemp("easy")
    write_dataset(out, SynthConfig(n=12, width=320, height=256, seed=3, mode="easy"))
    return out, json.loads((out / "synth.json").read_text())


def test_hard_mode_is_the_default_of_the_config_the_renderer_and_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert SynthConfig().mode == "hard"
    assert render_fundus(np.random.default_rng(0), 160, 120).fovea is not None  # hard mode knows its fovea
    assert render_fundus(np.random.default_rng(0), 160, 120, mode="easy").fovea is None
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    assert main(["synth", str(tmp_path / "out"), "--n", "6", "--size", "128", "96", "--json"]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "out" / "synth.json").read_text())["config"]
    assert config["mode"] == "hard" and config["size_policy"] == "fixed 128x96"


def test_the_same_seed_gives_identical_files_and_another_seed_different_ones(tmp_path: Path) -> None:
    for mode in ("hard", "easy"):
        first, second, other = tmp_path / f"{mode}a", tmp_path / f"{mode}b", tmp_path / f"{mode}c"
        write_dataset(first, SynthConfig(n=6, width=128, height=96, seed=11, dicom=True, mode=mode))
        write_dataset(second, SynthConfig(n=6, width=128, height=96, seed=11, dicom=True, mode=mode))
        write_dataset(other, SynthConfig(n=6, width=128, height=96, seed=12, dicom=True, mode=mode))
        files = tree(first)
        assert files == tree(second)
        changed = tree(other)
        assert files["Training/1.png"] != changed["Training/1.png"]

    modes: tuple[Mode, ...] = ("hard", "easy")
    for mode in modes:
        image_a = render_fundus(np.random.default_rng(4), 200, 150, ("DR", "CWS"), "L", mode=mode).image
        image_b = render_fundus(np.random.default_rng(4), 200, 150, ("DR", "CWS"), "L", mode=mode).image
        image_c = render_fundus(np.random.default_rng(5), 200, 150, ("DR", "CWS"), "L", mode=mode).image
        assert np.array_equal(image_a, image_b)
        assert not np.array_equal(image_a, image_c)


def test_csvs_carry_id_and_the_46_rfmid_columns_and_map_onto_the_29_labels(
    dataset: tuple[Path, dict[str, Any]], manifest: dict[str, Any]
) -> None:
    out, summary = dataset
    planned = {(e["split"], e["id"]): e for e in manifest["images"]}
    for split in SPLITS:
        with (out / CSV_NAMES[split]).open(newline="") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == ["ID", *RFMID_COLUMNS]
            rows = list(reader)
        assert [int(r["ID"]) for r in rows] == list(range(1, summary["splits"][split] + 1))
        for row in rows:
            entry = planned[(split, int(row["ID"]))]
            labels = labels_from_rfmid_row(row)
            present = {LABELS[i] for i in np.flatnonzero(labels)}
            expected = set(entry["labels"]) | ({"Disease_Risk"} if entry["labels"] else set())
            assert present == expected
            assert {c for c in RFMID_COLUMNS[1:] if row[c] == "1"} == set(entry["columns"])
            assert (out / split / f"{row['ID']}.png").is_file()


def test_each_positive_column_has_a_mask_over_its_own_lesions_and_nothing_else(
    dataset: tuple[Path, dict[str, Any]], manifest: dict[str, Any]
) -> None:
    out, _ = dataset
    masks_written = {p.relative_to(out).as_posix() for p in (out / "masks").rglob("*.png")}
    expected = {f"masks/{e['split']}/{e['id']}_{c}.png" for e in manifest["images"] for c in e["columns"]}
    assert masks_written == expected and expected
    for entry in manifest["images"]:
        assert {lesion["column"] for lesion in entry["lesions"]} == set(entry["columns"])
        height, width = read_png(out / entry["image"]).shape[:2]
        ys, xs = np.mgrid[0:height, 0:width]
        (fx, fy), radius = entry["fov"]["centre"], entry["fov"]["diameter"] / 2
        disc_diameter = 2 * entry["optic_disc"]["radius"]
        slack = 0.1 * disc_diameter + 2  # soft edges, blur and JPEG move an outline by a pixel or two
        for column in entry["columns"]:
            mask = read_png(out / f"masks/{entry['split']}/{entry['id']}_{column}.png")
            assert mask.shape == (height, width) and set(np.unique(mask)) == {0, 255}
            on = mask > 0
            assert np.hypot(xs[on] - fx, ys[on] - fy).max() <= radius + 1  # only visible pixels
            lesions = [lesion for lesion in entry["lesions"] if lesion["column"] == column]
            near = np.zeros_like(on)
            for lesion in lesions:
                inside = np.hypot(xs - lesion["centre"][0], ys - lesion["centre"][1]) <= lesion["radius"] + slack
                assert (on & inside).any(), lesion  # every recorded lesion shows in the mask
                near |= inside
            assert not (on & ~near).any(), column  # and the mask holds nothing but those lesions


def test_lesion_sizes_relative_to_the_disc_stay_within_the_documented_ranges() -> None:
    kinds_seen = set()
    for seed, column in enumerate((*NAMED_DISEASES, *OTHER_COLUMNS)):
        fundus = render(column, seed, (480, 360), "R" if seed % 2 else "L")
        disc_diameter = 2 * fundus.disc_radius
        for lesion in fundus.lesions:
            low, high = LESION_KINDS[lesion.kind].size_dd
            size = 2 * lesion.radius / disc_diameter
            assert low - 0.01 <= size <= high + 0.01, (column, lesion.kind, round(size, 3))
            kinds_seen.add(lesion.kind)
    # The core of the size table, from the ophthalmic literature, in disc diameters (DD).
    assert LESION_KINDS["microaneurysm"].size_dd == (1 / 15, 1 / 10)
    assert LESION_KINDS["dot-blot haemorrhage"].size_dd[1] == 1 / 4
    assert LESION_KINDS["flame haemorrhage"].size_dd == (1 / 4, 1 / 2)
    assert LESION_KINDS["hard exudate"].size_dd == (1 / 20, 1 / 6)
    assert LESION_KINDS["cotton-wool spot"].size_dd == (1 / 4, 1 / 2)
    assert LESION_KINDS["druse"].size_dd == (1 / 25, 1 / 6)
    assert LESION_KINDS["macular hole"].size_dd == (1 / 4, 1 / 3)
    assert len(kinds_seen) >= 35


def test_a_fundus_is_seven_to_eight_disc_diameters_across_with_the_disc_2_5_dd_nasal_of_the_fovea() -> None:
    eyes: tuple[tuple[Eye, int], ...] = (("R", 1), ("L", -1))
    for seed in range(6):
        for eye, side in eyes:
            fundus = render_fundus(np.random.default_rng(seed), 400, 300, (), eye)
            disc_diameter = 2 * fundus.disc_radius
            assert 6.7 <= fundus.fov_diameter / disc_diameter <= 8.3
            assert fundus.fovea is not None
            distance = math.dist(fundus.disc_centre, fundus.fovea) / disc_diameter
            assert 2.2 <= distance <= 2.9
            assert side * (fundus.disc_centre[0] - fundus.fovea[0]) > 2.0 * disc_diameter  # nasal side
            assert fundus.disc_centre[1] < fundus.fovea[1] + 0.3 * disc_diameter  # not below the fovea
            ys, xs = np.mgrid[0:300, 0:400]
            disc = np.hypot(xs - fundus.disc_centre[0], ys - fundus.disc_centre[1]) < 0.4 * disc_diameter
            ring = np.hypot(xs - fundus.disc_centre[0], ys - fundus.disc_centre[1])
            around = (ring > 1.5 * disc_diameter) & (ring < 2.5 * disc_diameter) & (fundus.image.max(axis=2) > 0)
            grey = fundus.image.astype(float).mean(axis=2)
            assert np.percentile(grey[disc], 75) > 1.3 * np.median(grey[around])  # the disc, between its vessels


def test_the_optic_disc_sits_on_the_nasal_side_of_each_eye_in_easy_mode() -> None:
    eyes: tuple[tuple[Eye, int], ...] = (("R", 1), ("L", -1))
    for laterality, side in eyes:
        f = render_fundus(np.random.default_rng(9), 400, 300, (), laterality, mode="easy")
        assert side * (f.disc_centre[0] - f.fov_centre[0]) > 0.2 * f.fov_diameter
        ys, xs = np.mgrid[0:300, 0:400]
        disc = np.hypot(xs - f.disc_centre[0], ys - f.disc_centre[1]) < 0.8 * f.disc_radius
        assert np.median(f.image[disc].min(axis=1)) > 120  # yellow-white, unlike the orange-red fundus
        assert np.median(f.image[~disc & (f.image.max(axis=2) > 0)].min(axis=1)) < 80
        assert f.image[2, 2].max() == 0  # black frame


def test_each_label_turns_up_at_different_places_in_different_photographs() -> None:
    for column in DISEASE_LABELS:
        places = []
        for seed in range(4):
            fundus = render(column, 100 + seed, (256, 192), "R" if seed % 2 else "L")
            ys, xs = np.nonzero(fundus.masks[column])
            mirror = 1 if seed % 2 else -1  # measure towards the disc for both eyes
            centre = np.array(fundus.fov_centre)
            places.append((np.array([xs.mean(), ys.mean()]) - centre) * [mirror, 1] / fundus.fov_diameter)
        spread = max(math.dist(a, b) for a, b in itertools.combinations(places, 2))
        assert spread > 0.04, column  # more than a tenth of a disc diameter... in FOV diameters
    # Easy mode, by contrast, plants each label at its own fixed slot.
    easy = [render_fundus(np.random.default_rng(s), 256, 192, ("DR",), mode="easy").lesions[0].centre for s in range(4)]
    assert max(math.dist(a, b) for a, b in itertools.combinations(easy, 2)) < 0.04 * 256


def test_lesions_scatter_over_the_fundus_rather_than_sit_on_a_slot() -> None:
    for column in ("DR", "DN", "CRS", "BRVO", "EDN", "LS", "AH", "RP", "HR"):
        fundus = render(column, 7, (480, 360))
        assert fundus.fovea is not None
        centres = [lesion.centre for lesion in fundus.lesions]
        if len(centres) >= 2:  # many lesions spread over more than a disc diameter
            spread = max(math.dist(a, b) for a, b in itertools.combinations(centres, 2))
            assert spread > 2 * fundus.disc_radius, column


def test_conditions_whose_lesions_look_alike_share_their_colour() -> None:
    def colours(column: str, kind: str, seeds: range = range(8)) -> set[str]:
        return {lesion.colour for s in seeds for lesion in render(column, s).lesions if lesion.kind == kind}

    # Blood is blood: DR, both vein occlusions and retinitis bleed in the same red.
    for column in ("DR", "BRVO", "CRVO", "RS"):
        assert colours(column, "dot-blot haemorrhage") == {"haemorrhage"}, column
    assert colours("DR", "hard exudate") == colours("EDN", "hard exudate") == {"exudate"}
    assert colours("BRVO", "cotton-wool spot") == colours("CRVO", "cotton-wool spot") == {"cotton-wool"}

    def darkening(column: str) -> NDArray[np.float64]:
        """Mean colour at blot haemorrhage centres over the fundus just around them, per channel."""
        ratios = []
        for seed in range(6):
            fundus = render(column, seed, (640, 480))
            image = fundus.image.astype(float)
            for lesion in fundus.lesions:
                if lesion.kind == "dot-blot haemorrhage" and lesion.radius >= 4:
                    x, y, reach = round(lesion.centre[0]), round(lesion.centre[1]), round(lesion.radius) + 8
                    window = image[y - reach : y + reach + 1, x - reach : x + reach + 1]
                    ys, xs = np.mgrid[-reach : reach + 1, -reach : reach + 1]
                    distance = np.hypot(xs, ys)[: window.shape[0], : window.shape[1]]
                    ring = window[(distance > lesion.radius + 3) & (distance < lesion.radius + 8)]
                    centre = image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
                    ratios.append(centre / np.median(ring, axis=0))
        assert len(ratios) >= 5, column
        return np.asarray(np.mean(ratios, axis=0))

    dr, brvo = darkening("DR"), darkening("BRVO")
    assert (dr < 0.85).all() and dr[1] < dr[0]  # darker, and redder: green drops most
    assert np.abs(dr - brvo).max() < 0.12  # the same red in both


def test_a_macular_hole_is_centred_exactly_on_the_fovea() -> None:
    for seed in range(5):
        fundus = render("MHL", seed, (480, 360), "R" if seed % 2 else "L")
        assert fundus.fovea is not None
        (hole,) = [lesion for lesion in fundus.lesions if lesion.kind == "macular hole"]
        assert math.dist(hole.centre, fundus.fovea) < 0.5
        ys, xs = np.nonzero(fundus.masks["MHL"])
        assert math.dist((xs.mean(), ys.mean()), fundus.fovea) < 1.5


def test_brvo_bleeds_into_one_quadrant_while_crvo_bleeds_into_all_four() -> None:
    for seed in range(5):
        for column, expected in (("BRVO", 1), ("CRVO", 4)):
            fundus = render(column, seed, (480, 360), "R" if seed % 2 else "L")
            assert fundus.fovea is not None
            quadrants = {
                quadrant(lesion.centre, fundus.fovea, fundus.disc_centre)
                for lesion in fundus.lesions
                if lesion.colour == "haemorrhage"
            }
            assert len(quadrants) == expected, (column, seed, quadrants)
            if column == "BRVO":
                assert quadrants <= {(1, 1), (1, -1)}  # a temporal branch vein drains it


def test_every_disease_output_has_positives_in_every_split_for_300_images() -> None:
    for mode in ("hard", "easy"):
        plans = plan_dataset(SynthConfig(n=300, mode=mode))
        counts: dict[str, dict[str, int]] = {split: defaultdict(int) for split in SPLITS}
        for plan in plans:
            for label in plan.labels:
                counts[plan.split][label] += 1
        assert min(counts["Training"][label] for label in DISEASE_LABELS) >= 3
        for split in ("Evaluation", "Test"):
            assert all(counts[split][label] >= 1 for label in DISEASE_LABELS), dict(counts[split])
        healthy = sum(not plan.columns for plan in plans) / len(plans)
        assert 0.25 <= healthy <= 0.35
        assert all(1 <= len(plan.columns) <= 3 for plan in plans if plan.columns)
        others = {c for plan in plans for c in plan.columns if c in OTHER_COLUMNS}
        assert len(others) >= 12  # OTHER is planted through the 18 rare columns in turn


def test_hard_mode_never_draws_two_conditions_over_the_same_structure() -> None:
    exclusive = (
        {"ODE", "AION", "CRVO", "ODP", "RP", "ODC"},
        {"MHL", "MS", "CSR", "ARMD", "PT", "ERM", "DN"},
        {"BRVO", "CRVO"},
    )
    plans = plan_dataset(SynthConfig(n=600, seed=5))
    assert sum(len(plan.columns) >= 2 for plan in plans) > 150
    for plan in plans:
        for group in exclusive:
            assert len(group & set(plan.columns)) <= 1, plan.columns


def test_the_size_option_fixes_the_size_and_without_it_camera_sizes_vary() -> None:
    plans = plan_dataset(SynthConfig(n=60))
    mixed = SynthConfig(n=60)
    sizes = [mixed.image_size(plan.split, plan.image_id) for plan in plans]
    assert set(sizes) <= set(CAMERA_SIZES) and len(set(sizes)) >= 5
    assert any(w == h for w, h in sizes) and (640, 480) in sizes and (2048, 1536) in sizes
    assert sizes == [mixed.image_size(plan.split, plan.image_id) for plan in plans]  # per seed, fixed
    fixed = SynthConfig(n=60, width=640, height=480)
    assert {fixed.image_size(plan.split, plan.image_id) for plan in plans} == {(640, 480)}
    assert fixed.size_policy == "fixed 640x480" and mixed.size_policy.startswith("mixed camera sizes: 640x480")
    assert SynthConfig(mode="easy").image_size("Training", 1) == (512, 384)


def test_photographs_vary_like_cameras_do() -> None:
    fundi = [render_fundus(np.random.default_rng(seed), 320, 240) for seed in range(24)]
    assert any(f.fov_diameter > 240 for f in fundi)  # clipped top and bottom, like many cameras
    assert any(f.fov_diameter < 240 for f in fundi)
    inside = [f.image[f.image.max(axis=2) > 0].astype(float) for f in fundi]
    brightness = [float(pixels.mean()) for pixels in inside]
    assert max(brightness) - min(brightness) > 20  # exposure, pigmentation
    redness = [float((pixels[:, 0] / (pixels.sum(axis=1) + 1)).mean()) for pixels in inside]
    assert max(redness) - min(redness) > 0.03  # white balance
    discs = [f.disc_radius / f.fov_diameter for f in fundi]
    assert max(discs) / min(discs) > 1.1  # disc size


def test_healthy_photographs_carry_no_masks_and_no_lesions() -> None:
    fundus = render_fundus(np.random.default_rng(3), 256, 192)
    assert fundus.masks == {} and fundus.lesions == ()


def test_in_easy_mode_each_positive_column_has_a_mask_on_its_visible_sticker(
    easy_dataset: tuple[Path, dict[str, Any]],
) -> None:
    out, manifest = easy_dataset
    masks_written = {p.relative_to(out).as_posix() for p in (out / "masks").rglob("*.png")}
    masks_listed = set()
    lesions = 0
    for entry in manifest["images"]:
        assert [lesion["column"] for lesion in entry["lesions"]] == entry["columns"]
        image = read_png(out / entry["image"]).astype(float)
        for lesion in entry["lesions"]:
            masks_listed.add(lesion["mask"])
            mask = read_png(out / lesion["mask"])
            assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
            ys, xs = np.nonzero(mask)
            assert math.dist((xs.mean(), ys.mean()), lesion["centre"]) < 1.0
            assert len(xs) == pytest.approx(math.pi * lesion["radius"] ** 2, rel=0.1)
            # The lesion's colour is inside the mask and stands out from the fundus just outside it.
            ring = cv2.dilate(mask, np.ones((9, 9), np.uint8)) - mask
            style = np.array(LESION_STYLES[lesion["label"]].rgb, float)
            inside = image[mask > 0]
            assert np.abs(inside - style).sum(axis=1).min() < 150
            assert np.abs(inside - image[ring > 0].mean(axis=0)).sum(axis=1).max() > 120
            lesions += 1
    assert lesions > 0
    assert masks_written == masks_listed
    assert manifest["config"]["mode"] == "easy" and "lesion_styles" in manifest


def test_easy_lesion_styles_give_each_disease_output_its_own_look_and_place() -> None:
    assert set(LESION_STYLES) == set(DISEASE_LABELS)
    looks = {(style.colour, style.shape) for style in LESION_STYLES.values()}
    assert len(looks) == len(DISEASE_LABELS)
    for style in LESION_STYLES.values():
        assert math.hypot(*style.slot) <= 0.37


def test_the_synth_command_writes_what_it_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    out = tmp_path / "synth"
    assert main(["synth", str(out), "--n", "12", "--size", "256", "192", "--dicom", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 12
    assert summary["splits"] == {"Training": 8, "Evaluation": 2, "Test": 2}
    for split, count in summary["splits"].items():
        assert sorted(p.name for p in (out / split).glob("*.png")) == sorted(f"{i}.png" for i in range(1, count + 1))
        for i in range(1, count + 1):
            assert read_png(out / split / f"{i}.png").shape == (192, 256, 3)
    dicoms = sorted((out / "dicom").rglob("*.dcm"))
    assert summary["dicom_files"] == len(dicoms) == 12
    assert summary["studies"] == len({p.parent for p in dicoms}) == 6

    easy = tmp_path / "easy"
    assert main(["synth", str(easy), "--n", "6", "--mode", "easy"]) == 0
    assert "easy images (fixed 512x384)" in capsys.readouterr().out
    assert read_png(easy / "Training" / "1.png").shape == (384, 512, 3)

    assert main(["synth", str(tmp_path / "bad"), "--n", "5"]) == 2
    assert "n is 5" in capsys.readouterr().err


def test_dicom_files_decode_like_the_pngs_with_two_eyes_per_study(
    dataset: tuple[Path, dict[str, Any]], manifest: dict[str, Any]
) -> None:
    out, summary = dataset
    studies: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for entry in manifest["images"]:
        ds = pydicom.dcmread(out / entry["dicom"]["path"])
        assert ds.SOPClassUID == OP_8BIT_SOP_CLASS
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        assert ds.LossyImageCompression == "01"
        assert ds.SOPInstanceUID == entry["dicom"]["sop_instance_uid"]
        assert ds.ImageLaterality == entry["laterality"]
        assert str(ds.PatientName).startswith("SYNTH^P") and ds.PatientID.startswith("SYN")
        pixels = ds.pixel_array  # pydicom converts YBR_FULL_422 to RGB
        png = read_png(out / entry["image"])
        assert pixels.shape == png.shape
        assert np.abs(pixels.astype(int) - png).mean() < 2.0
        studies[ds.StudyInstanceUID].append(ds)
    assert len(studies) == summary["studies"] == 6
    for eyes in studies.values():
        assert sorted(ds.ImageLaterality for ds in eyes) == ["L", "R"]
        assert len({ds.PatientID for ds in eyes}) == 1
        assert len({ds.SeriesInstanceUID for ds in eyes}) == 2
        assert len({ds.SOPInstanceUID for ds in eyes}) == 2


def test_write_dicom_stores_exact_pixels_uncompressed_and_grey_images_as_monochrome(tmp_path: Path) -> None:
    image = render_fundus(np.random.default_rng(2), 160, 120, ("MS",), "R").image
    identity = DicomIdentity.synthetic(4, "L", seed=2)
    write_dicom(image, tmp_path / "rgb.dcm", identity, transfer_syntax="explicit_little")
    ds = pydicom.dcmread(tmp_path / "rgb.dcm")
    assert ds.PhotometricInterpretation == "RGB" and ds.LossyImageCompression == "00"
    assert np.array_equal(ds.pixel_array, image)
    grey = np.ascontiguousarray(image[..., 1])
    write_dicom(grey, tmp_path / "grey.dcm", DicomIdentity.synthetic(4, "R", seed=2))
    ds = pydicom.dcmread(tmp_path / "grey.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
    assert np.abs(ds.pixel_array.astype(int) - grey).mean() < 2.0
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_dicom(image, tmp_path / "x.dcm", transfer_syntax="jpeg_2000")
    with pytest.raises(ValueError, match=r"\(120, 160, 4\)"):
        write_dicom(np.zeros((120, 160, 4), np.uint8), tmp_path / "x.dcm")


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.interop
def test_dicom_files_pass_dciodvfy_without_errors(dataset: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (dicom3tools) is not installed; CI is set, so this fails instead of skipping")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    out, _ = dataset
    files = sorted((out / "dicom").rglob("*.dcm"))
    image = render_fundus(np.random.default_rng(1), 160, 120, ("DR",), "R").image
    write_dicom(image, tmp_path / "rgb.dcm", transfer_syntax="explicit_little")
    write_dicom(np.ascontiguousarray(image[..., 1]), tmp_path / "grey.dcm")
    files += [tmp_path / "rgb.dcm", tmp_path / "grey.dcm"]
    problems = {p.name: errors for p in files if (errors := dciodvfy_errors(p))}
    assert not problems


def test_bad_settings_are_refused_naming_the_field() -> None:
    for field, value in (("n", 5), ("width", 63), ("height", 8193), ("seed", -1)):
        with pytest.raises(ValueError, match=rf"^{field} is {value}; expected"):
            SynthConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^width and height are 640 and None; give both or neither"):
        SynthConfig(width=640)
    with pytest.raises(ValueError, match=r"^mode is 'medium'; expected one of hard, easy"):
        SynthConfig(mode="medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode is 'medium'"):
        render_fundus(np.random.default_rng(0), 128, 128, mode="medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="columns"):
        render_fundus(np.random.default_rng(0), 128, 128, ("NOPE",), "R")
    with pytest.raises(ValueError, match="twice"):
        render_fundus(np.random.default_rng(0), 128, 128, ("CWS", OTHER), "R")
    with pytest.raises(ValueError, match="laterality"):
        render_fundus(np.random.default_rng(0), 128, 128, (), "X")  # type: ignore[arg-type]
