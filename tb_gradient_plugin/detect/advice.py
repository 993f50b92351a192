"""Advice for an episode, from measured numbers only: one rule per kind of evidence, applied in a fixed order.

Each rule looks at the same :class:`Facts` and returns one sentence or None; :data:`RULES` is the order in which the
sentences appear. Adding a piece of advice is adding one function to that list.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..types import TOTAL, Episode
from ..wording import EPISODE_START, relative_step
from .config import DetectorConfig
from .histograms import HistogramLookup, histogram_advice
from .rows import Metric, Row


@dataclass
class Context:
    """Run-level facts the advice draws on."""

    first_step: int
    early_step: int  # the last step of the first ``early_points`` logged steps
    total_steps: np.ndarray  # total gradient norm (logged, or from the layers)
    total_values: np.ndarray
    lr_steps: np.ndarray
    lr_values: np.ndarray
    #: a layer's gradient histograms: (steps, counts [k, HIST_BINS]) of the steps that logged it, or None
    hist: HistogramLookup | None = None
    #: the training loss (for whether recurring spikes made it worse)
    loss_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    loss_values: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class Facts:
    """What one episode's advice is drawn from."""

    episode: Episode
    rows: list[Row]  # the episode's rows, in step order
    layers: list[str]  # the run's layer names, by column
    clip: tuple[float, float] | None  # (suggested clip threshold, median) of the healthy total gradient norm
    ctx: Context
    cfg: DetectorConfig
    histogram: tuple[str, str] | None  # the histogram finding: (sentence, "mass" | "tail")


def fmt_num(x: float) -> str:
    """A measured number in advice: three significant digits."""
    return f"{x:.3g}"


def _overflow_skip(f: Facts) -> str | None:
    if f.episode.kind != "overflow_skip":
        return None
    return (f"AMP skipped {len(f.rows)} optimizer step(s) for gradient overflow while the loss scale backed "
            "off; this is normal mixed-precision behaviour and no update was applied.")


def _nonfinite_gradients(f: Facts) -> str | None:
    ep = f.episode
    if ep.kind != "nonfinite":
        return None
    # the episode may open earlier, with the growth that led to the first non-finite value
    bad = [r for r in f.rows if r.has_nonfinite_layer() or (r.total is not None and not math.isfinite(r.total[0]))]
    first_bad = bad[0] if bad else None
    first = first_bad.step if first_bad is not None else ep.start_step
    if first <= f.ctx.early_step:
        return (f"Non-finite gradients from the first logged steps (step {first}): check the "
                "initialization (weight scale), the inputs (NaN/Inf or unnormalised features) and the loss "
                "(log of 0, division by 0) before tuning the optimizer.")
    cols = [] if first_bad is None else first_bad.cols[first_bad.metric == Metric.NONFINITE].tolist()
    # of the layers non-finite first, the one the ranking puts highest: the advice and the ranking name one layer
    rank = {finding.name: i for i, finding in enumerate(ep.layers)}
    origin = min((f.layers[c] for c in cols), key=lambda name: rank.get(name, len(rank)), default=None)
    where = f" in {origin}" if origin is not None else ""
    grew = f" after growing from step {ep.start_step}" if first > ep.start_step else ""
    top = ep.layers[0] if ep.layers else None
    why = ""
    if origin is not None and top is not None and top.name not in (origin, TOTAL) and top.first_step < first:
        why = (f" {top.name} is ranked first because it was the furthest above its baseline when the episode began "
               f"(step {top.first_step}): the growth led there and overflowed first in {origin}.")
    return (f"Gradients became non-finite{where} at step {first}{grew}.{why} Guard the step (skip or "
            "clip non-finite updates) and look for the numerical operation that overflowed.")


def _nonfinite_loss(f: Facts) -> str | None:
    if f.episode.kind != "nonfinite":
        return None
    loss_bad = [r.step for r in f.rows if r.overflow is False and r.loss_nonfinite]
    if not loss_bad:
        return None
    return f"The loss itself was non-finite from step {loss_bad[0]} (last: {loss_bad[-1]})."


def _clip(f: Facts) -> str | None:
    """A clip threshold from the healthy total-norm distribution."""
    if f.clip is None or f.episode.kind != "explosion":
        return None
    q, median = f.clip
    peak = max((r.total[0] for r in f.rows if r.total is not None), default=None)
    peak_txt = f"; this episode's total norm reached {fmt_num(peak)}" if peak is not None else ""
    return (f"Clip the total gradient norm at about {fmt_num(q)} (the {f.cfg.clip_quantile:.0%} quantile of the "
            f"healthy total norm, median {fmt_num(median)}{peak_txt}).")


def _update_ratio_or_origin(f: Facts) -> str | None:
    """An update ratio far too high, or else which layer crossed first."""
    ep = f.episode
    if ep.kind == "overflow_skip":
        return None
    ur_rows = [(r, k) for r in f.rows for k in np.nonzero(r.metric == Metric.UPDATE_RATIO)[0].tolist()]
    if ur_rows:
        r, k = max(ur_rows, key=lambda rk: rk[0].value[rk[1]])
        name, val = f.layers[int(r.cols[k])], float(r.value[k])
        cause = ("the update was far too large for this layer, from a few of its entries (see its histogram)"
                 if f.histogram is not None and f.histogram[1] == "tail" else "the learning rate is too high for "
                 "this layer; lower it or give the layer its own parameter group")
        return (f"Update ratio ||dw||/||w|| of {name} reached {fmt_num(val)} at step {r.step} (healthy layers stay "
                f"around 1e-3..1e-2; {fmt_num(float(r.ratio[k]))}x its own baseline): {cause}.")
    top = ep.layers[0] if ep.layers else None
    if top is not None and top.name != TOTAL and ep.kind == "explosion":
        return (f"{top.name} crossed first (step {top.first_step}) and peaked at {fmt_num(top.ratio)}x its own "
                f"baseline ({top.metric} {fmt_num(top.peak_value)} at step {top.peak_step}).")
    return None


