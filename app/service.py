"""The loaded model and its helpers: what the lifespan builds and the routes use."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from app.batcher import Batcher
from app.decoding import BodyBudget, Decoder
from app.settings import Settings
from app.slots import WIDE_MAX_BATCH, HostActivity, Predict, Slots, open_slots
from contract.card import Artifact, ArtifactError, ModelCard, read_card, verify_for_serving
from contract.runtime import Backend, allowed_batch_sizes, check_shapes, open_backend

logger = logging.getLogger("app.service")


@dataclass
class Service:
    """Everything the lifespan loads; `app.state.service` once the model is up."""

    settings: Settings
    card: ModelCard
    artifact: Artifact
    artifact_path: Path
    backend: Backend
    runtime: dict[str, str]
    #: Files model.json lists that this deployment does not have (only the served one is needed).
    missing_artifacts: list[str] = field(default_factory=list)
    #: One backend per inference worker (TFLite interpreters are not thread-safe; a TensorFlow
    #: SavedModel is, so its workers share one).
    replicas: list[Backend] = field(default_factory=list)
    #: Each inference worker's handles on the host-wide slots (INFERENCE_SLOTS); empty: no cap.
    slots: list[Slots] = field(default_factory=list)
    #: With slots and IDLE_INFERENCE_THREADS: the many-thread interpreter a lone request runs
    #: on (one for all workers: only one batch at a time can hold every slot), and the host-wide
    #: count of requests in flight that tells a lone request.
    wide: Backend | None = None
    activity: HostActivity | None = None
    batcher: Batcher | None = None
    decoder: Decoder | None = None
    body_budget: BodyBudget | None = None
    started: float = field(default_factory=time.monotonic)

    def predict_functions(self) -> list[Predict]:
        """One per inference worker, for the batcher; with slots, each batch runs in a free one."""
        predicts = [replica.predict for replica in self.replicas]
        if not self.slots:
            return predicts
        if self.wide is None or self.activity is None:
            return [slots.wrap(p) for slots, p in zip(self.slots, predicts, strict=True)]
        wide, alone = self.wide.predict, self.activity.alone
        return [slots.wrap(p, wide, alone) for slots, p in zip(self.slots, predicts, strict=True)]

    def in_flight(self) -> contextlib.AbstractContextManager[None]:
        """Around a request's whole handling: counts it for IDLE_INFERENCE_THREADS."""
        return self.activity.busy() if self.activity is not None else contextlib.nullcontext()

    def close(self) -> None:
        for slots in self.slots:
            slots.close()
        if self.activity is not None:
            self.activity.close()

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
    path = model_dir / artifact.file
    max_batch = settings.max_batch_size
    backend = open_backend(settings.model_format, path, settings.inference_threads, max_batch)
    check_shapes(backend, card.input.height, card.input.width, len(card.labels), path)
    extra = settings.inference_workers - 1
    if settings.model_format == "savedmodel":
        replicas = [backend] * (extra + 1)  # TensorFlow runs concurrent calls on one model
    else:
        replicas = [backend] + [
            open_backend("tflite", path, settings.inference_threads, max_batch)
            for _ in range(extra)
        ]
    for replica in dict.fromkeys(replicas):  # each distinct backend once
        _warm_up(replica, card.input.height, len(card.labels), settings.max_batch_size, path)
    slots = open_slots(settings.inference_slots_dir, settings.inference_slots, len(replicas))
    wide = activity = None
    if slots and settings.idle_inference_threads and settings.model_format == "tflite":
        try:
            activity = HostActivity(settings.inference_slots_dir / "busy.lock")
        except OSError as exc:
            logger.warning("a lone request stays on one core: %s", exc)
    if activity is not None:
        try:
            wide = open_backend("tflite", path, settings.idle_inference_threads, WIDE_MAX_BATCH)
            wide_batch = min(WIDE_MAX_BATCH, settings.max_batch_size)
            _warm_up(wide, card.input.height, len(card.labels), wide_batch, path)
        except Exception:
            activity.close()
            for handle in slots:
                handle.close()
            raise
    return Service(
        settings=settings,
        card=card,
        artifact=artifact,
        artifact_path=path,
        backend=backend,
        runtime=runtime_versions(settings.model_format),
        missing_artifacts=missing,
        replicas=replicas,
        slots=slots,
        wide=wide,
        activity=activity,
    )
