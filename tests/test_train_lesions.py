"""Lesion masks as training targets: placed on the input once, cached, and read by the card's grid."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from retinagate.card import CamGrid, ModelCard, Preprocessing
from retinagate.labels import DIFFUSE_LABELS, DISEASE_LABELS, LABELS, RFMID_COLUMNS
from train.datasets import find_rfmid_splits, read_image
from train.lesions import lesion_planes
from train.loop import TrainConfig
from train.masks import MaskIndex, find_masks, photographs

PRE = Preprocessing(input_size=64)


def _index(data: Path, masks: Path | None = None) -> MaskIndex:
    """The masks of the data folder's photographs (its own ``masks``, or ``masks``)."""
    index = find_masks(masks, data, photographs(find_rfmid_splits(data).values()))
    assert index is not None
    return index


def _without_diffuse(index: MaskIndex) -> MaskIndex:
    """The masks less those of media haze and tessellation, as a set annotated by lesion leaves them."""
    return MaskIndex(index.root, {key: f for key, f in index.files.items() if key[1] not in DIFFUSE_LABELS})


def test_each_positive_label_with_a_mask_becomes_one_plane_on_the_input(synth_dataset: Path, tmp_path: Path) -> None:
    source = find_rfmid_splits(synth_dataset)["train"]
    masks = _index(synth_dataset)
    planes = lesion_planes(source, PRE, masks, tmp_path)
    assert planes is not None
    expected = [
        (i, LABELS.index(name))
        for i in range(len(source))
        for name in DISEASE_LABELS
        if source.labels[i, LABELS.index(name)] and masks.mask(source.paths[i], name) is not None
    ]
    pairs = [(i, int(c)) for i in range(len(source)) for c in planes.columns[planes.offsets[i] : planes.offsets[i + 1]]]
    assert pairs == expected and len(planes) == len(expected) > 50
    array = np.load(planes.cache_file)
    assert array.shape == (len(expected), 64, 64) and array.dtype == np.uint8
    assert (array.reshape(len(expected), -1).max(axis=1) > 0).all()
    assert 1 <= planes.per_image <= 8


def test_planes_are_reused_until_a_mask_changes(synth_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data, ignore=shutil.ignore_patterns("dicom"))
    source = find_rfmid_splits(data)["val"]
    first = lesion_planes(source, PRE, _index(data), tmp_path / "cache")
    assert first is not None
    built = first.cache_file.stat().st_mtime_ns
    again = lesion_planes(source, PRE, _index(data), tmp_path / "cache")
    assert again is not None and again.cache_file == first.cache_file
    assert again.cache_file.stat().st_mtime_ns == built
    changed = next((data / "masks" / "Evaluation").iterdir())
    os.utime(changed, ns=(built + 10**9, built + 10**9))
    rebuilt = lesion_planes(source, PRE, _index(data), tmp_path / "cache")
    assert rebuilt is not None and rebuilt.cache_file != first.cache_file
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_no_planes_without_masks_for_the_split(synth_dataset: Path, tmp_path: Path) -> None:
    source = find_rfmid_splits(synth_dataset)["test"]
    (tmp_path / "masks" / "Test").mkdir(parents=True)
    assert lesion_planes(source, PRE, _index(synth_dataset, tmp_path / "masks"), tmp_path / "cache") is None
    others = _index(synth_dataset)  # masks of the other splits only
    others = MaskIndex(others.root, {key: files for key, files in others.files.items() if key[0].parent.name != "Test"})
    assert others.files and lesion_planes(source, PRE, others, tmp_path / "cache") is None


