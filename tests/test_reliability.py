"""Reliability: graceful SIGTERM, overload, deadlines, fault isolation, broken model directories,
auth, schema fuzzing, and the service still answers correctly after all of it.

The model here is built in seconds: a hand-weighted mean-colour classifier (32 px) exported by the
real `training.export.export_model`, so the directory has a SavedModel, a float32 TFLite file and a
hash-checked model.json exactly like a trained one. The overload, deadline, fault and auth tests
share one running app (`shared`); each bends it through `Harness` (a gated stand-in for the
backend's predict, batcher and settings values) and puts everything back, so the last test checks
the very app that was overloaded, timed out, failed and refused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from pydantic import SecretStr

from app.main import create_app
from contract.card import sha256_path
from tests.conftest import COLOURS, REPO
from tests.serving_helpers import (
    LABELS,
    Lifespan,
    Served,
    assert_error,
    free_port,
    image_bytes,
    make_settings,
    metric_value,
    serve,
    server_command,
    server_env,
)

pytest_plugins = ["tests.serving_fixtures"]

SIZE = 32
SECRET = "secret backend detail 7f3a"  # what a failing backend raises; must never reach a client


# ---- a model directory in seconds ------------------------------------------------------------


@pytest.fixture(scope="session")
def colour_model_dir(tmp_path_factory) -> Path:
    """Mean colour -> softmax, weights set by hand (labels blue, green, red), exported for real."""
    import keras

    from training.export import Photos, export_model

    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(inputs))
    dense = keras.layers.Dense(len(LABELS), activation="softmax")
    model = keras.Model(inputs, dense(pooled))
    # rows: input R, G, B; columns: blue, green, red. Each label favours its own channel.
    weights = 4 * np.array([[-1, -1, 2], [-1, 2, -1], [2, -1, -1]], np.float32)
    dense.set_weights([weights, np.zeros(len(LABELS), np.float32)])
    images = np.stack([np.full((SIZE, SIZE, 3), COLOURS[label], np.uint8) for label in LABELS])
    out = tmp_path_factory.mktemp("reliability") / "colour-model"
    export_model(
        model,
        out,
        labels=list(LABELS),
        name="colour-model",
        variant="hand-weighted",
        calibration=images,
        validation=Photos(images, np.arange(len(LABELS))),
        quantizations=("float32",),
    )
    return out


# ---- helpers ---------------------------------------------------------------------------------


def part(colour: str, name: str | None = None, size=(40, 30)):
    return ("file", (name or f"{colour}.jpg", image_bytes(colour, size), "image/jpeg"))


async def post(client: httpx.AsyncClient, colour: str, name: str | None = None, **kwargs):
    return await client.post("/predict", files=[part(colour, name)], **kwargs)


def assert_label(response: httpx.Response, colour: str) -> None:
    assert response.status_code == 200, response.text[:300]
    assert response.json()["predictions"][0]["label"] == colour


class Gate:
    """Stands in for the backend's predict: records batches, holds them while closed, can fail."""

    def __init__(self, real):
        self.real = real
        self.open = threading.Event()
        self.open.set()
        self.batches: list[int] = []
        self.active = 0  # images inside predict right now
        self.fail_next = 0  # how many of the next batches raise

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        self.active += len(images)
        try:
            if not self.open.wait(timeout=60):
                raise TimeoutError("the test never opened the gate")
            if self.fail_next > 0:
                self.fail_next -= 1
                raise RuntimeError(SECRET)
            return self.real(images)
        finally:
            self.active -= len(images)


