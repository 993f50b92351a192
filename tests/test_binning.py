"""Step binning behind the plugin's charts: max pooling over step bins never loses a one-step spike."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gradient_plugin import binning


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 400),
    layers=st.integers(1, 5),
    max_bins=st.integers(1, 50),
    gap=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_max_pool_equals_brute_force(n, layers, max_bins, gap, seed):
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.integers(1, gap + 1, size=n)).astype(np.int64)
    values = rng.lognormal(size=(n, layers)).astype(np.float32)
    values[rng.random(values.shape) < 0.05] = np.nan
    values[rng.random(values.shape) < 0.02] = np.inf
    present = rng.random(values.shape) > 0.1
    bins = binning.bin_steps(steps, max_bins)
    pooled, nonfinite = binning.max_pool(values, bins, present)
    assert bins.count <= max_bins and bins.count == (n > 0) * len(pooled)
    assert bins.full_resolution == (n <= max_bins)
    bounds = np.append(bins.starts, n)
    for b in range(bins.count):
        block, mask = values[bounds[b]:bounds[b + 1]], present[bounds[b]:bounds[b + 1]]
        assert bins.bin_start[b] == steps[bounds[b]] and bins.bin_end[b] == steps[bounds[b + 1] - 1]
        for j in range(layers):
            good = block[mask[:, j] & np.isfinite(block[:, j]), j]
            expect = good.max() if good.size else np.nan
            np.testing.assert_equal(pooled[b, j], expect)
            assert nonfinite[b, j] == bool(np.any(mask[:, j] & ~np.isfinite(block[:, j])))


def test_max_pool_chunks_big_matrices_like_small_ones():
    rng = np.random.default_rng(3)
    values = rng.random((9000, 700)).astype(np.float32)  # > one chunk of rows
    values[4321, 17] = 1e6
    bins = binning.bin_steps(np.arange(9000), 13)
    pooled, _ = binning.max_pool(values, bins)
    expect = np.maximum.reduceat(values, bins.starts, axis=0)
    np.testing.assert_array_equal(pooled, expect)
    assert pooled[:, 17].max() == 1e6
    denominator = rng.random((9000, 700)).astype(np.float32) + 0.5
    ratio, _ = binning.max_pool(values, bins, divide_by=denominator)
    np.testing.assert_array_equal(ratio, np.maximum.reduceat(values / denominator, bins.starts, axis=0))


def test_bins_are_linear_in_steps_and_skip_gaps():
    steps = np.concatenate([np.arange(0, 100), np.arange(1000, 1100)])
    bins = binning.bin_steps(steps, 11)
    # 11 bins of 100 steps each over [0, 1099]: only the first and the last hold logged steps.
    assert bins.bin_start.tolist() == [0, 1000] and bins.bin_end.tolist() == [99, 1099]
    win = binning.bin_steps(steps, 5, start=50, end=1020)
    assert win.bin_start[0] == 50 and win.bin_end[-1] == 1020


def test_split_envelope_is_exact_inside_window_and_keeps_peaks_outside():
    steps = np.arange(10_000, dtype=np.int64)
    values = np.ones(10_000)
    values[123] = 77.0  # outside the window: must survive as the max of its envelope point
    values[5000] = 99.0
    env = binning.split_envelope(steps, values, 4990, 5010, full_max=100, outside_bins=50)
    inside = (env.bin_start >= 4990) & (env.bin_end <= 5010)
    assert np.all(env.bin_start[inside] == env.bin_end[inside]) and inside.sum() == 21
    assert env.values[env.bin_start == 5000][0] == 99.0
    assert 77.0 in env.max and len(env.values) <= 21 + 50 + 1
    assert env.peak_index[np.argmax(env.max == 77.0)] == 123
    assert np.all(np.diff(env.bin_start) > 0)
    assert not env.full_resolution
