"""Open Inference Protocol v2 (KServe / Triton REST shapes) over the same model and batcher.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

One input, `images`: UINT8 [N, H, W, 3] RGB pixels already resized (the model.json resize rule),
`data` flat in row-major order or nested. One output, `probabilities`: FP32 [N, C], in the order
of model.json's labels. Errors use the service's JSON shape, whose `error` string is what the
protocol asks for. Readiness that is false answers 503 (with Retry-After) like `/health`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.decoding import read_body
from app.errors import ApiError, error_responses
from app.routes import RequestDeadline, admit, classify, ready_service, require_api_key
from app.service import Service

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
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
    data: list[Any]


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
    data: list[float]


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
    return {"name": "mobilevit-serving", "version": request.app.version, "extensions": []}


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
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, size, size, 3]}],
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


def input_images(request: InferRequest, size: int, max_images: int) -> list[np.ndarray]:
    """Validate the one `images` input and split it into uint8 [size, size, 3] rows."""
    if len(request.inputs) != 1:
        raise ApiError(
            400, f"expected exactly one input ({INPUT_NAME!r}), got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise ApiError(400, f"unknown input {tensor.name!r}; this model takes {INPUT_NAME!r}")
    if tensor.datatype.upper() != "UINT8":
        raise ApiError(400, f"input {INPUT_NAME!r} must be UINT8, got {tensor.datatype!r}")
    expected = [size, size, 3]
    if len(tensor.shape) != 4 or tensor.shape[1:] != expected or tensor.shape[0] < 1:
        raise ApiError(
            400, f"input shape must be [N, {size}, {size}, 3] with N >= 1, got {tensor.shape}"
        )
    count = tensor.shape[0]
    if count > max_images:
        raise ApiError(413, f"too many images: {count} > {max_images} per request")
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError):
        raise ApiError(400, "input data is ragged or not numeric") from None
    if values.dtype.kind not in "iu":
        raise ApiError(400, "UINT8 input data must be integers")
    needed = math.prod(tensor.shape)
    if values.size != needed:
        raise ApiError(
            400, f"input data has {values.size} values; shape {tensor.shape} needs {needed}"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ApiError(400, "UINT8 input data must be within 0..255")
    batch = values.reshape(tensor.shape).astype(np.uint8)  # flat or nested -> [N, H, W, 3]
    return list(batch)


def check_outputs(request: InferRequest) -> None:
    for output in request.outputs or []:
        if output.name != OUTPUT_NAME:
            raise ApiError(400, f"unknown output {output.name!r}; this model has {OUTPUT_NAME!r}")


def _parse_and_check(
    body: bytes, size: int, max_images: int
) -> tuple[str | None, list[np.ndarray]]:
    """The request's id and its images. Only these are kept: the parsed JSON lists take many
    times the memory of the pixels they hold, and a request may wait in the queue a while."""
    infer_request = parse_request(body)
    check_outputs(infer_request)
    return infer_request.id, input_images(infer_request, size, max_images)


async def _infer(request: Request, service: Service, name: str, version: str | None) -> dict:
    _model(service, name, version)
    settings = service.settings
    assert service.decoder is not None and service.body_budget is not None
    with service.in_flight():
        async with RequestDeadline(request.receive, settings.request_timeout_s) as deadline:
            with service.body_budget.reserve() as reservation:
                body = await read_body(
                    request.headers, request.receive, settings.max_upload_bytes, reservation
                )
                deadline.watch_client()
                admit(service, 1)  # before the costly parse; the whole count once parsed
                # JSON parsing and tensor checks of a body up to MAX_UPLOAD_BYTES run off the loop.
                request_id, images = await service.decoder.run(
                    _parse_and_check, body, service.size, settings.max_files
                )
                del body
            rows = await classify(service, images)
    probabilities = np.stack(rows).astype(np.float32)  # N x [C] -> [N, C]
    answer: dict[str, Any] = {
        "model_name": service.card.name,
        "model_version": service.card.version,
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "shape": list(probabilities.shape),
                "datatype": "FP32",
                "data": probabilities.ravel().tolist(),
            }
        ],
    }
    if request_id is not None:
        answer["id"] = request_id
    return answer


INFER_ERRORS = error_responses(400, 401, 404, 413, 500, 503, 504)
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": f'`{{"inputs": [{{"name": "{INPUT_NAME}", "datatype": "UINT8", '
        f'"shape": [N, H, W, 3], "data": [...]}}]}}`: RGB pixels already resized to the '
        "model input (flat row-major or nested lists).",
        "content": {"application/json": {"schema": {"type": "object"}}},
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
async def infer(request: Request, service: ReadyService, model_name: str) -> dict:
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
) -> dict:
    return await _infer(request, service, model_name, model_version)
