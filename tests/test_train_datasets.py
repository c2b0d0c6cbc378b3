"""Finding RFMiD and CSV data, and the preprocessing cache."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from retinagate.card import Preprocessing
from retinagate.labels import LABELS, RFMID_COLUMNS, labels_from_rfmid_row
from retinagate.preprocess import prepare
from train.datasets import (
    DataSourceError,
    MissingDataError,
    cache_split,
    find_rfmid_splits,
    load_splits,
    read_csv_splits,
    read_image,
)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def official_layout(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic data rearranged like the official RFMiD download."""
    root = tmp_path_factory.mktemp("official") / "RFMiD"
    layout = {
        "Training": ("Training_Set/Training_Set", "Training", "RFMiD_Training_Labels.csv"),
        "Evaluation": ("Evaluation_Set/Evaluation_Set", "Validation", "RFMiD_Validation_Labels.csv"),
        "Test": ("Test_Set/Test_Set", "Test", "RFMiD_Testing_Labels.csv"),
    }
    for split, (parent, folder, csv_name) in layout.items():
        target = root / parent / folder
        target.mkdir(parents=True)
        for image in (synth_dataset / split).glob("*.png"):
            shutil.copy2(image, target / image.name)
        shutil.copy(synth_dataset / csv_name, root / parent / csv_name)
    return root


def test_synthetic_layout_loads_three_splits_with_labels_mapped_from_46_columns(synth_dataset: Path) -> None:
    splits = find_rfmid_splits(synth_dataset)
    assert {name: len(s) for name, s in splits.items()} == {"train": 144, "val": 48, "test": 48}
    rows = _rows(synth_dataset / "RFMiD_Validation_Labels.csv")
    val = splits["val"]
    assert val.ids == tuple(r["ID"] for r in rows)
    assert val.paths[0] == (synth_dataset / "Evaluation" / f"{rows[0]['ID']}.png").resolve()
    np.testing.assert_array_equal(val.labels, np.stack([labels_from_rfmid_row(r) for r in rows]))
    assert val.labels.shape == (48, len(LABELS))


def test_official_rfmid_layout_is_found_by_searching(official_layout: Path, synth_dataset: Path) -> None:
    splits = find_rfmid_splits(official_layout)
    reference = find_rfmid_splits(synth_dataset)
    assert splits["val"].paths[0].parent.name == "Validation"
    assert splits["test"].origin.endswith("Test_Set/Test_Set/RFMiD_Testing_Labels.csv")
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(splits[name].labels, reference[name].labels)


def test_missing_image_is_reported_with_the_csv_and_the_file(official_layout: Path, tmp_path: Path) -> None:
    broken = tmp_path / "RFMiD"
    shutil.copytree(official_layout, broken)
    (broken / "Test_Set/Test_Set/Test/3.png").unlink()
    with pytest.raises(MissingDataError, match=r"RFMiD_Testing_Labels\.csv lists 48 images.*3\.png"):
        find_rfmid_splits(broken)


