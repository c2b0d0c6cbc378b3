"""Inference on this CPU: ONNX Runtime against PyTorch eager, in-graph Grad-CAM against pytorch-grad-cam, int8.

One run measures, on the same machine and thread count:

* the served ONNX graph (uint8 in; probabilities and all 29 CAMs out) on ONNX Runtime through
  :class:`retinagate.engine.Engine`, against the bare classifier in PyTorch eager (float input,
  logits only: the baseline does less work) at batch 1 and 16; goal: ONNX Runtime at least 2x faster;
* all 29 heatmaps of one image from the graph, against pytorch-grad-cam's ``GradCAM`` looping over
  the 29 labels (one forward and backward pass each); goal: at least 100x faster;
* the int8 variant (every stage quantised; :func:`export.quantize.quantize_int8` without the
  accuracy guard) against fp32 on ONNX Runtime;
* graph variants against today's graph (224 px, output stride 32, no ``ood_score``), each pair timed
  alternately at batch 1 and 16 with 1 and ``--threads`` threads: output stride 16 at 224 px (a
  14 x 14 CAM), 288 px and 384 px at stride 32, and today's graph with the ``ood_score`` output
  (statistics fitted on synthetic photographs), and the training default's graph: 288 px with local
  contrast normalisation (a separable Gaussian over four channels ahead of the classifier), with and
  without ``ood_score``; and the graph that serves two views of each photograph (``tta`` rot180, the
  photograph and its 180-degree turn as one batch), at 224 px and in the training default's graph.
  ``--variants-only`` runs just this part.

Makes its own model (EfficientNet-B0, 29 outputs, random weights with random batch-norm statistics,
or ``--checkpoint``) and inputs (synthetic fundus photographs). Times are the best of ``--repeats``
runs after a warm-up: other processes on a shared machine only ever add time. Prints a table last::

    .venv/bin/python bench/bench_inference.py --threads 2
    .venv/bin/python bench/bench_inference.py --variants-only --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import torch
from numpy.typing import NDArray

from export.graph import CamModel
from export.onnx_export import export_model, read_checkpoint
from export.quantize import quantize_int8
from retinagate.card import ModelCard, Preprocessing
from retinagate.engine import Engine
from retinagate.preprocess import prepare
from retinagate.synth import render_fundus
from train.model import create_model, random_model
from train.ood import fit_ood_statistics

#: (name, input size, output stride, with ood_score, contrast sigma, test-time views); the first is
#: the reference graph, the last the training default's.
VARIANTS: tuple[tuple[str, int, int, bool, float, str], ...] = (
    ("reference: 224 px, stride 32", 224, 32, False, 0.0, "none"),
    ("224 px, stride 16", 224, 16, False, 0.0, "none"),
    ("288 px, stride 32", 288, 32, False, 0.0, "none"),
    ("384 px, stride 32", 384, 32, False, 0.0, "none"),
    ("224 px, stride 32, ood_score", 224, 32, True, 0.0, "none"),
    ("288 px, stride 32, local contrast 0.04", 288, 32, False, 0.04, "none"),
    ("288 px, contrast 0.04, ood_score", 288, 32, True, 0.04, "none"),
    ("224 px, stride 32, rot180 views", 224, 32, False, 0.0, "rot180"),
    ("288 px, contrast, ood, rot180 (default)", 288, 32, True, 0.04, "rot180"),
)


def _cpu_session(path: Path, threads: int) -> ort.InferenceSession:
    """A session configured like the engine's CPU session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def fundus_batch(count: int, card: ModelCard, seed: int = 0) -> NDArray[np.uint8]:
    """Synthetic fundus photographs (a few lesions each), prepared to the model input."""
    rng = np.random.default_rng(seed)
    columns = ["DR", "ARMD", "MH", "ODC", "TSLN"]
    images = [
        prepare(render_fundus(rng, 640, 480, columns[i % 5 : i % 5 + 1]).image, card.preprocessing)
        for i in range(count)
    ]
    return np.stack(images)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    return paired_best_seconds(run, None, repeats)[0]


