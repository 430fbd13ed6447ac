"""Host-wide inference slots: at most N batches run at once across every server process.

Each uvicorn process has its own batcher and inference workers. The kernel does not spread
connections evenly over the processes, so every process gets as many workers as the host has
cores, to use them all when it holds most of the connections. When the load is even, though,
that is twice as many busy inference threads as cores, and they slow each other down. A slot is
a lock file that one batch at a time holds while it runs (`fcntl.flock`, shared by every process
that opens the same file, released by the kernel if a process dies): worker i of every process
uses slot i mod N, so at most N batches run at once on the host, from whichever processes have
work.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger("app.slots")

Predict = Callable[[np.ndarray], np.ndarray]


class Slot:
    """One lock file; `wrap(predict)` holds it around every call."""

    def __init__(self, path: Path):
        self.path = path
        # Read-only is enough for flock, and works on a file another user created.
        self._fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)

    def wrap(self, predict: Predict) -> Predict:
        fd = self._fd

        def predict_in_slot(images: np.ndarray) -> np.ndarray:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks without the GIL
            try:
                return predict(images)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

        return predict_in_slot

    def close(self) -> None:
        os.close(self._fd)


def open_slots(directory: Path, count: int) -> list[Slot]:
    """`count` slots in `directory` (created); [] for 0, or when it cannot be used (logged)."""
    if count <= 0:
        return []
    slots: list[Slot] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            slots.append(Slot(directory / f"slot-{index}.lock"))
    except OSError as exc:
        logger.warning("inference slots off: cannot use %s (%s)", directory, exc)
        for slot in slots:
            slot.close()
        return []
    return slots
