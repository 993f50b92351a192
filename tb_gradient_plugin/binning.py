"""Step binning for the plugin: many logged steps become few bins without ever losing a spike.

A screen has a few thousand pixels; a run has up to millions of (step, layer) values. Averaging or sampling steps
into pixels hides exactly the one-step spikes this tool exists to show, so every reduction here keeps the **maximum**
of a bin (and, for line charts, the minimum too: a min/max envelope). Non-finite values never become a bin's value:
they are reported per bin as a flag, because JSON cannot carry them and because "this bin held a NaN" is the fact a
user needs. Pure numpy; the plugin turns the results into JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .types import update_ratio

#: Rows (steps) processed at once when pooling a [steps, layers] matrix: bounds the temporary copies to a few MB.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class StepBins:
    """Contiguous groups of logged steps inside a window.

    ``lo:hi`` is the slice of the run's (sorted) step array inside the window; ``starts`` are the offsets of the
    groups relative to ``lo``. Every group holds at least one logged step, so ``bin_start``/``bin_end`` (the first
    and last *logged* step of each group) are real steps, equal when a bin is a single step.
    """

    lo: int
    hi: int
    starts: np.ndarray  # int64 [bins]
    bin_start: np.ndarray  # int64 [bins]
    bin_end: np.ndarray  # int64 [bins]

    @property
    def count(self) -> int:
        return int(self.starts.shape[0])

    @property
    def full_resolution(self) -> bool:
        """True when every bin is exactly one logged step."""
        return self.count == self.hi - self.lo

    def sizes(self) -> np.ndarray:
        return np.diff(np.append(self.starts, self.hi - self.lo))


def window(steps: np.ndarray, start: int | None = None, end: int | None = None) -> tuple[int, int]:
    """The slice ``lo:hi`` of a sorted step array with ``start <= step <= end`` (either bound optional)."""
    lo = 0 if start is None else int(np.searchsorted(steps, start, side="left"))
    hi = len(steps) if end is None else int(np.searchsorted(steps, end, side="right"))
    return lo, max(lo, hi)


def bin_steps(steps: np.ndarray, max_bins: int, start: int | None = None, end: int | None = None) -> StepBins:
    """Group the logged steps of ``[start, end]`` into at most ``max_bins`` bins of equal width in *step* units.

    Equal step width keeps the x axis linear when the logging cadence changes; bins that would hold no logged step
    are dropped rather than sent empty. With no more steps than ``max_bins`` each step is its own bin.
    """
    steps = np.asarray(steps, dtype=np.int64)
    lo, hi = window(steps, start, end)
    return bin_range(steps, lo, hi, max_bins)


def bin_range(steps: np.ndarray, lo: int, hi: int, max_bins: int) -> StepBins:
    """:func:`bin_steps` over the slice ``steps[lo:hi]`` of a sorted step array."""
    if max_bins < 1:
        raise ValueError("max_bins must be at least 1")
    inside = np.asarray(steps[lo:hi], dtype=np.int64)
    n = inside.shape[0]
    if n <= max_bins:
        starts = np.arange(n, dtype=np.int64)
    else:
        first, last = int(inside[0]), int(inside[-1])
        # float64 is exact for the step offsets (below 2**52) and much faster than Python ints.
        index = np.floor((inside - first).astype(np.float64) * max_bins / (last - first + 1)).astype(np.int64)
        starts = np.concatenate(([0], np.flatnonzero(np.diff(index)) + 1)).astype(np.int64)
    ends = np.append(starts[1:], n) - 1 if n else starts
    return StepBins(lo=lo, hi=hi, starts=starts, bin_start=inside[starts], bin_end=inside[ends])


def max_pool(
    values: np.ndarray, bins: StepBins, present: np.ndarray | None = None, divide_by: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Max-pool rows ``bins.lo:bins.hi`` of ``values`` (``[steps]`` or ``[steps, layers]``) into the bins.

    Returns ``(pooled, nonfinite)``: ``pooled`` (float64, bins first) is the largest *finite* logged value of each
    bin, NaN where the bin holds none; ``nonfinite`` (bool, same shape) says whether the bin held a logged NaN/Inf.
    ``present`` (same shape as ``values``) marks which entries were logged at all; absent entries count as neither.
    ``divide_by`` pools the update ratio ``values / divide_by`` (:func:`types.update_ratio`) a chunk at a time, so
    the full-size ratio matrix is never built.
    """
    values = np.asarray(values)
    tail = values.shape[1:]
    pooled = np.full((bins.count, *tail), np.nan, dtype=np.float64)
    nonfinite = np.zeros((bins.count, *tail), dtype=bool)
    if bins.count == 0:
        return pooled, nonfinite
    row_elems = max(1, int(np.prod(tail, dtype=np.int64)))
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row_elems)
    starts = bins.starts
    b0 = 0
    while b0 < bins.count:
        # Take whole bins so that no bin straddles two chunks; always at least one bin.
        limit = starts[b0] + rows_per_chunk
        b1 = max(b0 + 1, int(np.searchsorted(starts, limit, side="right")) - 1)
        if b1 <= b0:
            b1 = b0 + 1
        r0 = int(starts[b0])
        r1 = int(starts[b1]) if b1 < bins.count else bins.hi - bins.lo
        chunk = values[bins.lo + r0:bins.lo + r1]
        if divide_by is not None:
            chunk = update_ratio(chunk, divide_by[bins.lo + r0:bins.lo + r1])
        finite = np.isfinite(chunk)
        bad = ~finite
        if present is not None:
            mask = np.asarray(present[bins.lo + r0:bins.lo + r1], dtype=bool)
            finite &= mask
            bad &= mask
        clean = np.where(finite, chunk, np.nan)
        rel = starts[b0:b1] - r0
        with np.errstate(invalid="ignore"):
            pooled[b0:b1] = np.fmax.reduceat(clean, rel, axis=0)
        nonfinite[b0:b1] = np.logical_or.reduceat(bad, rel, axis=0)
        b0 = b1
    return pooled, nonfinite


