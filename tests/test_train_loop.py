"""The training loop: reproducible data order, resume equivalence, partial fine-tuning, schedule."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from retinagate.card import ModelCard
from retinagate.labels import LABELS
from train.loop import (
    POINTING_ENOUGH,
    TrainConfig,
    _balanced_weights,
    _schedule,
    freeze_stages,
    selection_score,
    train,
)
from train.model import create_model, state_dict_sha256


@pytest.fixture(scope="module")
def small_cache(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loop-cache")


def test_config_refuses_bad_values_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs is 0"):
        TrainConfig(out=tmp_path, epochs=0)
    with pytest.raises(ValueError, match="loss is 'hinge'; expected one of bce, asl, focal"):
        TrainConfig(out=tmp_path, loss="hinge")
    with pytest.raises(ValueError, match="freeze_stages is 9; expected 0-7"):
        TrainConfig(out=tmp_path, freeze_stages=9)
    with pytest.raises(ValueError, match=r"early_share is 1\.0; expected 0 <= share < 1"):
        TrainConfig(out=tmp_path, early_share=1.0)
    with pytest.raises(ValueError, match="early_size is 16; expected at least 32"):
        TrainConfig(out=tmp_path, early_size=16)
    # Progressive resizing: a share of the epochs, rounded down, and only below the input size.
    assert TrainConfig(out=tmp_path, epochs=20, early_share=0.5).early_epochs == 10
    assert TrainConfig(out=tmp_path, epochs=3, early_share=0.5).early_epochs == 1
    assert TrainConfig(out=tmp_path, epochs=10, img_size=224, early_share=0.5).early_epochs == 0
    assert TrainConfig.from_dict({"out": str(tmp_path)}).early_epochs == 0  # a run written before the option
    config = TrainConfig(out=tmp_path, data=tmp_path / "d", lr=3e-4)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_frozen_stages_keep_their_weights_and_batch_norm_statistics() -> None:
    torch.manual_seed(0)
    model = create_model(ModelCard(), drop_rate=0.0, drop_path_rate=0.0)
    frozen = freeze_stages(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for module in frozen:
        module.eval()
    loss = model(torch.randn(4, 3, 64, 64)).square().mean()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.")):
            assert not changed, key
    assert not torch.equal(before["blocks.3.0.conv_pw.weight"], after["blocks.3.0.conv_pw.weight"])
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor() -> None:
    factor = _schedule(total_steps=100, warmup_steps=10, min_ratio=0.05)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.05 + 0.95 * 0.5)
    assert factor(100) == pytest.approx(0.05)


def test_balanced_sampler_favours_images_with_rare_labels() -> None:
    labels = np.zeros((20, len(LABELS)), dtype=np.uint8)
    labels[:10, LABELS.index("DR")] = 1  # common
    labels[10, LABELS.index("RP")] = 1  # rare
    weights = _balanced_weights(labels).numpy()
    assert weights[10] > weights[0] > 0
    assert weights[11] > 0  # healthy images are still drawn


def _run(out: Path, data: Path, cache: Path, **kwargs: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(
        out=out, data=data, cache_dir=cache, img_size=48, epochs=2, batch_size=16, lr=2e-3,
        warmup_epochs=0.5, ema=True, ema_decay=0.9, aug="strong", pretrained=False, patience=0,
        workers=0, seed=7,
    )  # fmt: skip
    return TrainConfig(**{**settings, **kwargs})


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_run(synth_dataset: Path, small_cache: Path, tmp_path: Path) -> None:
    # The first of the two epochs at 32 px (progressive resizing), so the resume must go on at 48.
    settings: dict[str, Any] = dict(tta="none", probe_strides=(16,), risk_lesions=False, early_share=0.5, early_size=32)
    straight = train(
        _run(tmp_path / "straight", synth_dataset, small_cache, **settings),
        progress=False,
    )
    assert straight.finished and straight.epochs_run == 2
    assert [row["input_size"] for row in straight.history] == [32, 48]  # progressive resizing, epoch by epoch
    # The data has lesion masks, so the default picks the best epoch by AUROC and the pointing game
    # together, and the game played in the loop is the one the report plays again on best.pt (with
    # one view each: the loop validates on one, the report on the card's views).
    scores = [selection_score(row["val_macro_auroc"], row["val_pointing"], row["val_loss"]) for row in straight.history]
    assert straight.best_epoch == 1 + int(np.argmax(scores))
    assert straight.validation is not None
    reported = straight.validation.extra["pointing_game"]
    assert reported["rate"] == straight.history[straight.best_epoch - 1]["val_pointing"] and reported["total"] > 20
    # The masks trained the maps too (the lesion loss, on by default), so one view is read on the card's grid.
    assert straight.card is not None and straight.card.localisation == "lesion_masks"

    paused = train(
        _run(tmp_path / "paused", synth_dataset, small_cache, **settings),
        stop_after_epochs=1,
        progress=False,
    )
    assert not paused.finished and paused.epochs_run == 1 and paused.card is None
    # A run paused under another epoch-choice rule stored another score for best.pt's epoch; the resume
    # scores that epoch again by today's rule. Stored too high, epoch 2 could never win; too low, it
    # would always win: whichever the straight run shows wrong.
    state = torch.load(tmp_path / "paused" / "last.pt", weights_only=True)
    state["best_metric"] = 2.0 if straight.best_epoch == 2 else -math.inf
    # And it was written before a run could have several probes: its one probe, on stride 16, is under
    # "probe", and its config names neither the strides nor Disease_Risk's lesions.
    state["probe"] = state.pop("probes")[0]
    del state["config"]["probe_strides"], state["config"]["risk_lesions"]
    torch.save(state, tmp_path / "paused" / "last.pt")
    torch.manual_seed(12345)  # a resumed process starts from an unrelated global RNG state
    resumed = train(TrainConfig(out=tmp_path / "paused"), resume=True, progress=False)
    assert resumed.finished and resumed.epochs_run == 2

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "paused" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in a["ema"].items():
        torch.testing.assert_close(b["ema"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The lesion probe (on, and the data has masks) resumes with the network it reads.
    assert len(a["probes"]) == 1 and set(a["probes"][0]) == {"head.weight", "head.bias"}
    for key, value in a["probes"][0].items():
        torch.testing.assert_close(b["probes"][0][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for row_a, row_b in zip(straight.history, resumed.history, strict=True):
        for key in ("train_loss", "val_loss", "val_macro_auroc", "val_pointing", "lr", "input_size"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-5), key
    assert resumed.best_epoch == straight.best_epoch
    assert resumed.card is not None and straight.card is not None
    assert resumed.card.thresholds == pytest.approx(straight.card.thresholds, abs=1e-5)

    with pytest.raises(RuntimeError, match="already finished"):
        train(TrainConfig(out=tmp_path / "paused"), resume=True, progress=False)


def test_lesion_masks_train_the_maps_when_augmenting_on_the_device_too(
    synth_dataset: Path, small_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The batched augmenter (the path CUDA takes) warps the planes and the step adds the lesion term."""
    with caplog.at_level("INFO", logger="train.loop"):
        plain, taught = (
            train(
                _run(
                    tmp_path / str(weight), synth_dataset, small_cache, epochs=1, tta="none", aug_on="device",
                    lesion_loss=weight, select_by="auroc", probe_loss=weight, probe_strides=(8, 16),
                ),
                progress=False,
            )
            for weight in (0.0, 1.0)
        )
    assert (
        "lesion loss weight 1, probe weight 1 on strides 8 and 16, lesion cells balanced by pairs; "
        "Disease_Risk's lesion: all of them" in caplog.text
    )
    assert plain.card is not None and plain.card.localisation == "labels"
    assert taught.card is not None and taught.card.localisation == "lesion_masks"
    # The cross-entropy over a map's cells starts near log(cells): the taught run's loss carries it.
    assert taught.history[0]["train_loss"] > plain.history[0]["train_loss"] + 0.5
    # A probe on each stage it was told to (stride 8: blocks.2, 40 channels; 16: blocks.4, 112); off, none.
    assert torch.load(tmp_path / "0.0" / "last.pt", weights_only=True)["probes"] == []
    probes = torch.load(tmp_path / "1.0" / "last.pt", weights_only=True)["probes"]
    assert [probe["head.weight"].shape for probe in probes] == [(29, 40, 1, 1), (29, 112, 1, 1)]


