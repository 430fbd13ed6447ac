"""The FastAPI application: `create_app(settings)` builds it; the lifespan loads the model.

    python -m app                   # as make serve and the image run it (app/__main__.py)
    uvicorn app.main:app            # one process; settings from MOBILEVIT_* variables

Importing this module is cheap: nothing is loaded until the lifespan starts. Startup validates
model.json (refusing a preprocessing rule or input it cannot apply), hashes the artifact it will
serve, opens the backend, checks its tensor shapes against
model.json, runs a warm-up batch, decodes warm-up images in each decode thread and freezes
what it loaded out of the garbage collector's view; only then does `/health` answer 200. Any
failure is raised from the lifespan with a message naming the file, so uvicorn exits non-zero.
Shutdown reports not-ready first, refuses new work, finishes what is queued, then stops the
worker.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from app import predict, routes, v2
from app.batcher import Batcher
from app.decoding import BodyBudget, Decoder
from app.demo import demo_router
from app.errors import install_error_handlers
from app.metrics import Metrics, MetricsMiddleware
from app.service import load_service
from app.settings import Settings
from contract.card import ArtifactError
from contract.preprocess import DecodeLimits

logger = logging.getLogger("app")
if not logger.handlers:  # uvicorn configures only its own loggers; show ours beside them
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)

API_VERSION = "1.0.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    app.state.status = "loading"
    started = time.perf_counter()
    try:
        service = await asyncio.to_thread(load_service, settings)
    except ArtifactError as exc:
        logger.error("cannot serve %s: %s", settings.model_dir, exc)
        raise
    service.decoder = Decoder(
        service.size,
        DecodeLimits(max_pixels=settings.max_image_pixels),
        service.topology.decode_threads,
        service.card.preprocessing,
    )
    await service.decoder.warm_up()
    service.body_budget = BodyBudget(settings.max_inflight_upload_bytes)
    service.batcher = Batcher(
        service.predict_functions(),
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_s,
        queue_limit=settings.queue_limit,
        on_batch=metrics.observe_batch,
        lone=service.lone.predict if service.lone is not None else None,
        alone=service.alone,
    )
    service.batcher.start()
    batcher = service.batcher
    metrics.track_queue(lambda: batcher.depth)
    metrics.model_info.labels(**service.model_ref()).set(1)
    # Everything loaded so far lives as long as the process: take it out of the garbage
    # collector's view, or each full collection walks its ~80,000 objects and holds the GIL
    # for 35-45 ms, stalling every request in the process.
    gc.collect()
    gc.freeze()
    app.state.service = service
    app.state.status = "ready"
    metrics.ready.set(1)
    topology = service.topology
    logger.info(
        "serving %s %s (%s, %s) after %.1fs: %d inference worker(s) x %d thread(s), "
        "%d decode thread(s); %s",
        service.card.name,
        service.card.version,
        service.format,
        service.artifact.file,
        time.perf_counter() - started,
        topology.inference_workers,
        topology.inference_threads,
        topology.decode_threads,
        topology.reason,
    )
    try:
        yield
    finally:
        app.state.status = "draining"  # health answers 503 from here on
        metrics.ready.set(0)
        await batcher.close(timeout=settings.request_timeout_s)
        service.decoder.close()
        metrics.track_queue(lambda: 0)
        metrics.close()
        app.state.status = "stopped"
        logger.info("stopped after draining the queue")


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new application (own settings, own metrics registry); the model loads in the lifespan.

    Every route sits inside the same middleware stack: the metrics middleware, CORS when
    CORS_ORIGINS is set, and whatever a user adds with `app.add_middleware`.
    """
    settings = settings or Settings()
    app = FastAPI(
        title="MobileViT image classification",
        version=API_VERSION,
        summary="Classifies images with a MobileViT model exported as TFLite or SavedModel.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.status = "loading"
    app.state.service = None
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Retry-After", "WWW-Authenticate", "Inference-Header-Content-Length"],
        )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.router.routes.append(predict.predict_route(app.state))
    app.include_router(routes.router)
    app.include_router(v2.router)
    if settings.demo:
        app.include_router(demo_router())
    generate_openapi = app.openapi
    app.openapi = lambda: predict.document_predict(generate_openapi())  # type: ignore[method-assign]
    return app


app = create_app()