@dataclass(frozen=True)
class Envelope:
    """A 1-D series reduced to points: per point its bin, max (the plotted value), min, and where the max was."""

    bin_start: np.ndarray  # int64
    bin_end: np.ndarray  # int64
    values: np.ndarray  # float64: max of the finite values in the bin (NaN: none)
    min: np.ndarray  # float64
    max: np.ndarray  # float64 (== values; kept separate for the JSON contract)
    peak_index: np.ndarray  # int64 index into the full series of each bin's max (-1: none)
    nonfinite: np.ndarray  # bool

    @property
    def full_resolution(self) -> bool:
        return bool(np.all(self.bin_start == self.bin_end))

    @staticmethod
    def concat(parts: list[Envelope]) -> Envelope:
        fields = ("bin_start", "bin_end", "values", "min", "max", "peak_index", "nonfinite")
        return Envelope(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


def envelope(values: np.ndarray, bins: StepBins, present: np.ndarray | None = None) -> Envelope:
    """Min/max envelope of a 1-D series over ``bins``; at full resolution min == max == the value."""
    values = np.asarray(values, dtype=np.float64)
    n = bins.count
    if n == 0:
        empty_f = np.zeros(0, dtype=np.float64)
        empty_i = np.zeros(0, dtype=np.int64)
        return Envelope(bins.bin_start, bins.bin_end, empty_f, empty_f, empty_f, empty_i, np.zeros(0, dtype=bool))
    seg = values[bins.lo:bins.hi]
    good = np.isfinite(seg)
    bad = ~good
    if present is not None:
        mask = np.asarray(present[bins.lo:bins.hi], dtype=bool)
        good &= mask
        bad &= mask
    clean = np.where(good, seg, np.nan)
    with np.errstate(invalid="ignore"):
        hi = np.fmax.reduceat(clean, bins.starts)
        lo = np.fmin.reduceat(clean, bins.starts)
    nonfinite = np.logical_or.reduceat(bad, bins.starts)
    # Index of each bin's (first) maximum: positions equal to their bin's max, first one per bin.
    owner = np.repeat(np.arange(n), bins.sizes())
    hits = np.flatnonzero(clean == hi[owner])
    peak = np.full(n, -1, dtype=np.int64)
    if hits.size:
        first_bins, first_at = np.unique(owner[hits], return_index=True)
        peak[first_bins] = hits[first_at] + bins.lo
    return Envelope(bins.bin_start, bins.bin_end, hi, lo, hi.copy(), peak, nonfinite)


def split_envelope(
    steps: np.ndarray,
    values: np.ndarray,
    start: int | None,
    end: int | None,
    *,
    full_max: int,
    outside_bins: int,
    present: np.ndarray | None = None,
) -> Envelope:
    """Full resolution inside ``[start, end]`` (binned to ``full_max`` points if the window holds more steps), a
    min/max envelope of ``outside_bins`` points in all outside it (shared by the two sides by their step spans).

    This is what a drill-down chart needs: exact values where the user is looking, the shape of the rest.
    """
    steps = np.asarray(steps, dtype=np.int64)
    lo, hi = window(steps, start, end)
    n_left, n_right = lo, len(steps) - hi
    span_left = int(steps[lo - 1] - steps[0] + 1) if n_left else 0
    span_right = int(steps[-1] - steps[hi] + 1) if n_right else 0
    share_left = max(1, round(outside_bins * span_left / (span_left + span_right))) if n_left else 0
    share_right = max(1, outside_bins - share_left)
    parts = [
        envelope(values, bin_range(steps, a, b, nb), present)
        for a, b, nb in ((0, lo, share_left), (lo, hi, full_max), (hi, len(steps), share_right))
        if b > a
    ]
    return Envelope.concat(parts) if parts else envelope(values, bin_range(steps, 0, 0, 1), present)
