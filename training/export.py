"""Export a trained model into a servable model directory, proven equal to the Keras model.

    python -m training.export runs/flowers --out models/flowers-mobilevit-xxs

    python -m training.export some.keras --data photos/ --out models/mine

Writes saved_model/ (Keras `model.export`), model.tflite (float32), model_fp16.tflite,
model_dynamic.tflite (dynamic-range) and model_int8.tflite (full integer, uint8 input),
split.json (the run's train/validation photos) and model.json. Everything is written to a
temporary folder and renamed at the end.

Parity and top-1 are measured on the run's validation photos (under `--data` if given, else the
run's data folder). A bare `.keras` file has no recorded split: with `--data`, every photo of
that folder is scored, and model.json says so (`evaluated_on.photos: all_photos`), since those
may include training photos.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from contract.card import (
    SPLIT_FILE,
    Evaluation,
    ModelCard,
    SplitRecord,
    describe_artifact,
    sha256_path,
    size_of,
    write_card,
)
from contract.preprocess import DEFAULT_PREPROCESSING, ImageError, preprocess_file
from contract.runtime import SavedModelBackend, TFLiteBackend, check_shapes

log = logging.getLogger("training.export")

FLOAT_TOLERANCE = 1e-4  # max |p_tflite - p_keras| for float artifacts
MIN_AGREEMENT = 0.98  # quantized top-1 must agree with Keras on this share of photos
MAX_ACCURACY_LOSS = 0.01

# file, quantization: one row per TFLite variant.
TFLITE_VARIANTS = {
    "float32": "model.tflite",
    "float16": "model_fp16.tflite",
    "dynamic_range": "model_dynamic.tflite",
    "int8": "model_int8.tflite",
}


class ExportError(RuntimeError):
    """A problem the user must fix; printed without a traceback."""


@dataclass
class Photos:
    """Preprocessed photos (uint8 [N, H, W, 3]) with labels, for parity and calibration."""

    images: np.ndarray
    labels: np.ndarray | None = None
    files: list[str] | None = None


def convert_tflite(saved_model_dir: Path, quantization: str, calibration: np.ndarray) -> bytes:
    """Convert with TFLite built-in ops only: the LiteRT wheel has no Flex delegate."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic_range":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # pixels are uint8 already: scale 1, zero 0

        def representative():
            for image in calibration:
                yield [image[None].astype(np.float32)]

        converter.representative_dataset = representative
    elif quantization != "float32":
        raise ExportError(f"unknown quantization {quantization!r}")
    try:
        return converter.convert()
    except Exception as exc:
        raise ExportError(f"TFLite conversion ({quantization}) failed: {exc}") from None


def _timed_predict(fn, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, float]:
    """Probabilities over all images plus the median batch-1 latency in ms."""
    probs = np.concatenate([fn(images[i : i + batch]) for i in range(0, len(images), batch)])
    times = []
    for image in images[: min(20, len(images))]:
        start = time.perf_counter()
        fn(image[None])
        times.append(time.perf_counter() - start)
    return probs, 1000 * float(np.median(times))


def choose_default_tflite(speed: dict[str, tuple[float, ...]], float_file: str) -> str:
    """The file to serve by default: the fastest (batched) of those at least 10% faster than
    float32 at every measured batch size, else float32 itself."""
    base = speed[float_file]
    faster = [f for f, rates in speed.items()
              if all(r >= 1.1 * b for r, b in zip(rates, base, strict=True))]  # fmt: skip
    return max(faster, key=lambda f: speed[f][-1]) if faster else float_file


