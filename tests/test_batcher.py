"""The batcher on its own, with fake backends: batching, bounds, errors, cancellation, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.batcher import Batcher, InferenceFailed, NotForAlone, Overloaded

pytest_plugins = ["tests.serving_fixtures"]
pytestmark = pytest.mark.anyio

POISON = 13


def image(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, dtype=np.uint8)


class FakeBackend:
    """Row i of the answer is [value of image i, batch size]; POISON makes the batch raise."""

    def __init__(self, gate: threading.Event | None = None, delay: float = 0.0):
        self.gate = gate
        self.delay = delay
        self.calls: list[list[int]] = []
        self.entered = threading.Event()

    def predict(self, images: np.ndarray) -> np.ndarray:
        assert images.shape[1:] == (2, 2, 3)  # N x [H, W, 3] stacked
        values = [int(v) for v in images[:, 0, 0, 0]]
        self.calls.append(values)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test never opened the gate"
        if self.delay:
            time.sleep(self.delay)
        if POISON in values:
            raise RuntimeError("poisoned batch")
        return np.array([[v, len(values)] for v in values], dtype=np.float32)


async def started(backend: FakeBackend, **options) -> Batcher:
    batcher = Batcher(backend.predict, **options)
    batcher.start()
    return batcher


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


async def test_each_caller_gets_its_own_row_in_full_batches():
    backend = FakeBackend()
    batcher = await started(backend, max_batch_size=4, max_wait_s=0.05)
    try:
        rows = await batcher.predict_many([image(v) for v in range(10)])
    finally:
        await batcher.close()
    assert [int(r[0]) for r in rows] == list(range(10))
    assert backend.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batcher.stats.batch_sizes == {4: 2, 2: 1}
    assert batcher.stats.images == 10 and batcher.stats.batches == 3


async def test_concurrent_callers_share_batches():
    backend = FakeBackend()
    batcher = await started(backend, max_batch_size=8, max_wait_s=0.2)
    try:
        rows = await asyncio.gather(*(batcher.submit(image(v)) for v in range(8)))
    finally:
        await batcher.close()
    assert [int(r[0]) for r in rows] == list(range(8))
    assert backend.calls == [list(range(8))]  # a full batch goes at once, not after the wait


async def test_waits_at_most_max_wait_after_the_first_item():
    backend = FakeBackend()
    batcher = await started(backend, max_batch_size=8, max_wait_s=0.15)
    try:
        start = time.perf_counter()
        first = batcher.submit(image(1))
        await asyncio.sleep(0.03)
        second = batcher.submit(image(2))  # arrives inside the window: same batch
        await asyncio.gather(first, second)
        elapsed = time.perf_counter() - start
    finally:
        await batcher.close()
    assert backend.calls == [[1, 2]]
    assert 0.12 <= elapsed < 1.0, elapsed  # the window is counted from the first item


async def test_no_wait_and_batching_off():
    backend = FakeBackend()
    batcher = await started(backend, max_batch_size=1, max_wait_s=0.0)
    try:
        start = time.perf_counter()
        rows = await asyncio.gather(*(batcher.submit(image(v)) for v in range(5)))
        elapsed = time.perf_counter() - start
    finally:
        await batcher.close()
    assert [int(r[0]) for r in rows] == list(range(5))
    assert all(len(call) == 1 for call in backend.calls)
    assert elapsed < 1.0


async def test_full_queue_raises_overloaded_at_once():
    gate = threading.Event()
    backend = FakeBackend(gate)
    batcher = await started(backend, max_batch_size=1, max_wait_s=0.0, queue_limit=3)
    try:
        busy = batcher.submit(image(0))
        await asyncio.to_thread(backend.entered.wait, 5)  # the worker holds item 0
        waiting = [batcher.submit(image(v)) for v in (1, 2, 3)]
        assert batcher.depth == 3
        start = time.perf_counter()
        with pytest.raises(Overloaded, match="queue is full"):
            batcher.submit(image(4))
        with pytest.raises(Overloaded):
            batcher.submit_many([image(5), image(6)])  # all or nothing
        assert time.perf_counter() - start < 0.1
        assert batcher.depth == 3 and batcher.stats.rejected == 3
        gate.set()
        rows = await asyncio.gather(busy, *waiting)
    finally:
        gate.set()
        await batcher.close()
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]


async def test_a_failing_batch_fails_only_its_own_callers():
    backend = FakeBackend()
    batcher = await started(backend, max_batch_size=2, max_wait_s=0.05)
    try:
        futures = batcher.submit_many([image(POISON), image(1), image(2), image(3)])
        results = await asyncio.gather(*futures, return_exceptions=True)
        after = await batcher.submit(image(4))  # the worker is still alive
    finally:
        await batcher.close()
    assert backend.calls[:2] == [[POISON, 1], [2, 3]]
    assert all(isinstance(r, InferenceFailed) for r in results[:2])
    assert "RuntimeError" in str(results[0])
    assert [int(r[0]) for r in results[2:]] == [2, 3]
    assert int(after[0]) == 4
    assert batcher.stats.failed_batches == 1


async def test_wrong_output_shape_fails_the_batch():
    batcher = Batcher(lambda images: np.zeros((1, 3), np.float32), max_wait_s=0.01)
    batcher.start()
    try:
        futures = batcher.submit_many([image(1), image(2)])
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, InferenceFailed) for r in results)
    finally:
        await batcher.close()


async def test_cancelled_items_are_skipped_without_breaking_others():
    gate = threading.Event()
    backend = FakeBackend(gate)
    batcher = await started(backend, max_batch_size=4, max_wait_s=0.0)
    try:
        busy = batcher.submit(image(0))
        await asyncio.to_thread(backend.entered.wait, 5)
        gone, kept = batcher.submit(image(1)), batcher.submit(image(2))
        gone.cancel()  # its caller hit the deadline or disconnected
        gate.set()
        assert int((await kept)[0]) == 2
        await busy
    finally:
        gate.set()
        await batcher.close()
    assert backend.calls == [[0], [2]]
    assert batcher.stats.skipped_cancelled == 1


async def test_cancelling_a_caller_cancels_its_queued_items():
    gate = threading.Event()
    backend = FakeBackend(gate)
    batcher = await started(backend, max_batch_size=1, max_wait_s=0.0)
    try:
        busy = batcher.submit(image(0))
        await asyncio.to_thread(backend.entered.wait, 5)
        caller = asyncio.create_task(batcher.predict_many([image(1), image(2)]))
        await wait_until(lambda: batcher.depth == 2)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await asyncio.shield(caller)
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        assert batcher.depth == 0  # their places are free at once, before any batch forms
        assert batcher.stats.skipped_cancelled == 2
        gate.set()
        await busy
        assert int((await batcher.submit(image(3)))[0]) == 3
    finally:
        gate.set()
        await batcher.close()
    assert backend.calls == [[0], [3]]


async def test_close_stops_accepting_then_drains_queued_work():
    gate = threading.Event()
    backend = FakeBackend(gate)
    batcher = await started(backend, max_batch_size=2, max_wait_s=0.0)
    futures = [batcher.submit(image(v)) for v in range(5)]
    await asyncio.to_thread(backend.entered.wait, 5)
    closing = asyncio.create_task(batcher.close(timeout=10))
    await asyncio.sleep(0.01)
    assert not batcher.accepting
    with pytest.raises(Overloaded, match="shutting down"):
        batcher.submit(image(9))
    assert not closing.done()
    gate.set()
    await closing
    rows = [future.result() for future in futures]
    assert [int(r[0]) for r in rows] == list(range(5))


async def test_close_with_a_stuck_backend_fails_the_rest_after_the_timeout():
    gate = threading.Event()
    backend = FakeBackend(gate)
    batcher = await started(backend, max_batch_size=1, max_wait_s=0.0)
    try:
        futures = [batcher.submit(image(v)) for v in range(3)]
        await asyncio.to_thread(backend.entered.wait, 5)
        await batcher.close(timeout=0.1)
        # The stuck batch's caller too: nobody may wait on a future that never resolves.
        for future in futures:
            assert isinstance(future.exception(), Overloaded)
    finally:
        gate.set()  # let the stuck thread finish


async def test_submit_before_start_and_bad_options():
    batcher = Batcher(FakeBackend().predict)
    with pytest.raises(Overloaded, match="not started"):
        batcher.submit(image(1))
    with pytest.raises(ValueError):
        Batcher(FakeBackend().predict, max_batch_size=0)
    with pytest.raises(ValueError):
        Batcher(FakeBackend().predict, queue_limit=0)
    with pytest.raises(ValueError):
        Batcher([])


async def test_a_broken_batch_hook_does_not_break_inference():
    def hook(size: int, seconds: float, failed: bool) -> None:
        raise RuntimeError("metrics down")

    batcher = Batcher(FakeBackend().predict, max_wait_s=0.0, on_batch=hook)
    batcher.start()
    try:
        assert int((await batcher.submit(image(7)))[0]) == 7
    finally:
        await batcher.close()


async def test_hook_sees_sizes_times_and_failures():
    seen = []
    batcher = Batcher(
        FakeBackend().predict,
        max_batch_size=3,
        max_wait_s=0.05,
        on_batch=lambda size, seconds, failed: seen.append((size, failed, seconds >= 0)),
    )
    batcher.start()
    try:
        await asyncio.gather(*batcher.submit_many([image(1), image(2), image(3)]))
        await asyncio.gather(batcher.submit(image(POISON)), return_exceptions=True)
    finally:
        await batcher.close()
    assert seen == [(3, False, True), (1, True, True)]


# ---- several inference workers (replicas) ----------------------------------------------------


class Replica(FakeBackend):
    """A fake backend that notes how many of its own calls overlap (must never exceed one)."""

    def __init__(self, gate: threading.Event | None = None):
        super().__init__(gate)
        self.inside = 0
        self.most_inside = 0
        self.lock = threading.Lock()

    def predict(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            return super().predict(images)
        finally:
            with self.lock:
                self.inside -= 1


def started_replicas(max_batch_size: int) -> tuple[threading.Event, list[Replica], Batcher]:
    """Two gated replicas behind one started batcher (no wait); the gate starts shut."""
    gate = threading.Event()
    replicas = [Replica(gate), Replica(gate)]
    batcher = Batcher([r.predict for r in replicas], max_batch_size=max_batch_size, max_wait_s=0.0)
    batcher.start()
    return gate, replicas, batcher


async def test_replicas_run_batches_at_the_same_time_each_one_batch_at_most():
    gate, replicas, batcher = started_replicas(max_batch_size=2)
    try:
        futures = [batcher.submit(image(v)) for v in range(6)]
        # Both replicas hold a batch at once while the gate is shut; the rest stays queued.
        await asyncio.to_thread(replicas[0].entered.wait, 5)
        await asyncio.to_thread(replicas[1].entered.wait, 5)
        assert batcher.depth == 6 - sum(len(r.calls[0]) for r in replicas)
        gate.set()
        rows = await asyncio.gather(*futures)
    finally:
        gate.set()
        await batcher.close()
    assert [int(r[0]) for r in rows] == list(range(6))  # every caller still gets its own row
    assert all(r.most_inside == 1 for r in replicas)  # an interpreter is never shared
    assert sorted(v for r in replicas for call in r.calls for v in call) == list(range(6))
    assert batcher.workers == 2


async def test_close_drains_batches_running_on_every_replica():
    gate, replicas, batcher = started_replicas(max_batch_size=1)
    futures = [batcher.submit(image(v)) for v in range(4)]
    await asyncio.to_thread(replicas[1].entered.wait, 5)
    closing = asyncio.create_task(batcher.close(timeout=10))
    await asyncio.sleep(0.02)
    assert not closing.done()  # two batches are held in the replicas
    gate.set()
    await closing
    assert [int(f.result()[0]) for f in futures] == list(range(4))


async def test_forced_close_fails_running_and_queued_batches():
    gate, replicas, batcher = started_replicas(max_batch_size=1)
    try:
        futures = [batcher.submit(image(v)) for v in range(4)]
        await asyncio.to_thread(replicas[1].entered.wait, 5)
        await batcher.close(timeout=0.1)
        assert all(isinstance(f.exception(), Overloaded) for f in futures)
    finally:
        gate.set()  # let the stuck threads finish


def lone_batcher(wide, alone=lambda: True, **options) -> tuple[Batcher, list[str]]:
    """Two narrow replicas that log their calls, and `wide` as the lone request's predict."""
    calls: list[str] = []

    def narrow(images):
        calls.append(f"narrow{len(images)}")
        return np.zeros((len(images), 2), np.float32)

    def logged_wide(images):
        calls.append(f"wide{len(images)}")
        return wide(images)

    batcher = Batcher([narrow, narrow], max_batch_size=4, max_wait_s=0, lone=logged_wide,
                      alone=alone, **options)  # fmt: skip
    batcher.start()
    return batcher, calls


