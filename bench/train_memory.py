"""Peak memory of keeping a folder of large photos decoded for training.

    python -m bench.train_memory --photos 1000 --image-size 256

Generates a class-per-folder tree of 4000x3000 (12-megapixel) JPEGs in a temporary folder, then,
in a fresh process each, loads it the way `training.train` does (`load_folder` with the shorter
side kept at 2x the training size) and, for comparison on a few photos, at full size. Prints peak
RSS (ru_maxrss) of each process, and what the imports alone take.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 4000, 3000


def write_photos(root: Path, count: int, classes: int = 5) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth content (a small random image scaled up) keeps each file near 1 MB.
        small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
        small.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC).save(
            folder / f"{i:04d}.jpg", quality=90
        )


MEASURE = """
import json, resource, sys
from training.data import load_folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dataset = load_folder(sys.argv[1], None if sys.argv[2] == "none" else int(sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kept = sum(im.size[0] * im.size[1] * 3 for im in dataset.images)
print(json.dumps({"photos": len(dataset.images), "imports_mb": before / 1024,
                  "peak_mb": peak / 1024, "kept_pixels_mb": kept / 2**20}))
"""


def measure(root: Path, keep_side: int | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root), str(keep_side or "none")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.train_memory", description=__doc__.split("\n")[0]
    )
    p.add_argument("--photos", type=int, default=1000)
    p.add_argument("--full-size-photos", type=int, default=20, help="for the full-size row")
    p.add_argument("--image-size", type=int, default=256)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        many, few = Path(tmp, "many"), Path(tmp, "few")
        write_photos(many, args.photos)
        write_photos(few, args.full_size_photos)
        rows = [
            (f"kept at {2 * args.image_size} px", measure(many, 2 * args.image_size)),
            ("full size", measure(few, None)),
        ]
    print(f"{WIDTH}x{HEIGHT} JPEGs, training size {args.image_size} px\n")
    print(f"{'decoded':<18}{'photos':>8}{'imports MB':>12}{'peak RSS MB':>13}{'MB/photo':>10}")
    for name, r in rows:
        per_photo = (r["peak_mb"] - r["imports_mb"]) / r["photos"]
        print(f"{name:<18}{r['photos']:>8}{r['imports_mb']:>12.0f}{r['peak_mb']:>13.0f}"
              f"{per_photo:>10.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
