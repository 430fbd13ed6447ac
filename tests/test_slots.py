"""Host-wide inference slots: lock files that cap the batches running at once over processes."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from app.slots import WIDE_MAX_BATCH, HostActivity, Slots, open_slots
from contract.runtime import TFLiteBackend
from tests.serving_helpers import REPO, image_bytes, make_settings, serve

pytest_plugins = ["tests.serving_fixtures"]

HOLD_SLOT = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin, or kills us
"""


BUSY_ELSEWHERE = """
import sys
from pathlib import Path
from app.slots import HostActivity
with HostActivity(Path(sys.argv[1])).busy():
    print("busy", flush=True)
    sys.stdin.read()
"""


def echo(images: np.ndarray) -> np.ndarray:
    return images


def locked_by_someone(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_two_holders_of_one_slot_take_turns(tmp_path):
    # Two workers of one process: each has its own descriptor, so flock excludes them too.
    first, second = Slots([tmp_path / "slot-0.lock"]), Slots([tmp_path / "slot-0.lock"])
    inside, release = threading.Event(), threading.Event()
    order: list[str] = []

    def hold(images):
        order.append("first in")
        inside.set()
        release.wait(5)
        order.append("first out")
        return images

    holder = threading.Thread(target=first.wrap(hold), args=(np.zeros(1),))
    holder.start()
    assert inside.wait(5)
    waiter = threading.Thread(target=lambda: order.append(second.wrap(lambda x: "second")(0)))
    waiter.start()
    time.sleep(0.3)
    assert order == ["first in"]  # the second caller waits for the slot
    release.set()
    holder.join(5)
    waiter.join(5)
    assert order == ["first in", "first out", "second"]
    first.close()
    second.close()


def test_a_slot_held_by_another_process_waits_until_that_process_dies(tmp_path):
    path = tmp_path / "slot-0.lock"
    other = subprocess.Popen([sys.executable, "-c", HOLD_SLOT, str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "held"
        slot = Slots([path])
        done = threading.Event()
        runner = threading.Thread(target=lambda: (slot.wrap(echo)(np.ones(2)), done.set()))
        runner.start()
        assert not done.wait(0.3)
        other.kill()  # the kernel releases a dead process's locks: no slot is lost for good
        assert done.wait(5)
        runner.join(5)
        slot.close()
    finally:
        other.kill()
        other.wait(5)


def test_a_batch_takes_any_free_slot_and_waits_only_when_all_are_taken(tmp_path):
    paths = [tmp_path / "slot-0.lock", tmp_path / "slot-1.lock"]

    def hold_elsewhere(path):
        command = [sys.executable, "-c", HOLD_SLOT, str(path)]
        other = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        others.append(other)
        assert other.stdout.readline().strip() == "held"

    others: list[subprocess.Popen] = []
    worker = Slots(paths, preferred=0)
    try:
        hold_elsewhere(paths[0])  # another process has slot 0
        seen: list[str] = []

        def which_slot(images):
            # The one this call holds is one nobody else can lock now (slot 0 is held elsewhere).
            seen.extend(path.name for path in paths[1:] if locked_by_someone(path))
            return images

        first = threading.Thread(target=worker.wrap(which_slot), args=(np.zeros(1),))
        first.start()
        first.join(5)
        assert not first.is_alive()  # it did not wait for slot 0: slot 1 was free
        assert seen == ["slot-1.lock"]
        hold_elsewhere(paths[1])  # now both are taken
        done = threading.Event()
        runner = threading.Thread(target=lambda: (worker.wrap(echo)(np.ones(2)), done.set()))
        runner.start()
        assert not done.wait(0.3)
        others[1].kill()  # whichever slot frees up first, the batch gets one
        others[0].kill()
        assert done.wait(5)
        runner.join(5)
    finally:
        worker.close()
        for other in others:
            other.kill()
            other.wait(5)


def test_open_slots(tmp_path, caplog):
    assert open_slots(tmp_path / "none", 0, workers=2) == []
    handles = open_slots(tmp_path / "slots", 3, workers=2)
    assert len(handles) == 2  # one per worker, each over all three files
    assert sorted(p.name for p in (tmp_path / "slots").iterdir()) == [
        "slot-0.lock",
        "slot-1.lock",
        "slot-2.lock",
    ]
    for slots in handles:
        assert len(slots.paths) == 3
        slots.close()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="app.slots"):
        assert open_slots(blocker / "slots", 2, workers=2) == []  # serving goes on without a cap
    assert "inference slots off" in caplog.text
    (tmp_path / "half" / "slot-1.lock").mkdir(parents=True)  # the second slot cannot open
    before = len(os.listdir("/proc/self/fd"))
    assert open_slots(tmp_path / "half", 2, workers=2) == []  # all or none
    assert len(os.listdir("/proc/self/fd")) == before  # and no descriptor left open


@pytest.mark.anyio
async def test_the_service_runs_every_batch_in_a_slot(tiny_model_dir, tmp_path):
    settings = make_settings(
        tiny_model_dir, inference_workers=2, inference_slots=1, inference_slots_dir=tmp_path
    )
    async with serve(settings) as served:
        info = (await served.client.get("/model-info")).json()
        assert info["batching"]["inference_slots"] == 1
        # Take the only slot from outside (as another server process would).
        fd = os.open(tmp_path / "slot-0.lock", os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            request = asyncio.ensure_future(
                served.client.post(
                    "/predict",
                    content=image_bytes("green"),
                    headers={"Content-Type": "image/jpeg"},
                )
            )
            await asyncio.sleep(0.5)
            assert not request.done()  # decoded and queued, waiting for the slot
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        response = await asyncio.wait_for(request, 10)
        assert response.status_code == 200
        assert response.json()["predictions"][0]["label"] == "green"


def test_host_activity_tells_a_request_alone_on_the_host(tmp_path):
    path = tmp_path / "busy.lock"
    here = HostActivity(path)
    assert not here.others_busy() and not here.alone()  # nothing in flight
    with here.busy():
        assert here.alone()
        with here.busy():  # a second request of this process
            assert not here.alone()
        assert not here.alone()  # the one left did not arrive alone
    with here.busy():
        assert here.alone()  # arrived with nothing else in flight
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    other = subprocess.Popen([sys.executable, "-c", BUSY_ELSEWHERE, str(path)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "busy"
        assert here.others_busy()
        with here.busy():
            assert not here.alone()  # another process has a request in flight
        other.kill()  # the kernel drops a dead process's lock
        other.wait(5)
        assert not here.others_busy()
    finally:
        other.kill()
        other.wait(5)
        here.close()


def test_a_lone_small_batch_takes_every_slot_and_runs_wide(tmp_path):
    paths = [tmp_path / "slot-0.lock", tmp_path / "slot-1.lock"]
    worker = Slots(paths)
    ran: list[tuple[str, list[bool]]] = []
    lone = [True]

    def runner(name):
        def predict(images):
            ran.append((name, [locked_by_someone(p) for p in paths]))
            return images

        return predict

    run = worker.wrap(runner("narrow"), runner("wide"), alone=lambda: lone[0])
    run(np.zeros(WIDE_MAX_BATCH))
    run(np.zeros(WIDE_MAX_BATCH + 1))  # too big a batch for the wide interpreters
    lone[0] = False
    run(np.zeros(1))
    assert ran == [("wide", [True, True]), ("narrow", [True, False]), ("narrow", [True, False])]
    lone[0] = True
    command = [sys.executable, "-c", HOLD_SLOT, str(paths[1])]
    other = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        ran.clear()
        run(np.zeros(1))  # alone, but a slot is taken: one thread, in the free slot
        assert ran == [("narrow", [True, True])]
    finally:
        other.kill()
        other.wait(5)
    assert not any(locked_by_someone(p) for p in paths)  # every slot given back
    worker.close()


@pytest.mark.anyio
async def test_the_service_runs_a_lone_request_on_every_core(tiny_model_dir, tmp_path, monkeypatch):
    calls: list[tuple[int | None, int]] = []  # (interpreter threads, batch size)
    predict = TFLiteBackend.predict

    def spy(self, images):
        calls.append((self.num_threads, len(images)))
        return predict(self, images)

    monkeypatch.setattr(TFLiteBackend, "predict", spy)
    settings = make_settings(tiny_model_dir, inference_workers=2, inference_slots=2,
                             idle_inference_threads=2, inference_slots_dir=tmp_path)  # fmt: skip
    async with serve(settings) as served:
        info = (await served.client.get("/model-info")).json()
        assert info["batching"]["idle_inference_threads"] == 2
        photo, headers = image_bytes("green"), {"Content-Type": "image/jpeg"}
        calls.clear()  # the warm-up's
        lone = await served.client.post("/predict", content=photo, headers=headers)
        assert calls == [(2, 1)]
        calls.clear()
        burst = await asyncio.gather(
            *(served.client.post("/predict", content=photo, headers=headers) for _ in range(6))
        )
        assert calls and all(threads == 1 for threads, _ in calls)  # never alone
    wide_scores = lone.json()["predictions"][0]["top_k"]
    for response in burst:
        narrow_scores = response.json()["predictions"][0]["top_k"]
        assert [s["label"] for s in narrow_scores] == [s["label"] for s in wide_scores]
        assert np.allclose([s["score"] for s in narrow_scores],
                           [s["score"] for s in wide_scores], atol=1e-5)  # fmt: skip
