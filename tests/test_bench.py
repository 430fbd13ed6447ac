"""The statistics and choices the benchmarks print their claims with, and the bare service."""

import importlib
import re

import httpx
import numpy as np
import pytest

from bench.batch_cost import main as batch_cost
from bench.batch_cost import recommended_batch
from bench.p99_ab import bootstrap_diff
from tests.serving_helpers import Lifespan, image_bytes


def test_bootstrap_interval_holds_zero_for_the_same_distribution():
    rng = np.random.default_rng(0)
    on, off = rng.gamma(4.0, 2.0, size=(2, 4000))
    diff, low, high = bootstrap_diff(on, off, 99, rounds=500, seed=0)
    assert low <= diff <= high
    assert low < 0 < high


def test_bootstrap_interval_finds_a_real_shift():
    rng = np.random.default_rng(1)
    off = rng.gamma(4.0, 2.0, size=4000)
    on = off + 1.0  # every request 1 ms slower
    diff, low, high = bootstrap_diff(on, off, 50, rounds=500, seed=0)
    assert diff == np.float64(np.percentile(on, 50) - np.percentile(off, 50))
    assert 0.9 < low <= diff <= high < 1.1


def test_recommended_batch_is_the_largest_within_tolerance_of_the_best():
    # Means printed by bench.batch_cost on the development machine (README, Benchmarks).
    at_160px = {1: 407.7, 2: 425.2, 3: 429.4, 4: 431.4, 6: 432.2, 8: 425.4}
    assert recommended_batch(at_160px, 0.02) == 8
    assert recommended_batch(at_160px, 0.015) == 6
    at_256px = {1: 149.7, 2: 145.6, 3: 141.4, 4: 136.0, 6: 130.7, 8: 128.5}
    assert recommended_batch(at_256px, 0.06) == 3
    assert recommended_batch(at_256px, 0.02) == 2  # 1 would turn batching off
    assert recommended_batch({1: 149.7, 4: 136.0}, 0.02) == 1  # 2 not measured


def test_batch_cost_runs_every_batch_size(tiny_model_dir, photo_dir, capsys):
    code = batch_cost(["--model", str(tiny_model_dir), "--photos", str(photo_dir),
                       "--batches", "1,2,4", "--rounds", "2", "--seconds", "0.05"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 4]
    assert all(float(r[1]) > 0 for r in rows) and max(float(r[2]) for r in rows) == 1.0
    assert re.search(r"MOBILEVIT_MAX_BATCH_SIZE=[24]\)$", out, re.M)


@pytest.mark.anyio
async def test_the_bare_service_classifies_through_the_real_batcher(tiny_model_dir, monkeypatch):
    # bench.serve's "bare" mode: /predict without the app's features; the rest is the real app.
    monkeypatch.setenv("MOBILEVIT_MODEL_DIR", str(tiny_model_dir))
    import bench.bare_service as bare

    bare = importlib.reload(bare)  # its app reads the settings at import
    lifespan = Lifespan(bare.app)
    await lifespan.startup()
    try:
        transport = httpx.ASGITransport(app=bare.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            ok = await client.post("/predict", content=image_bytes("red"))
            broken = await client.post("/predict", content=b"not an image")
            metrics = (await client.get("/metrics")).text
    finally:
        await lifespan.shutdown()
    assert ok.status_code == 200 and ok.json()["label"] == "red"
    assert broken.status_code == 400
    assert "mobilevit_batch_size_count 1.0" in metrics  # counted by the real batcher
