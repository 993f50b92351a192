"""Detection engine: explosion episodes, offending-layer ranking, loss spikes and advice from measured facts.

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

Non-finite values always make an episode (kind ``nonfinite``). AMP overflow skips (the optimizer step skipped and the
loss scale backed off) are reported apart as ``overflow_skip``, unless the loss scale collapses, in which case they
are a ``nonfinite`` episode. With gradient histograms, an episode's advice says whether the mass of the offending
layer's distribution moved (a scale problem) or a thin tail of it (a few units, a bad batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import format as fmt
from .runs import RunData, Series

#: Kinds of episodes; the first two are findings (an auditor fails on them), the last is informational.
EPISODE_KINDS = ("explosion", "nonfinite", "overflow_skip", "val_degradation")
#: The kind of validation findings: a validation metric worsened after its best point, or went non-finite. Not a
#: gradient explosion (``Episode.validation`` says which and why), so ``--fail-on explosion`` does not fail on it.
VAL_KIND = "val_degradation"
#: Validation series the run store provides, by name: whether higher is better (a metric) or lower (a loss).
VALIDATION_SERIES = {"val_loss": False, "val_acc": True, "val_accuracy": True, "val_map": True}
#: Any series named ``val_metric/<name>`` is a validation metric that should rise (e.g. ``val_metric/f1``).
VAL_METRIC_PREFIX = "val_metric/"
#: Name used in findings for the run-level total gradient norm (not a layer of the model).
TOTAL = "total_grad_norm"
_MAD_TO_SIGMA = 1.4826


@dataclass
class DetectorConfig:
    """Every threshold of the detector, with defaults that work across the labeled suite (docs/DETECTION.md)."""

    block: int = 8  # points per baseline block
    window_blocks: int = 8  # the baseline is the median of this many recent block medians
    min_history: int = 24  # valid points a series needs before it can cross (warm-up of the detector itself)
    mature_history: int = 64  # until a series has this many valid points (a full window), only max_ratio crosses
    ratio: float = 5.0  # a gradient norm crosses at ratio x its baseline ...
    z: float = 6.0  # ... and this many robust sigmas (log space) above it
    readapt_blocks: int = 6  # blocks above threshold after which the new level becomes the baseline
    update_ratio_ratio: float = 5.0  # update/param ratio crossing: this many times its own baseline ...
    update_ratio_z: float = 6.0
    update_ratio_floor: float = 1e-2  # ... and above the range that is healthy for most layers
    loss_ratio: float = 10.0  # loss spike: ratio x the loss baseline (a noisy loss often makes benign 5x steps) ...
    loss_z: float = 6.0  # ... and this many robust sigmas above it
    loss_min_history: int = 8  # loss series are often short (one point per epoch)
    loss_back_ratio: float = 3.0  # a loss spike ends once a point is back below this many times the loss baseline
    max_ratio: float = 50.0  # however noisy a series, this many times its baseline always crosses
    merge_gap: int = 10  # crossings at most this many logged steps apart form one episode
    loss_link_points: int = 50  # a loss spike this many logged steps after an episode's end "followed" it
    early_points: int = 10  # non-finite values within the first logged steps point at initialization
    loss_scale_floor: float = 1.0  # an AMP loss scale below this means the overflows are not benign
    loss_scale_drop: float = 2.0**10  # ... so does a scale this many times below its running maximum
    clip_quantile: float = 0.99  # suggested clip threshold: this quantile of the healthy total gradient norm
    depth_growth: float = 10.0  # layer norms growing this much through depth (monotonically) -> advise normalization
    max_layers: int = 20  # findings kept per episode
    hist_mass_shift: float = 0.5  # histograms: the median |g| moved this many decades -> the mass of the distribution
    hist_tail_shift: float = 1.0  # ... else the largest |g| moved this many decades -> a thin tail ...
    hist_tail_share: float = 0.01  # ... unless more than this share of the entries went beyond the old largest (mass)
    val_min_points: int = 8  # finite validation points needed to judge a degradation
    val_patience: int = 3  # ... of which at least this many after the best point
    val_smooth: int = 3  # running median over this many evaluations before the best point is chosen
    val_min_worsening: float = 0.05  # recent validation this much worse (relative) than its best: degraded ...
    val_noise_z: float = 3.0  # ... and this many times the series' own evaluation-to-evaluation noise

    def __post_init__(self) -> None:
        if self.block < 1 or self.window_blocks < 1:
            raise ValueError("block and window_blocks must be at least 1")
        for name in ("ratio", "update_ratio_ratio", "loss_ratio"):
            if not getattr(self, name) > 1.0:
                raise ValueError(f"{name} must be above 1, got {getattr(self, name)!r}")
        if not self.loss_back_ratio >= 1.0:
            raise ValueError(f"loss_back_ratio must be at least 1, got {self.loss_back_ratio!r}")
        if self.merge_gap < 0 or self.min_history < 0 or self.mature_history < 0:
            raise ValueError("merge_gap, min_history and mature_history must be non-negative")
        if not 0.0 < self.hist_tail_share < 1.0:
            raise ValueError(f"hist_tail_share must be between 0 and 1, got {self.hist_tail_share!r}")


@dataclass
class LayerFinding:
    """One layer's part in an episode: which metric crossed, when first, when highest, and how far above baseline."""

    name: str
    metric: str  # grad_norm | update_ratio | grad_max_abs | nonfinite_count | total_grad_norm
    first_step: int
    peak_step: int
    peak_value: float
    ratio: float  # peak / baseline; inf for non-finite values

    def to_json(self) -> dict:
        return {"name": self.name, "metric": self.metric, "first_step": self.first_step, "peak_step": self.peak_step,
                "peak_value": _json_float(self.peak_value), "ratio": _json_float(self.ratio)}


@dataclass
class Episode:
    """A step range where gradients exploded (or went non-finite, or AMP skipped steps)."""

    kind: str
    start_step: int
    end_step: int
    peak_step: int
    severity: float  # peak over baseline; inf when values went non-finite
    layers: list[LayerFinding]  # ranked: [0] is the offending layer
    loss_spike_step: int | None = None
    advice: list[str] = field(default_factory=list)
    validation: dict | None = None  # kind val_degradation: the ValidationFinding (start_step = its best step)

    def to_json(self) -> dict:
        """JSON object; non-finite floats become null (JSON has no NaN/Inf)."""
        return {"kind": self.kind, "start_step": self.start_step, "end_step": self.end_step,
                "peak_step": self.peak_step, "severity": _json_float(self.severity),
                "layers": [f.to_json() for f in self.layers], "loss_spike_step": self.loss_spike_step,
                "advice": list(self.advice), "validation": self.validation}


@dataclass
class LossSpike:
    """A loss excursion above its own baseline; ``episode`` is the index of the gradient episode it followed."""

    step: int
    value: float
    baseline: float
    ratio: float
    episode: int | None = None

    def to_json(self) -> dict:
        return {"step": self.step, "value": _json_float(self.value), "baseline": _json_float(self.baseline),
                "ratio": _json_float(self.ratio), "episode": self.episode}


@dataclass
class ValidationFinding:
    """One validation series judged: its best point (the early-stopping point) and, when it worsened, why.

    ``cause`` is None (no degradation), ``overfitting`` (worse while the training loss kept improving),
    ``instability`` (worse from a gradient episode or loss spike at ``related_step``), ``degradation`` (the training
    loss did not improve either, or is unknown) or ``nonfinite`` (a NaN/Inf evaluation at ``worst_step``).
    """

    series: str
    higher_is_better: bool
    cause: str | None
    best_step: int | None
    best_value: float
    worst_step: int
    worst_value: float
    last_step: int
    change: float  # recent value over best (or best over recent, for a metric that should rise); inf: non-finite
    nonfinite_steps: list[int]
    last_value: float = math.nan
    related_step: int | None = None
    train_before: float = math.nan  # median training loss around the best point, and recently
    train_now: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.last_value):
            self.last_value = self.worst_value

    def to_json(self) -> dict:
        return {"series": self.series, "higher_is_better": self.higher_is_better, "cause": self.cause,
                "best_step": self.best_step, "early_stopping_step": self.best_step,
                "best_value": _json_float(self.best_value), "worst_step": self.worst_step,
                "worst_value": _json_float(self.worst_value), "last_step": self.last_step,
                "last_value": _json_float(self.last_value), "change": _json_float(self.change),
                "nonfinite_steps": list(self.nonfinite_steps), "related_step": self.related_step,
                "train_loss_before": _json_float(self.train_before), "train_loss_now": _json_float(self.train_now)}


