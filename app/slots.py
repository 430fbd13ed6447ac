"""Host-wide inference slots: at most N batches run at once across every server process.

Each uvicorn process has its own batcher and inference workers. The kernel does not spread
connections evenly over the processes, so every process gets as many workers as the host has
cores, to use them all when it holds most of the connections. When the load is even, though,
that is twice as many busy inference threads as cores, and they slow each other down. A slot is
a lock file that one batch at a time holds while it runs (`fcntl.flock`, shared by every process
that opens the same file, released by the kernel if a process dies), so at most N batches run
at once on the host, from whichever processes have work.

A batch takes any free slot, its worker's own first (worker i prefers slot i mod N); only when
all are taken does it wait, on its own. Waiting on a fixed slot while another one was free left
a core idle whenever the two processes' batches picked the same slot.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger("app.slots")

Predict = Callable[[np.ndarray], np.ndarray]


class Slots:
    """One inference worker's handles on all the slot files; `wrap(predict)` runs in one.

    Every worker opens the files itself: a flock belongs to an open file description, so
    workers of one process exclude each other only through descriptors of their own.
    """

    def __init__(self, paths: Sequence[Path], preferred: int = 0):
        self.paths = list(paths)
        self._fds: list[int] = []
        try:
            for path in self.paths:
                # Read-only is enough for flock, and works on a file another user created.
                self._fds.append(os.open(path, os.O_RDONLY | os.O_CREAT, 0o644))
        except OSError:
            self.close()
            raise
        first = preferred % len(self._fds)
        self._order = self._fds[first:] + self._fds[:first]

    def acquire(self) -> int:
        """Lock a free slot (preferred first), or wait for the preferred one; its descriptor."""
        for fd in self._order:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                continue
        fd = self._order[0]
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks without the GIL
        return fd

    def wrap(self, predict: Predict) -> Predict:
        def predict_in_slot(images: np.ndarray) -> np.ndarray:
            fd = self.acquire()
            try:
                return predict(images)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

        return predict_in_slot

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds, self._order = [], []


def open_slots(directory: Path, count: int, workers: int) -> list[Slots]:
    """One `Slots` per worker over `count` files in `directory` (created); [] for 0, or when
    they cannot be used (logged): all or none, nothing left open."""
    if count <= 0:
        return []
    handles: list[Slots] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"slot-{index}.lock" for index in range(count)]
        for worker in range(workers):
            handles.append(Slots(paths, preferred=worker))
    except OSError as exc:
        logger.warning("inference slots off: cannot use %s (%s)", directory, exc)
        for slots in handles:
            slots.close()
        return []
    return handles
