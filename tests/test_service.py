"""The REST service end to end, for both formats: endpoints, errors, auth, batching, parity.

Every app here runs its real lifespan (hash check, backend, warm-up, drain); requests go through
httpx's ASGITransport. `served` is one shared app per format (see serving_fixtures.py).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import types
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.datastructures import Headers

from app.decoding import BodyBudget, Decoder, read_body
from app.errors import ApiError
from app.main import create_app
from app.predict import PredictResponse
from app.routes import RequestDeadline
from app.settings import DEFAULT_MODEL_DIR, Settings
from contract.card import ArtifactError
from contract.preprocess import preprocess_bytes as preprocess_file_bytes
from contract.preprocess import preprocess_file
from tests.conftest import REPO
from tests.serving_helpers import (
    LABELS,
    Lifespan,
    app_status,
    assert_error,
    image_bytes,
    jpeg_with_scans,
    make_settings,
    metric_value,
    running,
    serve,
    wrap_replicas,
)

pytest_plugins = ["tests.serving_fixtures"]
pytestmark = pytest.mark.anyio


def jpeg_part(colour: str, name: str | None = None, size=(40, 30)):
    return ("file", (name or f"{colour}.jpg", image_bytes(colour, size), "image/jpeg"))


def predict_files(served, *parts, **params):
    return served.client.post("/predict", files=list(parts), params=params)


# ---- settings --------------------------------------------------------------------------------


def test_settings_defaults_and_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MOBILEVIT_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.model_dir == DEFAULT_MODEL_DIR == REPO / "models" / "flowers-mobilevit-xxs"
    assert (settings.model_format, settings.artifact) == ("tflite", None)
    assert (settings.max_batch_size, settings.max_batch_wait_ms, settings.queue_limit) == (
        4,
        0,
        256,
    )
    assert (settings.processes, settings.inference_workers, settings.inference_threads) == (
        None,
        None,
        None,
    )
    assert settings.decode_threads is None and settings.cors_origins == []
    assert (settings.host, settings.port, settings.access_log) == ("127.0.0.1", 8000, False)
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.max_inflight_upload_bytes == 256 * 1024 * 1024
    assert (settings.max_image_pixels, settings.max_files) == (40_000_000, 16)
    assert settings.request_timeout_s == 30 and settings.api_key is None
    assert all(field.description for field in Settings.model_fields.values())

    monkeypatch.setenv("MOBILEVIT_MODEL_FORMAT", "savedmodel")
    monkeypatch.setenv("MOBILEVIT_MAX_BATCH_SIZE", "1")
    monkeypatch.setenv("MOBILEVIT_API_KEY", "hunter2")
    settings = Settings()
    assert settings.model_format == "savedmodel" and settings.max_batch_size == 1
    assert settings.api_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)
    monkeypatch.setenv("MOBILEVIT_API_KEY", "")
    assert Settings().api_key is None
    monkeypatch.setenv("MOBILEVIT_CORS_ORIGINS", "https://a.example, http://localhost:3000")
    assert Settings().cors_origins == ["https://a.example", "http://localhost:3000"]
    monkeypatch.setenv("PORT", "8080")  # KServe's convention
    assert Settings().port == 8080
    monkeypatch.setenv("MOBILEVIT_MODEL_FORMAT", "onnx")
    with pytest.raises(ValueError):
        Settings()


def test_the_upload_budget_holds_at_least_the_largest_upload():
    assert Settings(max_upload_bytes=2**30).max_inflight_upload_bytes == 2**30  # default follows
    assert Settings(max_inflight_upload_bytes=2**20, max_upload_bytes=2**20)
    with pytest.raises(ValueError, match="MAX_INFLIGHT_UPLOAD_BYTES"):
        Settings(max_inflight_upload_bytes=2**20, max_upload_bytes=2**21)


def test_contradictory_limits_are_refused_at_startup():
    with pytest.raises(ValueError, match="QUEUE_LIMIT"):  # 9 images would get 503 forever
        Settings(queue_limit=8, max_files=16)
    with pytest.raises(ValueError, match="MAX_BATCH_WAIT_MS"):  # every lone request: 504
        Settings(max_batch_wait_ms=5000, request_timeout_s=2)
    with pytest.raises(ValueError, match="request_timeout_s"):  # python -m app: int(inf)
        Settings(request_timeout_s=float("inf"))
    with pytest.raises(ValueError, match="max_image_pixels"):  # past Pillow's own bomb limit
        Settings(max_image_pixels=100_000_000)


def test_the_api_key_is_stripped_and_must_be_ascii():
    # A key mounted from a file (a Kubernetes secret) often ends in a newline.
    assert Settings(api_key="hunter2\n").api_key.get_secret_value() == "hunter2"
    assert Settings(api_key=" \n").api_key is None
    with pytest.raises(ValueError, match="printable ASCII"):  # headers arrive as latin-1
        Settings(api_key="clé")


def test_import_and_create_app_load_nothing(tmp_path):
    # The module-level app exists without a model; only the lifespan loads one.
    app = create_app(make_settings(tmp_path / "missing"))
    assert app.state.service is None and app.state.status == "loading"


# ---- endpoints -------------------------------------------------------------------------------


async def test_health_endpoints(served):
    for path in ("/health", "/health/ready"):
        response = await served.client.get(path)
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ready"
        assert (body["model"], body["format"]) == ("tiny-mobilevit", served.fmt)
    response = await served.client.get("/health/live")
    assert response.status_code == 200 and response.json()["status"] == "alive"


async def test_model_info(served, tiny_model_dir):
    response = await served.client.get("/model-info")
    assert response.status_code == 200
    info = response.json()
    assert info["name"] == "tiny-mobilevit" and info["labels"] == list(LABELS)
    assert (info["input"]["height"], info["input"]["width"]) == (64, 64)
    assert info["preprocessing"]["resize"] == "shorter_side"
    assert {a["file"] for a in info["artifacts"]} >= {"model.tflite", "saved_model"}
    assert all(len(a["sha256"]) == 64 for a in info["artifacts"])
    expected = "model.tflite" if served.fmt == "tflite" else "saved_model"
    assert info["served"]["format"] == served.fmt and info["served"]["artifact"] == expected
    runtime = "ai-edge-litert" if served.fmt == "tflite" else "tensorflow"
    assert {"python", "numpy", runtime} <= set(info["runtime"])
    assert info["batching"]["max_batch_size"] == 4
    assert info["auth_required"] is False


async def test_predict_one_image(served):
    response = await predict_files(served, jpeg_part("red", "rose.jpg"))
    assert response.status_code == 200, response.text
    body = response.json()
    PredictResponse.model_validate(body, strict=True)  # the documented shape, exactly
    expected_artifact = "model.tflite" if served.fmt == "tflite" else "saved_model"
    assert body["model"] == {
        "name": "tiny-mobilevit",
        "version": body["model"]["version"],
        "format": served.fmt,
        "artifact": expected_artifact,
    }
    (prediction,) = body["predictions"]
    assert prediction["filename"] == "rose.jpg"
    assert prediction["label"] == "red"
    top = prediction["top_k"]
    assert len(top) == 3 and top[0] == {"label": prediction["label"], "score": prediction["score"]}
    scores = [t["score"] for t in top]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)
    assert {t["label"] for t in top} == set(LABELS)
    timings = body["timings_ms"]
    assert set(timings) == {"decode", "queue_and_inference", "total"}
    assert 0 <= timings["decode"] <= timings["total"]


async def test_predict_is_documented_with_its_response_model(served):
    schema = (await served.client.get("/openapi.json")).json()
    operation = schema["paths"]["/predict"]["post"]
    assert operation["parameters"][0]["name"] == "top_k"
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/PredictResponse"}
    assert {"PredictResponse", "Prediction", "LabelScore", "ErrorBody"} <= set(
        schema["components"]["schemas"]
    )
    assert {"400", "401", "413", "415", "422", "503"} <= set(operation["responses"])


async def test_several_files_keep_their_order(served):
    colours = ["green", "red", "blue", "red", "green"]
    parts = [jpeg_part(c, f"{i}-{c}.jpg", size=(30 + 7 * i, 50)) for i, c in enumerate(colours)]
    response = await predict_files(served, *parts, top_k=1)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [f"{i}-{c}.jpg" for i, c in enumerate(colours)]
    assert [p["label"] for p in predictions] == colours
    assert all(len(p["top_k"]) == 1 for p in predictions)


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [("image/jpeg", "JPEG"), ("image/png", "PNG"), ("application/octet-stream", "JPEG")],
)
async def test_raw_body_upload(served, content_type, fmt):
    response = await served.client.post(
        "/predict", content=image_bytes("blue", fmt=fmt), headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["label"] == "blue" and prediction["filename"] is None


async def test_raw_body_filename_from_content_disposition(served):
    response = await served.client.post(
        "/predict",
        content=image_bytes("green"),
        headers={
            "Content-Type": "image/jpeg",
            "Content-Disposition": 'attachment; filename="../x/leaf.jpg"',
        },
    )
    assert response.status_code == 200
    assert response.json()["predictions"][0]["filename"] == "leaf.jpg"


@pytest.mark.parametrize("top_k", [1, 2, 3])
async def test_top_k_in_range(served, top_k):
    response = await predict_files(served, jpeg_part("red"), top_k=top_k)
    assert response.status_code == 200
    assert len(response.json()["predictions"][0]["top_k"]) == top_k


@pytest.mark.parametrize("top_k", ["0", "-1", "4", str(10**9), "abc", "1.5", ""])
async def test_top_k_out_of_range(served, top_k):
    response = await predict_files(served, jpeg_part("red"), top_k=top_k)
    body = assert_error(response, 422, "validation_error")
    assert "top_k" in body["error"]


async def test_metrics(served):
    await predict_files(served, jpeg_part("red"), jpeg_part("green"))
    await served.client.get("/no-such-page")
    response = await served.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric_value(text, "mobilevit_http_requests_total", route="/predict", status="200") >= 1
    assert metric_value(text, "mobilevit_http_requests_total", route="unmatched", status="404") >= 1
    assert (
        metric_value(text, "mobilevit_http_request_duration_seconds_count", route="/predict") >= 1
    )
    assert metric_value(text, "mobilevit_images_classified_total") >= 2
    assert metric_value(text, "mobilevit_batch_size_count") >= 1
    assert metric_value(text, "mobilevit_inference_seconds_count") >= 1
    assert "mobilevit_queue_depth 0.0" in text
    assert metric_value(text, "mobilevit_ready") == 1
    assert 'format="' + served.fmt + '"' in text


async def test_predict_under_a_root_path_is_answered_and_counted_once(served):
    def predicted(text: str) -> float:
        return metric_value(text, "mobilevit_http_requests_total", route="/predict", status="200")

    before = predicted((await served.client.get("/metrics")).text)
    direct = await predict_files(served, jpeg_part("red"), jpeg_part("blue"), top_k=2)
    transport = httpx.ASGITransport(app=served.app, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as routed_client:
        routed = await routed_client.post(
            "/api/predict", files=[jpeg_part("red"), jpeg_part("blue")], params={"top_k": 2}
        )
        broken = await routed_client.post(
            "/api/predict", content=b"not an image", headers={"Content-Type": "image/jpeg"}
        )
    assert direct.status_code == routed.status_code == 200
    assert [p["top_k"] for p in direct.json()["predictions"]] == [
        p["top_k"] for p in routed.json()["predictions"]
    ]
    assert_error(broken, 400, "bad_request")
    assert predicted((await served.client.get("/metrics")).text) - before == 2


async def test_a_quick_request_starts_no_disconnect_watcher():
    # Watching for a disconnect takes a task; only a request still unanswered after
    # WATCH_AFTER_S pays for one (and a client that left while it waited is then noticed).
    async def receive() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async with RequestDeadline(receive, 30) as quick:
        quick.watch_client()
    assert quick._watcher is None and quick._start_watch is None

    left = asyncio.Event()

    async def leaving() -> dict:
        await left.wait()
        return {"type": "http.disconnect"}

    started = time.monotonic()
    with pytest.raises(ApiError) as gone:
        async with RequestDeadline(leaving, 30) as slow:
            slow.watch_client()
            left.set()
            await asyncio.sleep(30)
    assert gone.value.status == 499
    assert RequestDeadline.WATCH_AFTER_S <= time.monotonic() - started < 5


async def test_a_client_gone_during_the_upload_is_499_and_frees_its_share():
    messages = [
        {"type": "http.disconnect"},
        {"type": "http.request", "body": b"ab", "more_body": True},
    ]

    async def receive() -> dict:
        return messages.pop()

    budget = BodyBudget(100)
    with pytest.raises(ApiError) as gone, budget.reserve() as reservation:
        await read_body(Headers({"content-length": "10"}), receive, 100, reservation)
    assert gone.value.status == 499 and budget.used == 0


async def test_openapi_describes_the_api(served):
    response = await served.client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {
        "/predict",
        "/health",
        "/model-info",
        "/metrics",
        "/v2/models/{model_name}/infer",
    } <= set(paths)
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]
    assert (await served.client.get("/docs")).status_code == 200


# ---- errors, one shape -----------------------------------------------------------------------


async def test_404_and_405_use_the_error_shape(served):
    assert_error(await served.client.get("/nope"), 404, "not_found")
    response = await served.client.get("/predict")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]
    assert_error(await served.client.delete("/health"), 405)


async def test_400_undecodable_and_415_foreign(served):
    garbage = ("file", ("junk.jpg", os.urandom(2000), "image/jpeg"))
    body = assert_error(await predict_files(served, garbage), 400, "bad_request")
    assert body["error"].startswith("junk.jpg:")
    pdf = ("file", ("doc.jpg", b"%PDF-1.7\n" + b"0" * 100, "image/jpeg"))
    assert_error(await predict_files(served, pdf), 415, "unsupported_media_type")
    text = await served.client.post(
        "/predict", content=b"hello", headers={"Content-Type": "text/plain"}
    )
    assert_error(text, 415)


async def test_startup_decodes_warm_up_images_in_every_decode_thread(tiny_model_dir, monkeypatch):
    threads: set[str] = set()
    real_decode = Decoder.decode_one

    def decode_one(self, data: bytes) -> np.ndarray:
        threads.add(threading.current_thread().name)
        return real_decode(self, data)

    monkeypatch.setattr(Decoder, "decode_one", decode_one)
    settings = make_settings(tiny_model_dir, decode_threads=3)
    async with serve(settings):
        # Pillow's format plugins loaded and every decode thread started before the first request.
        assert len(threads) == 3 and all(name.startswith("decode") for name in threads)


def app_garbage() -> list[str]:
    """What a full collection finds unreachable that this project's code made: its objects, and
    the frames of its functions (which hold their locals, e.g. the request)."""
    app_dir = str(REPO / "app")
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = []
        for item in gc.garbage:
            if type(item).__module__.startswith("app."):
                found.append(type(item).__qualname__)
            elif isinstance(item, types.FrameType) and item.f_code.co_filename.startswith(app_dir):
                found.append(f"frame of {item.f_code.co_name}")
        return found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_requests_leave_no_reference_cycles(served):
    # Garbage in a cycle waits for the collector, which then holds the GIL for the whole process:
    # on the hot path every request must be freed by reference counting alone.
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            ok = await predict_files(served, jpeg_part("red"), jpeg_part("blue"))
            raw = await served.client.post(
                "/predict", content=image_bytes("green"), headers={"Content-Type": "image/jpeg"}
            )
            bad = await served.client.post(
                "/predict", content=b"not an image", headers={"Content-Type": "image/jpeg"}
            )
            assert (ok.status_code, raw.status_code, bad.status_code) == (200, 200, 400)
        assert app_garbage() == []
    finally:
        gc.enable()


async def test_startup_takes_what_it_loaded_out_of_the_collectors_view(tiny_model_dir):
    # A full collection walking the loaded libraries (~80,000 objects) held the GIL 35-45 ms.
    gc.unfreeze()
    async with serve(make_settings(tiny_model_dir)):
        assert gc.get_freeze_count() > 10_000


async def test_413_body_over_the_limit(served):
    limit = served.settings.max_upload_bytes
    response = await served.client.post(
        "/predict", content=b"\xff" * (limit + 1), headers={"Content-Type": "image/jpeg"}
    )
    assert_error(response, 413, "payload_too_large")


async def test_413_too_many_files(served):
    parts = [jpeg_part("red", f"{i}.jpg") for i in range(served.settings.max_files + 1)]
    body = assert_error(await predict_files(served, *parts), 413)
    assert "too many files" in body["error"]


async def test_500_when_inference_fails(served, monkeypatch):
    def broken(images):
        raise RuntimeError("secret internal detail")

    wrap_replicas(monkeypatch, served.app.state.service.batcher, lambda real: broken)
    response = await predict_files(served, jpeg_part("red"))
    body = assert_error(response, 500, "inference_failed")
    assert "secret" not in response.text and body["error"] == "inference failed"
    monkeypatch.undo()
    assert (await predict_files(served, jpeg_part("red"))).status_code == 200


async def test_503_when_the_queue_is_full(served, monkeypatch):
    service = served.app.state.service
    monkeypatch.setattr(service.batcher, "queue_limit", 0)
    decoded = []
    real_decode = service.decoder.decode_one

    def decode_one(data):
        decoded.append(len(data))
        return real_decode(data)

    monkeypatch.setattr(service.decoder, "decode_one", decode_one)
    response = await predict_files(served, jpeg_part("red"))
    assert_error(response, 503, "overloaded")
    assert decoded == []  # turned away before its image cost a decode
    text = (await served.client.get("/metrics")).text
    assert metric_value(text, "mobilevit_http_requests_total", route="/predict", status="503") >= 1


async def test_503_while_not_ready(served):
    with app_status(served.app, "draining"):
        await _not_ready_answers(served)


async def _not_ready_answers(served):
    for path in ("/health", "/health/ready", "/model-info"):
        assert_error(await served.client.get(path), 503, "draining")
    assert_error(await predict_files(served, jpeg_part("red")), 503, "draining")
    assert (await served.client.get("/health/live")).status_code == 200
    assert (await served.client.get("/metrics")).status_code == 200


async def test_504_past_the_deadline(served, monkeypatch):
    def slowed(real):
        def slow(images):
            time.sleep(0.3)
            return real(images)

        return slow

    wrap_replicas(monkeypatch, served.app.state.service.batcher, slowed)
    monkeypatch.setattr(served.settings, "request_timeout_s", 0.05)
    body = assert_error(await predict_files(served, jpeg_part("red")), 504, "timeout")
    assert "0.05" in body["error"]
    await asyncio.sleep(0.3)  # let the slow batch finish before the settings come back


async def test_unexpected_errors_are_json_500(tiny_model_dir):
    async with serve(make_settings(tiny_model_dir), raise_app_exceptions=False) as served:

        def explode(*args, **kwargs):
            raise KeyError("boom")

        served.app.state.service.decoder.decode_one = explode  # not an ApiError: the catch-all
        response = await predict_files(served, jpeg_part("red"))
        assert_error(response, 500, "internal_error")
        assert "boom" not in response.text and "Traceback" not in response.text


# ---- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
async def test_api_key(tiny_model_dir, fmt):
    key = "s3cret-k3y"
    async with serve(make_settings(tiny_model_dir, fmt, api_key=key)) as served:
        client = served.client
        pixels = np.zeros((1, 64, 64, 3), np.uint8).ravel().tolist()
        infer = {"inputs": [{"name": "images", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                             "data": pixels}]}  # fmt: skip
        infer_url = "/v2/models/tiny-mobilevit/infer"
        refused = [
            {},
            {"Authorization": "Bearer wrong"},
            {"X-API-Key": "wrong"},
            {"Authorization": key},  # no scheme
            {"Authorization": "Basic " + key},
            {"X-API-Key": "sécret".encode()},  # non-ASCII must not crash compare_digest
        ]
        for headers in refused:
            response = await client.post("/predict", files=[jpeg_part("red")], headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
            assert key not in response.text
            assert_error(await client.post(infer_url, json=infer, headers=headers), 401)
        for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
            response = await client.post("/predict", files=[jpeg_part("red")], headers=headers)
            assert response.status_code == 200
            assert (await client.post(infer_url, json=infer, headers=headers)).status_code == 200
        for path in ("/health", "/health/live", "/model-info", "/metrics", "/v2/health/ready",
                     "/v2/models/tiny-mobilevit"):  # fmt: skip
            response = await client.get(path)
            assert response.status_code == 200, path
            assert key not in response.text
        assert (await client.get("/model-info")).json()["auth_required"] is True


# ---- batching under load ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
async def test_concurrent_requests_are_batched_and_answered_correctly(tiny_model_dir, fmt):
    settings = make_settings(tiny_model_dir, fmt, max_batch_wait_ms=20, max_batch_size=8)
    async with serve(settings) as served:
        colours = [LABELS[i % 3] for i in range(24)]

        async def call(i: int, colour: str):
            part = jpeg_part(colour, f"{i}.jpg", size=(40 + i, 36 + 2 * i))
            return await served.client.post("/predict", files=[part], params={"top_k": 1})

        responses = await asyncio.gather(*(call(i, c) for i, c in enumerate(colours)))
        for i, (colour, response) in enumerate(zip(colours, responses, strict=True)):
            assert response.status_code == 200, response.text
            (prediction,) = response.json()["predictions"]
            assert (prediction["filename"], prediction["label"]) == (f"{i}.jpg", colour)
        text = (await served.client.get("/metrics")).text
        batches = metric_value(text, "mobilevit_batch_size_count")
        single = metric_value(text, "mobilevit_batch_size_bucket", le="1.0")
        assert batches - single > 0, "no batch held more than one image"
        assert metric_value(text, "mobilevit_images_classified_total") == 24
        assert max(served.app.state.service.batcher.stats.batch_sizes) > 1


async def test_shutdown_reports_not_ready_then_drains(tiny_model_dir):
    settings = make_settings(
        tiny_model_dir, max_batch_size=1, max_batch_wait_ms=0, inference_workers=1
    )
    app = create_app(settings)
    lifespan = Lifespan(app)
    await lifespan.startup()
    stopping = None
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            service = app.state.service
            real = service.backend.predict

            def slow(images):
                time.sleep(0.1)
                return real(images)

            service.batcher._replicas[0] = slow
            calls = [
                asyncio.create_task(client.post("/predict", files=[jpeg_part("red", f"{i}.jpg")]))
                for i in range(4)
            ]
            async with asyncio.timeout(10):
                while service.batcher.depth < 3:  # one in the backend, three queued
                    await asyncio.sleep(0.005)
            stopping = asyncio.create_task(lifespan.shutdown())
            await asyncio.sleep(0.02)
            assert not stopping.done()
            assert_error(await client.get("/health"), 503, "draining")
            assert_error(await client.post("/predict", files=[jpeg_part("red")]), 503)
            responses = await asyncio.gather(*calls)
            await stopping
    finally:
        if stopping is None:
            await lifespan.shutdown()
    assert [r.status_code for r in responses] == [200] * 4  # queued work was finished
    assert all(r.json()["predictions"][0]["label"] == "red" for r in responses)
    assert app.state.status == "stopped"


# ---- parity with Keras -----------------------------------------------------------------------


async def test_served_probabilities_equal_keras(served, tiny_keras_model, photo_dir):
    import keras

    import training.model  # noqa: F401 - registers the custom layers for load_model

    model = keras.models.load_model(tiny_keras_model)
    files = [sorted((photo_dir / label).glob("*.jpg"))[i] for label in LABELS for i in range(2)]
    expected = model.predict_on_batch(
        np.stack([preprocess_file(str(f), 64) for f in files]).astype(np.float32)
    )
    parts = [("file", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    response = await predict_files(served, *parts, top_k=3)
    assert response.status_code == 200
    for row, prediction in zip(np.asarray(expected), response.json()["predictions"], strict=True):
        served_scores = {t["label"]: t["score"] for t in prediction["top_k"]}
        got = np.array([served_scores[label] for label in LABELS])
        np.testing.assert_allclose(got, row, atol=1e-4)


async def test_int8_artifact_serves(tiny_model_dir):
    settings = make_settings(tiny_model_dir, "tflite", artifact="model_int8.tflite")
    async with serve(settings) as served:
        response = await predict_files(served, jpeg_part("red"), jpeg_part("blue"))
        assert response.status_code == 200
        assert response.json()["model"]["artifact"] == "model_int8.tflite"
        assert [p["label"] for p in response.json()["predictions"]] == ["red", "blue"]


# ---- refusing to start -----------------------------------------------------------------------


def corrupted_copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    data = bytearray((copy / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.tflite").write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("problem", ["missing", "corrupt", "unknown_artifact"])
async def test_startup_refuses_a_bad_model_dir(tiny_model_dir, tmp_path, problem):
    if problem == "missing":
        settings, needle = make_settings(tmp_path / "nope"), "nope"
    elif problem == "corrupt":
        settings, needle = make_settings(corrupted_copy(tiny_model_dir, tmp_path)), "model.tflite"
    else:
        settings, needle = make_settings(tiny_model_dir, artifact="other.tflite"), "other.tflite"
    app = create_app(settings)
    with pytest.raises(RuntimeError, match=needle):
        async with running(app):
            pass
    assert app.state.service is None
    with pytest.raises(ArtifactError, match=needle):
        from app.service import load_service

        load_service(settings)


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_uvicorn_exits_non_zero_naming_the_file(tiny_model_dir, tmp_path, problem):
    if problem == "missing":
        model_dir, needle = tmp_path / "no-such-model", "no-such-model"
    else:
        model_dir, needle = corrupted_copy(tiny_model_dir, tmp_path), "model.tflite"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOBILEVIT_")}
    env.update(MOBILEVIT_MODEL_DIR=str(model_dir), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Application startup failed" in result.stderr


def test_a_dead_process_keeps_its_counts_but_not_its_live_gauges(tmp_path):
    """Several server processes share PROMETHEUS_MULTIPROC_DIR; a process replacing a dead one
    must not make totals go backwards, nor keep the dead one's ready/queue gauges in the sum."""
    from app.metrics import clear_directory, forget_dead_processes_gauges

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = [os.getpid(), os.getppid()]
    kinds = ("counter", "histogram", "gauge_livesum", "gauge_livemin")
    for pid in [gone.pid, *live]:
        for kind in kinds:
            (tmp_path / f"{kind}_{pid}.db").write_bytes(b"")
    forget_dead_processes_gauges(tmp_path)
    left = sorted(f.name for f in tmp_path.iterdir())
    expected = [f"{kind}_{pid}.db" for pid in live for kind in kinds]
    expected += [f"counter_{gone.pid}.db", f"histogram_{gone.pid}.db"]
    assert left == sorted(expected)
    clear_directory(tmp_path)  # a new service instance
    assert not list(tmp_path.iterdir())
    forget_dead_processes_gauges(tmp_path / "new")  # a missing directory is created
    assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_python_m_app_empties_a_given_metrics_directory(tmp_path, monkeypatch, processes):
    """With one process too: the app reads that directory, so a restart would add up the runs
    before it."""
    import uvicorn

    from app.__main__ import main

    stale = tmp_path / "counter_1.db"
    stale.write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("MOBILEVIT_PROCESSES", processes)
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(kwargs["workers"]))
    main()
    assert started == [int(processes)] and not stale.exists()


