"""What each logged step contributes to an episode, recorded the same way offline and online.

The offline path finds a run's crossings all at once and the online path one step at a time, but both hand them to
one :class:`RowBook`, judge AMP steps with one :class:`AmpState` and word the run's warnings with one
:func:`run_warnings`: that is what makes :class:`~tb_gradient_plugin.detect.OnlineDetector` report what
:func:`~tb_gradient_plugin.detect.detect` reports on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .config import DetectorConfig


class Metric(IntEnum):
    """What crossed in a layer column of a :class:`Row` (an array of these codes, for vectorised selection)."""

    GRAD = 0  # the gradient metric: grad_norm, or grad_max_abs where no norm is logged
    UPDATE_RATIO = 1
    NONFINITE = 2


@dataclass
class Row:
    """What one logged step contributed to an episode (kept only for steps with a crossing)."""

    u: int  # index on the run's step axis (every distinct logged step)
    step: int
    cols: np.ndarray  # layer columns that crossed or went non-finite
    metric: np.ndarray  # per col: a Metric code
    value: np.ndarray  # per col: the metric's value (non-finite count for non-finite)
    ratio: np.ndarray  # per col: value / baseline (inf for non-finite)
    total: tuple[float, float] | None  # (value, ratio) of the total gradient norm when it crossed
    overflow: bool  # an AMP overflow skip (benign): reported as overflow_skip
    loss_nonfinite: bool
    norms: np.ndarray | None  # the layers' gradient norms at this step (for depth advice)

    def has_nonfinite_layer(self) -> bool:
        return bool((self.metric == Metric.NONFINITE).any())


#: One crossing loss point: (step index, step, value, baseline, ratio, whether the loss was back near its baseline
#: (below ``loss_back_ratio`` x the previous crossing's baseline) at some point since the previous crossing).
LossRow = tuple[int, int, float, float, float, bool]

#: The layer columns of one step where one metric crossed: (metric, columns, values, ratios over the baseline).
Crossing = tuple[Metric, np.ndarray, np.ndarray, np.ndarray]


def _empty_row(u: int, step: int, overflow: bool) -> Row:
    z = np.zeros(0, dtype=np.int64)
    return Row(u, step, z, z, np.zeros(0), np.zeros(0), None, overflow, False, None)


@dataclass
class DeadRun:
    """A layer's first run of dead points: from its onset (step index ``u``, ``step``) through ``last_step``."""

    u: int
    step: int
    last_step: int
    value: float  # the gradient at the onset
    ratio: float  # ... over its baseline there; 0 for an exact zero, which has no ratio


class RowBook:
    """The rows of one run by step index: every fact that makes a step part of an episode goes through here."""

    def __init__(self) -> None:
        self._rows: dict[int, Row] = {}
        #: step index -> the layer columns whose gradient was exactly zero (dead units), as packed bits (see
        #: :func:`collapsed_cols`): a dead network has them at every step
        self.collapsed: dict[int, bytes] = {}
        #: layer column -> its first run of ``dead_points`` dead points: :class:`DeadRun`
        self.dead: dict[int, DeadRun] = {}

    def add_dead(self, col: int, onset_u: int, onset_step: int, last_step: int, onset: tuple[float, float]) -> None:
        """Layer ``col`` has been dead since ``onset_step`` (its first such run only), through ``last_step``;
        ``onset``: its gradient there and that over its baseline (0 for an exact zero)."""
        known = self.dead.get(col)
        if known is None:
            self.dead[col] = DeadRun(onset_u, onset_step, last_step, *onset)
        elif known.u == onset_u:
            known.last_step = last_step

    def add_collapsed(self, u: int, low: np.ndarray) -> None:
        """``low``: per layer column, whether its gradient collapsed at step ``u``."""
        if low.any():
            self.collapsed[u] = np.packbits(low).tobytes()

    def get(self, u: int) -> Row | None:
        return self._rows.get(u)

    def ordered(self) -> list[Row]:
        """The rows in step order."""
        return [self._rows[u] for u in sorted(self._rows)]

    def _at(self, u: int, step: int, overflow: bool) -> Row:
        row = self._rows.get(u)
        if row is None:
            row = self._rows[u] = _empty_row(u, step, overflow)
        return row

    def add_layers(self, u: int, step: int, crossings: Sequence[Crossing], nonfinite_cols: np.ndarray,
                   nonfinite_counts: np.ndarray | None, overflow: bool, norms: np.ndarray | None) -> None:
        """A step's layer crossings and its non-finite layers (``nonfinite_counts``: their counts, if logged).

        Called first for a step, before any of the per-step facts below.
        """
        nf = (Metric.NONFINITE, nonfinite_cols,
              np.full(nonfinite_cols.size, np.nan) if nonfinite_counts is None
              else np.asarray(nonfinite_counts, dtype=np.float64), np.full(nonfinite_cols.size, np.inf))
        parts = [*crossings, nf]
        cols = np.concatenate([c for _, c, _, _ in parts])
        if cols.size == 0:
            return
        self._rows[u] = Row(u, step, cols, np.concatenate([np.full(c.size, m, dtype=np.int64) for m, c, _, _ in parts]),
                            np.concatenate([v for _, _, v, _ in parts]), np.concatenate([r for _, _, _, r in parts]),
                            None, overflow, False, norms)

    def add_total(self, u: int, step: int, overflow: bool, value: float, ratio: float) -> None:
        """The total gradient norm crossed (or went non-finite: ``ratio`` inf)."""
        self._at(u, step, overflow).total = (value, ratio)

    def add_nonfinite_loss(self, u: int, step: int, overflow: bool) -> None:
        """The loss was non-finite; on an AMP overflow skip that is the overflow, not a finding."""
        row = self._at(u, step, overflow)
        row.loss_nonfinite = not row.overflow

    def add_amp(self, u: int, step: int, skipped: bool, collapsed: bool) -> None:
        """An AMP step: a skip with a collapsed loss scale is non-finite even without any other signal; a skip
        while the scale is healthy is a benign overflow."""
        if skipped and collapsed:
            row = self._at(u, step, False)
            if not row.loss_nonfinite and row.total is None and not row.has_nonfinite_layer():
                row.total = (math.nan, math.inf)
        elif skipped:
            self._at(u, step, True)


