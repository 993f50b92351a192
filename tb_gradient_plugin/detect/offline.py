"""Offline detection: a whole run's arrays judged at once, vectorised over layers and blocks.

Each series is solved in one pass (:func:`~tb_gradient_plugin.detect.baseline.solve`); only the AMP loss-scale state
is walked step by step, and only over the steps that logged it. The crossings go into the same
:class:`~tb_gradient_plugin.detect.rows.RowBook` the online detector fills, so both build the same episodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..types import AmpSkips, Report, RunData, Series, update_ratio_inputs
from .advice import Context
from .baseline import Points, log_positive, solve
from .config import DetectorConfig
from .episodes import build_episodes, spike_summary
from .growth import GrowthTrack, growth_findings, log_level, with_growth
from .histograms import run_histograms
from .rows import AmpState, Crossing, LossRow, Metric, RowBook, dead_runs, run_warnings
from .validation import judge_validation, with_validation

#: The per-step series the detector judges (besides the validation series).
_SERIES = ("total_grad_norm", "loss", "step_skipped", "loss_scale", "lr", "clip_threshold")


@dataclass
class _StepAxis:
    """Every distinct logged step of a run (``u`` indexes it), with the AMP state of each."""

    steps: np.ndarray
    skipped: np.ndarray  # the optimizer step was skipped (AMP overflow)
    collapsed: np.ndarray  # ... while the loss scale had collapsed

    def step(self, u: int) -> int:
        return int(self.steps[u])

    def overflow(self, u: int) -> bool:
        """A benign AMP overflow skip (the scale backed off; it did not collapse)."""
        return bool(self.skipped[u] and not self.collapsed[u])


def detect(run: RunData, config: DetectorConfig | None = None) -> Report:
    """Judge one run offline (vectorised over layers and blocks)."""
    cfg = config or DetectorConfig()
    ser = {n: _series(run, n) for n in _SERIES}
    steps = np.asarray(run.steps, dtype=np.int64)
    parts = [steps] + [np.asarray(s.steps, dtype=np.int64) for s in ser.values() if s is not None]
    ax = _amp_axis(np.unique(np.concatenate(parts)), ser, cfg)
    book = RowBook()
    grad_metric, norms = _layer_rows(run, steps, ax, book, cfg)
    tot = ser["total_grad_norm"]
    if tot is not None:
        _total_rows(tot, ax, book, cfg)
    loss_rows, loss_nonpositive = _loss_rows(ser["loss"], ax, book, cfg)
    for u in np.nonzero(ax.skipped)[0].tolist():
        book.add_amp(u, ax.step(u), True, bool(ax.collapsed[u]))

    warnings = run_warnings(loss_nonpositive, norms is not None or tot is not None)
    ctx = _context(ax.steps, ser, run, steps, norms, cfg)
    found = build_episodes(book.ordered(), list(run.layers), grad_metric, loss_rows, ctx, cfg, book)
    val = judge_validation(run.series, ser["loss"], found.episodes, found.loss_spikes, cfg)
    loss = ser["loss"]
    growth = growth_findings(_growth_track(run, steps, ax, ser, cfg), list(run.layers), grad_metric,
                             np.zeros(0, np.int64) if loss is None else np.asarray(loss.steps, dtype=np.int64),
                             np.zeros(0) if loss is None else np.asarray(loss.values, dtype=np.float64), cfg)
    episodes = with_growth(with_validation(found.episodes, found.loss_spikes, val), found.loss_spikes, growth)
    return Report(run.name, run.source, int(ax.steps.size), episodes, found.loss_spikes, warnings, val,
                  spike_summary(found.transients, int(ax.steps.size)), _amp_skips(ax, ser))


def _growth_track(run: RunData, steps: np.ndarray, ax: _StepAxis, ser: dict[str, Series | None],
                  cfg: DetectorConfig) -> GrowthTrack:
    """The block levels of the gradient norms and the clip counts, as the online detector gathers them."""
    track = GrowthTrack.new(cfg)
    gm = run.layer_metrics.get("grad_norm")
    if gm is None:
        gm = run.layer_metrics.get("grad_max_abs")
    n_layers = len(run.layers)
    if gm is not None and n_layers and steps.size:
        present = run.present if run.present.shape == (steps.size, n_layers) else np.ones(gm.shape, dtype=bool)
        ok = present & ~ax.skipped[np.searchsorted(ax.steps, steps)][:, None]
        for a in range(0, steps.size, 256 * cfg.growth_block):
            b = min(steps.size, a + 256 * cfg.growth_block)
            track.layers.extend(steps[a:b], log_level(gm[a:b], ok[a:b]))
    tot = ser["total_grad_norm"]
    if tot is None:
        return track
    ts, tv = np.asarray(tot.steps, dtype=np.int64), np.asarray(tot.values, dtype=np.float64)
    skipped = ax.skipped[np.searchsorted(ax.steps, ts)]
    track.total.extend(ts, log_level(tv, ~skipped)[:, None])
    clip = ser["clip_threshold"]
    if clip is not None:
        cs, cv = np.asarray(clip.steps, dtype=np.int64), np.asarray(clip.values, dtype=np.float64)
        k = np.searchsorted(cs, ts, side="right") - 1
        thr = np.where(k >= 0, cv[np.maximum(k, 0)], np.nan)
        with np.errstate(invalid="ignore"):
            judged = ~skipped & np.isfinite(tv) & np.isfinite(thr) & (thr > 0) & (tv >= 0)
        track.clip.extend(ts[judged], tv[judged], thr[judged])
    return track


def _amp_skips(ax: _StepAxis, ser: dict[str, Series | None]) -> AmpSkips | None:
    """The run's AMP overflow skips, for runs that logged a loss scale or a skip flag."""
    scale = ser["loss_scale"]
    if scale is None and ser["step_skipped"] is None:
        return None
    finite = np.asarray(scale.values, dtype=np.float64) if scale is not None else np.zeros(0)
    finite = finite[np.isfinite(finite)]
    return AmpSkips(int((ax.skipped & ~ax.collapsed).sum()), int(ax.steps.size),
                    float(finite[-1]) if finite.size else None, bool((ax.skipped & ax.collapsed).any()))


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


