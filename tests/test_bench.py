"""The statistics the benchmarks print their claims with."""

import numpy as np

from bench.p99_ab import bootstrap_diff


def test_bootstrap_interval_holds_zero_for_the_same_distribution():
    rng = np.random.default_rng(0)
    on, off = rng.gamma(4.0, 2.0, size=(2, 4000))
    diff, low, high = bootstrap_diff(on, off, 99, rounds=500, seed=0)
    assert low <= diff <= high
    assert low < 0 < high


def test_bootstrap_interval_finds_a_real_shift():
    rng = np.random.default_rng(1)
    off = rng.gamma(4.0, 2.0, size=4000)
    on = off + 1.0  # every request 1 ms slower
    diff, low, high = bootstrap_diff(on, off, 50, rounds=500, seed=0)
    assert diff == np.float64(np.percentile(on, 50) - np.percentile(off, 50))
    assert 0.9 < low <= diff <= high < 1.1
