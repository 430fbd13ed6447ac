"""Benchmarks on a machine that is also training: pause the training while they measure.

`--pause PID` (bench.serve, bench.inference) stops that process (SIGSTOP) for the benchmark
and resumes it (SIGCONT) afterwards, however the benchmark ends; the run's header says so.
A paused training run loses nothing: it continues where it stopped. The header also prints how
busy the CPUs were in the second before the benchmark started, so a table taken beside other
work shows it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs' time spent busy (not idle or waiting) over `seconds`, from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0)


@contextlib.contextmanager
def paused(pids: list[int]) -> Iterator[str]:
    """Stop `pids` for the duration; yields the header line describing the machine's state."""
    stopped = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        busy = f"CPUs {cpu_busy():.0%} busy before the start"
        paused_note = f"paused for this run: pid {', '.join(map(str, pids))}" if pids else ""
        yield "; ".join(filter(None, [busy, paused_note]))
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
