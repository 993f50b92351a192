"""The robust baseline every series is judged against, online (point by point) and offline (solved at once).

Every series is judged against its *own recent robust baseline*, in log space: the points of a series are cut into
blocks of ``block`` points; each finished block contributes its median and its median absolute deviation (MAD) with
the points that crossed the threshold left out; the baseline of the next block is the median of the last
``window_blocks`` block medians, the noise scale the median of their MADs. A point crosses when it is at least
``ratio`` times its baseline *and* ``z`` robust standard deviations above it. Why this shape:

* medians of medians ignore single spikes, ramps and plateaus shorter than half the window, yet follow LR warm-up,
  fast early decay and the slow late rise of normalised nets with weight decay (none of which is an explosion);
* the noise term keeps noisy small-batch series quiet without losing sensitivity on smooth ones;
* a level that stays above the threshold for ``readapt_blocks`` blocks is accepted as the new normal, so a
  deliberate change (a new LR) costs one episode, not the rest of the run;
* until a series has a full window of history (``mature_history``) only ``max_ratio`` crosses: gradient norms grow
  10-100x over the first tens of steps of a healthy run, and a baseline of a few blocks of that growth is no reference;
* the state of a series is a few blocks of numbers: offline it is run block by block over all layers at once
  (vectorised numpy), online point by point with the very same arithmetic, so both report the same episodes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..types import update_ratio
from .config import DetectorConfig

#: Scale of a normal distribution's median absolute deviation to its standard deviation.
MAD_TO_SIGMA = 1.4826


def _nanmedian0(a: np.ndarray) -> np.ndarray:
    """Median along axis 0 ignoring NaN (NaN where a column has no value); sort-based, so it is fast and exact."""
    s = np.sort(a, axis=0)  # NaN sorts last
    nan = np.isnan(a)
    k = a.shape[0]
    if not nan.any():
        return 0.5 * (s[(k - 1) // 2] + s[k // 2])
    n = k - nan.sum(axis=0)
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.maximum(n // 2, 0)
    cols = np.arange(a.shape[1])
    with np.errstate(invalid="ignore"):
        med = 0.5 * (s[lo, cols] + s[hi, cols])
    med[n == 0] = np.nan
    return med


class Baseline:
    """Robust log-space baseline of ``n`` parallel series (columns), advanced one finished block at a time."""

    def __init__(self, n: int, cfg: DetectorConfig, ratio: float, z: float, min_history: int, mature: int) -> None:
        self.cfg = cfg
        self.min_history = min_history
        self.mature = mature
        self.log_ratio = math.log(ratio)
        self.log_max = math.log(max(cfg.max_ratio, ratio))
        self.z = z
        k = cfg.window_blocks
        self.med = np.full((k, n), np.nan)
        self.mad = np.full((k, n), np.nan)
        self.pos = 0
        self.hist = np.zeros(n, dtype=np.int64)
        self.hot = np.zeros(n, dtype=np.int64)
        self._limits: tuple[np.ndarray, np.ndarray] | None = None
        # online buffer of the block being filled
        self.buf = np.full((cfg.block, n), np.nan)
        self.buf_flag = np.zeros((cfg.block, n), dtype=bool)
        self.buf_raw = np.full((cfg.block, n), np.nan)
        self.fill = 0

    @property
    def n(self) -> int:
        return self.med.shape[1]

    def grow(self, n: int) -> None:
        """Add columns (layers seen for the first time); they start with no history."""
        extra = n - self.n
        if extra <= 0:
            return

        def pad(a: np.ndarray, value: float | bool) -> np.ndarray:
            return np.concatenate([a, np.full((a.shape[0], extra), value, dtype=a.dtype)], axis=1)

        self.med, self.mad = pad(self.med, np.nan), pad(self.mad, np.nan)
        self.buf, self.buf_raw = pad(self.buf, np.nan), pad(self.buf_raw, np.nan)
        self.buf_flag = pad(self.buf_flag, False)
        self.hist = np.concatenate([self.hist, np.zeros(extra, dtype=np.int64)])
        self.hot = np.concatenate([self.hot, np.zeros(extra, dtype=np.int64)])
        self._limits = None

    def limits(self) -> tuple[np.ndarray, np.ndarray]:
        """(baseline, threshold) in log space for the points of the current block; threshold +inf while warming up."""
        if self._limits is None:
            base = _nanmedian0(self.med)
            sigma = _nanmedian0(self.mad) * MAD_TO_SIGMA
            with np.errstate(invalid="ignore"):
                thr = base + np.clip(self.z * sigma, self.log_ratio, self.log_max)
            young = self.hist < self.mature
            thr[young] = base[young] + self.log_max
            thr[(self.hist < self.min_history) | np.isnan(thr)] = np.inf
            self._limits = (base, thr)
        return self._limits

    def push(self, clean: np.ndarray, flagged: np.ndarray, raw: np.ndarray) -> None:
        """Finish a block: ``clean`` holds its valid, uncrossed log values (NaN elsewhere), ``raw`` all finite ones."""
        cfg = self.cfg
        base, _ = self.limits()
        med = _nanmedian0(clean)
        mad = _nanmedian0(np.abs(clean - med))
        nflag = flagged.sum(axis=0)
        self.hot = np.where(nflag * 2 > clean.shape[0], self.hot + 1, 0)
        readapt = self.hot >= cfg.readapt_blocks
        if readapt.any():
            rmed = _nanmedian0(raw)
            rmad = _nanmedian0(np.abs(raw - rmed))
            med = np.where(readapt, rmed, med)
            mad = np.where(readapt, rmad, mad)
        carry = np.isnan(med) & (nflag > 0)  # every point crossed: keep the baseline where it was
        med = np.where(carry, base, med)
        self.med[self.pos] = med
        self.mad[self.pos] = mad
        self.pos = (self.pos + 1) % cfg.window_blocks
        self.hist += (~np.isnan(raw)).sum(axis=0)
        self._limits = None

    def judge(self, logv: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crossings of ``logv`` (rows of the current block) and their log excess over the baseline."""
        base, thr = self.limits()
        with np.errstate(invalid="ignore"):
            cross = valid & (logv > thr)
            excess = logv - base
        return cross, excess, base

    def below(self, logv: np.ndarray, valid: np.ndarray, log_low: float) -> np.ndarray:
        """The log baseline of the points at least ``log_low`` below it (NaN elsewhere), for series with a full window
        of history (a young series has no reference to vanish from); call before :meth:`step`."""
        base, _ = self.limits()
        mature = (self.hist >= self.mature) & (self.hist >= self.min_history)
        with np.errstate(invalid="ignore"):
            return np.where(valid & mature & (logv - base < -log_low), base, np.nan)

    def step(self, logv: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Online: judge one point of every column, then buffer it (finishing the block when full)."""
        cross, excess, _ = self.judge(logv, valid)
        self.buf[self.fill] = np.where(valid & ~cross, logv, np.nan)
        self.buf_flag[self.fill] = cross
        self.buf_raw[self.fill] = np.where(valid, logv, np.nan)
        self.fill += 1
        if self.fill == self.cfg.block:
            self.push(self.buf, self.buf_flag, self.buf_raw)
            self.buf = np.full_like(self.buf, np.nan)
            self.buf_raw = np.full_like(self.buf_raw, np.nan)
            self.buf_flag = np.zeros_like(self.buf_flag)
            self.fill = 0
        return cross, excess


def log_positive(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Natural log of positive finite values, and the mask of those values."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(v) & (v > 0)
        return np.where(ok, np.log(np.where(ok, v, 1.0)), np.nan), ok


def baseline_band(
    steps: np.ndarray, values: np.ndarray, config: DetectorConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(robust baseline, explosion threshold) per point of one series, in value units, for the UI's drill-down band.

    The threshold is +inf where the series has too little history to judge (and NaN baseline where it has none).
    """
    cfg = config or DetectorConfig()
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if steps.shape[0] != values.shape[0]:
        raise ValueError(f"steps ({steps.shape[0]}) and values ({values.shape[0]}) differ in length")
    _, base, thr, _ = solve(Points(values[:, None], np.ones((values.shape[0], 1), dtype=bool)), cfg, cfg.ratio, cfg.z,
                          cfg.min_history, cfg.mature_history, full=True)
    per_point = np.arange(values.shape[0]) // cfg.block
    with np.errstate(over="ignore"):
        return np.exp(base[per_point, 0]), np.exp(thr[per_point, 0])


class Points:
    """One metric of ``n`` parallel series as log values, computed a row chunk or a set of points at a time.

    The offline solver never holds a float64 copy of a whole metric: at 500 layers x 100k steps that alone would be
    twice the input. An update ratio is given as ``values / den`` and divided where it is read.
    """

    def __init__(self, values: np.ndarray, valid: np.ndarray, den: np.ndarray | None = None) -> None:
        self.values, self.valid, self.den = values, valid, den

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape

    def raw(self, rows: slice | np.ndarray, cols: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The metric's values (float32 update ratios, like :meth:`RunData.update_ratio`)."""
        if self.den is None:
            return self.values[rows, cols]
        return update_ratio(self.values[rows, cols], self.den[rows, cols])

    def usable(self, rows: slice | np.ndarray, cols: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(values, mask of the valid, finite, positive ones)."""
        v = self.raw(rows, cols)
        with np.errstate(invalid="ignore"):
            return v, self.valid[rows, cols] & np.isfinite(v) & (v > 0)

    def logs(self, rows: slice | np.ndarray, cols: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(log values, usable mask): NaN where a point is not usable."""
        logv, ok = log_positive(self.raw(rows, cols))
        ok &= self.valid[rows, cols]
        logv[~ok] = np.nan
        return logv, ok


def nanmedian_last(a: np.ndarray) -> np.ndarray:
    """Median along the last axis ignoring NaN (NaN where nothing is left); the arithmetic of :func:`_nanmedian0`."""
    s = np.sort(a, axis=-1)  # NaN sorts last
    k = a.shape[-1]
    if not np.isnan(s[..., -1]).any():
        return 0.5 * (s[..., (k - 1) // 2] + s[..., k // 2])
    n = k - np.isnan(s).sum(axis=-1)
    lo = np.maximum((n - 1) // 2, 0)[..., None]
    hi = np.maximum(n // 2, 0)[..., None]
    with np.errstate(invalid="ignore"):
        med = 0.5 * (np.take_along_axis(s, lo, -1)[..., 0] + np.take_along_axis(s, hi, -1)[..., 0])
    med[n == 0] = np.nan
    return med


def _run_length(flags: np.ndarray) -> np.ndarray:
    """Per column, how many consecutive rows up to and including each row are True."""
    idx = np.arange(flags.shape[0])[:, None]
    last_false = np.maximum.accumulate(np.where(flags, -1, idx), axis=0)
    return idx - last_false


#: Batcher's sorting network for 8 values, without the last two comparators the 4th smallest does not depend on.
_NETWORK8 = ((0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7), (0, 1), (2, 3), (4, 5), (6, 7), (2, 4),
             (3, 5), (1, 4), (3, 6))


def _block_floor(x: np.ndarray, ok: np.ndarray, tight: bool) -> np.ndarray:
    """Per block ``[blocks, b, n]`` (unusable points +inf) and column, a value no larger than its median (+inf if none).

    The block's smallest value; with ``tight``, for a full block of 8, its 4th smallest (from a sorting network: no
    sort, no log), which rules out far more points of a noisy series.
    """
    low = x.min(axis=1)
    if not tight or x.shape[1] != 8:
        return low
    a = [x[:, i] for i in range(8)]
    for i, j in _NETWORK8:
        a[i], a[j] = np.minimum(a[i], a[j]), np.maximum(a[i], a[j])
    return np.where(ok.all(axis=1), np.minimum(a[3], a[4]), low)


class Solved(NamedTuple):
    """What :func:`solve` found."""

    cross: np.ndarray  # [N, n] the points that crossed
    base: np.ndarray  # [blocks, n] log baseline (exact for the blocks judged exactly, or all with ``full``; else NaN)
    thr: np.ndarray  # [blocks, n] log threshold (likewise; +inf elsewhere)
    #: with ``low_ratio``: (rows, columns, log baseline) of the points ``low_ratio`` or more below their baseline, in
    #: a series with a full window of history (as :meth:`Baseline.below` finds them one by one)
    low: tuple[np.ndarray, np.ndarray, np.ndarray] | None


def solve(pts: Points, cfg: DetectorConfig, ratio: float, z: float, min_history: int, mature: int, *,
          full: bool = False, low_ratio: float | None = None) -> Solved:
    """Offline judgement of every point, equal to feeding them one by one through :class:`Baseline`.

    Sequentially, block ``k``'s baseline depends on the medians of the blocks before it, and those medians on which of
    their points crossed. Crossings are rare, so this solves the recurrence as a fixed point instead of block by
    block. First, over all blocks and layers at once and without a single log, a lower bound of every baseline (the
    smallest of the window's block-median lower bounds, as if nothing had crossed) rules out nearly every point: a
    point can cross only above ``ratio`` x its baseline. Only the blocks left are judged exactly; then only the (block,
    layer) pairs whose inputs changed are re-judged, until nothing changes. Dependencies only point forward, so the
    fixed point is unique and is the sequential result, to the bit. Points far *below* their baseline are found the
    same way from the other side: an upper bound of every baseline (the largest block maximum of its window) rules out
    nearly every point, and the blocks left get their exact baseline once the crossings have settled.
    """
    n_pts, n = pts.shape
    b, w = cfg.block, cfg.window_blocks
    kf = n_pts // b  # full blocks (pushed into the baseline); a trailing partial block is only judged
    ka = -(-n_pts // b)
    log_ratio, log_max = math.log(ratio), math.log(max(cfg.max_ratio, ratio))
    cross = np.zeros((n_pts, n), dtype=bool)
    base = np.full((ka, n), np.nan)
    thr = np.full((ka, n), np.inf)
    if n_pts == 0 or n == 0:
        return Solved(cross, base, thr, None if low_ratio is None else _no_points())
    # padded rings: row w + k holds block k's (median, MAD), filled where first needed (every read of a block is
    # preceded by ensure_stats); block k's window is rows k .. k + w - 1
    med = np.empty((w + kf, n))
    mad = np.empty((w + kf, n))
    med[:w] = mad[:w] = np.nan
    known = np.zeros((kf, n), dtype=bool)
    floor = np.empty((w + kf, n))  # lower bounds of the block medians, in value units
    floor[:w] = np.inf
    ceil = np.empty((w + kf, n)) if low_ratio is not None else None  # upper bounds of the block medians
    if ceil is not None:
        ceil[:w] = -np.inf
    warm = np.zeros((ka, n), dtype=bool)
    young = np.zeros((ka, n), dtype=bool)  # fewer than ``mature`` points before the block: only log_max crosses

    def ensure_stats(kk: np.ndarray, jj: np.ndarray) -> None:
        """Exact (median, MAD) of full blocks not seen yet, as if none of their points crossed (their first guess)."""
        sel = ~known[kk, jj]
        if not sel.any():
            return
        key = np.unique(kk[sel] * n + jj[sel])
        uk, uj = key // n, key % n
        _, _, logv, _ = points(uk, uj)
        m = nanmedian_last(logv)
        med[w + uk, uj], mad[w + uk, uj] = m, nanmedian_last(np.abs(logv - m[:, None]))
        known[uk, uj] = True

    def limits(kk: np.ndarray, jj: np.ndarray) -> None:
        wk = kk[:, None] + np.arange(-w, 0)[None, :]
        inside = wk >= 0
        ensure_stats(wk[inside], np.broadcast_to(jj[:, None], wk.shape)[inside])
        win = wk + w
        bs = nanmedian_last(med[win, jj[:, None]])
        sigma = nanmedian_last(mad[win, jj[:, None]]) * MAD_TO_SIGMA
        with np.errstate(invalid="ignore"):
            t = bs + np.clip(z * sigma, log_ratio, log_max)
        y = young[kk, jj]
        t[y] = bs[y] + log_max
        t[warm[kk, jj] | np.isnan(t)] = np.inf
        base[kk, jj], thr[kk, jj] = bs, t

    def points(kk: np.ndarray, jj: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = kk[:, None] * b + np.arange(b)[None, :]
        inside = rows < n_pts
        rows = np.minimum(rows, n_pts - 1)
        cols = np.broadcast_to(jj[:, None], rows.shape)
        logv, ok = pts.logs(rows, cols)
        logv[~inside] = np.nan
        return rows, cols, logv, ok & inside

    def judge(kk: np.ndarray, jj: np.ndarray) -> np.ndarray:
        """Judge the points of the given blocks against their limits; returns their crossing counts."""
        rows, cols, logv, ok = points(kk, jj)
        with np.errstate(invalid="ignore"):
            c = ok & (logv > thr[kk, jj][:, None])
        cross[rows[ok], cols[ok]] = c[ok]
        return c.sum(axis=1)

    # first pass, over all blocks and layers at once and in value units (no log): candidates are the points above ratio
    # x the lower bound of their baseline (with a margin for the rounding of log and exp)
    seen = np.zeros(n, dtype=np.int64)
    chunk = max(1, (1 << 21) // (n * b))  # blocks per chunk: about 2M points
    factor = ratio * (1 - 1e-9)
    cand: list[np.ndarray] = []
    low_cand: list[np.ndarray] = []
    for k0 in range(0, ka, chunk):
        k1 = min(ka, k0 + chunk)
        v, ok = pts.usable(slice(k0 * b, min(n_pts, k1 * b)))
        if v.shape[0] < (k1 - k0) * b:  # the trailing partial block
            pad = (k1 - k0) * b - v.shape[0]
            v = np.concatenate([v, np.zeros((pad, n), dtype=v.dtype)])
            ok = np.concatenate([ok, np.zeros((pad, n), dtype=bool)])
        v, ok = v.reshape(k1 - k0, b, n), ok.reshape(k1 - k0, b, n)
        nfull = min(k1, kf) - k0
        if (seen < max(min_history, mature)).any():  # points seen before each block, until every layer has enough
            counts = ok.sum(axis=1)
            before = seen + np.cumsum(counts, axis=0) - counts
            warm[k0:k1] = before < min_history
            young[k0:k1] = before < mature
            seen += counts.sum(axis=0)
        x = np.where(ok, v, np.inf)
        if ceil is not None:
            low_cand.append(_below_candidates(v, ok, ceil, k0, k1, nfull, w, low_ratio, warm[k0:k1] | young[k0:k1]))
        for tight in (False, True):  # the cheap floor first; the tight one where it leaves too many candidates
            floor[w + k0:w + k0 + nfull] = _block_floor(x[:nfull], ok[:nfull], tight)
            lb = floor[k0:k1 + w - 1]
            span = 1
            while span < w:  # sliding minimum over w rows, by doubling: lb[k] is the least floor of block k's window
                step = min(span, w - span)
                lb = np.minimum(lb[:-step], lb[step:])
                span += step
            lb = lb * factor
            lb[warm[k0:k1]] = np.inf
            hot = (x < np.inf) & (x >= lb[:, None, :])
            hot = hot.any(axis=1)
            if hot.sum() * 1000 <= hot.size:
                break
        ck, cj = np.nonzero(hot)
        cand.append((ck + k0) * n + cj)
    nflag = np.zeros((kf, n), dtype=np.int32)
    if full:
        kk, jj = np.divmod(np.arange(ka * n), n)
    else:
        kk, jj = np.divmod(np.concatenate(cand), n)
    if kk.size:
        limits(kk, jj)
        flags = judge(kk, jj)
        isfull = kk < kf
        nflag[kk[isfull], jj[isfull]] = flags[isfull]
    maj = nflag * 2 > b
    readapt = np.zeros((kf, n), dtype=bool)
    hot_cols = np.nonzero(maj.any(axis=0))[0]
    if hot_cols.size:
        readapt[:, hot_cols] = _run_length(maj[:, hot_cols]) >= cfg.readapt_blocks

    def settle(kk: np.ndarray, jj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Recompute the (median, MAD) of full blocks from their current inputs; returns the blocks that changed."""
        ensure_stats(kk, jj)
        rows, cols, logv, ok = points(kk, jj)
        flagged = nflag[kk, jj] > 0
        # the points that crossed are left out, unless the block's level is being adopted as the new normal
        clean = np.where((readapt[kk, jj] | ~flagged)[:, None] | ~cross[rows, cols], logv, np.nan)
        new_med = nanmedian_last(clean)
        new_mad = nanmedian_last(np.abs(clean - new_med[:, None]))
        carry = np.isnan(new_med) & flagged  # every point crossed: the baseline stays where it was
        new_med[carry] = base[kk, jj][carry]
        old_med, old_mad = med[w + kk, jj], mad[w + kk, jj]
        diff = ~((new_med == old_med) | (np.isnan(new_med) & np.isnan(old_med)))
        diff |= ~((new_mad == old_mad) | (np.isnan(new_mad) & np.isnan(old_mad)))
        med[w + kk, jj], mad[w + kk, jj] = new_med, new_mad
        return kk[diff], jj[diff]

    kk, jj = settle(*np.nonzero((nflag > 0) | readapt))
    while kk.size:
        # every block whose window holds a changed block is judged again
        nk = (kk[:, None] + np.arange(1, w + 1)[None, :]).ravel()
        nj = np.repeat(jj, w)
        keep = nk < ka
        key = np.unique(nk[keep] * n + nj[keep])
        dk, dj = key // n, key % n
        limits(dk, dj)
        flags = judge(dk, dj)
        isfull = dk < kf
        fk, fj, ff = dk[isfull], dj[isfull], flags[isfull]
        changed_cols = np.unique(fj[(ff * 2 > b) != maj[fk, fj]])
        nflag[fk, fj] = ff
        maj[fk, fj] = ff * 2 > b
        if changed_cols.size:
            ra = _run_length(maj[:, changed_cols]) >= cfg.readapt_blocks
            ek, ei = np.nonzero(ra != readapt[:, changed_cols])
            readapt[:, changed_cols] = ra
            if ek.size:
                key = np.unique(np.concatenate([fk * n + fj, ek * n + changed_cols[ei]]))
                fk, fj = key // n, key % n
        kk, jj = settle(fk, fj)
    if low_ratio is None:
        return Solved(cross, base, thr, None)
    # the crossings have settled, so every block's median is final: exact baselines for the blocks that may hold low
    # points (a block never judged had no crossing, so its first-guess median is its final one)
    key = np.concatenate(low_cand)
    if not key.size:
        return Solved(cross, base, thr, _no_points())
    kk, jj = np.divmod(key, n)
    limits(kk, jj)
    rows, cols, logv, ok = points(kk, jj)
    at = np.broadcast_to(base[kk, jj][:, None], logv.shape)
    with np.errstate(invalid="ignore"):
        hit = ok & ~(warm[kk, jj] | young[kk, jj])[:, None] & (logv - at < -math.log(low_ratio))
    return Solved(cross, base, thr, (rows[hit], cols[hit], at[hit]))


def _no_points() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.zeros(0, dtype=np.int64)
    return z, z, np.zeros(0)


def _below_candidates(v: np.ndarray, ok: np.ndarray, ceil: np.ndarray, k0: int, k1: int, nfull: int, w: int,
                      low_ratio: float, immature: np.ndarray) -> np.ndarray:
    """Keys ``block * n + column`` of the pairs among blocks ``k0..k1`` (``v``, ``ok``: ``[blocks, b, n]``) holding a
    point that may lie ``low_ratio`` below its baseline, after recording the full blocks' maxima in ``ceil``: a block's
    median is at most its largest usable value, so a window's baseline is at most the largest of those."""
    top = np.where(ok, v, -np.inf).max(axis=1)
    ceil[w + k0:w + k0 + nfull] = top[:nfull]
    ub = ceil[k0:k1 + w - 1]
    span = 1
    while span < w:  # sliding maximum over w rows, by doubling
        step = min(span, w - span)
        ub = np.maximum(ub[:-step], ub[step:])
        span += step
    with np.errstate(invalid="ignore", over="ignore"):
        may = ok & (v.astype(np.float64) * (low_ratio * (1 - 1e-9)) <= ub[:, None, :])
    ck, cj = np.nonzero(may.any(axis=1) & ~immature)
    return (ck + k0) * v.shape[2] + cj
