"""`POST /predict`: classify uploaded images. The service's hot path, so a plain ASGI endpoint.

FastAPI's dependency solving and response validation cost about 0.3 ms of event-loop CPU per
request (bench/serve.py, "loop ms"), so `PredictEndpoint` reads the ASGI messages itself and
answers its own errors in the one JSON shape (`app.errors`). It is an ordinary route of the
app's router (`predict_route`), so every middleware applies to it as to every other route.
`document_predict` describes it in the OpenAPI schema, and the tests check the answers against
`PredictResponse`.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
from pydantic import BaseModel
from starlette.datastructures import Headers, QueryParams, State
from starlette.responses import JSONResponse
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from app.decoding import FILE_FIELD, read_uploads
from app.errors import CODES, ApiError, ErrorBody, error_response, unexpected_error
from app.routes import (
    RequestDeadline,
    admit,
    check_api_key,
    classify,
    classify_alone,
    serving,
)

DEFAULT_TOP_K = 3


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


class PredictEndpoint:
    """Classify the image(s) of one request: a multipart form with one or more `file` parts, or
    a raw `image/*` body; query `top_k`. Every error becomes its JSON answer here."""

    def __init__(self, state: State):
        self.state = state  # the app's: settings, status, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.predict(scope, receive)
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.code, exc.headers)
        except Exception as exc:
            response = unexpected_error(exc, "POST", scope["path"])
        await response(scope, receive, send)

    async def predict(self, scope: Scope, receive: Receive) -> JSONResponse:
        headers = Headers(scope=scope)
        check_api_key(self.state.settings, headers)
        service = serving(self.state)
        settings = service.settings
        labels = service.card.labels
        query = scope["query_string"]
        k = parse_top_k(QueryParams(query).get("top_k") if query else None, len(labels))
        assert service.decoder is not None and service.body_budget is not None
        started = time.perf_counter()
        with service.tracking():  # from the body's first byte to the model's answer
            async with RequestDeadline(receive, settings.request_timeout_s) as deadline:
                with service.body_budget.reserve() as reservation:
                    uploads = await read_uploads(
                        headers, receive, settings.max_upload_bytes, settings.max_files, reservation
                    )
                    deadline.watch_client()
                    admit(service, len(uploads))
                    decode_started = time.perf_counter()
                    decode = functools.partial(service.decoder.decode_here, uploads)
                    alone = await classify_alone(service, decode, len(uploads))
                    if alone is None:
                        images = await service.decoder.decode(uploads)
                        decoded = time.perf_counter()
                    else:
                        rows, decoded = alone
                # The encoded bytes are no longer needed: a request waiting in the queue holds
                # only its decoded pixels, which the queue limit bounds.
                filenames = [upload.filename for upload in uploads]
                del uploads, decode
                if alone is None:
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
                    "decode": round((decoded - decode_started) * 1000, 3),
                    "queue_and_inference": round((done - decoded) * 1000, 3),
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


def predict_route(state: State) -> NamedRoute:
    """The `/predict` route of an app, for its router."""
    return NamedRoute("/predict", PredictEndpoint(state), methods=["POST"])


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
