"""The device side of the JAX monitor: per-layer reductions of a list of leaves, traced into the user's step.

Everything here runs under ``jit`` and returns small arrays (one value per layer); nothing is read on the host. Under
a sharded ``jit`` the reductions are over the global arrays (XLA inserts the cross-device sums), so the norms are those
of the full parameters, not of one shard.

Sums of squares are taken in float32 (float64 when ``jax_enable_x64`` is on and the leaves are float64). Gradients are
summed divided by a power of two near their largest entry; another leaf whose plain sum overflows (entries above ~1e19)
or underflows (entries below ~1e-19) is measured again that way inside a ``lax.cond`` taken only on such a step. So a
huge but finite value is reported as huge, not as non-finite, and a tiny one not as zero (a dead layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import format as fmt

__all__ = ["LayerStats", "grad_stats", "histogram_counts", "layer_norms", "leaf_norms", "leaf_norms_only", "total_norm"]

#: A bin estimate from ``2 * log10|g| + _BIN_OF_LOG`` is the reference bin or the one below: the bias keeps a float32
#: logarithm's error (~1e-5 bins) from ever landing one bin too high, so one comparison corrects it.
_BIN_OF_LOG = 2 - 2 * float(fmt.HIST_LOG10_EDGES[0]) - 1e-3


def leaf_norms(leaves: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per leaf, the L2 norm and max |x| (float32 ``[leaves]``; NaN for a leaf holding a NaN, inf for an inf).

    Two passes per leaf and no ``lax.cond``: the max (recorded for gradients), then the sum of squares of the entries
    divided by a power of two near it (exact), so that the squares can neither overflow nor underflow.
    """
    dt = jnp.result_type(jnp.float32, *[x.dtype for x in leaves])
    values = [x.reshape(-1).astype(jnp.result_type(x.dtype, jnp.float32)) for x in leaves]
    zero = jnp.zeros((), dt)
    mx = jnp.stack([jnp.max(jnp.abs(a)).astype(dt) if a.size else zero for a in values])
    usable = jnp.isfinite(mx) & (mx > 0)  # inf or NaN: the plain sum says which; 0: nothing to scale
    tiny = jnp.finfo(dt).tiny
    scale = jnp.where(usable, jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(mx, tiny)))), 1.0).astype(dt)
    sq = jnp.stack([jnp.sum(jnp.square(a / scale[k].astype(a.dtype))).astype(dt) if a.size else zero
                    for k, a in enumerate(values)])
    norm = scale * jnp.sqrt(sq)
    mx = jnp.where(jnp.isnan(sq), jnp.nan, mx)  # a reduction's max may skip a NaN; the sum never does
    return norm.astype(jnp.float32), mx.astype(jnp.float32)


def leaf_norms_only(leaves: Sequence[jax.Array]) -> jax.Array:
    """Per leaf, the L2 norm alone (float32 ``[leaves]``): one pass where no max is recorded (parameters, updates,
    moments). Only in a step where some sum is suspect (non-finite, below the smallest normal, or zero) does one
    ``lax.cond`` measure every leaf again as :func:`leaf_norms` does (one cond for all leaves: each branch is compiled
    on its own, and one per leaf would double the step's compile time)."""
    dt = jnp.result_type(jnp.float32, *[x.dtype for x in leaves])
    zero = jnp.zeros((), dt)
    sq = jnp.stack([jnp.sum(jnp.square(x.reshape(-1).astype(jnp.result_type(x.dtype, jnp.float32)))).astype(dt)
                    if x.size else zero for x in leaves])
    suspect = jnp.any(~jnp.isfinite(sq) | (sq < jnp.finfo(dt).tiny))
    return lax.cond(suspect, lambda: leaf_norms(leaves)[0], lambda: jnp.sqrt(sq).astype(jnp.float32))


def _combine(norms: jax.Array, segments: np.ndarray, n: int) -> jax.Array:
    """Per segment, the L2 norm of the given norms, scaled by their largest so that the squares cannot overflow."""
    big = jax.ops.segment_max(norms, segments, num_segments=n)
    safe = jnp.where((big > 0) & jnp.isfinite(big), big, 1.0)
    out = safe * jnp.sqrt(jax.ops.segment_sum(jnp.square(norms / safe[segments]), segments, num_segments=n))
    return jnp.where(jnp.isnan(big), jnp.nan, out)