def test_a_diffuse_finding_without_a_mask_covers_the_field_of_view(synth_dataset: Path, tmp_path: Path) -> None:
    """Media haze and tessellation unmasked, as a set annotated by lesion leaves them: each positive one
    becomes a plane of the retina on the input, and only when asked for."""
    from retinagate.preprocess import find_fov, prepare_with_geometry

    source = find_rfmid_splits(synth_dataset)["train"]
    masked = _index(synth_dataset)
    unmasked = _without_diffuse(masked)
    columns = [LABELS.index(name) for name in DIFFUSE_LABELS]
    positives = [i for i in range(len(source)) if source.labels[i, columns].any()]
    assert positives

    without = lesion_planes(source, PRE, unmasked, tmp_path / "a")
    assert without is not None and not set(without.columns.tolist()) & set(columns)

    planes = lesion_planes(source, PRE, unmasked, tmp_path / "b", diffuse=DIFFUSE_LABELS)
    assert planes is not None and planes.cache_file != without.cache_file
    array = np.load(planes.cache_file)
    for i in positives:
        image = read_image(source.paths[i])
        fov = find_fov(image, PRE.fov_threshold)
        _, geometry = prepare_with_geometry(image, PRE, fov=fov)
        retina = geometry.to_input(fov.coverage() >= 0.5)
        rows = range(planes.offsets[i], planes.offsets[i + 1])
        mine = [r for r in rows if planes.columns[r] in columns]
        assert len(mine) == int(source.labels[i, columns].sum())
        for r in mine:
            assert np.array_equal(array[r], retina)
            assert 0.5 < (array[r] > 127).mean() < 0.9 and array[r][0, 0] == 0  # a disc: not the corners

    # A masked diffuse finding keeps its own mask.
    kept = lesion_planes(source, PRE, masked, tmp_path / "c", diffuse=DIFFUSE_LABELS)
    plain = lesion_planes(source, PRE, masked, tmp_path / "d")
    assert kept is not None and plain is not None
    assert np.array_equal(np.load(kept.cache_file), np.load(plain.cache_file))


def test_the_pointing_game_asks_nothing_of_an_unmasked_diffuse_finding(synth_dataset: Path) -> None:
    """Its plane is a training target only: the game's pairs come from mask files alone."""
    from train.cam import pointing_targets

    source = find_rfmid_splits(synth_dataset)["val"]
    masked = _index(synth_dataset)
    unmasked = _without_diffuse(masked)
    card = ModelCard(preprocessing=PRE)
    before = pointing_targets(card, source, masked, (2, 2), two_views=False)
    after = pointing_targets(card, source, unmasked, (2, 2), two_views=False)
    assert set(before.names) & set(DIFFUSE_LABELS) and not set(after.names) & set(DIFFUSE_LABELS)
    assert len(after.names) == sum(name not in DIFFUSE_LABELS for name in before.names)


def test_a_set_without_masks_gets_no_diffuse_planes_either(synth_dataset: Path, tmp_path: Path) -> None:
    source = find_rfmid_splits(synth_dataset)["train"]
    empty = MaskIndex(tmp_path, {})
    assert lesion_planes(source, PRE, empty, tmp_path / "cache", diffuse=DIFFUSE_LABELS) is None


def test_a_plane_lies_where_its_lesion_is_on_the_prepared_photograph(synth_dataset: Path, tmp_path: Path) -> None:
    """Easy-mode lesions are flat colour discs: the plane's pixels are the photograph's lesion pixels."""
    from retinagate.preprocess import prepare

    source = find_rfmid_splits(synth_dataset)["train"]
    planes = lesion_planes(source, Preprocessing(input_size=128), _index(synth_dataset), tmp_path)
    assert planes is not None
    array = np.load(planes.cache_file)
    i = int(np.argmax(np.diff(planes.offsets) > 0))
    plane = array[planes.offsets[i]]
    image = prepare(read_image(source.paths[i]), Preprocessing(input_size=128)).astype(np.float32)
    inside, around = plane > 200, (plane == 0)
    # The lesion differs from the retina around it in colour: inside pixels are closer to each other
    # than to the rest of the input.
    centre = image[inside].mean(axis=0)
    assert np.linalg.norm(image[inside] - centre, axis=1).mean() < np.linalg.norm(image[around] - centre, axis=1).mean()