def test_a_camera_with_a_grey_border_gets_a_fov_threshold_above_it_that_the_card_and_the_gate_carry(
    synth_dataset: Path, tmp_path: Path
) -> None:
    import shutil

    import cv2

    from retinagate import gate
    from train.datasets import read_image

    data = tmp_path / "grey"
    shutil.copytree(synth_dataset, data, ignore=shutil.ignore_patterns("dicom", "masks"))
    for path in sorted(data.glob("*/*.png")):
        image = read_image(path)
        outside = np.max(image, axis=2) <= 20  # the black border, which this camera lifts to grey
        image[outside] = 40
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    tests = [read_image(path) for path in sorted(data.glob("Test/*.png"))]
    assert all(gate.assess(photograph, threshold=20).reasons == (gate.NO_FOV,) for photograph in tests)

    fitted = train(_run(tmp_path / "fitted", data, tmp_path / "cache", epochs=1, tta="none"), progress=False)
    config = json.loads((tmp_path / "fitted" / "config.json").read_text())
    assert fitted.card is not None and 40 < fitted.card.preprocessing.fov_threshold == config["fov_threshold"] < 60
    level = fitted.card.preprocessing.fov_threshold
    assert all(gate.assess(photograph, threshold=level).reasons == () for photograph in tests)

    given = train(
        _run(tmp_path / "given", data, tmp_path / "cache", epochs=1, tta="none", fov_threshold=20), progress=False
    )
    assert given.card is not None and given.card.preprocessing.fov_threshold == 20
    # A run written before the threshold was fitted used the card's default when resumed.
    stored = {k: v for k, v in config.items() if k != "fov_threshold"}
    assert TrainConfig.from_dict(stored).fov_threshold == 20


