"""The device reductions of the PyTorch monitor: histogram binning from float32 bit patterns, and the norm and max |g|
taken in the same pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.torch.stats import _HIST_PIECE, _THRESHOLDS, _hist_pass


def test_histogram_bit_pattern_binning_equals_the_format_on_every_kind_of_float32():
    # The monitor bins gradients from their float32 bit patterns (two table lookups); the format's reference bins
    # by float64 logarithm. Every threshold, its neighbours, signs, zeros, subnormals, NaN/Inf, random bit patterns.
    rng = np.random.default_rng(0)
    t = _THRESHOLDS
    special = np.array([0, -0.0, np.nan, np.inf, -np.inf, 1e-45, 1e-40, 3.4e38, 1e-13, 1e13, 1.0], np.float32)
    patterns = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([t, -t, np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(np.inf)), special,
                        (rng.standard_normal(50_000) * 10.0 ** rng.uniform(-15, 15, 50_000)).astype(np.float32),
                        patterns])
    with np.errstate(invalid="ignore"):
        expected = fmt.histogram_counts(x)
        scaled = fmt.histogram_counts(np.abs(x) * np.float32(2.0**-10))
    np.testing.assert_array_equal(_hist_pass(torch.from_numpy(x), None, False)[0].numpy(), expected)
    inv = torch.tensor(2.0**-10, dtype=torch.float64)  # AMP: divided by the loss scale first
    np.testing.assert_array_equal(_hist_pass(torch.from_numpy(x), inv, False)[0].numpy(), scaled)
    half = torch.from_numpy(x).to(torch.bfloat16)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(_hist_pass(half, None, False)[0].numpy(),
                                      fmt.histogram_counts(half.float().numpy()))


@pytest.mark.parametrize("scaled", [False, True])
def test_histogram_pass_also_gives_norm_and_max_over_several_pieces(scaled):
    # On a histogram step the monitor takes a gradient's norm and max |g| from the histogram's own pieces; they must
    # equal the separate passes, across piece boundaries, with the NaN seen wherever it is.
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(2 * _HIST_PIECE + 12345) * 10.0 ** rng.uniform(-8, 2, 2 * _HIST_PIECE + 12345))
    x = x.astype(np.float32)
    x[_HIST_PIECE + 7] = -1e6  # the largest magnitude, negative, in the second piece
    factor = 2.0**-10 if scaled else 1.0
    inv = torch.tensor(factor, dtype=torch.float64) if scaled else None
    counts, sq, top = _hist_pass(torch.from_numpy(x), inv, True)
    ref = np.abs(x.astype(np.float64)) * factor
    np.testing.assert_array_equal(counts.numpy(), fmt.histogram_counts(np.abs(x) * np.float32(factor)))
    assert float(sq) == pytest.approx(float(np.sum(ref**2)), rel=1e-5)
    assert float(top) == pytest.approx(1e6 * factor)
    x[-3] = np.nan
    counts, sq, top = _hist_pass(torch.from_numpy(x), inv, True)
    assert counts[fmt.HIST_NONFINITE] == 1 and np.isnan(float(top)) and np.isnan(float(sq))
