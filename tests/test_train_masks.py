"""Lesion mask files: the layouts and places found, the folders that keep the splits apart, and OTHER."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from retinagate.labels import OTHER
from train.masks import MaskIndex, find_masks


def _write(path: Path, *points: tuple[int, int], shape: tuple[int, int] = (10, 10)) -> None:
    plane = np.zeros(shape, np.uint8)
    for y, x in points:
        plane[y, x] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), plane)


def _rfmid(data: Path, ids: range = range(1, 20)) -> list[tuple[Path, str]]:
    """Photographs of the RFMiD layout, each split numbered from 1 (the files need not exist)."""
    folders = ("Training_Set/Training", "Evaluation_Set/Validation", "Test_Set/Test")
    return [(data / folder / f"{n}.png", str(n)) for folder in folders for n in ids]


TRAINING_7 = Path("Training_Set/Training/7.png")


@pytest.mark.parametrize(
    "layout",
    [
        "masks/Training/7_MH.png",
        "masks/Training/7_mh.tif",
        "masks/Training/7_MH.jpg",
        "masks/Training/7_MH_1.png",
        "masks/Training/7/MH.bmp",
        "masks/Training/7/MH_3.png",
        "masks/Training/MH/7.png",
        "masks/Training_Set/Training/7_MH.png",
        "Masks/training/007_MH.png",
        "Training_Set/masks/7_MH.png",
        "Training_Set/Training/masks/7_MH.png",
        "Training_Set/Training_Masks/7_MH.png",
        "lesion_masks/Training/MH/7.png",
        "Training_Masks/7/MH.png",
        "masks/Training/MH_7.png",
        "masks/Training/mh-07.png",
        "masks/Training/7-MH.png",
        "masks/Training/7 MH.png",
        "masks/Training/7_MH_mask.png",
        "masks/Training/mask_7_MH_2.png",
        "Lesions/Training/MH/7.png",
        "Training_Set/Segmentation/7_MH.png",
        "annotations/training/7/MH.png",
        "GT/Training/7_MH.png",
        "Training_Set/ground_truth/MH/7.png",
        "Training_Set/Training_Lesions/7_MH.png",
        "masks/Training/7_MH_gt.png",
    ],
)
def test_each_layout_and_place_gives_the_mask_of_its_photograph_and_label(tmp_path: Path, layout: str) -> None:
    _write(tmp_path / layout, (2, 3))
    masks = find_masks(None, tmp_path, _rfmid(tmp_path))
    assert masks is not None and len(masks) == 1, masks and masks.describe()
    mask = masks.mask(tmp_path / TRAINING_7, "MH")
    assert mask is not None and mask.sum() == 1 and mask[2, 3]
    assert masks.mask(tmp_path / TRAINING_7, "MHL") is None
    assert masks.mask(tmp_path / "Test_Set" / "Test" / "7.png", "MH") is None
    assert masks.mask(tmp_path / TRAINING_7.with_name("17.png"), "MH") is None


def test_the_folders_keep_photographs_of_the_same_id_in_different_splits_apart(tmp_path: Path) -> None:
    """RFMiD numbers every split from 1: Training/1 and Test/1 are different photographs."""
    _write(tmp_path / "masks" / "Training" / "1_DR.png", (1, 1))
    _write(tmp_path / "masks" / "Test" / "1_DR.png", (5, 5))
    _write(tmp_path / "masks" / "2_DR.png", (8, 8))  # no folder: any split's photograph 2, so not used
    _write(tmp_path / "masks" / "Elsewhere" / "3_DR.png", (8, 8))  # no such folder of photographs
    masks = find_masks(None, tmp_path, _rfmid(tmp_path))
    assert masks is not None
    train_mask = masks.mask(tmp_path / "Training_Set" / "Training" / "1.png", "DR")
    test_mask = masks.mask(tmp_path / "Test_Set" / "Test" / "1.png", "DR")
    assert train_mask is not None and train_mask[1, 1] and train_mask.sum() == 1
    assert test_mask is not None and test_mask[5, 5] and test_mask.sum() == 1
    assert masks.mask(tmp_path / "Evaluation_Set" / "Validation" / "1.png", "DR") is None
    assert len(masks) == 2 and masks.ambiguous == 1 and masks.unmatched == 1
    assert "1 fit photographs of more than one folder" in masks.describe()
    assert "1 name no photograph" in masks.describe()


def test_a_flat_mask_goes_to_the_one_photograph_of_its_id_that_has_its_finding(tmp_path: Path) -> None:
    """RFMiD's IDs repeat in every split; given the labels, ``masks/3_DR.png`` is the one photograph 3 with
    DR. Where none or several have it, the file is still left out."""
    photographs = _rfmid(tmp_path, range(1, 6))
    train, val, test = (Path(path) for path, image_id in photographs if image_id == "3")
    findings = {train: {"DR", "Disease_Risk"}, val: {"MYA", "Disease_Risk"}, test: {"OTHER", "Disease_Risk"}}
    findings |= {Path(p): {"ARMD", "Disease_Risk"} for p, image_id in photographs if image_id == "4"}
    _write(tmp_path / "masks" / "3_DR.png", (1, 1))
    _write(tmp_path / "masks" / "3_CWS.png", (2, 2))  # a rare column: OTHER's
    _write(tmp_path / "masks" / "3_BRVO.png", (3, 3))  # no photograph 3 has it
    _write(tmp_path / "masks" / "4_ARMD.png", (4, 4))  # every photograph 4 has it
    masks = find_masks(None, tmp_path, photographs, findings)
    assert masks is not None and len(masks) == 2 and masks.ambiguous == 2
    dr, other = masks.mask(train, "DR"), masks.mask(test, OTHER)
    assert dr is not None and dr[1, 1] and dr.sum() == 1
    assert other is not None and other[2, 2] and other.sum() == 1
    assert masks.mask(val, "DR") is None and masks.mask(train, OTHER) is None
    without = find_masks(None, tmp_path, photographs)
    assert without is not None and len(without) == 0 and without.ambiguous == 4  # never guessed


def test_flat_masks_are_used_when_the_ids_tell_the_photographs_apart(tmp_path: Path) -> None:
    """Numbered across the splits, a flat ``masks/<ID>_<COLUMN>.png`` can only be one photograph's."""
    photographs = [(tmp_path / "train" / "1.png", "1"), (tmp_path / "val" / "401.png", "401")]
    _write(tmp_path / "masks" / "401_ARMD.png", (4, 4))
    masks = find_masks(None, tmp_path, photographs)
    assert masks is not None and masks.mask(tmp_path / "val" / "401.png", "ARMD") is not None


