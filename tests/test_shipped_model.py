"""The shipped model directory, served as users get it: it loads (hashes, shapes, warm-up), and
over HTTP it scores on its validation photos exactly the top-1 its model.json records.

The validation photos are those its split.json records (hash-checked), from
../shared/datasets/flower_photos (present where the project is developed and in CI); without
them these tests skip. The float32 TFLite artifact, the default, runs in the fast suite; the
SavedModel and the other TFLite variants run with `-m slow`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.settings import DEFAULT_MODEL_DIR
from tests.serving_helpers import make_settings, serve
from training.data import read_split_file, split_file_of

pytestmark = pytest.mark.anyio

PHOTOS = DEFAULT_MODEL_DIR.parent.parent.parent / "shared" / "datasets" / "flower_photos"
CARD = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())
FILES_PER_REQUEST = 16  # the default MAX_FILES


@pytest.fixture(scope="module")
def validation_photos() -> list[tuple[Path, str]]:
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} is not here")
    val = read_split_file(split_file_of(DEFAULT_MODEL_DIR))["val"]
    return [(PHOTOS / rel, Path(rel).parts[0]) for rel in val]


async def served_labels(client: httpx.AsyncClient, photos: list[Path]) -> list[str]:
    """The label the service answers for each photo, several photos per request, 4 at a time."""
    gate = asyncio.Semaphore(4)

    async def one(chunk: list[Path]) -> list[str]:
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk]
        async with gate:
            response = await client.post("/predict?top_k=1", files=files)
        assert response.status_code == 200, response.text[:300]
        predictions = response.json()["predictions"]
        assert [p["filename"] for p in predictions] == [p.name for p in chunk]
        return [p["label"] for p in predictions]

    chunks = [photos[i : i + FILES_PER_REQUEST] for i in range(0, len(photos), FILES_PER_REQUEST)]
    return [label for labels in await asyncio.gather(*map(one, chunks)) for label in labels]


def recorded_top1(artifact_file: str) -> float:
    (row,) = [a for a in CARD["artifacts"] if a["file"] == artifact_file]
    return row["top1"]


@pytest.mark.parametrize(
    ("fmt", "artifact"),
    [
        ("tflite", None),
        pytest.param("savedmodel", None, marks=pytest.mark.slow),
        *[
            pytest.param("tflite", a["file"], marks=pytest.mark.slow)
            for a in CARD["artifacts"]
            if a["format"] == "tflite" and a["file"] != CARD["default_artifacts"]["tflite"]
        ],
    ],
)
async def test_the_shipped_model_scores_what_its_card_records(validation_photos, fmt, artifact):
    assert CARD["evaluated_on"]["photos"] == "validation_split"
    assert (
        len(validation_photos)
        == CARD["training"]["val_images"]
        == CARD["split"]["validation_images"]
    )
    settings = make_settings(DEFAULT_MODEL_DIR, fmt, artifact=artifact)
    async with serve(settings) as served:
        info = (await served.client.get("/model-info")).json()
        assert (info["name"], info["version"]) == (CARD["name"], CARD["version"])
        labels = await served_labels(served.client, [path for path, _ in validation_photos])
    truth = [label for _, label in validation_photos]
    top1 = float(np.mean(np.asarray(labels) == np.asarray(truth)))
    # The export scored the same photos through the same preprocessing and artifact.
    assert top1 == pytest.approx(recorded_top1(info["served"]["artifact"]), abs=1e-9)