def test_a_card_trained_on_lesion_masks_reads_one_view_on_the_geometric_grid() -> None:
    card = ModelCard(preprocessing=Preprocessing(input_size=288), cam_alignment="receptive_field")
    assert card.cam_grid(two_views=False) is None
    assert card.cam_grid(two_views=True) == CamGrid(origin=0.0, step=32.0)
    supervised = card.with_updates(localisation="lesion_masks")
    assert supervised.cam_grid(two_views=False) == CamGrid(origin=0.0, step=32.0)
    assert supervised.with_updates(cam_alignment="input").cam_grid(two_views=False) is None
    assert ModelCard.model_validate({}).localisation == "labels"


def test_the_lesion_weight_is_checked_and_runs_written_before_it_train_without_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lesion_loss"):
        TrainConfig(out=tmp_path, lesion_loss=-1.0)
    assert TrainConfig(out=tmp_path).lesion_loss == 0.01
    assert TrainConfig.from_dict({"out": str(tmp_path)}).lesion_loss == 0.0


def test_disease_risk_has_every_lesion_unless_the_run_was_written_before_the_option() -> None:
    assert TrainConfig(out=Path("run")).risk_lesions is True
    assert TrainConfig.from_dict({"out": "run"}).risk_lesions is False


def test_diffuse_findings_cover_the_retina_unless_the_run_was_written_before_the_option() -> None:
    assert TrainConfig(out=Path("run")).diffuse_lesions is True
    assert TrainConfig.from_dict({"out": "run"}).diffuse_lesions is False


def test_probe_lesion_cells_are_balanced_by_pairs_unless_the_run_was_written_before_the_option() -> None:
    assert TrainConfig(out=Path("run")).probe_balance == "pairs"
    assert TrainConfig.from_dict({"out": "run"}).probe_balance == "cells"
    with pytest.raises(ValueError, match="probe_balance"):
        TrainConfig(out=Path("run"), probe_balance="area")


def test_probes_read_strides_8_and_16_unless_told_others_and_nothing_else() -> None:
    assert TrainConfig(out=Path("run")).probe_strides == (8, 16)
    assert TrainConfig.from_dict({"out": "run"}).probe_strides == (16,)  # runs written before the option
    # From config.json or the command line: a list, in any order, read as the tuple it means.
    assert TrainConfig.from_dict({"out": "run", "probe_strides": [16, 8]}).probe_strides == (8, 16)
    assert TrainConfig(out=Path("run"), probe_strides=(8,)).probe_strides == (8,)
    assert TrainConfig(out=Path("run"), probe_strides=8).probe_strides == (8,)  # type: ignore[arg-type]
    assert TrainConfig(out=Path("run"), probe_strides=(16, 4, 8)).probe_strides == (4, 8, 16)
    for wrong in ((32,), (), (8, 2)):
        with pytest.raises(ValueError, match=r"probe_strides is .*; expected one or more of 4, 8, 16"):
            TrainConfig(out=Path("run"), probe_strides=wrong)


def test_the_run_reads_the_masks_option_or_the_data_folders_folders_that_say_mask(
    synth_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from train.loop import _Run

    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data, ignore=shutil.ignore_patterns("dicom", "masks"))

    def run_masks(**options: object) -> MaskIndex | None:
        config = TrainConfig(out=tmp_path / "run", data=data, device="cpu", pretrained=False, **options)  # type: ignore[arg-type]
        return _Run(config, progress=False).masks

    with caplog.at_level("INFO", logger="train.loop"):
        assert run_masks() is None  # a set without masks: no warning, a line that says where it looked
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert f"no lesion masks: no folder under {data} says mask, lesion, segmentation" in caplog.text
    assert "the maps learn from the labels alone (--masks DIR" in caplog.text
    caplog.clear()
    count = len(_index(synth_dataset))
    shutil.copytree(synth_dataset / "masks" / "Training", data / "Training" / "Masks")  # inside the split's folder
    found = run_masks()
    assert found is not None and len(found) == len(list((data / "Training" / "Masks").iterdir())) < count
    elsewhere = run_masks(masks=synth_dataset / "masks")
    assert elsewhere is not None and len(elsewhere) == count
    config = TrainConfig(out=tmp_path, data=data, masks=synth_dataset / "masks")
    assert TrainConfig.from_dict(config.to_dict()).masks == synth_dataset / "masks"
    with caplog.at_level("WARNING", logger="train.loop"):
        assert run_masks(masks=tmp_path / "absent") is None
    assert f"no mask folder {tmp_path / 'absent'}" in caplog.text


