"""The service's design with none of its features: an upper bound for `bench.serve`.

    uvicorn bench.bare_service:app      # the same MOBILEVIT_* settings as app.main:app

`POST /predict` here takes a raw image body and goes straight through what the design requires
and nothing else: the body read in full, decoding in the app's thread pool (`Decoder`), the
app's batcher and inference workers (slots included), and a small JSON answer with the best
label. No routing, middleware, metrics per request, API key, `top_k`, deadline, body budget,
timings or error shapes: a broken photo simply gets a 400. Every other request (the lifespan,
`/health`, `/metrics`) goes to the real app, so the model loads, warms up and counts its batches
exactly as when served.

`bench.serve --modes 2proc,bare` runs it as mode "bare": what the real app's code costs on top
of uvicorn, the two hand-offs and the work itself, and what ratio to the ceiling this design can
reach on a machine at all.
"""

from __future__ import annotations

import json

from starlette.types import Receive, Scope, Send

from app.decoding import Upload
from app.main import create_app

real_app = create_app()

_JSON = [(b"content-type", b"application/json")]


async def _answer(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [*_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
        await real_app(scope, receive, send)
        return
    service = real_app.state.service
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        images = await service.decoder.decode([Upload(None, bytes(body))])
    except Exception as exc:  # a bound, not a service: any failure is a 400
        await _answer(send, 400, {"error": str(exc)})
        return
    (row,) = await service.batcher.predict_many(images)
    best = int(row.argmax())
    await _answer(send, 200, {"label": service.card.labels[best], "score": float(row[best])})
