"""Train on a lent GPU machine (the `device` tool): pack here, train there, unpack here.

    python -m training.device pack                    # here: .device/ (photos, packages)
    # there, run by the device tool with carry [".device"], Python 3.12 with JAX and no TensorFlow:
    python3 -m training.device train --budget 420     # a tar of the run under $OUT
    python -m training.device unpack DIR/flowers-xxs.tar runs/device-xxs   # here: a run dir

What travels is the tracked tree plus .device/, at most 64 MiB, and the photos alone are 50 MB:
so `pack` takes only the training photos of the shipped model's split, each re-coded losslessly
(jpegtran -arithmetic -progressive: the same DCT coefficients, 9% smaller, no metadata) and
checked to decode to the very pixels of its original, else copied as it is. It also installs
the packages the machine lacks (keras, namex, optree, pydantic and theirs, at the versions of
constraints.txt, for CPython 3.12) into one xz tar: 3.5 MiB against 5.4 as wheels.

`train` trains the shipped recipe (training/train.py's defaults with the multi-scale sampler at
128/160/192, served at 160) on that split under `KERAS_BACKEND=jax`, data parallel over every
GPU, for `--budget` seconds (`--time-budget`: the epochs are sized from the second epoch's time),
with no validation there (its photos stayed here), and writes `$OUT/<name>.tar` (final.keras,
log.csv, report.json, config.json, split.json) and `$OUT/<name>-last.keras` (the last epoch's
checkpoint, for --resume). Whatever stops the run, they hold what it wrote.

`unpack` makes the tar a run directory here, its split pointing at the original photos, and
scores final.keras on the validation photos into report.json (as training would have): ready for
`training.resolution` and `training.export`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".device"
DEFAULT_DATA = ROOT.parent / "shared/datasets/flower_photos"
SHIPPED_SPLIT = ROOT / "models/flowers-mobilevit-xxs/split.json"
#: The lent machine has JAX, numpy, Pillow, h5py, rich, ml-dtypes and absl-py, not these.
PACKAGES = ("keras", "namex", "optree", "pydantic", "pydantic-core", "annotated-types",
            "typing-inspection", "typing-extensions")  # fmt: skip
SITE = "site.tar.xz"
#: What travels to the machine, the tracked tree included (the device tool's limit).
TRAVEL_LIMIT = 64 * 2**20
#: The shipped recipe's options beyond train.py's defaults (docs/training.md).
RECIPE = ["--image-size", "160", "--multi-scale", "128,160,192", "--lr", "1e-3"]
RUN_FILES = ("final.keras", "log.csv", "report.json", "config.json", "split.json")
#: The most the device tool brings back in one file.
FILE_LIMIT = 16 * 2**20


def pinned(name: str, constraints: Path = ROOT / "constraints.txt") -> str:
    """`name==version` as constraints.txt pins it."""
    for line in constraints.read_text().splitlines():
        if line.split("==")[0].strip().lower().replace("_", "-") == name.replace("_", "-"):
            return line.strip()
    raise SystemExit(f"{name} is not pinned in {constraints}")


def decoded_digest(data: bytes) -> str:
    """The pixels the training loader gets from a photo (the serving decoder's RGB)."""
    from contract.preprocess import load_rgb

    image = load_rgb(data)
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()


def shrink(source: Path, target: Path) -> None:
    """`target`: `source` arithmetic-coded and without metadata, if that is smaller and decodes
    to the same pixels (EXIF orientation would not survive, for one); else a copy."""
    original = source.read_bytes()
    recoded = subprocess.run(
        ["jpegtran", "-arithmetic", "-progressive", "-copy", "none", str(source)],
        capture_output=True,
        check=False,
    ).stdout
    good = bool(recoded) and len(recoded) < len(original)
    if good and decoded_digest(recoded) != decoded_digest(original):
        good = False
    target.write_bytes(recoded if good else original)


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")  # fmt: skip
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pack(data: Path, split: Path = SHIPPED_SPLIT, out: Path = PACK) -> int:
    """Write `out`/photos (the training photos of `split`) and `out`/site.tar.xz; print what
    travels against the limit."""
    from concurrent.futures import ThreadPoolExecutor

    if not shutil.which("jpegtran"):
        raise SystemExit("jpegtran not found: apt-get install libjpeg-turbo-progs")
    photos = out / "photos"
    shutil.rmtree(photos, ignore_errors=True)
    sources = [data / name for name in json.loads(split.read_text())["train"]]
    for source in sources:
        (photos / source.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda s: shrink(s, photos / s.relative_to(data)), sources))
    origin = {"data": os.path.relpath(data, ROOT), "split": os.path.relpath(split, ROOT)}
    (out / "source.json").write_text(json.dumps(origin))
    build_site(out / SITE)
    sizes = {"tracked files": tracked_bytes(), "photos": folder_bytes(photos),
             "packages": (out / SITE).stat().st_size}  # fmt: skip
    for name, size in sizes.items():
        print(f"{name:>14} {size / 2**20:7.1f} MiB")
    total = sum(sizes.values())
    share = folder_bytes(photos) / sum(source.stat().st_size for source in sources)
    print(f"{'travels':>14} {total / 2**20:7.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f}; "
          f"{len(sources)} photos, {share:.1%} of their size")  # fmt: skip
    return 0 if total <= TRAVEL_LIMIT else 1


def build_site(target: Path) -> None:
    """PACKAGES installed for CPython 3.12 on x86-64 Linux, as an xz tar of site-packages."""
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)]
    with tempfile.TemporaryDirectory() as site:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                        "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
                        "--platform=manylinux2014_x86_64", *platforms, "--target", site,
                        *(pinned(name) for name in PACKAGES)], check=True)  # fmt: skip
        with tarfile.open(target, "w:xz") as tar:
            tar.add(site, arcname=".")


