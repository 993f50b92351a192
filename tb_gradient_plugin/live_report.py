"""A live run's report kept up to date by an online detector: appended steps cost their own judgement, not the run's.

:func:`detect.detect` judges a whole run at once (seconds on a 500-layer x 100k-step run), so recomputing it on
every refresh of a run that training is still writing costs seconds per refresh. :class:`LiveDetector` instead feeds
each step once into an :class:`~tb_gradient_plugin.detect.OnlineDetector`, whose report equals :func:`detect` on the
same data, and on each new version of the run's data feeds only the steps appended since.

That is exact only while the run's data grows by appending. The newest step is never committed to the detector (its
scalars may still arrive in a later read than its layer metrics): a copy of the detector judges it for the report.
Everything committed is checked against each new version before anything is fed: the layers, metric names, steps,
series and histograms up to the last committed step must be the ones fed, and the per-layer rows too: unchanged
when the store appended in place into the same buffer (the run store never rewrites rows it has handed out there),
compared value by value when the buffer is another one. Anything else (a step rewritten or logged out of order, a
file read again from scratch, layers in another order, a validation point at a step the detector never saw)
makes :meth:`LiveDetector.advance` answer None: the caller judges the run offline and starts afresh.
"""

from __future__ import annotations

import numpy as np

from .detect import OnlineDetector
from .detect.validation import validation_series
from .types import Report, RunData, Series

#: The series that put a step on the detector's step axis (as :func:`detect.detect` builds it); validation series
#: are judged at their own points, which must lie on that axis for the online detector to see them.
AXIS_SERIES = ("total_grad_norm", "loss", "step_skipped", "loss_scale", "lr", "clip_threshold")
#: The per-layer metrics the detector reads (others, such as optimizer moment norms, do not change its report).
JUDGED_METRICS = ("grad_norm", "grad_max_abs", "nonfinite_count", "update_norm", "param_norm", "update_ratio")
#: Rows compared at a time when a buffer has moved (bounds the temporary memory of the comparison).
_COMPARE_ROWS = 8192


