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

from app.slots import Slots, open_slots
from tests.serving_helpers import image_bytes, make_settings, serve

pytest_plugins = ["tests.serving_fixtures"]

HOLD_SLOT = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin, or kills us
"""


def echo(images: np.ndarray) -> np.ndarray:
    return images


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
            for path in paths:  # the one this call holds is the one nobody else can lock now
                fd = os.open(path, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    if path != paths[0]:
                        seen.append(path.name)
                finally:
                    os.close(fd)
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
