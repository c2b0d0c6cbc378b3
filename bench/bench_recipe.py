"""Model quality: the default training recipe against the plain baseline, in the same run, same data.

Every change to the recipe is judged here: both recipes train from random initialisation on the same
synthetic photographs (hard mode, a seed that was never used for tuning) and are scored on the same
test split, by per-label AUROC, macro AUROC and the pointing game (the strongest CAM cell within half
a cell of the planted lesion). The plain baseline is what a newcomer would write: timm EfficientNet-B0,
AdamW at a constant learning rate, BCE, flips only, the same field-of-view crop, 8 epochs at 224 px.
Wall time per recipe is reported too (the default recipe must train 400 photographs in at most 15
minutes on a 2-core machine). The per-label table's Disease_Risk row scores that label's map, the one
a reader sees when no finding is above threshold, against every lesion of each photograph positive
for it.

Examples::

    .venv/bin/python bench/bench_recipe.py                      # makes 666 hard photographs (seed 20261227)
    .venv/bin/python bench/bench_recipe.py --data DIR --json out.json
    .venv/bin/python bench/bench_recipe.py --recipes default --epochs 2   # a quick smoke run
    .venv/bin/python bench/bench_recipe.py --data DIR --variant bs8:batch_size=8 --recipes default,bs8
    .venv/bin/python bench/second_generator.py --out DIR && .venv/bin/python bench/bench_recipe.py --data DIR
                                                                # off its home ground: another generator's set
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from retinagate.labels import DISEASE_RISK, LABELS
from retinagate.synth import SynthConfig, write_dataset
from train.loop import RunResult, TrainConfig, evaluate_checkpoint, train

#: Seed of the README's report set: never used while tuning the recipe (tuning used seeds 11, 12 and 13;
#: 7301 and 20261205 to 20261224 were report seeds before, each retired once a recipe change had been
#: judged on it, and 20261225 measured the unchanged default again; 20261226 judged progressive
#: resizing). The next recipe change is judged on a new seed.
REPORT_SEED = 20261227


def plain_config(data: Path, out: Path, cache: Path) -> TrainConfig:
    """The plain baseline: flips, BCE, AdamW at a constant rate, 8 epochs at 224 px, no extras.

    Every field that shapes the recipe is spelled out, so a change of TrainConfig's defaults (the
    default recipe) never leaks into the baseline it is measured against.
    """
    return TrainConfig(
        out=out,
        data=data,
        cache_dir=cache,
        epochs=8,
        img_size=224,
        early_share=0.0,
        contrast_sigma=0.0,
        batch_size=16,
        lr=1e-3,
        weight_decay=0.01,
        aug="flip",
        loss="bce",
        peak_loss=0.0,
        lesion_loss=0.0,
        probe_loss=0.0,
        pos_weight="none",
        balanced_sampler=False,
        ema=False,
        warmup_epochs=0.0,
        min_lr_ratio=1.0,
        grad_clip=0.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        output_stride=32,
        tta="none",
        freeze_stages=0,
        patience=0,
        select_by="auroc",
        pretrained=False,
        weights=None,
        precision="fp32",
        device="cpu",
        seed=0,
    )


def default_config(data: Path, out: Path, cache: Path) -> TrainConfig:
    """What ``retinagate train --data DIR --no-pretrained --device cpu`` runs."""
    return TrainConfig(out=out, data=data, cache_dir=cache, pretrained=False, device="cpu")


RECIPES = {"plain": plain_config, "default": default_config}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:field=value[,field=value...]``: the default recipe with some TrainConfig fields changed
    (a tuple's items joined by ``+``)."""
    name, sep, body = text.partition(":")
    if not sep or not name or not body:
        raise ValueError(f"--variant {text!r}: expected NAME:field=value[,field=value...]")
    types = {f.name: type(getattr(TrainConfig(out=Path()), f.name)) for f in fields(TrainConfig)}
    changes: dict[str, Any] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise ValueError(f"--variant {text!r}: {key!r} is not a TrainConfig field")
        kind = types[key]
        if kind is bool:
            changes[key] = value.lower() in ("1", "true", "yes")
        elif kind is tuple:  # probe_strides=8+16
            changes[key] = tuple(int(part) for part in value.split("+"))
        else:
            changes[key] = kind(value)
    return name, changes