class LiveDetector:
    """An online detector fed with one run's data up to a committed step, and what it was fed, to check that later
    versions of the data only appended to it."""

    def __init__(self, name: str, source: str) -> None:
        self.detector = OnlineDetector(name=name, source=source)
        self.committed: int | None = None  # the last step fed (None: nothing yet)
        self.layers: list[str] = []
        self.metrics: tuple[str, ...] | None = None
        self.steps = np.zeros(0, dtype=np.int64)  # the rows of the per-layer arrays fed
        self.arrays: dict[str, np.ndarray] = {}  # the per-layer arrays of the data last fed from
        self.series: dict[str, Series] = {}  # each series' points fed
        self.hist_steps = np.zeros(0, dtype=np.int64)
        self.histograms: np.ndarray | None = None
        self.broken = False  # fed something that the data no longer holds: of no further use

    def advance(self, data: RunData) -> Report | None:
        """Feed what ``data`` appended since the last call and return the report on all of ``data`` (equal to
        :func:`detect.detect`), or None where this detector cannot make it: then the caller judges ``data`` offline,
        and drops this detector if :attr:`broken` (``data`` did not only append to what was fed, or holds what the
        online detector cannot see as the offline one does)."""
        if not self._extends(data):
            self.broken = True
            return None
        axis = _axis(data)
        new = axis[axis > self.committed] if self.committed is not None else axis
        ahead = _validation_off_axis(data, axis, self.committed)
        if ahead is None:
            self.broken = True
            return None
        if new.size > 1:
            self._feed(self.detector, data, new[:-1])
            self._commit(data, int(new[-2]))
        if ahead:  # a validation point after the last step: on the axis (or not) once later steps arrive
            return None
        det = self.detector
        hist_new = self._new_histograms(data)
        if new.size or hist_new.size:
            det = det.fork()
            self._feed(det, data, new[-1:])
            self._feed_histograms(det, data, hist_new)
        if list(data.layers) != det.layers:  # a layer listed but not logged yet: the offline detector counts it
            return None
        return det.report()

    # ------------------------------------------------------------------------------------------------- feeding

    def _feed(self, det: OnlineDetector, data: RunData, steps: np.ndarray) -> None:
        """Feed ``steps`` (increasing, all after the committed step) with everything logged at them."""
        if not steps.size:
            return
        on_rows, rows = _at(np.asarray(data.steps), steps)
        metrics = _layer_inputs(data)
        present = data.present if metrics else None
        points = {}
        for name, s in data.series.items():
            hit, k = _at(np.asarray(s.steps), steps)
            values = np.asarray(s.values, dtype=np.float64)
            if name in ("loss_scale", "step_skipped") and hit.any():  # a NaN there counts as not logged, as offline
                hit &= ~np.isnan(values[np.minimum(k, len(values) - 1)])
            if hit.any():
                points[name] = (hit, k, values)
        layers = data.layers
        all_cols = np.arange(len(layers))
        for u, step in enumerate(steps.tolist()):
            names: list[str] = []
            values: dict[str, np.ndarray] = {}
            if on_rows[u] and present is not None:
                i = int(rows[u])
                row = np.asarray(present[i])
                cols = all_cols if row.all() else np.nonzero(row)[0]
                names = layers if cols is all_cols else [layers[c] for c in cols]
                values = {m: np.asarray(a[i])[cols] for m, a in metrics.items()}
            scalars = {name: float(v[k[u]]) for name, (hit, k, v) in points.items() if hit[u]}
            det.update(step, names, values, scalars)

    def _new_histograms(self, data: RunData) -> np.ndarray:
        return np.arange(len(self.hist_steps), len(data.hist_steps))

    @staticmethod
    def _feed_histograms(det: OnlineDetector, data: RunData, rows: np.ndarray) -> None:
        if not rows.size or data.histograms is None:
            return
        hist = data.histograms
        for k in rows.tolist():
            counts = np.asarray(hist[k])
            cols = np.nonzero(counts.sum(axis=1) > 0)[0]
            det.add_histograms(int(data.hist_steps[k]), [data.layers[c] for c in cols], counts[cols])

    def _commit(self, data: RunData, step: int) -> None:
        """Remember what the detector has been fed: everything of ``data`` up to ``step``."""
        self.committed = step
        self.layers = list(data.layers)
        self.metrics = _judged(data)
        n = int(np.searchsorted(data.steps, step, side="right"))
        self.steps = np.array(data.steps[:n], dtype=np.int64)
        self.arrays = _row_arrays(data)
        self.series = {}
        for name, s in data.series.items():
            k = int(np.searchsorted(s.steps, step, side="right"))
            self.series[name] = Series(np.array(s.steps[:k]), np.array(s.values[:k]))
        h = int(np.searchsorted(data.hist_steps, step, side="right"))
        if h > len(self.hist_steps):
            self._feed_histograms(self.detector, data, np.arange(len(self.hist_steps), h))
        self.hist_steps = np.array(data.hist_steps[:h], dtype=np.int64)
        self.histograms = data.histograms if h else None  # the store assembles a new array when they change

    # ------------------------------------------------------------------------------------------------- checking

    def _extends(self, data: RunData) -> bool:
        """Whether ``data`` holds everything fed so far, unchanged, and only later steps besides."""
        det = self.detector
        if data.name != det.name or data.source != det.source:
            return False
        if self.committed is None:
            return True
        c = self.committed
        if list(data.layers[:len(self.layers)]) != self.layers or _judged(data) != self.metrics:
            return False
        n, ncols = len(self.steps), len(self.layers)
        steps = np.asarray(data.steps)
        if len(steps) < n or not np.array_equal(steps[:n], self.steps) or (len(steps) > n and steps[n] <= c):
            return False
        if n:
            arrays = _row_arrays(data)
            if set(arrays) != set(self.arrays):
                return False
            if not all(_same_rows(arrays[key], old, n, ncols) for key, old in self.arrays.items()):
                return False
        for name, s in data.series.items():
            old = self.series.get(name, Series(np.zeros(0, dtype=np.int64), np.zeros(0)))
            k = len(old.steps)
            st, vals = np.asarray(s.steps), np.asarray(s.values, dtype=np.float64)
            if len(st) < k or (len(st) > k and st[k] <= c):
                return False
            if not (np.array_equal(st[:k], old.steps) and _same_bits(vals[:k], old.values)):
                return False
        if any(len(old.steps) and name not in data.series for name, old in self.series.items()):
            return False
        h = len(self.hist_steps)
        hs = np.asarray(data.hist_steps)
        if len(hs) < h or not np.array_equal(hs[:h], self.hist_steps) or (len(hs) > h and hs[h] <= c):
            return False
        if h and data.histograms is not self.histograms and (
                data.histograms is None or self.histograms is None
                or not np.array_equal(data.histograms[:h, :ncols], self.histograms[:h, :ncols])):
            return False
        return True


