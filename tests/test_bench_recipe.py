"""bench/bench_recipe.py: the plain baseline stays plain whatever the default recipe becomes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from train.loop import TrainConfig


def _bench_recipe() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_recipe.py"
    spec = importlib.util.spec_from_file_location("bench_recipe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plain_baseline_has_none_of_the_default_recipes_extras(tmp_path: Path) -> None:
    bench = _bench_recipe()
    plain = bench.plain_config(tmp_path / "data", tmp_path / "out", tmp_path / "cache")
    assert (plain.img_size, plain.epochs, plain.aug, plain.loss) == (224, 8, "flip", "bce")
    assert plain.contrast_sigma == 0 and plain.pos_weight == "none" and plain.peak_loss == 0
    assert not plain.ema and plain.min_lr_ratio == 1 and plain.warmup_epochs == 0 and plain.patience == 0
    assert not plain.pretrained and plain.output_stride == 32 and not plain.balanced_sampler
    assert plain.select_by == "auroc"
    default = bench.default_config(tmp_path / "data", tmp_path / "out", tmp_path / "cache")
    assert default == TrainConfig(out=tmp_path / "out", data=tmp_path / "data", cache_dir=tmp_path / "cache",
                                  pretrained=False, device="cpu")  # fmt: skip


def test_a_variant_is_the_default_recipe_with_the_named_fields_changed() -> None:
    bench = _bench_recipe()
    assert bench.parse_variant("pw:pos_weight=none,epochs=3,ema=false") == (
        "pw", {"pos_weight": "none", "epochs": 3, "ema": False}
    )
    with pytest.raises(ValueError, match="'speed' is not a TrainConfig field"):
        bench.parse_variant("fast:speed=2")