def risk_map_pointing(run: Path, data: Path) -> dict[str, int]:
    """Disease_Risk's map, the one a reader sees when no finding is above threshold, against every lesion of
    each test photograph positive for it: the pointing game with the union of the photograph's masks."""
    best = run / "best.pt"
    metrics, _ = evaluate_checkpoint(best, "test", data=data, pointing_labels=(DISEASE_RISK,), progress=False)
    game = metrics.extra.get("pointing_game") or {}
    return {"hits": game.get("hits", 0), "total": game.get("total", 0)}


def _row(name: str, result: RunResult, data: Path) -> dict[str, Any]:
    test = result.test
    if test is None:
        raise SystemExit("the data has no test split")
    game = test.extra.get("pointing_game") or {}
    return {
        "recipe": name,
        "seconds": round(result.seconds, 1),
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "macro_auroc": test.macro_auroc,
        "min_auroc": min((a for a in test.auroc if a is not None), default=None),
        "pointing_game": game.get("rate"),
        "pointing_pairs": game.get("total"),
        "pointing_chance": game.get("chance"),
        "auroc": dict(zip(test.labels, test.auroc, strict=True)),
        "pointing_per_label": {**game.get("per_label", {}), DISEASE_RISK: risk_map_pointing(result.out, data)},
    }


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="an RFMiD-layout folder with masks (default: make one)")
    parser.add_argument("--seed", type=int, default=REPORT_SEED, help=f"synthetic set seed (default {REPORT_SEED})")
    parser.add_argument("--n", type=int, default=666, help="photographs over 3 splits (default 666: 400/133/133)")
    parser.add_argument("--recipes", default="plain,default", help="comma list of plain, default")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke runs)")
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:FIELD=VALUE,...",
        help="a further recipe: the default with TrainConfig fields changed (repeatable; list it in --recipes)",
    )
    args = parser.parse_args(argv)
    recipes = dict(RECIPES)
    for text in args.variant:
        try:
            variant, changes = parse_variant(text)
        except ValueError as exc:
            parser.error(str(exc))
        recipes[variant] = lambda d, o, c, changes=changes: replace(default_config(d, o, c), **changes)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in recipes]
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(unknown)}; expected one of {', '.join(recipes)}")

    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as scratch:
        work = args.work or Path(scratch)
        data = args.data
        if data is None:
            data = work / f"hard-{args.seed}"
            if not (data / "synth.json").is_file():
                print(f"making {args.n} hard-mode photographs (640x480, seed {args.seed})", file=sys.stderr)
                write_dataset(data, SynthConfig(n=args.n, width=640, height=480, seed=args.seed))
        rows = []
        for name in names:
            config = recipes[name](data, work / f"run-{name}", work / "cache")
            if args.epochs is not None:
                config = replace(config, epochs=args.epochs)
            print(f"training {name} ...", file=sys.stderr)
            rows.append(_row(name, train(config, progress=sys.stderr.isatty()), data))

    print(f"\n{'recipe':<10}{'seconds':>9}{'epochs':>8}{'macro AUROC':>13}{'min AUROC':>11}{'pointing':>10}")
    for row in rows:
        print(
            f"{row['recipe']:<10}{row['seconds']:>9.0f}{row['epochs']:>8}{_fmt(row['macro_auroc']):>13}"
            f"{_fmt(row['min_auroc']):>11}{_fmt(row['pointing_game']):>10}"
        )
    print(f"\n{'label':<14}" + "".join(f"{r['recipe'] + ' AUROC':>15}{'pointing':>10}" for r in rows))
    for label in LABELS:
        cells = []
        for row in rows:
            played = row["pointing_per_label"].get(label)
            point = f"{played['hits']}/{played['total']}" if played else ""
            cells.append(f"{_fmt(row['auroc'].get(label)):>15}{point:>10}")
        print(f"{label:<14}" + "".join(cells))
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "data": str(data), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