def layer_norms(leaves: Sequence[jax.Array], layer_of: Sequence[int], n: int) -> jax.Array:
    """Per layer, the L2 norm over its leaves (float32 ``[n]``)."""
    return _combine(leaf_norms_only(leaves), np.asarray(layer_of, np.int32), n)


def total_norm(per_layer: jax.Array) -> jax.Array:
    """The L2 norm over all layers, from their norms."""
    return _combine(per_layer, np.zeros(per_layer.shape[0], np.int32), 1)[0]


class LayerStats:
    """Per-layer gradient statistics of one step: norm, max |g| and non-finite count (float32 ``[n]`` each)."""

    def __init__(self, norm: jax.Array, max_abs: jax.Array, nonfinite: jax.Array) -> None:
        self.norm, self.max_abs, self.nonfinite = norm, max_abs, nonfinite


def grad_stats(leaves: Sequence[jax.Array], layer_of: Sequence[int], n: int) -> LayerStats:
    """Norm, max |g| and non-finite count per layer: two passes over each leaf, and a third only in a step where some
    entry is not finite."""
    seg = np.asarray(layer_of, np.int32)
    norms, maxes = leaf_norms(leaves)
    norm = _combine(norms, seg, n)
    max_abs = jax.ops.segment_max(maxes, seg, num_segments=n)
    max_abs = jnp.where(jnp.isnan(norm), jnp.nan, max_abs)

    def count() -> jax.Array:
        per_leaf = jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32).astype(jnp.float32) for x in leaves])
        return jax.ops.segment_sum(per_leaf, seg, num_segments=n)

    # Counting is ~10x the cost of a sum on XLA's CPU backend: only where a scaled sum (finite for finite entries)
    # says some entry is not finite.
    nonfinite = lax.cond(jnp.all(jnp.isfinite(norms)), lambda: jnp.zeros(n, jnp.float32), count)
    return LayerStats(norm, max_abs, nonfinite)


_BIN_TOPS: dict[str, np.ndarray] = {}


def _bin_tops(dtype: np.dtype) -> np.ndarray:
    """Per bin ``b`` up to the overflow bin, the smallest magnitude of ``dtype`` that belongs above ``b``.

    A bin estimate that is right or one too low, plus ``|g| >= tops[estimate]``, is then exactly the bin
    :func:`tb_gradient_plugin.format.histogram_counts` gives, exact powers of ten included. The zero bin's top is the
    smallest normal magnitude: XLA's CPU kernels may flush subnormals to zero, so a subnormal counts as zero everywhere.
    """
    key = np.dtype(dtype).name
    tops = _BIN_TOPS.get(key)
    if tops is None:
        edges = fmt.histogram_edge_values(dtype)
        tops = _BIN_TOPS[key] = np.concatenate([[np.finfo(dtype).tiny], edges, [np.inf]]).astype(dtype)
    return tops


def _leaf_counts(x: jax.Array) -> jax.Array:
    dt = jnp.result_type(x.dtype, jnp.float32)
    a = jnp.abs(x.reshape(-1).astype(dt))
    # NaN joins Inf above every finite top. log(0) = -inf clips to the zero bin, +inf to the overflow bin, and the
    # comparison moves them to where they belong (zero stays, Inf moves up into the non-finite bin).
    a = jnp.where(jnp.isnan(a), jnp.inf, a)
    estimate = jnp.floor(jnp.log(a) * (2.0 / math.log(10.0)) + _BIN_OF_LOG)
    bins = jnp.clip(estimate, fmt.HIST_ZERO, fmt.HIST_OVERFLOW).astype(jnp.int32)
    bins = bins + (a >= jnp.asarray(_bin_tops(np.dtype(dt)))[bins]).astype(jnp.int32)
    return jnp.bincount(bins, length=fmt.HIST_BINS).astype(jnp.int32)


def histogram_counts(leaves: Sequence[jax.Array], layer_of: Sequence[int], n: int) -> jax.Array:
    """Per layer, its entries counted on the format's fixed log10|g| bins (int32 ``[n, HIST_BINS]``)."""
    counts = jnp.stack([_leaf_counts(x) for x in leaves])
    return jax.ops.segment_sum(counts, np.asarray(layer_of, np.int32), num_segments=n)