class Harness:
    """Bends a running app for one test (gated backend, batcher and settings values), then
    waits for it to go idle and puts everything back."""

    def __init__(self, served: Served):
        self.app = served.app
        self.client = served.client
        self.settings = served.settings
        self.batcher = served.app.state.service.batcher
        (real,) = self.batcher._replicas  # the shared app runs one inference worker
        self.gate = Gate(real)
        self.batcher._replicas[0] = self.gate
        self._saved: dict[tuple[int, str], tuple[object, object]] = {}

    def set(self, target: object, **values: object) -> None:
        for name, value in values.items():
            self._saved.setdefault((id(target), name), (target, getattr(target, name)))
            setattr(target, name, value)

    async def idle(self, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while self.batcher.depth or self.gate.active:
                await asyncio.sleep(0.01)

    async def restore(self) -> None:
        self.gate.open.set()
        try:
            await self.idle()
        finally:
            self.batcher._replicas[0] = self.gate.real
            for (_, name), (target, value) in self._saved.items():
                setattr(target, name, value)


@pytest.fixture(scope="module")
async def shared(colour_model_dir, anyio_backend) -> AsyncIterator[Served]:
    """One running app for the module (real lifespan: hash check, warm-up, drain)."""
    # One inference worker, so a gated backend holds exactly one batch.
    settings = make_settings(
        colour_model_dir, max_batch_size=4, queue_limit=64, inference_workers=1
    )
    async with serve(settings) as served:
        yield served


@pytest.fixture
async def harness(shared) -> AsyncIterator[Harness]:
    h = Harness(shared)
    try:
        yield h
    finally:
        await h.restore()


# ---- 1. graceful shutdown --------------------------------------------------------------------


@pytest.mark.anyio
async def test_sigterm_finishes_in_flight_requests_then_exits(colour_model_dir, tmp_path):
    """The real server: SIGTERM with requests waiting in the batcher. uvicorn closes its listener
    first (new connections are refused, so readiness fails at once), answers every in-flight
    request, and only then runs the lifespan shutdown (not-ready, drain, stop). No request can
    reach /health after that point, so the 503-before-draining order is checked at the app level
    in the next test."""
    port, log = free_port(), tmp_path / "server.log"
    # A long batch window keeps the requests queued (in flight) while the signal arrives.
    env = server_env(colour_model_dir, max_batch_wait_ms="4000", max_batch_size="8")
    with open(log, "wb") as out:
        server = subprocess.Popen(
            server_command(port), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    colours = ["red", "green", "blue", "red"]
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            async with asyncio.timeout(90):  # startup
                while True:
                    assert server.poll() is None, log.read_text()
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.2)
            calls = [
                asyncio.create_task(post(client, c, f"{i}-{c}.jpg")) for i, c in enumerate(colours)
            ]
            async with asyncio.timeout(20):
                while (await client.get("/health")).json()["queue_depth"] < len(colours):
                    await asyncio.sleep(0.02)
            server.send_signal(signal.SIGTERM)
            refused_at = None
            async with asyncio.timeout(10):
                while refused_at is None:
                    try:
                        async with httpx.AsyncClient(base_url=base, timeout=5) as fresh:
                            response = await fresh.get("/health")
                        if response.status_code != 200:
                            assert_error(response, 503)
                            refused_at = time.monotonic()
                    except httpx.TransportError:
                        refused_at = time.monotonic()
                    await asyncio.sleep(0.05)
            assert not any(call.done() for call in calls), "requests ended before the batch ran"
            async with asyncio.timeout(30):
                responses = await asyncio.gather(*calls)
        for i, (colour, response) in enumerate(zip(colours, responses, strict=True)):
            assert_label(response, colour)
            assert response.json()["predictions"][0]["filename"] == f"{i}-{colour}.jpg"
        returncode = await asyncio.to_thread(server.wait, 30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = log.read_text()
    # uvicorn re-raises the signal it caught once it has shut down gracefully, so a clean stop on
    # SIGTERM ends "killed by SIGTERM" (143 in a shell); as PID 1 in a container it ends with 0.
    assert returncode in (0, -signal.SIGTERM), (returncode, text)
    assert "stopped after draining the queue" in text and "Application shutdown complete" in text
    assert "Traceback" not in text and "ERROR" not in text, text


@pytest.mark.anyio
async def test_shutdown_reports_not_ready_before_it_drains(colour_model_dir):
    """Lifespan shutdown with work queued: by the time the batcher starts draining, the app
    already says not-ready (health 503 `draining`, ready gauge 0), and the queued work finishes."""
    app = create_app(
        make_settings(colour_model_dir, max_batch_size=1, max_batch_wait_ms=0, inference_workers=1)
    )
    lifespan = Lifespan(app)
    await lifespan.startup()
    batcher = app.state.service.batcher
    gate = Gate(batcher._replicas[0])
    gate.open.clear()
    batcher._replicas[0] = gate
    real_close, seen = batcher.close, {}

    async def close(timeout=None):
        seen.update(status=app.state.status, held=batcher.depth + gate.active)
        await real_close(timeout=timeout)

    batcher.close = close
    stopping = None
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            colours = ["red", "green", "blue"]
            calls = [asyncio.create_task(post(client, c)) for c in colours]
            async with asyncio.timeout(20):
                while batcher.depth + gate.active < len(colours):
                    await asyncio.sleep(0.01)
            stopping = asyncio.create_task(lifespan.shutdown())
            async with asyncio.timeout(10):
                while not seen:
                    await asyncio.sleep(0.005)
            assert seen == {"status": "draining", "held": len(colours)}
            for path in ("/health", "/health/ready"):
                assert_error(await client.get(path), 503, "draining")
            live = await client.get("/health/live")
            assert live.status_code == 200 and live.json()["state"] == "draining"
            assert metric_value((await client.get("/metrics")).text, "mobilevit_ready") == 0
            assert_error(await post(client, "red"), 503, "draining")
            assert not any(call.done() for call in calls) and not stopping.done()
            gate.open.set()
            async with asyncio.timeout(30):
                responses = await asyncio.gather(*calls)
                await stopping
    finally:
        gate.open.set()
        if stopping is None:
            await lifespan.shutdown()
    for colour, response in zip(colours, responses, strict=True):
        assert_label(response, colour)
    assert app.state.status == "stopped"


# ---- 2. overload -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_overload_is_refused_at_once_with_503_and_recovers(harness):
    h = harness
    h.set(h.batcher, max_batch_size=1, max_wait_s=0.0, queue_limit=2)
    h.gate.open.clear()  # the backend holds its first batch: 1 image in it, 2 queued, rest refused
    colours = [LABELS[i % 3] for i in range(10)]
    calls = [asyncio.create_task(post(h.client, c)) for c in colours]
    async with asyncio.timeout(30):  # every request is refused, queued, or inside the backend
        while sum(c.done() for c in calls) + h.batcher.depth + h.gate.active < len(calls):
            await asyncio.sleep(0.01)
    refused = [call.result() for call in calls if call.done()]
    assert not h.gate.open.is_set()  # so none of these answers waited for inference
    assert len(refused) >= len(calls) - 3
    for response in refused:
        body = assert_error(response, 503, "overloaded")  # with Retry-After: 1
        assert "queue is full" in body["error"]
    h.gate.open.set()
    async with asyncio.timeout(30):
        responses = await asyncio.gather(*calls)
    served = [(c, r) for c, r in zip(colours, responses, strict=True) if r.status_code != 503]
    assert len(served) + len(refused) == len(calls) and 2 <= len(served) <= 3
    for colour, response in served:
        assert_label(response, colour)
    assert_label(await post(h.client, "green"), "green")  # load gone: served normally


def noise_png(side: int, seed: int = 0) -> bytes:
    """An image that PNG cannot compress: its size in bytes is about 3 x side x side."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def body_in_pieces(data: bytes, sent_half: asyncio.Event | None = None, go_on=None):
    """`data` in 4 KiB pieces; with events: after half of it, `sent_half`, then wait for `go_on`."""
    half = len(data) // 2
    for start in range(0, len(data), 4096):
        if sent_half is not None and start >= half and not sent_half.is_set():
            sent_half.set()
            await go_on.wait()
        yield data[start : start + 4096]


@pytest.mark.anyio
async def test_uploads_in_flight_are_bounded_and_refused_with_503(harness):
    h = harness
    big = noise_png(96)
    budget = h.app.state.service.body_budget
    h.set(budget, limit=len(big) + len(big) // 2)  # one big body fits, two do not
    png = {"Content-Type": "image/png"}

    sent_half, go_on = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(
        h.client.post(
            "/predict",
            content=body_in_pieces(big, sent_half, go_on),
            headers={**png, "Content-Length": str(len(big))},
        )
    )
    async with asyncio.timeout(30):
        await sent_half.wait()
    assert budget.used == len(big)  # taken from Content-Length before the body arrives

    # Another body that does not fit is refused at once, declared or not (chunked).
    body = assert_error(await h.client.post("/predict", content=big, headers=png), 503)
    assert body["code"] == "overloaded" and "uploads in progress" in body["error"]
    chunked = await h.client.post("/predict", content=body_in_pieces(big), headers=png)
    assert_error(chunked, 503, "overloaded")
    assert budget.used == len(big)  # the refused ones gave their share back
    assert_label(await post(h.client, "red"), "red")  # a small upload still fits

    go_on.set()
    async with asyncio.timeout(30):
        assert (await held).status_code == 200
    assert budget.used == 0
    assert (await h.client.post("/predict", content=big, headers=png)).status_code == 200
    assert budget.used == 0


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["/predict", "v2"])
async def test_a_queued_request_keeps_its_pixels_not_its_upload(harness, route):
    """The upload budget is given back once a request is decoded, so from then on it must hold
    only pixels (which the queue limit bounds), not its encoded bytes."""
    import gc

    from app.decoding import Upload

    h = harness
    h.set(h.batcher, max_batch_size=1)
    h.gate.open.clear()  # the first image stays in the backend, the rest queue behind it
    colours = ["red", "green", "blue"]
    model = h.app.state.service.card.name
    if route == "v2":
        files = [{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                              "data": [base64.b64encode(image_bytes(c)).decode()]}]}
                 for c in colours]  # fmt: skip
        send = [h.client.post(f"/v2/models/{model}/infer", json=body) for body in files]
    else:
        send = [post(h.client, c) for c in colours]
    calls = [asyncio.create_task(call) for call in send]
    async with asyncio.timeout(30):
        while h.batcher.depth + h.gate.active < len(calls):
            await asyncio.sleep(0.01)
    assert h.batcher.depth >= 1
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, Upload)] == []
    h.gate.open.set()
    async with asyncio.timeout(30):
        responses = await asyncio.gather(*calls)
    for colour, response in zip(colours, responses, strict=True):
        assert response.status_code == 200, response.text[:300]
        if route == "/predict":
            assert_label(response, colour)


# ---- 3. deadline -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_deadline_answers_504_and_the_service_goes_on(harness):
    h = harness
    h.set(h.batcher, max_batch_size=1, max_wait_s=0.0)
    h.set(h.settings, request_timeout_s=1.0)
    skipped = h.batcher.stats.skipped_cancelled
    h.gate.open.clear()  # one request is held in the backend, the other waits in the queue
    started = time.monotonic()
    async with asyncio.timeout(30):
        late = await asyncio.gather(post(h.client, "red"), post(h.client, "green"))
    for response in late:
        body = assert_error(response, 504, "timeout")
        assert body["error"] == "request did not finish within 1 s"
    assert time.monotonic() - started < 15
    held = len(h.gate.batches)
    assert held <= 1
    h.set(h.settings, request_timeout_s=30.0)
    h.gate.open.set()
    assert_label(await post(h.client, "blue"), "blue")
    # The abandoned image that was still queued was dropped, not run.
    assert h.batcher.stats.skipped_cancelled - skipped == 2 - held


@pytest.mark.anyio
async def test_a_client_that_disconnects_frees_its_place_in_the_queue(harness):
    h = harness
    h.set(h.batcher, max_batch_size=1, max_wait_s=0.0)
    h.gate.open.clear()  # the backend holds the first request; the second waits in the queue
    first = asyncio.create_task(post(h.client, "red"))
    async with asyncio.timeout(30):
        while not h.gate.active:
            await asyncio.sleep(0.01)
    # The second request at the ASGI level, so the test decides when its client goes away.
    body = image_bytes("green")
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    leave, answer = asyncio.Event(), []

    async def receive() -> dict:
        if incoming:
            return incoming.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        answer.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("test", 80),
             "headers": [(b"content-type", b"image/jpeg"),
                         (b"content-length", str(len(body)).encode())]}  # fmt: skip
    second = asyncio.create_task(h.app(scope, receive, send))
    async with asyncio.timeout(30):
        while h.batcher.depth < 1:
            await asyncio.sleep(0.01)
        leave.set()
        await second
    assert answer[0]["status"] == 499  # recorded in logs and metrics; nobody reads it
    assert h.batcher.depth == 0  # its place in the queue is free before the backend is
    assert h.gate.active == 1
    h.gate.open.set()
    async with asyncio.timeout(30):
        assert_label(await first, "red")
    assert h.gate.batches == [1]  # the abandoned image never reached the backend
    metrics = (await h.client.get("/metrics")).text
    assert metric_value(metrics, "mobilevit_http_requests_total",
                        route="/predict", method="POST", status="499") >= 1  # fmt: skip


# ---- 4. fault isolation ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_failing_batch_fails_only_its_own_requests(harness, caplog):
    h = harness
    h.set(h.batcher, max_batch_size=2, max_wait_s=0.2)
    h.gate.fail_next = 1
    failed_before = h.batcher.stats.failed_batches
    colours = ["red", "green", "blue", "red", "green"]
    async with asyncio.timeout(30):
        responses = await asyncio.gather(*(post(h.client, c) for c in colours))
    failed = [r for r in responses if r.status_code == 500]
    assert 1 <= len(failed) == h.gate.batches[0]  # exactly the first batch's requests
    for response in failed:
        body = assert_error(response, 500, "inference_failed")
        assert body["error"] == "inference failed" and SECRET not in response.text
    for colour, response in zip(colours, responses, strict=True):
        if response.status_code != 500:
            assert_label(response, colour)
    assert h.batcher.stats.failed_batches - failed_before == 1
    assert SECRET in caplog.text  # the detail went to the server log instead
    assert_label(await post(h.client, "blue"), "blue")


# ---- 5. refusing a broken model directory ----------------------------------------------------
# test_service covers a missing directory and an altered artifact (hash mismatch); these are the
# model.json and artifact-content failures it does not.


@pytest.mark.parametrize("problem", ["bad_json", "invalid_card", "unloadable_artifact"])
def test_uvicorn_refuses_a_broken_model_dir(colour_model_dir, tmp_path, problem):
    model_dir = tmp_path / "model"
    shutil.copytree(colour_model_dir, model_dir)
    card_path = model_dir / "model.json"
    card = json.loads(card_path.read_text())
    if problem == "bad_json":
        card_path.write_text(card_path.read_text()[:-30])
        needle, reason = str(card_path), "is not valid JSON"
    elif problem == "invalid_card":
        del card["labels"]
        card_path.write_text(json.dumps(card))
        needle, reason = str(card_path), "labels"
    else:  # garbage whose hash model.json records, so only loading it can tell
        tflite = model_dir / "model.tflite"
        tflite.write_bytes(b"not a flatbuffer " * 64)
        for artifact in card["artifacts"]:
            if artifact["file"] == "model.tflite":
                artifact.update(sha256=sha256_path(tflite), bytes=tflite.stat().st_size)
        card_path.write_text(json.dumps(card))
        needle, reason = str(tflite), "cannot be loaded"
    result = subprocess.run(
        server_command(free_port()),
        cwd=REPO,
        env=server_env(model_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert needle in result.stderr and reason in result.stderr, result.stderr[-2000:]
    assert "Application startup failed" in result.stderr


# ---- 5b. a worker that dies ------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    """uvicorn's worker processes under `pid` (not multiprocessing's resource tracker)."""
    found = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(int(child))
    return found


def _answered_by(metrics_dir: Path, pid: int) -> float:
    """POST /predict 200s counted in one process's own value file."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    alone = metrics_dir.parent / f"only-{pid}"
    shutil.rmtree(alone, ignore_errors=True)
    alone.mkdir()
    shutil.copy(metrics_dir / f"counter_{pid}.db", alone)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(alone))
    text = generate_latest(registry).decode()
    return metric_value(text, "mobilevit_http_requests_total", route="/predict", status="200")


