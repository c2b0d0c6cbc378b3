"""GPU inference: ONNX Runtime (CUDA, TensorRT) against PyTorch eager fp16, at batch 1, 16 and 256.

For the GPU machine described in ``shared/GPU.md`` (one H100; torch with CUDA; onnxruntime-gpu
installed with ``--no-deps`` into a separate folder, passed as ``--ort-path``). Self-contained: it
makes its own model (EfficientNet-B0, 29 outputs, random weights with random batch-norm statistics)
and inputs, exports the served graph (uint8 NHWC in; logits, probabilities and all CAMs out) with the
project's exporter, and times:

* ``torch fp16 resident``: PyTorch eager, fp16, channels_last, input already on the GPU, logits
  only; the GPU.md baseline (19,000 img/s at batch 256 on an H100);
* ``torch fp16 host->host``: the same model with the in-graph CAM head (:class:`export.graph.CamModel`),
  uint8 batch from pinned host memory, probabilities and CAMs copied back; what a worker needs;
* ``ort <precision> <options>``: ONNX Runtime's CUDA provider with IO binding: the uint8 batch bound
  from host memory, outputs bound on the device and copied back (host->host), for fp32 and fp16, with
  NHWC kernels (``prefer_nhwc``) and with CUDA graphs (``enable_cuda_graph``: fixed shapes, input
  and outputs in device buffers that are reused; the copy in is timed);
* ``ort ... resident``: the same session with the input already on the device (comparable to the
  PyTorch baseline);
* ``tensorrt fp16``: the TensorRT provider where its libraries exist (falls back cleanly otherwise);
* ``engine``: :class:`retinagate.engine.Engine` itself (what the worker runs).

``--device cpu --quick`` runs the same code paths on the CPU with tiny sizes (a smoke test). Prints
a table last; ``--json FILE`` also writes the rows. Example on the GPU machine::

    pip install --no-deps --target /tmp/ortgpu onnxruntime-gpu==1.31.1
    python bench/gpu_inference.py --ort-path /tmp/ortgpu --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    parser.add_argument("--batches", default="1,16,256", help="comma-separated batch sizes (default 1,16,256)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per measurement (default 2 s)")
    parser.add_argument("--ort-path", type=Path, help="folder holding onnxruntime-gpu (put first on sys.path)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets: a smoke test of the code paths")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    return parser.parse_args(argv)


def _timed(run: Callable[[], object], budget_s: float, sync: Callable[[], None]) -> float:
    """Median seconds per call: a few warm-up calls, then as many as fit in the budget (at least 5)."""
    for _ in range(3):
        run()
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.ort_path is not None:
        sys.path.insert(0, str(args.ort_path))
    # torch first: its wheels bring the CUDA and cuDNN libraries onnxruntime-gpu loads.
    import numpy as np
    import onnxruntime as ort
    import torch

    from export.graph import CamModel
    from export.onnx_export import export_model
    from export.quantize import convert_fp16
    from retinagate.card import ModelCard, Preprocessing
    from retinagate.engine import Engine, ProviderError
    from train.model import random_model

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("CUDA is not available to torch; use --device cpu", file=sys.stderr)
        return 2
    if cuda and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    size = 64 if args.quick else args.size
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    budget = 0.2 if args.quick else args.seconds
    device = torch.device(args.device)
    ort_device = "cuda" if cuda else "cpu"
    available = ort.get_available_providers()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    card = ModelCard(name="bench-random", preprocessing=Preprocessing(input_size=size))
    model = random_model(card)  # random batch-norm statistics: timm's init alone gives ~0 features

    rows: list[dict[str, Any]] = []

    def record(variant: str, batch: int, seconds: float | None, note: str = "") -> None:
        row = {
            "variant": variant,
            "batch": batch,
            "ms": None if seconds is None else seconds * 1e3,
            "img_per_s": None if seconds is None else batch / seconds,
            "note": note,
        }
        rows.append(row)
        shown = "n/a" if seconds is None else f"{seconds * 1e3:9.2f} ms  {batch / seconds:9.0f} img/s"
        print(f"{variant:<28} batch {batch:>4}: {shown} {note}", flush=True)

    rng = np.random.default_rng(0)
    host = {b: rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8) for b in batches}
    print(f"device {args.device}; torch {torch.__version__}; onnxruntime {ort.__version__} ({', '.join(available)})")

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        fp32_path = Path(scratch) / "model.onnx"
        fp16_path = Path(scratch) / "model.fp16.onnx"
        export_model(model, card, fp32_path)
        convert_fp16(fp32_path, fp16_path)

        # PyTorch eager, with cuDNN's autotuner (ONNX Runtime gets its exhaustive algorithm search too).
        torch.backends.cudnn.benchmark = True
        half = torch.float16 if cuda else torch.float32
        eager = CamModel(model, card).to(device=device).eval()
        eager.model.to(dtype=half, memory_format=torch.channels_last)
        for batch in batches:
            pinned = torch.from_numpy(host[batch])
            if cuda:
                pinned = pinned.pin_memory()
            with torch.inference_mode():
                resident = (
                    eager.normalise(pinned.to(device)).to(dtype=half).contiguous(memory_format=torch.channels_last)
                )

                def torch_resident(x: torch.Tensor = resident) -> object:
                    with torch.inference_mode():
                        return eager.model(x)

                def torch_host(x: torch.Tensor = pinned) -> object:
                    with torch.inference_mode():
                        image = x.to(device, non_blocking=True)
                        features = eager.model.forward_features(
                            eager.normalise(image).to(dtype=half).contiguous(memory_format=torch.channels_last)
                        )
                        logits = eager.model.forward_head(features)
                        weight = eager.model.get_classifier().weight
                        cam = torch.relu(torch.nn.functional.conv2d(features, weight[:, :, None, None]))
                        return torch.sigmoid(logits.float()).cpu(), cam.float().cpu()

                record(f"torch {'fp16' if cuda else 'fp32'} resident", batch, _timed(torch_resident, budget, sync))
                record(f"torch {'fp16' if cuda else 'fp32'} host->host", batch, _timed(torch_host, budget, sync))
        eager.cpu()  # free the GPU for ONNX Runtime
        if cuda:
            torch.cuda.empty_cache()

        # ONNX Runtime with IO binding.
        provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        base: dict[str, Any] = {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"} if cuda else {}
        variants: list[tuple[str, Path, dict[str, Any]]] = [
            ("ort fp32", fp32_path, base),
            ("ort fp16", fp16_path, base),
        ]
        if cuda:
            variants += [
                ("ort fp16 nhwc", fp16_path, {**base, "prefer_nhwc": "1"}),
                ("ort fp16 cuda-graph", fp16_path, {**base, "enable_cuda_graph": "1"}),
                ("ort fp16 nhwc cuda-graph", fp16_path, {**base, "prefer_nhwc": "1", "enable_cuda_graph": "1"}),
            ]
        else:
            variants.append(("ort fp32 bound-buffers", fp32_path, base))  # the CUDA-graph code path, on the CPU
        outputs = ["probabilities", "cam"]
        for name, path, options in variants:
            graph_mode = "cuda-graph" in name or "bound-buffers" in name
            for batch in batches:
                try:
                    # CUDA graphs need one session per shape; the others are reused across batches anyway.
                    session = ort.InferenceSession(
                        str(path), providers=[(provider, options), "CPUExecutionProvider"], enable_fallback=0
                    )
                except Exception as exc:
                    record(name, batch, None, f"unavailable: {str(exc).splitlines()[0][:80]}")
                    continue
                binding = session.io_binding()
                if graph_mode:
                    image = ort.OrtValue.ortvalue_from_numpy(host[batch], ort_device, 0)
                    cam_shape = [batch, card.num_labels, *session.get_outputs()[2].shape[2:]]
                    out = {
                        "probabilities": ort.OrtValue.ortvalue_from_shape_and_type(
                            [batch, card.num_labels], np.float32, ort_device, 0
                        ),
                        "cam": ort.OrtValue.ortvalue_from_shape_and_type(cam_shape, np.float32, ort_device, 0),
                    }
                    binding.bind_ortvalue_input("image", image)
                    for key, value in out.items():
                        binding.bind_ortvalue_output(key, value)

                    def ort_graph(
                        b: int = batch, s: Any = session, io: Any = binding, x: Any = image, o: Any = out
                    ) -> object:
                        x.update_inplace(host[b])  # the host batch is copied into the captured input buffer
                        s.run_with_iobinding(io)
                        return o["probabilities"].numpy(), o["cam"].numpy()

                    record(name, batch, _timed(ort_graph, budget, sync))
                    continue

                def ort_host(b: int = batch, s: Any = session, io: Any = binding) -> object:
                    io.bind_cpu_input("image", host[b])
                    for key in outputs:
                        io.bind_output(key, ort_device)
                    s.run_with_iobinding(io)
                    return io.copy_outputs_to_cpu()

                record(f"{name} host->host", batch, _timed(ort_host, budget, sync))
                resident_input = ort.OrtValue.ortvalue_from_numpy(host[batch], ort_device, 0)
                resident = session.io_binding()
                resident.bind_ortvalue_input("image", resident_input)
                for key in outputs:
                    resident.bind_output(key, ort_device)
                record(
                    f"{name} resident",
                    batch,
                    _timed(lambda s=session, io=resident: s.run_with_iobinding(io), budget, sync),
                )

        # TensorRT, where its libraries exist.
        if "TensorrtExecutionProvider" in available:
            for batch in batches:
                trt_options = {
                    "device_id": 0,
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(Path(scratch) / "trt"),
                    "trt_profile_min_shapes": f"image:1x{size}x{size}x3",
                    "trt_profile_opt_shapes": f"image:{batch}x{size}x{size}x3",
                    "trt_profile_max_shapes": f"image:{batch}x{size}x{size}x3",
                }
                try:
                    session = ort.InferenceSession(
                        str(fp32_path),
                        providers=[("TensorrtExecutionProvider", trt_options), "CUDAExecutionProvider"],
                        enable_fallback=0,
                    )
                    if session.get_providers()[0] != "TensorrtExecutionProvider":
                        raise RuntimeError(f"not active (active: {', '.join(session.get_providers())})")
                except Exception as exc:
                    record("tensorrt fp16", batch, None, f"unavailable: {str(exc).splitlines()[0][:80]}")
                    continue
                binding = session.io_binding()

                def trt_host(b: int = batch, s: Any = session, io: Any = binding) -> object:
                    io.bind_cpu_input("image", host[b])
                    for key in outputs:
                        io.bind_output(key, "cuda")
                    s.run_with_iobinding(io)
                    return io.copy_outputs_to_cpu()

                record("tensorrt fp16 host->host", batch, _timed(trt_host, budget, sync))
        else:
            record("tensorrt fp16", batches[-1], None, "unavailable: no TensorrtExecutionProvider in this build")

        # The project's engine (auto: TensorRT, CUDA, CPU), as the worker runs it.
        for batch in batches:
            try:
                engine = Engine(fp16_path, providers="auto", batch_size=batch, cache_dir=Path(scratch) / "engine-trt")
            except (ProviderError, ValueError) as exc:
                record("engine fp16", batch, None, f"unavailable: {exc}")
                continue
            record(
                "engine fp16 predict",
                batch,
                _timed(lambda e=engine, b=batch: e.predict(host[b]), budget, sync),
                engine.providers[0].removesuffix("ExecutionProvider"),
            )

        # Agreement of fp16 with fp32 on ONNX Runtime (what fp16 costs in accuracy).
        check = host[batches[0]]
        p32 = ort.InferenceSession(str(fp32_path), providers=[provider]).run(["probabilities"], {"image": check})[0]
        p16 = ort.InferenceSession(str(fp16_path), providers=[provider]).run(["probabilities"], {"image": check})[0]
        print(f"fp16 vs fp32 probabilities, max abs diff: {float(np.abs(p16 - p32).max()):.2e}")

    print()
    print(f"{'variant':<30} {'batch':>5} {'ms/batch':>10} {'img/s':>10}  note")
    for row in rows:
        ms = "n/a" if row["ms"] is None else f"{row['ms']:.2f}"
        rate = "n/a" if row["img_per_s"] is None else f"{row['img_per_s']:.0f}"
        print(f"{row['variant']:<30} {row['batch']:>5} {ms:>10} {rate:>10}  {row['note']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": args.device, "size": size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
