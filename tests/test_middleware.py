"""Every middleware applies to every route: CORS and a user's own middleware on /predict (the
hot path) and on v2 infer, preflight and real request alike."""

from __future__ import annotations

import numpy as np
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.main import create_app
from tests.serving_helpers import image_bytes, make_settings, running

pytestmark = pytest.mark.anyio
ORIGIN = "https://photos.example"


class RequestId:
    """A user's middleware: tags every answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", b"r-1")]
            await send(message)

        await self.app(scope, receive, tagged)


async def test_cors_and_a_user_middleware_reach_predict_and_v2(tiny_model_dir):
    import httpx

    app = create_app(make_settings(tiny_model_dir, cors_origins=[ORIGIN]))
    app.add_middleware(RequestId)
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path in ("/predict", "/v2/models/tiny-mobilevit/infer"):
                preflight = await client.options(path, headers={
                    "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type,x-api-key"})  # fmt: skip
                assert preflight.status_code == 200, (path, preflight.text)
                assert preflight.headers["access-control-allow-origin"] == ORIGIN
                assert preflight.headers["x-request-id"] == "r-1"
            upload = await client.post(
                "/predict",
                files=[("file", ("r.jpg", image_bytes("red"), "image/jpeg"))],
                headers={"Origin": ORIGIN},
            )
            assert upload.status_code == 200
            assert upload.headers["access-control-allow-origin"] == ORIGIN
            assert upload.headers["x-request-id"] == "r-1"
            pixels = np.zeros((1, 64, 64, 3), np.uint8).ravel().tolist()
            infer = await client.post(
                "/v2/models/tiny-mobilevit/infer",
                json={"inputs": [{"name": "images", "datatype": "UINT8",
                                  "shape": [1, 64, 64, 3], "data": pixels}]},
                headers={"Origin": ORIGIN},
            )  # fmt: skip
            assert infer.status_code == 200
            assert infer.headers["access-control-allow-origin"] == ORIGIN
            assert infer.headers["x-request-id"] == "r-1"
            other = await client.post("/predict", content=b"x", headers={
                "Origin": "https://evil.example", "Content-Type": "image/jpeg"})  # fmt: skip
            assert "access-control-allow-origin" not in other.headers
            assert other.headers["x-request-id"] == "r-1"  # errors pass the middleware too


async def test_no_cors_headers_unless_configured(tiny_model_dir):
    import httpx

    app = create_app(make_settings(tiny_model_dir))
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post(
                "/predict", files=[("file", ("r.jpg", image_bytes("red"), "image/jpeg"))],
                headers={"Origin": ORIGIN},
            )  # fmt: skip
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
