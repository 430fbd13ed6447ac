"""Training throughput of MobileViT on this machine, and proof the input pipeline keeps up.

    python -m bench.train_speed --sizes 128,192,256

For each size: images/s of the augmenting input pipeline alone (real photos, random-resized crop,
flip, jitter) and of the compiled train step alone (AdamW, same batch), so the table shows
which side bounds an epoch.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from training.data import Augment, PhotoBatches, load_folder
from training.model import build_model
from training.train import make_optimizer

DEFAULT_PHOTOS = Path(__file__).resolve().parent.parent.parent / "shared/datasets/flower_photos"


def pipeline_rate(batches: PhotoBatches, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        batches[i % len(batches)]
    return steps * batches.batch_size / (time.perf_counter() - start)


def step_rate(variant: str, size: int, batch: tuple, steps: int) -> float:
    model = build_model(variant, batch[1].shape[1], size)
    cfg = {"epochs": 10, "warmup_epochs": 1, "lr": 2e-3, "weight_decay": 0.05, "ema": True,
           "ema_momentum": 0.998}  # fmt: skip
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)
    model.compile(make_optimizer(cfg, 100), loss, metrics=["accuracy"])
    for _ in range(2):  # compile + warm up
        model.train_on_batch(*batch)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(*batch)
    return steps * len(batch[0]) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--variant", default="xxs")
    p.add_argument("--sizes", default="128,192,256")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--limit", type=int, default=400, help="photos loaded for the pipeline test")
    args = p.parse_args(argv)

    dataset = load_folder(args.photos)
    dataset = dataset.subset(
        np.random.default_rng(0).permutation(len(dataset.labels))[: args.limit]
    )
    print(f"MobileViT-{args.variant.upper()}, batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"keras {keras.__version__} ({keras.backend.backend()})\n")  # fmt: skip
    print(f"{'size':>6}{'pipeline img/s':>16}{'train step img/s':>18}{'epoch bound by':>16}")
    for size in (int(s) for s in args.sizes.split(",")):
        batches = PhotoBatches(dataset, args.batch_size, Augment(size, color_jitter=0.2), seed=0)
        pipe = pipeline_rate(batches, args.steps * 2)
        step = step_rate(args.variant, size, batches[0], args.steps)
        print(f"{size:>6}{pipe:>16.1f}{step:>18.1f}{'model' if step < pipe else 'input':>16}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
