"""The loaded model and its helpers: what the lifespan builds and the routes use."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from app.batcher import LONE_MAX_BATCH, Batcher
from app.decoding import BodyBudget, Decoder
from app.settings import Settings
from app.topology import Topology
from contract.card import Artifact, ArtifactError, ModelCard, read_card, verify_for_serving
from contract.runtime import Backend, allowed_batch_sizes, check_shapes, open_backend

logger = logging.getLogger("app.service")


@dataclass
class Service:
    """Everything the lifespan loads; `app.state.service` once the model is up."""

    settings: Settings
    topology: Topology
    card: ModelCard
    artifact: Artifact
    backend: Backend
    runtime: dict[str, str]
    #: One backend per inference worker (TFLite interpreters are not thread-safe; a TensorFlow
    #: SavedModel is, so its workers share one).
    replicas: list[Backend] = field(default_factory=list)
    #: The many-thread interpreter a lone request runs on (TFLite, several workers), or None.
    lone: Backend | None = None
    #: Files model.json lists that this deployment does not have (only the served one is needed).
    missing_artifacts: list[str] = field(default_factory=list)
    batcher: Batcher | None = None
    decoder: Decoder | None = None
    body_budget: BodyBudget | None = None
    started: float = field(default_factory=time.monotonic)
    #: Requests between their first body byte and their answer (event loop only).
    in_flight: int = 0

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Around a request's handling: counts it, so a lone request can be told apart."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def alone(self) -> bool:
        return self.in_flight <= 1

    def predict_functions(self) -> list[Callable[[np.ndarray], np.ndarray]]:
        """One per inference worker, for the batcher."""
        return [replica.predict for replica in self.replicas]

    @property
    def size(self) -> int:
        return self.card.input.height

    @property
    def format(self) -> str:
        return self.settings.model_format

    def model_ref(self) -> dict[str, str]:
        return {
            "name": self.card.name,
            "version": self.card.version,
            "format": self.format,
            "artifact": self.artifact.file,
        }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def runtime_versions(fmt: str) -> dict[str, str]:
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("pillow", "fastapi"):
        versions[dist] = _version(dist) or "unknown"
    if fmt == "tflite":
        versions["ai-edge-litert"] = _version("ai-edge-litert") or "unknown"
    else:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return versions


def _warm_up(backend: Backend, size: int, num_labels: int, max_batch: int, path: Path) -> None:
    """Every batch size a backend keeps, so no request pays for a first-use allocation."""
    for batch in reversed(allowed_batch_sizes(max_batch)):
        probabilities = backend.predict(np.zeros((batch, size, size, 3), dtype=np.uint8))
        if probabilities.shape != (batch, num_labels) or not np.isfinite(probabilities).all():
            raise ArtifactError(f"{path}: warm-up batch of {batch} gave {probabilities.shape}")


def load_service(settings: Settings) -> Service:
    """Verify the model directory, open the backend, check shapes, warm up. Blocking."""
    model_dir = Path(settings.model_dir)
    card = read_card(model_dir)  # refuses a preprocessing rule or input spec it cannot apply
    artifact = card.artifact(settings.model_format, settings.artifact)
    missing = verify_for_serving(model_dir, card, artifact)
    if missing:
        logger.info("model.json also lists %s, not present here (not needed)", ", ".join(missing))
    if card.input.height != card.input.width:
        raise ArtifactError(
            f"{model_dir / 'model.json'}: input {card.input.height}x{card.input.width} "
            "is not square; the serving resize rule needs a square input"
        )
    topology = settings.topology()
    path = model_dir / artifact.file
    threads, max_batch = topology.inference_threads, settings.max_batch_size
    backend = open_backend(settings.model_format, path, threads, max_batch)
    check_shapes(backend, card.input.height, card.input.width, len(card.labels), path)
    extra = topology.inference_workers - 1
    if settings.model_format == "savedmodel":
        replicas = [backend] * (extra + 1)  # TensorFlow runs concurrent calls on one model
    else:
        replicas = [backend] + [
            open_backend("tflite", path, threads, max_batch) for _ in range(extra)
        ]
    for replica in dict.fromkeys(replicas):  # each distinct backend once
        _warm_up(replica, card.input.height, len(card.labels), max_batch, path)
    lone = None
    if topology.lone_request_threads and settings.model_format == "tflite":
        lone_batch = min(LONE_MAX_BATCH, max_batch)
        lone = open_backend("tflite", path, topology.lone_request_threads, lone_batch)
        _warm_up(lone, card.input.height, len(card.labels), lone_batch, path)
    return Service(
        settings=settings,
        topology=topology,
        card=card,
        artifact=artifact,
        backend=backend,
        runtime=runtime_versions(settings.model_format),
        replicas=replicas,
        lone=lone,
        missing_artifacts=missing,
    )
