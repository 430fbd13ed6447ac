"""The peer `bench.serve` compares against: what a user would write instead of this service.

    MOBILEVIT_MODEL_DIR=models/flowers-mobilevit-xxs uvicorn bench.peer:app --port 8766

Plain FastAPI, one process, one TFLite interpreter with a thread per core, one invoke per
request under a lock; the same preprocessing (contract.preprocess), no batching, no limits.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from contract.card import read_card
from contract.preprocess import preprocess_bytes
from contract.runtime import TFLiteBackend

MODEL_DIR = Path(os.environ.get("MOBILEVIT_MODEL_DIR", "models/flowers-mobilevit-xxs"))
card = read_card(MODEL_DIR)
# MOBILEVIT_ARTIFACT as the service reads it: another of the model's TFLite files.
artifact = card.artifact("tflite", os.environ.get("MOBILEVIT_ARTIFACT") or None)
backend = TFLiteBackend(MODEL_DIR / artifact.file, num_threads=os.cpu_count())
lock = threading.Lock()
app = FastAPI()


@app.get("/health")
def health() -> dict:
    return {"status": "ready"}


@app.post("/predict")
async def predict(request: Request) -> JSONResponse:
    body = await request.body()
    # Decode and invoke on the event loop, as most quick servers do; the interpreter uses
    # every core for the one request it runs.
    pixels = preprocess_bytes(body, card.input.height)
    with lock:
        row = backend.predict(pixels[None])[0]
    best = int(np.argmax(row))
    return JSONResponse({"label": card.labels[best], "score": float(row[best])})