def test_photographs_are_not_taken_for_masks(tmp_path: Path) -> None:
    """Without ``--masks`` only folders that say mask are read: a photograph named like a mask is not one,
    and a photograph is never its own mask, whatever its folders are called."""
    _write(tmp_path / "Training" / "7_MH.png", (0, 0))
    assert find_masks(None, tmp_path, [(tmp_path / "Training" / "7.png", "7")]) is None
    _write(tmp_path / "unmasked" / "Training" / "8.png", (0, 0))
    assert find_masks(None, tmp_path, [(tmp_path / "unmasked" / "Training" / "8.png", "8")]) is None
    masks = find_masks(tmp_path / "Training", tmp_path, [(tmp_path / "Training" / "7.png", "7")])
    assert masks is not None and masks.mask(tmp_path / "Training" / "7.png", "MH") is not None  # --masks: all


def test_several_lesions_of_one_type_are_one_mask(tmp_path: Path) -> None:
    _write(tmp_path / "Training" / "3_DR_1.png", (1, 1))
    _write(tmp_path / "Training" / "3_DR_2.png", (4, 6))
    mask = MaskIndex.scan(tmp_path, [(Path("/d/Training/3.png"), "3")]).mask(Path("/d/Training/3.png"), "DR")
    assert mask is not None and mask.sum() == 2 and mask[1, 1] and mask[4, 6]


