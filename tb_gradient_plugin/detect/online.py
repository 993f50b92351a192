"""Online detection: steps judged as they arrive, O(layers) each, with the arithmetic of the offline detector.

Training-time users (the guard, a callback) need a verdict on a step before the next one; the online detector keeps
a few blocks of numbers per series (:class:`~tb_gradient_plugin.detect.baseline.Baseline`) and records what it finds
in the same :class:`~tb_gradient_plugin.detect.rows.RowBook` as the offline path, so its final report equals
:func:`~tb_gradient_plugin.detect.detect` on the same data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .. import format as fmt
from ..types import AmpSkips, Episode, Report, Series, update_ratio
from .advice import Context
from .baseline import Baseline, log_positive
from .config import DetectorConfig
from .episodes import build_episodes, spike_summary
from .growth import GrowthTrack, clip_points, growth_findings, log_level, with_growth
from .rows import AmpState, Crossing, DeadTracker, LossRow, Metric, RowBook, run_warnings
from .validation import judge_validation, validation_series, with_validation

#: Attributes of :class:`OnlineDetector` that only grow, one item per step (lists of numbers or immutable tuples, or
#: pairs of such lists) and per series: :meth:`OnlineDetector.fork` copies them one level deep.
_PER_STEP = frozenset({"_steps", "_total", "_layer_total", "_lr", "_loss", "_loss_rows"})
_PER_SERIES = frozenset({"_val", "_hist"})


class _Engine:
    """The judgement state of every series of one run: a baseline per metric, and the AMP loss-scale state."""

    def __init__(self, cfg: DetectorConfig) -> None:
        hist = (cfg.min_history, cfg.mature_history)
        self.grad = Baseline(0, cfg, cfg.ratio, cfg.z, *hist)
        self.upd = Baseline(0, cfg, cfg.update_ratio_ratio, cfg.update_ratio_z, *hist)
        self.total = Baseline(1, cfg, cfg.ratio, cfg.z, *hist)
        # loss series are often one point per epoch: no young phase beyond their own minimum history
        self.loss = Baseline(1, cfg, cfg.loss_ratio, cfg.loss_z, cfg.loss_min_history, cfg.loss_min_history)
        self.amp = AmpState(cfg)


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
        self._book = RowBook()
        self._dead = DeadTracker()
        self._layers: list[str] = []
        self._col: dict[str, int] = {}
        self._loss_rows: list[LossRow] = []
        self._loss_low = math.inf  # the lowest usable loss since the last loss crossing
        self._u = -1
        self._last_step: int | None = None
        self._last_active = {False: None, True: None}
        self._grad_metric: str | None = None
        self._has_amp_skip = False
        self._amp = AmpSkips()
        self._amp_seen = False
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
        self._growth = GrowthTrack.new(self.cfg)
        self._clip = math.nan  # the clip threshold in force (the last one recorded)

    @property
    def layers(self) -> list[str]:
        """The layers seen so far, in the order first logged: the layer order of the report."""
        return list(self._layers)

    def fork(self) -> OnlineDetector:
        """An independent copy, to judge steps on that may still change (a live run's newest step). Equal to
        ``copy.deepcopy`` but several times faster on a long run: the per-step records, lists of numbers and of
        arrays never written to again, are copied one level deep."""
        twin = copy.copy(self)
        for name, value in vars(self).items():
            if name in _PER_STEP:
                setattr(twin, name, tuple(list(part) for part in value) if isinstance(value, tuple) else list(value))
            elif name in _PER_SERIES:
                setattr(twin, name, {key: (list(a), list(b)) for key, (a, b) in value.items()})
            else:
                setattr(twin, name, copy.deepcopy(value))
        return twin

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
        """Judge one logged step; returns the episodes that opened at it.

        A crossing that nothing confirms yet comes back as an episode of kind ``"spike"``: it may be a transient
        spike, or the first step of an explosion that later steps (or the loss) confirm in :meth:`report`.
        """
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
            self._amp_seen = True
            sk = sc.get("step_skipped", 0.0 if self._has_amp_skip else None)
            skip, collapse = eng.amp.step(sc.get("loss_scale"), sk)
            amp = self._amp
            amp.skipped += skip and not collapse
            amp.collapsed |= skip and collapse
            if math.isfinite(sc.get("loss_scale", math.nan)):
                amp.last_scale = sc["loss_scale"]
        overflow = skip and not collapse
        book = self._book
        if layers:
            self._judge_layers(u, step, layers, metrics, skip, overflow)
        if "clip_threshold" in sc:
            self._clip = sc["clip_threshold"]
        if "total_grad_norm" in sc:
            tv = sc["total_grad_norm"]
            self._growth.total.add(step, log_level(np.asarray([tv]), np.asarray([not skip])))
            if clip_points(tv, self._clip, skip):
                self._growth.clip.add(step, tv, self._clip)
            self._total[0].append(step)
            self._total[1].append(tv)
            logv, ok = log_positive(np.asarray([tv]))
            cross, excess = eng.total.step(logv, ok & (not skip))
            if cross[0] or not math.isfinite(tv):
                book.add_total(u, step, overflow, tv, math.inf if not math.isfinite(tv) else float(np.exp(excess[0])))
        if "loss" in sc:
            lv = sc["loss"]
            if math.isfinite(lv) and lv <= 0:
                self._loss_nonpositive = True
            logv, ok = log_positive(np.asarray([lv]))
            base = eng.loss.limits()[0][0]
            cross, excess = eng.loss.step(logv, ok & (not skip))
            if cross[0]:
                back = bool(self._loss_rows) and self._loss_low < self._loss_rows[-1][3] * cfg.loss_back_ratio
                self._loss_rows.append((u, step, lv, float(np.exp(base)), float(np.exp(excess[0])), back))
                self._loss_low = math.inf
            elif ok[0] and not skip:
                self._loss_low = min(self._loss_low, lv)
            if not math.isfinite(lv):
                book.add_nonfinite_loss(u, step, overflow)
        if skip:
            book.add_amp(u, step, skip, collapse)
        for k, v in sc.items():
            if k == "loss" or validation_series(k) is not None:
                dest = self._loss if k == "loss" else self._val.setdefault(k, ([], []))
                dest[0].append(step)
                dest[1].append(v)
        if "lr" in sc:
            self._lr[0].append(step)
            self._lr[1].append(sc["lr"])
        row = book.get(u)
        if row is None:
            return []
        last = self._last_active[row.overflow]
        self._last_active[row.overflow] = u
        if last is not None and u - last <= cfg.merge_gap:
            return []
        ctx = Context(self._steps[0], self._early_step(), np.zeros(0, dtype=np.int64), np.zeros(0),
                      np.zeros(0, dtype=np.int64), np.zeros(0))
        found = build_episodes([row], self._layers, self._grad_metric or "grad_norm", [], ctx, cfg)
        return found.episodes + found.transients

    def next_thresholds(self, layers: Sequence[str], *, extreme: bool = False) -> tuple[np.ndarray, float]:
        """The values the next :meth:`update` will judge against, for a caller that must decide before it can call it.

        Per name in ``layers``, the value of the gradient metric (``grad_norm`` when it is given) above which that
        layer crosses, and the total gradient norm above which the total crosses; ``inf`` where a series has fewer
        than ``min_history`` points or is unknown. Non-finite values always make an episode and are not expressed
        here. The thresholds stay valid until the next :meth:`update`. ``extreme``: the values ``extreme_ratio``
        times the baseline (an explosion on its own) instead, where that is higher than the crossing threshold.
        """
        base, thr = self._engine.grad.limits()
        if extreme:
            thr = np.fmax(thr, base + math.log(self.cfg.extreme_ratio))
        out = np.full(len(layers), np.inf)
        for i, name in enumerate(layers):
            col = self._col.get(name)
            if col is not None and col < thr.size:
                out[i] = thr[col]
        total_base, total_thr = self._engine.total.limits()
        total = float(total_thr[0])
        if extreme:
            total = float(np.fmax(total, total_base[0] + math.log(self.cfg.extreme_ratio)))
        with np.errstate(over="ignore"):
            return np.exp(out), math.exp(total) if total < 709.0 else math.inf

    def _early_step(self) -> int:
        return self._steps[min(self.cfg.early_points, len(self._steps)) - 1]

    def _judge_layers(self, u: int, step: int, layers: list[str], metrics: dict[str, np.ndarray], skip: bool,
                      overflow: bool) -> None:
        """Judge one step's per-layer metrics; what crossed (or went non-finite) goes into the row book."""
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
        crossings: list[Crossing] = []
        if g is not None:
            self._saw_norms = True
            self._growth.layers.add(step, log_level(g, present & (not skip)))
            eng.grad.grow(n)
            with np.errstate(invalid="ignore"):
                self._book.add_collapsed(u, valid & (g == 0))
            logv, ok = log_positive(g)
            log_low = math.log(cfg.dead_ratio)
            below = eng.grad.below(logv, ok & valid, log_low)
            self._dead.step(u, step, valid, g, logv, below, self._book, cfg.dead_points, log_low)
            c, e = eng.grad.step(logv, ok & valid)
            cc = np.nonzero(c)[0]
            crossings.append((Metric.GRAD, cc, g[cc].astype(np.float64), np.exp(e[cc])))
            gp = np.where(present, g.astype(np.float64), 0.0)
            with np.errstate(invalid="ignore", over="ignore"):
                self._layer_total[0].append(step)
                self._layer_total[1].append(float(np.sqrt(np.sum(gp * gp))))
        upd, par = full("update_norm"), full("param_norm")
        if upd is not None and par is not None:
            ur = update_ratio(upd, par)
            eng.upd.grow(n)
            logv, ok = log_positive(ur)
            c, e = eng.upd.step(logv, ok & valid)
            c &= ur > cfg.update_ratio_floor
            cc = np.nonzero(c)[0]
            crossings.append((Metric.UPDATE_RATIO, cc, ur[cc].astype(np.float64), np.exp(e[cc])))
        nf = np.nonzero(nonfin)[0]
        self._book.add_layers(u, step, crossings, nf, None if nfc is None else nfc[nf], overflow,
                              None if g is None else g.astype(np.float64))

    def report(self) -> Report:
        """The episodes and loss spikes of everything seen so far (equal to :func:`detect` on the same data)."""
        cfg = self.cfg
        warnings = run_warnings(self._loss_nonpositive, self._saw_norms or bool(self._total[0]))
        if self._total[0]:
            ts, tv = np.asarray(self._total[0], dtype=np.int64), np.asarray(self._total[1])
        else:
            ts, tv = np.asarray(self._layer_total[0], dtype=np.int64), np.asarray(self._layer_total[1])
        first = self._steps[0] if self._steps else 0
        ctx = Context(first, self._early_step() if self._steps else 0, ts, tv,
                      np.asarray(self._lr[0], dtype=np.int64), np.asarray(self._lr[1], dtype=np.float64),
                      self._histograms_of if self._hist else None)
        loss = Series(np.asarray(self._loss[0], dtype=np.int64), np.asarray(self._loss[1])) if self._loss[0] else None
        if loss is not None:
            ctx.loss_steps, ctx.loss_values = loss.steps, loss.values
        found = build_episodes(self._book.ordered(), self._layers, self._grad_metric or "grad_norm",
                               self._loss_rows, ctx, cfg, self._book)
        series = {k: Series(np.asarray(st, dtype=np.int64), np.asarray(v, dtype=np.float64))
                  for k, (st, v) in self._val.items()}
        val = judge_validation(series, loss, found.episodes, found.loss_spikes, cfg)
        growth = growth_findings(self._growth, self._layers, self._grad_metric or "grad_norm",
                                 np.asarray(self._loss[0], dtype=np.int64), np.asarray(self._loss[1]), cfg)
        episodes = with_growth(with_validation(found.episodes, found.loss_spikes, val), found.loss_spikes, growth)
        return Report(self.name, self.source, len(self._steps), episodes, found.loss_spikes, warnings, val,
                      spike_summary(found.transients, len(self._steps)),
                      replace(self._amp, logged_steps=len(self._steps)) if self._amp_seen else None)
