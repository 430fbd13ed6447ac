"""Open Inference Protocol v2 (KServe / Triton REST shapes) over the same model and batcher.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Two inputs, one per request: `images`, UINT8 [N, H, W, 3] RGB pixels already resized (the
model.json resize rule), or `image_bytes`, BYTES [N] encoded image files (JPEG, PNG, WebP, ...)
that the server decodes and resizes exactly as /predict does. One output, `probabilities`: FP32
[N, C], in the order of model.json's labels. Tensors come as JSON `data` (BYTES as base64) or in
the binary tensor data extension (`app.tensors`), in and out, as tritonclient sends them by
default; bodies may be gzip/deflate-compressed both ways. Errors use the service's JSON shape,
whose `error` string is what the protocol asks for. Readiness that is false answers 503 (with
Retry-After) like `/health`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app import tensors
from app.decoding import Upload, read_body
from app.errors import ApiError, error_responses
from app.routes import (
    RequestDeadline,
    admit,
    classify,
    classify_alone,
    ready_service,
    require_api_key,
)
from app.service import Service

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

INPUT_NAME = "images"
BYTES_INPUT = "image_bytes"
OUTPUT_NAME = "probabilities"
EXTENSIONS = ["binary_tensor_data"]
PLATFORMS = {"tflite": "tflite", "savedmodel": "tensorflow_savedmodel"}


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    # JSON `data`, or (binary_data_output) `parameters.binary_data_size` with the bytes after.
    data: list[float] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


ReadyService = Annotated[Service, Depends(ready_service)]


def _model(service: Service, name: str, version: str | None) -> Service:
    card = service.card
    if name != card.name:
        raise ApiError(404, f"unknown model {name!r}; this server serves {card.name!r}")
    if version is not None and version != card.version:
        raise ApiError(
            404, f"unknown version {version!r} of {name!r}; this server serves {card.version!r}"
        )
    return service


# ---- health and metadata ---------------------------------------------------------------------


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "mobilevit-serving", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", responses=error_responses(503))
async def ready(service: ReadyService) -> dict[str, bool]:
    return {"ready": True}


def model_metadata(service: Service) -> dict[str, Any]:
    size = service.size
    return {
        "name": service.card.name,
        "versions": [service.card.version],
        "platform": PLATFORMS[service.format],
        "inputs": [
            {"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, size, size, 3]},
            {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(service.card.labels)]}
        ],
    }


@router.get(
    "/models/{model_name}", response_model=ModelMetadata, responses=error_responses(404, 503)
)
async def metadata(service: ReadyService, model_name: str) -> dict[str, Any]:
    return model_metadata(_model(service, model_name, None))


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=error_responses(404, 503),
)
async def metadata_version(service: ReadyService, model_name: str, model_version: str) -> dict:
    return model_metadata(_model(service, model_name, model_version))


@router.get("/models/{model_name}/ready", responses=error_responses(404, 503))
async def model_ready(service: ReadyService, model_name: str) -> dict[str, Any]:
    _model(service, model_name, None)
    return {"name": model_name, "ready": True}


@router.get(
    "/models/{model_name}/versions/{model_version}/ready", responses=error_responses(404, 503)
)
async def model_version_ready(service: ReadyService, model_name: str, model_version: str) -> dict:
    _model(service, model_name, model_version)
    return {"name": model_name, "ready": True}


# ---- infer -----------------------------------------------------------------------------------


def parse_request(body: bytes) -> InferRequest:
    if not body:
        raise ApiError(400, "empty request body; send an inference request as JSON")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {type(exc).__name__}") from None
    try:
        return InferRequest.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ApiError(400, f"invalid inference request: {problems}") from None


@dataclass
class ParsedInfer:
    """What a request needs once parsed: only this is kept while it waits (the parsed JSON
    takes many times the memory of the pixels it holds)."""

    id: str | None
    pixels: list[np.ndarray] | None  # `images`: rows ready for the model
    files: list[bytes] | None  # `image_bytes`: encoded files, still to decode
    binary_output: bool


def the_input(request: InferRequest) -> InferInput:
    names = [tensor.name for tensor in request.inputs]
    if {INPUT_NAME, BYTES_INPUT} <= set(names):
        raise ApiError(400, f"a request carries one of {INPUT_NAME!r} or {BYTES_INPUT!r}, not both")
    if len(names) != 1:
        raise ApiError(400, f"expected exactly one input ({INPUT_NAME!r} or {BYTES_INPUT!r}), "
                       f"got {len(names)}")  # fmt: skip
    tensor = request.inputs[0]
    if tensor.name not in (INPUT_NAME, BYTES_INPUT):
        raise ApiError(400, f"unknown input {tensor.name!r}; this model takes {INPUT_NAME!r} "
                       f"(UINT8 pixels) or {BYTES_INPUT!r} (BYTES image files)")  # fmt: skip
    if tensor.datatype not in tensors.DATATYPES:
        raise ApiError(400, f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    return tensor


def input_images(tensor: InferInput, block: bytes | None, size: int, max_images: int):
    """The `images` input as uint8 [size, size, 3] rows."""
    if tensor.datatype != "UINT8":
        raise ApiError(400, f"input {INPUT_NAME!r} must be UINT8, got {tensor.datatype!r}")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [size, size, 3] or shape[0] < 1:
        raise ApiError(400, f"input shape must be [N, {size}, {size}, 3] with N >= 1, got {shape}")
    if shape[0] > max_images:
        raise ApiError(413, f"too many images: {shape[0]} > {max_images} per request")
    return list(tensors.numeric_tensor(INPUT_NAME, "UINT8", shape, tensor.data, block))


def input_files(tensor: InferInput, block: bytes | None, max_images: int) -> list[bytes]:
    """The `image_bytes` input: one encoded image file per element."""
    if tensor.datatype != "BYTES":
        raise ApiError(400, f"input {BYTES_INPUT!r} must be BYTES, got {tensor.datatype!r}")
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise ApiError(400, f"input {BYTES_INPUT!r} shape must be [N] with N >= 1, "
                       f"got {tensor.shape}")  # fmt: skip
    if tensor.shape[0] > max_images:
        raise ApiError(413, f"too many images: {tensor.shape[0]} > {max_images} per request")
    content_type = (tensor.parameters or {}).get("content_type")
    return tensors.bytes_elements(BYTES_INPUT, tensor.shape, tensor.data, block, content_type)


def check_outputs(request: InferRequest) -> bool:
    """Whether the output goes back binary: asked for per output (`binary_data`) or for all
    (`binary_data_output`), as tritonclient does by default."""
    everything = _flag(request.parameters, "binary_data_output", False)
    binary = everything
    for output in request.outputs or []:
        if output.name != OUTPUT_NAME:
            raise ApiError(400, f"unknown output {output.name!r}; this model has {OUTPUT_NAME!r}")
        binary = _flag(output.parameters, "binary_data", everything)
    return binary


def _flag(parameters: dict | None, name: str, default: bool) -> bool:
    """A boolean parameter: JSON true or false only (the string "false" is not false)."""
    value = (parameters or {}).get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"parameter {name!r} must be true or false, not {value!r}")
    return value


def parse_infer(
    body: bytes, encoding: str | None, header_length: str | None, size: int, limits: tuple
) -> ParsedInfer:
    """Decompress, split off the binary part, parse and check the one input (on the event loop
    when `cheap_to_parse`, else in the decode pool)."""
    max_bytes, max_images = limits
    body = tensors.decompress(body, encoding, max_bytes)
    header, binary = tensors.split_body(body, header_length)
    infer_request = parse_request(header)
    binary_output = check_outputs(infer_request)
    tensor = the_input(infer_request)
    (block,) = tensors.take_binary([tensor], binary)
    if tensor.name == INPUT_NAME:
        pixels = input_images(tensor, block, size, max_images)
        return ParsedInfer(infer_request.id, pixels, None, binary_output)
    files = input_files(tensor, block, max_images)
    return ParsedInfer(infer_request.id, None, files, binary_output)


def infer_response(
    service: Service, parsed: ParsedInfer, probabilities: np.ndarray, accept_encoding: str | None
) -> Response:
    output: dict[str, Any] = {
        "name": OUTPUT_NAME,
        "shape": list(probabilities.shape),
        "datatype": "FP32",
    }
    headers: dict[str, str] = {}
    binary = b""
    if parsed.binary_output:
        binary = probabilities.astype("<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(binary)}
    else:
        output["data"] = probabilities.ravel().tolist()
    answer: dict[str, Any] = {
        "model_name": service.card.name,
        "model_version": service.card.version,
        "outputs": [output],
    }
    if parsed.id is not None:
        answer["id"] = parsed.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(header))
        media_type = "application/octet-stream"
    else:
        media_type = "application/json"
    body, encoding = tensors.compress(header + binary, accept_encoding)
    if encoding:
        headers["Content-Encoding"] = encoding
    return Response(body, media_type=media_type, headers=headers)


#: A request whose JSON part is at most this large and that is not compressed is parsed on the
#: event loop: binary tensors need only a small JSON header and `np.frombuffer`, quicker than
#: the hand-off to a thread (bench/serve.py, modes v2-uint8 and v2-bytes).
INLINE_PARSE_BYTES = 16 * 1024


def cheap_to_parse(body: bytes, headers) -> bool:
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        return False
    length = headers.get(tensors.HEADER_LENGTH)
    # ASCII digits, and short: int() refuses "²" and numbers past 4,300 digits (a 500, not a 400)
    valid = length is not None and length.isascii() and length.isdigit() and len(length) <= 18
    json_bytes = int(length) if valid else len(body)
    return json_bytes <= INLINE_PARSE_BYTES


async def _infer(request: Request, service: Service, name: str, version: str | None) -> Response:
    _model(service, name, version)
    settings = service.settings
    assert service.decoder is not None and service.body_budget is not None
    headers = request.headers
    with service.tracking():
        async with RequestDeadline(request.receive, settings.request_timeout_s) as deadline:
            with service.body_budget.reserve() as reservation:
                body = await read_body(
                    headers, request.receive, settings.max_upload_bytes, reservation
                )
                deadline.watch_client()
                admit(service, 1)  # before the costly parse; the whole count once parsed
                args = (
                    body,
                    headers.get("content-encoding"),
                    headers.get(tensors.HEADER_LENGTH),
                    service.size,
                    (settings.max_upload_bytes, settings.max_files),
                )
                if cheap_to_parse(body, headers):
                    parsed = parse_infer(*args)
                else:  # a large JSON body or a compressed one: off the event loop
                    parsed = await service.decoder.run(parse_infer, *args)
                del body, args
                if parsed.files is not None:
                    uploads = [Upload(f"{BYTES_INPUT}[{i}]", data) for i, data in
                               enumerate(parsed.files)]  # fmt: skip
                    parsed.files = None
                    admit(service, len(uploads))
                    decode = functools.partial(service.decoder.decode_here, uploads)
                    alone = await classify_alone(service, decode, len(uploads))
                    if alone is None:
                        parsed.pixels = await service.decoder.decode(uploads)
                    del uploads, decode
                else:
                    assert parsed.pixels is not None
                    stack = functools.partial(np.stack, parsed.pixels)
                    alone = await classify_alone(service, stack, len(parsed.pixels))
            if alone is None:
                assert parsed.pixels is not None
                rows = await classify(service, parsed.pixels)
            else:
                rows = alone[0]
    probabilities = np.stack(rows).astype(np.float32)  # N x [C] -> [N, C]
    return infer_response(service, parsed, probabilities, headers.get("accept-encoding"))


INFER_ERRORS = error_responses(400, 401, 404, 413, 500, 503, 504)
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": f'`{{"inputs": [{{"name": "{INPUT_NAME}", "datatype": "UINT8", '
        f'"shape": [N, H, W, 3], "data": [...]}}]}}`: RGB pixels already resized to the '
        f'model input (flat row-major or nested lists); or `{{"name": "{BYTES_INPUT}", '
        '"datatype": "BYTES", "shape": [N], "data": ["<base64 file>", ...]}`. Either may be '
        "sent in the binary tensor data extension (`Inference-Header-Content-Length`).",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/models/{model_name}/infer",
    response_model=InferResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(require_api_key)],
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
)
async def infer(request: Request, service: ReadyService, model_name: str) -> Response:
    return await _infer(request, service, model_name, None)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    response_model=InferResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(require_api_key)],
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
)
async def infer_version(
    request: Request, service: ReadyService, model_name: str, model_version: str
) -> Response:
    return await _infer(request, service, model_name, model_version)
