"""The host side of the JAX monitor: what the step's one callback delivers is judged (with a guard) and written.

The compiled step hands its statistics over in an ordered ``io_callback``. The callback itself only unpacks them,
lets the explosion guard judge the step when there is one (O(layers), and the guard's thresholds for the next step are
its return value), and queues the write; a writer thread turns the queue into event files, so the step waits neither
for protobuf encoding nor for the disk.
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..guard import GUARD_NONE, GUARD_SKIP, ExplosionGuard
from ..writer import GradientWriter

__all__ = ["FIXED", "HostRecorder", "Spec"]

#: Leading entries of the packed statistics vector: loss, learning rate, total gradient norm (NaN when absent).
FIXED = 3
#: Per-layer blocks after them, in this order (param and update norms are zeros on a step that is not logged).
BLOCKS = ("grad_norm", "grad_max_abs", "nonfinite_count", "param_norm", "update_norm")
#: With a chain that keeps Adam's moments, two more blocks follow (zeros on a step that is not logged).
MOMENT_BLOCKS = ("exp_avg_norm", "exp_avg_sq_norm")
#: Metrics measured only on logged steps (a step only the guard wants written leaves them out).
WEIGHT_METRICS = ("param_norm", "update_norm", *MOMENT_BLOCKS)


@dataclass(frozen=True)
class Spec:
    """What one trace of the wrapped ``update`` sends (fixed at trace time, so the callback knows how to read it)."""

    layers: tuple[str, ...]
    has_params: bool
    has_loss: bool
    has_lr: bool
    has_moments: bool = False

    def unpack(self, packed: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Per-layer metrics and per-step scalars of a packed vector (absent ones left out)."""
        n = len(self.layers)
        names = BLOCKS + MOMENT_BLOCKS if self.has_moments else BLOCKS
        blocks = np.asarray(packed[FIXED:FIXED + len(names) * n], dtype=np.float64).reshape(len(names), n)
        metrics = dict(zip(names, blocks, strict=True))
        if not self.has_params:
            del metrics["param_norm"]
        scalars = {"total_grad_norm": float(packed[2])}
        if self.has_loss:
            scalars["loss"] = float(packed[0])
        if self.has_lr:
            scalars["lr"] = float(packed[1])
        return metrics, scalars


