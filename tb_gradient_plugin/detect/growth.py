"""Slow growth and a saturated clip: trouble that no single step shows, so the spike detector cannot see it.

* **Slow growth.** A gradient norm (a layer's, or the total) whose level rises, block after block, by
  ``growth_ratio`` or more from its low point to the end of the run while the loss does not improve. The baseline of
  the spike detector re-adapts to such a rise (it is never ``ratio`` times the recent level), and a clip hides it from
  the loss, so it needs a judgement over the whole run. Levels are medians of ``growth_block`` points: noise and
  single spikes do not move them, and a sudden jump (an explosion, which the spike detector reports) is told apart by
  the share of the rise that two blocks in a row carry.
* **Saturated clip.** With a recorded clip threshold (the monitor's ``clip=``, the HF Trainer's ``max_grad_norm``,
  Lightning's ``gradient_clip_val``), the share of steps whose pre-clip total norm is above it. Where it binds on most
  steps, every update is rescaled to the same norm: the learning rate is effectively set by the clip.

Both are findings of kind ``growth``: never an explosion, so ``--fail-on explosion`` does not fail on them. The
offline and the online detector feed the same :class:`GrowthTrack` (offline a whole array at a time, online a step at
a time) and judge it with the same :func:`growth_findings`, so they report the same findings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..types import GROWTH_KIND, TOTAL, Episode, LayerFinding, LossSpike
from .baseline import nanmedian_last
from .config import DetectorConfig


class BlockLevels:
    """Medians of log values over consecutive blocks of ``size`` points (rows), per column; NaN marks a point that
    does not count. Filled a row at a time (online) or many rows at once (offline): the blocks are the same."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._medians: list[np.ndarray] = []
        self._first: list[int] = []
        self._last: list[int] = []
        self._rows: list[np.ndarray] = []
        self._steps: list[int] = []

    def add(self, step: int, logv: np.ndarray) -> None:
        """One point per column (NaN: not counted); columns may only be added, at the end."""
        self._rows.append(np.asarray(logv, dtype=np.float64))
        self._steps.append(int(step))
        if len(self._rows) == self.size:
            self._close(self._steps, self._rows)
            self._rows, self._steps = [], []

    def extend(self, steps: np.ndarray, logv: np.ndarray, chunk_blocks: int = 256) -> None:
        """Many rows at once (``logv``: [rows, columns]); whole blocks are reduced in chunks, vectorised."""
        if self._rows:
            raise ValueError("extend() after add() of a partial block")
        n = logv.shape[0]
        full = n - n % self.size
        for a in range(0, full, chunk_blocks * self.size):
            b = min(full, a + chunk_blocks * self.size)
            block = logv[a:b].astype(np.float64).reshape(-1, self.size, logv.shape[1])
            self._medians.extend(_nanmedian(block, axis=1))
            self._first.extend(steps[a:b:self.size].tolist())
            self._last.extend(steps[a + self.size - 1:b:self.size].tolist())
        for i in range(full, n):
            self._rows.append(logv[i].astype(np.float64))
            self._steps.append(int(steps[i]))

    def _close(self, steps: list[int], rows: list[np.ndarray]) -> None:
        width = max(r.size for r in rows)
        block = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            block[i, :r.size] = r
        self._medians.append(_nanmedian(block, axis=0))
        self._first.append(steps[0])
        self._last.append(steps[-1])

    def levels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(medians [blocks, columns], first step [blocks], last step [blocks]), the partial last block included."""
        medians, first, last = list(self._medians), list(self._first), list(self._last)
        if self._rows:
            width = max(r.size for r in self._rows)
            block = np.full((len(self._rows), width), np.nan)
            for i, r in enumerate(self._rows):
                block[i, :r.size] = r
            medians.append(_nanmedian(block, axis=0))
            first.append(self._steps[0])
            last.append(self._steps[-1])
        if not medians:
            return np.zeros((0, 0)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        width = max(m.size for m in medians)
        out = np.full((len(medians), width), np.nan)
        for i, m in enumerate(medians):
            out[i, :m.size] = m
        return out, np.asarray(first, dtype=np.int64), np.asarray(last, dtype=np.int64)


def _nanmedian(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmedian`` (an all-NaN column is a NaN level), sort-based: numpy takes a masked-array path for short
    axes such as a block's, several times slower."""
    return nanmedian_last(np.moveaxis(x, axis, -1))


