"""Episodes and loss spikes from the rows of crossing steps: grouping, kinds, offending-layer ranking, linking.

The same code for the offline and the online path (online, a single new row tells whether an episode opens).
"""

from __future__ import annotations

import math

import numpy as np

from ..types import TOTAL, Episode, LayerFinding, LossSpike
from .advice import Context, advise, clip_threshold
from .config import DetectorConfig
from .rows import LossRow, Metric, Row


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


def build_episodes(
    rows: list[Row],
    layers: list[str],
    grad_metric: str,
    loss_rows: list[LossRow],
    ctx: Context,
    cfg: DetectorConfig,
) -> tuple[list[Episode], list[LossSpike]]:
    """Episodes and loss spikes from the per-step crossing rows (the same code for offline and online)."""
    episodes: list[Episode] = []
    spans: list[tuple[int, int]] = []  # (first u, last u) of each episode, in list order
    groups: list[list[Row]] = []
    for overflow in (False, True):
        sel = [r for r in rows if r.overflow == overflow]
        us = np.asarray([r.u for r in sel], dtype=np.int64)
        for i, j in _group(us, cfg.merge_gap):
            grp = sel[i:j]
            nonfinite = any(r.loss_nonfinite or r.has_nonfinite_layer() for r in grp) or any(
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
    clip = clip_threshold(ctx, episodes, cfg)
    for ep, grp in zip(episodes, groups, strict=True):
        ep.advice = advise(ep, grp, layers, clip, ctx, cfg)
    return episodes, [s for s, _ in spikes]


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
