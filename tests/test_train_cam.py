"""Class activation maps, and where the trained model's maps point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retinagate.card import ModelCard, Preprocessing
from train.cam import PointingTargets, cam_cells, class_activation_maps, pointing_game
from train.datasets import find_rfmid_splits
from train.masks import MaskIndex, photographs
from train.model import create_model, load_checkpoint


def test_cam_equals_autograd_grad_cam_on_the_pooled_feature_map() -> None:
    torch.manual_seed(0)
    card = ModelCard(preprocessing=Preprocessing(input_size=96))
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0).eval()
    images = torch.randn(2, 3, 96, 96)
    logits, cams = class_activation_maps(model, images)

    features = model.forward_features(images).detach().requires_grad_(True)  # type: ignore[operator]
    head_logits = model.forward_head(features)  # type: ignore[operator]
    torch.testing.assert_close(head_logits, logits)
    for c in (0, 7, 28):
        (grads,) = torch.autograd.grad(head_logits[:, c].sum(), features, retain_graph=True)
        alpha = grads.mean(dim=(2, 3), keepdim=True)  # Grad-CAM channel weights
        grad_cam = torch.relu((alpha * features).sum(dim=1))
        h, w = features.shape[2:]
        torch.testing.assert_close(cams[:, c] / (h * w), grad_cam.detach(), rtol=1e-4, atol=1e-6)


def test_pointing_targets_score_the_strongest_cell_of_each_pair() -> None:
    hit_cells = np.zeros((3, 4), np.bool_)
    hit_cells[0, 1] = hit_cells[1, 2] = hit_cells[2, 0] = True
    targets = PointingTargets(
        cells=(2, 2),
        images=np.array([0, 0, 2]),
        columns=np.array([1, 3, 1]),
        names=("DR", "MH", "DR"),
        hit_cells=hit_cells,
        shares=np.array([0.1, 0.2, 0.3]),
    )
    peaks = np.zeros((3, 29), np.intp)
    peaks[0, 1], peaks[0, 3], peaks[2, 1] = 1, 0, 0  # image 0: DR hits, MH misses; image 2: DR hits
    game = targets.score(peaks)
    assert (game.hits, game.total, game.per_label) == (2, 3, {"DR": (2, 2), "MH": (0, 1)})
    assert game.chance == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one row per image"):
        targets.score(peaks[:2])


def test_cam_cells_probe_leaves_the_model_and_its_statistics_as_they_were() -> None:
    model = create_model(ModelCard(preprocessing=Preprocessing(input_size=96))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert cam_cells(model, 96) == (3, 3) and cam_cells(model, 128) == (4, 4)
    assert model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


@pytest.mark.slow
def test_trained_model_cams_point_at_the_planted_lesions_well_above_chance(
    trained_checkpoint: Path, synth_dataset: Path
) -> None:
    """Pointing game on photographs the model never saw (synth_dataset has another seed).

    At 128 px the CAM is 4 x 4 cells; a hit is a strongest cell whose centre lies within half a cell
    (16 px) of the lesion, and chance is measured with the same reach (about 0.13).
    """
    model, card, _ = load_checkpoint(trained_checkpoint)
    splits = find_rfmid_splits(synth_dataset)
    masks = MaskIndex.scan(synth_dataset / "masks", photographs(splits.values()))
    games = [pointing_game(model, card, split, masks) for split in splits.values()]
    hits, total = sum(g.hits for g in games), sum(g.total for g in games)
    chance = sum(g.chance * g.total for g in games) / total
    assert total >= 250
    assert hits / total >= 2.0 * chance, f"{hits} of {total} CAM peaks on a lesion; chance {chance:.3f}"