@dataclass
class ClipCount:
    """How often the pre-clip total gradient norm was above the recorded clip threshold."""

    judged: int = 0  # total-norm points with a known threshold (finite, not an AMP-skipped step)
    bound: int = 0  # ... of which above it
    first_bound: int | None = None  # step of the first one above it
    worst_step: int | None = None  # step of the largest norm over threshold
    worst_ratio: float = 0.0
    threshold: float = math.nan  # the last threshold in force
    last_step: int = 0  # the last step judged

    def add(self, step: int, norm: float, threshold: float) -> None:
        """One pre-clip total norm judged against the threshold in force at its step."""
        self.judged += 1
        self.threshold, self.last_step = threshold, step
        if norm > threshold:
            self.bound += 1
            if self.first_bound is None:
                self.first_bound = step
            if norm / threshold > self.worst_ratio:
                self.worst_ratio, self.worst_step = norm / threshold, step

    def extend(self, steps: np.ndarray, norms: np.ndarray, thresholds: np.ndarray) -> None:
        """Many points at once: the same counts as :meth:`add` one by one."""
        if not steps.size:
            return
        over = norms > thresholds
        self.judged += int(steps.size)
        self.threshold, self.last_step = float(thresholds[-1]), int(steps[-1])
        if over.any():
            self.bound += int(over.sum())
            if self.first_bound is None:
                self.first_bound = int(steps[np.argmax(over)])
            ratios = np.where(over, norms / thresholds, 0.0)
            k = int(np.argmax(ratios))
            if ratios[k] > self.worst_ratio:
                self.worst_ratio, self.worst_step = float(ratios[k]), int(steps[k])


def clip_points(norm: float, threshold: float, skipped: bool) -> bool:
    """Whether a pre-clip total norm is judged against a threshold: both finite and positive, the step not skipped."""
    return (not skipped) and math.isfinite(norm) and math.isfinite(threshold) and threshold > 0 and norm >= 0


@dataclass
class GrowthTrack:
    """What the growth judgement needs of a run: block levels of every layer's gradient norm and of the total norm,
    and the clip counts. The loss comes from the detector's own record of it."""

    layers: BlockLevels
    total: BlockLevels
    clip: ClipCount

    @classmethod
    def new(cls, cfg: DetectorConfig) -> GrowthTrack:
        return cls(BlockLevels(cfg.growth_block), BlockLevels(cfg.growth_block), ClipCount())


