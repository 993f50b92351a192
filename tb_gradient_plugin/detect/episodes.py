"""Episodes and loss spikes from the rows of crossing steps: grouping, kinds, offending-layer ranking, linking.

The same code for the offline and the online path (online, a single new row tells whether an episode opens).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..types import TOTAL, Episode, LayerFinding, LossSpike, Spikes, fails_explosion
from .advice import Context, advise, clip_threshold
from .config import DetectorConfig
from .rows import DeadRun, LossRow, Metric, Row, RowBook, collapsed_cols


def _group(us: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Index ranges [i, j) of sorted step indices ``us`` whose neighbours are at most ``gap`` apart."""
    if us.size == 0:
        return []
    cut = np.nonzero(np.diff(us) > gap)[0] + 1
    bounds = np.concatenate([[0], cut, [us.size]])
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(bounds) - 1)]


def _findings(rows: list[Row], layers: list[str], grad_metric: str, cfg: DetectorConfig) -> list[LayerFinding]:
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
            if ra > cur[2] or (ra == cur[2] and m == Metric.NONFINITE and v > cur[4]):
                cur[2], cur[3], cur[4], cur[5] = ra, r.step, v, m
        if r.total is not None:
            v, ra = r.total
            if total is None:
                total = [r.u, r.step, ra, r.step, v]
            elif ra > total[2]:
                total[2], total[3], total[4] = ra, r.step, v
    names = {Metric.GRAD: grad_metric, Metric.UPDATE_RATIO: "update_ratio", Metric.NONFINITE: "nonfinite_count"}
    order = sorted(best.items(), key=lambda kv: (kv[1][0], -kv[1][6], -kv[1][2],
                                                 -kv[1][4] if kv[1][5] == Metric.NONFINITE else 0.0, kv[0]))
    out = [LayerFinding(layers[c], names[m], int(step0), int(pstep), float(val), float(ra))
           for c, (_, step0, ra, pstep, val, m, _) in order[: cfg.max_layers]]
    if not out and total is not None:
        out.append(LayerFinding(TOTAL, TOTAL, int(total[1]), int(total[3]), float(total[4]), float(total[2])))
    return out


class Findings(NamedTuple):
    """What the rows of a run (or of one online step) amount to."""

    episodes: list[Episode]
    loss_spikes: list[LossSpike]
    transients: list[Episode]  # kind "spike": groups of crossings after which nothing broke


