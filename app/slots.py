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

A lone request may use every core (IDLE_INFERENCE_THREADS): when it arrived with no other
request in flight on the host and none has come since (`HostActivity`), and every slot is free,
its batch takes all the slots and runs on an interpreter with one thread per core. Under any
load batches keep to one thread each, which gets the most images through. Free slots alone are
not enough to go wide: with two clients, one client's wide batch made the other's wait, and
2-client throughput fell by 30%. It is off by default: it helps only requests sent back to
back, and after a pause the idle cores wake slowly (bench/lone_request.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger("app.slots")

Predict = Callable[[np.ndarray], np.ndarray]

#: Largest batch that may run wide. A lone request is one or two images at most of the time, and
#: every batch size needs an interpreter of its own, so the wide interpreters stay few.
WIDE_MAX_BATCH = 2


class HostActivity:
    """Whether any other server process sharing `path` has requests in flight.

    While this process has any, it holds a POSIX read lock on the file's first byte. POSIX
    record locks belong to a process and only other processes' locks conflict with a query, so
    one `F_GETLK` for a write lock tells whether another process is busy. Nobody ever takes the
    write lock, so taking the read lock never waits. The kernel drops the locks of a process
    that dies.
    """

    _QUERY = struct.Struct("hhqqi4x")  # struct flock (Linux): type, whence, start, len, pid

    def __init__(self, path: Path):
        # Read-only is enough to take a read lock and to query, as for the slots.
        self._fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        self.in_flight = 0  # changed by the event loop only
        # Whether the request in flight arrived with no other in flight anywhere. Free slots at
        # batch time are not enough: two clients' requests alternate, each briefly alone.
        self._arrived_alone = False

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count one request of this process in flight for the duration."""
        self.in_flight += 1
        self._arrived_alone = False
        try:
            if self.in_flight == 1:
                try:
                    self._arrived_alone = not self.others_busy()
                    fcntl.lockf(self._fd, fcntl.LOCK_SH, 1, 0)
                except OSError:  # a lock the file system refuses: the request stays on one core
                    self._arrived_alone = False
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                with contextlib.suppress(OSError):
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)

    def others_busy(self) -> bool:
        query = self._QUERY.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        answer = fcntl.fcntl(self._fd, fcntl.F_GETLK, query)
        return self._QUERY.unpack(answer)[0] != fcntl.F_UNLCK

    def alone(self) -> bool:
        """One request in flight on the whole host, which arrived when none was."""
        return self.in_flight == 1 and self._arrived_alone and not self.others_busy()

    def close(self) -> None:
        os.close(self._fd)


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

    def take_the_rest(self, held: int) -> list[int] | None:
        """Lock every slot but `held` without waiting: all of them, or None with none kept."""
        taken: list[int] = []
        for fd in self._fds:
            if fd == held:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                for other in taken:
                    fcntl.flock(other, fcntl.LOCK_UN)
                return None
            taken.append(fd)
        return taken

    def wrap(
        self,
        predict: Predict,
        wide: Predict | None = None,
        alone: Callable[[], bool] = lambda: False,
    ) -> Predict:
        """`predict` run in a slot; a batch of at most WIDE_MAX_BATCH images for which `alone()`
        holds and that gets every slot runs on `wide` instead."""

        def predict_in_slot(images: np.ndarray) -> np.ndarray:
            fd = self.acquire()
            rest = None
            if wide is not None and len(images) <= WIDE_MAX_BATCH and alone():
                rest = self.take_the_rest(fd)
            try:
                return (predict if rest is None else wide)(images)
            finally:
                for other in rest or ():
                    fcntl.flock(other, fcntl.LOCK_UN)
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