async def test_a_lone_request_decodes_and_runs_on_the_wide_predict_on_the_loop_thread():
    threads: list[str] = []

    def wide(images):
        threads.append(threading.current_thread().name)
        return np.ones((len(images), 2), np.float32)

    def prepare():
        threads.append(threading.current_thread().name)
        return np.zeros((1, 2, 2, 3), np.uint8)

    batcher, calls = lone_batcher(wide)
    hook: list[tuple[int, bool]] = []
    batcher._on_batch = lambda size, seconds, failed: hook.append((size, failed))
    try:
        rows, prepared_at = await batcher.run_alone(prepare, 1)
        assert rows[0][0] == 1.0 and prepared_at <= time.perf_counter()
        # No hand-off: decode and inference ran in the caller's thread, the event loop's.
        assert threads == [threading.current_thread().name] * 2
        assert hook == [(1, False)] and batcher.stats.lone_batches == 1
        # Several images in flight run on the narrow replicas as usual.
        assert (await batcher.predict_many([image(1), image(2)]))[0][0] == 0.0
        assert calls == ["wide1", "narrow2"]
    finally:
        await batcher.close()


async def test_a_request_received_but_not_yet_started_keeps_the_next_from_running_alone():
    # As uvicorn does: a callback reads the request, the task it creates starts a turn later.
    in_flight = {"n": 1}
    batcher, calls = lone_batcher(lambda images: np.ones((len(images), 2), np.float32),
                                  alone=lambda: in_flight["n"] <= 1)  # fmt: skip

    async def request_starts():
        in_flight["n"] += 1

    loop = asyncio.get_running_loop()
    try:
        loop.call_soon(lambda: loop.create_task(request_starts()))
        assert await batcher.run_alone(lambda: np.zeros((1, 2, 2, 3), np.uint8), 1) is None
        assert in_flight["n"] == 2 and calls == []
    finally:
        await batcher.close()


