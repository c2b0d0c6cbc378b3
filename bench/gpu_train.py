"""GPU training throughput: AMP steps fed by the real data pipeline against steps fed from GPU memory.

For the team's H100 box (see ../shared/GPU.md). Self-contained: it writes its own synthetic
preprocessing cache (uint8 ``(N, S, S, 3)`` ``.npy``, the format :func:`train.datasets.cache_split`
writes) and imports only the torch-only parts of the project (:mod:`train.loader`,
:mod:`train.augment`, :mod:`train.step`) plus timm, so it runs where pydantic and pydicom are not
installed.

For each batch size it times the same :class:`train.step.TrainStep` (EfficientNet-B0, 29 outputs,
AdamW, BCE, AMP fp16 with a grad scaler, channels_last, gradient clipping):

* ``memory``: a uint8 batch already on the GPU (the GPU-bound ceiling);
* ``aug in workers``: the training pipeline on the CPU: memory-mapped cache, per-sample
  ``transforms.v2`` augmentation in loader worker processes, pinned memory, asynchronous copies;
* ``aug on GPU``: the same loader copying cached bytes only, the same recipe applied per sample on
  the GPU (:class:`train.augment.BatchAugmenter`; ``retinagate train``'s default on CUDA).

GPU busy ratio = pipeline img/s / memory img/s (goal: at least 0.8). Example::

    python bench/gpu_train.py --batch-sizes 16 256 --steps 40 --workers 14
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train.augment import Augmenter, BatchAugmenter, Normalizer, sample_seed  # noqa: E402
from train.loader import AugmentedImages, epoch_loader  # noqa: E402
from train.step import TrainStep  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


def write_cache(path: Path, count: int, size: int, labels: int, seed: int = 0) -> np.ndarray:
    """Writes ``count`` fundus-like uint8 images (orange disc, bright disc, coloured blobs); returns labels."""
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    fov = (xx**2 + yy**2) < 0.24
    targets = (rng.random((count, labels)) < 0.1).astype(np.uint8)
    for start in range(0, count, 256):
        chunk = min(256, count - start)
        base = rng.integers(120, 220, (chunk, 1, 1, 3)).astype(np.float32) * np.array([1.0, 0.45, 0.2], np.float32)
        noise = rng.normal(0, 8, (chunk, size, size, 3)).astype(np.float32)
        block = (base + noise) * fov[None, ..., None]
        for i in range(chunk):
            for _ in range(int(targets[start + i].sum())):
                cx, cy, r = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.03, 0.08)
                blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
                block[i][blob] = rng.integers(0, 255, 3)
        images[start : start + chunk] = np.clip(block, 0, 255).astype(np.uint8)
    images.flush()
    del images
    return targets


def make_step(size: int, labels: int, device: torch.device, precision: str) -> TrainStep:
    import timm

    model = timm.create_model("efficientnet_b0", num_classes=labels).to(device).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # Arbitrary constants: throughput does not depend on them (training takes them from the model card).
    normalizer = Normalizer(SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))).to(device)  # type: ignore[arg-type]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return TrainStep(
        model, optimizer, torch.nn.BCEWithLogitsLoss(), normalizer, device=device, precision=precision,
        scaler=scaler, grad_clip=1.0,
    )  # fmt: skip


def timed(step: TrainStep, batches: Iterator[Batch], steps: int, warmup: int) -> float:
    """Images per second over ``steps`` steps after ``warmup`` (the loss is read only at the end)."""
    cuda = step.device.type == "cuda"
    for _ in range(warmup):
        step(*next(batches))
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    seen = 0
    loss = torch.zeros((), device=step.device)
    for _ in range(steps):
        images, targets = next(batches)
        loss += step(images, targets)
        seen += images.shape[0]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss")
    return seen / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4096, help="images in the synthetic cache")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cudnn autotune, workers)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="loader processes")
    parser.add_argument("--aug", default="light", choices=("none", "light", "strong"))
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--cache-dir", type=Path, default=None, help="where to write the cache (default: temp)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test the script)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_train: no CUDA device", file=sys.stderr)
        return 3
    torch.backends.cudnn.benchmark = True
    labels = 29

    with tempfile.TemporaryDirectory(prefix="gpu-train-", dir=args.cache_dir) as tmp:
        cache = Path(tmp) / "train.npy"
        started = time.perf_counter()
        targets = write_cache(cache, args.images, args.img_size, labels)
        print(f"wrote {args.images} cached images in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        in_workers = AugmentedImages(cache, targets, Augmenter(args.aug), seed=0)
        bytes_only = AugmentedImages(cache, targets, None, seed=0)
        on_gpu = BatchAugmenter(args.aug)
        rows = []
        for batch_size in args.batch_sizes:
            step = make_step(args.img_size, labels, device, args.precision)
            fixed = torch.randint(
                0, 256, (batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device
            )
            fixed_targets = torch.from_numpy(targets[:batch_size]).to(device)

            def memory(images: torch.Tensor = fixed, y: torch.Tensor = fixed_targets) -> Iterator[Batch]:
                while True:
                    yield images, y

            def pipeline(dataset: AugmentedImages, gpu_aug: bool, size: int = batch_size) -> Iterator[Batch]:
                epoch, index = 0, 0
                while True:
                    loader = epoch_loader(
                        dataset, epoch, seed=0, batch_size=size, workers=args.workers, pin_memory=True
                    )
                    for images, y in loader:
                        if gpu_aug:
                            images = on_gpu(images.to(device, non_blocking=True), sample_seed(0, epoch, -2 - index))
                        index += 1
                        yield images, y
                    epoch += 1

            rates = {
                "memory": timed(step, memory(), args.steps, args.warmup),
                "workers": timed(step, pipeline(in_workers, gpu_aug=False), args.steps, args.warmup),
                "gpu": timed(step, pipeline(bytes_only, gpu_aug=True), args.steps, args.warmup),
            }
            rows.append((batch_size, rates))
            print(f"batch {batch_size}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()), file=sys.stderr)
            del step
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    print(
        f"\n{name}, torch {torch.__version__}, EfficientNet-B0 AMP {args.precision} training step, "
        f"{args.img_size} px, aug {args.aug}, {args.workers} loader workers, {os.cpu_count()} CPUs"
    )
    print("GPU busy ratio = pipeline img/s / memory-fed img/s (goal >= 0.80)")
    header = f"{'batch':>6}{'memory':>10}{'aug in workers':>16}{'ratio':>7}{'aug on GPU':>12}{'ratio':>7}"
    print(header + "   (img/s)")
    for batch_size, r in rows:
        print(
            f"{batch_size:>6}{r['memory']:>10.0f}{r['workers']:>16.0f}{r['workers'] / r['memory']:>7.2f}"
            f"{r['gpu']:>12.0f}{r['gpu'] / r['memory']:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