class HostRecorder:
    """Receives each step's statistics from the device, judges them with the guard and writes them in a thread."""

    def __init__(self, writer: GradientWriter, every: int, histograms_every: int,
                 guard: ExplosionGuard | None) -> None:
        self._writer = writer
        self.every = every
        self.histograms_every = histograms_every
        self.guard = guard
        self._lock = threading.Lock()
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True, name="tb-gradient-jax-writer")
        self._thread.start()
        self._last_judged = -1
        self._decided: dict[int, int] = {}  # steps judged before their report arrived (held on the device)
        self._warned_order = False
        self._warned_closed = False
        self.closed = False

    # ---------------------------------------------------------------------------------------- called by the device

    # An exception escaping a callback would not stop the step: JAX keeps it in the token that orders every later
    # callback of the process, so each later ordered callback (of any program) fails. The callbacks therefore never
    # raise: the first error is kept and raised from flush() / close() in the user's thread, and recording stops.

    def ask(self, spec: Spec, step: np.ndarray, packed: np.ndarray) -> np.ndarray:
        """A step that crossed the guard's thresholds on the device: judge it now; returns whether to skip it."""
        with self._lock:
            if not self._usable(int(step)):
                return np.asarray(False)
            try:
                action = self._judge(spec, int(step), np.array(packed))
            except Exception as err:  # noqa: BLE001 - see above
                self._fail(err)
                return np.asarray(False)
            self._decided[int(step)] = action
            return np.asarray(action == GUARD_SKIP)

    def report(self, spec: Spec, step: np.ndarray, packed: np.ndarray,
               hist: np.ndarray | None = None) -> np.ndarray | None:
        """One step's statistics (every logged step; every step with a guard). With a guard, returns the thresholds
        for the next step: per layer, then the total norm (float32 ``[layers + 1]``)."""
        step = int(step)
        with self._lock:
            if not self._usable(step):
                return None if self.guard is None else np.full(len(spec.layers) + 1, np.inf, np.float32)
            try:
                return self._report(spec, step, np.array(packed), hist)
            except Exception as err:  # noqa: BLE001 - see above
                self._fail(err)
                return None if self.guard is None else np.full(len(spec.layers) + 1, np.inf, np.float32)

    def _report(self, spec: Spec, step: int, packed: np.ndarray, hist: np.ndarray | None) -> np.ndarray | None:
        """Judge (with a guard) and queue the writes of one step; the next step's thresholds with a guard."""
        action = None
        if self.guard is not None:
            action = self._decided.pop(step, None)
            if action is None:
                action = self._judge(spec, step, packed)
        logged = step % self.every == 0 or self._hist_step(step)
        if logged or (action is not None and action != GUARD_NONE):
            self._queue.put(self._write_job(spec, step, packed, logged, action))
        if hist is not None and self._hist_step(step):
            counts = np.array(hist, dtype=np.int64)
            self._queue.put(lambda: self._writer.write_histograms(step, spec.layers, counts))
        if self.guard is None:
            return None
        thresholds, total = self.guard.next_thresholds(spec.layers)
        return np.append(thresholds, total).astype(np.float32)

    # ------------------------------------------------------------------------------------------------- internals

    def _hist_step(self, step: int) -> bool:
        return self.histograms_every > 0 and step % self.histograms_every == 0

    def _usable(self, step: int) -> bool:
        """Whether this step can be recorded; says once why not (a closed monitor, an earlier error)."""
        if self.closed and not self._warned_closed:
            self._warned_closed = True
            warnings.warn(f"GradientMonitor is closed: step {step} of a step function compiled with its optimizer is "
                          "not recorded (and not guarded); wrap the optimizer with a new monitor", RuntimeWarning,
                          stacklevel=2)
        return not self.closed and self._error is None

    def _fail(self, err: Exception) -> None:
        if self._error is None:
            self._error = err
            warnings.warn(f"gradient recording stopped: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)

    def _judge(self, spec: Spec, step: int, packed: np.ndarray) -> int:
        """The guard's decision for ``step`` (once per step, in step order)."""
        if step <= self._last_judged:
            if not self._warned_order:
                self._warned_order = True
                warnings.warn(f"the explosion guard got step {step} after step {self._last_judged} (was the optimizer "
                              "state re-initialized?); it judges only later steps", RuntimeWarning, stacklevel=2)
            return GUARD_NONE
        self._last_judged = step
        metrics, scalars = spec.unpack(packed)
        grads = {k: metrics[k] for k in BLOCKS[:3]}
        return self.guard.check(step, spec.layers, grads, {"total_grad_norm": scalars["total_grad_norm"]}).action

    def _write_job(self, spec: Spec, step: int, packed: np.ndarray, logged: bool,
                   action: int | None) -> Callable[[], None]:
        metrics, scalars = spec.unpack(packed)
        if not logged:  # a step the guard acted on that `every` does not log: its gradients, no weights
            for name in WEIGHT_METRICS:
                metrics.pop(name, None)
        kwargs: dict[str, Any] = dict(metrics, **scalars)
        if action is not None:
            kwargs["guard_action"] = float(action)
        if "lr" in kwargs and not math.isfinite(kwargs["lr"]):
            del kwargs["lr"]

        def job() -> None:
            self._writer.write(step, spec.layers, **kwargs)

        return job

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as err:  # noqa: BLE001 - kept and raised from flush()/close() in the user's thread
                self._error = err
            finally:
                self._queue.task_done()

    def wait(self) -> None:
        """Block until every queued write is done; raise the first error the writer thread met."""
        self._queue.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"recording the gradient statistics failed: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self._queue.put(None)
        self._thread.join()
