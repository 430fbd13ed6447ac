"""Shared fixtures: generated photos, a tiny trained run, and the model directory exported from it.

The tiny model is a real MobileViT-XXS at 64 px trained for a few epochs on solid-ish colour
photos, so every test exercises the same code paths as the shipped model, only smaller.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
COLOURS = {"blue": (30, 60, 220), "green": (40, 190, 60), "red": (220, 40, 40)}
TINY_SIZE = 64


def colour_photo(label: str, rng: np.random.Generator, size=(96, 80)) -> Image.Image:
    """A noisy photo dominated by one colour, with a random darker blob (visibly its class)."""
    base = np.array(COLOURS[label], dtype=np.float32)
    pixels = base + rng.normal(0, 8, (size[1], size[0], 3))
    y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
    pixels[y : y + size[1] // 3, x : x + size[0] // 3] *= 0.6
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photo_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for label in COLOURS:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (int(rng.integers(70, 130)), int(rng.integers(70, 130)))
            colour_photo(label, rng, size).save(root / label / f"{label}_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Every async test runs on asyncio, the loop uvicorn serves on."""
    return "asyncio"


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """blue/, green/, red/ folders of JPEG photos."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"), per_class=20)


@pytest.fixture(scope="session")
def tiny_run(photo_dir, tmp_path_factory) -> Path:
    """A run directory made by the real training command line (a few quick epochs)."""
    from training.train import main

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    code = main([
        "--data", str(photo_dir), "--run-dir", str(run_dir), "--image-size", str(TINY_SIZE),
        "--epochs", "10", "--batch-size", "8", "--warmup-epochs", "1", "--lr", "2e-3",
        "--val-fraction", "0.25", "--no-ema", "--no-jit-compile", "--min-scale", "0.6",
        "--color-jitter", "0",
    ])  # fmt: skip
    assert code == 0
    return run_dir


@pytest.fixture(scope="session")
def tiny_keras_model(tiny_run) -> Path:
    return tiny_run / "final.keras"  # what the export ships


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_run, tmp_path_factory) -> Path:
    """A model directory exported by the real export command line (float32 + int8 TFLite), in
    a process of its own as a user runs it: there nothing has imported the model's layers yet."""
    out = tmp_path_factory.mktemp("models") / "tiny-mobilevit"
    command = [sys.executable, "-m", "training.export", str(tiny_run), "--out", str(out),
               "--quantizations", "float32,int8", "--calibration-images", "16",
               "--name", "tiny-mobilevit"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