def test_automatic_workers_load_inline_on_small_cpus_and_feed_gpus_generously() -> None:
    from train.loop import auto_workers

    assert auto_workers(torch.device("cpu"), cores=2) == 0
    assert auto_workers(torch.device("cpu"), cores=16) == 4
    assert auto_workers(torch.device("cuda"), cores=16) == 8


def test_a_positive_weight_is_taken_back_off_the_saved_classifier_bias(
    synth_dataset: Path, small_cache: Path, tmp_path: Path
) -> None:
    from train.datasets import find_rfmid_splits
    from train.losses import auto_pos_weight

    config = replace(_run(tmp_path / "run", synth_dataset, small_cache, pos_weight="auto", select_by="auroc"), epochs=1)
    result = train(config, progress=False)
    assert result.history[0]["val_pointing"] is None  # AUROC alone picks the epoch: no game in the loop
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    ema = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["ema"]  # one epoch: best is last
    trained = {k.removeprefix("module."): v for k, v in ema.items()}
    weight = auto_pos_weight(find_rfmid_splits(synth_dataset)["train"].labels)
    assert weight.max() > 1  # some label is up-weighted, so the shift is not zero
    torch.testing.assert_close(best["model"]["classifier.bias"], trained["classifier.bias"] - torch.log(weight))
    torch.testing.assert_close(best["model"]["classifier.weight"], trained["classifier.weight"])
    assert result.card is not None and result.card.weights_sha256 == state_dict_sha256(best["model"])


def test_a_run_written_before_select_by_keeps_choosing_by_auroc_when_resumed(tmp_path: Path) -> None:
    stored = TrainConfig(out=tmp_path).to_dict()
    assert stored.pop("select_by") == "auroc+pointing"
    assert TrainConfig.from_dict(stored).select_by == "auroc"
    with pytest.raises(ValueError, match="select_by is 'pointing'; expected one of auroc, auroc\\+pointing"):
        TrainConfig(out=tmp_path, select_by="pointing")


def test_a_small_batch_is_refused_only_when_the_equivariance_pairs_it_cannot_hold_are_used(tmp_path: Path) -> None:
    assert TrainConfig(out=tmp_path, batch_size=4).batch_size == 4  # equivariance off: its pairs are unused
    with pytest.raises(ValueError, match=r"equivariance_pairs is 4; expected 1 to half the batch \(2\)"):
        TrainConfig(out=tmp_path, batch_size=4, equivariance=0.1)
    assert TrainConfig(out=tmp_path, batch_size=4, equivariance=0.1, equivariance_pairs=2).equivariance_pairs == 2


def test_the_pointing_game_counts_towards_the_epoch_choice_only_until_it_is_enough() -> None:
    """Below POINTING_ENOUGH a better game can outweigh a little AUROC; above it, AUROC alone decides."""
    low = POINTING_ENOUGH - 0.2
    assert selection_score(0.70, low + 0.1, None) > selection_score(0.72, low, None)
    assert selection_score(0.72, POINTING_ENOUGH, None) > selection_score(0.70, POINTING_ENOUGH + 0.1, None)
    assert selection_score(0.71, 0.95, None) == selection_score(0.71, POINTING_ENOUGH, None)
    assert selection_score(0.71, None, None) == 0.71  # no masks: AUROC
    assert selection_score(None, None, 0.3) == -0.3  # no AUROC: the loss


def test_a_run_written_before_tta_keeps_scoring_one_view_when_resumed(tmp_path: Path) -> None:
    stored = TrainConfig(out=tmp_path).to_dict()
    assert stored.pop("tta") == "rot180"
    assert TrainConfig.from_dict(stored).tta == "none"
    with pytest.raises(ValueError, match="tta is 'flip'; expected none or rot180"):
        TrainConfig(out=tmp_path, tta="flip")
