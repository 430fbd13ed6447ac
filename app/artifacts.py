"""The model directory contract: `model.json` next to `saved_model/` and `*.tflite` files.

`training.export` writes it; the service reads it with `load_model_card`, which refuses a directory
whose files are missing, altered (SHA-256) or inconsistent, with a message naming the file.
Pure pydantic + hashlib: nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CARD_FILE = "model.json"
SCHEMA_VERSION = 1

ArtifactFormat = Literal["tflite", "savedmodel"]


class ArtifactError(RuntimeError):
    """The model directory cannot be served; the message names the offending file."""


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[3] = 3
    dtype: Literal["float32"] = "float32"
    value_range: tuple[float, float] = (0.0, 255.0)
    layout: Literal["NHWC"] = "NHWC"
    color: Literal["RGB"] = "RGB"


class Artifact(BaseModel):
    model_config = ConfigDict(extra="allow")

    file: str
    format: ArtifactFormat
    quantization: str  # float32 | float16 | dynamic_range | int8
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    validation_top1: float | None = None
    agreement_with_keras: float | None = None
    max_abs_diff: float | None = None


class ModelCard(BaseModel):
    """Everything the server needs, and nothing it must guess."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    version: str
    architecture: str = "MobileViT v1"
    variant: str
    parameters: int = Field(gt=0)
    labels: list[str] = Field(min_length=2)
    input: InputSpec
    output: dict = {"type": "probabilities", "dtype": "float32"}
    preprocessing: dict
    training: dict = {}
    metrics: dict = {}
    artifacts: list[Artifact] = Field(min_length=1)
    default_artifacts: dict[str, str] = {}
    versions: dict[str, str] = {}
    created: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        files = [a.file for a in self.artifacts]
        if len(set(files)) != len(files):
            raise ValueError("artifact files must be unique")
        for fmt, file in self.default_artifacts.items():
            if file not in files:
                raise ValueError(f"default artifact {file!r} for {fmt} is not listed in artifacts")
        return self

    def artifact(self, fmt: ArtifactFormat, file: str | None = None) -> Artifact:
        """The artifact to serve: `file` if given, else the card's default for `fmt`."""
        candidates = [a for a in self.artifacts if a.format == fmt]
        if not candidates:
            raise ArtifactError(f"{CARD_FILE} lists no {fmt} artifact")
        wanted = file or self.default_artifacts.get(fmt) or candidates[0].file
        for artifact in candidates:
            if artifact.file == wanted:
                return artifact
        listed = ", ".join(a.file for a in candidates)
        raise ArtifactError(f"{CARD_FILE} lists no {fmt} artifact named {wanted!r} (has: {listed})")


def sha256_path(path: Path) -> str:
    """SHA-256 of a file; for a directory, of its sorted `relative-path hash` lines."""
    if path.is_dir():
        lines = [
            f"{p.relative_to(path).as_posix()} {sha256_path(p)}\n"
            for p in sorted(path.rglob("*"))
            if p.is_file()
        ]
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def describe_artifact(model_dir: Path, file: str, fmt: str, quantization: str, **extra) -> Artifact:
    path = Path(model_dir, file)
    return Artifact(
        file=file,
        format=fmt,
        quantization=quantization,
        bytes=size_of(path),
        sha256=sha256_path(path),
        **extra,
    )


def read_card(model_dir: str | Path) -> ModelCard:
    """Parse model.json without checking the artifact files."""
    card_path = Path(model_dir, CARD_FILE)
    if not Path(model_dir).is_dir():
        raise ArtifactError(f"model directory not found: {model_dir}")
    if not card_path.is_file():
        raise ArtifactError(f"{card_path} not found: not a model directory")
    try:
        return ModelCard.model_validate(json.loads(card_path.read_text()))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{card_path} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors()
        )
        raise ArtifactError(f"{card_path} is invalid: {problems}") from None


def verify_artifact(model_dir: str | Path, artifact: Artifact) -> Path:
    """Check that an artifact exists and matches its recorded SHA-256; return its path."""
    path = Path(model_dir, artifact.file)
    if not path.exists():
        raise ArtifactError(f"{path} is listed in {CARD_FILE} but missing")
    actual = sha256_path(path)
    if actual != artifact.sha256:
        raise ArtifactError(
            f"{path} does not match {CARD_FILE}: sha256 {actual[:12]}… != {artifact.sha256[:12]}…"
        )
    return path


def load_model_card(model_dir: str | Path, verify: bool = True) -> ModelCard:
    """Read and validate a model directory; with `verify`, every listed file is hash-checked."""
    card = read_card(model_dir)
    if verify:
        for artifact in card.artifacts:
            verify_artifact(model_dir, artifact)
    return card


def write_card(model_dir: str | Path, card: ModelCard) -> None:
    Path(model_dir, CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
