"""The statistics and choices the benchmarks print their claims with, and the bare service."""

import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.batch_cost import main as batch_cost
from bench.batch_cost import recommended_batch
from tests.serving_helpers import image_bytes


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
async def test_the_peer_classifies_like_the_service(tiny_model_dir, monkeypatch):
    # bench.serve's "peer": one request, one invoke; the same labels as the service.
    monkeypatch.setenv("MOBILEVIT_MODEL_DIR", str(tiny_model_dir))
    import bench.peer as peer

    peer = importlib.reload(peer)  # its app reads the model at import
    transport = httpx.ASGITransport(app=peer.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 200
        answers = [(await client.post("/predict", content=image_bytes(c))).json()["label"]
                   for c in ("red", "green", "blue")]  # fmt: skip
    assert answers == ["red", "green", "blue"]


def test_a_benchmark_pauses_a_training_run_and_resumes_it_however_it_ends():
    from bench.quiet import paused

    def reaches(pid: int, wanted: str) -> bool:
        """Whether the process gets to that state letter (signals are delivered asynchronously)."""
        for _ in range(200):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == wanted:
                return True
            time.sleep(0.01)
        return False

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError), paused([sleeper.pid]) as header:
            assert reaches(sleeper.pid, "T") and f"pid {sleeper.pid}" in header
            assert "busy before the start" in header
            raise RuntimeError("the benchmark failed")
        assert reaches(sleeper.pid, "S")  # sleeping again, no longer stopped
    finally:
        sleeper.kill()
        sleeper.wait()


def test_inference_bench_prints_each_artifact_with_its_recorded_accuracy(tiny_model_dir, photo_dir,
                                                                        capsys):  # fmt: skip
    from bench.inference import main as inference

    assert inference(["--model", str(tiny_model_dir), "--photos", str(photo_dir), "--seconds",
                      "0.05", "--batches", "1", "--threads", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"^model\.tflite\s+float32\s+\d+\.\d\d%\s+1\s+1\s+[\d.]+\s+[\d.]+$", out, re.M)
    assert "1.00x" in out