def _axis(data: RunData) -> np.ndarray:
    """Every step the offline detector judges: the per-layer rows and the points of the axis series."""
    parts = [np.asarray(data.steps, dtype=np.int64)]
    parts += [np.asarray(data.series[name].steps, dtype=np.int64) for name in AXIS_SERIES if name in data.series]
    return np.unique(np.concatenate(parts))


def _at(steps: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``wanted``: whether it is in the sorted ``steps``, and where."""
    k = np.searchsorted(steps, wanted)
    if not len(steps):
        return np.zeros(wanted.size, dtype=bool), k
    return (k < len(steps)) & (steps[np.minimum(k, len(steps) - 1)] == wanted), k


def _validation_off_axis(data: RunData, axis: np.ndarray, after: int | None) -> bool | None:
    """Whether a validation point after ``after`` lies after the last step of the axis; None if one lies off the axis
    within it. The online detector records validation values only at the steps it is fed, the offline one judges
    them wherever they are."""
    last = int(axis[-1]) if axis.size else None
    ahead = False
    for name, s in data.series.items():
        if validation_series(name) is None or name in AXIS_SERIES:
            continue
        st = np.asarray(s.steps, dtype=np.int64)
        if after is not None:
            st = st[st > after]
        if last is None or (st.size and st[-1] > last):
            ahead |= bool(st.size)
            st = st[st <= last] if last is not None else st[:0]
        if st.size and not np.isin(st, axis).all():
            return None
    return ahead


def _layer_inputs(data: RunData) -> dict[str, np.ndarray]:
    """The per-layer metrics the online detector reads, with the update ratio as the offline detector takes it: a
    ratio logged directly (Composer) goes in as ``update_norm`` over a ``param_norm`` of 1 (the same float32)."""
    lm = data.layer_metrics
    out = {m: lm[m] for m in ("grad_norm", "grad_max_abs", "nonfinite_count") if m in lm}
    if "update_ratio" in lm:
        ratio = lm["update_ratio"]
        out["update_norm"] = ratio
        out["param_norm"] = _Ones(ratio)
    else:
        out.update({m: lm[m] for m in ("update_norm", "param_norm") if m in lm})
    return out


class _Ones:
    """Rows of ones shaped like another per-layer array (a unit parameter norm), without a full array of them."""

    def __init__(self, like: np.ndarray) -> None:
        self._cols = like.shape[1]

    def __getitem__(self, i: int) -> np.ndarray:
        return np.ones(self._cols, dtype=np.float32)


def _judged(data: RunData) -> tuple[str, ...]:
    return tuple(m for m in JUDGED_METRICS if m in data.layer_metrics)


def _row_arrays(data: RunData) -> dict[str, np.ndarray]:
    """The per-layer arrays whose rows the detector reads."""
    out = {"present": data.present}
    out.update({f"metric/{m}": data.layer_metrics[m] for m in _judged(data)})
    return out


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _same_rows(new: np.ndarray, old: np.ndarray, n: int, ncols: int) -> bool:
    """Whether the first ``n`` rows and ``ncols`` columns of ``new`` equal those of ``old``. The same buffer (held
    alive by ``old``, so its address cannot have been reused) means yes: the run store only appends there."""
    if new.ndim != 2 or new.shape[0] < n or new.shape[1] < ncols or new.dtype != old.dtype:
        return False
    if _address(new) == _address(old) and new.strides == old.strides:
        return True
    for a in range(0, n, _COMPARE_ROWS):
        b = min(n, a + _COMPARE_ROWS)
        if not _same_bits(np.asarray(new[a:b, :ncols]), np.asarray(old[a:b, :ncols])):
            return False
    return True


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, NaN equal to NaN (a logged NaN that stays NaN is no change)."""
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))