@dataclass
class Report:
    """What the detector found in one run (the auditor's per-run JSON object)."""

    run: str
    source: str
    steps: int
    episodes: list[Episode]
    loss_spikes: list[LossSpike]
    warnings: list[str]
    validation: list[ValidationFinding] = field(default_factory=list)  # one per validation series (+ NaN findings)

    def to_json(self) -> dict:
        return {"run": self.run, "source": self.source, "steps": self.steps,
                "episodes": [e.to_json() for e in self.episodes],
                "loss_spikes": [s.to_json() for s in self.loss_spikes], "warnings": list(self.warnings),
                "validation": [v.to_json() for v in self.validation]}


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------- robust baseline


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


class _Baseline:
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
            sigma = _nanmedian0(self.mad) * _MAD_TO_SIGMA
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


def _log_positive(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    _, base, thr = _solve(_Points(values[:, None], np.ones((values.shape[0], 1), dtype=bool)), cfg, cfg.ratio, cfg.z,
                          cfg.min_history, cfg.mature_history, full=True)
    per_point = np.arange(values.shape[0]) // cfg.block
    with np.errstate(over="ignore"):
        return np.exp(base[per_point, 0]), np.exp(thr[per_point, 0])


class _Points:
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
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.values[rows, cols] / self.den[rows, cols]).astype(np.float32)

    def usable(self, rows: slice | np.ndarray, cols: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(values, mask of the valid, finite, positive ones)."""
        v = self.raw(rows, cols)
        with np.errstate(invalid="ignore"):
            return v, self.valid[rows, cols] & np.isfinite(v) & (v > 0)

    def logs(self, rows: slice | np.ndarray, cols: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(log values, usable mask): NaN where a point is not usable."""
        logv, ok = _log_positive(self.raw(rows, cols))
        ok &= self.valid[rows, cols]
        logv[~ok] = np.nan
        return logv, ok


def _nanmedian_last(a: np.ndarray) -> np.ndarray:
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


def _solve(pts: _Points, cfg: DetectorConfig, ratio: float, z: float, min_history: int, mature: int, *,
           full: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offline judgement of every point, equal to feeding them one by one through :class:`_Baseline`.

    Returns the crossings ``[N, n]`` and, per block, the log baseline and log threshold ``[blocks, n]`` (computed for
    the blocks that were judged exactly, or for all with ``full``; NaN/+inf elsewhere).

    Sequentially, block ``k``'s baseline depends on the medians of the blocks before it, and those medians on which of
    their points crossed. Crossings are rare, so this solves the recurrence as a fixed point instead of block by
    block. First, over all blocks and layers at once and without a single log, a lower bound of every baseline (the
    smallest of the window's block-median lower bounds, as if nothing had crossed) rules out nearly every point: a
    point can cross only above ``ratio`` x its baseline. Only the blocks left are judged exactly; then only the (block,
    layer) pairs whose inputs changed are re-judged, until nothing changes. Dependencies only point forward, so the
    fixed point is unique and is the sequential result, to the bit.
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
        return cross, base, thr
    # padded rings: row w + k holds block k's (median, MAD), filled where first needed (every read of a block is
    # preceded by ensure_stats); block k's window is rows k .. k + w - 1
    med = np.empty((w + kf, n))
    mad = np.empty((w + kf, n))
    med[:w] = mad[:w] = np.nan
    known = np.zeros((kf, n), dtype=bool)
    floor = np.empty((w + kf, n))  # lower bounds of the block medians, in value units
    floor[:w] = np.inf
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
        m = _nanmedian_last(logv)
        med[w + uk, uj], mad[w + uk, uj] = m, _nanmedian_last(np.abs(logv - m[:, None]))
        known[uk, uj] = True

    def limits(kk: np.ndarray, jj: np.ndarray) -> None:
        wk = kk[:, None] + np.arange(-w, 0)[None, :]
        inside = wk >= 0
        ensure_stats(wk[inside], np.broadcast_to(jj[:, None], wk.shape)[inside])
        win = wk + w
        bs = _nanmedian_last(med[win, jj[:, None]])
        sigma = _nanmedian_last(mad[win, jj[:, None]]) * _MAD_TO_SIGMA
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
        new_med = _nanmedian_last(clean)
        new_mad = _nanmedian_last(np.abs(clean - new_med[:, None]))
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
    return cross, base, thr


# ----------------------------------------------------------------------------------------------- per-point records


@dataclass
class _Row:
    """What one logged step contributed to an episode (kept only for steps with a crossing)."""

    u: int  # index on the run's step axis (every distinct logged step)
    step: int
    cols: np.ndarray  # layer columns that crossed or went non-finite
    metric: np.ndarray  # per col: 0 grad norm, 1 update ratio, 2 non-finite
    value: np.ndarray  # per col: the metric's value (non-finite count for non-finite)
    ratio: np.ndarray  # per col: value / baseline (inf for non-finite)
    total: tuple[float, float] | None  # (value, ratio) of the total gradient norm when it crossed
    overflow: bool  # an AMP overflow skip (benign): reported as overflow_skip
    loss_nonfinite: bool
    norms: np.ndarray | None  # the layers' gradient norms at this step (for depth advice)
    update_ratio: np.ndarray | None


_METRIC_NAMES = ("grad_norm", "update_ratio", "nonfinite_count")


class _Engine:
    """State shared by the offline and online paths; holds the judgement of every series."""

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        hist = (cfg.min_history, cfg.mature_history)
        self.grad = _Baseline(0, cfg, cfg.ratio, cfg.z, *hist)
        self.upd = _Baseline(0, cfg, cfg.update_ratio_ratio, cfg.update_ratio_z, *hist)
        self.total = _Baseline(1, cfg, cfg.ratio, cfg.z, *hist)
        # loss series are often one point per epoch: no young phase beyond their own minimum history
        self.loss = _Baseline(1, cfg, cfg.loss_ratio, cfg.loss_z, cfg.loss_min_history, cfg.loss_min_history)
        self.scale_max = -np.inf
        self.prev_scale: float | None = None


_GRAD_METRIC_NAME = {True: "grad_norm", False: "grad_max_abs"}


def _scale_state(engine: _Engine, scale: float | None, skipped: float | None) -> tuple[bool, bool]:
    """(skipped, collapsed) for one step from the AMP loss scale and skip flag; updates the running maximum."""
    cfg = engine.cfg
    is_skip = skipped is not None and math.isfinite(skipped) and skipped > 0.5
    collapsed = False
    if scale is not None and math.isfinite(scale):
        if skipped is None and engine.prev_scale is not None and scale < engine.prev_scale:
            is_skip = True
        collapsed = scale < cfg.loss_scale_floor or scale * cfg.loss_scale_drop < engine.scale_max
        engine.scale_max = max(engine.scale_max, scale)
        engine.prev_scale = scale
    return is_skip, collapsed


# ------------------------------------------------------------------------------------------------ episode building


def _group(us: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Index ranges [i, j) of sorted step indices ``us`` whose neighbours are at most ``gap`` apart."""
    if us.size == 0:
        return []
    cut = np.nonzero(np.diff(us) > gap)[0] + 1
    bounds = np.concatenate([[0], cut, [us.size]])
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(bounds) - 1)]


def _findings(rows: list[_Row], layers: list[str], grad_metric: str, cfg: DetectorConfig) -> list[LayerFinding]:
    """Per layer: first crossing, peak; ranked by first crossing, then by how far above baseline it was then.

    Layers that cross at the same first step (a learning-rate change reaches every layer at once) are told apart by
    their ratio at that step, not by their later peak: once the cascade has spread, every layer peaks (or goes
    non-finite), and the origin is the layer that was furthest out when it began. The peak breaks remaining ties.
    """
    best: dict[int, list] = {}  # col -> [first_u, first_step, peak_ratio, peak_step, peak_value, metric, first_ratio]
    total: list | None = None
    for r in rows:
        for c, m, v, ra in zip(r.cols.tolist(), r.metric.tolist(), r.value.tolist(), r.ratio.tolist(), strict=True):
            cur = best.get(c)
            if cur is None:
                best[c] = [r.u, r.step, ra, r.step, v, m, ra]
                continue
            if r.u == cur[0]:
                cur[6] = max(cur[6], ra)
            if ra > cur[2] or (ra == cur[2] and m == 2 and v > cur[4]):
                cur[2], cur[3], cur[4], cur[5] = ra, r.step, v, m
        if r.total is not None:
            v, ra = r.total
            if total is None:
                total = [r.u, r.step, ra, r.step, v]
            elif ra > total[2]:
                total[2], total[3], total[4] = ra, r.step, v
    names = {0: grad_metric, 1: "update_ratio", 2: "nonfinite_count"}
    order = sorted(best.items(), key=lambda kv: (kv[1][0], -kv[1][6], -kv[1][2], -kv[1][4] if kv[1][5] == 2 else 0.0,
                                                 kv[0]))
    out = [LayerFinding(layers[c], names[m], int(step0), int(pstep), float(val), float(ra))
           for c, (_, step0, ra, pstep, val, m, _) in order[: cfg.max_layers]]
    if not out and total is not None:
        out.append(LayerFinding(TOTAL, TOTAL, int(total[1]), int(total[3]), float(total[4]), float(total[2])))
    return out


def _build(
    rows: list[_Row],
    layers: list[str],
    grad_metric: str,
    loss_rows: list[_LossRow],
    ctx: _Context,
    cfg: DetectorConfig,
) -> tuple[list[Episode], list[LossSpike]]:
    """Episodes and loss spikes from the per-step crossing rows (the same code for offline and online)."""
    episodes: list[Episode] = []
    spans: list[tuple[int, int]] = []  # (first u, last u) of each episode, in list order
    groups: list[list[_Row]] = []
    for overflow in (False, True):
        sel = [r for r in rows if r.overflow == overflow]
        us = np.asarray([r.u for r in sel], dtype=np.int64)
        for i, j in _group(us, cfg.merge_gap):
            grp = sel[i:j]
            nonfinite = any(r.loss_nonfinite or bool((r.metric == 2).any()) for r in grp) or any(
                r.total is not None and not math.isfinite(r.total[1]) for r in grp)
            kind = "overflow_skip" if overflow else ("nonfinite" if nonfinite else "explosion")
            finds = _findings(grp, layers, grad_metric, cfg)
            peak_row = _peak_row(grp)
            severity = max([f.ratio for f in finds] + [r.total[1] for r in grp if r.total is not None] + [1.0])
            if any(r.loss_nonfinite for r in grp):
                severity = math.inf
            ep = Episode(kind, grp[0].step, grp[-1].step, peak_row.step, float(severity), finds)
            episodes.append(ep)
            spans.append((grp[0].u, grp[-1].u))
            groups.append(grp)
    order = sorted(range(len(episodes)), key=lambda k: (episodes[k].start_step, episodes[k].kind))
    episodes = [episodes[k] for k in order]
    spans = [spans[k] for k in order]
    groups = [groups[k] for k in order]

    spikes = _loss_spikes(loss_rows, cfg)
    for s, su in spikes:
        for k, ep in enumerate(episodes):
            if ep.kind == "overflow_skip":
                continue
            first_u, last_u = spans[k]
            if first_u <= su <= last_u + cfg.loss_link_points:
                s.episode = k
                if ep.loss_spike_step is None:
                    ep.loss_spike_step = s.step
                break
    healthy = _healthy_total(ctx, episodes)
    clip = None
    if healthy.size >= 20:
        clip = (float(np.quantile(healthy, cfg.clip_quantile)), float(np.median(healthy)))
    for ep, grp in zip(episodes, groups, strict=True):
        ep.advice = _advice(ep, grp, layers, clip, ctx, cfg)
    return episodes, [s for s, _ in spikes]


def _peak_row(grp: list[_Row]) -> _Row:
    def key(r: _Row) -> float:
        if r.loss_nonfinite or bool((r.metric == 2).any()):
            return math.inf
        vals = list(r.ratio.tolist())
        if r.total is not None:
            vals.append(r.total[1])
        return max(vals) if vals else 0.0

    best = grp[0]
    for r in grp[1:]:
        if key(r) > key(best):
            best = r
    return best


#: One crossing loss point: (step index, step, value, baseline, ratio, whether the loss was back near its baseline
#: (below ``loss_back_ratio`` x the previous crossing's baseline) at some point since the previous crossing).
_LossRow = tuple[int, int, float, float, float, bool]


def _loss_spikes(loss_rows: list[_LossRow], cfg: DetectorConfig):
    """One LossSpike per excursion of the loss, at its highest ratio; with its step index for linking.

    Crossings at most ``merge_gap`` logged steps apart are one excursion while the loss stays up between them; once it
    is back near its baseline, the next crossing is a new spike. Single-value spikes a few points apart are separate
    events (each followed by a normal loss), while a loss that stays high and dips under the threshold now and then is
    one.
    """
    out = []
    for i, j in _group(np.asarray([r[0] for r in loss_rows], dtype=np.int64), cfg.merge_gap):
        starts = [i] + [k for k in range(i + 1, j) if loss_rows[k][5]] + [j]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            grp = loss_rows[a:b]
            u, step, value, base, ratio, _ = max(grp, key=lambda r: r[4])
            out.append((LossSpike(int(step), float(value), float(base), float(ratio)), int(grp[0][0])))
    return out


# ------------------------------------------------------------------------------------------------------- advice


@dataclass
class _Context:
    """Run-level facts the advice draws on."""

    first_step: int
    early_step: int  # the last step of the first ``early_points`` logged steps
    total_steps: np.ndarray  # total gradient norm (logged, or from the layers)
    total_values: np.ndarray
    lr_steps: np.ndarray
    lr_values: np.ndarray
    #: a layer's gradient histograms: (steps, counts [k, HIST_BINS]) of the steps that logged it, or None
    hist: Callable[[str], tuple[np.ndarray, np.ndarray] | None] | None = None


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _advice(ep: Episode, rows: list[_Row], layers: list[str], clip: tuple[float, float] | None, ctx: _Context,
            cfg: DetectorConfig) -> list[str]:
    out: list[str] = []
    if ep.kind == "overflow_skip":
        out.append(f"AMP skipped {len(rows)} optimizer step(s) for gradient overflow while the loss scale backed "
                   "off; this is normal mixed-precision behaviour and no update was applied.")
        return out
    top = ep.layers[0] if ep.layers else None
    if ep.kind == "nonfinite":
        # the episode may open earlier, with the growth that led to the first non-finite value
        bad = [r for r in rows if (r.metric == 2).any() or (r.total is not None and not math.isfinite(r.total[0]))]
        first_bad = bad[0] if bad else None
        first = first_bad.step if first_bad is not None else ep.start_step
        if first <= ctx.early_step:
            out.append(f"Non-finite gradients from the first logged steps (step {first}): check the "
                       "initialization (weight scale), the inputs (NaN/Inf or unnormalised features) and the loss "
                       "(log of 0, division by 0) before tuning the optimizer.")
        else:
            cols = [] if first_bad is None else first_bad.cols[first_bad.metric == 2].tolist()
            where = f" in {layers[cols[0]]}" if cols else ""
            grew = f" after growing from step {ep.start_step}" if first > ep.start_step else ""
            out.append(f"Gradients became non-finite{where} at step {first}{grew}; guard the step (skip or "
                       "clip non-finite updates) and look for the numerical operation that overflowed.")
        loss_bad = [r.step for r in rows if r.overflow is False and r.loss_nonfinite]
        if loss_bad:
            out.append(f"The loss itself was non-finite from step {loss_bad[0]} (last: {loss_bad[-1]}).")
    # clip threshold from the healthy total-norm distribution
    if clip is not None and ep.kind == "explosion":
        q, median = clip
        peak = max((r.total[0] for r in rows if r.total is not None), default=None)
        peak_txt = f"; this episode's total norm reached {_fmt(peak)}" if peak is not None else ""
        out.append(f"Clip the total gradient norm at about {_fmt(q)} (the {cfg.clip_quantile:.0%} quantile of the "
                   f"healthy total norm, median {_fmt(median)}{peak_txt}).")
    # update ratios far too high
    hist = _histogram_advice(ep, ctx, cfg)
    ur_rows = [(r, k) for r in rows for k in np.nonzero(r.metric == 1)[0].tolist()]
    if ur_rows:
        r, k = max(ur_rows, key=lambda rk: rk[0].value[rk[1]])
        name, val = layers[int(r.cols[k])], float(r.value[k])
        cause = ("the update was far too large for this layer, from a few of its entries (see its histogram)"
                 if hist is not None and hist[1] == "tail" else "the learning rate is too high for this layer; "
                 "lower it or give the layer its own parameter group")
        out.append(f"Update ratio ||dw||/||w|| of {name} reached {_fmt(val)} at step {r.step} (healthy layers stay "
                   f"around 1e-3..1e-2; {_fmt(float(r.ratio[k]))}x its own baseline): {cause}.")
    elif top is not None and top.name != TOTAL and ep.kind == "explosion":
        out.append(f"{top.name} crossed first (step {top.first_step}) and peaked at {_fmt(top.ratio)}x its own "
                   f"baseline ({top.metric} {_fmt(top.peak_value)} at step {top.peak_step}).")
    # LR rose shortly before the episode
    lr_txt = _lr_rise(ep, ctx)
    if lr_txt:
        out.append(lr_txt)
    depth = _depth_growth(ep, rows, layers, cfg)
    if depth:
        out.append(depth)
    if hist is not None:
        out.append(hist[0])
    if ep.loss_spike_step is not None:
        out.append(f"The loss spiked at step {ep.loss_spike_step}, {ep.loss_spike_step - ep.start_step} steps after "
                   "the episode began.")
    return out


def _healthy_total(ctx: _Context, episodes: list[Episode]) -> np.ndarray:
    steps, vals = ctx.total_steps, ctx.total_values
    if steps.size == 0:
        return vals
    keep = np.isfinite(vals) & (vals > 0)
    eps = [ep for ep in episodes if ep.kind != "overflow_skip"]
    if eps:  # inside an episode: an odd number of its (start, end] boundaries lie at or before the step
        starts = np.sort(np.asarray([ep.start_step for ep in eps]))
        ends = np.sort(np.asarray([ep.end_step for ep in eps]))
        inside = np.searchsorted(starts, steps, side="right") - np.searchsorted(ends, steps, side="left")
        keep &= inside <= 0
    return vals[keep]


def _lr_rise(ep: Episode, ctx: _Context) -> str | None:
    if ctx.lr_steps.size < 2:
        return None
    before = ctx.lr_steps <= ep.start_step
    if before.sum() < 2:
        return None
    lrs, st = ctx.lr_values[before], ctx.lr_steps[before]
    cur = lrs[-1]
    ok = np.isfinite(lrs) & (lrs > 0)
    if not ok.all() or not cur > 0:
        return None
    lowest = np.minimum.accumulate(lrs[::-1])[::-1]  # lowest LR from each point to the episode
    rise = cur / lowest
    if rise.max() < 2.0:
        return None
    i = int(np.nonzero(rise >= 2.0)[0][-1])
    j = i + int(np.argmax(lrs[i:] >= 2.0 * lrs[i]))
    return (f"The learning rate rose from {_fmt(float(lrs[i]))} to {_fmt(float(cur))} (at step {int(st[j])}, "
            f"{ep.start_step - int(st[j])} steps before the episode): lower it or lengthen the warm-up.")


def _depth_growth(ep: Episode, rows: list[_Row], layers: list[str], cfg: DetectorConfig) -> str | None:
    """Norms that grow steadily through the model's depth at the episode's peak point to normalization/residuals."""
    peak = next((r for r in rows if r.step == ep.peak_step and r.norms is not None), None)
    if peak is None or peak.norms is None:
        return None
    g = peak.norms
    ok = np.isfinite(g) & (g > 0)
    if ok.sum() < 4:
        return None
    idx = np.nonzero(ok)[0]
    lg = np.log10(g[ok])
    if np.std(lg) == 0:
        return None
    corr = float(np.corrcoef(np.arange(idx.size), lg)[0, 1])
    spread = float(10 ** (lg.max() - lg.min()))
    if abs(corr) < 0.9 or spread < cfg.depth_growth:
        return None
    hi, lo = (idx[-1], idx[0]) if corr > 0 else (idx[0], idx[-1])
    return (f"At step {peak.step} the gradient norm grows {_fmt(spread)}x steadily through depth, from "
            f"{_fmt(float(g[lo]))} in {layers[lo]} to {_fmt(float(g[hi]))} in {layers[hi]}: add normalization "
            "(LayerNorm/BatchNorm) or residual connections, or use a depth-scaled initialization.")


# ---------------------------------------------------------------------------------------------------- histograms

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
    return _fmt(10.0 ** log10)


def _histogram_advice(ep: Episode, ctx: _Context, cfg: DetectorConfig) -> tuple[str, str] | None:
    """Whether the bulk of the offending layer's gradient entries grew (``mass``) or a thin tail of them (``tail``).

    Compares the layer's last histogram at or before the episode's peak (inside the episode) with its last one before
    the episode, both over their finite non-zero entries: exact zeros (dead units, saturated activations) would pin the
    median, and an all-NaN histogram says nothing about magnitudes (the non-finite advice covers it). The median entry
    moving, or more than ``hist_tail_share`` of the entries going beyond the old largest, means most units' gradients
    grew: a scale problem (learning rate, initialization). Only the top entries moving means a few units or a few
    samples: a bad batch, an outlier token, corrupted inputs; lowering the learning rate for the whole model does not
    fix that.
    """
    if ctx.hist is None or not ep.layers or ep.layers[0].name == TOTAL or ep.kind == "overflow_skip":
        return None
    name = ep.layers[0].name
    got = ctx.hist(name)
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


def _run_histograms(run: RunData) -> Callable[[str], tuple[np.ndarray, np.ndarray] | None] | None:
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


# -------------------------------------------------------------------------------------------------------- offline


def _series(run: RunData, name: str) -> Series | None:
    s = run.series.get(name)
    if s is None or len(s.steps) == 0:
        return None
    return s


def _on_axis(axis: np.ndarray, s: Series | None) -> np.ndarray:
    """Values of a series on the union step axis (NaN where it was not logged)."""
    out = np.full(axis.shape[0], np.nan)
    if s is not None:
        out[np.searchsorted(axis, np.asarray(s.steps, dtype=np.int64))] = np.asarray(s.values, dtype=np.float64)
    return out


def detect(run: RunData, config: DetectorConfig | None = None) -> Report:
    """Judge one run offline (vectorised over layers and blocks)."""
    cfg = config or DetectorConfig()
    engine = _Engine(cfg)
    warnings: list[str] = []
    names = ("total_grad_norm", "loss", "step_skipped", "loss_scale", "lr")
    ser = {n: _series(run, n) for n in names}
    steps = np.asarray(run.steps, dtype=np.int64)
    parts = [steps] + [np.asarray(s.steps, dtype=np.int64) for s in ser.values() if s is not None]
    axis = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    n_layers = len(run.layers)

    # AMP state per step of the axis (sequential by nature, but only over steps that logged a scale or skip flag)
    skip_u = np.zeros(axis.shape[0], dtype=bool)
    collapse_u = np.zeros(axis.shape[0], dtype=bool)
    scale_ax, skip_ax = _on_axis(axis, ser["loss_scale"]), _on_axis(axis, ser["step_skipped"])
    has_skip = ser["step_skipped"] is not None
    amp_idx = np.nonzero(~np.isnan(scale_ax) | ~np.isnan(skip_ax))[0]
    for u in amp_idx.tolist():
        sc = None if np.isnan(scale_ax[u]) else float(scale_ax[u])
        sk = None if not has_skip else (0.0 if np.isnan(skip_ax[u]) else float(skip_ax[u]))
        skip_u[u], collapse_u[u] = _scale_state(engine, sc, sk)
    overflow_u = skip_u & ~collapse_u

    rows: dict[int, _Row] = {}
    grad_metric = "grad_norm"
    norms = None
    if n_layers and steps.size:
        lm = run.layer_metrics
        present = run.present if run.present.shape == (steps.size, n_layers) else np.ones((steps.size, n_layers), bool)
        gm = lm.get("grad_norm")
        if gm is None:
            gm = lm.get("grad_max_abs")
            grad_metric = "grad_max_abs"
        lu = np.searchsorted(axis, steps)
        skipped_pts = skip_u[lu]
        valid_all = present & ~skipped_pts[:, None]
        nonfin = np.zeros((steps.size, n_layers), dtype=bool)
        nfc = lm.get("nonfinite_count")
        if nfc is not None:
            with np.errstate(invalid="ignore"):
                nonfin |= present & (nfc > 0)
        for m in ("grad_norm", "grad_max_abs"):
            if lm.get(m) is not None:
                nonfin |= present & ~np.isfinite(lm[m])
        valid = valid_all & ~nonfin
        crosses: list[tuple[int, np.ndarray, np.ndarray, _Points]] = []
        if gm is not None:
            norms = gm
            pts = _Points(gm, valid)
            c, bases, _ = _solve(pts, cfg, cfg.ratio, cfg.z, cfg.min_history, cfg.mature_history)
            crosses.append((0, c, bases, pts))
        upd = _update_ratio_points(run, valid)
        if upd is not None:
            c, bases, _ = _solve(upd, cfg, cfg.update_ratio_ratio, cfg.update_ratio_z, cfg.min_history,
                                 cfg.mature_history)
            ci, cj = np.nonzero(c)
            low = ~(upd.raw(ci, cj) > cfg.update_ratio_floor)
            c[ci[low], cj[low]] = False
            crosses.append((1, c, bases, upd))
        active = nonfin.any(axis=1)
        for _, c, _, _ in crosses:
            active |= c.any(axis=1)
        for i in np.nonzero(active)[0].tolist():
            cols_l, met_l, val_l, rat_l = [], [], [], []
            for m, c, bases, src in crosses:
                cc = np.nonzero(c[i])[0]
                vals = src.raw(i)
                cols_l.append(cc)
                met_l.append(np.full(cc.size, m, dtype=np.int64))
                val_l.append(vals[cc].astype(np.float64))
                rat_l.append(np.exp(_log_positive(vals)[0][cc] - bases[i // cfg.block, cc]))
            nf = np.nonzero(nonfin[i])[0]
            cols_l.append(nf)
            met_l.append(np.full(nf.size, 2, dtype=np.int64))
            val_l.append(_nonfinite_value(lm, i, nf))
            rat_l.append(np.full(nf.size, np.inf))
            u = int(lu[i])
            rows[u] = _Row(u, int(axis[u]), np.concatenate(cols_l), np.concatenate(met_l), np.concatenate(val_l),
                           np.concatenate(rat_l), None, bool(skip_u[u] and not collapse_u[u]), False,
                           None if norms is None else np.asarray(norms[i], dtype=np.float64),
                           None if upd is None else np.asarray(upd.raw(i), dtype=np.float64))

    # total gradient norm
    tot = ser["total_grad_norm"]
    if tot is not None:
        tu = np.searchsorted(axis, np.asarray(tot.steps, dtype=np.int64))
        tv = np.asarray(tot.values, dtype=np.float64)
        nonfinite_t = ~np.isfinite(tv)
        c, bases, _ = _solve(_Points(tv[:, None], ~skip_u[tu][:, None]), cfg, cfg.ratio, cfg.z, cfg.min_history,
                             cfg.mature_history)
        logv = _log_positive(tv)[0]
        for k in np.nonzero(c[:, 0] | nonfinite_t)[0].tolist():
            u = int(tu[k])
            row = rows.get(u) or _empty_row(u, int(axis[u]), bool(overflow_u[u]))
            ratio = math.inf if nonfinite_t[k] else float(np.exp(logv[k] - bases[k // cfg.block, 0]))
            row.total = (float(tv[k]), ratio)
            rows[u] = row
    # loss: non-finite -> episode; spikes -> LossSpike
    loss_rows: list[_LossRow] = []
    loss = ser["loss"]
    if loss is not None:
        lv = np.asarray(loss.values, dtype=np.float64)
        lsu = np.searchsorted(axis, np.asarray(loss.steps, dtype=np.int64))
        if np.any(np.isfinite(lv) & (lv <= 0)):
            warnings.append("loss has non-positive values; loss spikes are judged on its positive values only")
        c, bases, _ = _solve(_Points(lv[:, None], ~skip_u[lsu][:, None]), cfg, cfg.loss_ratio, cfg.loss_z,
                             cfg.loss_min_history, cfg.loss_min_history)
        logv = _log_positive(lv)[0]
        usable = np.isfinite(lv) & (lv > 0) & ~skip_u[lsu]
        ks = np.nonzero(c[:, 0])[0].tolist()
        for n, k in enumerate(ks):
            base = bases[k // cfg.block, 0]
            back = False
            if n:
                between = lv[ks[n - 1] + 1:k][usable[ks[n - 1] + 1:k]]
                back = bool(between.size) and float(between.min()) < loss_rows[-1][3] * cfg.loss_back_ratio
            loss_rows.append((int(lsu[k]), int(loss.steps[k]), float(lv[k]), float(np.exp(base)),
                              float(np.exp(logv[k] - base)), back))
        for k in np.nonzero(~np.isfinite(lv))[0].tolist():
            u = int(lsu[k])
            row = rows.get(u) or _empty_row(u, int(axis[u]), bool(overflow_u[u]))
            row.loss_nonfinite = not row.overflow
            rows[u] = row
    # collapse of the loss scale without any other signal is still a non-finite episode
    for u in np.nonzero(skip_u & collapse_u)[0].tolist():
        row = rows.get(u) or _empty_row(u, int(axis[u]), False)
        if not row.loss_nonfinite and row.total is None and not (row.metric == 2).any():
            row.total = (math.nan, math.inf)
        rows[u] = row
    for u in np.nonzero(overflow_u)[0].tolist():
        rows[u] = rows.get(u) or _empty_row(u, int(axis[u]), True)

    ordered = [rows[u] for u in sorted(rows)]
    ctx = _context(axis, ser, run, steps, norms, cfg)
    if norms is None and tot is None:
        warnings.append("no gradient norms in this run: only the loss was judged")
    episodes, spikes = _build(ordered, list(run.layers), grad_metric, loss_rows, ctx, cfg)
    val = _validation(run.series, ser["loss"], episodes, spikes, cfg)
    return Report(run.name, run.source, int(axis.size), _with_validation(episodes, spikes, val), spikes, warnings,
                  val)


def _update_ratio_points(run: RunData, valid: np.ndarray) -> _Points | None:
    """The update ratio as :meth:`RunData.update_ratio` defines it, divided where it is read (no full copy)."""
    lm = run.layer_metrics
    if lm.get("update_ratio") is not None:
        return _Points(lm["update_ratio"], valid)
    if lm.get("update_norm") is None or lm.get("param_norm") is None:
        return None
    return _Points(lm["update_norm"], valid, lm["param_norm"])


def _nonfinite_value(lm: dict[str, np.ndarray], i: int, cols: np.ndarray) -> np.ndarray:
    nfc = lm.get("nonfinite_count")
    if nfc is None:
        return np.full(cols.size, np.nan)
    return np.asarray(nfc[i, cols], dtype=np.float64)


def _empty_row(u: int, step: int, overflow: bool) -> _Row:
    z = np.zeros(0, dtype=np.int64)
    return _Row(u, step, z, z, np.zeros(0), np.zeros(0), None, overflow, False, None, None)


def _context(axis: np.ndarray, ser: dict[str, Series | None], run: RunData, steps: np.ndarray,
             norms: np.ndarray | None, cfg: DetectorConfig) -> _Context:
    early = int(axis[min(cfg.early_points, axis.size) - 1]) if axis.size else 0
    tot = ser["total_grad_norm"]
    if tot is not None:
        ts, tv = np.asarray(tot.steps, dtype=np.int64), np.asarray(tot.values, dtype=np.float64)
    elif norms is not None:
        ts, tv = steps, _total_from_layers(norms, run.present)
    else:
        ts, tv = np.zeros(0, dtype=np.int64), np.zeros(0)
    lr = ser["lr"]
    ls = np.asarray(lr.steps, dtype=np.int64) if lr is not None else np.zeros(0, dtype=np.int64)
    lv = np.asarray(lr.values, dtype=np.float64) if lr is not None else np.zeros(0)
    return _Context(int(axis[0]) if axis.size else 0, early, ts, tv, ls, lv, _run_histograms(run))


def _total_from_layers(norms: np.ndarray, present: np.ndarray | None) -> np.ndarray:
    """Root of the sum of squares per step, in row chunks so a 500 x 100k run needs no float64 copy of itself."""
    out = np.empty(norms.shape[0])
    use_present = present is not None and present.shape == norms.shape
    for a in range(0, norms.shape[0], 4096):
        g = np.asarray(norms[a:a + 4096], dtype=np.float64)
        if use_present:
            g = np.where(present[a:a + 4096], g, 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            out[a:a + 4096] = np.sqrt(np.sum(g * g, axis=-1))
    return out


# ------------------------------------------------------------------------------------------------------ validation


def validation_series(name: str) -> bool | None:
    """Whether a series is a validation metric: False for a loss (lower is better), True for a metric that should
    rise (accuracy, mAP, anything under ``val_metric/``), None for a series that is not a validation metric."""
    if name.startswith(VAL_METRIC_PREFIX) and len(name) > len(VAL_METRIC_PREFIX):
        return True
    return VALIDATION_SERIES.get(name)


def _smooth(v: np.ndarray, width: int) -> np.ndarray:
    """Centred running median (edges use what they have), so one noisy evaluation makes no best point."""
    if width <= 1 or v.size < 2 * width + 1:
        return v
    h = width // 2
    pad = np.concatenate([np.full(h, np.nan), v, np.full(h, np.nan)])
    return np.nanmedian(np.lib.stride_tricks.sliding_window_view(pad, width), axis=1)


def _validation(series: dict[str, Series], loss: Series | None, episodes: list[Episode], spikes: list[LossSpike],
                cfg: DetectorConfig) -> list[ValidationFinding]:
    """Judge every validation series of a run: its best point, and whether (and why) it worsened after it."""
    out = []
    for name in sorted(series):
        rising = validation_series(name)
        s = series[name]
        if rising is None or len(s.steps) == 0:
            continue
        steps = np.asarray(s.steps, dtype=np.int64)
        vals = np.asarray(s.values, dtype=np.float64)
        fin = np.isfinite(vals)
        # lower is better in ``score`` for both kinds of series
        score = np.where(fin, -vals if rising else vals, np.nan)
        for grp in _runs_of(~fin):
            before = np.nonzero(fin[:grp[0]])[0]
            b = int(before[np.argmin(score[before])]) if before.size else None
            out.append(ValidationFinding(
                name, bool(rising), "nonfinite", None if b is None else int(steps[b]),
                math.nan if b is None else float(vals[b]), int(steps[grp[0]]), float(vals[grp[0]]),
                int(steps[grp[-1]]), math.inf, [int(steps[i]) for i in grp]))
        idx = np.nonzero(fin)[0]
        if idx.size == 0:
            continue
        if idx.size < cfg.val_min_points:  # too few evaluations to tell a worsening from noise: only the best one
            raw_best = int(idx[np.argmin(score[idx])])
            out.append(ValidationFinding(name, bool(rising), None, int(steps[raw_best]), float(vals[raw_best]),
                                         int(steps[idx[-1]]), float(vals[idx[-1]]), int(steps[idx[-1]]), 1.0, []))
            continue
        sm = _smooth(score[idx], cfg.val_smooth)
        k = int(np.argmin(sm))
        near = idx[max(0, k - cfg.val_smooth // 2):k + cfg.val_smooth // 2 + 1]
        best = int(near[np.argmin(score[near])])  # the evaluation to stop at: the best raw point near the smooth best
        after = idx[idx > best]
        finding = ValidationFinding(name, bool(rising), None, int(steps[best]), float(vals[best]),
                                    int(steps[idx[-1]]), float(vals[idx[-1]]), int(steps[idx[-1]]), 1.0, [])
        out.append(finding)
        recent = after[-max(cfg.val_patience, after.size // 4):]
        ref = abs(float(sm[k])) or 1.0
        worse = (score[recent] - sm[k]) / ref
        # the noise of one evaluation: robust scatter around the running median (0 for a smooth series)
        noise = _MAD_TO_SIGMA * float(np.median(np.abs(score[idx] - sm))) / ref
        need = max(cfg.val_min_worsening, cfg.val_noise_z * noise)
        if after.size < cfg.val_patience or not np.median(worse) >= need:
            raw_best = int(idx[np.argmin(score[idx])])  # not degraded: simply the best evaluation
            finding.best_step, finding.best_value = int(steps[raw_best]), float(vals[raw_best])
            continue
        worst = int(after[np.argmax(score[after])])
        onset = int(after[np.argmax((score[after] - sm[k]) / ref >= need)])
        finding.worst_step, finding.worst_value = int(steps[worst]), float(vals[worst])
        finding.change = float(1.0 + np.median(worse))
        finding.cause = _val_cause(finding, int(steps[onset]), loss, episodes, spikes, int(steps[recent[0]]))
    return out


def _runs_of(mask: np.ndarray) -> list[np.ndarray]:
    idx = np.nonzero(mask)[0]
    return np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1) if idx.size else []


def _val_cause(f: ValidationFinding, onset: int, loss: Series | None, episodes: list[Episode],
               spikes: list[LossSpike], recent_from: int) -> str:
    """instability (a gradient episode or loss spike between the best point and the onset of the worsening),
    overfitting (the training loss kept improving meanwhile) or degradation (neither: training got worse too)."""
    best = f.best_step
    for ep in episodes:
        if ep.kind in ("explosion", "nonfinite") and ep.end_step >= best and ep.start_step <= onset:
            f.related_step = ep.start_step
            return "instability"
    for sp in spikes:
        if best <= sp.step <= onset:
            f.related_step = sp.step
            return "instability"
    if loss is None or len(loss.steps) == 0:
        return "degradation"
    ls, lv = np.asarray(loss.steps), np.asarray(loss.values, dtype=np.float64)
    ok = np.isfinite(lv)
    before = lv[ok & (ls <= best)]
    now = lv[ok & (ls >= recent_from)]
    if before.size == 0 or now.size == 0:
        return "degradation"
    before = before[-max(1, now.size):]
    f.train_before, f.train_now = float(np.median(before)), float(np.median(now))
    return "overfitting" if f.train_now < f.train_before else "degradation"


def _val_episode(f: ValidationFinding) -> Episode:
    """The finding as an episode of kind ``val_degradation`` (never an explosion: the auditor's ``--fail-on
    explosion`` ignores it), with the advice that fits its cause. A non-finite evaluation is a ``nonfinite`` episode
    (with the same ``validation`` details): NaN weights or activations are a finding whatever the cause."""
    what = f"validation {f.series}"
    best_txt = (f"its best point was step {f.best_step} ({_fmt(f.best_value)})" if f.best_step is not None
                else "there was no finite value before it")
    if f.cause == "nonfinite":
        more = len(f.nonfinite_steps) - 1
        advice = [f"{what} was non-finite at step {f.worst_step}" +
                  (f" and at the {more} evaluation{'s' if more > 1 else ''} after it in a row (through step "
                   f"{f.nonfinite_steps[-1]})" if more else "") +
                  f"; {best_txt}. Check the evaluation (empty batches, log of 0, an overflow under mixed precision) "
                  "and the weights of that checkpoint."]
        return Episode("nonfinite", f.worst_step, f.nonfinite_steps[-1], f.worst_step, math.inf, [], None, advice,
                       f.to_json())
    pct = f"{abs(f.change - 1) * 100:.0f}%"
    head = (f"{what} was best at step {f.best_step} ({_fmt(f.best_value)}) and has been {pct} worse since (last "
            f"{_fmt(f.last_value)} at step {f.last_step})")
    if f.cause == "overfitting":
        advice = [f"{head} while the training loss kept improving ({_fmt(f.train_before)} -> {_fmt(f.train_now)}): "
                  f"the model is overfitting, not exploding. Stop early at step {f.best_step} (keep that "
                  "checkpoint), or regularize (weight decay, dropout, augmentation, more data)."]
    elif f.cause == "instability":
        advice = [f"{head}, and it began with the training instability at step {f.related_step}: fix that episode "
                  "(see its advice) rather than stopping early; until then, the checkpoint of step "
                  f"{f.best_step} is the one to keep."]
    else:
        advice = [f"{head} while the training loss did not improve either: "
                  "training itself stalled or diverged; check the learning rate and the data. The checkpoint of "
                  f"step {f.best_step} is the best so far."]
    return Episode(VAL_KIND, f.best_step, f.last_step, f.worst_step, float(f.change), [], None, advice, f.to_json())


def _with_validation(episodes: list[Episode], spikes: list[LossSpike], findings: list[ValidationFinding]
                     ) -> list[Episode]:
    """Gradient and validation episodes in step order; loss spikes keep pointing at their gradient episode."""
    extra = [_val_episode(f) for f in findings if f.cause is not None]
    if not extra:
        return episodes
    merged = sorted(range(len(episodes) + len(extra)),
                    key=lambda k: ((episodes + extra)[k].start_step, k >= len(episodes), k))
    where = {old: new for new, old in enumerate(merged)}
    for s in spikes:
        if s.episode is not None:
            s.episode = where[s.episode]
    return [(episodes + extra)[k] for k in merged]


# --------------------------------------------------------------------------------------------------------- online


class OnlineDetector:
    """Judges steps as they arrive, with the same arithmetic as :func:`detect` (so the same episodes), O(layers) each.

    Call :meth:`update` once per logged step, in increasing step order, with that step's per-layer metrics (arrays
    aligned with ``layers``: ``grad_norm``, ``param_norm``, ``update_norm``, ``grad_max_abs``, ``nonfinite_count``) and
    per-step scalars (``loss``, ``lr``, ``total_grad_norm``, ``loss_scale``, ``step_skipped``). It returns the episodes
    that open at this step (as known so far); :meth:`report` gives the final, complete picture. Gradient histograms,
    logged at their own cadence, go to :meth:`add_histograms`; they only feed the advice.
    """

    def __init__(self, config: DetectorConfig | None = None, *, name: str = "", source: str = "tb_gradient_plugin"):
        self.cfg = config or DetectorConfig()
        self.name, self.source = name, source
        self._engine = _Engine(self.cfg)
        self._layers: list[str] = []
        self._col: dict[str, int] = {}
        self._rows: list[_Row] = []
        self._loss_rows: list[_LossRow] = []
        self._loss_low = math.inf  # the lowest usable loss since the last loss crossing
        self._u = -1
        self._last_step: int | None = None
        self._last_active = {False: None, True: None}
        self._grad_metric: str | None = None
        self._has_amp_skip = False
        self._total: tuple[list[int], list[float]] = ([], [])
        self._layer_total: tuple[list[int], list[float]] = ([], [])
        self._lr: tuple[list[int], list[float]] = ([], [])
        self._steps: list[int] = []
        self._loss_nonpositive = False
        self._saw_norms = False
        self._loss: tuple[list[int], list[float]] = ([], [])
        self._val: dict[str, tuple[list[int], list[float]]] = {}
        self._hist: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        self._last_hist_step: int | None = None

    def add_histograms(self, step: int, layers: Sequence[str], counts: np.ndarray) -> None:
        """Record one step's per-layer gradient histograms (``counts[len(layers), HIST_BINS]`` on the format's bins)."""
        step = int(step)
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (len(layers), fmt.HIST_BINS):
            raise ValueError(f"histograms of shape {counts.shape} for {len(layers)} layers x {fmt.HIST_BINS} bins")
        if self._last_hist_step is not None and step <= self._last_hist_step:
            raise ValueError(f"histogram steps must increase: got {step} after {self._last_hist_step}")
        self._last_hist_step = step
        for name, row in zip(layers, counts, strict=True):
            if row.sum() > 0:
                st, rows = self._hist.setdefault(name, ([], []))
                st.append(step)
                rows.append(row.copy())

    def _histograms_of(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        got = self._hist.get(name)
        if got is None:
            return None
        return np.asarray(got[0], dtype=np.int64), np.stack(got[1])

    def update(
        self, step: int, layers: Sequence[str], metrics: dict[str, np.ndarray], scalars: dict[str, float]
    ) -> list[Episode]:
        """Judge one logged step; returns the episodes that opened at it."""
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"steps must increase: got {step} after {self._last_step}")
        layers = list(layers)
        for m, arr in metrics.items():
            if np.asarray(arr).reshape(-1).shape[0] != len(layers):
                raise ValueError(f"metric {m!r} has {np.asarray(arr).size} values for {len(layers)} layers")
        self._last_step = step
        self._u += 1
        u = self._u
        self._steps.append(step)
        eng, cfg = self._engine, self.cfg
        sc = {k: float(v) for k, v in scalars.items() if v is not None}
        if "step_skipped" in sc:
            self._has_amp_skip = True
        skip, collapse = False, False
        if "loss_scale" in sc or "step_skipped" in sc:
            sk = sc.get("step_skipped", 0.0 if self._has_amp_skip else None)
            skip, collapse = _scale_state(eng, sc.get("loss_scale"), sk)
        overflow = skip and not collapse
        row: _Row | None = None
        if layers:
            row = self._layer_row(u, step, layers, metrics, skip, overflow)
        if "total_grad_norm" in sc:
            tv = sc["total_grad_norm"]
            self._total[0].append(step)
            self._total[1].append(tv)
            logv, ok = _log_positive(np.asarray([tv]))
            cross, excess = eng.total.step(logv, ok & (not skip))
            if cross[0] or not math.isfinite(tv):
                row = row or _empty_row(u, step, overflow)
                row.total = (tv, math.inf if not math.isfinite(tv) else float(np.exp(excess[0])))
        if "loss" in sc:
            lv = sc["loss"]
            if math.isfinite(lv) and lv <= 0:
                self._loss_nonpositive = True
            logv, ok = _log_positive(np.asarray([lv]))
            base = eng.loss.limits()[0][0]
            cross, excess = eng.loss.step(logv, ok & (not skip))
            if cross[0]:
                back = bool(self._loss_rows) and self._loss_low < self._loss_rows[-1][3] * cfg.loss_back_ratio
                self._loss_rows.append((u, step, lv, float(np.exp(base)), float(np.exp(excess[0])), back))
                self._loss_low = math.inf
            elif ok[0] and not skip:
                self._loss_low = min(self._loss_low, lv)
            if not math.isfinite(lv):
                row = row or _empty_row(u, step, overflow)
                row.loss_nonfinite = not row.overflow
        if skip and collapse:
            row = row or _empty_row(u, step, False)
            if not row.loss_nonfinite and row.total is None and not (row.metric == 2).any():
                row.total = (math.nan, math.inf)
        if overflow and row is None:
            row = _empty_row(u, step, True)
        for k, v in sc.items():
            if k == "loss" or validation_series(k) is not None:
                dest = self._loss if k == "loss" else self._val.setdefault(k, ([], []))
                dest[0].append(step)
                dest[1].append(v)
        if "lr" in sc:
            self._lr[0].append(step)
            self._lr[1].append(sc["lr"])
        if row is None:
            return []
        self._rows.append(row)
        last = self._last_active[row.overflow]
        self._last_active[row.overflow] = u
        if last is not None and u - last <= cfg.merge_gap:
            return []
        ctx = _Context(self._steps[0], self._early_step(), np.zeros(0, dtype=np.int64), np.zeros(0),
                       np.zeros(0, dtype=np.int64), np.zeros(0))
        eps, _ = _build([row], self._layers, self._grad_metric or "grad_norm", [], ctx, cfg)
        return eps

    def next_thresholds(self, layers: Sequence[str]) -> tuple[np.ndarray, float]:
        """The values the next :meth:`update` will judge against, for a caller that must decide before it can call it.

        Per name in ``layers``, the value of the gradient metric (``grad_norm`` when it is given) above which that
        layer crosses, and the total gradient norm above which the total crosses; ``inf`` where a series has fewer
        than ``min_history`` points or is unknown. Non-finite values always make an episode and are not expressed
        here. The thresholds stay valid until the next :meth:`update`.
        """
        _, thr = self._engine.grad.limits()
        out = np.full(len(layers), np.inf)
        for i, name in enumerate(layers):
            col = self._col.get(name)
            if col is not None and col < thr.size:
                out[i] = thr[col]
        total = float(self._engine.total.limits()[1][0])
        with np.errstate(over="ignore"):
            return np.exp(out), math.exp(total) if total < 709.0 else math.inf

    def _early_step(self) -> int:
        return self._steps[min(self.cfg.early_points, len(self._steps)) - 1]

    def _layer_row(self, u: int, step: int, layers: list[str], metrics: dict[str, np.ndarray], skip: bool,
                   overflow: bool) -> _Row | None:
        eng, cfg = self._engine, self.cfg
        for name in layers:
            if name not in self._col:
                self._col[name] = len(self._layers)
                self._layers.append(name)
        n = len(self._layers)
        idx = np.asarray([self._col[x] for x in layers], dtype=np.int64)

        def full(metric: str) -> np.ndarray | None:
            if metric not in metrics:
                return None
            out = np.full(n, np.nan, dtype=np.float32)
            out[idx] = np.asarray(metrics[metric], dtype=np.float32).reshape(-1)
            return out

        present = np.zeros(n, dtype=bool)
        present[idx] = True
        gm = full("grad_norm")
        gmax = full("grad_max_abs")
        if self._grad_metric is None and (gm is not None or gmax is not None):
            self._grad_metric = "grad_norm" if gm is not None else "grad_max_abs"
        g = gm if self._grad_metric == "grad_norm" else gmax
        nonfin = np.zeros(n, dtype=bool)
        nfc = full("nonfinite_count")
        with np.errstate(invalid="ignore"):
            if nfc is not None:
                nonfin |= present & (nfc > 0)
            for arr in (gm, gmax):
                if arr is not None:
                    nonfin |= present & ~np.isfinite(arr)
        valid = present & (not skip) & ~nonfin
        cols_l, met_l, val_l, rat_l = [], [], [], []
        if g is not None:
            self._saw_norms = True
            eng.grad.grow(n)
            logv, ok = _log_positive(g)
            c, e = eng.grad.step(logv, ok & valid)
            cc = np.nonzero(c)[0]
            cols_l.append(cc)
            met_l.append(np.full(cc.size, 0, dtype=np.int64))
            val_l.append(g[cc].astype(np.float64))
            rat_l.append(np.exp(e[cc]))
            gp = np.where(present, g.astype(np.float64), 0.0)
            with np.errstate(invalid="ignore", over="ignore"):
                self._layer_total[0].append(step)
                self._layer_total[1].append(float(np.sqrt(np.sum(gp * gp))))
        ur = None
        upd, par = full("update_norm"), full("param_norm")
        if upd is not None and par is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                ur = (upd / par).astype(np.float32)
            eng.upd.grow(n)
            logv, ok = _log_positive(ur)
            c, e = eng.upd.step(logv, ok & valid)
            c &= ur > cfg.update_ratio_floor
            cc = np.nonzero(c)[0]
            cols_l.append(cc)
            met_l.append(np.full(cc.size, 1, dtype=np.int64))
            val_l.append(ur[cc].astype(np.float64))
            rat_l.append(np.exp(e[cc]))
        nf = np.nonzero(nonfin)[0]
        cols_l.append(nf)
        met_l.append(np.full(nf.size, 2, dtype=np.int64))
        val_l.append(np.full(nf.size, np.nan) if nfc is None else nfc[nf].astype(np.float64))
        rat_l.append(np.full(nf.size, np.inf))
        cols = np.concatenate(cols_l)
        if cols.size == 0:
            return None
        return _Row(u, step, cols, np.concatenate(met_l), np.concatenate(val_l), np.concatenate(rat_l), None,
                    overflow, False, None if g is None else g.astype(np.float64),
                    None if ur is None else ur.astype(np.float64))

    def report(self) -> Report:
        """The episodes and loss spikes of everything seen so far (equal to :func:`detect` on the same data)."""
        cfg = self.cfg
        warnings: list[str] = []
        if self._loss_nonpositive:
            warnings.append("loss has non-positive values; loss spikes are judged on its positive values only")
        if self._total[0]:
            ts, tv = np.asarray(self._total[0], dtype=np.int64), np.asarray(self._total[1])
        else:
            ts, tv = np.asarray(self._layer_total[0], dtype=np.int64), np.asarray(self._layer_total[1])
        if not self._saw_norms and not self._total[0]:
            warnings.append("no gradient norms in this run: only the loss was judged")
        first = self._steps[0] if self._steps else 0
        ctx = _Context(first, self._early_step() if self._steps else 0, ts, tv,
                       np.asarray(self._lr[0], dtype=np.int64), np.asarray(self._lr[1], dtype=np.float64),
                       self._histograms_of if self._hist else None)
        episodes, spikes = _build(self._rows, self._layers, self._grad_metric or "grad_norm", self._loss_rows,
                                  ctx, cfg)
        series = {k: Series(np.asarray(st, dtype=np.int64), np.asarray(v, dtype=np.float64))
                  for k, (st, v) in self._val.items()}
        loss = Series(np.asarray(self._loss[0], dtype=np.int64), np.asarray(self._loss[1])) if self._loss[0] else None
        val = _validation(series, loss, episodes, spikes, cfg)
        return Report(self.name, self.source, len(self._steps), _with_validation(episodes, spikes, val), spikes,
                      warnings, val)