def build_episodes(
    rows: list[Row],
    layers: list[str],
    grad_metric: str,
    loss_rows: list[LossRow],
    ctx: Context,
    cfg: DetectorConfig,
    book: RowBook | None = None,
) -> Findings:
    """Episodes, loss spikes and transient spikes from the per-step crossing rows (the same code offline and online).

    A group of crossings (at most ``merge_gap`` logged steps apart) is an explosion only when something broke (see
    :func:`confirmations`); otherwise it is a transient spike, counted in the run's spike rate. Spikes and explosions
    that keep recurring become one chronic finding (see :func:`_chronic`); layers whose gradient died, one finding
    of kind ``dead`` (see :func:`_dead`). ``book`` carries what the rows do not: collapsed and dead layers.
    """
    collapsed = book.collapsed if book is not None else {}
    loss_step = {r[0]: r[1] for r in loss_rows}  # step index -> step of each loss crossing
    loss_us = np.asarray(sorted(loss_step), dtype=np.int64)
    events: list[tuple[Episode, list[Row]]] = []
    for overflow in (False, True):
        sel = [r for r in rows if r.overflow == overflow]
        us = np.asarray([r.u for r in sel], dtype=np.int64)
        for i, j in _group(us, cfg.merge_gap):
            grp = sel[i:j]
            nonfinite = any(r.loss_nonfinite or r.has_nonfinite_layer() for r in grp) or any(
                r.total is not None and not math.isfinite(r.total[1]) for r in grp)
            if overflow:  # the loss scaler doing its job: no offending layer, no severity
                kind, finds, severity, reasons = "overflow_skip", [], 0.0, []
            else:
                finds = _findings(grp, layers, grad_metric, cfg)
                severity = max([f.ratio for f in finds] + [r.total[1] for r in grp if r.total is not None] + [1.0])
                if any(r.loss_nonfinite for r in grp):
                    severity = math.inf
                reasons = [] if nonfinite else confirmations(grp, severity, ctx, cfg, collapsed)
                kind = "nonfinite" if nonfinite else "explosion" if reasons else "spike"
            ep = Episode(kind, grp[0].step, grp[-1].step, _peak_row(grp).step, float(severity), finds,
                         confirmed_by=reasons)
            ep.loss_spike_step = _loss_step_near(grp, loss_step, loss_us, cfg) if kind == "spike" else None
            events.append((ep, grp))
    events.sort(key=lambda e: (e[0].start_step, e[0].kind))
    events = _chronic(events, layers, grad_metric, ctx, cfg)
    if book is not None and book.dead:
        events.append((_dead(book.dead, [ep for ep, _ in events if fails_explosion(ep)], layers, grad_metric), []))
        events.sort(key=lambda e: (e[0].start_step, e[0].kind))
    kept = [(ep, grp) for ep, grp in events if ep.kind != "spike"]
    episodes = [ep for ep, _ in kept]

    spikes = _loss_spikes(loss_rows, cfg)
    for s, su in spikes:
        for k, (ep, grp) in enumerate(kept):
            if ep.kind in ("overflow_skip", "dead"):  # a dead finding has no crossing rows to follow
                continue
            if grp[0].u <= su <= grp[-1].u + cfg.loss_link_points:
                s.episode = k
                if ep.loss_spike_step is None:
                    ep.loss_spike_step = s.step
                break
    transients = [ep for ep, _ in events if ep.kind == "spike"]
    clip = clip_threshold(ctx, episodes + transients, cfg)  # from the steps that did not spike: the spikes to clip
    for ep, grp in kept:
        ep.advice = advise(ep, grp, layers, clip, ctx, cfg)
    return Findings(episodes, [s for s, _ in spikes], transients)


def spike_summary(transients: list[Episode], logged_steps: int) -> Spikes:
    """The run's transient spikes as a rate (the report's ``spikes``)."""
    listed = transients[:Spikes.MAX_LISTED]
    return Spikes(len(transients), logged_steps, max((t.severity for t in transients), default=0.0),
                  [t.peak_step for t in listed], [t.severity for t in listed],
                  sum(t.loss_spike_step is not None for t in transients))


def confirmations(grp: list[Row], severity: float, ctx: Context, cfg: DetectorConfig,
                  collapsed: dict[int, bytes]) -> list[str]:
    """What shows that a group of finite crossings broke training (empty: a transient spike).

    - ``persistent``: crossings at ``persist_points`` logged steps or more (a level that stayed up);
    - ``loss_reaction``: the loss ``react_ratio`` times its baseline (the median of the window before the group) at
      one of the ``react_points`` losses logged after the group; where it was that high already at the group's first
      step (a hard batch raises loss and gradient at once), only if it stays there (their median);
    - ``update_ratio``: an applied update ``update_blowup`` times its baseline that grew about as much as its
      layer's gradient (or without it: a learning rate too high); clipping keeps a spike's update far below its
      gradient's jump (5-9x on a clipped LSTM, against 25-1000x when a learning rate was raised);
    - ``extreme``: ``extreme_ratio`` times the baseline or more, which needs nothing else;
    - ``collapse``: in the ``collapse_points`` logged steps after the group, a layer's gradient exactly zero at half
      of them or more, which it was not at the group's start (units the update killed).
    A run logged without the loss or update norms is judged on magnitude and persistence alone.
    """
    reasons = []
    if len(grp) >= cfg.persist_points:  # one row per logged step that crossed
        reasons.append("persistent")
    if _loss_reacted(grp[0].step, grp[-1].step, ctx, cfg):
        reasons.append("loss_reaction")
    if any(_update_blew_up(r, cfg.update_blowup) for r in grp):
        reasons.append("update_ratio")
    if severity >= cfg.extreme_ratio:
        reasons.append("extreme")
    if _collapsed_after(grp[0].u, grp[-1].u, collapsed, cfg):
        reasons.append("collapse")
    return reasons


