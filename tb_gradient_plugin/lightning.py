"""Lightning integration: ``Trainer(callbacks=[GradientMonitorCallback()])`` records per-layer gradient health.

A thin adapter over :class:`tb_gradient_plugin.torch.GradientMonitor`. Gradients are measured in
``on_before_optimizer_step``, the one point where Lightning holds a step's final gradients: after backward (and after
all ``accumulate_grad_batches`` micro-batches), already unscaled under 16-bit AMP, and before ``gradient_clip_val``
clips them. The explosion guard (``on_explosion=``) judges the step there too, so ``"skip"`` can still refuse it.
The data goes into the trainer's ``TensorBoardLogger`` event file, beside the scalars Lightning logs. See
``docs/INTEGRATIONS.md``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from .torch import GradientMonitor
from .torch.callback import MonitorCallback

__all__ = ["GradientMonitorCallback"]


class GradientMonitorCallback(MonitorCallback, pl.Callback):
    """Records per-layer gradient statistics of a ``LightningModule`` during ``Trainer.fit``.

    ``logdir`` None (the default) writes into the trainer's ``TensorBoardLogger`` run (into its own event file, so the
    Gradients tab and Lightning's scalars are one run); without a TensorBoard logger, into ``trainer.log_dir``. The
    other options are those of :class:`~tb_gradient_plugin.torch.GradientMonitor`. Steps are numbered like
    ``trainer.global_step`` (the step Lightning logs ``self.log`` values at). A batch that is a dict (or an object)
    with an integer field ``idx``, ``index``, ``indices``, ``sample_id``, ``sample_ids`` or ``sample_idx`` has those
    sample ids recorded; ``batch_ids=`` names another field or maps the batch to its ids (``lambda b: b[2]``).
    A ``gradient_clip_val`` clipping the norm (Lightning's default algorithm) is recorded as the clip threshold
    (unless ``clip=`` is given).
    """

    # --------------------------------------------------------------------------------------------------- lifecycle

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        logdir, writer = self._target(trainer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        options = {"clip": _norm_clip(trainer), **self._options}
        self.monitor = GradientMonitor(
            pl_module, list(trainer.optimizers), logdir, writer=writer, scaler=scaler, grads_at="manual",
            on_explosion=self._new_guard(), **options,
        )
        self.monitor.set_global_step(trainer.global_step)  # resumed runs continue their numbering

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._log_batch(batch)  # every micro-batch of a step, before its optimizer step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.capture_gradients()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # before the logger is finalized: the last step must reach its file

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    # ------------------------------------------------------------------------------------------------------ helpers

    def _target(self, trainer: pl.Trainer) -> tuple[str | None, Any]:
        """Where rank 0 writes: the given logdir, else the TensorBoardLogger's open file, else ``trainer.log_dir``."""
        if not trainer.is_global_zero:
            return None, None
        if self.logdir is not None:
            return self.logdir, None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return None, logger.experiment
        return trainer.log_dir or trainer.default_root_dir, None


def _norm_clip(trainer: pl.Trainer) -> float | None:
    """The total-norm clip Lightning applies, or None (no clipping, or clipping by value)."""
    value = getattr(trainer, "gradient_clip_val", None)
    algorithm = getattr(trainer, "gradient_clip_algorithm", None)
    if not value or str(getattr(algorithm, "value", algorithm) or "norm").lower() != "norm":
        return None
    return float(value)
