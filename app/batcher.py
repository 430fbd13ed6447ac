"""Dynamic batching: many concurrent requests, one backend call per batch.

Callers `submit` one image at a time and await a future. A dispatcher task takes the first
waiting image, waits at most `max_wait_s` from that image's arrival for the batch to fill up to
`max_batch_size`, stacks the batch ([N, H, W, 3]) and runs it on an idle replica (one
`predict` callable per inference worker, each in its own thread, off the event loop). With one
replica a batch forms only while the previous one runs, so batches grow with the load. Every
future of the batch gets its own row, or, when `predict` raises, the same `InferenceFailed`;
the dispatcher then goes on with the next batch.

Several replicas (INFERENCE_WORKERS) run batches concurrently: on a small CPU two single-thread
interpreters keep both cores busy even while decoding takes a slice of one of them, whereas one
interpreter split over both cores stalls whenever either core is taken (bench/serve.py). A
request that is alone, though, would leave all cores but one idle. `run_alone` serves it: with
nothing queued or running and `alone()` true (no other request in flight, not even one still
uploading or decoding), the request's `prepare` (its decode) and `lone` (an interpreter with a
thread per core) run right there, on the event loop's thread, as a plain FastAPI server would:
handing them to a thread and back cost 0.1-0.3 ms of a lone request's ~2.5 (docs/experiments.md).
Nothing else runs meanwhile; anything arriving waits the ~2 ms it takes, then runs as usual
(`prepare` declines images large enough to make that wait long). Before deciding, the request
lets the loop turn a few times, so that requests already received but not yet started count
in `alone()`: without that, while the loop ran one lone request every other client's request
waited unread, each next one found itself alone, and batching stopped under load.

Bounded and never hanging: the queue holds at most `queue_limit` images and `submit` raises
`Overloaded` at once when it is full (the service answers 503 + Retry-After). A caller that gives
up (deadline, client gone) cancels its futures and frees their places in the queue at once.
`close()` stops accepting, finishes what is queued and running, then stops the dispatcher.

The queue is a deque plus an event rather than `asyncio.Queue`, so the dispatcher can look at
the first item's arrival time and the depth without taking items out, and a timed wait can
never lose an item.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("app.batcher")

Predict = Callable[[np.ndarray], np.ndarray]
#: Largest batch that may run on the many-thread `lone` predict: a lone request's images.
LONE_MAX_BATCH = 2
#: Turns of the event loop a request waits before it may run alone (`Batcher.run_alone`).
LOOP_TURNS_BEFORE_ALONE = 3
#: Makes a lone request's images (decodes them), on the event loop's thread: [N, H, W, 3].
Prepare = Callable[[], np.ndarray]
#: Called after every backend call: (batch size, seconds in predict, whether it failed).
BatchHook = Callable[[int, float, bool], None]


class Overloaded(RuntimeError):
    """The queue is full, or the batcher is closing: try again later (503)."""


def _rows_for(outputs: np.ndarray, count: int) -> bool:
    """Whether a backend's answer is one row of probabilities per image."""
    return outputs.ndim == 2 and outputs.shape[0] == count


class NotForAlone(Exception):
    """Raised by a lone request's `prepare` to decline `run_alone` when one of its images would
    take long to decode while the event loop waits. That image is judged by its header, before
    its pixels are decoded; an image before it in the same request may already be decoded. The
    request then goes the usual way."""


class InferenceFailed(RuntimeError):
    """The backend raised while running the batch this item was in (500)."""


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future
    enqueued: float


@dataclass
class BatcherStats:
    batches: int = 0
    images: int = 0
    failed_batches: int = 0
    rejected: int = 0
    skipped_cancelled: int = 0
    lone_batches: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)


