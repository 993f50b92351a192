"""The device side of the JAX monitor: per-leaf and per-layer reductions, traced into the user's step.

Everything here runs under ``jit`` and returns small arrays (a few values per leaf or layer); nothing is read on the
host. Under a sharded ``jit`` the reductions are over the global arrays (XLA inserts the cross-device sums), so the
norms are those of the full parameters, not of one shard.

Sums of squares are taken in float32 (float64 when ``jax_enable_x64`` is on and the leaves are float64), one plain sum
per leaf (and a gradient's max |g|). A sum that overflowed (entries above ~1e19), is too small to be exact (entries
below ~1e-19 flush to zero) or is not finite is taken again inside a ``lax.cond`` run only on such a step: divided by a
power of two near the leaf's largest entry, so a huge but finite value is reported as huge, not as non-finite, and a
tiny one not as zero (a dead layer); a gradient's non-finite entries are counted there too.

Why per leaf, and why the conds' operands matter: on XLA's CPU backend, a ``lax.cond`` that takes many full-size arrays
keeps them all alive until it runs, so the step can no longer reuse their buffers, touches tens of MB of fresh memory
and page-faults on every step (measured: 16,400 faults a step for the MLP of ``bench_jax.py``, against about 2,000
with every step logged, and almost none every 10 steps, when each gradient is measured on its own before the optimizer
reads it). Other backends lay the conds out differently (see ``monitor._one_cond_per_leaf``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import format as fmt

__all__ = ["LayerStats", "grad_leaf", "grad_leaves", "layer_grad_stats", "layer_norms", "leaf_histogram", "leaf_norms",
           "total_norm"]

#: A bin estimate from ``2 * log10|g| + _BIN_OF_LOG`` is the reference bin or the one below: the bias keeps a float32
#: logarithm's error (~1e-5 bins) from ever landing one bin too high, so one comparison corrects it.
_BIN_OF_LOG = 2 - 2 * float(fmt.HIST_LOG10_EDGES[0]) - 1e-3


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1).astype(jnp.result_type(x.dtype, jnp.float32))


def _exact_floor(a: jax.Array) -> float:
    """The smallest sum of squares of ``a`` that is exact to its precision: below it, entries whose squares flush to
    zero could add up to more than the sum's own rounding."""
    info = jnp.finfo(a.dtype)
    return float(info.tiny) / float(info.eps) * max(a.size, 1)


def _scaled_norm(a: jax.Array, mx: jax.Array) -> jax.Array:
    """The L2 norm of ``a`` (flat), summed divided by a power of two near its largest entry ``mx``: the squares can
    neither overflow nor underflow. NaN for a NaN entry, inf for an infinite one."""
    usable = jnp.isfinite(mx) & (mx > 0)  # inf or NaN: the plain sum says which; 0: nothing to scale
    tiny = jnp.finfo(a.dtype).tiny
    scale = jnp.where(usable, jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(mx, tiny)))), 1.0).astype(a.dtype)
    return scale * jnp.sqrt(jnp.sum(jnp.square(a / scale)))


