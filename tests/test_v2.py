"""Open Inference Protocol v2 endpoints, for both formats, against the same batcher as /predict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contract.preprocess import preprocess_bytes
from tests.serving_helpers import LABELS, app_status, assert_error, image_bytes, wrap_replicas

pytest_plugins = ["tests.serving_fixtures"]
pytestmark = pytest.mark.anyio

MODEL = "tiny-mobilevit"
INFER = f"/v2/models/{MODEL}/infer"


def pixels(colour: str, size=(50, 40)) -> np.ndarray:
    return preprocess_bytes(image_bytes(colour, size), 64)


def request(images: np.ndarray, nested: bool = False, **extra) -> dict:
    data = images.tolist() if nested else images.ravel().tolist()
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "UINT8", "data": data}
    return {"inputs": [tensor], **extra}


def probabilities(body: dict) -> np.ndarray:
    (output,) = body["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


async def test_server_health_and_metadata(served):
    client = served.client
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await client.get("/v2")).json()["extensions"] == ["binary_tensor_data"]
    response = await client.get(f"/v2/models/{MODEL}")
    assert response.status_code == 200
    meta = response.json()
    version = meta["versions"][0]
    assert meta == {
        "name": MODEL,
        "versions": [version],
        "platform": "tflite" if served.fmt == "tflite" else "tensorflow_savedmodel",
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [-1, 64, 64, 3]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert (await client.get(f"/v2/models/{MODEL}/versions/{version}")).json() == meta
    assert (await client.get(f"/v2/models/{MODEL}/ready")).json()["ready"] is True
    assert (await client.get(f"/v2/models/{MODEL}/versions/{version}/ready")).status_code == 200


async def test_unknown_model_or_version_is_404(served):
    client = served.client
    for path in ("/v2/models/resnet", "/v2/models/resnet/ready", f"/v2/models/{MODEL}/versions/9"):
        assert_error(await client.get(path), 404, "not_found")
    batch = pixels("red")[None]
    assert_error(await client.post("/v2/models/resnet/infer", json=request(batch)), 404)
    assert_error(
        await client.post(f"/v2/models/{MODEL}/versions/9/infer", json=request(batch)), 404
    )


async def test_infer_equals_predict(served):
    colours = ["red", "green", "blue"]
    raw = [image_bytes(c, (50 + i, 40)) for i, c in enumerate(colours)]
    batch = np.stack([preprocess_bytes(b, 64) for b in raw])  # 3 x [64, 64, 3] -> [3, 64, 64, 3]
    response = await served.client.post(INFER, json=request(batch, id="req-7"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["id"]) == (MODEL, "req-7")
    got = probabilities(body)
    assert got.shape == (3, 3)
    assert [LABELS[i] for i in got.argmax(axis=1)] == colours

    parts = [("file", (f"{c}.jpg", b, "image/jpeg")) for c, b in zip(colours, raw, strict=True)]
    predicted = (await served.client.post("/predict", files=parts, params={"top_k": 3})).json()
    for row, prediction in zip(got, predicted["predictions"], strict=True):
        scores = {t["label"]: t["score"] for t in prediction["top_k"]}
        np.testing.assert_allclose(row, [scores[label] for label in LABELS], atol=1e-5)


async def test_nested_data_equals_flat_data(served):
    batch = np.stack([pixels("green"), pixels("red")])
    flat = probabilities((await served.client.post(INFER, json=request(batch))).json())
    nested = await served.client.post(INFER, json=request(batch, nested=True))
    assert nested.status_code == 200
    np.testing.assert_allclose(probabilities(nested.json()), flat, atol=1e-6)
    assert "id" not in nested.json()


async def test_requested_output_and_versioned_infer(served):
    batch = pixels("blue")[None]
    version = (await served.client.get(f"/v2/models/{MODEL}")).json()["versions"][0]
    body = request(batch, outputs=[{"name": "probabilities"}])
    response = await served.client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=body)
    assert response.status_code == 200
    assert LABELS[int(probabilities(response.json()).argmax())] == "blue"


def _tensor(**changes) -> dict:
    tensor = {"name": "images", "shape": [1, 64, 64, 3], "datatype": "UINT8"}
    tensor["data"] = [0] * (64 * 64 * 3)
    tensor.update(changes)
    return {"inputs": [tensor]}


BAD_REQUESTS = {
    "fp32_datatype": _tensor(datatype="FP32"),
    "bytes_datatype": _tensor(datatype="BYTES"),
    "wrong_size": _tensor(shape=[1, 32, 32, 3], data=[0] * (32 * 32 * 3)),
    "wrong_rank": _tensor(shape=[64, 64, 3]),
    "zero_batch": _tensor(shape=[0, 64, 64, 3], data=[]),
    "negative_batch": _tensor(shape=[-1, 64, 64, 3]),
    "short_data": _tensor(data=[0] * 100),
    "long_data": _tensor(data=[0] * (64 * 64 * 3 + 1)),
    "above_255": _tensor(data=[256] * (64 * 64 * 3)),
    "negative_value": _tensor(data=[-1] * (64 * 64 * 3)),
    "floats": _tensor(data=[0.5] * (64 * 64 * 3)),
    "strings": _tensor(data=["a"] * (64 * 64 * 3)),
    "nulls": _tensor(data=[None] * (64 * 64 * 3)),
    "huge_ints": _tensor(data=[2**80] * (64 * 64 * 3)),
    "ragged": _tensor(data=[[0, 0, 0], [0]]),
    "data_not_list": _tensor(data="AAAA"),
    "wrong_input_name": _tensor(name="input_1"),
    "two_inputs": {"inputs": [_tensor()["inputs"][0], _tensor()["inputs"][0]]},
    "no_inputs": {"inputs": []},
    "missing_inputs": {"id": "x"},
    "unknown_output": {**_tensor(), "outputs": [{"name": "logits"}]},
    "binary_data_as_string": {
        **_tensor(),
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": "false"}}],
    },
    "binary_data_output_as_number": {**_tensor(), "parameters": {"binary_data_output": 1}},
    "json_list": [1, 2, 3],
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_infer_requests_are_400(served, case):
    response = await served.client.post(INFER, json=BAD_REQUESTS[case])
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"inputs": NaN}'],
    ids=["empty", "broken", "binary", "deeply_nested", "nan"],
)
async def test_unparsable_bodies_are_400(served, body):
    response = await served.client.post(
        INFER, content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400)


async def test_too_many_images_is_413(served):
    count = served.settings.max_files + 1
    response = await served.client.post(INFER, json=_tensor(shape=[count, 64, 64, 3], data=[0]))
    assert_error(response, 413)


async def test_not_ready_is_503(served):
    with app_status(served.app, "loading"):
        assert_error(await served.client.get("/v2/health/ready"), 503, "loading")
        assert_error(await served.client.get(f"/v2/models/{MODEL}/ready"), 503)
        assert_error(await served.client.post(INFER, json=request(pixels("red")[None])), 503)
        assert (await served.client.get("/v2/health/live")).status_code == 200


async def test_full_queue_is_503_before_the_body_is_parsed(served, monkeypatch):
    service = served.app.state.service
    monkeypatch.setattr(service.batcher, "queue_limit", 0)
    parsed = []
    monkeypatch.setattr(service.decoder, "run", lambda *args: parsed.append(args))
    response = await served.client.post(INFER, json=request(pixels("red")[None]))
    assert_error(response, 503, "overloaded")
    assert "Retry-After" in response.headers and parsed == []


async def test_infer_failure_is_500(served, monkeypatch):
    def broken(images):
        raise RuntimeError("backend exploded")

    wrap_replicas(monkeypatch, served.app.state.service.batcher, lambda real: broken)
    response = await served.client.post(INFER, json=request(pixels("red")[None]))
    assert_error(response, 500, "inference_failed")
    assert "exploded" not in response.text


def test_bad_requests_are_valid_json():
    for body in BAD_REQUESTS.values():
        json.dumps(body)


def test_responses_are_compressed_only_as_the_client_accepts():
    from app.tensors import accepted_encodings, compress

    assert accepted_encodings("gzip, deflate, br") == {"gzip", "deflate", "br"}
    assert accepted_encodings("gzip;q=0, deflate;q=0.5") == {"deflate"}
    assert accepted_encodings("gzip; q=0.0") == set() and accepted_encodings(None) == set()
    assert accepted_encodings("gzip;q=x, identity") == {"identity"}
    assert compress(b"x" * 100, "gzip;q=0, deflate")[1] == "deflate"
    assert compress(b"x" * 100, "gzip;q=0") == (b"x" * 100, None)
