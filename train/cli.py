"""``retinagate train`` and ``retinagate evaluate``.

Only the standard library is imported here; PyTorch and the training code load inside the handlers,
so ``retinagate --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.settings import Settings
    from train.metrics import Metrics

_SUPPRESS = argparse.SUPPRESS


def register(subparsers: Any) -> None:
    """Adds ``train`` and ``evaluate``."""
    train = subparsers.add_parser(
        "train",
        help="fine-tune EfficientNet-B0 on RFMiD-format data (or a labels CSV)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Trains the 29-label fundus classifier and writes a run folder: config.json, metrics.csv, "
            "best.pt (the best validation epoch, see --select-by), last.pt (for --resume), model_card.json (with "
            "per-label thresholds calibrated on validation) and PNG plots.\n\n"
            "Data: --data DIR in the RFMiD layout (official download or `retinagate synth` output), or "
            "--labels-csv CSV --images DIR (a path column plus 0/1 columns named like the 29 labels, "
            "optional split column). Photographs are FOV-cropped and resized once into a cache.\n\n"
            "Example:\n  retinagate synth var/synth --n 600\n"
            "  retinagate train --data var/synth --out var/runs/r1 --epochs 4 --no-pretrained"
        ),
    )
    data = train.add_argument_group("data")
    data.add_argument("--data", type=Path, default=_SUPPRESS, metavar="DIR", help="dataset folder in the RFMiD layout")
    data.add_argument("--labels-csv", type=Path, default=_SUPPRESS, metavar="CSV", help="generic labels CSV")
    data.add_argument("--images", type=Path, default=_SUPPRESS, metavar="DIR", help="folder the CSV's paths start from")
    data.add_argument(
        "--masks",
        type=Path,
        default=_SUPPRESS,
        metavar="DIR",
        help="lesion masks, <DIR>/<image folders>/<ID>_<COLUMN>.png (or <ID>_<COLUMN>_<n>.png, <ID>/<COLUMN>.png, "
        "<COLUMN>/<ID>.png, <ID>.png for all of a photograph's lesions; PNG, BMP, TIFF or JPEG), for the lesion "
        "loss, the epoch choice and the report's pointing game (default: the data folder's folders that say "
        "mask, such as <data>/masks where retinagate synth writes them)",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=_SUPPRESS,
        metavar="F",
        help="validation share for a CSV without a split column (default 0.2)",
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=_SUPPRESS,
        metavar="F",
        help="test share for a CSV without a split column (default 0)",
    )
    data.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="preprocessing cache, shared between runs (default <data_dir>/cache/train)",
    )
    data.add_argument("--img-size", type=int, default=_SUPPRESS, metavar="PX", help="model input side (default 288)")
    data.add_argument(
        "--early-size",
        type=int,
        default=_SUPPRESS,
        metavar="PX",
        help="input side of the early epochs (progressive resizing), when smaller than --img-size (default 224)",
    )
    data.add_argument(
        "--early-share",
        type=float,
        default=_SUPPRESS,
        metavar="F",
        help="share of the epochs trained at --early-size before the rest at --img-size (default 0.5; 0: none)",
    )
    data.add_argument(
        "--contrast-sigma",
        type=float,
        default=_SUPPRESS,
        metavar="S",
        help="local contrast normalisation: sigma of the local mean, a share of the input side (default 0.04; 0: off)",
    )
    data.add_argument(
        "--contrast-gain", type=float, default=_SUPPRESS, metavar="G", help="gain on the local difference (default 4)"
    )
    data.add_argument(
        "--fov-threshold",
        type=_fov_threshold,
        default=_SUPPRESS,
        metavar="LEVEL",
        help=(
            "brightest-channel level that parts the field of view from the border, 0-255, or auto (the default): "
            "20, raised above the border when the training photographs' border is brighter"
        ),
    )

    run = train.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder to write")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from last.pt")
    run.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        metavar="N",
        help="run at most N epochs now, then exit; continue later with --resume",
    )
    run.add_argument("--epochs", type=int, default=_SUPPRESS, metavar="N", help="epochs (default 20)")
    run.add_argument("--batch-size", type=int, default=_SUPPRESS, metavar="B", help="batch size (default 8)")
    run.add_argument("--device", default=_SUPPRESS, metavar="auto|cpu|cuda", help="where to train (default auto)")
    run.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16", "bf16"),
        default=_SUPPRESS,
        help="auto: fp16 AMP with a grad scaler on CUDA, fp32 on CPU (default auto)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=_SUPPRESS,
        metavar="N",
        help="data loader processes (default: up to 8 on CUDA; on the CPU none up to 4 cores, then cores/4)",
    )
    run.add_argument("--seed", type=int, default=_SUPPRESS, help="seed of every random choice (default 0)")
    run.add_argument(
        "--patience",
        type=int,
        default=_SUPPRESS,
        metavar="N",
        help="early stopping: epochs without a better validation score (--select-by) (default 5; 0: off)",
    )
    run.add_argument(
        "--select-by",
        choices=("auroc", "auroc+pointing"),
        default=_SUPPRESS,
        help="what picks best.pt and drives early stopping: validation macro AUROC, or its mean with the "
        "validation pointing game (counted up to 0.8) when the data has lesion masks (default auroc+pointing)",
    )
    run.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=_SUPPRESS,
        help="NHWC memory format (default on)",
    )
    run.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    model = train.add_argument_group("model")
    model.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=_SUPPRESS,
        help="start from ImageNet weights via timm (default on; needs network or a warm cache)",
    )
    model.add_argument(
        "--weights", type=Path, default=_SUPPRESS, metavar="PATH", help="start from a local timm checkpoint instead"
    )
    model.add_argument(
        "--freeze-stages",
        type=int,
        default=_SUPPRESS,
        metavar="K",
        help="freeze the stem and the first K of 7 block stages (default 0)",
    )
    model.add_argument("--drop-rate", type=float, default=_SUPPRESS, help="dropout before the head (default 0)")
    model.add_argument("--drop-path-rate", type=float, default=_SUPPRESS, help="stochastic depth (default 0)")
    model.add_argument(
        "--output-stride",
        type=int,
        choices=(16, 32),
        default=_SUPPRESS,
        help="input pixels per CAM cell: 32, or 16 for a CAM twice as fine (dilated last stages) (default 32)",
    )
    model.add_argument(
        "--tta",
        choices=("rot180", "none"),
        default=_SUPPRESS,
        help="test-time views for the report, its thresholds, evaluate and the exported graph: rot180 "
        "averages the feature maps of the photograph and of its 180-degree turn (twice the inference compute; "
        "the maps sit nearer the lesions and the CAM stays exact Grad-CAM), none scores one view; the "
        "per-epoch validation that picks best.pt uses one view either way (default rot180)",
    )
    model.add_argument("--name", default=_SUPPRESS, help="model name for the card")
    model.add_argument("--version", default=_SUPPRESS, help="model version for the card (default 0.1.0)")

    optim = train.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=_SUPPRESS, help="peak learning rate, AdamW (default 2e-3)")
    optim.add_argument("--weight-decay", type=float, default=_SUPPRESS, help="AdamW weight decay (default 0.01)")
    optim.add_argument("--warmup-epochs", type=float, default=_SUPPRESS, help="linear warmup, epochs (default 1)")
    optim.add_argument(
        "--min-lr-ratio", type=float, default=_SUPPRESS, help="final learning rate as a share of --lr (default 0.01)"
    )
    optim.add_argument("--grad-clip", type=float, default=_SUPPRESS, help="gradient-norm clip (default 1; 0 off)")
    optim.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=_SUPPRESS,
        help="validate and save an exponential moving average of the weights (default on)",
    )
    optim.add_argument("--ema-decay", type=float, default=_SUPPRESS, help="EMA decay (default 0.998)")
    optim.add_argument(
        "--loss",
        choices=("bce", "asl", "focal"),
        default=_SUPPRESS,
        help="bce, asymmetric (asl) or focal loss (default bce)",
    )
    optim.add_argument(
        "--peak-loss",
        type=float,
        default=_SUPPRESS,
        help="weight of the same loss on log-sum-exp pooled class maps, which makes each map peak at its "
        "evidence (training only; default 0: off)",
    )
    optim.add_argument("--peak-sharpness", type=float, default=_SUPPRESS, help="sharpness of that pooling (default 5)")
    optim.add_argument(
        "--equivariance",
        type=float,
        default=_SUPPRESS,
        help="weight of the loss that makes each class map turn with the photograph (pairs of a photograph "
        "and its 180-degree turn in every batch), so the CAM cannot sit a fixed offset away from the lesion "
        "(default 0: off)",
    )
    optim.add_argument(
        "--equivariance-pairs",
        type=int,
        default=_SUPPRESS,
        metavar="K",
        help="with --equivariance: the last K images of each batch are replaced by the first K turned (default 4)",
    )
    optim.add_argument(
        "--lesion-loss",
        type=float,
        default=_SUPPRESS,
        metavar="W",
        help="weight of the loss that asks each positive label's class map to put its mass on the label's "
        "lesion, when the training photographs have lesion masks (--masks); "
        "training only (default 0.01; 0: off; no effect without masks)",
    )
    optim.add_argument(
        "--probe-loss",
        type=float,
        default=_SUPPRESS,
        metavar="W",
        help="weight of the loss that asks a 1x1 probe on each of the network's finer stages (--probe-strides) "
        "where each label's lesions are and are not, when the training photographs have lesion masks; "
        "training only, the probe is not exported (default 1; 0: off; no effect without masks)",
    )
    optim.add_argument(
        "--probe-strides",
        type=int,
        nargs="+",
        choices=(4, 8, 16),
        default=_SUPPRESS,
        metavar="S",
        help="input pixels per cell of the stages the lesion probes read, one probe each: any of 4, 8 and 16 "
        "(default 8 16)",
    )
    optim.add_argument(
        "--probe-balance",
        choices=("cells", "pairs"),
        default=_SUPPRESS,
        help="what weighs the same among the lesion cells of the probes' loss: each cell, or each positive "
        "(photograph, label) pair, so that a retina-wide haze or tessellation does not outweigh the focal lesions "
        "(default pairs)",
    )
    optim.add_argument(
        "--risk-lesions",
        action=argparse.BooleanOptionalAction,
        default=_SUPPRESS,
        help="with lesion masks: Disease_Risk's lesion is every lesion of the photograph, for the lesion loss and "
        "the probes, so its map (shown when no finding is above threshold) points at them (default on)",
    )
    optim.add_argument(
        "--diffuse-lesions",
        action=argparse.BooleanOptionalAction,
        default=_SUPPRESS,
        help="with lesion masks: a positive media haze or tessellation without a mask of its own covers the field "
        "of view, for the lesion loss and the probes, and is Disease_Risk's lesion only on a photograph without "
        "another (default on)",
    )
    optim.add_argument(
        "--pos-weight",
        choices=("none", "auto"),
        default=_SUPPRESS,
        help="auto: weight positives by negatives/positives per label; the saved bias takes the shift back off "
        "(default none)",
    )
    optim.add_argument(
        "--balanced-sampler",
        action=argparse.BooleanOptionalAction,
        default=_SUPPRESS,
        help="sample images favouring rare labels (default off)",
    )
    optim.add_argument(
        "--aug",
        choices=("none", "flip", "light", "strong"),
        default=_SUPPRESS,
        help=(
            "augmentation level: none, flip (flips only), light (flips, small rotation and scale, mild colour),"
            " strong (default light)"
        ),
    )
    optim.add_argument(
        "--aug-on",
        choices=("auto", "workers", "device"),
        default=_SUPPRESS,
        help="where augmentation runs: loader workers, batched on the GPU, or auto (GPU on CUDA)",
    )
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="print a checkpoint's metrics on a split",
        description=(
            "Evaluates best.pt (or last.pt) on a split: per-label AUROC, average precision and F1 at the "
            "card's thresholds, macro AUROC, mAP, Disease_Risk AUROC and the RIADD score. The data "
            "location defaults to the one the checkpoint was trained on."
        ),
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True, metavar="PATH", help="checkpoint (best.pt)")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test", help="split (default test)")
    evaluate.add_argument("--data", type=Path, default=None, metavar="DIR", help="dataset folder (RFMiD layout)")
    evaluate.add_argument("--labels-csv", type=Path, default=None, metavar="CSV", help="generic labels CSV")
    evaluate.add_argument("--images", type=Path, default=None, metavar="DIR", help="folder the CSV's paths start from")
    evaluate.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help="preprocessing cache")
    evaluate.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help="where to run (default auto)")
    evaluate.add_argument("--batch-size", type=int, default=64, metavar="B", help="batch size (default 64)")
    evaluate.add_argument(
        "--pointing-game",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score where the CAMs point against lesion masks (default: whenever the mask folder exists)",
    )
    evaluate.add_argument(
        "--masks",
        type=Path,
        default=None,
        metavar="DIR",
        help="lesion mask folder for the pointing game, laid out as for train --masks (default: the data "
        "folder's folders that say mask, such as <data>/masks)",
    )
    evaluate.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="PX",
        help="pointing game: a hit lies within PX model-input pixels of a lesion (default: half a CAM cell)",
    )
    evaluate.add_argument("--json", action="store_true", help="print JSON on stdout")
    evaluate.set_defaults(handler=_evaluate)


def _fov_threshold(text: str) -> int | None:
    """``auto`` (fitted when training starts) or a level 0-255."""
    if text == "auto":
        return None
    try:
        level = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a level 0-255 or auto") from None
    if not 0 <= level <= 255:
        raise argparse.ArgumentTypeError(f"{level} is outside 0-255")
    return level


def _command_error(exc: BaseException) -> Exception:
    """Maps library exceptions to :class:`retinagate.cli.CommandError` with a meaningful exit code."""
    from retinagate.cli import EXIT_FAILED, EXIT_MISSING, EXIT_USAGE, CommandError
    from train.datasets import DataSourceError, MissingDataError
    from train.loop import TrainingError
    from train.model import PretrainedUnavailableError

    if isinstance(exc, MissingDataError | FileNotFoundError | PretrainedUnavailableError):
        return CommandError(str(exc), EXIT_MISSING)
    if isinstance(exc, DataSourceError | TrainingError | ValueError):
        return CommandError(str(exc), EXIT_USAGE)
    return CommandError(str(exc), EXIT_FAILED)


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_USAGE, CommandError
    from train.datasets import DataSourceError
    from train.loop import TrainConfig, TrainingError, train
    from train.model import PretrainedUnavailableError

    # Every TrainConfig field but `out` has a flag of the same name; an option not given stays unset
    # (argparse.SUPPRESS) so that TrainConfig's default, or a resumed run's own value, applies.
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "out" and hasattr(args, f.name)}
    if given.get("cache_dir") is None:
        given["cache_dir"] = Path(settings.data_dir) / "cache" / "train"
    if args.resume:
        config_source = args.out / "last.pt"
        if not config_source.is_file():
            raise CommandError(f"--resume: nothing to resume, {config_source} does not exist", EXIT_USAGE)
    elif "data" not in given and "labels_csv" not in given:
        raise CommandError(
            "no training data: give --data DIR (RFMiD layout) or --labels-csv CSV --images DIR", EXIT_USAGE
        )
    if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
        raise CommandError(f"--stop-after-epochs is {args.stop_after_epochs}; expected at least 1", EXIT_USAGE)
    try:
        config = TrainConfig(out=args.out, **given)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        result = train(
            config, resume=args.resume, stop_after_epochs=args.stop_after_epochs, progress=sys.stderr.isatty()
        )
    except (DataSourceError, TrainingError, PretrainedUnavailableError, FileNotFoundError) as exc:
        raise _command_error(exc) from None

    summary: dict[str, Any] = {
        "out": str(result.out),
        "finished": result.finished,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 1),
        "validation": _summary(result.validation),
        "test": _summary(result.test),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not result.finished:
        print(f"paused after epoch {result.epochs_run}; continue with: retinagate train --out {result.out} --resume")
    else:
        print(
            f"trained {result.epochs_run} epochs in {result.seconds:.0f} s"
            f"{' (stopped early)' if result.stopped_early else ''}; best epoch {result.best_epoch}"
        )
        if result.validation is not None:
            print(f"validation: {_headline(result.validation)}")
        if result.test is not None:
            print(f"test:       {_headline(result.test)}")
        print(f"run folder: {result.out} (best.pt, model_card.json, metrics.csv, plots)")
    return 0


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _headline(metrics: Metrics) -> str:
    line = (
        f"macro AUROC {_fmt(metrics.macro_auroc)}, mAP {_fmt(metrics.map)}, "
        f"Disease_Risk AUROC {_fmt(metrics.disease_risk_auroc)}, RIADD score {_fmt(metrics.riadd_score)}"
    )
    game = metrics.extra.get("pointing_game")
    if game:
        line += f", pointing game {_fmt(game['rate'])} ({game['hits']}/{game['total']}, chance {_fmt(game['chance'])})"
    return line


def _summary(metrics: Metrics | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    game = metrics.extra.get("pointing_game")
    return {**metrics.summary(), "pointing_game": game["rate"] if game else None}


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from train.datasets import DataSourceError
    from train.loop import TrainingError, evaluate_checkpoint

    if args.batch_size < 1:
        raise _command_error(TrainingError(f"--batch-size is {args.batch_size}; expected at least 1"))
    if args.tolerance is not None and args.tolerance < 0:
        raise _command_error(TrainingError(f"--tolerance is {args.tolerance}; expected >= 0 pixels"))
    try:
        metrics, card = evaluate_checkpoint(
            args.checkpoint,
            args.split,
            data=args.data,
            labels_csv=args.labels_csv,
            images=args.images,
            cache_dir=args.cache_dir,
            device=args.device,
            batch_size=args.batch_size,
            pointing_game=args.pointing_game,
            masks=args.masks,
            tolerance=args.tolerance,
            progress=sys.stderr.isatty(),
        )
    except (DataSourceError, TrainingError, FileNotFoundError) as exc:
        raise _command_error(exc) from None

    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split, **metrics.to_dict()}, indent=2))
        return 0
    print(f"{card.name} {card.version} on the {args.split} split ({metrics.count} images)")
    print(_headline(metrics))
    macro_f1 = metrics.extra.get("macro_f1")
    print(f"macro F1 at the card's thresholds {_fmt(macro_f1)}")
    game = metrics.extra.get("pointing_game") or {}
    pointing = game.get("per_label", {})
    print(f"\n{'label':<14}{'pos':>5}{'AUROC':>9}{'AP':>9}{'F1':>9}{'thresh':>9}{'pointing':>10}")
    f1 = metrics.extra.get("f1", {})
    for i, name in enumerate(metrics.labels):
        played = pointing.get(name)
        point = f"{played['hits']}/{played['total']}" if played else ""
        print(
            f"{name:<14}{metrics.positives[i]:>5}{_fmt(metrics.auroc[i]):>9}{_fmt(metrics.average_precision[i]):>9}"
            f"{_fmt(f1.get(name)):>9}{card.thresholds[i]:>9.3f}"
            f"{point:>10}"
        )
    return 0