def _serving_speed(
    folder: Path, files: list[str], images: np.ndarray, threads: int, rounds: int = 5
) -> dict[str, tuple[float, float]]:
    """Median images/s of each TFLite file at batch 1 and at batch 8. The files take turns
    within every round, so a machine whose speed drifts does not favour one of them."""
    backends = {f: TFLiteBackend(folder / f, num_threads=threads) for f in files}
    batches = (images[:1], images[:8])
    samples: dict[str, list[list[float]]] = {f: [[], []] for f in files}
    for backend in backends.values():
        for batch in batches:
            backend.predict(batch)  # allocate and warm up
    for _ in range(rounds):
        for file, backend in backends.items():
            for i, batch in enumerate(batches):
                repeats = max(1, 8 // len(batch))
                start = time.perf_counter()
                for _ in range(repeats):
                    backend.predict(batch)
                samples[file][i].append(repeats * len(batch) / (time.perf_counter() - start))
    return {f: (float(np.median(s[0])), float(np.median(s[1]))) for f, s in samples.items()}


def _score(probs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    result = {
        "max_abs_diff": float(np.abs(probs - reference).max()),
        "agreement_with_keras": float(np.mean(probs.argmax(1) == reference.argmax(1))),
    }
    if labels is not None:
        result["top1"] = float(np.mean(probs.argmax(1) == labels))
    return result


def measured_at_export(metrics: dict, top1: float | None) -> dict:
    """The card's metrics with `validation_top1` as export measured it (at the export size,
    through the serving preprocessing). Where the training report's figure differs (it may be at
    another size), it and its per-class table stay, named as the report's."""
    metrics = dict(metrics)
    reported = metrics.get("validation_top1")
    if reported == top1:
        return metrics
    metrics["validation_top1_in_training_report"] = reported
    metrics["validation_top1"] = top1
    # The report rounds to 4 places: only past that is its table of another measurement.
    same = reported is not None and top1 is not None and abs(reported - top1) <= 5e-5
    if "validation" in metrics and not same:
        metrics["validation_in_training_report"] = metrics.pop("validation")
    return metrics


def export_model(
    model: keras.Model,
    out_dir: str | Path,
    *,
    labels: list[str],
    name: str,
    version: str = "1.0.0",
    variant: str = "unknown",
    calibration: np.ndarray,
    validation: Photos,
    quantizations: tuple[str, ...] = tuple(TFLITE_VARIANTS),
    training_info: dict | None = None,
    metrics: dict | None = None,
    split: dict | None = None,
    evaluated_on: Evaluation | None = None,
    overwrite: bool = False,
    threads: int = 1,
) -> tuple[ModelCard, list[dict]]:
    """Write a model directory; returns its card and one table row per artifact."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass --overwrite to replace it")
    height, width = model.input_shape[1:3]
    if len(labels) != model.output_shape[-1]:
        raise ExportError(f"{len(labels)} labels for a model with {model.output_shape[-1]} outputs")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        rows, artifacts = _write_artifacts(
            model, tmp, calibration, validation, quantizations, threads, len(labels)
        )
        float_tflite = next(r for r in rows if r["file"] == TFLITE_VARIANTS["float32"])
        # Serve a quantized variant by default only if it keeps parity and is clearly faster
        # (10%) both alone and batched; otherwise float32, whose answers equal the Keras model's.
        candidates = [r for r in rows if r["format"] == "tflite" and r["parity_ok"]]
        speed = _serving_speed(tmp, [r["file"] for r in candidates], validation.images, threads)
        default_tflite = choose_default_tflite(speed, float_tflite["file"])
        for row in candidates:  # in model.json and printed, so the choice can be checked
            batch_1, batch_8 = speed[row["file"]]
            row["img_per_s_1_thread"] = {"batch_1": batch_1, "batch_8": batch_8}
        keras_row = rows[0]
        metrics = dict(metrics or {})
        split_record = None
        if split is not None:
            metrics = measured_at_export(metrics, keras_row.get("top1"))
            (tmp / SPLIT_FILE).write_text(json.dumps(split, indent=1) + "\n")
            split_record = SplitRecord(
                sha256=sha256_path(tmp / SPLIT_FILE),
                data=str(split.get("root", "")),
                train_images=len(split["train"]),
                validation_images=len(split["val"]),
            )
        card = ModelCard(
            name=name,
            version=version,
            variant=variant,
            parameters=int(model.count_params()),
            labels=list(labels),
            input={"height": int(height), "width": int(width)},
            preprocessing=DEFAULT_PREPROCESSING,
            training=training_info or {},
            metrics={**metrics, "artifacts": {r["file"]: _public(r) for r in rows}},
            split=split_record,
            evaluated_on=evaluated_on,
            artifacts=artifacts,
            default_artifacts={
                "tflite": default_tflite,
                "savedmodel": "saved_model",
            },
            versions=_versions(),
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        write_card(tmp, card)
        tmp.chmod(0o755)  # mkdtemp makes it 0700: the container's non-root user must read it
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return card, rows


def _public(row: dict) -> dict:
    return {k: row[k] for k in row if k not in ("file",)}


def _write_artifacts(model, tmp, calibration, validation, quantizations, threads, num_labels):
    height, width = model.input_shape[1:3]
    images = validation.images.astype(np.float32)
    reference, keras_ms = _timed_predict(lambda x: model.predict_on_batch(x), images)
    rows = [{
        "file": "(keras)", "format": "keras", "quantization": "float32", "bytes": 0,
        "latency_ms": keras_ms, "parity_ok": True,
        **_score(reference, reference, validation.labels),
    }]  # fmt: skip
    artifacts = []

    model.export(str(tmp / "saved_model"), format="tf_saved_model", verbose=False)
    saved = SavedModelBackend(tmp / "saved_model")
    check_shapes(saved, height, width, num_labels, tmp / "saved_model")
    rows.append(
        _evaluate(
            "saved_model", "savedmodel", "float32", saved, images, reference, validation.labels, tmp
        )
    )

    for quantization in quantizations:
        file = TFLITE_VARIANTS[quantization]
        (tmp / file).write_bytes(convert_tflite(tmp / "saved_model", quantization, calibration))
        backend = TFLiteBackend(tmp / file, num_threads=threads)
        foreign = {op for op in backend.op_names() if op.startswith("Flex") or op == "CUSTOM"}
        if foreign:
            raise ExportError(f"{file} needs ops LiteRT cannot run: {sorted(foreign)}")
        check_shapes(backend, height, width, num_labels, tmp / file)
        if backend.input_shape[0] != -1:
            raise ExportError(f"{file} has a fixed batch size {backend.input_shape[0]}")
        rows.append(
            _evaluate(
                file, "tflite", quantization, backend, images, reference, validation.labels, tmp
            )
        )

    for row in rows[1:]:
        extra = {k: row[k] for k in ("top1", "agreement_with_keras", "max_abs_diff") if k in row}
        artifacts.append(
            describe_artifact(tmp, row["file"], row["format"], row["quantization"], **extra)
        )
    bad_float = [r["file"] for r in rows if r["quantization"] == "float32" and not r["parity_ok"]]
    if bad_float:
        raise ExportError(
            f"float artifacts differ from Keras by more than {FLOAT_TOLERANCE}: {bad_float}"
        )
    return rows, artifacts


def _evaluate(file, fmt, quantization, backend, images, reference, labels, tmp) -> dict:
    probs, latency = _timed_predict(backend.predict, images)
    row = {"file": file, "format": fmt, "quantization": quantization, "latency_ms": latency,
           **_score(probs, reference, labels)}  # fmt: skip
    row["bytes"] = size_of(tmp / file)
    if quantization == "float32":
        row["parity_ok"] = row["max_abs_diff"] <= FLOAT_TOLERANCE
    else:
        keras_top1 = float(np.mean(reference.argmax(1) == labels)) if labels is not None else None
        loss_ok = keras_top1 is None or keras_top1 - row["top1"] <= MAX_ACCURACY_LOSS
        row["parity_ok"] = bool(row["agreement_with_keras"] >= MIN_AGREEMENT and loss_ok)
    return row


def _versions() -> dict[str, str]:
    import tensorflow as tf

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'artifact':<22}{'quant':<15}{'size MB':>9}{'top-1':>11}{'agree':>8}"
        f"{'max|dp|':>10}{'ms/img':>8}  parity"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        top1 = f"{r['top1']:.2%}" if "top1" in r else "-"
        lines.append(
            f"{r['file']:<22}{r['quantization']:<15}{r['bytes'] / 1e6:>9.2f}{top1:>11}"
            f"{r['agreement_with_keras']:>8.2%}{r['max_abs_diff']:>10.2e}{r['latency_ms']:>8.2f}"
            f"  {'ok' if r['parity_ok'] else 'FAILED'}"
        )
    timed = [r for r in rows if "img_per_s_1_thread" in r]
    if timed:
        lines.append("\nimg/s with 1 interpreter thread (median of 5 interleaved rounds):")
        for r in timed:
            rates = r["img_per_s_1_thread"]
            lines.append(f"  {r['file']:<22}batch 1 {rates['batch_1']:7.1f}   "
                         f"batch 8 {rates['batch_8']:7.1f}")  # fmt: skip
    return "\n".join(lines)


def earlier_runs(report: dict) -> list[dict]:
    """The runs this one started from (train --init-from), newest first, from their reports."""
    runs: list[dict] = []
    source = (report.get("recipe") or {}).get("init_from")
    while source and len(runs) < 10:
        card_path = Path(source) / "model.json"
        if card_path.is_file():  # an exported model directory carries its own lineage
            card = json.loads(card_path.read_text())
            training = card.get("training") or {}
            runs.append({
                "weights": source,
                "model": f"{card.get('name')} {card.get('version')}",
                "epochs": training.get("epochs"),
                "image_size": training.get("trained_image_size"),
                "wall_time_s": training.get("wall_time_s"),
                "validation_top1": (card.get("metrics") or {}).get("validation_top1"),
                "recipe": training.get("recipe"),
            })  # fmt: skip
            runs += training.get("initialised_from", [])
            break
        path = Path(source).parent / "report.json"
        if not path.exists():
            runs.append({"weights": source, "report": None})
            break
        earlier = json.loads(path.read_text())
        runs.append({
            "weights": source,
            "epochs": earlier.get("epochs_completed"),
            "image_size": earlier.get("image_size"),
            "wall_time_s": earlier.get("wall_time_s"),
            "validation_top1": (earlier.get("validation") or {}).get("top1"),
            "recipe": earlier.get("recipe"),
        })  # fmt: skip
        source = (earlier.get("recipe") or {}).get("init_from")
    return runs


def resolve_model(path: str | Path) -> tuple[Path, Path | None]:
    """A run directory (final.keras or best.keras inside) or a .keras file -> (file, run dir)."""
    path = Path(path)
    if path.is_dir():
        for name in ("final.keras", "best.keras"):
            if (path / name).is_file():
                return path / name, path
        raise ExportError(f"{path} is not a run directory: no final.keras or best.keras inside")
    if path.is_file() and path.suffix == ".keras":
        return path, None
    raise ExportError(f"{path} is neither a run directory nor a .keras file")


def resize_model(model: keras.Model, image_size: int, variant: str) -> keras.Model:
    """The same weights at another input size (MobileViT has no positional embeddings)."""
    from training.model import build_model, padding_of

    if image_size % 32:
        raise ExportError(f"--image-size must be a multiple of 32, got {image_size}")
    if model.input_shape[1] == image_size:
        return model
    resized = build_model(variant, model.output_shape[-1], image_size, padding=padding_of(model))
    resized.set_weights(model.get_weights())
    return resized


#: Training photos BatchNorm statistics are re-estimated on at another input size.
RECALIBRATION_PHOTOS = 1280


def at_size(model: keras.Model, size: int, variant: str, root: Path, train_files) -> keras.Model:
    """The model at `size` px. At another size than its own: the same weights, with every
    BatchNorm's statistics re-estimated on training photos at that size (statistics seen at
    the training size do not hold at another; FixRes-style test-resolution fix)."""
    if model.input_shape[1] == size:
        return model
    from training.train import recalibrate_batchnorm

    resized = resize_model(model, size, variant)
    files = np.random.default_rng(1).permutation(train_files)[:RECALIBRATION_PHOTOS]
    recalibrate_batchnorm(resized, load_photos(root, list(files), None, size).images)
    return resized


def load_photos(
    root: Path, files: list[str], labels: list[int] | None, size: int, skip_bad: bool = False
) -> Photos:
    """The files through the serving preprocessing; with `skip_bad`, files that do not decode
    (a stray notes.txt in a class folder) are left out with a warning, not an error."""
    images, kept, kept_labels = [], [], []
    for i, rel in enumerate(files):
        try:
            images.append(preprocess_file(root / rel, size))
        except (ImageError, OSError) as exc:
            if not skip_bad:
                raise
            log.warning("skipping %s: %s", root / rel, exc)
            continue
        kept.append(rel)
        if labels is not None:
            kept_labels.append(labels[i])
    if not images:
        raise ExportError(f"no readable photos under {root}")
    return Photos(np.stack(images), None if labels is None else np.asarray(kept_labels), kept)


def labels_of(files: list[str], labels: list[str], root: Path) -> list[int]:
    """Each photo's label index from its class folder; a folder that is not a label is an
    error naming it."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({Path(f).parts[0] for f in files} - set(index))
    if unknown:
        raise ExportError(f"class folders {unknown} under {root} are not among the model's "
                          f"labels {labels}")  # fmt: skip
    return [index[Path(f).parts[0]] for f in files]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m training.export", description=__doc__.split("\n")[0]
    )
    p.add_argument("model", help="run directory (final.keras, else best.keras) or a .keras file")
    p.add_argument("--out", required=True, help="model directory to create, e.g. models/flowers")
    p.add_argument("--name", help="model name (default: the --out folder name)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--image-size", type=int, help="export at another input size (multiple of 32)")
    p.add_argument("--data", help="labelled photo folder for parity checks (default: the run's)")
    p.add_argument("--calibration-images", type=int, default=200)
    p.add_argument(
        "--quantizations",
        default=",".join(TFLITE_VARIANTS),
        help=f"comma-separated subset of {','.join(TFLITE_VARIANTS)} (float32 required)",
    )
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        card, rows = run_export(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"\nwrote {args.out} (default tflite artifact: {card.default_artifacts['tflite']})")
    return 0


