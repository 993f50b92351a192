"""The in-graph statistics of the Keras callback: per-layer gradient reductions and histogram counts, computed by
TensorFlow inside the traced train step, never read on the host here.

TensorFlow is imported inside the functions: importing the package must work (and fail clearly at construction) on
Keras' other backends.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import format as fmt

__all__ = ["grad_stats", "histogram_counts"]

#: A bin estimate from ``2 * log10|g| + _BIN_OF_LOG`` is the reference bin or the one below: the bias keeps a float32
#: logarithm's error (~1e-5 bins) from ever landing one bin too high, so one comparison corrects it.
_BIN_OF_LOG = 2 - 2 * float(fmt.HIST_LOG10_EDGES[0]) - 1e-3


def _bin_tops(dtype: np.dtype) -> np.ndarray:
    """Per bin ``b`` up to the overflow bin, the smallest magnitude of ``dtype`` that belongs above ``b``.

    A bin estimate that is right or one too low, plus ``|g| >= tops[estimate]``, is then exactly the bin
    :func:`tb_gradient_plugin.format.histogram_counts` gives (exact powers of ten included), with no float64 logarithm
    per entry. The zero bin's top is the smallest *normal* magnitude: TensorFlow's CPU kernels treat subnormal inputs
    as zero, so a subnormal magnitude counts as zero everywhere rather than as zero or as underflow depending on the
    kernel. Above the overflow bin sits only the non-finite bin (top: infinity).
    """
    edges = fmt.histogram_edge_values(dtype)
    return np.concatenate([[np.finfo(dtype).tiny], edges, [np.inf]]).astype(dtype)


_BIN_TOPS: dict[str, np.ndarray] = {}


def histogram_counts(grads: list[Any], groups: list[list[int]], scale: Any) -> Any:
    """Per-layer counts of the gradient entries on the format's fixed bins, flattened ``[layers * HIST_BINS]``.

    One pass over all layers: the entries are concatenated, binned by ``2 * log10|g|`` corrected against exact
    thresholds, offset by their layer's first bin and counted by a single ``bincount``. ``scale`` (or ``None``) is the
    loss scale the entries are divided by, as the optimizer does.
    """
    import tensorflow as tf

    dtype = tf.float64 if any(g.dtype == tf.float64 for g in grads) else tf.float32
    tops = _BIN_TOPS.get(dtype.name)
    if tops is None:
        tops = _BIN_TOPS[dtype.name] = _bin_tops(np.dtype(dtype.name))
    parts = [(layer, tf.reshape(tf.cast(grads[i], dtype), [-1])) for layer, idxs in enumerate(groups) for i in idxs]
    a = tf.abs(tf.concat([part for _, part in parts], 0))
    offsets = tf.concat([tf.fill(tf.shape(part), layer * fmt.HIST_BINS) for layer, part in parts], 0)
    if scale is not None:
        a = a / tf.cast(scale, dtype)
    # NaN joins Inf above every finite top. log(0) = -inf clips to the zero bin, +inf to the overflow bin, and the
    # comparison moves them to where they belong (zero stays, Inf moves up into the non-finite bin).
    a = tf.where(tf.math.is_nan(a), tf.constant(np.inf, dtype), a)
    estimate = tf.floor(tf.math.log(a) * (2.0 / math.log(10.0)) + _BIN_OF_LOG)
    bins = tf.cast(tf.clip_by_value(estimate, fmt.HIST_ZERO, fmt.HIST_OVERFLOW), tf.int32)
    bins += tf.cast(a >= tf.gather(tf.constant(tops, dtype), bins), tf.int32)
    size = len(groups) * fmt.HIST_BINS
    # The raw op takes the number of bins as a constant (tf.math.bincount derives it from the data: not XLA-able).
    return tf.raw_ops.DenseBincount(input=bins + offsets, size=tf.constant(size, tf.int32),
                                    weights=tf.zeros([0], tf.int32), binary_output=False)


def grad_stats(grads: list[Any], groups: list[list[int]]) -> tuple[Any, Any, Any]:
    """Per layer, in float64 and as given (scaled under a loss scale): sum of squares, max |g|, non-finite count."""
    import tensorflow as tf

    g_sumsq, g_max = [], []
    for g in grads:
        g_sumsq.append(tf.reduce_sum(tf.square(tf.cast(g, tf.float64))))
        g_max.append(tf.cast(tf.reduce_max(tf.abs(g)), tf.float64) if g.shape.num_elements() != 0
                     else tf.constant(0.0, tf.float64))
    layer_sumsq = tf.stack([tf.add_n([g_sumsq[i] for i in idxs]) for idxs in groups])
    layer_max = tf.stack([tf.reduce_max(tf.stack([g_max[i] for i in idxs])) for idxs in groups])

    def count_nonfinite():
        per_var = [tf.cast(tf.size(g, tf.int64) - tf.math.count_nonzero(tf.math.is_finite(g), dtype=tf.int64),
                           tf.float64) for g in grads]
        return tf.stack([tf.add_n([per_var[i] for i in idxs]) for idxs in groups])

    # Squares summed in float64 cannot overflow from finite float32 entries: a finite sum means no NaN/Inf.
    nonfinite = tf.cond(tf.math.is_finite(tf.reduce_sum(layer_sumsq)),
                        lambda: tf.zeros([len(groups)], tf.float64), count_nonfinite)
    # A NaN entry makes the layer's sum of squares NaN; max|g| follows it (reduce_max may skip NaN).
    layer_max = tf.where(tf.math.is_nan(layer_sumsq), tf.constant(math.nan, tf.float64), layer_max)
    return layer_sumsq, layer_max, nonfinite
