"""A min/max pyramid of a run's series: max-pooled blocks of logged steps at several resolutions, small enough to keep
in memory for every run, from which a heatmap of any zoom is pooled exactly.

A level holds, per block of ``block`` consecutive logged steps (rows) and per layer, the largest *finite* logged value
(NaN where there is none) and whether the block held a logged non-finite value; line series keep the smallest finite
value too. Blocks grow by :data:`FACTOR` from level to level. Max-pooling is associative, so a bin of any width is the
maximum of the widest whole blocks inside it plus the few rows at its edges read at full resolution:
:func:`max_pool` gives bit for bit what :func:`binning.max_pool` gives over all rows, while reading at most
``2 * (BASE_BLOCK - 1)`` full-resolution rows per bin. No one-step spike is lost at any zoom: a block's maximum is
its spike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import binning
from .types import update_ratio

#: Rows per block of the finest level: small enough that zoomed-out bins are mostly whole blocks, large enough that
#: the levels of every run fit in memory (about 1/100 of the full-resolution values).
BASE_BLOCK = 128
#: Blocks of the next level up hold this many blocks of the level below.
FACTOR = 4


@dataclass
class Level:
    """One resolution: ``block`` rows per entry."""

    block: int
    max: np.ndarray  # float32 [blocks, *tail]: largest finite logged value, NaN where none
    bad: np.ndarray  # bool [blocks, *tail]: a logged NaN/Inf in the block
    min: np.ndarray | None = None  # float32, line series only: smallest finite logged value

    @property
    def nbytes(self) -> int:
        return self.max.nbytes + self.bad.nbytes + (0 if self.min is None else self.min.nbytes)


@dataclass
class Pyramid:
    """The levels of one series (``[rows]``) or one per-layer metric (``[rows, layers]``), finest first."""

    rows: int
    levels: list[Level]

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels)


def _whole_bins(rows: int, block: int) -> binning.StepBins:
    starts = np.arange(0, rows, block, dtype=np.int64)
    return binning.StepBins(lo=0, hi=rows, starts=starts, bin_start=starts, bin_end=starts)


def build(values: np.ndarray, present: np.ndarray | None = None, divide_by: np.ndarray | None = None, *,
          with_min: bool = False, base: int = BASE_BLOCK, factor: int = FACTOR) -> Pyramid:
    """The pyramid of ``values`` (rows = logged steps); ``present`` and ``divide_by`` as in :func:`binning.max_pool`.

    Levels stop once a level has at most ``factor`` blocks (above that a heatmap of a few hundred bins needs no
    coarser level). Runs shorter than ``base`` rows get no level: they are read at full resolution, which is cheap.
    """
    values = np.asarray(values) if not isinstance(values, np.ndarray) else values
    rows = int(values.shape[0])
    levels: list[Level] = []
    if rows < base:
        return Pyramid(rows, levels)
    low = None
    if with_min:
        bins = _whole_bins(rows, base)
        pooled, bad = binning.max_pool(values, bins, present, divide_by)
        low = -binning.max_pool(-np.asarray(values, dtype=np.float64), bins, present)[0]
    else:
        pooled, bad = _base_level(values, present, divide_by, base)
    level = Level(base, pooled.astype(np.float32), bad, None if low is None else low.astype(np.float32))
    return Pyramid(rows, _with_coarser(level, factor))


def extend(old: Pyramid | None, values: np.ndarray, present: np.ndarray | None = None,
           divide_by: np.ndarray | None = None, *, base: int = BASE_BLOCK, factor: int = FACTOR) -> Pyramid:
    """The pyramid of ``values`` when its first ``old.rows`` rows are the ones ``old`` was built from, unchanged
    (a live run's appended steps): only the finest level's last, partial block and the blocks after it are pooled
    from ``values``; the coarser levels, 1/4 of the size each, are pooled again from the finest. Equal to
    :func:`build` on ``values``. Without a usable ``old`` (none, more rows, other columns): :func:`build`."""
    rows = int(values.shape[0])
    if (old is None or not old.levels or old.rows > rows or old.levels[0].block != base
            or old.levels[0].min is not None or old.levels[0].max.shape[1:] != values.shape[1:]):
        return build(values, present, divide_by, base=base, factor=factor)
    keep = old.rows // base
    start = keep * base
    pooled, bad = _base_level(values[start:], None if present is None else present[start:],
                              None if divide_by is None else divide_by[start:], base)
    finest = old.levels[0]
    level = Level(base, np.concatenate([finest.max[:keep], pooled.astype(np.float32)]),
                  np.concatenate([finest.bad[:keep], bad]))
    return Pyramid(rows, _with_coarser(level, factor))


def _with_coarser(level: Level, factor: int) -> list[Level]:
    """The finest level and the coarser ones pooled from it, until a level has at most ``factor`` blocks."""
    levels = [level]
    while level.max.shape[0] > factor:
        starts = np.arange(0, level.max.shape[0], factor)
        with np.errstate(invalid="ignore"):
            up_max = np.fmax.reduceat(level.max, starts, axis=0)
            up_min = None if level.min is None else np.fmin.reduceat(level.min, starts, axis=0)
        level = Level(level.block * factor, up_max, np.logical_or.reduceat(level.bad, starts, axis=0), up_min)
        levels.append(level)
    return levels


def _base_level(values: np.ndarray, present: np.ndarray | None, divide_by: np.ndarray | None,
                base: int) -> tuple[np.ndarray, np.ndarray]:
    """The finest level: what :func:`binning.max_pool` gives over blocks of ``base`` rows, at a fraction of its cost.

    Most blocks are fully logged and finite: their maximum is a plain reduction over the block axis (one pass; NaN
    and inf propagate into the block's max or min, so a block that held one is recognised and pooled the careful way
    with the rest of the few such blocks).
    """
    rows, tail = int(values.shape[0]), values.shape[1:]
    full = rows // base
    row_elems = max(1, int(np.prod(tail, dtype=np.int64)))
    chunk_blocks = max(1, binning.CHUNK_ELEMENTS // (row_elems * base))
    pooled = np.full((-(-rows // base), *tail), np.nan, dtype=np.float64)
    bad = np.zeros(pooled.shape, dtype=bool)
    for b0 in range(0, full, chunk_blocks):
        b1 = min(full, b0 + chunk_blocks)
        r0, r1 = b0 * base, b1 * base
        chunk = np.asarray(values[r0:r1])
        if divide_by is not None:
            chunk = update_ratio(chunk, divide_by[r0:r1])
        blocks = chunk.reshape(b1 - b0, base, *tail)
        top, bottom = blocks.max(axis=1), blocks.min(axis=1)
        easy = np.isfinite(top) & np.isfinite(bottom)
        if present is not None:
            easy &= np.asarray(present[r0:r1], dtype=bool).reshape(b1 - b0, base, *tail).all(axis=1)
        pooled[b0:b1] = top
        hard = np.flatnonzero(~easy.reshape(b1 - b0, -1).all(axis=1))
        if hard.size:
            rows_of = (hard[:, None] * base + np.arange(base)).reshape(-1)
            some = binning.StepBins(lo=0, hi=rows_of.size, starts=np.arange(0, rows_of.size, base),
                                    bin_start=hard, bin_end=hard)
            sub_present = None if present is None else np.asarray(present[r0:r1])[rows_of]
            pooled[b0 + hard], bad[b0 + hard] = binning.max_pool(chunk[rows_of], some, sub_present)
    if full * base < rows:  # the last, partial block
        last = binning.StepBins(lo=full * base, hi=rows, starts=np.zeros(1, dtype=np.int64),
                                bin_start=np.zeros(1, dtype=np.int64), bin_end=np.zeros(1, dtype=np.int64))
        pooled[full:], bad[full:] = binning.max_pool(values, last, present, divide_by)
    return pooled, bad


def _segments(array: np.ndarray, first: np.ndarray, stop: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """``ufunc.reduce(array[first[k]:stop[k]])`` for sorted, disjoint, non-empty segments."""
    index = np.column_stack([first, stop]).ravel()
    if index[-1] == array.shape[0]:
        index = index[:-1]  # the last segment runs to the end
    with np.errstate(invalid="ignore"):
        return ufunc.reduceat(array, index, axis=0)[::2]


def max_pool(pyr: Pyramid | None, values: np.ndarray, bins: binning.StepBins, present: np.ndarray | None = None,
             divide_by: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exactly :func:`binning.max_pool` ``(values, bins, present, divide_by)``, from the pyramid where bins hold
    whole blocks and from ``values`` (full resolution, e.g. a memory map) only at the bins' edges."""
    if pyr is None or not pyr.levels or bins.count == 0 or pyr.rows != values.shape[0]:
        return binning.max_pool(values, bins, present, divide_by)
    tail = values.shape[1:]
    pooled = np.full((bins.count, *tail), np.nan, dtype=np.float64)
    bad = np.zeros((bins.count, *tail), dtype=bool)
    owner = np.arange(bins.count, dtype=np.int64)
    lo = bins.lo + bins.starts
    hi = np.append(lo[1:], bins.hi)
    for level in reversed(pyr.levels):
        b = level.block
        first, stop = -(-lo // b), hi // b
        whole = first < stop
        if not whole.any():
            continue
        at = owner[whole]
        with np.errstate(invalid="ignore"):
            np.fmax.at(pooled, at, _segments(level.max, first[whole], stop[whole], np.fmax))
        np.logical_or.at(bad, at, _segments(level.bad, first[whole], stop[whole], np.logical_or))
        # what is left of each piece: the rows before its first whole block and after its last one
        left_hi, right_lo = first[whole] * b, stop[whole] * b
        parts = [(owner[~whole], lo[~whole], hi[~whole]), (at, lo[whole], left_hi), (at, right_lo, hi[whole])]
        owner, lo, hi = (np.concatenate(column) for column in zip(*parts, strict=True))
        keep = lo < hi
        order = np.argsort(lo[keep], kind="stable")
        owner, lo, hi = owner[keep][order], lo[keep][order], hi[keep][order]
    _pool_rows(values, present, divide_by, owner, lo, hi, pooled, bad)
    return pooled, bad


def _pool_rows(values: np.ndarray, present: np.ndarray | None, divide_by: np.ndarray | None, owner: np.ndarray,
               lo: np.ndarray, hi: np.ndarray, pooled: np.ndarray, bad: np.ndarray) -> None:
    """Fold the full-resolution rows ``lo[k]:hi[k]`` into bin ``owner[k]``, a bounded group of pieces at a time."""
    if not len(owner):
        return
    row_elems = max(1, int(np.prod(values.shape[1:], dtype=np.int64)))
    per_chunk = max(1, binning.CHUNK_ELEMENTS // row_elems)
    lengths = hi - lo
    ends = np.cumsum(lengths)
    k = 0
    while k < len(owner):
        stop = max(k + 1, int(np.searchsorted(ends, ends[k] - lengths[k] + per_chunk, side="right")))
        rows = np.concatenate([np.arange(a, z) for a, z in zip(lo[k:stop].tolist(), hi[k:stop].tolist(), strict=True)])
        chunk = values[rows]
        if divide_by is not None:
            chunk = update_ratio(chunk, divide_by[rows])
        finite = np.isfinite(chunk)
        nonfinite = ~finite
        if present is not None:
            mask = np.asarray(present[rows], dtype=bool)
            finite &= mask
            nonfinite &= mask
        clean = np.where(finite, chunk, np.nan)
        starts = np.concatenate(([0], np.cumsum(lengths[k:stop])[:-1]))
        with np.errstate(invalid="ignore"):
            np.fmax.at(pooled, owner[k:stop], np.fmax.reduceat(clean, starts, axis=0))
        np.logical_or.at(bad, owner[k:stop], np.logical_or.reduceat(nonfinite, starts, axis=0))
        k = stop