def _amp_axis(axis: np.ndarray, ser: dict[str, Series | None], cfg: DetectorConfig) -> _StepAxis:
    """AMP state per step of the axis (sequential by nature, but only over steps that logged a scale or skip flag)."""
    amp = AmpState(cfg)
    skipped = np.zeros(axis.shape[0], dtype=bool)
    collapsed = np.zeros(axis.shape[0], dtype=bool)
    scale_ax, skip_ax = _on_axis(axis, ser["loss_scale"]), _on_axis(axis, ser["step_skipped"])
    has_skip = ser["step_skipped"] is not None
    amp_idx = np.nonzero(~np.isnan(scale_ax) | ~np.isnan(skip_ax))[0]
    for u in amp_idx.tolist():
        sc = None if np.isnan(scale_ax[u]) else float(scale_ax[u])
        sk = None if not has_skip else (0.0 if np.isnan(skip_ax[u]) else float(skip_ax[u]))
        skipped[u], collapsed[u] = amp.step(sc, sk)
    return _StepAxis(axis, skipped, collapsed)


def _layer_rows(run: RunData, steps: np.ndarray, ax: _StepAxis, book: RowBook, cfg: DetectorConfig
                ) -> tuple[str, np.ndarray | None]:
    """Judge every layer's gradient metric and update ratio; returns (the gradient metric, its values or None)."""
    grad_metric = "grad_norm"
    norms = None
    n_layers = len(run.layers)
    if not (n_layers and steps.size):
        return grad_metric, norms
    lm = run.layer_metrics
    present = run.present if run.present.shape == (steps.size, n_layers) else np.ones((steps.size, n_layers), bool)
    gm = lm.get("grad_norm")
    if gm is None:
        gm = lm.get("grad_max_abs")
        grad_metric = "grad_max_abs"
    lu = np.searchsorted(ax.steps, steps)
    skipped_pts = ax.skipped[lu]
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
    crosses: list[tuple[Metric, np.ndarray, np.ndarray, Points]] = []
    if gm is not None:
        norms = gm
        pts = Points(gm, valid)
        c, bases, _, low = solve(pts, cfg, cfg.ratio, cfg.z, cfg.min_history, cfg.mature_history,
                                 low_ratio=cfg.dead_ratio)
        crosses.append((Metric.GRAD, c, bases, pts))
        _dead_rows(gm, valid, low, lu, steps, book, cfg)
    upd = _update_ratio_points(run, valid)
    if upd is not None:
        c, bases, _, _ = solve(upd, cfg, cfg.update_ratio_ratio, cfg.update_ratio_z, cfg.min_history,
                               cfg.mature_history)
        ci, cj = np.nonzero(c)
        low = ~(upd.raw(ci, cj) > cfg.update_ratio_floor)
        c[ci[low], cj[low]] = False
        crosses.append((Metric.UPDATE_RATIO, c, bases, upd))
    active = nonfin.any(axis=1)
    for _, c, _, _ in crosses:
        active |= c.any(axis=1)
    for i in np.nonzero(active)[0].tolist():
        crossings: list[Crossing] = []
        for m, c, bases, src in crosses:
            cc = np.nonzero(c[i])[0]
            vals = src.raw(i)
            crossings.append((m, cc, vals[cc].astype(np.float64),
                              np.exp(log_positive(vals)[0][cc] - bases[i // cfg.block, cc])))
        nf = np.nonzero(nonfin[i])[0]
        u = int(lu[i])
        book.add_layers(u, ax.step(u), crossings, nf, None if nfc is None else nfc[i, nf], ax.overflow(u),
                        None if norms is None else np.asarray(norms[i], dtype=np.float64))
    return grad_metric, norms


def _dead_rows(gm: np.ndarray, valid: np.ndarray, low: tuple[np.ndarray, np.ndarray, np.ndarray], lu: np.ndarray,
               steps: np.ndarray, book: RowBook, cfg: DetectorConfig, chunk: int = 4096) -> None:
    """Steps where a layer's gradient was exactly zero (in row chunks), and the runs where it stayed zero or
    ``dead_ratio`` below its baseline (``low``: those points, from :func:`solve`): dead layers."""
    zero = np.zeros(valid.shape, dtype=bool)
    for a in range(0, gm.shape[0], chunk):
        z = zero[a:a + chunk]
        z[...] = valid[a:a + chunk] & (gm[a:a + chunk] == 0)
        for i in np.nonzero(z.any(axis=1))[0].tolist():
            book.add_collapsed(int(lu[a + i]), z[i])
    if not (low[0].size or zero.any()):
        return
    with np.errstate(invalid="ignore"):
        positive = np.asarray(gm) > 0
    dead_runs(zero, valid, positive, low, lambda col: log_positive(gm[:, col])[0], gm, lu, steps, book,
              cfg.dead_points, math.log(cfg.dead_ratio))


def _update_ratio_points(run: RunData, valid: np.ndarray) -> Points | None:
    """The update ratio as :meth:`RunData.update_ratio` defines it, divided where it is read (no full copy)."""
    inputs = update_ratio_inputs(run.layer_metrics)
    if inputs is None:
        return None
    return Points(inputs[0], valid, inputs[1])


def _total_rows(tot: Series, ax: _StepAxis, book: RowBook, cfg: DetectorConfig) -> None:
    """Judge the logged total gradient norm; a non-finite value always counts."""
    tu = np.searchsorted(ax.steps, np.asarray(tot.steps, dtype=np.int64))
    tv = np.asarray(tot.values, dtype=np.float64)
    nonfinite_t = ~np.isfinite(tv)
    c, bases, _, _ = solve(Points(tv[:, None], ~ax.skipped[tu][:, None]), cfg, cfg.ratio, cfg.z, cfg.min_history,
                        cfg.mature_history)
    logv = log_positive(tv)[0]
    for k in np.nonzero(c[:, 0] | nonfinite_t)[0].tolist():
        u = int(tu[k])
        ratio = math.inf if nonfinite_t[k] else float(np.exp(logv[k] - bases[k // cfg.block, 0]))
        book.add_total(u, ax.step(u), ax.overflow(u), float(tv[k]), ratio)


def _loss_rows(loss: Series | None, ax: _StepAxis, book: RowBook, cfg: DetectorConfig) -> tuple[list[LossRow], bool]:
    """The loss's crossings (for loss spikes) and its non-finite values (episodes); and whether it had values <= 0."""
    loss_rows: list[LossRow] = []
    if loss is None:
        return loss_rows, False
    lv = np.asarray(loss.values, dtype=np.float64)
    lsu = np.searchsorted(ax.steps, np.asarray(loss.steps, dtype=np.int64))
    nonpositive = bool(np.any(np.isfinite(lv) & (lv <= 0)))
    c, bases, _, _ = solve(Points(lv[:, None], ~ax.skipped[lsu][:, None]), cfg, cfg.loss_ratio, cfg.loss_z,
                        cfg.loss_min_history, cfg.loss_min_history)
    logv = log_positive(lv)[0]
    usable = np.isfinite(lv) & (lv > 0) & ~ax.skipped[lsu]
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
        book.add_nonfinite_loss(u, ax.step(u), ax.overflow(u))
    return loss_rows, nonpositive


def _context(axis: np.ndarray, ser: dict[str, Series | None], run: RunData, steps: np.ndarray,
             norms: np.ndarray | None, cfg: DetectorConfig) -> Context:
    early = int(axis[min(cfg.early_points, axis.size) - 1]) if axis.size else 0
    tot = ser["total_grad_norm"]
    if tot is not None:
        ts, tv = np.asarray(tot.steps, dtype=np.int64), np.asarray(tot.values, dtype=np.float64)
    elif norms is not None:
        ts, tv = steps, _total_from_layers(norms, run.present)
    else:
        ts, tv = np.zeros(0, dtype=np.int64), np.zeros(0)
    lr, loss = ser["lr"], ser["loss"]
    ls = np.asarray(lr.steps, dtype=np.int64) if lr is not None else np.zeros(0, dtype=np.int64)
    lv = np.asarray(lr.values, dtype=np.float64) if lr is not None else np.zeros(0)
    ctx = Context(int(axis[0]) if axis.size else 0, early, ts, tv, ls, lv, run_histograms(run))
    if loss is not None:
        ctx.loss_steps = np.asarray(loss.steps, dtype=np.int64)
        ctx.loss_values = np.asarray(loss.values, dtype=np.float64)
    return ctx


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