async def test_an_image_queued_during_the_turns_makes_run_alone_decline():
    batcher, calls = lone_batcher(lambda images: np.ones((len(images), 2), np.float32))
    loop = asyncio.get_running_loop()
    try:
        queued: list[asyncio.Future] = []
        loop.call_soon(lambda: queued.append(batcher.submit(image(1))))
        assert await batcher.run_alone(lambda: np.zeros((1, 2, 2, 3), np.uint8), 1) is None
        assert (await queued[0])[0] == 0.0 and calls == ["narrow1"]
    finally:
        await batcher.close()


async def test_a_caller_cancelled_during_the_turns_runs_and_holds_nothing():
    batcher, calls = lone_batcher(lambda images: np.ones((len(images), 2), np.float32))
    prepared: list[int] = []

    def prepare():
        prepared.append(1)
        return np.zeros((1, 2, 2, 3), np.uint8)

    try:
        caller = asyncio.ensure_future(batcher.run_alone(prepare, 1))
        await asyncio.sleep(0)  # inside its turns
        caller.cancel()  # its deadline passed, or its client went away
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert prepared == [] and calls == [] and batcher.stats.batches == 0
        assert (await batcher.run_alone(prepare, 1))[0][0][0] == 1.0  # nothing was held
    finally:
        await batcher.close()


