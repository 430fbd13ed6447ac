"""Train MobileViT on a folder of photos (one sub-folder per class) or a tensorflow-datasets name.

    python -m training.train --data ../shared/datasets/flower_photos --run-dir runs/flowers
    python -m training.train --run-dir runs/flowers --resume     # continue an interrupted run

The run directory receives split.json, config.json, last.keras (every epoch, for --resume),
best.keras (best validation top-1), log.csv, report.json, curves.png and confusion.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from training.data import (  # noqa: E402
    Augment,
    DataError,
    Dataset,
    PhotoBatches,
    eval_arrays,
    load_folder,
    load_tfds,
    read_split,
    stratified_split,
    write_split,
)
from training.model import VARIANTS, build_model  # noqa: E402
from training.report import classification_metrics, plot_confusion, plot_curves  # noqa: E402

log = logging.getLogger("training.train")

# Options that define a run; --resume restores them from config.json.
RECIPE_KEYS = (
    "data", "tfds", "variant", "image_size", "epochs", "batch_size", "lr", "weight_decay",
    "warmup_epochs", "label_smoothing", "min_scale", "color_jitter", "ema", "ema_momentum",
    "val_fraction", "seed", "precision", "transformer_dropout",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="folder with one sub-folder of photos per class")
    src.add_argument("--tfds", help="tensorflow-datasets name, e.g. tf_flowers (needs network once)")
    p.add_argument("--run-dir", required=True, help="output folder for checkpoints and reports")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--variant", default="xxs", choices=sorted(VARIANTS))
    p.add_argument("--image-size", type=int, default=128, help="square input size, multiple of 32")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate after warm-up")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay")
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--min-scale", type=float, default=0.25, help="random-resized-crop min area")
    p.add_argument("--color-jitter", type=float, default=0.2, help="0 disables colour jitter")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="validate and keep the exponential moving average of the weights")
    p.add_argument("--ema-momentum", type=float, default=0.998)
    p.add_argument("--transformer-dropout", type=float, default=0.0)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--precision", default="float32",
                   choices=["float32", "mixed_float16", "mixed_bfloat16"])
    p.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="XLA-compile the train step (slow first epoch, faster later ones)")
    p.add_argument("--limit-per-class", type=int, default=0, help="use only N photos a class")
    args = p.parse_args(argv)
    if not args.resume and not (args.data or args.tfds):
        p.error("one of --data or --tfds is required (or --resume)")
    return args


def load_dataset(cfg: dict, limit_per_class: int = 0) -> Dataset:
    dataset = load_tfds(cfg["tfds"]) if cfg.get("tfds") else load_folder(cfg["data"])
    if limit_per_class:
        keep = np.concatenate(
            [np.flatnonzero(dataset.labels == c)[:limit_per_class] for c in np.unique(dataset.labels)]
        )
        dataset = dataset.subset(np.sort(keep))
    return dataset


def make_optimizer(cfg: dict, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(total - 1, int(cfg["warmup_epochs"] * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg["lr"] / 100,
        decay_steps=max(1, total - warmup),
        alpha=0.01,
        warmup_target=cfg["lr"],
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(
        schedule,
        weight_decay=cfg["weight_decay"],
        use_ema=cfg["ema"],
        ema_momentum=cfg["ema_momentum"],
    )
    # Decay only kernels: norms' scales/offsets and biases are left alone (standard practice).
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer


class EpochStats(keras.callbacks.Callback):
    """Adds seconds and training images/s per epoch to the logs (and so to log.csv)."""

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._train_seconds = time.perf_counter() - self._start

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._start
            train_seconds = getattr(self, "_train_seconds", logs["epoch_seconds"])
            logs["train_images_per_s"] = self.images_per_epoch / train_seconds


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def predict_dataset(model: keras.Model, dataset: Dataset, image_size: int) -> np.ndarray:
    """Probabilities for a dataset under the serving transform (files decoded as served)."""
    from app.imaging import preprocess_file

    if Path(dataset.root).is_dir():
        x = np.stack([preprocess_file(str(Path(dataset.root, p)), image_size) for p in dataset.paths])
    else:
        x = eval_arrays(dataset, image_size)
    return model.predict(x.astype(np.float32), batch_size=32, verbose=0)


def write_report(run_dir: Path, cfg: dict, dataset: Dataset, train_n: int, val: Dataset) -> dict:
    model = keras.models.load_model(run_dir / "best.keras")
    probs = predict_dataset(model, val, cfg["image_size"])
    metrics = classification_metrics(val.labels, probs.argmax(axis=1), val.class_names)
    rows = read_log(run_dir)
    best = max(rows, key=lambda r: float(r["val_accuracy"])) if rows else {}
    report = {
        "variant": cfg["variant"],
        "image_size": cfg["image_size"],
        "parameters": int(model.count_params()),
        "class_names": dataset.class_names,
        "data": cfg.get("tfds") and f"tfds:{cfg['tfds']}" or cfg["data"],
        "train_images": train_n,
        "val_images": len(val.labels),
        "epochs_completed": len(rows),
        "best_epoch": int(best["epoch"]) + 1 if best else None,
        "validation": metrics,
        "wall_time_s": round(sum(float(r["epoch_seconds"]) for r in rows), 1),
        "train_images_per_s": round(
            float(np.median([float(r["train_images_per_s"]) for r in rows])), 2
        ) if rows else None,
        "recipe": {k: cfg[k] for k in RECIPE_KEYS if k in cfg},
        "versions": {"keras": keras.__version__, "backend": keras.backend.backend()},
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_confusion(metrics, run_dir / "confusion.png")
    plot_curves(run_dir / "log.csv", run_dir / "curves.png")
    return report


def train(args: argparse.Namespace) -> dict:
    run_dir = Path(args.run_dir)
    config_path = run_dir / "config.json"
    if args.resume:
        if not (run_dir / "last.keras").exists():
            raise DataError(f"nothing to resume: {run_dir / 'last.keras'} does not exist")
        cfg = json.loads(config_path.read_text())
    else:
        if (run_dir / "last.keras").exists():
            raise DataError(f"{run_dir} already holds a run; pass --resume or another --run-dir")
        cfg = {k: getattr(args, k) for k in RECIPE_KEYS}
        if cfg["image_size"] % 32:
            raise DataError(f"--image-size must be a multiple of 32, got {cfg['image_size']}")
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg["limit_per_class"] = args.limit_per_class
        cfg["jit_compile"] = args.jit_compile
        config_path.write_text(json.dumps(cfg, indent=2))

    keras.utils.set_random_seed(cfg["seed"])
    keras.mixed_precision.set_global_policy(cfg["precision"])
    dataset = load_dataset(cfg, cfg.get("limit_per_class", 0))
    if args.resume:
        train_idx, val_idx = read_split(run_dir / "split.json", dataset)
    else:
        train_idx, val_idx = stratified_split(dataset.labels, cfg["val_fraction"], cfg["seed"])
        write_split(run_dir / "split.json", dataset, train_idx, val_idx, cfg["seed"])
    train_set, val_set = dataset.subset(train_idx), dataset.subset(val_idx)
    num_classes = len(dataset.class_names)
    log.info("%d classes %s; %d train / %d validation photos",
             num_classes, dataset.class_names, len(train_idx), len(val_idx))

    batches = PhotoBatches(
        train_set,
        cfg["batch_size"],
        Augment(cfg["image_size"], cfg["min_scale"], color_jitter=cfg["color_jitter"]),
        seed=cfg["seed"],
        workers=2,
    )
    x_val = eval_arrays(val_set, cfg["image_size"]).astype(np.float32)
    y_val = keras.utils.to_categorical(val_set.labels, num_classes)

    rows = read_log(run_dir)
    initial_epoch = len(rows) if args.resume else 0
    if args.resume:
        model = keras.models.load_model(run_dir / "last.keras")
        batches.epoch = initial_epoch
        batches._order = batches._shuffled()
        log.info("resuming at epoch %d of %d", initial_epoch + 1, cfg["epochs"])
    else:
        model = build_model(
            cfg["variant"], num_classes, cfg["image_size"], cfg["transformer_dropout"]
        )
        model.compile(
            optimizer=make_optimizer(cfg, len(batches)),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg["label_smoothing"]),
            metrics=["accuracy"],
            jit_compile="auto" if cfg.get("jit_compile", True) else False,
        )
    best_so_far = max((float(r["val_accuracy"]) for r in rows), default=None) if args.resume else None
    callbacks = [
        EpochStats(len(batches) * cfg["batch_size"]),
        keras.callbacks.ModelCheckpoint(run_dir / "last.keras"),  # raw weights + optimizer
    ]
    if cfg["ema"]:
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    callbacks += [
        keras.callbacks.ModelCheckpoint(
            run_dir / "best.keras", monitor="val_accuracy", mode="max", save_best_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.CSVLogger(run_dir / "log.csv", append=True),
    ]
    started = time.perf_counter()
    if initial_epoch < cfg["epochs"]:
        model.fit(
            batches,
            validation_data=(x_val, y_val),
            validation_batch_size=64,
            epochs=cfg["epochs"],
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=1 if sys.stdout.isatty() else 2,
        )
    log.info("training took %.0f s", time.perf_counter() - started)
    report = write_report(run_dir, cfg, dataset, len(train_idx), val_set)
    log.info("best validation top-1 %.2f%% (epoch %s); report in %s",
             100 * report["validation"]["top1"], report["best_epoch"], run_dir / "report.json")
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        train(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