def test_metrics_totals_survive_a_killed_worker(colour_model_dir, tmp_path):
    """uvicorn replaces a worker killed with SIGKILL; the counts it had made stay in /metrics,
    so the total equals the requests answered, before and after."""
    port, log = free_port(), tmp_path / "server.log"
    metrics_dir = tmp_path / "metrics"
    env = {
        **server_env(colour_model_dir, processes="2"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    base = f"http://127.0.0.1:{port}"
    photo = image_bytes("red")

    def send(count: int) -> None:
        for _ in range(count):  # a new connection each: the kernel spreads them over processes
            headers = {"Content-Type": "image/jpeg", "Connection": "close"}
            response = httpx.post(f"{base}/predict", content=photo, headers=headers, timeout=30)
            assert response.status_code == 200

    def counted() -> float:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        return metric_value(text, "mobilevit_http_requests_total", route="/predict", status="200")

    def wait_for(condition, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    with open(log, "wb") as out:
        server = subprocess.Popen(server_command(port), cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: ready() and len(_children(server.pid)) == 2)
        time.sleep(3)  # both workers up, not only the first to answer
        send(40)
        workers = _children(server.pid)
        victim = max(workers, key=lambda pid: _answered_by(metrics_dir, pid))
        assert _answered_by(metrics_dir, victim) > 0
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(_children(server.pid) - {victim}) == 2 and ready())
        time.sleep(3)  # the replacement has started (and looked at the dead one's files)
        send(20)
        assert counted() == 60
        text = httpx.get(f"{base}/metrics", timeout=10).text
        assert metric_value(text, "mobilevit_images_classified_total") == 60
    finally:
        server.terminate()
        server.wait(60)


# ---- 6. auth ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_api_key_guards_predict_and_never_leaks(harness, caplog):
    caplog.set_level(logging.DEBUG)
    h, key = harness, "k3y-only-the-client-knows-4c1d"
    h.set(h.settings, api_key=SecretStr(key))
    responses = []
    for headers in (
        {},
        {"Authorization": f"Bearer {key[:-1]}"},
        {"X-API-Key": key + "x"},
        {"Authorization": f"Basic {key}"},
        {"Authorization": "Bearer "},
        {"X-API-Key": ""},
    ):
        response = await post(h.client, "red", headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        responses.append(response)
    for headers in (
        {"Authorization": f"Bearer {key}"},
        {"authorization": f"bearer {key}"},
        {"X-API-Key": key},
    ):
        response = await post(h.client, "red", headers=headers)
        assert_label(response, "red")
        responses.append(response)
    # Errors past the key check do not echo it either.
    good = {"X-API-Key": key}
    junk = ("file", ("junk.jpg", b"\xff\xd8 not a jpeg" * 20, "image/jpeg"))
    responses.append(await h.client.post("/predict", files=[junk], headers=good))
    assert_error(responses[-1], 400)
    responses.append(await post(h.client, "red", headers=good, params={"top_k": "x"}))
    assert_error(responses[-1], 422)
    for path in ("/health", "/health/ready", "/health/live", "/model-info", "/metrics",
                 "/openapi.json"):  # fmt: skip
        response = await h.client.get(path)
        assert response.status_code == 200, path
        responses.append(response)
    for response in responses:
        assert key not in response.text and key[:-1] not in response.text
        assert not any(key[:-1] in value for value in response.headers.values())
    assert key[:-1] not in caplog.text  # nor the near misses offered above


# ---- 7. schema fuzzing -----------------------------------------------------------------------


@pytest.fixture
def fuzzed_api(colour_model_dir):
    """The app's own OpenAPI schema; loading it over ASGI starts the app's lifespan (model load,
    warm-up), which schemathesis keeps running until the test ends."""
    app = create_app(make_settings(colour_model_dir))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    assert app.state.status == "ready"
    return schema


def fuzz(operation, mode: schemathesis.GenerationMode, examples: int = 25, **path: str) -> int:
    """Call one operation with up to `examples` generated cases; returns how many ran."""
    calls = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode, path_parameters=path or None))
    def check(case):
        nonlocal calls
        calls += 1
        response = case.call()
        assert response.status_code < 500, (response.status_code, response.text[:300])

    try:
        check()
    except Unsatisfiable:  # no parameters or body to make invalid
        assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    return calls


def test_no_server_error_for_any_generated_request(fuzzed_api):
    """Schemathesis cases (valid and invalid) for every operation; any 5xx is a failure.

    Hypothesis is driven here directly: schemathesis 4.32's `pytest.from_fixture` reads
    `Function._nodeid`, which pytest 9 no longer has."""
    operations = [result.ok() for result in fuzzed_api.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /predict", "POST /v2/models/{model_name}/infer"} <= labels
    failures, calls = [], dict.fromkeys(schemathesis.GenerationMode, 0)
    # Random model names only reach the 404; the served name and version reach the body checks.
    served = {"model_name": "colour-model", "model_version": "1.0.0"}
    for operation in operations:
        fixed = {k: v for k, v in served.items() if f"{{{k}}}" in operation.path}
        for mode in schemathesis.GenerationMode:
            for path in ({}, fixed) if fixed else ({},):
                try:
                    calls[mode] += fuzz(operation, mode, **path)
                except AssertionError as exc:
                    failures.append(f"{operation.label} {path} ({mode.value}): {exc}")
    assert not failures, "\n".join(failures)
    assert calls[schemathesis.GenerationMode.POSITIVE] >= 5 * len(operations), calls


# ---- 8. afterwards ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_shared_service_is_still_healthy_and_right(shared):
    health = await shared.client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ready" and health.json()["queue_depth"] == 0
    for colour in ("red", "green", "blue"):
        assert_label(await post(shared.client, colour), colour)
    assert metric_value((await shared.client.get("/metrics")).text, "mobilevit_ready") == 1
