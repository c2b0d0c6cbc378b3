"""bench/second_generator.py: a set the training reader takes as it is, with masks that mark the lesions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from retinagate.labels import LABELS, OTHER
from train.datasets import find_rfmid_splits
from train.masks import find_masks, photographs


def test_its_folder_is_read_as_rfmid_with_every_masked_finding_given_to_its_photograph(
    tmp_path: Path, bench_module: Callable[[str], ModuleType]
) -> None:
    generator = bench_module("second_generator")
    generator.main(["--out", str(tmp_path), "--seed", "3", "--splits", "30", "12", "12"])
    splits = find_rfmid_splits(tmp_path)
    assert {split: len(source.ids) for split, source in splits.items()} == {"train": 30, "val": 12, "test": 12}
    index = find_masks(None, tmp_path, photographs(splits.values()))
    assert index is not None
    masked = unmasked = 0
    for source in splits.values():
        for path, row in zip(source.paths, source.labels, strict=True):
            for label, positive in zip(LABELS[1:], row[1:], strict=True):
                if not positive:
                    assert not index.lookup(path, label), (path, label)
                    continue
                if label in generator.UNMASKED:
                    assert not index.lookup(path, label)
                    unmasked += 1
                    continue
                mask = index.mask(path, label)
                assert mask is not None and mask.any(), (path, label)  # OTHER's from its rare column's file
                masked += 1
            assert row[0] == row[1:].any()  # Disease_Risk: any finding
    assert masked > 40 and unmasked > 0
    assert any(row[LABELS.index(OTHER)] for source in splits.values() for row in source.labels)


@pytest.mark.parametrize("column", ["DR", "MHL", "BRVO", "ST", "LS", "CWS", "EDN"])
def test_a_findings_mask_covers_what_it_drew_and_only_that(
    column: str, bench_module: Callable[[str], ModuleType]
) -> None:
    generator = bench_module("second_generator")
    eye = generator.Eye(np.random.default_rng(8), 640, 480)
    generator.anatomy(eye, tortuous=False, thin=False)
    before = eye.image.copy()
    generator.DRAW[column](eye, column)
    change = np.abs(eye.image - before).max(axis=2)
    mask = eye.masks[column].astype(bool)
    assert mask.any()
    assert np.median(change[mask]) > 0.05  # the lesion differs from the fundus where its mask says
    assert change[~mask].max() < 0.25  # and outside its mask only its soft edge does


def test_the_masks_stop_at_the_field_of_view(bench_module: Callable[[str], ModuleType]) -> None:
    generator = bench_module("second_generator")
    image, masks = generator.draw(4, ["MNF", "LS", "AH"])
    retina = image.max(axis=2) > 0
    assert masks and all(not (mask.astype(bool) & ~retina).any() for mask in masks.values())


def test_findings_and_a_macular_hole_for_mh_draw_only_those_findings_with_mh_masked(
    tmp_path: Path, bench_module: Callable[[str], ModuleType]
) -> None:
    generator = bench_module("second_generator")
    chosen = ["MYA", "BRVO", "MH", "OTHER"]
    splits_option = ["--splits", "24", "10", "10"]
    generator.main(["--out", str(tmp_path), "--seed", "5", *splits_option, "--findings", *chosen, "--mh-hole"])
    splits = find_rfmid_splits(tmp_path)
    index = find_masks(None, tmp_path, photographs(splits.values()))
    assert index is not None
    drawn: set[str] = set()
    for source in splits.values():
        for path, row in zip(source.paths, source.labels, strict=True):
            positive = {label for label, flag in zip(LABELS[1:], row[1:], strict=True) if flag}
            drawn |= positive
            for label in positive & {"MH"}:
                mask = index.mask(path, label)
                assert mask is not None and mask.any(), path  # the hole has its mask
    assert drawn == set(chosen)


def test_findings_that_name_no_disease_are_refused(
    tmp_path: Path, bench_module: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    generator = bench_module("second_generator")
    with pytest.raises(SystemExit):
        generator.main(["--out", str(tmp_path), "--findings", "DR", "CWS", "Disease_Risk"])
    assert "CWS, Disease_Risk are not named RFMiD diseases or OTHER" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
