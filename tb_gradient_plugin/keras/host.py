"""The backend-neutral host side of the Keras callback on the JAX and torch backends.

The per-backend captures (:mod:`.capture_jax`, :mod:`.capture_torch`) compute per-variable reductions on the device
and hand them here as numpy arrays; this module groups them into layers (in float64, so no finite gradient overflows
into an infinite norm), lets the explosion guard judge a step, and writes logged steps through
:class:`~tb_gradient_plugin.writer.GradientWriter`. The TensorFlow path keeps its own in-graph ring buffers
(:mod:`.callback`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import format as fmt
from ..guard import GUARD_NONE, GUARD_RAISE, ExplosionGuard, GradientExplosionError
from ..writer import GradientWriter

__all__ = ["StepRecorder", "layer_norms", "norms_to_layers"]


def layer_norms(maxes: np.ndarray, scaled_sumsq: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Per layer, the L2 norm from per-variable ``max|x|`` and ``sum((x / max|x|)**2)`` (the scaled form a float32
    device can sum without overflow), combined in float64. A variable whose max is not finite gives its max (NaN or
    inf) to its layer."""
    m = np.asarray(maxes, np.float64)
    s = np.asarray(scaled_sumsq, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        per_var = np.where(np.isfinite(m), np.where(m > 0, m * m * s, 0.0), m)
        return np.sqrt(np.array([per_var[list(g)].sum() for g in groups]))


def norms_to_layers(norms: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Per layer, the L2 norm from per-variable L2 norms (float64: squares of float32 norms cannot overflow); a NaN
    or infinite variable norm makes its layer's NaN or infinite."""
    n = np.asarray(norms, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sqrt(np.array([np.sum(np.square(n[list(g)])) for g in groups]))


def layer_max(maxes: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Per layer, max over its variables' ``max|g|`` (NaN when any is NaN)."""
    m = np.asarray(maxes, np.float64)
    return np.array([np.max(m[list(g)]) if not np.isnan(m[list(g)]).any() else math.nan for g in groups])


def layer_sum(values: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    v = np.asarray(values, np.float64)
    return np.array([v[list(g)].sum() for g in groups])


class StepRecorder:
    """Judges steps with the guard and writes logged ones; shared by the JAX and torch captures.

    ``enabled`` is off between fits: a train function that keeps the hooks (``train_on_batch`` after ``fit``) then
    records nothing and the guard holds nothing back.
    """

    def __init__(self, log_dir: str, every: int, histograms_every: int, flush_secs: float,
                 guard: ExplosionGuard | None) -> None:
        self.log_dir = log_dir
        self.every = every
        self.histograms_every = histograms_every
        self.flush_secs = flush_secs
        self.guard = guard
        self.writer: GradientWriter | None = None
        self.enabled = False
        self.error: GradientExplosionError | None = None  # a "raise" decision not yet raised on the main thread
        self.stopped = False  # a "raise" decision was taken: hold back every step until the next fit
        self._actions: dict[int, int] = {}  # guard_action of judged steps whose logged row is not written yet
        # JAX judges steps on its runtime's callback thread and writes logged rows at batch end, which Keras may run
        # on another thread: one writer call at a time.
        self._lock = threading.RLock()

    def open(self) -> None:
        import os

        self.stopped = False
        if self.writer is None or self.writer.closed:
            self.writer = GradientWriter(os.path.join(self.log_dir, "train"), flush_secs=self.flush_secs)

    def logged(self, step: int) -> bool:
        return step % self.every == 0 or bool(self.histograms_every and step % self.histograms_every == 0)

    def hist_step(self, step: int) -> bool:
        return bool(self.histograms_every and step % self.histograms_every == 0)

    def judge(self, step: int, layers: list[str], grad_norm: np.ndarray, grad_max_abs: np.ndarray,
              nonfinite: np.ndarray, lr: float) -> bool:
        """Let the guard judge one step before it is applied; True: hold it back.

        For ``"raise"`` the step is written, the error kept in :attr:`error` (the caller raises it where it can) and
        every later step of this fit held back.
        """
        if not self.enabled or self.guard is None:
            return False
        if self.stopped:
            return True
        metrics = {"grad_norm": grad_norm, "grad_max_abs": grad_max_abs, "nonfinite_count": nonfinite}
        with np.errstate(invalid="ignore", over="ignore"):
            scalars = {"total_grad_norm": float(np.sqrt(np.sum(np.square(grad_norm))))}
        with self._lock:
            return self._judge(step, layers, metrics, scalars, lr)

    def _judge(self, step: int, layers: list[str], metrics: dict[str, np.ndarray], scalars: dict[str, float],
               lr: float) -> bool:
        try:
            decision = self.guard.check(step, layers, metrics, scalars)
        except GradientExplosionError as error:
            self.error, self.stopped = error, True
            self.writer.write(step, layers, **metrics, **scalars, lr=lr, guard_action=GUARD_RAISE)
            return True
        self._record_action(step, layers, metrics, scalars, lr, decision.action)
        return decision.skip

    def _record_action(self, step: int, layers: list[str], metrics: dict[str, np.ndarray], scalars: dict[str, float],
                       lr: float, action: int) -> None:
        """Keep a judged step's action for its logged row; an acted-on step `every` does not log gets its own row."""
        if self.logged(step):
            self._actions[step] = action
        elif action != GUARD_NONE:
            self.writer.write(step, layers, **metrics, **scalars, lr=lr, guard_action=action)

    def write(self, step: int, layers: list[str], *, grad_norm: np.ndarray, param_norm: np.ndarray,
              update_norm: np.ndarray, grad_max_abs: np.ndarray, nonfinite_count: np.ndarray, lr: float,
              loss: float | None, counts: np.ndarray | None = None,
              moments: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Write one logged step (and its histograms on a histogram step); ``moments``: per layer, the norms of
        Adam's first and second moments after the step."""
        if not self.enabled or self.writer is None or self.stopped:  # the raised step is written by judge()
            return
        extras: dict[str, Any] = {}
        if loss is not None:
            extras["loss"] = loss
        if moments is not None:
            extras["exp_avg_norm"], extras["exp_avg_sq_norm"] = moments
        with np.errstate(invalid="ignore", over="ignore"):
            total = float(np.sqrt(np.sum(np.square(np.asarray(grad_norm, np.float64)))))
        with self._lock:
            if step in self._actions:
                extras["guard_action"] = self._actions.pop(step)
            self.writer.write(step, layers, grad_norm=grad_norm, param_norm=param_norm, update_norm=update_norm,
                              grad_max_abs=grad_max_abs, nonfinite_count=nonfinite_count, total_grad_norm=total,
                              lr=lr, **extras)
            if counts is not None and self.hist_step(step):
                self.writer.write_histograms(step, layers,
                                             np.asarray(counts, np.int64).reshape(len(layers), fmt.HIST_BINS))

    def raise_pending(self) -> None:
        """Raise a ``"raise"`` decision on the main thread (once), after flushing what was written."""
        error, self.error = self.error, None
        if error is not None:
            if self.writer is not None:
                self.writer.flush()
            raise error