# ---- a lone request ----------------------------------------------------------------------------


@pytest.fixture
async def greedy(tiny_model_dir):
    """The service as shipped: greedy batching, so a lone request runs on every core."""
    settings = make_settings(tiny_model_dir, max_batch_wait_ms=0.0)
    if settings.topology().lone_request_threads == 0:
        pytest.skip("one usable CPU: no lone-request interpreter")
    async with serve(settings) as served:
        yield served


async def test_a_lone_request_is_decoded_and_run_on_every_core_with_the_same_answer(greedy):
    stats = greedy.app.state.service.batcher.stats
    alone = await predict_files(greedy, jpeg_part("green", "one.jpg"))
    assert alone.status_code == 200, alone.text
    assert stats.lone_batches == 1
    # Three files are more than a lone batch: decoded in the pool, run on a 1-thread worker.
    many = await predict_files(greedy, *(jpeg_part(c) for c in ("green", "red", "green")))
    assert stats.lone_batches == 1 and stats.batches == 2
    (lone,), (first, _, _) = alone.json()["predictions"], many.json()["predictions"]
    assert lone["filename"] == "one.jpg" and lone["label"] == first["label"] == "green"
    for a, b in zip(lone["top_k"], first["top_k"], strict=True):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
    timings = alone.json()["timings_ms"]
    assert 0 < timings["decode"] <= timings["total"] and timings["queue_and_inference"] > 0


