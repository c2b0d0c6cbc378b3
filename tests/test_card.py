"""The model card shared by training, export and serving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from retinagate.card import ModelCard
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
