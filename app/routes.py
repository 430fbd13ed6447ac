"""The REST routes /health*, /model-info and /metrics, and what /predict (`app.predict`) and
the v2 `infer` routes share: readiness, the API key, the request deadline, the batcher."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel
from starlette.datastructures import Headers, State
from starlette.types import Receive

from app.batcher import InferenceFailed, Overloaded, Prepare
from app.errors import ApiError, error_responses
from app.service import Service
from app.settings import Settings
from contract.runtime import allowed_batch_sizes

router = APIRouter()


# ---- shared by /predict and v2 infer -------------------------------------------------------


def serving(state: State) -> Service:
    """The loaded service, or 503 (with Retry-After) while loading or draining."""
    if state.service is None or state.status != "ready":
        raise ApiError(503, f"service is {state.status}", code=state.status)
    return state.service


def check_api_key(settings: Settings, headers: Headers) -> None:
    """With API_KEY set: `Authorization: Bearer <key>` or `X-API-Key: <key>`, else 401."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    offered = []
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        offered.append(token.strip())
    if "x-api-key" in headers:
        offered.append(headers["x-api-key"].strip())
    # compare_digest on bytes: constant time, and no TypeError for non-ASCII input.
    if not any(hmac.compare_digest(value.encode(), expected) for value in offered):
        raise ApiError(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


async def ready_service(request: Request) -> Service:
    """`serving()` as a FastAPI dependency."""
    return serving(request.app.state)


async def require_api_key(request: Request) -> None:
    """`check_api_key()` as a FastAPI dependency."""
    check_api_key(request.app.state.settings, request.headers)


ReadyService = Annotated[Service, Depends(ready_service)]


def _unavailable(exc: Overloaded) -> ApiError:
    return ApiError(503, str(exc), code="overloaded")


def admit(service: Service, count: int) -> None:
    """503 at once if the queue cannot take `count` more images now. Checked before decoding:
    under overload, clients that retry at once would otherwise have an image decoded for every
    503 they get, CPU taken from the requests being served."""
    assert service.batcher is not None
    try:
        service.batcher.admit(count)
    except Overloaded as exc:
        raise _unavailable(exc) from None


async def classify(service: Service, images: list[np.ndarray]) -> list[np.ndarray]:
    """Rows of probabilities through the shared batcher; queue full → 503, backend error → 500."""
    assert service.batcher is not None
    try:
        return await service.batcher.predict_many(images)
    except Overloaded as exc:
        raise _unavailable(exc) from None
    except InferenceFailed:
        raise ApiError(500, "inference failed", code="inference_failed") from None


async def classify_alone(
    service: Service, prepare: Prepare, count: int
) -> tuple[list[np.ndarray], float] | None:
    """A lone request's rows, its images made by `prepare` (its decode) and run on the event
    loop's thread, and when `prepare` ended (`Batcher.run_alone`); None, having done nothing,
    when the request is not alone: then decode and `classify` as usual."""
    assert service.batcher is not None
    try:
        return await service.batcher.run_alone(prepare, count)
    except Overloaded as exc:
        raise _unavailable(exc) from None
    except InferenceFailed:
        raise ApiError(500, "inference failed", code="inference_failed") from None


class RequestDeadline:
    """`async with RequestDeadline(receive, seconds)`: the work inside answers 504 after
    `seconds`. After `watch_client()` (call it once the body is read), a client that disconnects
    ends the work (499, logged and counted but never seen): a request nobody waits for must not
    keep its place in the inference queue, where under overload it costs someone a 503.
    """

    #: The watch starts this long after `watch_client()`: it takes a task, about 0.03 ms of
    #: event-loop CPU per request, and up to saturation most requests are answered sooner.
    #: Those that wait in the queue under overload (hundreds of ms) are watched, so a client
    #: that leaves still frees its place long before its turn.
    WATCH_AFTER_S = 0.1

    def __init__(self, receive: Receive, seconds: float):
        self.receive = receive
        self.seconds = seconds
        self.client_gone = False
        self._timeout = asyncio.timeout(seconds)
        self._start_watch: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task | None = None

    def watch_client(self) -> None:
        loop = asyncio.get_running_loop()
        self._start_watch = loop.call_later(self.WATCH_AFTER_S, self._watch)

    def _watch(self) -> None:
        self._start_watch = None
        self._watcher = asyncio.ensure_future(self._wait_for_disconnect())

    async def _wait_for_disconnect(self) -> None:
        # Once the body is read, the next ASGI message is http.disconnect, whenever it comes.
        if (await self.receive())["type"] == "http.disconnect":
            self.client_gone = True
            self._timeout.reschedule(asyncio.get_running_loop().time())  # expire now

    async def __aenter__(self) -> RequestDeadline:
        await self._timeout.__aenter__()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool | None:
        if self._start_watch is not None:
            self._start_watch.cancel()
            self._start_watch = None
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
        "preprocessing": card.preprocessing.model_dump(),
        "training": card.training,
        "metrics": card.metrics,
        "artifacts": [
            {**artifact.model_dump(), "present": artifact.file not in service.missing_artifacts}
            for artifact in card.artifacts
        ],
        "evaluated_on": card.evaluated_on.model_dump() if card.evaluated_on else None,
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
            "allowed_batch_sizes": list(allowed_batch_sizes(settings.max_batch_size)),
        },
        "topology": service.topology.as_dict(),
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