def unpacked_site(archive: Path, target: Path) -> Path | None:
    """`archive` unpacked into `target` unless Keras and pydantic import already; the path to
    put on PYTHONPATH, or None."""
    probe = [sys.executable, "-c", "import keras, pydantic"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def train(args: argparse.Namespace) -> int:
    """The run, then its tar under --out; the tar is written however the run ended."""
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs")
    out.mkdir(parents=True, exist_ok=True)
    # A new folder each time: a machine kept warm between calls still holds the last run.
    run_dir = Path(args.run_dir or Path(tempfile.mkdtemp(prefix="device-")) / args.name)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1"}
    site = unpacked_site(args.pack / SITE, Path("/tmp/device-site"))
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT),
                                                          env.get("PYTHONPATH")]))  # fmt: skip
    command = [sys.executable, "-m", "training.train", "--data", str(args.data), "--split",
               str(args.split), "--run-dir", str(run_dir), "--variant", args.variant,
               "--epochs", "1000", "--time-budget", str(args.budget), *RECIPE,
               *args.extra]  # fmt: skip
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    try:
        # The budget bounds training; finishing (BatchNorm, report) gets the margin.
        code = subprocess.run(command, cwd=ROOT, env=env, timeout=args.budget + args.margin,
                              check=False).returncode  # fmt: skip
    except subprocess.TimeoutExpired:
        code = 124
    tar_path = out / f"{args.name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                tar.add(run_dir / name, arcname=name)
        names = tar.getnames()
    last = run_dir / "last.keras"
    if last.is_file() and last.stat().st_size <= FILE_LIMIT:
        shutil.copyfile(last, out / f"{args.name}-last.keras")
        names.append(f"{args.name}-last.keras")
    elif last.is_file():
        size = last.stat().st_size / 2**20
        print(f"left out {last}: {size:.1f} MiB, more than the device tool brings back in one "
              f"file ({FILE_LIMIT / 2**20:.0f} MiB)", flush=True)  # fmt: skip
    print(
        f"train exited {code} after {time.perf_counter() - started:.0f} s; in {out}: "
        f"{', '.join(names) or 'empty'}",
        flush=True,
    )
    return code


def unpack(tar_path: Path, run_dir: Path, pack_dir: Path = PACK) -> int:
    """A run directory from a device tar, its split's photos the packed photos' originals, and
    final.keras scored on the validation photos into report.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(run_dir, filter="data")
    last = tar_path.with_name(f"{tar_path.stem}-last.keras")
    if last.is_file():
        shutil.copyfile(last, run_dir / "last.keras")
    packed = json.loads((pack_dir / "source.json").read_text())
    source = packed["data"]
    if (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text())
        (run_dir / "config.json").write_text(json.dumps({**config, "data": source}, indent=2))
    if (run_dir / "split.json").is_file():  # there it held no validation photos: here it does
        split = json.loads((run_dir / "split.json").read_text())
        validation = json.loads((ROOT / packed["split"]).read_text())["val"]
        (run_dir / "split.json").write_text(
            json.dumps({**split, "root": source, "val": validation}, indent=1))  # fmt: skip
    if (run_dir / "final.keras").is_file() and (run_dir / "report.json").is_file():
        top1 = rescore(run_dir)
        print(f"final.keras: validation top-1 {top1:.2%} on {source}")
    print(f"{run_dir}: {', '.join(sorted(p.name for p in run_dir.iterdir()))}")
    return 0


def rescore(run_dir: Path) -> float:
    """report.json's validation block, measured here on the run's validation photos."""
    import keras

    from training.data import read_split
    from training.report import plot_confusion
    from training.train import load_dataset, score

    cfg = json.loads((run_dir / "config.json").read_text())
    dataset = load_dataset(cfg)
    _, val_idx = read_split(run_dir / "split.json", dataset.paths)
    metrics = score(keras.models.load_model(run_dir / "final.keras"), dataset.subset(val_idx),
                    cfg["image_size"])  # fmt: skip
    report = json.loads((run_dir / "report.json").read_text())
    report["validation"], report["val_images"] = metrics, len(val_idx)
    report["data"] = report["recipe"]["data"] = cfg["data"]  # the photos here, not there
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_confusion(metrics, run_dir / "confusion.png")
    return metrics["top1"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.device", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="here: .device/ with the photos and packages")
    packing.add_argument("--data", type=Path, default=DEFAULT_DATA)
    packing.add_argument("--split", type=Path, default=SHIPPED_SPLIT)
    running = sub.add_parser("train", help="there: train within --budget seconds")
    running.add_argument("--budget", type=float, default=420, help="training seconds")
    running.add_argument("--margin", type=float, default=120,
                         help="seconds after the budget for finishing the run")  # fmt: skip
    running.add_argument("--variant", default="xxs")
    running.add_argument("--name", default="flowers-xxs", help="the tar's name under --out")
    running.add_argument("--pack", type=Path, default=PACK)
    running.add_argument("--data", type=Path, default=PACK / "photos")
    running.add_argument("--split", type=Path, default=SHIPPED_SPLIT)
    running.add_argument("--run-dir", help="where the run is made; default a new temporary folder")
    running.add_argument("--out", help="where the tar goes; default $OUT, else runs/")
    running.add_argument("extra", nargs="*", help="more training.train options, after --")
    unpacking = sub.add_parser("unpack", help="here: a run directory from the tar")
    unpacking.add_argument("tar", type=Path)
    unpacking.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    if args.command == "pack":
        return pack(args.data, args.split)
    if args.command == "train":
        return train(args)
    return unpack(args.tar, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
