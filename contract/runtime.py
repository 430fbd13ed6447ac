"""Runtime backends behind one protocol: a batch of RGB pixels in, probabilities out.

`TFLiteBackend` needs only ai-edge-litert (no TensorFlow); `SavedModelBackend` imports TensorFlow
lazily, so the TFLite-only install never pays for it.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from contract.card import ArtifactError

#: Up to this size every batch size gets its own interpreter; above it, powers of two.
EXACT_BATCH_SIZES = 8


class Backend(Protocol):
    """What the service and the export checks call. A LiteRT backend's `predict` is called from
    one thread at a time (an interpreter is not thread-safe); the service shares one SavedModel
    backend between its inference workers, as TensorFlow runs concurrent calls on one model."""

    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """[batch, H, W, C], -1 for a dynamic axis."""
        ...

    @property
    def output_shape(self) -> tuple[int, ...]:
        """[batch, num_classes], -1 for a dynamic axis."""
        ...

    @property
    def input_dtype(self) -> np.dtype:
        """What the artifact takes: float32, or uint8 for a full-integer model."""
        ...

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 or float32 [N, H, W, 3] pixels 0..255 -> float32 [N, num_classes] probabilities."""
        ...


def allowed_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a TFLite backend keeps an interpreter for: 1..8, then powers of two, and
    `max_batch` itself. A batch of another size is padded up to the next one (as TF Serving's
    `allowed_batch_sizes`), so memory grows with log(max_batch), not with every size seen."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes = set(range(1, min(max_batch, EXACT_BATCH_SIZES) + 1))
    power = EXACT_BATCH_SIZES * 2
    while power < max_batch:
        sizes.add(power)
        power *= 2
    sizes.add(max_batch)
    return tuple(sorted(sizes))


class TFLiteBackend:
    """A `.tflite` model run by LiteRT, one interpreter per allowed batch size.

    The model has a dynamic batch axis; resizing one interpreter re-plans its memory on every
    change of batch size, which dynamic batching causes constantly. So each allowed size keeps
    its own interpreter, and a batch is padded up to the next allowed size (split when larger
    than the largest).
    """

    name = "tflite"

    def __init__(self, path: str | Path, num_threads: int | None = None, max_batch: int = 16):
        self.path = Path(path)
        self.num_threads = num_threads
        self.batch_sizes = allowed_batch_sizes(max_batch)
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
        return tuple(int(v) for v in self._input["shape_signature"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self._output["shape_signature"])

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self._input["dtype"])

    @property
    def interpreters(self) -> int:
        """Interpreters allocated so far (at most one per allowed batch size, plus the first)."""
        return len(self._interpreters)

    def op_names(self) -> set[str]:
        interpreter = next(iter(self._interpreters.values()))
        return {op["op_name"] for op in interpreter._get_ops_details()}

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        largest = self.batch_sizes[-1]
        if len(images) > largest:
            chunks = [images[i : i + largest] for i in range(0, len(images), largest)]
            return np.concatenate([self.predict(chunk) for chunk in chunks])
        count = len(images)
        batch = self.batch_sizes[bisect.bisect_left(self.batch_sizes, count)]
        if batch > count:  # pad with copies of the last image; their rows are dropped
            images = np.concatenate([images, np.repeat(images[-1:], batch - count, axis=0)])
        with self._lock:
            interpreter = self._interpreters.get(batch)
            if interpreter is None:
                interpreter = self._interpreters[batch] = self._make(batch)
            # Tensor indices are the same in every interpreter of one model file.
            interpreter.set_tensor(self._input["index"], self._quantize(images))
            interpreter.invoke()
            return self._dequantize(interpreter.get_tensor(self._output["index"]))[:count]

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


def open_backend(
    fmt: str, path: str | Path, num_threads: int | None = None, max_batch: int = 16
) -> Backend:
    """The backend for an artifact format; TFLite keeps interpreters for batches up to
    `max_batch` (larger ones are split)."""
    if fmt == "tflite":
        return TFLiteBackend(path, num_threads, max_batch)
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
