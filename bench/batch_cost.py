"""Inference cost per image by batch size, with every core busy: what MAX_BATCH_SIZE to serve with.

    python -m bench.batch_cost --model models/flowers-mobilevit-xxs

One 1-thread LiteRT interpreter per core, as the service's inference workers run them, each in a
loop over real photos (decoded beforehand) at one batch size. The batch sizes take turns over
several rounds, in alternating order, so that the machine's drift hits each alike. Prints
images/s per batch size against the best, and the largest batch size within `--tolerance` of
the best (at least 2). Larger batches need fewer hand-offs and leave fewer gaps between batches
under load, but once a batch's activations outgrow the CPU caches each image costs more, and
how soon that happens depends on the input size and the machine. Confirm a choice with
`bench.serve`.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np

from bench.inference import DEFAULT_PHOTOS, load_photos
from contract.card import load_model_card
from contract.runtime import open_backend


def recommended_batch(rates: dict[int, float], tolerance: float) -> int:
    """The largest batch size whose images/s is within `tolerance` (a fraction) of the best, but
    2 rather than 1 where 2 was measured: a cap of 1 turns batching off, and the hand-offs that
    batching saves are not in this table (at 256 px the service served as much or more with 2)."""
    best = max(rates.values())
    pick = max(batch for batch, rate in rates.items() if rate >= best * (1 - tolerance))
    return 2 if pick == 1 and 2 in rates else pick


def images_per_second(backends: list, photos: np.ndarray, batch: int, seconds: float) -> float:
    """Every backend in its own thread, each running `batch`-image calls for `seconds`."""
    counts = [0] * len(backends)

    def loop(slot: int, stop: float) -> None:
        start, done = slot * batch, 0
        while time.perf_counter() < stop:
            first = start % (len(photos) - batch + 1)
            backends[slot].predict(photos[first : first + batch])
            start, done = start + batch, done + batch
        counts[slot] = done

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k, started + seconds))
               for k in range(len(backends))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/flowers-mobilevit-xxs"))
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--batches", default="1,2,3,4,6,8")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=1.5, help="per batch size and round")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tolerance", type=float, default=0.02, help="fraction of the best rate")
    args = p.parse_args(argv)

    card = load_model_card(args.model)
    artifact = card.artifact("tflite")
    batches = [int(b) for b in args.batches.split(",")]
    photos = load_photos(args.photos, card.input.height, max(64, max(batches)))
    if len(photos) < max(batches):
        raise SystemExit(f"{len(photos)} photos are fewer than the largest batch {max(batches)}")
    backends = [open_backend("tflite", args.model / artifact.file, 1) for _ in range(args.cores)]
    for backend in backends:  # every batch size's interpreter built and warm before timing
        for batch in batches:
            backend.predict(photos[:batch])

    rates: dict[int, list[float]] = {batch: [] for batch in batches}
    for round_ in range(args.rounds):
        for batch in batches if round_ % 2 == 0 else batches[::-1]:
            rates[batch].append(images_per_second(backends, photos, batch, args.seconds))
    means = {batch: float(np.mean(r)) for batch, r in rates.items()}
    best = max(means.values())

    print(f"model {card.name} ({artifact.file}) at {card.input.height} px; {args.cores} cores, "
          f"one 1-thread interpreter each; {args.rounds} rounds of {args.seconds:g} s per batch "
          f"size; {len(photos)} real photos, decoded beforehand\n")  # fmt: skip
    print(f"{'batch':>5}{'img/s':>9}{'min':>9}{'max':>9}{'of best':>9}")
    for batch in batches:
        print(f"{batch:>5}{means[batch]:>9.1f}{min(rates[batch]):>9.1f}{max(rates[batch]):>9.1f}"
              f"{means[batch] / best:>9.3f}")  # fmt: skip
    pick = recommended_batch(means, args.tolerance)
    print(f"\nlargest batch within {args.tolerance:.0%} of the best, at least 2: {pick} "
          f"(MOBILEVIT_MAX_BATCH_SIZE={pick})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