class Batcher:
    def __init__(
        self,
        predict: Predict | Sequence[Predict],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.002,
        queue_limit: int = 256,
        on_batch: BatchHook | None = None,
        lone: Predict | None = None,
        alone: Callable[[], bool] = lambda: True,
    ):
        replicas = [predict] if callable(predict) else list(predict)
        if not replicas or max_batch_size < 1 or queue_limit < 1 or max_wait_s < 0:
            raise ValueError(
                "need a predict callable; max_batch_size and queue_limit >= 1, max_wait_s >= 0"
            )
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_limit = queue_limit
        self.stats = BatcherStats()
        self._replicas = replicas
        self._lone = lone if len(replicas) > 1 else None
        self._alone = alone
        # Indices of replicas not running a batch; the dispatcher waits here before forming one.
        self._idle: asyncio.Queue[int] = asyncio.Queue()
        for index in range(len(replicas)):
            self._idle.put_nowait(index)
        self._running: set[asyncio.Task] = set()
        self._on_batch = on_batch
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._accepting = False
        self._closing = False
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("batcher already started")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(self._replicas), thread_name_prefix="inference"
        )
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")
        self._worker.add_done_callback(self._worker_done)
        self._accepting = True

    def _worker_done(self, task: asyncio.Task) -> None:
        """If the worker ever stops on its own, nothing may wait for it forever."""
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch worker crashed", exc_info=task.exception())
        self._accepting = False
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Overloaded("inference worker stopped"))

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting, finish queued work (at most `timeout` seconds), stop the worker."""
        self._accepting = False
        self._closing = True
        self._wakeup.set()
        worker = self._worker
        if worker is not None and not worker.done():
            try:
                await asyncio.wait_for(asyncio.shield(worker), timeout)
            except TimeoutError:
                logger.warning("batcher did not drain in %.1fs; failing the rest", timeout)
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
            except Exception:
                pass  # a crashed worker was already logged by _worker_done
        while self._queue:  # left over after a forced stop
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Overloaded("service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def workers(self) -> int:
        return len(self._replicas)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def depth(self) -> int:
        """Images waiting (not yet taken into a batch)."""
        return len(self._queue)

    # ---- callers ---------------------------------------------------------------------------

    def submit(self, image: np.ndarray) -> asyncio.Future:
        return self.submit_many([image])[0]

    def admit(self, count: int) -> None:
        """Raise `Overloaded` (counting `count` images rejected) unless `count` more fit now."""
        if not self._accepting:
            self.stats.rejected += count
            raise Overloaded("service is shutting down" if self._closing else "batcher not started")
        if len(self._queue) + count > self.queue_limit:
            self.stats.rejected += count
            raise Overloaded(
                f"inference queue is full ({len(self._queue)} waiting, limit {self.queue_limit})"
            )

    def submit_many(self, images: Sequence[np.ndarray]) -> list[asyncio.Future]:
        """Queue all images or none: raises `Overloaded` if they do not all fit."""
        self.admit(len(images))
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for image in images:
            future = loop.create_future()
            self._queue.append(_Item(image, future, now))
            futures.append(future)
        self._wakeup.set()
        return futures

    async def predict_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Submit, wait for every row; cancelling the caller cancels its queued items."""
        futures = self.submit_many(images)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:
                future.cancel()
            self._drop_cancelled()
            raise

    def _drop_cancelled(self) -> None:
        """Free the queue places of callers that gave up now, not when a batch would form."""
        if any(item.future.cancelled() for item in self._queue):
            kept = [item for item in self._queue if not item.future.cancelled()]
            self.stats.skipped_cancelled += len(self._queue) - len(kept)
            self._queue = collections.deque(kept)

    async def run_alone(
        self, prepare: Prepare, count: int
    ) -> tuple[list[np.ndarray], float] | None:
        """The rows of a lone request's `count` images, made by `prepare` and run on `lone` on
        the event loop's thread, and when `prepare` ended (`time.perf_counter()`); None (nothing
        run) unless the request is alone and nothing is queued or running, or when `prepare`
        declines (`NotForAlone`). `prepare`'s other exceptions (a bad image) propagate as they
        are; a failing `lone` raises `InferenceFailed`."""
        if self._lone is None or count > LONE_MAX_BATCH or not self._idle_and_alone():
            return None
        # A request received is read in one turn of the loop and started in the next.
        for _ in range(LOOP_TURNS_BEFORE_ALONE):
            await asyncio.sleep(0)
        if not self._idle_and_alone():
            return None
        self.admit(count)  # still refuses while closing
        try:
            images = prepare()
        except NotForAlone:
            return None
        prepared = time.perf_counter()
        self.stats.lone_batches += 1
        try:
            outputs = np.asarray(self._lone(images))
            if not _rows_for(outputs, count):
                raise ValueError(f"backend returned shape {outputs.shape} for {count} images")
        except Exception as exc:
            self._inference_failed(count, time.perf_counter() - prepared, exc)
            raise InferenceFailed(f"inference failed: {type(exc).__name__}") from None
        self._record(count, time.perf_counter() - prepared, failed=False)
        return list(outputs), prepared

    def _idle_and_alone(self) -> bool:
        return not self._queue and not self._running and self._alone()

    def _inference_failed(self, size: int, seconds: float, exc: Exception) -> None:
        logger.error("inference failed for a batch of %d", size, exc_info=exc)
        self._record(size, seconds, failed=True)

    # ---- worker ----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                replica = await self._idle.get()  # an idle replica, before the batch is formed
                batch = await self._next_batch()
                if not batch:
                    self._idle.put_nowait(replica)
                    if batch is None:
                        return
                    continue
                task = loop.create_task(self._run_batch(batch, self._replicas[replica]))
                self._running.add(task)
                task.add_done_callback(lambda t, r=replica: self._batch_done(t, r))
        except asyncio.CancelledError:  # forced stop: running batches fail now, not later
            for task in self._running:
                task.cancel()
            raise
        finally:
            # Drain: batches already handed to a replica finish (or fail) before we stop.
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)

    def _batch_done(self, task: asyncio.Task, replica: int) -> None:
        self._running.discard(task)
        self._idle.put_nowait(replica)

    async def _next_batch(self) -> list[_Item] | None:
        """Wait for a first item, then up to `max_wait_s` (from its arrival) for a full batch."""
        loop = asyncio.get_running_loop()
        while not self._queue:
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._queue[0].enqueued + self.max_wait_s
        while len(self._queue) < self.max_batch_size and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        batch: list[_Item] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # its caller gave up
                self.stats.skipped_cancelled += 1
                continue
            batch.append(item)
        return batch

    async def _run_batch(self, batch: list[_Item], predict: Predict) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            images = np.stack([item.image for item in batch])  # N x [H, W, 3] -> [N, H, W, 3]
            outputs = await loop.run_in_executor(self._executor, predict, images)
            outputs = np.asarray(outputs)
            if not _rows_for(outputs, len(batch)):
                raise ValueError(f"backend returned shape {outputs.shape} for {len(batch)} images")
        except asyncio.CancelledError:  # forced stop: nobody may wait on these forever
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Overloaded("service is shutting down"))
            raise
        except Exception as exc:  # whatever the backend raises fails this batch, and only it
            self._inference_failed(len(batch), time.perf_counter() - started, exc)
            error = InferenceFailed(f"inference failed: {type(exc).__name__}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        seconds = time.perf_counter() - started
        self._record(len(batch), seconds, failed=False)
        for item, row in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(row)

    def _record(self, size: int, seconds: float, failed: bool) -> None:
        self.stats.batches += 1
        self.stats.batch_sizes[size] += 1
        if failed:
            self.stats.failed_batches += 1
        else:
            self.stats.images += size
        if self._on_batch is not None:
            try:
                self._on_batch(size, seconds, failed)
            except Exception:  # metrics must never break inference
                logger.exception("batch hook failed")
