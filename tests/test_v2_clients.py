"""v2 as clients really speak it: NVIDIA's tritonclient with its defaults (binary tensors in and
out), JSON, compression both ways, encoded images as BYTES; every answer checked against
/predict on the same photos, and every malformed binary request a 4xx in the protocol's shape."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from contract.preprocess import preprocess_bytes
from tests.serving_helpers import (
    LABELS,
    REPO,
    assert_error,
    free_port,
    image_bytes,
    server_command,
    server_env,
)

MODEL = "tiny-mobilevit"
SIZE = 64


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """A real `python -m app` on the tiny model; its address as host:port."""
    port = free_port()
    log = tmp_path_factory.mktemp("v2") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(server_command(port), cwd=REPO, env=server_env(tiny_model_dir),
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def photos() -> list[bytes]:
    return [
        image_bytes(c, (50 + 7 * i, 40 + 3 * i)) for i, c in enumerate(("red", "green", "blue"))
    ]


def predicted(address: str, files: list[bytes]) -> np.ndarray:
    """/predict's probabilities for the files, in LABELS order."""
    parts = [("file", (f"{i}.jpg", f, "image/jpeg")) for i, f in enumerate(files)]
    body = httpx.post(f"http://{address}/predict", files=parts, params={"top_k": 3}).json()
    return np.array([[{t["label"]: t["score"] for t in p["top_k"]}[label] for label in LABELS]
                     for p in body["predictions"]])  # fmt: skip


def pixel_input(files: list[bytes], binary: bool = True) -> triton.InferInput:
    batch = np.stack([preprocess_bytes(f, SIZE) for f in files])
    tensor = triton.InferInput("images", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def bytes_input(files: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=binary)
    return tensor


def test_metadata_lists_both_inputs_and_the_extension(server):
    client = triton.InferenceServerClient(server)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    inputs = {i["name"]: i for i in client.get_model_metadata(MODEL)["inputs"]}
    assert inputs["images"]["datatype"] == "UINT8" and inputs["image_bytes"]["shape"] == [-1]


@pytest.mark.parametrize(
    ("make_input", "binary_in", "binary_out", "compression"),
    [
        (pixel_input, True, True, None),  # tritonclient's defaults
        (pixel_input, False, False, None),
        (pixel_input, True, True, "gzip"),
        (pixel_input, False, True, "deflate"),
        (bytes_input, True, True, None),
        (bytes_input, True, False, "gzip"),
    ],
    ids=["defaults", "json", "gzip", "deflate", "bytes-binary", "bytes-gzip-json-out"],
)  # fmt: skip
def test_tritonclient_answers_equal_predict(server, make_input, binary_in, binary_out, compression):
    client = triton.InferenceServerClient(server)
    files = photos()
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary_out)]
    result = client.infer(
        MODEL, [make_input(files, binary_in)], outputs=outputs,
        request_compression_algorithm=compression, response_compression_algorithm=compression,
    )  # fmt: skip
    got = result.as_numpy("probabilities")
    assert got.shape == (3, 3) and got.dtype == np.float32
    assert [LABELS[i] for i in got.argmax(axis=1)] == ["red", "green", "blue"]
    np.testing.assert_allclose(got, predicted(server, files), atol=1e-6)


def test_default_client_with_no_outputs_listed(server):
    client = triton.InferenceServerClient(server)
    result = client.infer(MODEL, [pixel_input(photos())])  # binary_data_output: true
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 3 * 3 * 4


def test_bytes_as_base64_json(server):
    import base64

    files = photos()
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [3],
                        "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(f).decode() for f in files]}]}  # fmt: skip
    response = httpx.post(f"http://{server}/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, predicted(server, files), atol=1e-6)


def binary_request(inputs: list[dict], blobs: list[bytes], header_length: int | None = None):
    header = json.dumps({"inputs": inputs}).encode()
    length = len(header) if header_length is None else header_length
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(length),
                                      "Content-Type": "application/octet-stream"}  # fmt: skip


def element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


PIXELS = np.zeros((1, SIZE, SIZE, 3), np.uint8).tobytes()


