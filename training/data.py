"""Photos in, batches out: folder scanning, a seeded stratified split, augmentation, batching.

Images are decoded once with the serving decoder (`contract.preprocess`), brought down to a bound
tied to the training size, and kept in memory for augmentation. Validation photos are scored on
the pixels the service makes of their files (`served_arrays`), not on the shrunk copies. The
train/validation split is written once (split.json) and read back, never re-derived.
The pipeline is numpy + Pillow inside a `keras.utils.PyDataset`, so it runs under any backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from contract.card import ArtifactError, read_card, verify_split
from contract.preprocess import (
    ImageError,
    load_bounded,
    load_rgb,
    preprocess_file,
    resize_for_model,
)

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
    (hash-checked), a run directory's split.json, that of the run a `.keras` file is in, or a
    split file given as it is."""
    if (source / "model.json").is_file():
        try:
            card = read_card(source)
            if card.split is None:
                raise DataError(f"{source}/model.json records no split, so the photos it was "
                                "trained on are unknown")  # fmt: skip
            return verify_split(source, card.split)
        except ArtifactError as exc:
            raise DataError(str(exc)) from None
    if source.suffix == ".json" and source.is_file():  # a split file itself, by any name
        return source
    split = source / "split.json" if source.is_dir() else source.parent / "split.json"
    if not split.is_file():
        raise DataError(f"{split} is missing, so the photos {source} was trained on are unknown")
    return split


