"""Gradient histograms on the format's fixed bins: quantiles of log10|g|, and what they say about an episode.

A histogram tells apart two explosions a norm cannot: the mass of a layer's gradient distribution moving (a scale
problem: learning rate, initialization) and a thin tail of it moving (a few units, a bad batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .. import format as fmt
from ..types import TOTAL, Episode, RunData
from .config import DetectorConfig

#: A layer's gradient histograms: (steps, counts [k, HIST_BINS]) of the steps that logged it, or None.
HistogramLookup = Callable[[str], tuple[np.ndarray, np.ndarray] | None]

#: log10|g| span of every histogram bin, in the format's bin order: exact zeros and non-finite entries sit two decades
#: beyond the outermost bins, so a shift into or out of them counts as a large one.
_HIST_LO = np.concatenate([[fmt.HIST_LOG10_EDGES[0] - 2, fmt.HIST_LOG10_EDGES[0] - 1], fmt.HIST_LOG10_EDGES[:-1],
                           [fmt.HIST_LOG10_EDGES[-1], fmt.HIST_LOG10_EDGES[-1] + 2]])
_HIST_HI = np.concatenate([[fmt.HIST_LOG10_EDGES[0] - 2, fmt.HIST_LOG10_EDGES[0]], fmt.HIST_LOG10_EDGES[1:],
                           [fmt.HIST_LOG10_EDGES[-1] + 1, fmt.HIST_LOG10_EDGES[-1] + 2]])


def hist_quantile(counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of log10|g| from one fixed-bin histogram (linear within a bin; NaN for an empty one).

    Zeros rank below every magnitude and non-finite entries above, so "the top 0.1 %" includes NaN/Inf entries.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = c.sum()
    if not total > 0:
        return math.nan
    cum = np.cumsum(c)
    target = min(max(q, 0.0), 1.0) * total
    # the first bin whose cumulative count reaches the target: occupied, unless q is 0 (then the first occupied one)
    k = int(np.searchsorted(cum, target, side="left")) if target > 0 else int(np.nonzero(c)[0][0])
    frac = (target - (cum[k] - c[k])) / c[k]
    return float(_HIST_LO[k] + min(max(frac, 0.0), 1.0) * (_HIST_HI[k] - _HIST_LO[k]))


def hist_share_above(counts: np.ndarray, log10: float) -> float:
    """Share of the entries of one fixed-bin histogram above ``log10`` (linear within a bin; NaN for an empty one)."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = c.sum()
    if not total > 0:
        return math.nan
    width = _HIST_HI - _HIST_LO
    with np.errstate(invalid="ignore", divide="ignore"):
        part = np.where(width > 0, (_HIST_HI - log10) / width, (_HIST_LO > log10).astype(np.float64))
    return float((c * np.clip(part, 0.0, 1.0)).sum() / total)


def _magnitude(log10: float) -> str:
    if log10 <= _HIST_LO[fmt.HIST_ZERO]:
        return "0"
    if log10 >= _HIST_HI[fmt.HIST_NONFINITE]:
        return "non-finite"
    return f"{10.0 ** log10:.3g}"


