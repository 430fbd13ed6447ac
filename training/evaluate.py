"""Evaluate a trained model on any folder of labelled photos (one sub-folder per class).

    python -m training.evaluate runs/flowers ../my_photos  # Keras: final.keras, else best.keras
    python -m training.evaluate models/flowers-mobilevit-xxs ../my_photos --format tflite
    python -m training.evaluate models/flowers-mobilevit-xxs ../photos --split validation

With `--split validation`, only the photos the model was validated on (never trained on) are
scored: the split its model directory records (split.json, hash-checked) or its run's split.json.

Photos go through the serving preprocessing (`contract.preprocess`, with the model card's rule
for a model directory). Prints top-1,
per-class precision/recall and the confusion matrix; writes evaluation.json and confusion.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from contract.card import ArtifactError, read_card, verify_for_serving
from contract.preprocess import DEFAULT_PREPROCESSING, ImageError, preprocess_file
from contract.runtime import open_backend
from training.data import DataError, read_split_file, scan_folder, split_file_of
from training.report import classification_metrics, format_metrics, plot_confusion

log = logging.getLogger("training.evaluate")


def load_predictor(source: Path, fmt: str, artifact: str | None):
    """(predict function, labels, input size, preprocessing) for a run dir, a .keras file or a
    model dir."""
    if (source / "model.json").is_file():
        try:
            card = read_card(source)
            chosen = card.artifact("tflite" if fmt == "keras" else fmt, artifact)
            verify_for_serving(source, card, chosen)
            backend = open_backend(chosen.format, source / chosen.file)
        except ArtifactError as exc:
            raise DataError(str(exc)) from None
        return backend.predict, card.labels, card.input.height, card.preprocessing
    from training.model import load_keras  # Keras only for a .keras file

    model_file = source
    if source.is_dir():
        model_file = next((source / n for n in ("final.keras", "best.keras")
                           if (source / n).is_file()), source / "final.keras")  # fmt: skip
    if not model_file.is_file():
        raise DataError(f"{source} is not a run directory, a .keras file or a model directory")
    model = load_keras(model_file)
    labels = None
    run_dir = source if source.is_dir() else source.parent  # a .keras file: the run it is in
    for meta in ("split.json", "report.json"):
        if (run_dir / meta).is_file():
            labels = json.loads((run_dir / meta).read_text()).get("class_names")
            break
    if labels is None:
        raise DataError(f"cannot tell {model_file}'s class names: no split.json next to it")
    predict = lambda x: model.predict_on_batch(x.astype(np.float32))  # noqa: E731
    return predict, labels, model.input_shape[1], DEFAULT_PREPROCESSING


def labelled_photos(source: Path, data_dir: Path, split: str) -> list[tuple[str, str]]:
    """(relative path, class name) of the photos to score: every photo under `data_dir`, or
    exactly the validation photos `source`'s recorded split lists (all must be present)."""
    if split == "validation":
        recorded = read_split_file(split_file_of(source))["val"]
        missing = [rel for rel in recorded if not (data_dir / rel).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of the {len(recorded)} recorded validation photos "
                            f"are not under {data_dir}, e.g. {missing[0]}")  # fmt: skip
        log.info("%d validation photos of %s's recorded split", len(recorded), source)
        return [(rel, Path(rel).parts[0]) for rel in recorded]
    paths, folder_labels, class_names = scan_folder(data_dir)
    return [(rel, class_names[label]) for rel, label in zip(paths, folder_labels, strict=True)]


def evaluate(source: Path, data_dir: Path, fmt: str = "keras", artifact: str | None = None,
             batch_size: int = 32, split: str = "all") -> dict:  # fmt: skip
    predict, labels, size, spec = load_predictor(source, fmt, artifact)
    photos = labelled_photos(source, data_dir, split)
    unknown = sorted({name for _, name in photos} - set(labels))
    if unknown:
        raise DataError(f"class folders {unknown} are not among the model's labels {labels}")
    images, truth = [], []
    for rel, name in photos:
        try:
            images.append(preprocess_file(data_dir / rel, size, spec))
            truth.append(labels.index(name))
        except (ImageError, OSError) as exc:
            log.warning("skipping %s: %s", data_dir / rel, exc)
    if not images:
        raise DataError(f"no readable photos under {data_dir}")
    x = np.stack(images)
    probs = np.concatenate([predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return classification_metrics(np.asarray(truth), probs.argmax(axis=1), labels)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "model", type=Path, help="run directory, .keras file or exported model directory"
    )
    p.add_argument("data", type=Path, help="folder with one sub-folder of photos per class")
    p.add_argument(
        "--format",
        default="keras",
        choices=["keras", "tflite", "savedmodel"],
        help="for a model directory: which artifact format to evaluate",
    )
    p.add_argument(
        "--artifact", help="for a model directory: artifact file, e.g. model_int8.tflite"
    )
    p.add_argument(
        "--split",
        default="all",
        choices=["all", "validation"],
        help="all photos of the folder, or only those of the model's recorded validation split",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("evaluation"),
        help="folder for evaluation.json and confusion.png",
    )
    args = p.parse_args(argv)
    try:
        metrics = evaluate(args.model, args.data, args.format, args.artifact, split=args.split)
    except (DataError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(metrics, indent=2))
    plot_confusion(metrics, args.out / "confusion.png")
    print(f"\nwrote {args.out / 'evaluation.json'} and {args.out / 'confusion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
