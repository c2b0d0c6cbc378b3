"""Lesion mask files: the layouts found, the folder level that keeps the splits apart, and OTHER."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from retinagate.labels import OTHER
from train.masks import MaskIndex


def _write(path: Path, *points: tuple[int, int], shape: tuple[int, int] = (10, 10)) -> None:
    plane = np.zeros(shape, np.uint8)
    for y, x in points:
        plane[y, x] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), plane)


@pytest.mark.parametrize(
    "layout",
    [
        "Training/7_MH.png",
        "Training/7_mh.tif",
        "Training/7_MH_1.png",
        "Training/7/MH.bmp",
        "Training/7/MH_3.png",
        "Training/MH/7.png",
        "Training_Set/Training/7_MH.png",
    ],
)
def test_each_layout_gives_the_mask_of_its_photograph_and_label(tmp_path: Path, layout: str) -> None:
    _write(tmp_path / "masks" / layout, (2, 3))
    masks = MaskIndex.scan(tmp_path / "masks")
    image = tmp_path / "data" / "Training_Set" / "Training" / "7.png"
    mask = masks.mask(image, "7", "MH")
    assert mask is not None and mask.sum() == 1 and mask[2, 3]
    assert masks.mask(image, "7", "MHL") is None
    assert masks.mask(image.with_name("17.png"), "17", "MH") is None


def test_the_folder_keeps_photographs_of_the_same_id_in_different_splits_apart(tmp_path: Path) -> None:
    """RFMiD numbers every split from 1: Training/1 and Test/1 are different photographs."""
    _write(tmp_path / "Training" / "1_DR.png", (1, 1))
    _write(tmp_path / "Test" / "1_DR.png", (5, 5))
    _write(tmp_path / "1_DR.png", (8, 8))  # no folder: could be either, so it is not used
    masks = MaskIndex.scan(tmp_path)
    train_mask = masks.mask(Path("data/Training/1.png"), "1", "DR")
    test_mask = masks.mask(Path("data/Test/1.png"), "1", "DR")
    assert train_mask is not None and train_mask[1, 1] and train_mask.sum() == 1
    assert test_mask is not None and test_mask[5, 5] and test_mask.sum() == 1
    assert masks.mask(Path("data/Evaluation/1.png"), "1", "DR") is None
    assert len(masks) == 2 and masks.ignored == 1


def test_several_lesions_of_one_type_are_one_mask(tmp_path: Path) -> None:
    _write(tmp_path / "Training" / "3_DR_1.png", (1, 1))
    _write(tmp_path / "Training" / "3_DR_2.png", (4, 6))
    mask = MaskIndex.scan(tmp_path).mask(Path("Training/3.png"), "3", "DR")
    assert mask is not None and mask.sum() == 2 and mask[1, 1] and mask[4, 6]


def test_other_mask_is_the_union_of_the_rare_column_masks(tmp_path: Path) -> None:
    _write(tmp_path / "Training" / "4_CWS.png", (1, 1))
    _write(tmp_path / "Training" / "4_HR.png", (8, 8))
    masks = MaskIndex.scan(tmp_path)
    mask = masks.mask(Path("Training/4.png"), "4", OTHER)
    assert mask is not None and mask.sum() == 2 and mask[1, 1] and mask[8, 8]
    assert masks.mask(Path("Training/4.png"), "4", "DR") is None


def test_the_file_name_without_extension_is_tried_when_the_id_is_a_path(tmp_path: Path) -> None:
    """A generic CSV's ID is the photograph's path; its masks are named by the file name."""
    _write(tmp_path / "eyes" / "left-12_ARMD.png", (0, 0))
    mask = MaskIndex.scan(tmp_path).mask(Path("images/eyes/left-12.jpg"), "eyes/left-12.jpg", "ARMD")
    assert mask is not None and mask[0, 0]


def test_a_folder_with_nothing_in_a_known_layout_says_what_it_expected(tmp_path: Path) -> None:
    _write(tmp_path / "Training" / "7-haemorrhage.png", (0, 0))
    _write(tmp_path / "Training" / "7_MH.jpg", (0, 0))  # lossy: not read as a mask
    masks = MaskIndex.scan(tmp_path)
    assert not masks.files and len(masks) == 0
    message = masks.describe()
    assert "no lesion mask files" in message and "1 image files fit none" in message
    assert "<folder>/<ID>_<COLUMN>.png" in message
    assert MaskIndex.scan(tmp_path / "absent").describe() == f"no mask folder {tmp_path / 'absent'}"