def histogram_advice(ep: Episode, lookup: HistogramLookup | None, cfg: DetectorConfig) -> tuple[str, str] | None:
    """Whether the bulk of the offending layer's gradient entries grew (``mass``) or a thin tail of them (``tail``).

    Compares the layer's last histogram at or before the episode's peak (inside the episode) with its last one before
    the episode, both over their finite non-zero entries: exact zeros (dead units, saturated activations) would pin the
    median, and an all-NaN histogram says nothing about magnitudes (the non-finite advice covers it). The median entry
    moving, or more than ``hist_tail_share`` of the entries going beyond the old largest, means most units' gradients
    grew: a scale problem (learning rate, initialization). Only the top entries moving means a few units or a few
    samples: a bad batch, an outlier token, corrupted inputs; lowering the learning rate for the whole model does not
    fix that.
    """
    if lookup is None or not ep.layers or ep.layers[0].name == TOTAL or ep.kind == "overflow_skip":
        return None
    name = ep.layers[0].name
    got = lookup(name)
    if got is None:
        return None
    steps, counts = got
    live = np.asarray(counts, dtype=np.float64).copy()
    live[:, [fmt.HIST_ZERO, fmt.HIST_NONFINITE]] = 0
    has_live = live.sum(axis=1) > 0
    before = np.nonzero(has_live & (steps < ep.start_step))[0]
    inside = np.nonzero(has_live & (steps >= ep.start_step) & (steps <= ep.end_step))[0]
    if before.size == 0 or inside.size == 0:
        return None
    b = int(before[-1])
    upto = inside[steps[inside] <= ep.layers[0].peak_step]
    a = int(upto[-1]) if upto.size else int(inside[0])
    med_b, med_a = hist_quantile(live[b], 0.5), hist_quantile(live[a], 0.5)
    top_b, top_a = hist_quantile(live[b], 1.0), hist_quantile(live[a], 1.0)  # upper edge of the top bin
    above_med = hist_share_above(live[a], med_b)
    zeros, nonfinite = int(counts[a][fmt.HIST_ZERO]), int(counts[a][fmt.HIST_NONFINITE])
    n_live = int(live[a].sum())
    # non-finite entries lie beyond any old largest value
    beyond = int(np.rint(hist_share_above(live[a], top_b) * n_live)) + nonfinite
    share = beyond / (n_live + nonfinite)
    total = int(counts[a].sum())
    where = f"{name}'s gradient histogram at step {int(steps[a])} vs step {int(steps[b])} (before the episode)"
    extra = "".join(f"; {n} of {total} entries are {what}" for n, what in ((zeros, "exactly zero"),
                                                                           (nonfinite, "non-finite")) if n)
    if med_a - med_b >= cfg.hist_mass_shift:
        return (f"{where}: the median non-zero |g| moved from {_magnitude(med_b)} to {_magnitude(med_a)}; "
                f"{above_med:.0%} of the non-zero entries are above the old median{extra}. Most entries grew: a scale "
                "problem (learning rate, initialization), not a few outliers.", "mass")
    if top_a - top_b < cfg.hist_tail_shift and not nonfinite:
        return None
    grew = (f"the largest entries grew from below {_magnitude(top_b)} to {_magnitude(top_a)}"
            if top_a - top_b >= cfg.hist_tail_shift else "some entries became non-finite")
    if share > cfg.hist_tail_share:
        return (f"{where}: {grew} and {share:.0%} of the non-zero entries ({beyond} of {n_live + nonfinite}) lie "
                f"beyond the old largest, while the median stayed at {_magnitude(med_a)} (was {_magnitude(med_b)})"
                f"{extra}. A large share of the entries grew: a scale problem (learning rate, initialization), not a "
                "few outliers.", "mass")
    return (f"{where}: the median non-zero |g| stayed at {_magnitude(med_a)} (was {_magnitude(med_b)}) while {grew}; "
            f"only {beyond} of {n_live + nonfinite} non-zero entries ({share:.2%}) lie beyond the old largest{extra}. "
            "A thin tail grew (a few units, a bad batch, an outlier token or sample): look at the data of that step "
            "and skip or clip outliers; lowering the learning rate for the whole model is not the fix.", "tail")


def run_histograms(run: RunData) -> HistogramLookup | None:
    """Lookup of one layer's logged histograms in a RunData (steps where the layer was not logged left out)."""
    if run.histograms is None or len(run.hist_steps) == 0:
        return None
    col = {name: j for j, name in enumerate(run.layers)}
    steps, hist = np.asarray(run.hist_steps, dtype=np.int64), run.histograms

    def of(name: str) -> tuple[np.ndarray, np.ndarray] | None:
        j = col.get(name)
        if j is None or j >= hist.shape[1]:
            return None
        counts = np.asarray(hist[:, j])
        logged = counts.sum(axis=1) > 0
        return (steps[logged], counts[logged]) if logged.any() else None

    return of
