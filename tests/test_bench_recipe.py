"""bench/bench_recipe.py: the plain baseline stays plain whatever the default recipe becomes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from train.loop import TrainConfig


def test_the_plain_baseline_has_none_of_the_default_recipes_extras(
    tmp_path: Path, bench_module: Callable[[str], ModuleType]
) -> None:
    bench = bench_module("bench_recipe")
    plain = bench.plain_config(tmp_path / "data", tmp_path / "out", tmp_path / "cache")
    assert (plain.img_size, plain.epochs, plain.aug, plain.loss) == (224, 8, "flip", "bce")
    assert plain.contrast_sigma == 0 and plain.pos_weight == "none" and plain.peak_loss == plain.lesion_loss == 0
    assert not plain.ema and plain.min_lr_ratio == 1 and plain.warmup_epochs == 0 and plain.patience == 0
    assert not plain.pretrained and plain.output_stride == 32 and not plain.balanced_sampler
    assert plain.select_by == "auroc"
    default = bench.default_config(tmp_path / "data", tmp_path / "out", tmp_path / "cache")
    assert default == TrainConfig(out=tmp_path / "out", data=tmp_path / "data", cache_dir=tmp_path / "cache",
                                  pretrained=False, device="cpu")  # fmt: skip


def test_a_variant_is_the_default_recipe_with_the_named_fields_changed(
    bench_module: Callable[[str], ModuleType]
) -> None:
    bench = bench_module("bench_recipe")
    assert bench.parse_variant("pw:pos_weight=none,epochs=3,ema=false") == (
        "pw", {"pos_weight": "none", "epochs": 3, "ema": False}
    )
    assert bench.parse_variant("both:probe_strides=8+16") == ("both", {"probe_strides": (8, 16)})
    with pytest.raises(ValueError, match="'speed' is not a TrainConfig field"):
        bench.parse_variant("fast:speed=2")


def test_every_sweep_variant_is_a_valid_recipe_trained_in_fp32_on_the_named_device(
    tmp_path: Path, bench_module: Callable[[str], ModuleType]
) -> None:
    sweep = bench_module("gpu_recipe_sweep")
    configs = {
        spec.partition(":")[0]: sweep._recipe(spec, tmp_path, tmp_path / "out", tmp_path / "cache", "cuda", None)
        for spec in sweep.VARIANTS
    }
    assert all((c.device, c.precision, c.workers) == ("cuda", "fp32", 0) for c in configs.values())
    assert configs["plain"].img_size == 224 and configs["plain"].epochs == 8
    default, flip = configs["default"], configs["flip"]
    assert flip.aug == "flip" and default.aug == "light"
    assert flip == replace(default, aug="flip")


def test_the_sweep_pairs_each_variant_with_the_default_on_the_same_seeds(
    bench_module: Callable[[str], ModuleType]
) -> None:
    sweep = bench_module("gpu_recipe_sweep")

    def row(variant: str, seed: int, auroc: float, pointing: float) -> dict[str, object]:
        return {"variant": variant, "seed": seed, "seconds": 100.0, "test_auroc": auroc, "test_min": 0.3,
                "test_pointing": pointing, "val_auroc": auroc, "val_pointing": pointing}  # fmt: skip

    rows = [row("default", 1, 0.70, 0.30), row("default", 2, 0.80, 0.40),
            row("lr", 1, 0.75, 0.40), row("lr", 2, 0.79, 0.40), row("lr", 3, 0.10, 0.00)]  # fmt: skip
    table = sweep.summary(rows, ["default", "lr"]).splitlines()
    lr = next(line for line in table if line.startswith("lr "))
    # seed 3 has no default run: it counts in the mean (0.547) but not in the paired difference
    assert lr.split()[1:5] == ["3", "0.547", "+0.020", "0.300"]
    assert lr.split()[6] == "+0.050"