def run_export(args: argparse.Namespace) -> tuple[ModelCard, list[dict]]:
    from training.data import DataError, read_split_file, scan_folder
    from training.model import load_keras

    quantizations = tuple(q for q in args.quantizations.split(",") if q)
    unknown = set(quantizations) - set(TFLITE_VARIANTS)
    if unknown or "float32" not in quantizations:
        raise ExportError(f"--quantizations must include float32 and only {list(TFLITE_VARIANTS)}")
    if args.image_size is not None and args.image_size % 32:
        raise ExportError(f"--image-size must be a multiple of 32, got {args.image_size}")
    if Path(args.out).exists() and not args.overwrite:
        raise ExportError(f"{args.out} already exists; pass --overwrite to replace it")
    model_file, run_dir = resolve_model(args.model)
    try:
        model = load_keras(model_file)
    except Exception as exc:
        raise ExportError(f"{model_file} is not a loadable Keras model: {exc}") from None
    # A run stopped before its end has best.keras but no report.json (written with final.keras).
    has_report = run_dir is not None and (run_dir / "report.json").is_file()
    report = json.loads((run_dir / "report.json").read_text()) if has_report else {}
    variant = report.get("variant", model.name.removeprefix("mobilevit_"))
    split = None
    if run_dir and (run_dir / "split.json").is_file():
        try:
            split = read_split_file(run_dir / "split.json")
        except DataError as exc:
            raise ExportError(str(exc)) from None
    root = Path(args.data or (split or {}).get("root", ""))
    if not (args.data or split) or not root.is_dir():
        raise ExportError(
            f"{args.model} has no recorded split (split.json beside it); pass --data with one "
            "folder of photos per class"
            if not (args.data or split)
            else f"data folder not found: {root}; pass --data"
        )
    if split:
        labels = split["class_names"]
        train_files, val_files = split["train"], split["val"]
        missing = [f for f in val_files if not (root / f).is_file()]
        if missing:
            raise ExportError(f"{len(missing)} validation photos of the run are not under "
                              f"{root}, e.g. {missing[0]}")  # fmt: skip
    else:
        try:
            files, _, labels = scan_folder(root)
        except DataError as exc:
            raise ExportError(str(exc)) from None
        val_files = files
    if len(labels) != model.output_shape[-1]:
        raise ExportError(f"{root} has {len(labels)} class folders {labels}; the model has "
                          f"{model.output_shape[-1]} outputs")  # fmt: skip
    size = args.image_size or model.input_shape[1]
    validation = load_photos(root, val_files, labels_of(val_files, labels, root), size, not split)
    if not split:  # without a split every readable photo is scored and calibrated on
        train_files = validation.files
    model = at_size(model, size, variant, root, train_files)
    rng = np.random.default_rng(0)
    calib_files = list(
        rng.choice(train_files, min(args.calibration_images, len(train_files)), replace=False)
    )
    evaluated_on = Evaluation(
        photos="validation_split" if split else "all_photos",
        data=str(root),
        images=len(validation.files),
    )
    log.info(
        "parity on %d %s, calibration on %d training photos at %d px",
        len(validation.files),
        "validation photos" if split else f"photos of {root} (no split: may include training ones)",
        len(calib_files),
        size,
    )
    training_info = {
        "data": report.get("data"),
        "train_images": report.get("train_images"),
        "val_images": report.get("val_images"),
        "epochs": report.get("epochs_completed"),
        "best_epoch": report.get("best_epoch"),
        "trained_image_size": report.get("image_size"),
        "wall_time_s": report.get("wall_time_s"),
        "recipe": report.get("recipe"),
    } if report else {}  # fmt: skip
    if report.get("pretrained"):  # weights from an ImageNet checkpoint: where they came from
        training_info["pretrained"] = report["pretrained"]
    lineage = [] if report.get("pretrained") else earlier_runs(report)
    if lineage:
        training_info["initialised_from"] = lineage
    metrics = {
        "validation_top1": (report.get("validation") or {}).get("top1"),
        "validation": report.get("validation"),
    } if report else {}  # fmt: skip
    return export_model(
        model,
        args.out,
        labels=labels,
        name=args.name or Path(args.out).name,
        version=args.version,
        variant=variant,
        calibration=load_photos(root, calib_files, None, size).images,
        validation=validation,
        quantizations=quantizations,
        training_info=training_info,
        metrics=metrics,
        split=split,
        evaluated_on=evaluated_on,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(main())
