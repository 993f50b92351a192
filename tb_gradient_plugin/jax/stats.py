"""The device side of the JAX monitor: per-layer reductions of a list of leaves, traced into the user's step.

Everything here runs under ``jit`` and returns small arrays (one value per layer); nothing is read on the host. Under
a sharded ``jit`` the reductions are over the global arrays (XLA inserts the cross-device sums), so the norms are those
of the full parameters, not of one shard.

Sums of squares are taken in float32 (float64 when ``jax_enable_x64`` is on and the leaves are float64). A leaf whose
sum overflows (entries above ~1e19) or underflows (entries below ~1e-19) while its entries are finite is measured
again scaled by its largest entry, inside a ``lax.cond`` taken only on such a step, so a huge but finite gradient is
reported as huge, not as non-finite, and a tiny one is not reported as zero (which would read as a dead layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import format as fmt

__all__ = ["LayerStats", "grad_stats", "histogram_counts", "layer_norms", "leaf_norms", "total_norm"]

#: A bin estimate from ``2 * log10|g| + _BIN_OF_LOG`` is the reference bin or the one below: the bias keeps a float32
#: logarithm's error (~1e-5 bins) from ever landing one bin too high, so one comparison corrects it.
_BIN_OF_LOG = 2 - 2 * float(fmt.HIST_LOG10_EDGES[0]) - 1e-3


def leaf_norms(leaves: Sequence[jax.Array], *, with_max: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Per leaf, the L2 norm and, with ``with_max``, max |x| (float32 ``[leaves]``; NaN for a leaf holding a NaN, inf
    for an inf; the max is None without ``with_max``).

    Each reduction is one pass over the leaf, so a norm alone (parameters, updates, moments) costs one pass: the max
    is taken where it is recorded (gradients) or where some sum is suspect (non-finite, below the smallest normal, or
    zero). Only in the rare step where a finite leaf's sum over- or underflowed does one ``lax.cond`` for all leaves
    measure every leaf again scaled by its largest entry (each branch of a cond is compiled on its own: one per leaf
    would double the step's compile time).
    """
    dt = jnp.result_type(jnp.float32, *[x.dtype for x in leaves])
    values = [x.reshape(-1).astype(jnp.result_type(x.dtype, jnp.float32)) for x in leaves]
    zero = jnp.zeros((), dt)

    def maxes() -> jax.Array:
        return jnp.stack([jnp.max(jnp.abs(a)).astype(dt) if a.size else zero for a in values])

    sq = jnp.stack([jnp.sum(a * a).astype(dt) if a.size else zero for a in values])
    suspect = ~jnp.isfinite(sq) | (sq < jnp.finfo(dt).tiny)  # over- or underflowed, or all zeros
    mx = maxes() if with_max else None

    def scaled(big: jax.Array, rescale: jax.Array) -> jax.Array:
        safe = jnp.where(rescale, big, 1.0)
        out = [jnp.sum(jnp.square(a / safe[k].astype(a.dtype))).astype(dt) if a.size else zero
               for k, a in enumerate(values)]
        return jnp.where(rescale, big * jnp.sqrt(jnp.stack(out)), jnp.sqrt(sq))

    def rescued(big: jax.Array) -> jax.Array:
        rescale = suspect & jnp.isfinite(big) & (big > 0)  # an all-zero leaf's norm is its sum's: 0
        return lax.cond(jnp.any(rescale), scaled, lambda *_: jnp.sqrt(sq), big, rescale)

    if mx is None:  # the max pass only where a sum is suspect (a zero leaf too), the scaled pass only where needed
        norm = lax.cond(jnp.any(suspect), lambda: rescued(maxes()), lambda: jnp.sqrt(sq))
    else:
        norm = rescued(mx)
    norm = norm.astype(jnp.float32)
    if mx is None:
        return norm, None
    mx = jnp.where(jnp.isnan(sq), jnp.nan, mx)  # a reduction's max may skip a NaN; the sum never does
    return norm, mx.astype(jnp.float32)


def _combine(norms: jax.Array, segments: np.ndarray, n: int) -> jax.Array:
    """Per segment, the L2 norm of the given norms, scaled by their largest so that the squares cannot overflow."""
    big = jax.ops.segment_max(norms, segments, num_segments=n)
    safe = jnp.where((big > 0) & jnp.isfinite(big), big, 1.0)
    out = safe * jnp.sqrt(jax.ops.segment_sum(jnp.square(norms / safe[segments]), segments, num_segments=n))
    return jnp.where(jnp.isnan(big), jnp.nan, out)


def layer_norms(leaves: Sequence[jax.Array], layer_of: Sequence[int], n: int) -> jax.Array:
    """Per layer, the L2 norm over its leaves (float32 ``[n]``)."""
    return _combine(leaf_norms(leaves, with_max=False)[0], np.asarray(layer_of, np.int32), n)


def total_norm(per_layer: jax.Array) -> jax.Array:
    """The L2 norm over all layers, from their norms."""
    return _combine(per_layer, np.zeros(per_layer.shape[0], np.int32), 1)[0]


class LayerStats:
    """Per-layer gradient statistics of one step: norm, max |g| and non-finite count (float32 ``[n]`` each)."""

    def __init__(self, norm: jax.Array, max_abs: jax.Array, nonfinite: jax.Array) -> None:
        self.norm, self.max_abs, self.nonfinite = norm, max_abs, nonfinite


def grad_stats(leaves: Sequence[jax.Array], layer_of: Sequence[int], n: int) -> LayerStats:
    """Norm, max |g| and non-finite count per layer. The count costs a pass only when some entry is non-finite (then
    the max of its leaf is)."""
    seg = np.asarray(layer_of, np.int32)
    norms, maxes = leaf_norms(leaves)
    norm = _combine(norms, seg, n)
    max_abs = jax.ops.segment_max(maxes, seg, num_segments=n)
    max_abs = jnp.where(jnp.isnan(norm), jnp.nan, max_abs)

    def count() -> jax.Array:
        per_leaf = jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32).astype(jnp.float32) for x in leaves])
        return jax.ops.segment_sum(per_leaf, seg, num_segments=n)

    nonfinite = lax.cond(jnp.all(jnp.isfinite(maxes)), lambda: jnp.zeros(n, jnp.float32), count)
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