def _pixels(size: int) -> dict:
    return {"name": "images", "datatype": "UINT8", "shape": [1, SIZE, SIZE, 3],
            "parameters": {"binary_data_size": size}}  # fmt: skip


def _bytes(size: int, shape=(1,)) -> dict:
    return {"name": "image_bytes", "datatype": "BYTES", "shape": list(shape),
            "parameters": {"binary_data_size": size}}  # fmt: skip


MALFORMED = {
    "header_beyond_body": binary_request([_pixels(len(PIXELS))], [PIXELS], header_length=10**6),
    "size_disagrees_with_shape": binary_request([_pixels(100)], [PIXELS[:100]]),
    "binary_size_beyond_body": binary_request([_pixels(len(PIXELS) * 2)], [PIXELS]),
    "bytes_element_past_end": binary_request([_bytes(8)], [struct.pack("<I", 999) + b"abcd"]),
    "bytes_truncated_length": binary_request([_bytes(2)], [b"\x01\x00"]),
    "unknown_datatype": binary_request(
        [{**_pixels(len(PIXELS)), "datatype": "UINT128"}], [PIXELS]),
    "both_inputs": binary_request(
        [_pixels(len(PIXELS)), _bytes(len(element(b"x")))], [PIXELS, element(b"x")]),
    "undecodable_image": binary_request([_bytes(12)], [element(b"not an image")]),
    "count_disagrees_with_shape": binary_request([_bytes(5, (2,))], [element(b"x")]),
    "trailing_bytes": binary_request([_pixels(len(PIXELS))], [PIXELS, b"extra"]),
    "header_length_of_4301_digits": (binary_request([_pixels(len(PIXELS))], [PIXELS])[0],
        {"Inference-Header-Content-Length": "1" * 4301}),
    "header_length_not_ascii": (binary_request([_pixels(len(PIXELS))], [PIXELS])[0],
        {"Inference-Header-Content-Length": b"\xb2"}),  # latin-1 superscript two: isdigit()
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_binary_requests_are_4xx_in_the_protocol_shape(server, case):
    body, headers = MALFORMED[case]
    response = httpx.post(f"http://{server}/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert_error(response, 400)


def test_extra_bytes_elements_are_refused_before_they_are_walked(server):
    """A 4-MB block of empty elements for a shape of one: refused at the second element (it is
    parsed on the event loop, where walking a million would stall every other request)."""
    empty = struct.pack("<I", 0)
    body, headers = binary_request([_bytes(len(empty) * 10**6)], [empty * 10**6])
    response = httpx.post(f"http://{server}/v2/models/{MODEL}/infer", content=body,
                          headers=headers)  # fmt: skip
    assert_error(response, 400)
    assert "more than the 1 elements" in response.json()["error"]
    request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                           "data": ["AA=="] * 3}]}  # fmt: skip
    response = httpx.post(f"http://{server}/v2/models/{MODEL}/infer", json=request)
    assert_error(response, 400)
    assert "has 3 elements" in response.json()["error"]


def test_compressed_bodies_count_against_the_limit_decompressed(server):
    bomb = gzip.compress(b"\0" * (20 * 1024 * 1024))  # 20 MiB of zeros in ~20 KiB
    response = httpx.post(f"http://{server}/v2/models/{MODEL}/infer", content=bomb,
                          headers={"Content-Encoding": "gzip",
                                   "Content-Type": "application/json"})  # fmt: skip
    assert_error(response, 413)
    truncated = gzip.compress(json.dumps({"inputs": []}).encode())[:-6]
    response = httpx.post(f"http://{server}/v2/models/{MODEL}/infer", content=truncated,
                          headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert_error(response, 400)
    response = httpx.post(f"http://{server}/v2/models/{MODEL}/infer", content=b"{}",
                          headers={"Content-Encoding": "br"})  # fmt: skip
    assert_error(response, 415)


def test_a_client_error_reaches_tritonclient_as_its_message(server):
    client = triton.InferenceServerClient(server)
    tensor = triton.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"%PDF-1.4 not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"image_bytes\[0\].*unsupported image"):
        client.infer(MODEL, [tensor])
