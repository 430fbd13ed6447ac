"""Prometheus metrics, one `CollectorRegistry` per app so several apps in a process never clash.

`MetricsMiddleware` (pure ASGI, so streaming and error paths are measured too) counts requests by
route template, method and status and times them; the batcher reports batch sizes, inference
time and images classified through `Metrics.observe_batch`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mobilevit_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mobilevit_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "mobilevit_queue_depth", "Images waiting in the batch queue.", registry=r
        )
        self.batch_size = Histogram(
            "mobilevit_batch_size",
            "Images per backend call.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "mobilevit_inference_seconds",
            "Time of one backend call (a whole batch).",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "mobilevit_images_classified", "Images classified successfully.", registry=r
        )
        self.failed_batches = Counter(
            "mobilevit_inference_failures", "Backend calls that raised.", registry=r
        )
        self.ready = Gauge(
            "mobilevit_ready", "1 when the model is loaded, warmed and serving.", registry=r
        )
        self.model_info = Gauge(
            "mobilevit_model_info",
            "The served model (value is always 1).",
            ["name", "version", "format", "artifact"],
            registry=r,
        )
        self.queue_depth.set_function(lambda: 0)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, size: int, seconds: float, failed: bool) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)
        if failed:
            self.failed_batches.inc()
        else:
            self.images.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request; unmatched paths share one `route` label."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            status = 500
            raise
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)
