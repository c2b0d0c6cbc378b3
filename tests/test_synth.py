"""Synthetic fundus data: RFMiD layout, planted lesions with masks, DICOM photographs."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from retinagate.cli import main
from retinagate.labels import DISEASE_LABELS, LABELS, OTHER, OTHER_COLUMNS, RFMID_COLUMNS, labels_from_rfmid_row
from retinagate.synth import (
    CSV_NAMES,
    LESION_STYLES,
    OP_8BIT_SOP_CLASS,
    SPLITS,
    DicomIdentity,
    SynthConfig,
    plan_dataset,
    render_fundus,
    write_dataset,
    write_dicom,
)


def read_png(path: Path) -> NDArray[np.uint8]:
    """A PNG as written: (H, W, 3) RGB or (H, W) grey."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert data is not None, path
    pixels = np.asarray(data, dtype=np.uint8)
    return np.asarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), dtype=np.uint8) if pixels.ndim == 3 else pixels


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Twelve images (8/2/2) with DICOM, written once for the module."""
    out = tmp_path_factory.mktemp("synth")
    summary = write_dataset(out, SynthConfig(n=12, width=320, height=256, seed=3, dicom=True))
    return out, summary


@pytest.fixture(scope="module")
def manifest(dataset: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((dataset[0] / "synth.json").read_text())
    return data


def test_the_same_seed_gives_identical_files_and_another_seed_different_ones(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_dataset(first, SynthConfig(n=6, width=128, height=96, seed=11, dicom=True))
    write_dataset(second, SynthConfig(n=6, width=128, height=96, seed=11, dicom=True))
    write_dataset(other, SynthConfig(n=6, width=128, height=96, seed=12, dicom=True))
    files = tree(first)
    assert files == tree(second)
    changed = tree(other)
    assert files["Training/1.png"] != changed["Training/1.png"]
    assert set(files) != set(changed) or any(files[k] != changed[k] for k in files)

    image_a = render_fundus(np.random.default_rng(4), 200, 150, ("DR", "CWS"), "L").image
    image_b = render_fundus(np.random.default_rng(4), 200, 150, ("DR", "CWS"), "L").image
    image_c = render_fundus(np.random.default_rng(5), 200, 150, ("DR", "CWS"), "L").image
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


def test_each_positive_column_has_a_mask_on_its_visible_lesion(
    dataset: tuple[Path, dict[str, Any]], manifest: dict[str, Any]
) -> None:
    out, _ = dataset
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


def test_every_disease_output_has_positives_in_every_split_for_300_images() -> None:
    plans = plan_dataset(SynthConfig(n=300))
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


def test_lesion_styles_give_each_disease_output_its_own_look_and_place() -> None:
    assert set(LESION_STYLES) == set(DISEASE_LABELS)
    looks = {(style.colour, style.shape) for style in LESION_STYLES.values()}
    assert len(looks) == len(DISEASE_LABELS)
    for style in LESION_STYLES.values():
        assert math.hypot(*style.slot) <= 0.37


def test_optic_disc_sits_on_the_nasal_side_of_each_eye() -> None:
    eyes: tuple[tuple[Literal["R", "L"], int], ...] = (("R", 1), ("L", -1))
    for laterality, side in eyes:
        f = render_fundus(np.random.default_rng(9), 400, 300, (), laterality)
        assert side * (f.disc_centre[0] - f.fov_centre[0]) > 0.2 * f.fov_diameter
        ys, xs = np.mgrid[0:300, 0:400]
        disc = np.hypot(xs - f.disc_centre[0], ys - f.disc_centre[1]) < 0.8 * f.disc_radius
        assert np.median(f.image[disc].min(axis=1)) > 120  # yellow-white, unlike the orange-red fundus
        assert np.median(f.image[~disc & (f.image.max(axis=2) > 0)].min(axis=1)) < 80
        assert f.image[2, 2].max() == 0  # black frame


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
        assert read_png(out / split / "1.png").shape == (192, 256, 3)
    dicoms = sorted((out / "dicom").rglob("*.dcm"))
    assert summary["dicom_files"] == len(dicoms) == 12
    assert summary["studies"] == len({p.parent for p in dicoms}) == 6

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
    with pytest.raises(ValueError, match="columns"):
        render_fundus(np.random.default_rng(0), 128, 128, ("NOPE",), "R")
    with pytest.raises(ValueError, match="twice"):
        render_fundus(np.random.default_rng(0), 128, 128, ("CWS", OTHER), "R")
    with pytest.raises(ValueError, match="laterality"):
        render_fundus(np.random.default_rng(0), 128, 128, (), "X")  # type: ignore[arg-type]
