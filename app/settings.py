"""Service settings: one pydantic-settings class, every field read from a `MOBILEVIT_*` variable.

`MOBILEVIT_MODEL_DIR=/models/other MOBILEVIT_MAX_BATCH_SIZE=16 uvicorn app.main:app` is the whole
configuration story; each field's docstring is its documentation (also in `Settings.model_fields`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from PIL import Image
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.topology import Topology, derive, usable_cpus

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "flowers-mobilevit-xxs"
DEFAULT_INFLIGHT_UPLOAD_BYTES = 256 * 1024 * 1024
KSERVE_MODEL_DIR = Path("/mnt/models")


class Settings(BaseSettings):
    """How the service loads its model, batches, bounds its inputs and guards `/predict`."""

    model_config = SettingsConfigDict(
        env_prefix="MOBILEVIT_",
        extra="ignore",
        protected_namespaces=(),
        use_attribute_docstrings=True,
        validate_default=True,
        populate_by_name=True,
    )

    model_dir: Path = DEFAULT_MODEL_DIR
    """Model directory holding `model.json` and its artifacts. Default: the shipped model, or
    /mnt/models when KServe's STORAGE_URI is set (where its storage initializer puts the files)."""

    model_format: Literal["tflite", "savedmodel"] = "tflite"
    """Which artifact kind to serve: `tflite` (LiteRT, no TensorFlow) or `savedmodel`."""

    artifact: str | None = None
    """Artifact file inside the directory (e.g. `model_int8.tflite`); default: the card's default
    for the format."""

    max_batch_size: int = Field(default=4, ge=1, le=1024)
    """Most images the batcher runs in one backend call; 1 turns batching off. 4 matched 8's
    throughput on 2 cores at half the memory and a lower p99 (docs/experiments.md)."""

    max_batch_wait_ms: float = Field(default=0.0, ge=0, le=10_000)
    """How long the batcher waits after the first queued image for more to fill the batch.
    0 (default): greedy batching, taking whatever queued while the previous batch ran, so a lone
    request never waits (it runs at once on every core) and batches still grow under load
    (bench/serve.py measured both)."""

    queue_limit: int = Field(default=256, ge=1)
    """Images that may wait for inference; beyond it requests get 503 with `Retry-After`. At
    least MAX_FILES."""

    processes: int | None = Field(default=None, ge=1, le=256)
    """uvicorn processes `python -m app` starts. Default: derived from the usable CPUs
    (`app.topology`): one for up to 4 CPUs, one more for each further 4 or part of 4."""

    inference_workers: int | None = Field(default=None, ge=1, le=64)
    """Batches each process runs concurrently, each on its own TFLite interpreter (a SavedModel
    is shared). Default: one per CPU of the process."""

    inference_threads: int | None = Field(default=None, ge=1, le=64)
    """Threads of each worker's LiteRT interpreter (or TensorFlow's intra-op pool). Default: 1."""

    decode_threads: int | None = Field(default=None, ge=1, le=64)
    """Threads decoding and resizing uploaded images, off the event loop. Default: one per CPU
    of the process."""

    host: str = "127.0.0.1"
    """Address `python -m app` listens on (the Docker image sets 0.0.0.0)."""

    port: int = Field(
        default=8000, ge=1, le=65535, validation_alias=AliasChoices("MOBILEVIT_PORT", "PORT")
    )
    """Port `python -m app` listens on; `PORT` (KServe's convention) is read too."""

    access_log: bool = False
    """A log line per request on stdout. Off, as in TF Serving and Triton: /metrics counts
    requests by route and status."""

    demo: bool = True
    """The demo page at `/` (drop a photo, see the labels); false: `/` is a 404, API only."""

    cors_origins: Annotated[list[str], NoDecode] = []
    """Comma-separated origins allowed to call the API from a browser (Starlette's
    CORSMiddleware, on every route); `*` allows any. Unset: no CORS headers."""

    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    """Largest request body accepted (bytes); larger gets 413 before it is buffered."""

    max_inflight_upload_bytes: int | None = Field(default=None, ge=1)
    """Most bytes of request bodies one server process buffers at once (bodies being read or
    decoded); a request that does not fit gets 503 with `Retry-After`. It bounds the memory
    that many large uploads at once can take. Default: 256 MiB, or MAX_UPLOAD_BYTES if that is
    larger; set, it must be at least MAX_UPLOAD_BYTES."""

    # At most Pillow's own bomb limit, which refuses larger images before this check would.
    max_image_pixels: int = Field(default=40_000_000, ge=1, le=Image.MAX_IMAGE_PIXELS)
    """Largest image (width x height) decoded; checked from the header, larger gets 413. At
    most 89,478,485 (Pillow's own limit)."""

    max_files: int = Field(default=16, ge=1)
    """Most images in one request (multipart parts or v2 batch rows); more gets 413."""

    request_timeout_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """Deadline for one request (body, decode, queue and inference); past it the answer is 504.
    Longer than MAX_BATCH_WAIT_MS."""

    api_key: SecretStr | None = None
    """If set, `/predict` and v2 `infer` need `Authorization: Bearer <key>` or `X-API-Key: <key>`;
    health, metrics and model-info stay open. Printable ASCII; surrounding whitespace (a file's
    final newline) is dropped. Unset or empty: no authentication."""

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        # A key read from a file often ends in a newline; clients never send it.
        value = value.strip()
        if not value:
            return None
        if not value.isascii() or not value.isprintable():
            raise ValueError("API_KEY must be printable ASCII (HTTP headers carry no other text)")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("artifact", mode="before")
    @classmethod
    def _empty_artifact_is_default(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _kserve_storage(self) -> Settings:
        if "model_dir" not in self.model_fields_set and os.environ.get("STORAGE_URI"):
            self.model_dir = KSERVE_MODEL_DIR
        return self

    @model_validator(mode="after")
    def _one_upload_fits_in_flight(self) -> Settings:
        if self.max_inflight_upload_bytes is None:
            self.max_inflight_upload_bytes = max(
                DEFAULT_INFLIGHT_UPLOAD_BYTES, self.max_upload_bytes
            )
        elif self.max_inflight_upload_bytes < self.max_upload_bytes:
            raise ValueError(
                f"MAX_INFLIGHT_UPLOAD_BYTES ({self.max_inflight_upload_bytes}) must be at least "
                f"MAX_UPLOAD_BYTES ({self.max_upload_bytes}), or the largest upload could never "
                "be accepted"
            )
        return self

    @model_validator(mode="after")
    def _limits_agree(self) -> Settings:
        if self.queue_limit < self.max_files:
            raise ValueError(
                f"QUEUE_LIMIT ({self.queue_limit}) must be at least MAX_FILES ({self.max_files}), "
                "or a request with that many images would get 503 forever"
            )
        if self.max_batch_wait_s >= self.request_timeout_s:
            raise ValueError(
                f"MAX_BATCH_WAIT_MS ({self.max_batch_wait_ms:g}) must be shorter than "
                f"REQUEST_TIMEOUT_S ({self.request_timeout_s:g}), or a lone request times out"
            )
        return self

    @property
    def max_batch_wait_s(self) -> float:
        return self.max_batch_wait_ms / 1000.0

    def topology(self) -> Topology:
        """Processes and threads: what is set here, the rest derived from the usable CPUs."""
        return derive(
            usable_cpus(),
            self.processes,
            self.inference_workers,
            self.inference_threads,
            self.decode_threads,
            batch_window=self.max_batch_wait_ms > 0,
        )
