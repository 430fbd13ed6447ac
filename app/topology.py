"""How many processes and threads to run, derived from the CPUs this process may use.

The one place the service's shape comes from: `python -m app`, the Dockerfile, compose and the
benchmarks all start the service without repeating numbers, and a setting given explicitly
(MOBILEVIT_PROCESSES, ..._INFERENCE_WORKERS, ..._INFERENCE_THREADS, ..._DECODE_THREADS) wins over
the derived one. `/model-info` reports what was chosen and why.

The CPUs usable are the fewest of: the scheduler affinity (`taskset`, cpusets) and the cgroup v2
quota (`cpu.max`, what a Kubernetes CPU limit or `docker run --cpus` sets), rounded down, at
least 1. The shape for N CPUs:

- one uvicorn process for up to CPUS_PER_PROCESS CPUs, one more for every CPUS_PER_PROCESS
  beyond: on 2 cores two processes measured no faster than one (README, benchmarks), so more
  processes only where one event loop (one GIL) would become the limit;
- in each process one inference worker per CPU it has, each on a single-thread interpreter
  (many small interpreters keep every core busy while requests decode; one wide interpreter
  stalls whenever any of its cores is taken);
- as many decode threads as the process has CPUs (Pillow releases the GIL while it decodes);
- one more interpreter with a thread per CPU of the process, for a request that is alone
  (`app.batcher`): a lone request would otherwise run on one core and leave the rest idle
  (none with a batch window, MAX_BATCH_WAIT_MS > 0, where every request waits for company).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

#: CPUs one process's event loop is given before another process is added.
CPUS_PER_PROCESS = 4
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True)
class CpuBudget:
    cpus: int
    affinity: int
    quota: float | None
    source: str


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> CpuBudget:
    """CPUs this process may use: affinity, capped by the cgroup v2 quota when one is set."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_quota(cpu_max)
    if quota is not None and quota < affinity:
        return CpuBudget(max(1, math.floor(quota)), affinity, quota, f"cgroup cpu.max {quota:g}")
    return CpuBudget(affinity, affinity, quota, f"sched_getaffinity {affinity}")


def cgroup_quota(cpu_max: Path = CGROUP_CPU_MAX) -> float | None:
    """CPUs allowed by cgroup v2 `cpu.max` ("<quota> <period>" or "max <period>"); None if
    unlimited or unreadable."""
    try:
        fields = cpu_max.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


@dataclass(frozen=True)
class Topology:
    processes: int
    inference_workers: int
    inference_threads: int
    decode_threads: int
    lone_request_threads: int
    """Threads of the interpreter a lone request runs on; 0: none (one CPU or one worker,
    INFERENCE_THREADS set, or a batch window)."""
    cpus: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def derive(
    budget: CpuBudget,
    processes: int | None = None,
    inference_workers: int | None = None,
    inference_threads: int | None = None,
    decode_threads: int | None = None,
    batch_window: bool = False,
) -> Topology:
    """The shape for `budget`; any value given explicitly is kept as it is. With a
    `batch_window` (MAX_BATCH_WAIT_MS > 0) every request waits for company, so none runs alone
    on every core."""
    cpus = budget.cpus
    chosen_processes = processes or max(1, math.ceil(cpus / CPUS_PER_PROCESS))
    per_process = max(1, cpus // chosen_processes)
    explicit = [name for name, value in (("processes", processes),
                ("inference_workers", inference_workers), ("inference_threads", inference_threads),
                ("decode_threads", decode_threads)) if value]  # fmt: skip
    reason = f"{cpus} usable CPU(s) ({budget.source})"
    if explicit:
        reason += "; set explicitly: " + ", ".join(explicit)
    workers, threads = inference_workers or per_process, inference_threads or 1
    return Topology(
        processes=chosen_processes,
        inference_workers=workers,
        inference_threads=threads,
        decode_threads=decode_threads or per_process,
        # Only when threads are derived: INFERENCE_THREADS set means exactly that many.
        lone_request_threads=per_process
        if per_process > 1 and workers > 1 and inference_threads is None and not batch_window
        else 0,
        cpus=cpus,
        reason=reason,
    )
