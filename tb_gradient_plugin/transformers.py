"""Hugging Face ``Trainer`` integration: ``Trainer(callbacks=[GradientMonitorCallback()])``.

A thin adapter over :class:`tb_gradient_plugin.torch.GradientMonitor`, attached to the optimizer the Trainer built (the
torch optimizer inside accelerate's wrapper). The monitor's optimizer hooks run inside ``optimizer.step()``, i.e.
between the Trainer's ``on_pre_optimizer_step`` and ``on_optimizer_step`` events; gradients are read where the last
backward of the step ends, so they are the accumulated gradients before ``max_grad_norm`` clips them (the number HF
logs as ``grad_norm``), unscaled under fp16. The event file goes into the directory of the Trainer's own
``TensorBoardCallback``, so the Gradients tab and HF's ``train/*`` scalars are one run. See ``docs/INTEGRATIONS.md``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.integrations.integration_utils import default_logdir
from transformers.trainer_callback import CallbackHandler

from .guard import ExplosionGuard
from .torch import GradientMonitor
from .torch.callback import MonitorCallback

__all__ = ["GradientMonitorCallback"]

class GradientMonitorCallback(MonitorCallback, TrainerCallback):
    """Records per-layer gradient statistics during ``Trainer.train``.

    ``logdir`` None (the default) writes into the Trainer's TensorBoard run (``report_to`` including
    ``"tensorboard"``); without one, into ``<output_dir>/runs/<time>_<host>`` as HF would name it. Steps are numbered
    like HF's ``state.global_step`` after the step (the step HF logs ``train/loss`` and ``train/grad_norm`` at). The
    other options are those of :class:`~tb_gradient_plugin.torch.GradientMonitor`.
    """

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._close()
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("the Trainer passed no model or optimizer to GradientMonitorCallback.on_train_begin")
        logdir = self._logdir(args) if state.is_world_process_zero else None
        spec = self._guard_spec
        # A fresh guard per run: its detector must not judge a new run against the last one's baseline.
        self._guard = None if spec is None else ExplosionGuard(spec.action, spec.config)
        self.monitor = GradientMonitor(
            model, getattr(optimizer, "optimizer", optimizer), logdir, scaler=getattr(optimizer, "scaler", None),
            on_explosion=self._guard, **self._options,
        )
        # HF counts a step once it is done and logs at that count: record optimizer step k at k + 1 like it does.
        self.monitor.set_global_step(state.global_step + 1)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._close()

    def _logdir(self, args: TrainingArguments) -> str:
        """The explicit logdir, else the directory of the Trainer's TensorBoard writer, else HF's default for it."""
        if self.logdir is not None:
            return self.logdir
        tb = self._tensorboard_callback()
        if tb is not None and tb.logging_dir:
            return tb.logging_dir
        logdir = os.path.join(args.output_dir, default_logdir())
        if tb is not None:  # it has not chosen yet (it runs after this callback): make it choose the same directory
            tb.logging_dir = logdir
        return logdir

    def _tensorboard_callback(self) -> TensorBoardCallback | None:
        """The Trainer's TensorBoardCallback, found through the callback handler that is calling this callback.

        Callbacks get no reference to the Trainer; the handler dispatching ``on_train_begin`` is on the call stack,
        and HF runs the reporting callbacks (TensorBoard's sets its directory there) before user callbacks.
        """
        frame = sys._getframe(1)
        while frame is not None:
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and any(cb is self for cb in handler.callbacks):
                for cb in handler.callbacks:
                    if isinstance(cb, TensorBoardCallback):
                        return cb
                return None
            frame = frame.f_back
        return None
