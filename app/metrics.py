"""Prometheus metrics, one `CollectorRegistry` per app so several apps in a process never clash.

`MetricsMiddleware` (pure ASGI, so streaming and error paths are measured too) counts requests by
route template, method and status and times them; the batcher reports batch sizes, inference
time and images classified through `Metrics.observe_batch`.

Several server processes (`python -m app` with more than one): prometheus-client keeps every
process's values in files in `PROMETHEUS_MULTIPROC_DIR` (a directory of this service instance
that `python -m app` creates) and `/metrics` reports the sum over all processes, whichever one
answers. When uvicorn replaces a worker that died, the new process takes the dead one's live
gauges (ready, queue depth) out of the sum but keeps its counters and histograms, so totals never
go backwards. The directory is emptied when the service as a whole starts (`clear_directory`),
so a restarted service does not add up earlier runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        if self.multiprocess_dir:
            forget_dead_processes_gauges(Path(self.multiprocess_dir))
        self._depth: Callable[[], float] = lambda: 0
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
            "mobilevit_queue_depth",
            "Images waiting in the batch queue.",
            registry=r,
            multiprocess_mode="livesum",
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
            "mobilevit_ready",
            "1 when the model is loaded, warmed and serving (in every process).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.model_info = Gauge(
            "mobilevit_model_info",
            "The served model (value is always 1).",
            ["name", "version", "format", "artifact"],
            registry=r,
            multiprocess_mode="livemax",
        )
        if not self.multiprocess_dir:
            self.queue_depth.set_function(lambda: self._depth())

    def track_queue(self, depth: Callable[[], float]) -> None:
        self._depth = depth
        if self.multiprocess_dir:  # other processes read the file: keep it current
            self.queue_depth.set(depth())

    def observe_batch(self, size: int, seconds: float, failed: bool) -> None:
        if self.multiprocess_dir:
            self.queue_depth.set(self._depth())
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)
        if failed:
            self.failed_batches.inc()
        else:
            self.images.inc(size)

    def close(self) -> None:
        """A process that stops takes its live gauges (ready, queue depth) out of the sum."""
        if self.multiprocess_dir:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)

    def render(self) -> bytes:
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        self.queue_depth.set(self._depth())
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return generate_latest(merged)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _pid_of(file: Path) -> int | None:
    pid = file.stem.rsplit("_", 1)[-1]
    return int(pid) if pid.isdigit() else None


def forget_dead_processes_gauges(directory: Path) -> None:
    """Take the live gauges of processes that are gone out of the sum (prometheus-client's
    `mark_process_dead`); their counters and histograms stay. Creates the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    dead = {pid for file in directory.glob("*.db") if (pid := _pid_of(file)) is not None}
    for pid in sorted(dead):
        if pid != os.getpid() and not _alive(pid):
            multiprocess.mark_process_dead(pid, str(directory))


def clear_directory(directory: Path) -> None:
    """Remove every value file: a new service instance starts counting from zero."""
    directory.mkdir(parents=True, exist_ok=True)
    for file in directory.glob("*.db"):
        file.unlink(missing_ok=True)


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
