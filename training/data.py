"""Photos in, batches out: folder scanning, a seeded stratified split, augmentation, batching.

Images are decoded once with the serving decoder (`contract.preprocess`), brought down to a bound
tied to the training size, and kept in memory; the evaluation transform is
`contract.preprocess.resize_for_model`, exactly what the service applies. The train/validation
split is written once (split.json) and read back, never re-derived.
The pipeline is numpy + Pillow inside a `keras.utils.PyDataset`, so it runs under any backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from PIL import Image, ImageEnhance

from contract.card import ArtifactError, load_model_card, verify_split
from contract.preprocess import ImageError, load_bounded, load_rgb, resize_for_model

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset problem the user must fix; the CLI prints it without a traceback."""


@dataclass
class Dataset:
    """Decoded RGB photos with integer labels; `paths` are relative to `root` (or tfds keys)."""

    root: str
    class_names: list[str]
    paths: list[str]
    labels: np.ndarray
    images: list[Image.Image]

    def subset(self, indices: Sequence[int]) -> Dataset:
        return Dataset(
            self.root,
            self.class_names,
            [self.paths[i] for i in indices],
            self.labels[list(indices)],
            [self.images[i] for i in indices],
        )


def scan_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """List (relative path, label) pairs of a folder with one sub-folder per class."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(
            f"{root} needs at least two class sub-folders (one per class), found {len(class_dirs)}"
        )
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"class folder {class_dir} is empty")
        paths += [str(p.relative_to(root)) for p in files]
        labels += [label] * len(files)
    return paths, labels, [d.name for d in class_dirs]


def load_folder(root: str | os.PathLike, keep_side: int | None = None, workers: int = 4) -> Dataset:
    """Decode every photo of a class-per-folder tree; unreadable files are skipped, warned.

    With `keep_side`, each photo is kept with its shorter side at most that many pixels (JPEG
    draft, then a downscale), so 1,000 12-megapixel photos take hundreds of MB, not 36 GB.
    """
    paths, labels, class_names = scan_folder(root)

    def decode(rel: str) -> Image.Image | None:
        try:
            data = Path(root, rel).read_bytes()
            return load_bounded(data, keep_side) if keep_side else load_rgb(data)
        except (ImageError, OSError) as exc:
            log.warning("skipping %s: %s", Path(root, rel), exc)
            return None

    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(decode, paths))
    keep = [i for i, image in enumerate(images) if image is not None]
    kept_labels = np.asarray([labels[i] for i in keep], dtype=np.int64)
    for label, name in enumerate(class_names):
        if not np.any(kept_labels == label):
            raise DataError(f"class folder {Path(root, name)} has no readable image")
    return Dataset(
        str(root), class_names, [paths[i] for i in keep], kept_labels, [images[i] for i in keep]
    )


def load_tfds(
    name: str = "tf_flowers", split: str = "train", data_dir: str | None = None
) -> Dataset:
    """Load an image-classification dataset through tensorflow-datasets (downloads when online)."""
    import tensorflow_datasets as tfds  # optional: only this path needs it

    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    class_names = builder.info.features["label"].names
    paths, labels, images = [], [], []
    for i, example in enumerate(tfds.as_numpy(builder.as_dataset(split=split))):
        images.append(Image.fromarray(example["image"]).convert("RGB"))
        labels.append(int(example["label"]))
        paths.append(f"{name}/{split}/{i}")
    if len(set(labels)) < 2:
        raise DataError(f"tfds:{name} has fewer than two classes in split {split!r}")
    return Dataset(f"tfds:{name}", list(class_names), paths, np.asarray(labels), images)


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; every class keeps at least one photo on each side."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < 2:
            raise DataError(f"class {label} has {len(members)} photo(s); need at least 2 to split")
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return np.sort(train), np.sort(val)


def write_split(path: str | os.PathLike, dataset: Dataset, train_idx, val_idx, seed: int) -> None:
    split = {
        "root": dataset.root,
        "seed": seed,
        "class_names": dataset.class_names,
        "train": [dataset.paths[i] for i in train_idx],
        "val": [dataset.paths[i] for i in val_idx],
    }
    Path(path).write_text(json.dumps(split, indent=1))


def read_split_file(path: str | os.PathLike) -> dict:
    """A split written by `write_split`: root, seed, class_names, train and val paths."""
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the split {path}: {exc}") from None
    if not isinstance(split, dict) or not {"class_names", "train", "val"} <= set(split):
        raise DataError(f"{path} is not a split file (class_names, train, val)")
    return split


def read_split(path: str | os.PathLike, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `paths` of a split written by `write_split`; photos missing now are dropped."""
    split = read_split_file(path)
    index = {p: i for i, p in enumerate(paths)}
    train = np.asarray([index[p] for p in split["train"] if p in index], dtype=np.int64)
    val = np.asarray([index[p] for p in split["val"] if p in index], dtype=np.int64)
    return train, val