def _lr_rise(f: Facts) -> str | None:
    """The learning rate rose shortly before the episode."""
    ep, ctx = f.episode, f.ctx
    if ep.kind == "overflow_skip" or ctx.lr_steps.size < 2:
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
    return (f"The learning rate rose from {fmt_num(float(lrs[i]))} to {fmt_num(float(cur))} (at step {int(st[j])}, "
            f"{relative_step(int(st[j]) - ep.start_step, EPISODE_START)}): lower it or lengthen the warm-up.")


def _depth_growth(f: Facts) -> str | None:
    """Norms that grow steadily through the model's depth at the episode's peak point to normalization/residuals."""
    ep = f.episode
    if ep.kind == "overflow_skip":
        return None
    peak = next((r for r in f.rows if r.step == ep.peak_step and r.norms is not None), None)
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
    if abs(corr) < 0.9 or spread < f.cfg.depth_growth:
        return None
    hi, lo = (idx[-1], idx[0]) if corr > 0 else (idx[0], idx[-1])
    layers = f.layers
    return (f"At step {peak.step} the gradient norm grows {fmt_num(spread)}x steadily through depth, from "
            f"{fmt_num(float(g[lo]))} in {layers[lo]} to {fmt_num(float(g[hi]))} in {layers[hi]}: add normalization "
            "(LayerNorm/BatchNorm) or residual connections, or use a depth-scaled initialization.")


def _histogram(f: Facts) -> str | None:
    return None if f.histogram is None else f.histogram[0]


def _loss_spike(f: Facts) -> str | None:
    ep = f.episode
    if ep.loss_spike_step is None:
        return None
    return (f"The loss spiked at step {ep.loss_spike_step}, "
            f"{relative_step(ep.loss_spike_step - ep.peak_step)} of the gradients (step {ep.peak_step}).")


def _chronic(f: Facts) -> str | None:
    """Recurring spikes: how often, how bad, whether the loss paid for them, and what usually causes that."""
    ep = f.episode
    if ep.kind != "chronic" or not ep.chronic:
        return None
    c = ep.chronic
    worst = ", ".join(f"{fmt_num(w['ratio'])}x at step {w['step']}" for w in c["worst"][:3])
    loss = ("the loss suffered (it ended higher than before, or spiked right after a gradient spike)"
            if c["loss_suffers"] else "the loss did not suffer")
    return (f"Gradient spikes recurred {c['events']} times from step {ep.start_step} to {ep.end_step} "
            f"({fmt_num(c['rate_per_1k'])} per 1,000 logged steps, {c['explosions']} of them explosions; worst "
            f"{worst}); {loss}. Recurring spikes point at the learning rate (lower it or lengthen the warm-up), at a "
            "loose clip threshold, or at bad batches that recur with the data order: look at the batches of those "
            "steps.")


def _dead(f: Facts) -> str | None:
    """Layers whose gradient died: how many, from when, after what, the usual causes and where to restart."""
    ep = f.episode
    if ep.kind != "dead" or not ep.dead:
        return None
    d = ep.dead
    anchor = f"the episode at step {d['after_episode']}"
    after = f", {relative_step(d['from_step'] - d['after_episode'], anchor)}" if d["after_episode"] is not None else ""
    restart = (f" Restart from a checkpoint from before step {d['restart_before']}"
               if d["restart_before"] is not None else " Restart from a checkpoint from before it")
    below = f"fell {f.cfg.dead_ratio:,.0f}× or more below their baseline"
    how = ("went to exactly zero" if not d["vanished"] else below if d["vanished"] == d["layers"]
           else f"went to exactly zero ({d['layers'] - d['vanished']}) or {below} ({d['vanished']})")
    return (f"The gradients of {d['layers']} of {d['of']} layers {how} from step {d['from_step']}"
            f"{after}, and stayed there: the layers stopped learning. Usual "
            "causes: ReLU units killed by one large update, saturated activations (sigmoid/tanh), a learning rate "
            f"too high.{restart}, with a lower learning rate, a warm-up or gradient clipping.")


#: The advice rules, in the order their sentences appear.
RULES: list[Callable[[Facts], str | None]] = [
    _dead,
    _chronic,
    _overflow_skip,
    _nonfinite_gradients,
    _nonfinite_loss,
    _clip,
    _update_ratio_or_origin,
    _lr_rise,
    _depth_growth,
    _histogram,
    _loss_spike,
]


def advise(ep: Episode, rows: list[Row], layers: list[str], clip: tuple[float, float] | None, ctx: Context,
           cfg: DetectorConfig) -> list[str]:
    """The advice for one episode: every rule's sentence, in :data:`RULES` order."""
    facts = Facts(ep, rows, layers, clip, ctx, cfg, histogram_advice(ep, ctx.hist, cfg))
    return [text for rule in RULES if (text := rule(facts)) is not None]


def _healthy_total(ctx: Context, episodes: list[Episode]) -> np.ndarray:
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


def clip_threshold(ctx: Context, episodes: list[Episode], cfg: DetectorConfig) -> tuple[float, float] | None:
    """(the ``clip_quantile`` quantile, the median) of the total gradient norm outside every episode; None with too
    few healthy points to say."""
    healthy = _healthy_total(ctx, episodes)
    if healthy.size < 20:
        return None
    return float(np.quantile(healthy, cfg.clip_quantile)), float(np.median(healthy))
