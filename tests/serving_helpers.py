"""Helpers of the serving tests (plain functions; the fixtures are in `serving_fixtures`).

Apps run for real: `running()` drives the ASGI lifespan (model load, hash check, warm-up, drain)
and requests go through httpx's `ASGITransport`.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.conftest import COLOURS, REPO

FORMATS = ("tflite", "savedmodel")
LABELS = ("blue", "green", "red")
ERROR_KEYS = {"error", "status", "code"}


def wrap_replicas(monkeypatch, batcher, wrap: Callable[[Callable], Callable]) -> None:
    """Swap every inference worker's predict, and the lone request's, for `wrap(real predict)`
    (undone by monkeypatch)."""
    monkeypatch.setattr(batcher, "_replicas", [wrap(real) for real in batcher._replicas])
    if batcher._lone is not None:
        monkeypatch.setattr(batcher, "_lone", wrap(batcher._lone))


def make_settings(model_dir: Path, fmt: str = "tflite", **overrides) -> Settings:
    values = {"model_dir": model_dir, "model_format": fmt, "max_batch_wait_ms": 2.0}
    values.update(overrides)
    return Settings(**values)


class Lifespan:
    """Drives an app through the ASGI lifespan protocol, as uvicorn does."""

    def __init__(self, app: FastAPI):
        self.app = app
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        if message["type"] == "lifespan.startup.failed":
            await asyncio.gather(self._task, return_exceptions=True)
            raise RuntimeError(message.get("message") or "startup failed")
        assert message["type"] == "lifespan.startup.complete", message

    async def shutdown(self) -> None:
        assert self._task is not None
        await self._to_app.put({"type": "lifespan.shutdown"})
        message = await self._from_app.get()
        await self._task
        assert message["type"] == "lifespan.shutdown.complete", message


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    """Startup before the block, shutdown (drain) after it."""
    lifespan = Lifespan(app)
    await lifespan.startup()
    try:
        yield app
    finally:
        await lifespan.shutdown()


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def fmt(self) -> str:
        return self.settings.model_format


@asynccontextmanager
async def serve(settings: Settings, raise_app_exceptions: bool = True) -> AsyncIterator[Served]:
    app = create_app(settings)
    async with running(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Served(app, client, settings)


@contextmanager
def app_status(app: FastAPI, status: str) -> Iterator[None]:
    """Pretend the app is loading/draining (Starlette's State defeats monkeypatch.setattr)."""
    before = app.state.status
    app.state.status = status
    try:
        yield
    finally:
        app.state.status = before


def image_bytes(
    colour: tuple[int, int, int] | str = "red", size=(40, 30), fmt="JPEG", mode="RGB"
) -> bytes:
    if isinstance(colour, str):
        colour = COLOURS[colour]
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg_with_scans(scans: int, size: tuple[int, int] = (64, 64), mpo: bool = False) -> bytes:
    """A flat progressive JPEG whose last scan is repeated up to `scans` scans: each one a pass
    over the whole image for the decoder, a few bytes in the file (libjpeg-turbo's LJT-01-003).
    With `mpo`, the first of two frames of an MPO file (which Pillow opens as format "MPO")."""
    image = Image.new("RGB", size, COLOURS["red"])
    buffer = io.BytesIO()
    if mpo:
        image.save(buffer, "MPO", save_all=True, append_images=[image], progressive=True)
    else:
        image.save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    end = data.index(b"\xff\xd9")  # the first frame's end-of-image marker
    last_scan = data[data.rindex(b"\xff\xda", 0, end) : end]
    extra = scans - data.count(b"\xff\xda", 0, end)
    assert extra >= 0
    return data[:end] + last_scan * extra + data[end:]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The one error shape: JSON with exactly `error` (str), `status` (int), `code` (str)."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == ERROR_KEYS, body
    assert isinstance(body["error"], str) and body["error"]
    assert body["status"] == status
    assert isinstance(body["code"], str)
    if code is not None:
        assert body["code"] == code, body
    assert "Traceback" not in response.text
    if status == 503:
        assert response.headers.get("retry-after") == "1"
    return body


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (Prometheus text)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


# ---- a real uvicorn server in a subprocess ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(model_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOBILEVIT_")}
    env.update(MOBILEVIT_MODEL_DIR=str(model_dir), PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    env.update({f"MOBILEVIT_{k.upper()}": v for k, v in settings.items()})
    return env


def server_command(port: int) -> list[str]:
    """`python -m app` (what make serve and the image run) on `port` of 127.0.0.1."""
    return [
        "env",
        f"MOBILEVIT_PORT={port}",
        "MOBILEVIT_HOST=127.0.0.1",
        sys.executable,
        "-m",
        "app",
    ]