def test_missing_data_folder_and_missing_validation_csv_are_named(synth_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="no such folder"):
        find_rfmid_splits(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(synth_dataset / "RFMiD_Training_Labels.csv", partial)
    with pytest.raises(DataSourceError, match="no RFMiD label CSV for the val split"):
        find_rfmid_splits(partial)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _generic_rows(synth_dataset: Path, with_split: bool) -> tuple[list[str], list[list[Any]]]:
    header = ["image", *LABELS] + (["split"] if with_split else [])
    rows = []
    for folder, split in (("Training", "train"), ("Evaluation", "val")):
        for row in _rows(synth_dataset / f"RFMiD_{'Training' if split == 'train' else 'Validation'}_Labels.csv"):
            labels = labels_from_rfmid_row(row).tolist()
            rows.append([f"{folder}/{row['ID']}", *labels] + ([split] if with_split else []))
    return header, rows


def test_generic_csv_uses_its_split_column_and_paths_without_extension(synth_dataset: Path, tmp_path: Path) -> None:
    header, rows = _generic_rows(synth_dataset, with_split=True)
    splits = read_csv_splits(_write_csv(tmp_path / "labels.csv", header, rows), synth_dataset)
    assert {k: len(v) for k, v in splits.items()} == {"train": 144, "val": 48}
    assert splits["train"].paths[0].suffix == ".png"
    np.testing.assert_array_equal(splits["val"].labels, find_rfmid_splits(synth_dataset)["val"].labels)


def test_generic_csv_without_split_column_is_split_deterministically(synth_dataset: Path, tmp_path: Path) -> None:
    header, rows = _generic_rows(synth_dataset, with_split=False)
    labels_csv = _write_csv(tmp_path / "labels.csv", header, rows)
    first = read_csv_splits(labels_csv, synth_dataset, seed=3, val_fraction=0.25)
    again = read_csv_splits(labels_csv, synth_dataset, seed=3, val_fraction=0.25)
    assert first["val"].ids == again["val"].ids
    assert 0.15 < len(first["val"]) / len(rows) < 0.35
    assert not set(first["val"].ids) & set(first["train"].ids)


def test_generic_csv_with_rfmid_columns_is_mapped(synth_dataset: Path, tmp_path: Path) -> None:
    rows = []
    for row in _rows(synth_dataset / "RFMiD_Training_Labels.csv"):
        rows.append([f"Training/{row['ID']}.png", *[row[c] for c in RFMID_COLUMNS], "train"])
    for row in _rows(synth_dataset / "RFMiD_Validation_Labels.csv"):
        rows.append([f"Evaluation/{row['ID']}.png", *[row[c] for c in RFMID_COLUMNS], "val"])
    labels_csv = _write_csv(tmp_path / "rfmid.csv", ["path", *RFMID_COLUMNS, "split"], rows)
    splits = read_csv_splits(labels_csv, synth_dataset)
    np.testing.assert_array_equal(splits["train"].labels, find_rfmid_splits(synth_dataset)["train"].labels)


def test_generic_csv_missing_label_columns_are_named(synth_dataset: Path, tmp_path: Path) -> None:
    header, rows = _generic_rows(synth_dataset, with_split=True)
    keep = [i for i, name in enumerate(header) if name not in ("ARMD", "OTHER")]
    labels_csv = _write_csv(tmp_path / "bad.csv", [header[i] for i in keep], [[r[i] for i in keep] for r in rows])
    with pytest.raises(DataSourceError, match="missing label columns ARMD, OTHER"):
        read_csv_splits(labels_csv, synth_dataset)
    no_path = _write_csv(tmp_path / "nopath.csv", ["name", *LABELS], [])
    with pytest.raises(DataSourceError, match="no path column; expected one of path, image"):
        read_csv_splits(no_path, synth_dataset)
    with pytest.raises(DataSourceError, match="either --data"):
        load_splits(data=synth_dataset, labels_csv=labels_csv)


@pytest.fixture
def count_decodes(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    calls = 0
    real = cv2.imread

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cv2, "imread", counting)
    return lambda: calls


def test_cache_holds_the_serving_pixels_and_a_second_load_decodes_nothing(
    synth_dataset: Path, tmp_path: Path, count_decodes: Callable[[], int]
) -> None:
    source = find_rfmid_splits(synth_dataset)["val"]
    preprocessing = Preprocessing(input_size=64)
    first = cache_split(source, preprocessing, tmp_path, progress=False)
    assert first.built and count_decodes() == len(source)
    np.testing.assert_array_equal(first.images[7], prepare(read_image(source.paths[7]), preprocessing))
    count_before = count_decodes()
    second = cache_split(source, preprocessing, tmp_path, progress=False)
    assert not second.built and count_decodes() == count_before
    assert second.cache_file == first.cache_file
    np.testing.assert_array_equal(second.images, first.images)


def test_cache_is_rebuilt_when_a_photo_or_the_preprocessing_changes(synth_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data, ignore=shutil.ignore_patterns("dicom", "masks"))
    source = find_rfmid_splits(data)["test"]
    base = cache_split(source, Preprocessing(input_size=64), tmp_path / "cache", progress=False)
    other_size = cache_split(source, Preprocessing(input_size=48), tmp_path / "cache", progress=False)
    assert other_size.built and other_size.cache_file != base.cache_file
    photo = source.paths[0]
    image = cv2.imread(str(photo))
    assert image is not None
    cv2.imwrite(str(photo), 255 - image)
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    edited = cache_split(source, Preprocessing(input_size=64), tmp_path / "cache", progress=False)
    assert edited.built and edited.cache_file != base.cache_file
    assert not np.array_equal(edited.images[0], base.images[0])
    np.testing.assert_array_equal(edited.images[1:], base.images[1:])
