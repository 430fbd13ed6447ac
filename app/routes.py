"""The service's own REST API: /predict, /health*, /model-info, /metrics."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.routing import Match, Route
from starlette.types import Scope

from app.batcher import InferenceFailed, Overloaded
from app.decoding import FILE_FIELD, read_uploads
from app.errors import CODES, ApiError, ErrorBody, error_responses
from app.service import Service

router = APIRouter()

DEFAULT_TOP_K = 3


# ---- dependencies ----------------------------------------------------------------------------


async def ready_service(request: Request) -> Service:
    """The loaded service, or 503 (with Retry-After) while loading or draining."""
    status = request.app.state.status
    service = request.app.state.service
    if service is None or status != "ready":
        raise ApiError(503, f"service is {status}", code=status)
    return service


async def require_api_key(request: Request) -> None:
    """With API_KEY set: `Authorization: Bearer <key>` or `X-API-Key: <key>`, else 401."""
    key = request.app.state.settings.api_key
    if key is None:
        return
    expected = key.get_secret_value().encode()
    offered = []
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        offered.append(token.strip())
    if "x-api-key" in request.headers:
        offered.append(request.headers["x-api-key"].strip())
    # compare_digest on bytes: constant time, and no TypeError for non-ASCII input.
    if not any(hmac.compare_digest(value.encode(), expected) for value in offered):
        raise ApiError(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


ReadyService = Annotated[Service, Depends(ready_service)]


async def classify(service: Service, images: list[np.ndarray]) -> list[np.ndarray]:
    """Rows of probabilities through the shared batcher; queue full → 503, backend error → 500."""
    assert service.batcher is not None
    try:
        return await service.batcher.predict_many(images)
    except Overloaded as exc:
        raise ApiError(503, str(exc), code="overloaded") from None
    except InferenceFailed:
        raise ApiError(500, "inference failed", code="inference_failed") from None


class RequestDeadline:
    """`async with RequestDeadline(request, seconds)`: the work inside answers 504 after
    `seconds`. After `watch_client()` (call it once the body is read), a client that disconnects
    ends the work at once (499, logged and counted but never seen): a request nobody waits for
    must not keep its place in the inference queue, where under overload it costs someone a 503.
    """

    def __init__(self, request: Request, seconds: float):
        self.request = request
        self.seconds = seconds
        self.client_gone = False
        self._timeout = asyncio.timeout(seconds)
        self._watcher: asyncio.Task | None = None

    def watch_client(self) -> None:
        self._watcher = asyncio.ensure_future(self._wait_for_disconnect())

    async def _wait_for_disconnect(self) -> None:
        # Once the body is read, the next ASGI message is http.disconnect, whenever it comes.
        if (await self.request.receive())["type"] == "http.disconnect":
            self.client_gone = True
            self._timeout.reschedule(asyncio.get_running_loop().time())  # expire now

    async def __aenter__(self) -> RequestDeadline:
        await self._timeout.__aenter__()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool | None:
        if self._watcher is not None:
            self._watcher.cancel()
            # The cancelled task keeps its CancelledError, whose traceback holds the watcher's
            # frame, which holds `self`: without this the request's objects (about 50: task,
            # frames, Request, uvicorn's cycle) become a reference cycle only the garbage
            # collector frees, and collecting them cost 0.05-0.1 ms of CPU per request.
            self._watcher = None
        try:
            return await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:  # raised by our own timeout only: a TimeoutError from inside passes
            if self.client_gone:
                raise ApiError(499, "client closed the connection") from None
            raise ApiError(504, f"request did not finish within {self.seconds:g} s") from None


# ---- /predict --------------------------------------------------------------------------------


class ModelRef(BaseModel):
    name: str
    version: str
    format: str
    artifact: str


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    filename: str | None
    label: str
    score: float
    top_k: list[LabelScore]


class Timings(BaseModel):
    decode: float
    queue_and_inference: float
    total: float


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]
    timings_ms: Timings


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": f"Multipart form with one or more `{FILE_FIELD}` parts (one prediction "
        "each, in order), or the raw image bytes with an `image/*` Content-Type.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        FILE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                    "required": [FILE_FIELD],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def top_predictions(labels: list[str], row: np.ndarray, k: int) -> list[dict[str, Any]]:
    order = np.argsort(-row, kind="stable")[:k]
    return [{"label": labels[i], "score": float(row[i])} for i in order]


def parse_top_k(raw: str | None, num_labels: int) -> int:
    """`top_k` from the query string: 1..number of labels, default 3; else 422."""
    if raw is None:
        return min(DEFAULT_TOP_K, num_labels)
    try:
        k = int(raw)
    except ValueError:  # also a string too long to convert
        raise ApiError(422, "query.top_k: must be an integer") from None
    if not 1 <= k <= num_labels:
        raise ApiError(422, f"query.top_k: must be between 1 and {num_labels} (number of labels)")
    return k


async def predict(request: Request) -> Response:
    """Classify the uploaded image(s).

    A plain Starlette endpoint rather than a FastAPI route: it is the hot path, and FastAPI's
    dependency solving and response validation cost about 0.3 ms of event-loop CPU per request
    (bench/serve.py, "loop ms"), 5% of the whole request. `document_predict` describes it in
    the OpenAPI schema; tests check its answers against `PredictResponse`.
    """
    await require_api_key(request)
    service = await ready_service(request)
    settings = service.settings
    labels = service.card.labels
    k = parse_top_k(request.query_params.get("top_k"), len(labels))
    assert service.decoder is not None and service.body_budget is not None
    started = time.perf_counter()
    with service.in_flight():  # from the body's first byte to the model's answer
        async with RequestDeadline(request, settings.request_timeout_s) as deadline:
            with service.body_budget.reserve() as reservation:
                uploads = await read_uploads(
                    request, settings.max_upload_bytes, settings.max_files, reservation
                )
                deadline.watch_client()
                decode_started = time.perf_counter()
                images = await service.decoder.decode(uploads)
            # The encoded bytes are no longer needed: a request waiting in the queue holds only
            # its decoded pixels, which the queue limit bounds.
            filenames = [upload.filename for upload in uploads]
            del uploads
            infer_started = time.perf_counter()
            rows = await classify(service, images)
    done = time.perf_counter()
    predictions = []
    for filename, row in zip(filenames, rows, strict=True):
        top = top_predictions(labels, row, k)
        predictions.append({"filename": filename, **top[0], "top_k": top})
    return JSONResponse(
        {
            "model": service.model_ref(),
            "predictions": predictions,
            "timings_ms": {
                "decode": round((infer_started - decode_started) * 1000, 3),
                "queue_and_inference": round((done - infer_started) * 1000, 3),
                "total": round((done - started) * 1000, 3),
            },
        }
    )


class NamedRoute(Route):
    """A plain Starlette route that, like FastAPI's own, puts itself in `scope["route"]`, where
    the metrics middleware reads the route template for its labels."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