def paired_best_seconds(
    first: Callable[[], object], second: Callable[[], object] | None, repeats: int
) -> tuple[float, float]:
    """Best wall times of two calls timed alternately, so that load from other processes hits both alike."""
    runs = [first] if second is None else [first, second]
    for run in runs:
        run()
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            started = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - started)
    return best[0], best[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both runtimes (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--checkpoint", type=Path, help="a RetinaGate checkpoint instead of random weights")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 measurement")
    parser.add_argument("--no-variants", action="store_true", help="skip the graph variants (stride, size, ood_score)")
    parser.add_argument("--variants-only", action="store_true", help="measure only the graph variants")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.checkpoint is not None:
        model, card, _ = read_checkpoint(args.checkpoint)
    else:
        card = ModelCard(name="bench-random", preprocessing=Preprocessing(input_size=args.size))
        model = random_model(card)
    if args.variants_only:
        _print_table(measure_variants(model, card, args.threads, args.repeats))
        return 0
    size = card.input_size
    images = fundus_batch(16, card)
    rows: list[tuple[str, str, str, str]] = []

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as scratch:
        fp32_path = Path(scratch) / "model.onnx"
        export_model(model, card, fp32_path)
        engine = Engine(fp32_path, providers="cpu", intra_op_threads=args.threads, batch_size=16)
        print(f"model: {card.architecture}, {card.num_labels} labels, {size} px; threads {args.threads}")

        # 1. ONNX Runtime (whole served graph) vs PyTorch eager (bare classifier).
        normalise = CamModel(model, card).normalise
        for batch in (1, 16):
            x_uint8 = images[:batch]
            x_float = normalise(torch.from_numpy(x_uint8)).contiguous()

            def eager(x: torch.Tensor = x_float) -> torch.Tensor:
                with torch.inference_mode():
                    result: torch.Tensor = model(x)
                    return result

            # PyTorch runs with the requested threads and with one, and its faster run counts: on a
            # busy machine OpenMP's spinning threads can slow it severalfold; the baseline gets its best.
            torch_s, ort_s, torch_threads = float("inf"), float("inf"), args.threads
            for threads in dict.fromkeys((args.threads, 1)):
                torch.set_num_threads(threads)
                pair = paired_best_seconds(eager, lambda x=x_uint8: engine.predict(x), args.repeats)
                if pair[0] / batch < torch_s:
                    torch_s, torch_threads = pair[0] / batch, threads
                ort_s = min(ort_s, pair[1] / batch)
            torch.set_num_threads(args.threads)
            print(
                f"batch {batch:>2}: PyTorch eager {torch_s * 1e3:.2f} ms/img ({torch_threads} thread(s)), "
                f"ONNX Runtime {ort_s * 1e3:.2f} ms/img"
            )
            rows.append(
                (
                    f"ORT vs PyTorch eager, batch {batch}",
                    f"{torch_s * 1e3:.2f} -> {ort_s * 1e3:.2f} ms/img",
                    f"{torch_s / ort_s:.2f}x",
                    ">= 2x",
                )
            )

        # 2. All 29 heatmaps: in the graph vs pytorch-grad-cam, one image.
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        one = normalise(torch.from_numpy(images[:1])).contiguous()
        with GradCAM(model=model, target_layers=[model.bn2]) as gradcam:

            def library() -> None:
                for label in range(card.num_labels):
                    gradcam(input_tensor=one, targets=[ClassifierOutputTarget(label)])

            library_s = best_seconds(library, max(1, args.repeats // 2))
        # The same graph without the CAM head (ONNX Runtime runs every node whatever is fetched).
        no_cam_path = Path(scratch) / "no-cam.onnx"
        onnx.utils.extract_model(str(fp32_path), str(no_cam_path), ["image"], ["logits", "probabilities"])
        no_cam_session = _cpu_session(no_cam_path, args.threads)
        probabilities_only_s, graph_s = paired_best_seconds(
            lambda: no_cam_session.run(["probabilities"], {"image": images[:1]}),
            lambda: engine.predict(images[:1]),
            4 * args.repeats,
        )
        print(
            f"29 heatmaps, one image: pytorch-grad-cam {library_s * 1e3:.0f} ms "
            f"({library_s / card.num_labels * 1e3:.0f} ms per label); in-graph {graph_s * 1e3:.2f} ms "
            f"(the same graph without the CAM head {probabilities_only_s * 1e3:.2f} ms)"
        )
        rows.append(
            (
                "29 CAMs: in-graph vs pytorch-grad-cam",
                f"{library_s * 1e3:.0f} -> {graph_s * 1e3:.2f} ms",
                f"{library_s / graph_s:.0f}x",
                ">= 100x",
            )
        )
        rows.append(
            (
                "in-graph CAM cost (batch 1)",
                f"{probabilities_only_s * 1e3:.2f} -> {graph_s * 1e3:.2f} ms",
                f"{(graph_s - probabilities_only_s) * 1e3:+.2f} ms",
                "< 1 ms",
            )
        )

        # 3. int8 vs fp32 on ONNX Runtime.
        if not args.no_int8:
            int8_path = Path(scratch) / "model.int8.onnx"
            quantized = quantize_int8(fp32_path, int8_path, fundus_batch(16, card, seed=1), target_snr_db=None)
            int8_engine = Engine(int8_path, providers="cpu", intra_op_threads=args.threads, batch_size=16)
            for batch in (1, 16):
                fp32_s, int8_s = (
                    t / batch
                    for t in paired_best_seconds(
                        lambda b=batch: engine.predict(images[:b]),
                        lambda b=batch: int8_engine.predict(images[:b]),
                        args.repeats,
                    )
                )
                print(f"batch {batch:>2}: fp32 {fp32_s * 1e3:.2f} ms/img, int8 {int8_s * 1e3:.2f} ms/img")
                rows.append(
                    (
                        f"int8 vs fp32 (ORT), batch {batch}",
                        f"{fp32_s * 1e3:.2f} -> {int8_s * 1e3:.2f} ms/img",
                        f"{fp32_s / int8_s:.2f}x",
                        f"{quantized.quantized_convs}/{quantized.total_convs} convs int8",
                    )
                )

    if not args.no_variants:
        rows += measure_variants(model, card, args.threads, args.repeats)
        rows += measure_gate(card, args.repeats)
    _print_table(rows)
    return 0


def measure_gate(card: ModelCard, repeats: int) -> list[tuple[str, str, str, str]]:
    """CPU time of the gradability gate's decode-path checks against preparing the model input.

    :func:`retinagate.gate.assess` (field of view, colour, focus, exposure) runs on every decoded
    photograph beside :func:`retinagate.preprocess.prepare` (FOV crop and resize), the work it adds
    to; both are timed on the same photographs at a small and a large camera size.
    """
    from retinagate.gate import assess

    rows: list[tuple[str, str, str, str]] = []
    for width, height in ((640, 480), (2048, 1536)):
        image = render_fundus(np.random.default_rng(5), width, height, ("DR",)).image
        prepare_s, gate_s = paired_best_seconds(
            functools.partial(prepare, image, card.preprocessing),
            functools.partial(assess, image, threshold=card.preprocessing.fov_threshold),
            max(repeats, 5),
        )
        rows.append(
            (
                f"gate checks, {width}x{height}",
                f"{gate_s * 1e3:.2f} ms/img (prepare {prepare_s * 1e3:.2f})",
                f"{gate_s / prepare_s:.2f}x",
                "vs preparing the model input",
            )
        )
    return rows


def _print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in [("what", "time", "ratio", "goal / note"), *rows]) for i in range(4)]
    print()
    for row in [("what", "time", "ratio", "goal / note"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def measure_variants(
    model: torch.nn.Module, card: ModelCard, threads: int, repeats: int
) -> list[tuple[str, str, str, str]]:
    """CPU time per image of each of :data:`VARIANTS` against today's graph, in the same run.

    Every variant carries ``model``'s weights (size and stride do not change them). Each variant is
    timed alternately with today's graph, so that load from other processes hits both alike, and its
    ratio is taken against the reference time of the same pair.
    """
    rows: list[tuple[str, str, str, str]] = []
    weights = model.state_dict()
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as scratch:
        paths: list[Path] = []
        inputs: list[NDArray[np.uint8]] = []
        for name, size, stride, with_ood, contrast, tta in VARIANTS:
            recipe = {**card.preprocessing.model_dump(), "input_size": size, "contrast_sigma": contrast}
            variant = card.with_updates(preprocessing=recipe, output_stride=stride, ood=None, tta=tta)
            network = create_model(variant, drop_rate=0.0, drop_path_rate=0.0)
            network.load_state_dict(weights)
            network.eval()
            if with_ood:
                train, val = fundus_batch(48, variant, seed=2), fundus_batch(24, variant, seed=3)
                statistics = fit_ood_statistics(network, variant, train, val)
                variant = variant.with_updates(ood=statistics.model_dump(mode="json"))
            path = Path(scratch) / f"variant-{len(paths)}.onnx"
            export_model(network, variant, path)
            paths.append(path)
            inputs.append(fundus_batch(16, variant))
            print(f"exported {name}: outputs {[o.name for o in onnx.load(str(path)).graph.output]}")
        print("\ngraph variants, CPU ms per image (ratio to today's graph in the same pair of runs):")
        for thread_count in dict.fromkeys((1, threads)):
            sessions = [_cpu_session(path, thread_count) for path in paths]
            for batch in (1, 16):
                for index in range(1, len(VARIANTS)):
                    base_s, variant_s = (
                        t / batch
                        for t in paired_best_seconds(
                            functools.partial(sessions[0].run, None, {"image": inputs[0][:batch]}),
                            functools.partial(sessions[index].run, None, {"image": inputs[index][:batch]}),
                            repeats,
                        )
                    )
                    name = VARIANTS[index][0]
                    print(
                        f"  {thread_count} thread(s), batch {batch:>2}: {name:<30} {variant_s * 1e3:7.2f} ms/img "
                        f"vs today {base_s * 1e3:6.2f} ms/img ({variant_s / base_s:.2f}x)"
                    )
                    rows.append(
                        (
                            f"{name}, batch {batch}, {thread_count} thr",
                            f"{base_s * 1e3:.2f} -> {variant_s * 1e3:.2f} ms/img",
                            f"{variant_s / base_s:.2f}x",
                            "vs today's graph",
                        )
                    )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
