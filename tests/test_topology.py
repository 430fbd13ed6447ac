"""The service's shape from the CPUs it may use: cgroup v2 quota, affinity, explicit settings."""

from __future__ import annotations

import os

import pytest

from app.settings import Settings
from app.topology import CpuBudget, cgroup_quota, derive, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [("max 100000\n", None), ("50000 100000\n", 0.5), ("150000 100000", 1.5),
     ("garbage", None), ("", None)],
)  # fmt: skip
def test_cgroup_cpu_max_is_read(tmp_path, cpu_max, quota):
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert cgroup_quota(path) == quota


def test_a_quota_below_the_affinity_decides(tmp_path):
    path = tmp_path / "cpu.max"
    path.write_text("50000 100000\n")  # a Kubernetes limit of 500m
    budget = usable_cpus(path)
    assert (budget.cpus, budget.quota) == (1, 0.5) and "cgroup" in budget.source
    path.write_text(f"{(AFFINITY + 2) * 100000} 100000\n")  # more quota than cores
    assert usable_cpus(path).cpus == AFFINITY
    assert usable_cpus(tmp_path / "missing").cpus == AFFINITY


@pytest.mark.parametrize(
    ("cpus", "shape"),
    [(1, (1, 1, 1, 1)), (2, (1, 2, 1, 2)), (4, (1, 4, 1, 4)), (8, (2, 4, 1, 4)),
     (16, (4, 4, 1, 4)), (6, (2, 3, 1, 3))],
)  # fmt: skip
def test_shape_for_a_number_of_cpus(cpus, shape):
    topology = derive(CpuBudget(cpus, cpus, None, "test"))
    assert (topology.processes, topology.inference_workers, topology.inference_threads,
            topology.decode_threads) == shape  # fmt: skip
    assert topology.processes * topology.inference_workers <= cpus
    per_process = cpus // topology.processes
    assert topology.lone_request_threads == (per_process if per_process > 1 else 0)


def test_explicit_settings_win_and_are_named():
    topology = derive(CpuBudget(2, 2, None, "test"), inference_workers=1, inference_threads=2)
    assert (topology.inference_workers, topology.inference_threads) == (1, 2)
    assert topology.decode_threads == 2 and topology.lone_request_threads == 0
    assert "set explicitly: inference_workers, inference_threads" in topology.reason
    assert Settings(processes=3).topology().processes == 3


def test_no_lone_request_interpreter_on_one_cpu():
    """Its point is a lone request on every core: with one, it would be one interpreter more."""
    topology = derive(CpuBudget(1, 1, None, "test"), inference_workers=2)
    assert (topology.inference_workers, topology.lone_request_threads) == (2, 0)