def _collapsed_after(first: int, last: int, collapsed: dict[int, bytes], cfg: DetectorConfig) -> bool:
    if not collapsed:
        return False
    counts: dict[int, int] = {}
    for u in range(last + 1, last + cfg.collapse_points + 1):
        if u in collapsed:
            for col in collapsed_cols(collapsed[u]).tolist():
                counts[col] = counts.get(col, 0) + 1
    already = set(collapsed_cols(collapsed[first]).tolist()) if first in collapsed else set()
    need = max(1, cfg.collapse_points // 2)
    return any(n >= need and col not in already for col, n in counts.items())


#: ... and at least this share of its layer's gradient jump: plain SGD moves both alike (0.9-1.0 measured), while a
#: clipped spike's update grows far less (0.15-0.5 measured on a clipped LSTM); a learning rate too high moves the
#: update alone.
_UPDATE_SHARE = 0.75


def _update_blew_up(row: Row, blowup: float) -> bool:
    """An update ratio ``blowup`` times its baseline in a layer whose gradient crossed not much further at that step,
    or not at all."""
    grad = {int(c): float(r) for c, m, r in zip(row.cols.tolist(), row.metric.tolist(), row.ratio.tolist(), strict=True)
            if m == Metric.GRAD}
    return any(m == Metric.UPDATE_RATIO and r >= max(blowup, _UPDATE_SHARE * grad.get(int(c), 0.0))
               for c, m, r in zip(row.cols.tolist(), row.metric.tolist(), row.ratio.tolist(), strict=True))


def _loss_reacted(first: int, last: int, ctx: Context, cfg: DetectorConfig) -> bool:
    steps, vals = ctx.loss_steps, ctx.loss_values
    k0 = int(np.searchsorted(steps, first))
    before = vals[max(0, k0 - cfg.block * cfg.window_blocks):k0]
    before = before[np.isfinite(before) & (before > 0)]
    if before.size < cfg.loss_min_history:
        return False
    limit = cfg.react_ratio * float(np.median(before))
    k1 = int(np.searchsorted(steps, last, side="right"))
    after = vals[k1:k1 + cfg.react_points]
    if not after.size:
        return False
    if k0 < steps.size and steps[k0] == first and vals[k0] >= limit:  # a hard batch: the loss must stay up
        return float(np.median(after)) >= limit
    return bool(np.any(after >= limit))


def _loss_step_near(grp: list[Row], loss_step: dict[int, int], loss_us: np.ndarray, cfg: DetectorConfig
                    ) -> int | None:
    """The step of a loss crossing during a spike or within ``react_points`` after it (a hard batch, or a reaction
    too small to confirm it), or None."""
    lo, hi = np.searchsorted(loss_us, [grp[0].u, grp[-1].u + cfg.react_points + 1])
    if hi <= lo:
        return None
    return loss_step[int(loss_us[lo])]


def _chronic(events: list[tuple[Episode, list[Row]]], layers: list[str], grad_metric: str, ctx: Context,
             cfg: DetectorConfig) -> list[tuple[Episode, list[Row]]]:
    """Spikes and explosions that recur (``chronic_events`` or more, no two more than ``chronic_gap`` logged steps
    apart, at ``chronic_rate`` per 1,000 logged steps or more) become one chronic finding over their span, when one
    of them is an explosion or the loss suffers; a healthy heavy-tailed run keeps its spikes as a rate."""
    idx = [k for k, (ep, _) in enumerate(events) if ep.kind in ("explosion", "spike")]
    if len(idx) < cfg.chronic_events:
        return events
    first_us = np.asarray([events[k][1][0].u for k in idx], dtype=np.int64)
    absorbed: set[int] = set()
    made: list[tuple[Episode, list[Row]]] = []
    for a, b in _group(first_us, cfg.chronic_gap):
        members = [events[k] for k in idx[a:b]]
        span = members[-1][1][-1].u - members[0][1][0].u + 1
        if len(members) < cfg.chronic_events or 1000.0 * len(members) / span < cfg.chronic_rate:
            continue
        explosions = [ep for ep, _ in members if ep.kind == "explosion"]
        suffers = any("loss_reaction" in ep.confirmed_by for ep in explosions) or _loss_rose(
            members[0][0].start_step, members[-1][0].end_step, ctx, cfg)
        if not explosions and not suffers:
            continue
        rows = sorted((r for _, grp in members for r in grp), key=lambda r: r.u)
        worst = sorted(members, key=lambda m: -m[0].severity)[:5]
        severity = max(ep.severity for ep, _ in members)
        reasons = sorted({c for ep in explosions for c in ep.confirmed_by} | ({"loss_rose"} if suffers else set()))
        chronic = {"events": len(members), "explosions": len(explosions), "spikes": len(members) - len(explosions),
                   "rate_per_1k": round(1000.0 * len(members) / span, 3), "loss_suffers": bool(suffers),
                   "worst": [{"step": ep.peak_step, "ratio": ep.severity} for ep, _ in worst]}
        peak = worst[0][0].peak_step
        ep = Episode("chronic", members[0][0].start_step, members[-1][0].end_step, peak, float(severity),
                     _findings(rows, layers, grad_metric, cfg), confirmed_by=reasons, chronic=chronic)
        made.append((ep, rows))
        absorbed.update(idx[a:b])
    if not made:
        return events
    out = [e for k, e in enumerate(events) if k not in absorbed] + made
    out.sort(key=lambda e: (e[0].start_step, e[0].kind))
    return out


def _dead(dead: dict[int, DeadRun], broke: list[Episode], layers: list[str], grad_metric: str) -> Episode:
    """One finding for every layer whose gradient died (exactly zero, or ``dead_ratio`` below its baseline, at
    ``dead_points`` judged points in a row, after it had been non-zero): how many, from when, and after which episode,
    if one came before."""
    cols = sorted(dead, key=lambda c: (dead[c].step, c))
    onset, last = min(dead[c].step for c in cols), max(dead[c].last_step for c in cols)
    before = [ep for ep in broke if ep.start_step <= onset]
    after = before[-1] if before else None
    finds = [LayerFinding(layers[c], grad_metric, dead[c].step, dead[c].last_step, dead[c].value, dead[c].ratio)
             for c in cols]
    info = {"layers": len(cols), "of": len(layers), "from_step": onset,
            "vanished": sum(dead[c].ratio > 0 for c in cols),
            "after_episode": None if after is None else after.start_step,
            "restart_before": None if after is None else after.start_step}
    return Episode("dead", onset, last, onset, 0.0, finds, dead=info)


def _loss_rose(start: int, end: int, ctx: Context, cfg: DetectorConfig) -> bool:
    """Whether the loss at the end of ``[start, end]`` is ``chronic_loss_rise`` times the best level it reached
    since ``start``: medians over a baseline window of points, so neither one point nor the falling loss of early
    training counts."""
    steps, vals = ctx.loss_steps, ctx.loss_values
    n = cfg.block * cfg.window_blocks
    inside = vals[(steps >= start) & (steps <= end)]
    inside = inside[np.isfinite(inside) & (inside > 0)]
    if inside.size < 2 * n:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(inside, n)
    best = float(np.min(np.median(windows[::max(1, n // 4)], axis=1)))
    return float(np.median(inside[-n:])) >= cfg.chronic_loss_rise * best


def _peak_row(grp: list[Row]) -> Row:
    def key(r: Row) -> float:
        if r.loss_nonfinite or r.has_nonfinite_layer():
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


def _loss_spikes(loss_rows: list[LossRow], cfg: DetectorConfig) -> list[tuple[LossSpike, int]]:
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