def recorded_split(source: Path, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (train, validation) indices into `paths` that `source` was trained on."""
    return read_split(split_file_of(source), paths)


def _shear(image: Image.Image, m: float, axis: int) -> Image.Image:
    coeffs = (1, m, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, m, 1, 0)
    return image.transform(image.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)


def _translate(image: Image.Image, m: float, axis: int) -> Image.Image:
    shift = m * image.size[axis]
    coeffs = (1, 0, shift, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, shift)
    return image.transform(image.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)


#: TrivialAugment's "wide" operations (Müller & Hutter 2021): name -> (op(image, m), magnitude
#: range). Signed operations flip the sign of m at random.
TRIVIAL_OPS: dict[str, tuple[Callable[[Image.Image, float], Image.Image], float, bool]] = {
    "identity": (lambda im, m: im, 0.0, False),
    "autocontrast": (lambda im, m: ImageOps.autocontrast(im), 0.0, False),
    "equalize": (lambda im, m: ImageOps.equalize(im), 0.0, False),
    "rotate": (lambda im, m: im.rotate(m, resample=Image.Resampling.BILINEAR), 135.0, True),
    "solarize": (lambda im, m: ImageOps.solarize(im, 256 - int(m)), 256.0, False),
    "color": (lambda im, m: ImageEnhance.Color(im).enhance(1 + m), 0.99, True),
    "contrast": (lambda im, m: ImageEnhance.Contrast(im).enhance(1 + m), 0.99, True),
    "brightness": (lambda im, m: ImageEnhance.Brightness(im).enhance(1 + m), 0.99, True),
    "sharpness": (lambda im, m: ImageEnhance.Sharpness(im).enhance(1 + m), 0.99, True),
    "posterize": (lambda im, m: ImageOps.posterize(im, 8 - int(m)), 6.0, False),
    "shear_x": (lambda im, m: _shear(im, m, 0), 0.99, True),
    "shear_y": (lambda im, m: _shear(im, m, 1), 0.99, True),
    "translate_x": (lambda im, m: _translate(im, m, 0), 0.32, True),
    "translate_y": (lambda im, m: _translate(im, m, 1), 0.32, True),
}


def trivial_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One operation, chosen uniformly, at a uniformly random magnitude."""
    name = list(TRIVIAL_OPS)[rng.integers(len(TRIVIAL_OPS))]
    op, top, signed = TRIVIAL_OPS[name]
    magnitude = rng.uniform(0, top)
    if signed and rng.random() < 0.5:
        magnitude = -magnitude
    return op(image, magnitude)


def random_erase(pixels: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """With probability `p`, replace one random box (2-33% of the area, aspect 0.3-3.3) with
    noise (Zhong et al. 2020, timm's `RandomErasing` in pixel mode)."""
    if p <= 0 or rng.random() >= p:
        return pixels
    height, width, _ = pixels.shape
    for _ in range(10):
        area = height * width * rng.uniform(0.02, 1 / 3)
        ratio = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < h < height and 0 < w < width:
            top, left = rng.integers(0, height - h), rng.integers(0, width - w)
            pixels = pixels.copy()
            pixels[top : top + h, left : left + w] = rng.integers(0, 256, (h, w, 3), np.uint8)
            return pixels
    return pixels


@dataclass(frozen=True)
class Augment:
    """Random-resized crop + horizontal flip (+ colour jitter, TrivialAugment, random erasing),
    ml-cvnets / timm style."""

    size: int
    min_scale: float = 0.25
    max_ratio: float = 4 / 3
    color_jitter: float = 0.0
    trivial: bool = False
    erase: float = 0.0

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
        if self.trivial:
            out = trivial_augment(out, rng)
        return random_erase(np.asarray(out, dtype=np.uint8), rng, self.erase)


@dataclass(frozen=True)
class MixBatch:
    """Mixup (alpha `mixup`) or CutMix (alpha `cutmix`) on a whole batch, one of them at random
    when both are on (timm's `Mixup`); labels are mixed in proportion to the pixels."""

    mixup: float = 0.0
    cutmix: float = 0.0

    def __call__(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
        choices = [k for k, alpha in (("mixup", self.mixup), ("cutmix", self.cutmix)) if alpha > 0]
        if not choices:
            return x, y
        kind = choices[rng.integers(len(choices))]
        lam = float(rng.beta(getattr(self, kind), getattr(self, kind)))
        order = rng.permutation(len(x))
        if kind == "mixup":
            x = lam * x + (1 - lam) * x[order]
        else:
            height, width = x.shape[1:3]
            h, w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
            cy, cx = rng.integers(0, height), rng.integers(0, width)
            top, bottom = max(0, cy - h // 2), min(height, cy + h // 2)
            left, right = max(0, cx - w // 2), min(width, cx + w // 2)
            x = x.copy()
            x[:, top:bottom, left:right] = x[order, top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (height * width)
        return x, lam * y + (1 - lam) * y[order]


def eval_arrays(dataset: Dataset, size: int) -> np.ndarray:
    """The resize rule over the images kept in memory: uint8 [N, size, size, 3]."""
    return np.stack([resize_for_model(image, size) for image in dataset.images])


def served_arrays(dataset: Dataset, size: int) -> np.ndarray:
    """uint8 [N, size, size, 3] as the service makes them: each file read and decoded by
    `contract.preprocess.preprocess_file`. The copies kept in memory are shrunk first, which
    can move a large photo's crop by a pixel. A tfds dataset has no files: its images, decoded
    whole, go through the resize rule."""
    if not Path(dataset.root).is_dir():
        return eval_arrays(dataset, size)
    return np.stack([preprocess_file(Path(dataset.root, path), size) for path in dataset.paths])


class PhotoBatches(keras.utils.PyDataset):
    """Shuffled, augmented batches of (float32 pixels 0..255, one-hot labels). With `shard`
    (process, processes), a process of a multi-process run gets its share of each batch; the
    batches are the same in every process. With `sizes` (multi-scale training, MobileViT's
    sampler with a fixed batch size), batch i of epoch e is cropped to sizes[(i + e) % k]:
    every size equally often, and no two batches in a row at one size (Keras' TensorFlow
    adapter reads the input's shape off the first two batches: they must differ)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        transform: Augment,
        seed: int,
        epoch: int = 0,
        mix: MixBatch | None = None,
        shard: tuple[int, int] = (0, 1),
        sizes: Sequence[int] = (),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dataset, self.batch_size, self.transform = dataset, batch_size, transform
        self.sizes = tuple(sizes)
        self.mix = mix or MixBatch()
        self.seed, self.epoch = seed, epoch
        self.shard = shard
        self.num_classes = len(dataset.class_names)
        self._order = self._shuffled()

    def _shuffled(self) -> np.ndarray:
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.dataset.labels))

    def __len__(self) -> int:
        # Drop the last partial batch: BatchNorm statistics from a handful of images are noise.
        return max(1, len(self.dataset.labels) // self.batch_size)

    @property
    def images_per_epoch(self) -> int:
        return len(self) * self.batch_size

    def __getitem__(self, index: int):
        ids = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        process, processes = self.shard
        ids = ids[process::processes]  # this process's share of the batch
        rng = np.random.default_rng((self.seed, self.epoch, index))
        transform = self.transform
        if self.sizes:
            transform = replace(transform, size=self.sizes[(index + self.epoch) % len(self.sizes)])
        x = np.stack([transform(self.dataset.images[i], rng) for i in ids]).astype(np.float32)
        y = keras.utils.to_categorical(self.dataset.labels[ids], self.num_classes)
        return self.mix(x, y, rng)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._shuffled()
