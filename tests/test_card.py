"""The model card shared by training, export and serving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from retinagate.card import CamGrid, ModelCard, Preprocessing
from retinagate.labels import LABELS


def test_card_round_trips_through_json(tmp_path: Path) -> None:
    card = ModelCard(version="1.2.0", metrics={"val_macro_auroc": 0.9}, weights_sha256="ab" * 32)
    card.save(tmp_path / "card.json")
    assert ModelCard.load(tmp_path / "card.json") == card


def test_card_needs_one_threshold_per_label() -> None:
    with pytest.raises(ValueError, match="thresholds: 2 values for 29 labels"):
        ModelCard(thresholds=(0.5, 0.5))


def test_thresholds_outside_the_unit_interval_are_named() -> None:
    bad = [0.5] * len(LABELS)
    bad[3] = 1.5
    with pytest.raises(ValueError, match=re.escape(f"{LABELS[3]}=1.5")):
        ModelCard(thresholds=tuple(bad))


def test_invalid_json_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"preprocessing\.input_size"):
        ModelCard.from_json('{"preprocessing": {"input_size": 5}}')


def test_with_updates_validates() -> None:
    card = ModelCard()
    assert card.with_updates(version="2").version == "2"
    with pytest.raises(ValueError, match="thresholds"):
        card.with_updates(thresholds=[0.1])


def test_the_cam_grid_follows_the_alignment_the_stride_and_the_views() -> None:
    old = ModelCard(preprocessing=Preprocessing(input_size=288), tta="rot180")
    one = old.with_updates(tta="none", cam_alignment="receptive_field")
    two = old.with_updates(cam_alignment="receptive_field")
    fine = two.with_updates(output_stride=16)

    assert old.cam_alignment == "input" and old.cam_grid() is None  # cards written before: stretched
    assert one.cam_grid() is None and two.cam_grid(two_views=False) is None  # one view: stretched
    assert two.cam_grid() == CamGrid(origin=0.0, step=32.0)  # between pixels 32 k - 1 and 32 k
    assert fine.cam_grid() == CamGrid(origin=0.0, step=16.0)
    assert CamGrid.covering(288, 9) == CamGrid(origin=16.0, step=32.0)
    with pytest.raises(ValueError, match=r"input_size \(300\) to be a multiple of output_stride \(32\)"):
        ModelCard(preprocessing=Preprocessing(input_size=300), tta="rot180", cam_alignment="receptive_field")