async def test_run_alone_declines_while_a_batch_runs():
    gate, replicas, batcher = started_replicas(max_batch_size=1)
    batcher._lone = lambda images: np.ones((len(images), 2), np.float32)
    try:
        future = batcher.submit(image(1))
        await asyncio.to_thread(replicas[0].entered.wait, 5)
        assert await batcher.run_alone(lambda: np.zeros((1, 2, 2, 3), np.uint8), 1) is None
        gate.set()
        await future
        await wait_until(lambda: not batcher._running)  # the batch's task has ended
        assert await batcher.run_alone(lambda: np.zeros((1, 2, 2, 3), np.uint8), 1) is not None
    finally:
        gate.set()
        await batcher.close()


async def test_run_alone_declines_without_running_anything_unless_alone_and_idle():
    in_flight = {"n": 2}
    batcher, calls = lone_batcher(lambda images: np.ones((len(images), 2), np.float32),
                                  alone=lambda: in_flight["n"] <= 1)  # fmt: skip
    prepared: list[int] = []

    def prepare():
        prepared.append(1)
        return np.zeros((1, 2, 2, 3), np.uint8)

    try:
        assert await batcher.run_alone(prepare, 1) is None  # another request in flight
        in_flight["n"] = 1
        assert await batcher.run_alone(prepare, 3) is None  # more images than the lone batch
        assert prepared == [] and calls == []
        assert (await batcher.run_alone(prepare, 1))[0][0][0] == 1.0

        def declines():
            prepared.append(2)
            raise NotForAlone

        assert await batcher.run_alone(declines, 1) is None  # too large: the usual way
        assert len(await batcher.predict_many([image(1)])) == 1  # nothing held
        assert batcher.stats.lone_batches == 1
        solo = Batcher(lambda images: np.zeros((len(images), 2)), lone=lambda images: images)
        solo.start()
        assert await solo.run_alone(prepare, 1) is None  # one replica: no lone predict
        await solo.close()
    finally:
        await batcher.close()


async def test_run_alone_failures_prepare_raises_as_is_inference_fails_the_request():
    def broken(images):
        raise RuntimeError("backend broke")

    batcher, _ = lone_batcher(broken)
    hook: list[tuple[int, bool]] = []
    batcher._on_batch = lambda size, seconds, failed: hook.append((size, failed))

    def bad_image():
        raise ValueError("not an image")

    try:
        with pytest.raises(ValueError, match="not an image"):
            await batcher.run_alone(bad_image, 1)
        assert hook == []  # a bad image is not an inference failure
        with pytest.raises(InferenceFailed):
            await batcher.run_alone(lambda: np.zeros((1, 2, 2, 3), np.uint8), 1)
        assert hook == [(1, True)] and batcher.stats.failed_batches == 1
        # Nothing is left held: the next batch runs.
        assert len(await batcher.predict_many([image(1)])) == 1
    finally:
        await batcher.close()


async def test_run_alone_refuses_once_closing():
    batcher, calls = lone_batcher(lambda images: np.ones((len(images), 2), np.float32))
    await batcher.close()
    with pytest.raises(Overloaded):
        await batcher.run_alone(lambda: np.zeros((1, 2, 2, 3)), 1)
    assert calls == []
