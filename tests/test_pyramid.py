"""The max pyramid pools a heatmap bit for bit as pooling every row does, at any zoom and bin count, so a cached run's
heatmap never loses a one-step spike nor differs from an uncached one."""

from __future__ import annotations

import numpy as np
import pytest

from tb_gradient_plugin import binning, pyramid


def _run(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, layers = int(rng.integers(1, 30_000)), int(rng.integers(1, 6))
    values = rng.lognormal(size=(n, layers)).astype(np.float32)
    values[rng.random((n, layers)) < 0.001] = np.nan
    values[rng.random((n, layers)) < 0.001] = np.inf
    present = rng.random((n, layers)) > 0.05
    divide_by = rng.lognormal(size=(n, layers)).astype(np.float32)
    steps = np.cumsum(rng.integers(1, 5, n))
    return steps, values, present, divide_by


@pytest.mark.parametrize("seed", range(12))
def test_pooling_from_the_pyramid_equals_pooling_every_row(seed):
    steps, values, present, divide_by = _run(seed)
    rng = np.random.default_rng(100 + seed)
    base = int(rng.choice([4, 16, pyramid.BASE_BLOCK]))
    plain = pyramid.build(values, present, base=base)
    ratio = pyramid.build(values, present, divide_by, base=base)
    for n_bins in (1, 7, 100, 1000, 3000):
        start = None if rng.random() < 0.5 else int(rng.integers(steps[0], steps[-1] + 1))
        end = None if rng.random() < 0.5 else int(rng.integers(start or steps[0], steps[-1] + 1))
        bins = binning.bin_steps(steps, n_bins, start, end)
        for pyr, div in ((plain, None), (ratio, divide_by)):
            expected = binning.max_pool(values, bins, present, div)
            got = pyramid.max_pool(pyr, values, bins, present, div)
            assert np.array_equal(got[0], expected[0], equal_nan=True)
            assert np.array_equal(got[1], expected[1])


def test_a_one_step_spike_survives_every_level():
    values = np.ones((100_000, 3), dtype=np.float32)
    values[76_543, 1] = 1e6
    pyr = pyramid.build(values)
    assert len(pyr.levels) >= 4
    for level in pyr.levels:
        assert level.max[76_543 // level.block, 1] == 1e6
    pooled, _ = pyramid.max_pool(pyr, values, binning.bin_steps(np.arange(100_000), 10))
    assert pooled[7, 1] == 1e6 and np.all(np.delete(pooled[:, 1], 7) == 1)


def test_the_pyramid_is_a_small_fraction_of_the_values():
    values = np.ones((20_000, 224), dtype=np.float32)
    assert pyramid.build(values).nbytes < values.nbytes / 50


@pytest.mark.parametrize("seed", range(6))
def test_every_level_equals_pooling_its_blocks_row_by_row(seed):
    """The finest level's fast path (fully logged, finite blocks) agrees with the careful pooling everywhere: blocks
    with a NaN, an inf, a -inf or an unlogged entry, a partial last block, the update ratio."""
    _, values, present, divide_by = _run(seed)
    values[np.random.default_rng(seed).random(values.shape) < 0.0005] = -np.inf
    for pres in (present, None, np.ones_like(present)):
        for div in (None, divide_by):
            pyr = pyramid.build(values, pres, div, base=16)
            for level in pyr.levels:
                bins = binning.StepBins(lo=0, hi=values.shape[0], starts=np.arange(0, values.shape[0], level.block),
                                        bin_start=np.zeros(0), bin_end=np.zeros(0))
                expected = binning.max_pool(values, bins, pres, div)
                assert np.array_equal(level.max, expected[0].astype(np.float32), equal_nan=True)
                assert np.array_equal(level.bad, expected[1])


@pytest.mark.parametrize("seed", range(4))
def test_extending_by_appended_rows_equals_building_afresh(seed):
    _, values, present, divide_by = _run(seed)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, values.shape[0], 4))
    for div in (None, divide_by):
        pyr = None
        for cut in [*cuts.tolist(), values.shape[0]]:
            pyr = pyramid.extend(pyr, values[:cut], present[:cut], None if div is None else div[:cut], base=16)
            fresh = pyramid.build(values[:cut], present[:cut], None if div is None else div[:cut], base=16)
            assert pyr.rows == fresh.rows == cut and len(pyr.levels) == len(fresh.levels)
            for got, want in zip(pyr.levels, fresh.levels, strict=True):
                assert got.block == want.block
                assert np.array_equal(got.max, want.max, equal_nan=True) and np.array_equal(got.bad, want.bad)