def split_file_of(source: Path) -> Path:
    """The split a model was trained on: an exported model directory's recorded split.json
    (hash-checked), a run directory's split.json, or that of the run a `.keras` file is in."""
    if (source / "model.json").is_file():
        try:
            card = load_model_card(source, verify=False)
            if card.split is None:
                raise DataError(f"{source}/model.json records no split, so the photos it was "
                                "trained on are unknown")  # fmt: skip
            return verify_split(source, card.split)
        except ArtifactError as exc:
            raise DataError(str(exc)) from None
    split = source / "split.json" if source.is_dir() else source.parent / "split.json"
    if not split.is_file():
        raise DataError(f"{split} is missing, so the photos {source} was trained on are unknown")
    return split


def recorded_split(source: Path, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (train, validation) indices into `paths` that `source` was trained on."""
    return read_split(split_file_of(source), paths)


@dataclass(frozen=True)
class Augment:
    """Random-resized crop + horizontal flip (+ optional colour jitter), ml-cvnets style."""

    size: int
    min_scale: float = 0.25
    max_ratio: float = 4 / 3
    color_jitter: float = 0.0

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        width, height = image.size
        box = (0.0, 0.0, float(width), float(height))
        for _ in range(10):
            area = width * height * rng.uniform(self.min_scale, 1.0)
            ratio = math.exp(rng.uniform(-math.log(self.max_ratio), math.log(self.max_ratio)))
            w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
            if w <= width and h <= height:
                left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
                box = (left, top, left + w, top + h)
                break
        out = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                factor = rng.uniform(1 - self.color_jitter, 1 + self.color_jitter)
                out = enhance(out).enhance(factor)
        return np.asarray(out, dtype=np.uint8)


def eval_arrays(dataset: Dataset, size: int) -> np.ndarray:
    """The evaluation transform over a whole dataset: uint8 [N, size, size, 3]."""
    return np.stack([resize_for_model(image, size) for image in dataset.images])


class PhotoBatches(keras.utils.PyDataset):
    """Shuffled, augmented batches of (float32 pixels 0..255, one-hot labels)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        transform: Callable[[Image.Image, np.random.Generator], np.ndarray],
        seed: int,
        epoch: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dataset, self.batch_size, self.transform = dataset, batch_size, transform
        self.seed, self.epoch = seed, epoch
        self.num_classes = len(dataset.class_names)
        self._order = self._shuffled()

    def _shuffled(self) -> np.ndarray:
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.dataset.labels))

    def __len__(self) -> int:
        # Drop the last partial batch: BatchNorm statistics from a handful of images are noise.
        return max(1, len(self.dataset.labels) // self.batch_size)

    def __getitem__(self, index: int):
        ids = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        x = np.stack([self.transform(self.dataset.images[i], rng) for i in ids]).astype(np.float32)
        y = keras.utils.to_categorical(self.dataset.labels[ids], self.num_classes)
        return x, y

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._shuffled()