class AmpState:
    """The running AMP loss-scale state of a run, advanced one step at a time (offline and online alike)."""

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        self.scale_max = -np.inf
        self.prev_scale: float | None = None

    def step(self, scale: float | None, skipped: float | None) -> tuple[bool, bool]:
        """(skipped, collapsed) for one step from the loss scale and skip flag; a scale that dropped means a skip
        where the run logs no flag."""
        cfg = self.cfg
        is_skip = skipped is not None and math.isfinite(skipped) and skipped > 0.5
        collapsed = False
        if scale is not None and math.isfinite(scale):
            if skipped is None and self.prev_scale is not None and scale < self.prev_scale:
                is_skip = True
            collapsed = scale < cfg.loss_scale_floor or scale * cfg.loss_scale_drop < self.scale_max
            self.scale_max = max(self.scale_max, scale)
            self.prev_scale = scale
        return is_skip, collapsed


class DeadTracker:
    """Runs of dead points per layer, one judged point at a time (the online path; offline finds the same runs with
    :func:`dead_runs`). A run starts at a gradient exactly zero or ``dead_ratio`` below its baseline, and goes on
    while the gradient stays zero or that far below the baseline where the run started: the baseline itself follows
    the vanished level within a window, the layer is no less dead for it. A layer counts only once it has had a
    non-zero gradient: one that never had one is unused, not dead."""

    def __init__(self) -> None:
        self.run = np.zeros(0, dtype=np.int64)
        self.onset = np.zeros((0, 2), dtype=np.int64)  # (u, step) of the current run's first point
        self.level = np.zeros((0, 2))  # (gradient, ratio to the baseline) there
        self.ref = np.zeros(0)  # the run's log baseline: where its first point far below one was; NaN before
        self.alive = np.zeros(0, dtype=bool)  # had a non-zero gradient at a judged point

    def _grow(self, n: int) -> None:
        grow = n - self.run.size
        if grow > 0:
            self.run = np.concatenate([self.run, np.zeros(grow, dtype=np.int64)])
            self.onset = np.concatenate([self.onset, np.zeros((grow, 2), dtype=np.int64)])
            self.level = np.concatenate([self.level, np.zeros((grow, 2))])
            self.ref = np.concatenate([self.ref, np.full(grow, np.nan)])
            self.alive = np.concatenate([self.alive, np.zeros(grow, dtype=bool)])

    def step(self, u: int, step: int, judged: np.ndarray, grad: np.ndarray, logv: np.ndarray, below: np.ndarray,
             book: RowBook, need: int, log_low: float) -> None:
        """One step of every layer: ``grad`` its gradient, ``logv`` its log, ``below`` the log baseline where it is
        ``log_low`` or more below (NaN elsewhere, see :meth:`Baseline.below`)."""
        n = judged.size
        self._grow(n)
        run, ref = self.run[:n], self.ref[:n]
        low = ~np.isnan(below)
        with np.errstate(invalid="ignore"):
            zero, positive = grad == 0, grad > 0
            dead = zero | np.where((run > 0) & ~np.isnan(ref), logv < ref - log_low, low)
            ratio = np.where(low, np.exp(logv - below), 0.0)
        hit, miss = judged & dead & self.alive[:n], judged & ~dead
        fresh = hit & (run == 0)
        self.onset[:n][fresh] = (u, step)
        self.level[:n][fresh] = np.stack([grad[fresh], ratio[fresh]], axis=1)
        known = hit & np.isnan(ref) & low
        ref[known] = below[known]
        run[hit] += 1
        run[miss] = 0
        ref[miss] = np.nan
        self.alive[:n] |= judged & positive
        for col in np.nonzero(hit & (run >= need))[0].tolist():
            book.add_dead(col, int(self.onset[col, 0]), int(self.onset[col, 1]), step,
                          (float(self.level[col, 0]), float(self.level[col, 1])))


