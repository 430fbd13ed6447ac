"""The model card: `model.json` next to `saved_model/`, `*.tflite` files and `split.json`.

`training.export` writes it (`write_card`); the service and `training.evaluate` read it
(`read_card`, `load_model_card`), which refuse a directory whose card does not validate, naming
the field, or whose files are missing or altered (SHA-256), naming the file. The preprocessing
rule and the input spec are typed: a card asking for a transform this code does not implement is
refused, never served with the wrong one. Pure pydantic + hashlib: nothing here imports
TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from contract.preprocess import PreprocessingSpec

CARD_FILE = "model.json"
SPLIT_FILE = "split.json"
SCHEMA_VERSION = 2

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

    @field_validator("value_range")
    @classmethod
    def _pixels(cls, value: tuple[float, float]) -> tuple[float, float]:
        # Every backend is fed 0..255 pixels; a model that wants another range rescales inside.
        if tuple(value) != (0.0, 255.0):
            raise ValueError(f"must be [0, 255] (pixels as they are), got {list(value)}")
        return value


def _inside_the_model_directory(file: str) -> str:
    path = PurePosixPath(file)
    if not file or path.is_absolute() or ".." in path.parts or "\\" in file:
        raise ValueError(f"must be a relative path inside the model directory, got {file!r}")
    return file


class Artifact(BaseModel):
    model_config = ConfigDict(extra="allow")

    file: Annotated[str, AfterValidator(_inside_the_model_directory)]
    format: ArtifactFormat
    quantization: str  # float32 | float16 | dynamic_range | int8
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    top1: float | None = None
    """Top-1 of this artifact on the photos `evaluated_on` describes."""
    agreement_with_keras: float | None = None
    max_abs_diff: float | None = None


class SplitRecord(BaseModel):
    """The photos the model was trained and validated on: `file` (split.json, relative paths
    under `data`) in the model directory, hashed, so evaluation never re-derives the split."""

    model_config = ConfigDict(extra="forbid")

    file: Annotated[str, AfterValidator(_inside_the_model_directory)] = SPLIT_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    data: str
    train_images: int = Field(ge=0)
    validation_images: int = Field(ge=1)


class Evaluation(BaseModel):
    """Which photos the artifacts' `top1` and the parity checks were measured on."""

    model_config = ConfigDict(extra="forbid")

    photos: Literal["validation_split", "all_photos"]
    """`validation_split`: the recorded validation photos, never trained on. `all_photos`:
    every photo of `data`, which may include training photos (an export without a split)."""
    data: str
    images: int = Field(ge=1)


class ModelCard(BaseModel):
    """Everything the server needs, and nothing it must guess."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: Literal[2] = SCHEMA_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    version: str
    architecture: str = "MobileViT v1"
    variant: str
    parameters: int = Field(gt=0)
    labels: list[str] = Field(min_length=2)
    input: InputSpec
    output: dict = {"type": "probabilities", "dtype": "float32"}
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    training: dict = {}
    metrics: dict = {}
    split: SplitRecord | None = None
    evaluated_on: Evaluation | None = None
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
        formats = {a.file: a.format for a in self.artifacts}
        for fmt, file in self.default_artifacts.items():
            if file not in formats:
                raise ValueError(f"default artifact {file!r} for {fmt} is not listed in artifacts")
            if formats[file] != fmt:
                raise ValueError(f"default artifact {file!r} for {fmt} is a {formats[file]} file")
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
        raw = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{card_path} is not valid JSON: {exc}") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{card_path}: schema_version {version!r} is not {SCHEMA_VERSION}, the one this code "
            "reads; re-export the model, or rewrite a version-1 card with "
            "`python -m training.upgrade_card DIR --data PHOTOS`"
        )
    try:
        return ModelCard.model_validate(raw)
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
        if card.split is not None:
            verify_split(model_dir, card.split)
    return card


def verify_for_serving(model_dir: str | Path, card: ModelCard, served: Artifact) -> list[str]:
    """Hash-check the artifact to serve; return the other listed files that are missing.

    A deployment may keep only the artifact it serves (a TFLite-only image deletes
    saved_model/), so missing others are reported, not refused; present ones are not hashed,
    which keeps startup from reading files it will never use.
    """
    verify_artifact(model_dir, served)
    return [
        a.file for a in card.artifacts if a is not served and not Path(model_dir, a.file).exists()
    ]


def verify_split(model_dir: str | Path, split: SplitRecord) -> Path:
    """The split file, checked against its recorded SHA-256."""
    path = Path(model_dir, split.file)
    if not path.is_file():
        raise ArtifactError(f"{path} is recorded in {CARD_FILE} but missing")
    if sha256_path(path) != split.sha256:
        raise ArtifactError(f"{path} does not match the sha256 recorded in {CARD_FILE}")
    return path


def write_card(model_dir: str | Path, card: ModelCard) -> None:
    Path(model_dir, CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
