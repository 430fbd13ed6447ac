"""In-process inference speed of every artifact in a model directory.

    python -m bench.inference --model models/flowers-mobilevit-xxs

For each TFLite artifact (and the SavedModel with --savedmodel): images/s and p50 latency per
batch at batch 1, 4 and 16 with 1 and 2 interpreter threads, on real photos. Prints a table and
the speed-up of the fastest artifact that keeps accuracy within one point of float32.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.quiet import paused
from contract.card import load_model_card
from contract.preprocess import preprocess_file
from contract.runtime import open_backend

DEFAULT_PHOTOS = Path(__file__).resolve().parent.parent.parent / "shared/datasets/flower_photos"


def load_photos(folder: Path, size: int, count: int) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no photos under {folder}")
    step = max(1, len(files) // count)
    return np.stack([preprocess_file(str(f), size) for f in files[::step][:count]])


def measure(backend, photos: np.ndarray, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s, p50 ms per batch) over repeated batches for about `seconds`."""
    batches = [photos[i : i + batch] for i in range(0, len(photos) - batch + 1, batch)]
    backend.predict(batches[0])  # resize + warm up
    times, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        backend.predict(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
        i += 1
    return batch * len(times) / sum(times), 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/flowers-mobilevit-xxs"))
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--savedmodel", action="store_true", help="also time the SavedModel")
    p.add_argument(
        "--pause", type=int, action="append", default=[], metavar="PID",
        help="stop this process (a training run) while measuring (bench.quiet)",
    )  # fmt: skip
    args = p.parse_args(argv)
    with paused(args.pause) as machine:
        return run(args, machine)


def run(args: argparse.Namespace, machine: str) -> int:

    card = load_model_card(args.model)
    photos = load_photos(args.photos, card.input.height, 64)
    artifacts = [a for a in card.artifacts if a.format == "tflite" or args.savedmodel]
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    print(f"model {card.name} at {card.input.height} px, {len(photos)} real photos, "
          f"{os.cpu_count()} CPUs, {args.seconds:g} s per cell; {machine}")  # fmt: skip
    print(f"\n{'artifact':<22}{'quant':<15}{'val top-1':>10}{'thr':>5}{'batch':>7}"
          f"{'img/s':>9}{'p50 ms':>9}")  # fmt: skip
    results = {}
    for artifact in artifacts:
        for n_threads in threads:
            if artifact.format == "savedmodel" and n_threads != threads[-1]:
                continue
            backend = open_backend(artifact.format, args.model / artifact.file, n_threads)
            for batch in batches:
                rate, p50 = measure(backend, photos, batch, args.seconds)
                results[(artifact.file, n_threads, batch)] = rate
                top1 = f"{artifact.top1:.2%}" if artifact.top1 else "-"
                print(f"{artifact.file:<22}{artifact.quantization:<15}{top1:>10}{n_threads:>5}"
                      f"{batch:>7}{rate:>9.1f}{p50:>9.2f}")  # fmt: skip

    best_threads = threads[-1]
    base = card.artifact("tflite", "model.tflite")
    base_rate = results[(base.file, best_threads, 1)]
    print(f"\nspeed-up over float32 TFLite at batch 1, {best_threads} threads "
          f"(accuracy within 1 point of float32 {base.top1:.2%}):")  # fmt: skip
    for artifact in artifacts:
        if artifact.format != "tflite":
            continue
        rate = results[(artifact.file, best_threads, 1)]
        keeps = (base.top1 or 0) - (artifact.top1 or 0) <= 0.01
        print(f"  {artifact.file:<22}{rate / base_rate:>6.2f}x  "
              f"{'keeps accuracy' if keeps else 'loses more than 1 point'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