async def test_a_lone_image_over_a_megapixel_or_of_many_scans_is_decoded_in_the_pool(greedy):
    """The event loop does not wait on its decode: it takes the usual path, same answer."""
    stats = greedy.app.state.service.batcher.stats
    large = await predict_files(greedy, jpeg_part("green", size=(1200, 1000)))
    assert large.status_code == 200, large.text
    assert (stats.lone_batches, stats.batches) == (0, 1)
    small = await predict_files(greedy, jpeg_part("green", size=(120, 100)))
    assert (stats.lone_batches, stats.batches) == (1, 2)  # batches counts both kinds
    (a,), (b,) = large.json()["predictions"], small.json()["predictions"]
    assert a["label"] == b["label"] == "green"
    # A PNG whose header claims 8000x6000 (48 MP, over MAX_IMAGE_PIXELS): still 413.
    png = bytearray(image_bytes("green", fmt="PNG"))
    png[16:24] = struct.pack(">II", 8000, 6000)
    png[29:33] = struct.pack(">I", zlib.crc32(png[12:29]))
    refused = await greedy.client.post("/predict", files=[("file", ("big.png", bytes(png)))])
    assert_error(refused, 413)
    # A JPEG of 40 scans: allowed, but each scan is a pass over the image.
    scans = jpeg_with_scans(40)
    many = await greedy.client.post("/predict", files=[("file", ("p.jpg", scans, "image/jpeg"))])
    assert many.status_code == 200 and many.json()["predictions"][0]["label"] == "red"
    assert (stats.lone_batches, stats.batches) == (1, 3)


