"""Recipe sweep on a GPU: many CPU-budget recipes, several synthetic seeds, one plain baseline, one run.

A recipe change judged on one synthetic seed is judged on noise: the pointing game over ~160 lesion
pairs moves by +-0.04 between seeds and between epochs. On the CPU one default run takes 13 minutes.
This script trains every listed variant of the default recipe (and the plain baseline of
``bench/bench_recipe.py``) on every listed tuning seed, a dozen runs at a time as separate processes on
one GPU, and reports each variant's mean and its paired difference from the default on the same seeds.
On an H100 with 16 host cores a dozen runs at once take about 2.5 minutes (they are bound by Python
and the host cores, not by the GPU): 24 runs, 8 variants on 3 seeds, in about 6 minutes. The GPU only
stands in for the CPU: every variant keeps the default's CPU budget unless it says otherwise, training
runs in fp32, and the winner must still be confirmed on the CPU on a seed never used here
(``bench/bench_recipe.py``).

The sets are made on the machine (hard mode, 640x480, 400/133/133), the preprocessing cache is built
once per seed and input size, and results are written as they finish (``--out``), so a run that hits
its time limit still leaves every finished row and the summary so far.

Examples::

    python bench/gpu_recipe_sweep.py --out /tmp/sweep                      # the built-in list, seeds 11,12,13
    python bench/gpu_recipe_sweep.py --device cpu --n 60 --epochs 1 --variants default,plain --seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Pure-Python packages the GPU machine lacks (or has older) can travel in .devsite, ahead of its own.
if (ROOT / ".devsite").is_dir():
    sys.path.insert(0, str(ROOT / ".devsite"))

from bench.bench_recipe import default_config, parse_variant, plain_config  # noqa: E402

#: Variants in priority order: ``NAME:field=value,...`` on the default recipe, or ``plain``/``default``.
#: Those marked (budget) keep the CPU time of 18 epochs at 288 px (the default when the sweep first ran)
#: within a few percent.
VARIANTS = [
    "default",
    "plain",
    "probe0:probe_loss=0",  # the default before the lesion probe (2026-12-06)
    "probe01:probe_loss=0.1",  # the default on 2026-12-06
    "probe03:probe_loss=0.3",  # the default before probe weight 1 (2026-12-07)
    "probe3:probe_loss=3",  # lost to weight 1 on fresh seed 20261222 (2026-12-07)
    "probe003:probe_loss=0.03",
    "pstride16:probe_strides=16",  # the default before the stride-8 probe (2026-12-07)
    "pstride8:probe_strides=8",  # lost to stride 16 on the tuning seeds (2026-12-07)
    "pstride4:probe_strides=4+8+16",  # a third probe on blocks.1: lost on tuning seed 11 (2026-12-07)
    "norisk:risk_lesions=false",  # the default before Disease_Risk's lesion was every lesion (2026-12-07)
    "nodiffuse:diffuse_lesions=false",  # before unmasked haze and tessellation covered the retina (2026-12-07)
    "probecells:probe_balance=cells",  # before the probes weighed each finding alike (2026-12-08)
    "les0:lesion_loss=0,probe_loss=0",  # the default before lesion masks trained the maps (2026-12-06)
    "les003:lesion_loss=0.03",
    "les02:lesion_loss=0.2",
    "lr3e3:lr=0.003",
    "lr4e3:lr=0.004",
    "lr3s320:lr=0.003,img_size=320,epochs=15",  # (budget)
    "s320e15:img_size=320,epochs=15",  # (budget) 1.23x per epoch, 15 epochs
    "s256e22:img_size=256,epochs=22",  # (budget) 0.79x per epoch, 22 epochs
    "s224os16:img_size=224,output_stride=16",  # (budget) 14x14 grid, ~1.0x
    "asl:loss=asl",
    "focal:loss=focal",
    "peak03:peak_loss=0.3",
    "bs32:batch_size=32,lr=0.003",
    "flip:aug=flip",  # the default before light augmentation (sweep of 2026-12-05)
    "wd05:weight_decay=0.05",
    "ema995:ema_decay=0.995",
    "gain6:contrast_gain=6.0",
    "sig03:contrast_sigma=0.03",
    "balanced:balanced_sampler=true",
    "posw:pos_weight=auto",
    "selauroc:select_by=auroc",
    "dp01:drop_path_rate=0.1",
    "e20:epochs=20",  # over budget: tuning seed 11 +0.010 test macro AUROC on the CPU (2026-12-07)
    "prog20:epochs=20,early_share=0.5",  # the first 10 of 20 epochs at 224 px
    "e24:epochs=24",  # over budget: what more time buys
    "s384:img_size=384",  # over budget: what resolution buys
]


def _recipe(spec: str, data: Path, out: Path, cache: Path, device: str, epochs: int | None) -> Any:
    if spec == "plain":
        config = plain_config(data, out, cache)
    elif spec == "default":
        config = default_config(data, out, cache)
    else:
        _, changes = parse_variant(spec)
        config = replace(default_config(data, out, cache), **changes)
    config = replace(config, device=device, precision="fp32", workers=0)
    return replace(config, epochs=epochs) if epochs is not None else config


def _run_job(job: dict[str, Any]) -> None:
    """Child process: one training run, its row written to ``job['result']``."""
    import torch

    from train.loop import train

    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "1")))
    config = _recipe(job["spec"], Path(job["data"]), Path(job["run"]), Path(job["cache"]), job["device"], job["epochs"])
    result = train(config, progress=False)
    test, val = result.test, result.validation
    if test is None or val is None:
        raise SystemExit("the data has no test or validation split")
    row = {
        "variant": job["spec"].partition(":")[0],
        "seed": job["seed"],
        "seconds": round(result.seconds, 1),
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "test_auroc": test.macro_auroc,
        "test_min": min((a for a in test.auroc if a is not None), default=None),
        "test_pointing": (test.extra.get("pointing_game") or {}).get("rate"),
        "val_auroc": val.macro_auroc,
        "val_pointing": (val.extra.get("pointing_game") or {}).get("rate"),
        "auroc": dict(zip(test.labels, test.auroc, strict=True)),
    }
    Path(job["result"]).write_text(json.dumps(row) + "\n", encoding="utf-8")


def _make_set(args: tuple[Path, int, int]) -> Path:
    from retinagate.synth import SynthConfig, write_dataset

    out, n, seed = args
    if not (out / "synth.json").is_file():
        write_dataset(out, SynthConfig(n=n, width=640, height=480, seed=seed))
    return out


def _warm_cache(spec: str, data: Path, cache: Path, device: str) -> None:
    from train.loop import _Run

    config = _recipe(spec, data, cache.parent / "warm", cache, device, None)
    run = _Run(config, progress=False)
    run.cache(run.sources)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "   n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def summary(rows: list[dict[str, Any]], order: list[str]) -> str:
    """Per variant: seeds done, means, and the paired difference from the default on the same seeds."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    lines = [
        f"{'variant':<10}{'seeds':>6}{'test AUROC':>11}{'dAUROC':>8}{'min':>7}{'pointing':>9}{'dpoint':>8}"
        f"{'val AUROC':>10}{'val pt':>8}{'dval':>7}{'sec':>6}  per seed (AUROC/pointing)"
    ]
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        paired = [(r, by[("default", r["seed"])]) for r in mine if ("default", r["seed"]) in by]

        def delta(key: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]] = paired) -> float | None:
            d = [a[key] - b[key] for a, b in pairs if a[key] is not None and b[key] is not None]
            return statistics.fmean(d) if d else None

        dval = None
        if paired:
            dval = statistics.fmean(
                ((a["val_auroc"] + (a["val_pointing"] or 0)) - (b["val_auroc"] + (b["val_pointing"] or 0))) / 2
                for a, b in paired
            )
        seeds = " ".join(
            f"{r['seed']}:{r['test_auroc']:.3f}/{(r['test_pointing'] or 0):.3f}"
            for r in sorted(mine, key=lambda r: r["seed"])
        )
        lines.append(
            f"{name:<10}{len(mine):>6}{_fmt(_mean([r['test_auroc'] for r in mine])):>11}"
            f"{_fmt(delta('test_auroc'), True):>8}{_fmt(_mean([r['test_min'] for r in mine])):>7}"
            f"{_fmt(_mean([r['test_pointing'] for r in mine])):>9}{_fmt(delta('test_pointing'), True):>8}"
            f"{_fmt(_mean([r['val_auroc'] for r in mine])):>10}{_fmt(_mean([r['val_pointing'] for r in mine])):>8}"
            f"{_fmt(dval, True):>7}{statistics.fmean(r['seconds'] for r in mine):>6.0f}  {seeds}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder (rows.jsonl and summary.txt only)")
    parser.add_argument("--work", type=Path, help="data, caches, runs and their logs (default: <out>/work)")
    parser.add_argument("--seeds", default="11,12,13", help="tuning seeds of the synthetic sets (comma list)")
    parser.add_argument("--n", type=int, default=666, help="photographs per set (default 666: 400/133/133)")
    parser.add_argument("--variants", help="comma list of variant names from the built-in list (default: all)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME:FIELD=VALUE,...", help="add a variant")
    parser.add_argument("--device", default="cuda", help="training device (default cuda)")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke runs)")
    parser.add_argument("--concurrency", type=int, default=12, help="runs at once (default 12)")
    parser.add_argument("--launch-until", type=float, default=1e9, help="start no run after this many seconds")
    parser.add_argument("--stop-at", type=float, default=1e9, help="kill what still runs after this many seconds")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        _run_job(json.loads(args.job))
        return 0

    started = time.monotonic()
    out = args.out.resolve()
    work = (args.work or out / "work").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    specs = {s.partition(":")[0]: s for s in VARIANTS + args.extra}
    order = [v.strip() for v in args.variants.split(",")] if args.variants else list(specs)
    order += [s.partition(":")[0] for s in args.extra if s.partition(":")[0] not in order]
    unknown = [v for v in order if v not in specs]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    with ProcessPoolExecutor(max_workers=len(seeds)) as pool:
        sets = dict(zip(seeds, pool.map(_make_set, [(work / f"hard-{s}", args.n, s) for s in seeds]), strict=True))
    log(f"sets ready: {', '.join(map(str, seeds))}")
    by_size = {_recipe(specs[v], work, work, work, args.device, None).img_size: specs[v] for v in order}
    for seed, data in sets.items():
        for spec in by_size.values():
            _warm_cache(spec, data, work / f"cache-{seed}", args.device)
    log("caches ready")

    jobs = [(name, seed) for name in order for seed in seeds]
    rows_file = out / "rows.jsonl"
    rows: list[dict[str, Any]] = []
    running: dict[tuple[str, int], tuple[subprocess.Popen[bytes], Path]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    failures = 0
    while jobs or running:
        now = time.monotonic() - started
        while jobs and len(running) < args.concurrency and now < args.launch_until:
            name, seed = jobs.pop(0)
            run = work / f"run-{name}-{seed}"
            job = {
                "spec": specs[name],
                "seed": seed,
                "data": str(sets[seed]),
                "run": str(run),
                "cache": str(work / f"cache-{seed}"),
                "device": args.device,
                "epochs": args.epochs,
                "result": str(run.with_suffix(".json")),
            }
            logfile = (work / f"log-{name}-{seed}.txt").open("wb")
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--job", json.dumps(job)],
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
            )
            running[(name, seed)] = (proc, run.with_suffix(".json"))
        if now >= args.launch_until:
            jobs.clear()
        for key, (proc, result) in list(running.items()):
            if proc.poll() is None:
                if now >= args.stop_at:
                    proc.kill()
                    proc.wait()
                    log(f"killed {key[0]} seed {key[1]} at the time limit")
                    del running[key]
                continue
            del running[key]
            if proc.returncode == 0 and result.is_file():
                row = json.loads(result.read_text(encoding="utf-8"))
                rows.append(row)
                with rows_file.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                (out / "summary.txt").write_text(summary(rows, order) + "\n", encoding="utf-8")
                log(
                    f"{key[0]} seed {key[1]}: AUROC {row['test_auroc']:.3f} pointing {row['test_pointing'] or 0:.3f}"
                    f" (best epoch {row['best_epoch']} of {row['epochs']}, {row['seconds']:.0f} s)"
                )
            else:
                tail = (work / f"log-{key[0]}-{key[1]}.txt").read_text(errors="replace")[-1500:]
                log(f"{key[0]} seed {key[1]} FAILED (exit {proc.returncode}):\n{tail}")
                failures += 1
                if failures >= 3 and not rows:
                    log("the first three runs failed: stopping")
                    jobs.clear()
                    args.stop_at = 0.0
        time.sleep(0.5)
    print("\n" + summary(rows, order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