def test_other_mask_is_the_union_of_the_rare_column_masks(tmp_path: Path) -> None:
    _write(tmp_path / "Training" / "4_CWS.png", (1, 1))
    _write(tmp_path / "Training" / "4_HR.png", (8, 8))
    image = Path("/d/Training/4.png")
    masks = MaskIndex.scan(tmp_path, [(image, "4")])
    mask = masks.mask(image, OTHER)
    assert mask is not None and mask.sum() == 2 and mask[1, 1] and mask[8, 8]
    assert masks.mask(image, "DR") is None


def test_the_disease_risk_mask_is_the_union_of_every_lesion_of_the_photograph(tmp_path: Path) -> None:
    _write(tmp_path / "Training" / "5_DR.png", (1, 1))
    _write(tmp_path / "Training" / "5_CWS.png", (8, 8))  # a rare column of OTHER
    _write(tmp_path / "Training" / "6_MH.png", (2, 2))  # another photograph's
    image = Path("/d/Training/5.png")
    masks = MaskIndex.scan(tmp_path, [(image, "5"), (Path("/d/Training/6.png"), "6")])
    mask = masks.mask(image, "Disease_Risk")
    assert mask is not None and mask.sum() == 2 and mask[1, 1] and mask[8, 8]


def test_the_file_name_without_extension_is_tried_when_the_id_is_a_path(tmp_path: Path) -> None:
    """A generic CSV's ID is the photograph's path; its masks are named by the file name."""
    _write(tmp_path / "eyes" / "left-12_ARMD.png", (0, 0))
    image = Path("/d/images/eyes/left-12.jpg")
    mask = MaskIndex.scan(tmp_path, [(image, "eyes/left-12.jpg")]).mask(image, "ARMD")
    assert mask is not None and mask[0, 0]


def test_a_folder_with_nothing_in_a_known_layout_says_what_it_expected(tmp_path: Path) -> None:
    _write(tmp_path / "Training" / "scan-haemorrhage.png", (0, 0))
    for structure in ("7_OD", "7-optic-disc", "7_vessels", "7 fovea"):  # structures of the eye, not lesions
        _write(tmp_path / "Training" / f"{structure}.png", (0, 0))
    masks = MaskIndex.scan(tmp_path, [(Path("/d/Training/7.png"), "7")])
    assert not masks.files and len(masks) == 0
    message = masks.describe()
    assert "no lesion mask files" in message and "5 name no photograph" in message
    assert "<folders>/<ID>_<COLUMN>.png" in message
    assert MaskIndex.scan(tmp_path / "absent", []).describe() == f"no mask folder {tmp_path / 'absent'}"


def test_files_named_by_lesion_kind_are_every_lesion_of_their_photograph(tmp_path: Path) -> None:
    """IDRiD-style ``<ID>_MA``, ``<ID>_HE``: a lesion type that names no RFMiD column is one of the
    photograph's lesions, and serves each of its labels without a file of its own, as ``<ID>.png`` does;
    the optic disc's file is left out."""
    _write(tmp_path / "masks" / "Training" / "IDRiD_07_MA.tif", (1, 1))
    _write(tmp_path / "masks" / "Training" / "IDRiD_07_HE.tif", (6, 6))
    _write(tmp_path / "masks" / "Training" / "IDRiD_07_OD.tif", (9, 9))
    _write(tmp_path / "masks" / "Training" / "IDRiD_07_ARMD.tif", (3, 3))
    image = tmp_path / "Training_Set" / "Training" / "IDRiD_07.jpg"
    masks = find_masks(None, tmp_path, [(image, "IDRiD_07")])
    assert masks is not None and len(masks) == 3 and masks.unmatched == 1
    every = masks.mask(image, "DR")
    own = masks.mask(image, "ARMD")
    assert every is not None and every.sum() == 2 and every[1, 1] and every[6, 6]
    assert own is not None and own.sum() == 1 and own[3, 3]


