"""Training throughput on the CPU: the real data pipeline against the same loop fed from memory.

Three ways to feed the same training step (:class:`train.step.TrainStep`, EfficientNet-B0, fp32,
channels_last):

* ``memory``: pre-made uint8 batches already in memory (the upper bound: only the model's work);
* ``cache``: the training pipeline (:func:`train.datasets.cache_split` memory map, per-sample
  ``transforms.v2`` augmentation, :func:`train.loader.epoch_loader` with worker processes);
* ``decode``: what the cache saves: decoding each PNG and preprocessing it on every read, same
  augmentation and loader.

Makes its own synthetic photographs (``retinagate.synth``) in a temporary folder and prints a table
last. Example::

    .venv/bin/python bench/bench_train.py --n 160 --img-size 128 --steps 12
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from retinagate.card import ModelCard, Preprocessing
from retinagate.preprocess import prepare
from retinagate.synth import SynthConfig, write_dataset
from train.augment import Augmenter, Normalizer, sample_seed
from train.datasets import SplitSource, cache_split, find_rfmid_splits, read_image
from train.loader import AugmentedImages, epoch_loader
from train.loop import auto_workers
from train.model import create_model
from train.step import TrainStep


class DecodingImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Decodes and preprocesses the PNG on every read: the pipeline without a cache."""

    def __init__(self, source: SplitSource, preprocessing: Preprocessing, augment: Augmenter, seed: int) -> None:
        self.source, self.preprocessing, self.augment, self.seed, self.epoch = source, preprocessing, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = prepare(read_image(self.source.paths[index]), self.preprocessing)
        image = self.augment(torch.from_numpy(pixels).permute(2, 0, 1), sample_seed(self.seed, self.epoch, index))
        return image, torch.from_numpy(self.source.labels[index])


Batch = tuple[torch.Tensor, torch.Tensor]


def _time_steps(step: TrainStep, iterator: Iterator[Batch], steps: int, warmup: int) -> float:
    """Images per second over ``steps`` steps after ``warmup`` steps, pulling batches from ``iterator``."""
    for _ in range(warmup):
        float(step(*next(iterator)))
    started = time.perf_counter()
    seen = 0
    for _ in range(steps):
        images, targets = next(iterator)
        float(step(images, targets))
        seen += images.shape[0]
    return seen / (time.perf_counter() - started)


def _endless(make_loader: Callable[[int], Iterable[Batch]]) -> Iterator[Batch]:
    epoch = 0
    while True:
        yield from make_loader(epoch)
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=160, help="synthetic images in total (60%% train)")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 384), metavar=("W", "H"), help="photo size")
    parser.add_argument("--img-size", type=int, default=128, help="model input side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per pipeline")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (includes worker start)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is shown")
    parser.add_argument(
        "--workers", type=int, default=-1, help="loader processes (default: what retinagate train picks on the CPU)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    parser.add_argument("--aug", default="light", choices=("none", "light", "strong"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers < 0:
        args.workers = auto_workers(torch.device("cpu"))

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        write_dataset(root / "data", SynthConfig(n=args.n, width=args.size[0], height=args.size[1], seed=0))
        source = find_rfmid_splits(root / "data")["train"]
        preprocessing = Preprocessing(input_size=args.img_size)
        started = time.perf_counter()
        cached = cache_split(source, preprocessing, root / "cache", workers=1, progress=False)
        decode_ms = (time.perf_counter() - started) / len(source) * 1000

        torch.manual_seed(0)
        card = ModelCard(preprocessing=preprocessing)
        model = create_model(card).to(memory_format=torch.channels_last).train()
        step = TrainStep(
            model, torch.optim.AdamW(model.parameters(), lr=1e-4), torch.nn.BCEWithLogitsLoss(),
            Normalizer(card.preprocessing), device=torch.device("cpu"), grad_clip=1.0,
        )  # fmt: skip
        augment = Augmenter(args.aug)
        cache_data = AugmentedImages(cached.cache_file, cached.labels, augment, seed=0)
        decode_data = DecodingImages(source, preprocessing, augment, seed=0)

        def loader_of(dataset: AugmentedImages | DecodingImages) -> Callable[[int], Iterable[Batch]]:
            return lambda epoch: epoch_loader(
                dataset,  # type: ignore[arg-type]  # same interface: set_epoch, __len__, __getitem__
                epoch,
                seed=0,
                batch_size=args.batch_size,
                workers=args.workers,
            )

        rng = np.random.default_rng(0)
        memory_batches = [
            (
                torch.from_numpy(np.array(cached.images[rng.integers(0, len(source), args.batch_size)])).permute(
                    0, 3, 1, 2
                ),
                torch.from_numpy(cached.labels[: args.batch_size]),
            )
            for _ in range(4)
        ]

        def cycle() -> Iterator[Batch]:
            while True:
                yield from memory_batches

        # Interleaved rounds, best of each: a busy machine slows whichever pipeline runs at that moment.
        feeds: dict[str, Callable[[], Iterator[Batch]]] = {
            "memory": cycle,
            "cache": lambda: _endless(loader_of(cache_data)),
            "decode": lambda: _endless(loader_of(decode_data)),
        }
        results = dict.fromkeys(feeds, 0.0)
        for _ in range(args.rounds):
            for name, feed in feeds.items():
                results[name] = max(results[name], _time_steps(step, feed(), args.steps, args.warmup))

    print(
        f"\nEfficientNet-B0 training step, CPU, {torch.get_num_threads()} threads, {args.workers} loader workers, "
        f"input {args.img_size} px, batch {args.batch_size}, aug {args.aug}, photos {args.size[0]}x{args.size[1]}"
    )
    print(f"one-off cache build: {decode_ms:.1f} ms per photo (decode + FOV crop + resize, one thread)")
    print(f"{'pipeline':<34}{'img/s':>9}{'vs memory':>11}")
    labels = {
        "memory": "memory-fed (pre-made batches)",
        "cache": "real pipeline (cache + aug + loader)",
        "decode": "decode every epoch (no cache)",
    }
    for name, rate in results.items():
        print(f"{labels[name]:<34}{rate:>9.1f}{rate / results['memory']:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
