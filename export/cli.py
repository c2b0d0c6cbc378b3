"""``retinagate export``: a training checkpoint becomes the ONNX file the worker serves.

Only the standard library is imported here; PyTorch, ONNX and ONNX Runtime load inside the handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from export.validation import Labelled
    from retinagate.card import ModelCard
    from retinagate.settings import Settings

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Adds the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a training checkpoint to ONNX (with Grad-CAM outputs), plus fp16/int8 variants",
        description=(
            "Exports a RetinaGate checkpoint to the ONNX file the worker serves: input 'image' uint8 "
            "[N, S, S, 3] RGB, outputs 'logits', 'probabilities' and 'cam' (Grad-CAM for every label) "
            "and 'ood_score' (distance from the training photographs), with the model card in the file's "
            "metadata. The statistics behind ood_score are fitted on the training photographs named by the "
            "checkpoint's training config when the card has none and that data is on this machine; "
            "otherwise the file has no ood_score (a warning says why). The same photographs fit the card's "
            "gradability gate limits: a limit that would flag more than 1 in 400 of them is moved past them. "
            "The export is checked with ONNX "
            "Runtime against PyTorch run in float64, within float32's rounding error for the model. "
            "--fp16 also writes OUT.fp16.onnx (for GPUs); --int8 also writes OUT.int8.onnx "
            "(for CPUs), calibrated on the photographs in --calibration DIR, and reports its AUROC change "
            "on the validation split and its CPU speed-up."
        ),
        epilog="example: retinagate export --checkpoint runs/r1/best.pt --out models/model.onnx --int8 "
        "--calibration data/Training",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint (best.pt)")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write (fp32)")
    parser.add_argument("--fp16", action="store_true", help="also write a half-precision variant (OUT.fp16.onnx)")
    parser.add_argument("--int8", action="store_true", help="also write an int8 variant (OUT.int8.onnx)")
    parser.add_argument(
        "--no-ood",
        action="store_true",
        help="no ood_score output: neither fit OOD statistics nor use those in the checkpoint's card",
    )
    parser.add_argument("--calibration", type=Path, metavar="DIR", help="photographs (PNG/JPEG) to calibrate int8")
    parser.add_argument(
        "--calibration-count", type=int, default=64, metavar="N", help="calibration photographs used (default 64)"
    )
    parser.add_argument(
        "--int8-method",
        choices=("minmax", "percentile", "entropy"),
        default="minmax",
        help="how int8 activation ranges are chosen (default minmax)",
    )
    parser.add_argument(
        "--int8-target-db",
        type=float,
        default=25.0,  # export.quantize.DEFAULT_TARGET_SNR_DB; not imported here (stdlib only at module level)
        metavar="DB",
        help="accuracy target for int8: logit signal-to-noise on the calibration photographs; stages that "
        "miss it stay in float (default 25; 0 quantises everything)",
    )
    parser.add_argument(
        "--validation",
        type=Path,
        metavar="DATA",
        help="RFMiD-layout folder whose validation split measures AUROC (default: the checkpoint's training data)",
    )
    parser.add_argument(
        "--validation-limit", type=int, default=400, metavar="N", help="validation photographs used (default 400)"
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or newer (default 18)")
    parser.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="PyTorch exporter (default torchscript: fastest; dynamo: the newer torch.export path)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.set_defaults(handler=_export)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_images(card: ModelCard, validation: Labelled | None) -> NDArray[np.uint8]:
    """Inputs for the PyTorch comparison: random pixels, synthetic fundus photographs, validation photographs."""
    import numpy as np

    from retinagate.preprocess import prepare
    from retinagate.synth import render_fundus

    size = card.input_size
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    side = max(64, min(2 * size, 1024))
    fundus = [prepare(render_fundus(rng, side, max(64, side * 3 // 4)).image, card.preprocessing) for _ in range(2)]
    parts = [noise, np.stack(fundus)]
    if validation is not None:
        parts.append(validation.images[:4])
    return np.concatenate(parts)


def _file_summary(path: Path, card: ModelCard) -> dict[str, Any]:
    from retinagate.engine import file_sha256

    return {"precision": card.precision, "path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _variant_path(out: Path, precision: str) -> Path:
    return out.with_name(f"{out.stem}.{precision}{out.suffix or '.onnx'}")


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_FAILED, EXIT_MISSING, EXIT_USAGE, CommandError

    if not args.checkpoint.is_file():
        raise CommandError(f"--checkpoint: no such file: {args.checkpoint}", EXIT_MISSING)
    if args.int8 and args.calibration is None:
        raise CommandError("--int8 needs --calibration DIR (photographs like those the model will score)", EXIT_USAGE)
    if args.calibration is not None and not args.calibration.is_dir():
        raise CommandError(f"--calibration: no such folder: {args.calibration}", EXIT_MISSING)
    if args.validation is not None and not args.validation.is_dir():
        raise CommandError(f"--validation: no such folder: {args.validation}", EXIT_MISSING)
    if args.calibration_count < 2 or args.validation_limit < 1:
        raise CommandError("--calibration-count must be at least 2 and --validation-limit at least 1", EXIT_USAGE)

    import numpy as np

    from export.onnx_export import compare_with_torch, export_checkpoint
    from export.validation import macro_auroc, ort_outputs, read_validation, validation_from_config

    _note(f"exporting {args.checkpoint} ({args.exporter}, opset {args.opset}) ...")
    try:
        exported = export_checkpoint(
            args.checkpoint,
            args.out,
            opset=args.opset,
            exporter=args.exporter,
            ood="off" if args.no_ood else "fit",
            progress=True,
        )
    except ValueError as exc:
        raise CommandError(f"--checkpoint: {exc}", EXIT_USAGE) from None
    card = exported.card

    validation: Labelled | None = None
    try:
        if args.validation is not None:
            validation = read_validation(card, data=args.validation, limit=args.validation_limit)
        else:
            validation = validation_from_config(card, exported.config, limit=args.validation_limit)
    except ValueError as exc:
        if args.validation is not None:
            raise CommandError(f"--validation: {exc}", EXIT_USAGE) from None
        _note(f"no validation split ({exc})")

    images = _check_images(card, validation)
    _note(f"checking {args.out} against PyTorch (float64) on {len(images)} images ...")
    agreement = compare_with_torch(args.out, exported.cam_model, images)
    fp32: dict[str, Any] = {
        **_file_summary(args.out, card),
        "vs_pytorch": {
            "reference": "pytorch float64",
            "images": agreement.images,
            "logits_max_abs_diff": agreement.logits,
            "logits_max_relative_diff": agreement.logits_relative,
            "probabilities_max_abs_diff": agreement.probabilities,
            "cam_max_abs_diff": agreement.cam,
            "cam_max_relative_diff": agreement.cam_relative,
            "ood_score_max_abs_diff": agreement.ood_score,
            "ood_score_max_relative_diff": agreement.ood_relative,
            "pytorch_fp32_relative_diff": agreement.pytorch_relative,
            "tolerance": agreement.tolerance,
        },
    }
    if not agreement.within():
        args.out.unlink(missing_ok=True)
        ood = "" if agreement.ood_relative is None else f", ood_score {agreement.ood_relative:.2e}"
        raise CommandError(
            f"ONNX Runtime and PyTorch (float64) disagree: relative errors logits {agreement.logits_relative:.2e}, "
            f"cam {agreement.cam_relative:.2e}{ood}; the bound is {agreement.tolerance:.2e} (float32 rounding "
            f"for this model; PyTorch's own float32 error {agreement.pytorch_relative:.2e}); {args.out} removed",
            EXIT_FAILED,
        )

    reference_images = validation.images if validation is not None else images
    p32, _ = ort_outputs(args.out, reference_images)
    auroc32 = macro_auroc(validation.labels, p32) if validation is not None else None
    fp32["auroc"] = auroc32
    variants: list[dict[str, Any]] = [fp32]

    def compare(path: Path, variant_card: ModelCard) -> dict[str, Any]:
        probabilities, _ = ort_outputs(path, reference_images)
        summary = _file_summary(path, variant_card)
        summary["probabilities_max_abs_diff_vs_fp32"] = float(np.abs(probabilities - p32).max())
        summary["probabilities_mean_abs_diff_vs_fp32"] = float(np.abs(probabilities - p32).mean())
        if validation is not None:
            auroc = macro_auroc(validation.labels, probabilities)
            summary["auroc"] = auroc
            summary["auroc_change"] = None if auroc is None or auroc32 is None else auroc - auroc32
        return summary

    if args.fp16:
        from export.quantize import convert_fp16

        path = _variant_path(args.out, "fp16")
        _note(f"writing fp16 variant {path} ...")
        variants.append(compare(path, convert_fp16(args.out, path)))

    if args.int8:
        from export.quantize import calibration_images, quantize_int8
        from export.validation import seconds_per_image

        path = _variant_path(args.out, "int8")
        try:
            calibration, files = calibration_images(args.calibration, card.preprocessing, limit=args.calibration_count)
        except ValueError as exc:
            raise CommandError(f"--calibration: {exc}", EXIT_USAGE) from None
        _note(f"writing int8 variant {path} (calibrating on {len(files)} photographs) ...")
        quantized = quantize_int8(
            args.out,
            path,
            calibration,
            method=args.int8_method,
            target_snr_db=args.int8_target_db if args.int8_target_db > 0 else None,
        )
        summary = compare(path, quantized.card)
        _note("timing fp32 and int8 on the CPU ...")
        fp32_s = seconds_per_image(args.out, calibration, threads=settings.intra_op_threads)
        int8_s = seconds_per_image(path, calibration, threads=settings.intra_op_threads)
        summary |= {
            "calibration_images": len(files),
            "logits_snr_db": quantized.snr_db,
            "int8_convolutions": f"{quantized.quantized_convs}/{quantized.total_convs}",
            "cpu_ms_per_image": {"fp32": fp32_s * 1e3, "int8": int8_s * 1e3},
            "cpu_speedup": fp32_s / int8_s,
        }
        variants.append(summary)

    result = {
        "checkpoint": str(args.checkpoint),
        "model": {
            "name": card.name,
            "version": card.version,
            "input_size": card.input_size,
            "labels": len(card.labels),
            "output_stride": card.output_stride,
            "tta": card.tta,
            "cam_alignment": card.cam_alignment,
            "localisation": card.localisation,
        },
        "ood": None
        if card.ood is None
        else {"threshold": card.ood.threshold, "rank": card.ood.rank, "fitted_on": card.ood.fitted_on},
        "ood_note": exported.ood,
        "gate": None if card.gate is None else card.gate.model_dump(mode="json"),
        "gate_note": exported.gate,
        "exporter": args.exporter,
        "opset": args.opset,
        "validation": None if validation is None else {"origin": validation.origin, "images": len(validation.images)},
        "variants": variants,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_summary(result)
    return 0


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _print_summary(result: dict[str, Any]) -> None:
    model = result["model"]
    print(
        f"{model['name']} {model['version']}: {model['labels']} labels, input {model['input_size']} px, "
        f"output stride {model['output_stride']}, test-time views {model['tta']}, "
        f"CAM cells on the {model['cam_alignment'].replace('_', ' ')} grid, "
        f"trained on {model['localisation'].replace('_', ' ')}"
    )
    print(f"ood_score: {result['ood_note']}")
    print(f"gate limits: {result['gate_note']}")
    validation = result["validation"]
    if validation:
        print(f"validation: {validation['images']} images from {validation['origin']}")
    else:
        print("validation: none (no AUROC)")
    for variant in result["variants"]:
        size_mb = variant["bytes"] / 1e6
        print(f"{variant['precision']:>5}  {variant['path']}  {size_mb:.1f} MB  sha256 {variant['sha256'][:16]}")
        if "vs_pytorch" in variant:
            check = variant["vs_pytorch"]
            ood = check["ood_score_max_relative_diff"]
            print(
                f"       vs PyTorch (float64) on {check['images']} images: "
                f"logits max abs diff {check['logits_max_abs_diff']:.2e}; relative: logits "
                f"{check['logits_max_relative_diff']:.2e}, cam {check['cam_max_relative_diff']:.2e}"
                + ("" if ood is None else f", ood_score {ood:.2e}")
                + f" (bound {check['tolerance']:.2e})"
            )
            print(f"       AUROC {_fmt(variant.get('auroc'), '.4f')}")
        else:
            print(
                f"       vs fp32: probabilities max abs diff {variant['probabilities_max_abs_diff_vs_fp32']:.4f}, "
                f"AUROC {_fmt(variant.get('auroc'), '.4f')} (change {_fmt(variant.get('auroc_change'), '+.4f')})"
            )
        if "cpu_speedup" in variant:
            ms = variant["cpu_ms_per_image"]
            print(
                f"       int8 convolutions {variant['int8_convolutions']}, "
                f"logit SNR {variant['logits_snr_db']:.1f} dB; "
                f"CPU {ms['fp32']:.2f} -> {ms['int8']:.2f} ms/image (speed-up {variant['cpu_speedup']:.2f}x)"
            )
