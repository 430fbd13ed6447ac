"""Choose the test resolution on the validation split (FixRes).

    python -m training.resolution runs/flowers --sizes 128,160,192

A model trained on random-resized crops sees objects larger than a whole photo resized to the
same size shows them, so it often scores better tested somewhat larger than it was trained. For
each size this scores the run's final weights as `training.export --image-size` would export
them: resized, BatchNorm statistics re-estimated on training photos at that size, and the run's
recorded validation photos through the serving preprocessing. Prints one row per size, and the
best; export at it with `--image-size`. Inference cost grows with the pixels, shown relative to
the first size. Choose once, from this table: tuning further on the validation photos makes
their figure a training one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from training.data import DataError, read_split_file
from training.export import ExportError, at_size, labels_of, load_photos, resolve_model
from training.train import predict_padded

log = logging.getLogger("training.resolution")


def sizes_list(text: str) -> list[int]:
    """Parse "128,160,192" into [128, 160, 192]; each a multiple of 32 (the patch grid)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of sizes: {text!r}") from None
    if not sizes or any(size <= 0 or size % 32 for size in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive multiples of 32: {text!r}")
    return sizes


def score_sizes(run_dir: Path, sizes: list[int]) -> list[dict]:
    """Validation top-1 of the run's final weights at each size (see the module docstring)."""
    model_file, _ = resolve_model(run_dir)
    split = read_split_file(run_dir / "split.json")
    report = json.loads((run_dir / "report.json").read_text())
    root, labels = Path(split["root"]), split["class_names"]
    model = keras.models.load_model(model_file)
    rows = []
    for size in sizes:
        sized = at_size(model, size, report["variant"], root, split["train"])
        photos = load_photos(root, split["val"], labels_of(split["val"], labels, root), size)
        probabilities = predict_padded(sized, photos.images.astype(np.float32))
        top1 = float(np.mean(np.argmax(probabilities, axis=1) == photos.labels))
        rows.append({"size": size, "top1": top1, "images": len(photos.files),
                     "relative_pixels": (size / sizes[0]) ** 2})  # fmt: skip
        log.info("%d px: top-1 %.2f%%", size, 100 * top1)
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m training.resolution", description=__doc__.split("\n")[0]
    )
    p.add_argument("run", type=Path, help="run directory (final.keras, split.json, report.json)")
    p.add_argument("--sizes", type=sizes_list, default=[128, 160, 192],
                   help="comma-separated test sizes, multiples of 32")  # fmt: skip
    args = p.parse_args(argv)
    try:
        rows = score_sizes(args.run, args.sizes)
    except (DataError, ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{'size':>6}{'val top-1':>11}{'photos':>8}{'pixels':>8}")
    for row in rows:
        print(f"{row['size']:>6}{row['top1']:>11.2%}{row['images']:>8}"
              f"{row['relative_pixels']:>7.2f}x")  # fmt: skip
    best = max(rows, key=lambda row: (row["top1"], -row["size"]))  # a tie goes to the smaller
    print(f"\nbest: {best['size']} px ({best['top1']:.2%}); "
          f"export with --image-size {best['size']}")  # fmt: skip
    (args.run / "resolution.json").write_text(json.dumps({"sizes": rows, "best": best}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