def test_a_mask_folder_with_nothing_in_a_known_layout_is_reported_and_left_out(
    synth_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from train.loop import _Run

    (tmp_path / "masks" / "Training").mkdir(parents=True)
    (tmp_path / "masks" / "Training" / "scan-drusen.png").write_bytes(b"")
    config = TrainConfig(out=tmp_path / "run", data=synth_dataset, masks=tmp_path / "masks", device="cpu")
    run = _Run(config, progress=False)
    with caplog.at_level("WARNING", logger="train.loop"):
        assert run.masks is None
    assert "no lesion mask files of the photographs under" in caplog.text
    assert "<folders>/<ID>_<COLUMN>.png" in caplog.text


@pytest.mark.parametrize("renamed", ["{id}/{column}.png", "{column}-{id}_mask.png"])
def test_masks_in_another_layout_give_the_same_planes(synth_dataset: Path, tmp_path: Path, renamed: str) -> None:
    """The same masks moved to ``<folder>/<ID>/<COLUMN>.png``, or renamed ``<COLUMN>-<ID>_mask.png``,
    place the same planes on the input."""
    source = find_rfmid_splits(synth_dataset)["val"]
    moved = tmp_path / "moved"
    for path in (synth_dataset / "masks" / "Evaluation").glob("*.png"):
        image_id, column = path.stem.split("_", 1)
        target = moved / "Evaluation" / renamed.format(id=image_id, column=column)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    original = lesion_planes(source, PRE, _index(synth_dataset), tmp_path / "a")
    placed = lesion_planes(source, PRE, _index(synth_dataset, moved), tmp_path / "b")
    assert original is not None and placed is not None
    assert np.array_equal(placed.offsets, original.offsets) and np.array_equal(placed.columns, original.columns)
    assert np.array_equal(np.load(placed.cache_file), np.load(original.cache_file))


def test_masks_that_belong_to_no_training_photograph_are_reported(
    synth_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from train.loop import _Run

    shutil.copytree(synth_dataset / "masks" / "Evaluation", tmp_path / "masks" / "Evaluation")
    config = TrainConfig(out=tmp_path / "run", data=synth_dataset, masks=tmp_path / "masks", device="cpu")
    run = _Run(config, progress=False)
    assert run.masks is not None  # masks there are, for the validation photographs only
    with caplog.at_level("WARNING", logger="train.loop"):
        assert run.lesions(find_rfmid_splits(synth_dataset)["train"]) is None
    assert "none for a positive label of a training photograph (folder 'Training')" in caplog.text
    assert run.card.localisation == "labels"


def test_a_generic_csv_reads_the_mask_folders_beside_it(synth_dataset: Path, tmp_path: Path) -> None:
    """``--labels-csv`` without ``--masks``: the CSV's own folder is where mask folders are looked for."""
    import csv

    from train.loop import _Run

    rows = [
        [f"{folder}/{row['ID']}.png", *(row[c] for c in RFMID_COLUMNS), split]
        for folder, name, split in (("Training", "Training", "train"), ("Evaluation", "Validation", "val"))
        for row in csv.DictReader((synth_dataset / f"RFMiD_{name}_Labels.csv").open(encoding="utf-8"))
    ]
    labels_csv = tmp_path / "set" / "labels.csv"
    labels_csv.parent.mkdir()
    with labels_csv.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["path", *RFMID_COLUMNS, "split"], *rows])
    shutil.copytree(synth_dataset / "masks" / "Training", tmp_path / "set" / "masks" / "Training")
    config = TrainConfig(out=tmp_path / "run", labels_csv=labels_csv, images=synth_dataset, device="cpu")
    found = _Run(config, progress=False).masks
    assert found is not None and len(found) == len(list((synth_dataset / "masks" / "Training").iterdir()))
