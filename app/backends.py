"""Inference backends behind one small interface: a batch of RGB pixels in, probabilities out.

`TFLiteBackend` needs only ai-edge-litert (no TensorFlow); `SavedModelBackend` imports TensorFlow
lazily, so the TFLite-only install never pays for it.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from app.artifacts import ArtifactError


class Backend(Protocol):
    """What the batcher calls. `predict` is called from one worker thread at a time."""

    name: str

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 or float32 [N, H, W, 3] pixels 0..255 -> float32 [N, num_classes] probabilities."""
        ...


class TFLiteBackend:
    """A `.tflite` model run by LiteRT, with one interpreter per batch size seen.

    The model has a dynamic batch axis; resizing one interpreter re-plans its memory on every
    change of batch size, which dynamic batching causes constantly. Interpreters are cheap for a
    model this size, so each batch size keeps its own (at most `max_interpreters`).
    """

    name = "tflite"

    def __init__(
        self, path: str | Path, num_threads: int | None = None, max_interpreters: int = 16
    ):
        self.path = Path(path)
        self.num_threads = num_threads
        self.max_interpreters = max_interpreters
        self._interpreters: dict[int, object] = {}
        self._lock = threading.Lock()  # an interpreter is not safe to invoke concurrently
        first = self._make(None)
        self._input = first.get_input_details()[0]
        self._output = first.get_output_details()[0]
        self._interpreters[int(self._input["shape"][0])] = first

    def _make(self, batch: int | None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            interpreter = Interpreter(model_path=str(self.path), num_threads=self.num_threads)
            if batch is not None:
                details = interpreter.get_input_details()[0]
                interpreter.resize_tensor_input(details["index"], [batch, *details["shape"][1:]])
            interpreter.allocate_tensors()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError variously
            raise ArtifactError(f"{self.path} cannot be loaded by LiteRT: {exc}") from None
        return interpreter

    @property
    def input_shape(self) -> tuple[int, ...]:
        """[batch, H, W, C] with -1 for a dynamic batch axis."""
        return tuple(int(v) for v in self._input["shape_signature"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self._output["shape_signature"])

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self._input["dtype"])

    def op_names(self) -> set[str]:
        interpreter = next(iter(self._interpreters.values()))
        return {op["op_name"] for op in interpreter._get_ops_details()}

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        batch = int(images.shape[0])
        with self._lock:
            interpreter = self._interpreters.get(batch)
            if interpreter is None:
                if len(self._interpreters) >= self.max_interpreters:
                    self._interpreters.pop(next(iter(self._interpreters)))
                interpreter = self._interpreters[batch] = self._make(batch)
            # Tensor indices are the same in every interpreter of one model file.
            interpreter.set_tensor(self._input["index"], self._quantize(images))
            interpreter.invoke()
            return self._dequantize(interpreter.get_tensor(self._output["index"]))

    def _quantize(self, images: np.ndarray) -> np.ndarray:
        dtype = self.input_dtype
        if dtype == np.float32:
            return images.astype(np.float32, copy=False)
        scale, zero_point = self._input["quantization"]
        if scale:
            images = np.round(images.astype(np.float32) / scale + zero_point)
        info = np.iinfo(dtype)
        return np.clip(images, info.min, info.max).astype(dtype)

    def _dequantize(self, values: np.ndarray) -> np.ndarray:
        if values.dtype == np.float32:
            return values.copy()
        scale, zero_point = self._output["quantization"]
        return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


class SavedModelBackend:
    """A Keras-exported SavedModel, called through its `serving_default` signature."""

    name = "savedmodel"

    def __init__(self, path: str | Path, num_threads: int | None = None):
        import tensorflow as tf

        if num_threads:
            # Fails once TensorFlow is initialised in this process; keep its setting then.
            with contextlib.suppress(RuntimeError):
                tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        self.path = Path(path)
        try:
            loaded = tf.saved_model.load(str(self.path))
            self._fn = loaded.signatures["serving_default"]
        except Exception as exc:
            raise ArtifactError(f"{self.path} is not a loadable SavedModel: {exc}") from None
        self._loaded = loaded  # keep the object graph alive
        self._tf = tf
        spec = next(iter(self._fn.structured_input_signature[1].values()))
        self._input_name = next(iter(self._fn.structured_input_signature[1].keys()))
        self.input_shape = tuple(-1 if d is None else int(d) for d in spec.shape)
        out_spec = next(iter(self._fn.structured_outputs.values()))
        self.output_shape = tuple(-1 if d is None else int(d) for d in out_spec.shape)
        self.input_dtype = np.dtype(spec.dtype.as_numpy_dtype)

    def predict(self, images: np.ndarray) -> np.ndarray:
        batch = self._tf.constant(np.asarray(images, dtype=np.float32))
        outputs = self._fn(**{self._input_name: batch})
        return np.asarray(next(iter(outputs.values())), dtype=np.float32)


def open_backend(fmt: str, path: str | Path, num_threads: int | None = None) -> Backend:
    if fmt == "tflite":
        return TFLiteBackend(path, num_threads)
    if fmt == "savedmodel":
        return SavedModelBackend(path, num_threads)
    raise ArtifactError(f"unknown artifact format {fmt!r}; use 'tflite' or 'savedmodel'")


def check_shapes(backend: Backend, height: int, width: int, num_labels: int, path: Path) -> None:
    """Refuse an artifact whose tensors disagree with model.json."""
    in_shape, out_shape = backend.input_shape, backend.output_shape
    if tuple(in_shape[1:]) != (height, width, 3):
        raise ArtifactError(
            f"{path} takes input {list(in_shape)}, but model.json says [N, {height}, {width}, 3]"
        )
    if out_shape[-1] != num_labels:
        raise ArtifactError(
            f"{path} outputs {out_shape[-1]} classes, but model.json lists {num_labels} labels"
        )
