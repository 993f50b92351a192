"""Which Keras backends the callback supports, and the driver of the JAX and torch captures.

On TensorFlow the callback records inside the traced step itself (:mod:`.callback`). On JAX and torch a capture
(:mod:`.capture_jax`, :mod:`.capture_torch`) hands each logged step to the shared host side (:mod:`.host`); this
driver maps the callback's ``fit`` hooks onto them.
"""

from __future__ import annotations

from typing import Any

import keras

from ..guard import ExplosionGuard
from .host import StepRecorder

__all__ = ["SUPPORTED", "CaptureDriver", "check_backend"]

SUPPORTED = ("tensorflow", "jax", "torch")


def check_backend() -> str:
    """The process's Keras backend, or a clear error for one the callback cannot observe."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED:
        raise RuntimeError(
            f"GradientMonitorCallback supports Keras' {', '.join(SUPPORTED)} backends; this process uses the "
            f"{backend!r} backend. Set KERAS_BACKEND to one of them before importing keras."
        )
    return backend


class CaptureDriver:
    """The callback's ``fit`` hooks on the JAX and torch backends: attach the capture, raise the guard's ``"raise"``
    on the main thread, flush at the end."""

    def __init__(self, backend: str, log_dir: str, every: int, histograms_every: int, flush_secs: float,
                 guard: ExplosionGuard | None) -> None:
        self.backend = backend
        self.recorder = StepRecorder(log_dir, every, histograms_every, flush_secs, guard)
        if backend == "jax":
            from .capture_jax import JaxCapture

            self.capture: Any = JaxCapture(self.recorder)
        else:
            from .capture_torch import TorchCapture

            self.capture = TorchCapture(self.recorder)

    def train_begin(self, model: Any) -> None:
        optimizer = model.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                f"GradientMonitorCallback records a LossScaleOptimizer (mixed precision) on the TensorFlow backend "
                f"only; this process uses the {self.backend!r} backend"
            )
        self.recorder.open()
        self.capture.attach(model, optimizer)
        self.recorder.enabled = True

    def _barrier(self) -> None:
        """Wait for the steps already dispatched (JAX runs steps asynchronously) and write their logged rows."""
        if self.backend == "jax":
            import jax

            jax.effects_barrier()
            self.capture.flush()

    def batch_end(self) -> None:
        if self.backend == "jax":
            self.capture.flush()
        self.recorder.raise_pending()

    def epoch_end(self) -> None:
        self._barrier()
        self.recorder.raise_pending()

    def train_end(self) -> None:
        self._barrier()
        self.recorder.enabled = False
        if self.recorder.writer is not None:
            self.recorder.writer.flush()
        self.recorder.raise_pending()

    def close(self) -> None:
        self._barrier()
        self.recorder.enabled = False
        self.capture.detach()
        if self.recorder.writer is not None:
            self.recorder.writer.close()