#: Added to the app beside `router` (app.main): no FastAPI layers on the hot path.
predict_route = NamedRoute("/predict", predict, methods=["POST"])


def document_predict(schema: dict[str, Any]) -> dict[str, Any]:
    """Add `POST /predict` (invisible to FastAPI's generator) to an OpenAPI schema."""
    if "/predict" in schema["paths"]:
        return schema
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (PredictResponse, ErrorBody):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema

    def answer(name: str, description: str) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{name}"}
        return {"description": description, "content": {"application/json": {"schema": ref}}}

    errors = (400, 401, 413, 415, 422, 500, 503, 504)
    schema["paths"]["/predict"] = {
        "post": {
            "tags": ["predict"],
            "summary": "Predict",
            "description": "Classify the uploaded image(s).",
            "operationId": "predict",
            "parameters": [
                {
                    "name": "top_k",
                    "in": "query",
                    "required": False,
                    "description": "How many labels to return per image (1..number of labels).",
                    "schema": {"type": "integer", "minimum": 1, "title": "Top K"},
                }
            ],
            **PREDICT_BODY,
            "responses": {
                "200": answer("PredictResponse", "The predictions, one per image, in order"),
                **{str(status): answer("ErrorBody", CODES[status]) for status in errors},
            },
        }
    }
    return schema


# ---- health ----------------------------------------------------------------------------------


class Health(BaseModel):
    status: str
    model: str
    version: str
    format: str
    artifact: str
    uptime_s: float
    queue_depth: int


def _health(service: Service) -> dict[str, Any]:
    assert service.batcher is not None
    return {
        "status": "ready",
        "model": service.card.name,
        "version": service.card.version,
        "format": service.format,
        "artifact": service.artifact.file,
        "uptime_s": round(time.monotonic() - service.started, 3),
        "queue_depth": service.batcher.depth,
    }


@router.get("/health", response_model=Health, responses=error_responses(503), tags=["health"])
async def health(service: ReadyService) -> dict[str, Any]:
    """200 when the model is loaded and warmed; 503 (JSON error, Retry-After) otherwise."""
    return _health(service)


@router.get("/health/ready", response_model=Health, responses=error_responses(503), tags=["health"])
async def health_ready(service: ReadyService) -> dict[str, Any]:
    """Readiness probe: the same answer as /health."""
    return _health(service)


@router.get("/health/live", tags=["health"])
async def health_live(request: Request) -> dict[str, str]:
    """Liveness probe: 200 whenever the process answers, whatever the model's state."""
    return {"status": "alive", "state": request.app.state.status}


# ---- model info, metrics ---------------------------------------------------------------------


@router.get("/model-info", responses=error_responses(503), tags=["model"])
async def model_info(service: ReadyService) -> dict[str, Any]:
    """The model.json facts, the served artifact, runtime versions and batching settings."""
    card, settings = service.card, service.settings
    return {
        "name": card.name,
        "version": card.version,
        "architecture": card.architecture,
        "variant": card.variant,
        "parameters": card.parameters,
        "labels": card.labels,
        "input": card.input.model_dump(),
        "output": card.output,
        "preprocessing": card.preprocessing,
        "training": card.training,
        "metrics": card.metrics,
        "artifacts": [artifact.model_dump() for artifact in card.artifacts],
        "default_artifacts": card.default_artifacts,
        "created": card.created,
        "built_with": card.versions,
        "served": {
            "format": service.format,
            "artifact": service.artifact.file,
            "quantization": service.artifact.quantization,
            "sha256": service.artifact.sha256,
            "bytes": service.artifact.bytes,
        },
        "runtime": service.runtime,
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
            "queue_limit": settings.queue_limit,
            "inference_workers": settings.inference_workers,
            "inference_threads": settings.inference_threads,
            "inference_slots": settings.inference_slots if service.slots else 0,
            "idle_inference_threads": settings.idle_inference_threads if service.wide else 0,
            "decode_threads": settings.decode_threads,
        },
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_inflight_upload_bytes": settings.max_inflight_upload_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_files": settings.max_files,
            "request_timeout_s": settings.request_timeout_s,
        },
        "auth_required": settings.api_key is not None,
    }


@router.get("/metrics", tags=["metrics"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    registry = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)