def _first(mask: np.ndarray, start: int) -> int:
    """The first index at or after ``start`` where ``mask`` holds (``mask.size`` if none)."""
    hits = np.flatnonzero(mask[start:])
    return start + int(hits[0]) if hits.size else mask.size


def dead_runs(zero: np.ndarray, judged: np.ndarray, positive: np.ndarray, low: tuple[np.ndarray, ...],
              logv: Callable[[int], np.ndarray], grad: np.ndarray, lu: np.ndarray, steps: np.ndarray, book: RowBook,
              need: int, log_low: float) -> None:
    """Every layer's first run of ``need`` dead points among its judged points after its first non-zero one, as
    :class:`DeadTracker` finds them one by one. ``zero``, ``judged``, ``positive``: [points, layers]; ``low``: (rows,
    columns, log baseline) of the points ``log_low`` below their baseline; ``logv(col)``: a layer's log gradients;
    ``grad``: the gradients; ``lu``: each point's step index, ``steps``: its step."""
    low_rows, low_cols, low_base = low
    for col in np.nonzero(((zero & judged).any(axis=0)) | np.isin(np.arange(zero.shape[1]), low_cols))[0].tolist():
        idx = np.flatnonzero(judged[:, col])
        alive = np.flatnonzero(positive[idx, col])
        if not alive.size:
            continue
        idx = idx[alive[0] + 1:]
        z = zero[idx, col]
        lb = np.full(idx.size, np.nan)
        mine = low_cols == col
        at = np.searchsorted(idx, low_rows[mine])
        inside = (at < idx.size) & (idx[np.minimum(at, idx.size - 1)] == low_rows[mine])
        lb[at[inside]] = low_base[mine][inside]
        lowc = ~np.isnan(lb)
        lv = logv(col)[idx]
        starts = np.flatnonzero(z | lowc)
        k = 0
        while k < starts.size:
            a = int(starts[k])
            ref = lb[a]
            end = a + 1
            if np.isnan(ref):  # started at a zero: dead while zero or far below the current baseline, until the
                stop = _first(~(z | lowc), end)  # first point far below one fixes the run's baseline
                first_low = _first(lowc, end)
                if first_low < stop:
                    ref, end = lb[first_low], first_low + 1
                else:
                    end = stop
            if not np.isnan(ref):
                with np.errstate(invalid="ignore"):
                    end = _first(~(z | (lv < ref - log_low)), end)
            if end - a >= need:
                i = int(idx[a])
                ratio = float(np.exp(lv[a] - lb[a])) if lowc[a] else 0.0
                book.add_dead(col, int(lu[i]), int(steps[i]), int(steps[idx[end - 1]]), (float(grad[i, col]), ratio))
                break
            k = int(np.searchsorted(starts, end + 1))


def collapsed_cols(packed: bytes) -> np.ndarray:
    """The layer columns of a :attr:`RowBook.collapsed` entry."""
    return np.nonzero(np.unpackbits(np.frombuffer(packed, dtype=np.uint8)))[0]


def run_warnings(loss_nonpositive: bool, judged_gradients: bool) -> list[str]:
    """What the report should say about what it could not judge."""
    warnings = []
    if loss_nonpositive:
        warnings.append("loss has non-positive values; loss spikes are judged on its positive values only")
    if not judged_gradients:
        warnings.append("no gradient norms in this run: only the loss was judged")
    return warnings