def log_level(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """log of the positive, finite, valid values; NaN elsewhere (they do not count towards a level). In the values'
    own precision when they are float32 (per-layer norms: half the memory traffic of float64, and a level needs no
    more), float64 otherwise; the online and offline paths hand the same dtypes, so their levels agree."""
    v = np.asarray(values)
    if v.dtype != np.float32:
        v = v.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = valid & np.isfinite(v) & (v > 0)
        out = np.log(v, where=ok, out=np.full(v.shape, np.nan, dtype=v.dtype))
    return out


def growth_findings(track: GrowthTrack, layer_names: list[str], grad_metric: str, loss_steps: np.ndarray,
                    loss_values: np.ndarray, cfg: DetectorConfig) -> list[Episode]:
    """The run's ``growth`` findings: at most one for slow growth (every series that grew, the total first) and one
    for a saturated clip."""
    out = []
    grown = _grown(track.total, [TOTAL], loss_steps, loss_values, cfg) + \
        _grown(track.layers, layer_names, loss_steps, loss_values, cfg)
    if grown:
        out.append(_growth_episode(grown, grad_metric, cfg))
    clip = track.clip
    if clip.judged >= cfg.min_history and clip.bound >= cfg.clip_saturated_share * clip.judged:
        out.append(_clip_episode(clip))
    return out


@dataclass
class _Grown:
    name: str
    factor: float
    from_step: int
    to_step: int
    low: float
    end: float
    loss_before: float
    loss_after: float


def _grown(levels: BlockLevels, names: list[str], loss_steps: np.ndarray, loss_values: np.ndarray,
           cfg: DetectorConfig) -> list[_Grown]:
    med, first, last = levels.levels()
    if med.shape[0] < cfg.growth_min_blocks or not loss_steps.size:
        return []
    e = cfg.growth_end_blocks
    need = math.log(cfg.growth_ratio)
    out = []
    finite_loss = np.isfinite(loss_values)
    for col in range(min(med.shape[1], len(names))):
        ok = np.flatnonzero(np.isfinite(med[:, col]))
        if ok.size < max(cfg.growth_min_blocks, e + 1):
            continue
        b = med[ok, col]
        end = float(np.median(b[-e:]))
        lo = int(np.argmin(b[:-e]))
        rise = end - float(b[lo])
        if rise < need or ok.size - lo < cfg.growth_min_blocks:
            continue
        seg = b[lo:]
        if float(np.max(seg[2:] - seg[:-2], initial=-np.inf)) > cfg.growth_max_jump * rise:
            continue  # a jump, not a trend: the spike detector's business
        a0, a1 = int(first[ok[max(lo - 1, 0)]]), int(last[ok[min(lo + 1, ok.size - 1)]])
        z0 = int(first[ok[-e]])
        before = loss_values[(loss_steps >= a0) & (loss_steps <= a1) & finite_loss]
        after = loss_values[(loss_steps >= z0) & finite_loss]
        if not before.size or not after.size:
            continue
        lb, la = float(np.median(before)), float(np.median(after))
        if la < lb - abs(lb) * cfg.growth_loss_gain:
            continue  # the loss improved: learning, not trouble
        out.append(_Grown(names[col], math.exp(rise), int(first[ok[lo]]), int(last[ok[-1]]), math.exp(float(b[lo])),
                          math.exp(end), lb, la))
    return out


def _growth_episode(grown: list[_Grown], grad_metric: str, cfg: DetectorConfig) -> Episode:
    total = [g for g in grown if g.name == TOTAL]
    layers = sorted((g for g in grown if g.name != TOTAL), key=lambda g: (-g.factor, g.name))
    ranked = total + layers
    top = ranked[0]
    finds = [LayerFinding(g.name, TOTAL if g.name == TOTAL else grad_metric, g.from_step, g.to_step, g.end, g.factor)
             for g in ranked[:cfg.max_layers]]
    what = "the total gradient norm" if top.name == TOTAL else f"the gradient norm of {top.name}"
    more = f" (and {len(ranked) - 1} more series)" if len(ranked) > 1 else ""
    summary = (f"{what} grew {top.factor:.0f}× from step {top.from_step:,} to step {top.to_step:,}{more} while the "
               f"loss did not improve ({top.loss_before:.3g} → {top.loss_after:.3g}): a slow divergence no single "
               "step shows")
    info = {"signal": "slow_growth", "series": top.name, "factor": top.factor, "from_step": top.from_step,
            "to_step": top.to_step, "loss_before": top.loss_before, "loss_after": top.loss_after,
            "series_grown": len(ranked), "summary": summary}
    advice = ["Lower the learning rate, or look for what lets the weights grow (no weight decay, a missing "
              "normalization); a clip only hides the growth from the loss."]
    return Episode(GROWTH_KIND, top.from_step, top.to_step, top.to_step, top.factor, finds, advice=advice, growth=info)


def _clip_episode(clip: ClipCount) -> Episode:
    share = clip.bound / clip.judged
    pct = f"{100 * share:.0f}"
    summary = f"the clip binds on {pct} % of steps: the learning rate is effectively set by the clip"
    info = {"signal": "saturated_clip", "clip_threshold": clip.threshold, "binding_steps": clip.bound,
            "judged_steps": clip.judged, "binding_share": share, "summary": summary}
    first = clip.first_bound if clip.first_bound is not None else 0
    peak = clip.worst_step if clip.worst_step is not None else first
    finds = [LayerFinding(TOTAL, TOTAL, first, peak, clip.worst_ratio * clip.threshold, clip.worst_ratio)]
    advice = [f"The pre-clip total norm was above {clip.threshold:.3g} at {clip.bound:,} of {clip.judged:,} steps: "
              "raise the clip threshold to about the usual pre-clip norm so that it catches outliers only, or lower "
              "the learning rate to what the clip now sets."]
    return Episode(GROWTH_KIND, first, max(first, clip.last_step), peak, clip.worst_ratio, finds, advice=advice,
                   growth=info)


def with_growth(episodes: list[Episode], spikes: list[LossSpike], growth: list[Episode]) -> list[Episode]:
    """The growth findings merged into the episodes in step order; loss spikes keep pointing at their episode."""
    if not growth:
        return episodes
    both = episodes + growth
    merged = sorted(range(len(both)), key=lambda k: (both[k].start_step, k >= len(episodes), k))
    where = {old: new for new, old in enumerate(merged)}
    for s in spikes:
        if s.episode is not None:
            s.episode = where[s.episode]
    return [both[k] for k in merged]