def leaf_norms(leaves: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per leaf, the L2 norm and max |x| (``[leaves]`` each, in the leaves' float type; NaN for a leaf holding a NaN),
    by two passes that never overflow or underflow: the max, then the scaled sum of squares."""
    dt = jnp.result_type(jnp.float32, *[x.dtype for x in leaves])
    norms, maxes = [], []
    for x in leaves:
        a = _flat(x)
        mx = jnp.max(jnp.abs(a)) if a.size else jnp.zeros((), a.dtype)
        norm = _scaled_norm(a, mx) if a.size else mx
        maxes.append(jnp.where(jnp.isnan(norm), jnp.nan, mx).astype(dt))  # a max may skip a NaN; the sum never does
        norms.append(norm.astype(dt))
    return jnp.stack(norms), jnp.stack(maxes)


def grad_leaves(leaves: Sequence[jax.Array]) -> jax.Array:
    """Per leaf, its norm, max |g| and non-finite count (float32 ``[leaves, 3]``).

    Two plain reductions per leaf, the max and the sum of squares; only where some sum is not exact (overflowed, too
    small or not finite) does one ``lax.cond`` take the scaled sums and count the non-finite entries (a counting pass
    costs about 10x a sum on the CPU backend). Called leaf by leaf on the CPU (:func:`grad_leaf`), with all leaves at
    once where each cond costs a round trip to the host (GPUs read a cond's predicate back before they go on).
    """
    flats = [_flat(x) for x in leaves]
    dt = jnp.result_type(jnp.float32, *[a.dtype for a in flats])
    zero = jnp.zeros((), dt)
    mx = jnp.stack([jnp.max(jnp.abs(a)).astype(dt) if a.size else zero for a in flats])
    sq = jnp.stack([jnp.sum(jnp.square(a)).astype(dt) if a.size else zero for a in flats])
    floors = np.asarray([_exact_floor(a) if a.size else 0.0 for a in flats])
    exact = jnp.isfinite(sq) & ((sq >= floors) | (mx == 0))
    plain = jnp.stack([jnp.sqrt(sq), jnp.zeros_like(sq)], 1)

    def rescue() -> jax.Array:
        rows = [jnp.stack([_scaled_norm(a, mx[k].astype(a.dtype)).astype(dt),
                           jnp.sum(~jnp.isfinite(a), dtype=jnp.int32).astype(dt)]) if a.size else jnp.zeros(2, dt)
                for k, a in enumerate(flats)]
        return jnp.where(exact[:, None], plain, jnp.stack(rows))

    norm_count = lax.cond(jnp.all(exact), lambda: plain, rescue)
    mx = jnp.where(jnp.isnan(norm_count[:, 0]), jnp.nan, mx)
    return jnp.stack([norm_count[:, 0], mx, norm_count[:, 1]], 1).astype(jnp.float32)


def grad_leaf(x: jax.Array) -> jax.Array:
    """One gradient leaf's norm, max |g| and non-finite count (float32 ``[3]``, in that order), with a rescue cond of
    its own (see :func:`grad_leaves`)."""
    return grad_leaves([x])[0]


def _leaf_norms_fast(make_leaves: Callable[[], Sequence[jax.Array]]) -> jax.Array:
    """Per leaf of ``make_leaves()``, the L2 norm (float32 ``[leaves]``): one pass each. Only in a step where some sum
    is not exact does a ``lax.cond`` run, and inside it a cond per leaf measures just those leaves again as
    :func:`leaf_norms` does (a leaf of zeros, such as a frozen layer's update, costs that one max pass).

    The leaves are made by a function so that the cond evaluates it again inside instead of taking its results as
    operands: a difference of two arrays (the applied update) then stays fused into its reduction and is never written
    out.
    """
    leaves = make_leaves()
    sums, exact = [], []
    for x in leaves:
        a = _flat(x)
        sq = jnp.sum(jnp.square(a)) if a.size else jnp.zeros((), a.dtype)
        sums.append(sq)
        exact.append(jnp.isfinite(sq) & (sq >= _exact_floor(a)) if a.size else jnp.ones((), jnp.bool_))
    dt = jnp.result_type(jnp.float32, *[s.dtype for s in sums])
    plain = jnp.sqrt(jnp.stack([s.astype(dt) for s in sums]))
    ok = jnp.stack(exact)

    def rescue() -> jax.Array:
        again = make_leaves()
        return jnp.stack([lax.cond(ok[k], lambda k=k: plain[k], lambda x=x: leaf_norms([x])[0][0].astype(dt))
                          for k, x in enumerate(again)])

    return lax.cond(jnp.all(ok), lambda: plain, rescue).astype(jnp.float32)


def _combine(norms: jax.Array, segments: np.ndarray, n: int) -> jax.Array:
    """Per segment, the L2 norm of the given norms, scaled by their largest so that the squares cannot overflow."""
    big = jax.ops.segment_max(norms, segments, num_segments=n)
    safe = jnp.where((big > 0) & jnp.isfinite(big), big, 1.0)
    out = safe * jnp.sqrt(jax.ops.segment_sum(jnp.square(norms / safe[segments]), segments, num_segments=n))
    return jnp.where(jnp.isnan(big), jnp.nan, out)


def layer_norms(make_leaves: Callable[[], Sequence[jax.Array]], layer_of: Sequence[int], n: int) -> jax.Array:
    """Per layer, the L2 norm over its leaves (float32 ``[n]``); ``make_leaves`` gives the leaves (see
    :func:`_leaf_norms_fast` for why a function)."""
    return _combine(_leaf_norms_fast(make_leaves), np.asarray(layer_of, np.int32), n)


def total_norm(per_layer: jax.Array) -> jax.Array:
    """The L2 norm over all layers, from their norms."""
    return _combine(per_layer, np.zeros(per_layer.shape[0], np.int32), 1)[0]


class LayerStats:
    """Per-layer gradient statistics of one step: norm, max |g| and non-finite count (float32 ``[n]`` each)."""

    def __init__(self, norm: jax.Array, max_abs: jax.Array, nonfinite: jax.Array) -> None:
        self.norm, self.max_abs, self.nonfinite = norm, max_abs, nonfinite


def layer_grad_stats(per_leaf: jax.Array, layer_of: Sequence[int], n: int) -> LayerStats:
    """Per-layer statistics from the :func:`grad_leaf` rows of a layer's leaves (``[leaves, 3]``)."""
    seg = np.asarray(layer_of, np.int32)
    norm = _combine(per_leaf[:, 0], seg, n)
    max_abs = jax.ops.segment_max(per_leaf[:, 1], seg, num_segments=n)
    max_abs = jnp.where(jnp.isnan(norm), jnp.nan, max_abs)
    return LayerStats(norm, max_abs, jax.ops.segment_sum(per_leaf[:, 2], seg, num_segments=n))


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


def leaf_histogram(x: jax.Array) -> jax.Array:
    """One leaf's entries counted on the format's fixed log10|g| bins (int32 ``[HIST_BINS]``)."""
    dt = jnp.result_type(x.dtype, jnp.float32)
    a = jnp.abs(x.reshape(-1).astype(dt))
    # NaN joins Inf above every finite top. log(0) = -inf clips to the zero bin, +inf to the overflow bin, and the
    # comparison moves them to where they belong (zero stays, Inf moves up into the non-finite bin).
    a = jnp.where(jnp.isnan(a), jnp.inf, a)
    estimate = jnp.floor(jnp.log(a) * (2.0 / math.log(10.0)) + _BIN_OF_LOG)
    bins = jnp.clip(estimate, fmt.HIST_ZERO, fmt.HIST_OVERFLOW).astype(jnp.int32)
    bins = bins + (a >= jnp.asarray(_bin_tops(np.dtype(dt)))[bins]).astype(jnp.int32)
    return jnp.bincount(bins, length=fmt.HIST_BINS).astype(jnp.int32)