async def test_a_lone_bad_image_is_a_400_naming_it_and_nothing_is_held(greedy):
    stats = greedy.app.state.service.batcher.stats
    bad = await greedy.client.post(
        "/predict", files=[("file", ("notes.jpg", b"not an image", "image/jpeg"))]
    )
    body = assert_error(bad, 400)
    assert body["error"].startswith("notes.jpg: ") and stats.failed_batches == 0
    assert (await predict_files(greedy, jpeg_part("red"))).status_code == 200


async def test_lone_v2_requests_answer_as_predict_does(greedy):
    pixels = preprocess_file_bytes(image_bytes("blue"), greedy.app.state.service.size)
    uint8 = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, *pixels.shape],
                         "data": pixels.ravel().tolist()}]}  # fmt: skip
    files = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                         "data": [base64.b64encode(image_bytes("blue")).decode()]}]}  # fmt: skip
    url = "/v2/models/tiny-mobilevit/infer"
    rows = []
    for body in (uint8, files):
        response = await greedy.client.post(url, json=body)
        assert response.status_code == 200, response.text
        rows.append(response.json()["outputs"][0]["data"])
    assert greedy.app.state.service.batcher.stats.lone_batches == 2
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)


async def test_lone_requests_leave_no_reference_cycles(greedy):
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            ok = await predict_files(greedy, jpeg_part("red"))
            bad = await greedy.client.post(
                "/predict", content=b"not an image", headers={"Content-Type": "image/jpeg"}
            )
            assert (ok.status_code, bad.status_code) == (200, 400)
        assert greedy.app.state.service.batcher.stats.lone_batches == 3
        assert app_garbage() == []
    finally:
        gc.enable()