def test_a_lesion_number_and_a_photograph_id_are_told_apart_by_the_folders(tmp_path: Path) -> None:
    """``7/MH_3`` is lesion 3 of photograph 7's MH; ``MH_3`` beside the photographs' folder is photograph 3's."""
    _write(tmp_path / "masks" / "Training" / "7" / "MH_3.png", (1, 1))
    _write(tmp_path / "masks" / "Training" / "MH_3.png", (5, 5))
    masks = find_masks(None, tmp_path, _rfmid(tmp_path))
    assert masks is not None and len(masks) == 2
    seven, three = masks.mask(tmp_path / TRAINING_7, "MH"), masks.mask(tmp_path / TRAINING_7.with_name("3.png"), "MH")
    assert seven is not None and seven.sum() == 1 and seven[1, 1]
    assert three is not None and three.sum() == 1 and three[5, 5]


def test_a_mask_of_another_size_is_scaled_onto_its_photograph_and_another_shape_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A half-size mask lands on the same place of the photograph; a mask of another aspect cannot."""
    _write(tmp_path / "Training" / "5_DR.png", (2, 3), shape=(10, 10))
    _write(tmp_path / "Training" / "6_DR.png", (2, 3), shape=(10, 15))
    masks = MaskIndex.scan(tmp_path, [(Path("/d/Training/5.png"), "5"), (Path("/d/Training/6.png"), "6")])
    scaled = masks.mask(Path("/d/Training/5.png"), "DR", (20, 20))
    assert scaled is not None and scaled.shape == (20, 20)
    assert scaled.sum() == 4 and scaled[4:6, 6:8].all()
    with caplog.at_level("WARNING", logger="train.masks"):
        assert masks.mask(Path("/d/Training/6.png"), "DR", (20, 20)) is None
    assert "is 15x10, its photograph 20x20; left out" in caplog.text


def test_a_jpeg_mask_is_read_above_half_range_so_its_ringing_does_not_grow_the_lesion(tmp_path: Path) -> None:
    plane = np.zeros((32, 32), np.uint8)
    cv2.circle(plane, (13, 17), 6, 255, -1)
    (tmp_path / "Training").mkdir()
    assert cv2.imwrite(str(tmp_path / "Training" / "2_DR.jpg"), plane, [cv2.IMWRITE_JPEG_QUALITY, 50])
    assert (cv2.imread(str(tmp_path / "Training" / "2_DR.jpg"), cv2.IMREAD_GRAYSCALE)[plane == 0] > 0).any()
    image = Path("/d/Training/2.png")
    mask = MaskIndex.scan(tmp_path, [(image, "2")]).mask(image, "DR")
    assert mask is not None and np.array_equal(mask, plane > 0)


def test_a_photographs_own_mask_file_serves_each_label_without_one_of_its_own(tmp_path: Path) -> None:
    """``<folders>/<ID>.png`` holds every lesion of the photograph: one finding's mask, or all findings'."""
    _write(tmp_path / "masks" / "Training" / "7.png", (1, 1), (6, 6))
    _write(tmp_path / "masks" / "Training" / "7_MH.png", (2, 3))
    _write(tmp_path / "masks" / "Test" / "7.png", (4, 4))
    masks = find_masks(None, tmp_path, _rfmid(tmp_path))
    assert masks is not None and len(masks) == 3
    training, test = tmp_path / TRAINING_7, tmp_path / "Test_Set" / "Test" / "7.png"
    own = masks.mask(training, "MH")
    every = masks.mask(training, "DR")
    assert own is not None and own.sum() == 1 and own[2, 3]  # a label's own file first
    assert every is not None and every.sum() == 2 and every[1, 1] and every[6, 6]
    other = masks.mask(test, OTHER)
    assert other is not None and other.sum() == 1 and other[4, 4]
    assert masks.mask(tmp_path / "Evaluation_Set" / "Validation" / "7.png", "DR") is None
