"""Hugging Face ``Trainer`` integration: ``Trainer(callbacks=[GradientMonitorCallback()])``.

A thin adapter over :class:`tb_gradient_plugin.torch.GradientMonitor`, attached to the optimizer the Trainer built (the
torch optimizer inside accelerate's wrapper). The monitor's optimizer hooks run inside ``optimizer.step()``, i.e.
between the Trainer's ``on_pre_optimizer_step`` and ``on_optimizer_step`` events; gradients are read where the last
backward of the step ends, so they are the accumulated gradients before ``max_grad_norm`` clips them (the number HF
logs as ``grad_norm``), unscaled under fp16. The event file goes into the directory of the Trainer's own
``TensorBoardCallback``, so the Gradients tab and HF's ``train/*`` scalars are one run. See ``docs/INTEGRATIONS.md``.
"""

from __future__ import annotations

import inspect
import os
import socket
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations.integration_utils import default_logdir

from .torch import GradientMonitor
from .torch.callback import MonitorCallback, find_batch_ids

__all__ = ["GradientMonitorCallback"]

class GradientMonitorCallback(MonitorCallback, TrainerCallback):
    """Records per-layer gradient statistics during ``Trainer.train``.

    ``logdir`` None (the default) writes into the Trainer's TensorBoard run (``report_to`` including
    ``"tensorboard"``: ``logging_dir`` in transformers 4.x, ``$TENSORBOARD_LOGGING_DIR`` or HF's default in 5.x);
    without one, into ``<output_dir>/runs/<time>_<host>`` as HF would name it. Steps are numbered
    like HF's ``state.global_step`` after the step (the step HF logs ``train/loss`` and ``train/grad_norm`` at).
    ``args.max_grad_norm`` is recorded as the clip threshold (unless ``clip=`` is given). The other options are those
    of :class:`~tb_gradient_plugin.torch.GradientMonitor`.

    Sample ids: a training batch with an integer field ``idx``, ``index``, ``indices``, ``sample_id``,
    ``sample_ids`` or ``sample_idx`` (keep it with ``TrainingArguments(remove_unused_columns=False)``) has them
    recorded, and the field is taken out of the model's inputs (a field the model's ``forward`` names is its input,
    not ids); ``batch_ids=`` names another field (kept for a ``forward`` that names it) or maps the inputs dict to
    the ids.
    """

    _hook: Any = None
    _takes: frozenset[str] = frozenset()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._close()
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("the Trainer passed no model or optimizer to GradientMonitorCallback.on_train_begin")
        logdir = self._logdir(args, state) if state.is_world_process_zero else None
        self._new_guard()
        clip = getattr(args, "max_grad_norm", None)  # HF clips the total norm at it when it is positive
        options = {"clip": float(clip) if clip else None, **self._options}
        self.monitor = GradientMonitor(
            model, getattr(optimizer, "optimizer", optimizer), logdir, scaler=getattr(optimizer, "scaler", None),
            on_explosion=self._guard, **options,
        )
        # HF counts a step once it is done and logs at that count: record optimizer step k at k + 1 like it does.
        self.monitor.set_global_step(state.global_step + 1)
        if self.batch_ids is not False:
            self._takes = _named_parameters(model)
            self._hook = model.register_forward_pre_hook(self._forward_pre, with_kwargs=True)

    def _forward_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """HF callbacks never see a batch; the model's forward does (``model(**inputs)``): record a training
        batch's ids there (an evaluation batch's are not), and take their field out of the inputs unless the model's
        ``forward`` names it."""
        # found on their own, ids come only from fields the model does not take: a declared input is the model's
        batch = {k: v for k, v in kwargs.items() if k not in self._takes} if self.batch_ids is None else kwargs
        name = self._log_batch(batch) if module.training else find_batch_ids(batch, self.batch_ids)[0]
        if name is None or name in self._takes or name not in kwargs:
            return None
        return args, {k: v for k, v in kwargs.items() if k != name}

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        super()._close()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._close()

    def _logdir(self, args: TrainingArguments, state: TrainerState) -> str:
        """The explicit logdir, else the directory HF's ``TensorBoardCallback`` writes to, from public settings.

        transformers 4.x writes to ``args.logging_dir``; 5.x to ``$TENSORBOARD_LOGGING_DIR`` or, without it, to a
        ``<output_dir>/runs/<time>_<host>`` directory it names when training begins (it runs before user callbacks),
        which is found on disk as the newest one holding an event file of this process. Without HF's writer, ours
        takes that default name itself.
        """
        if self.logdir is not None:
            return self.logdir
        trial = state.trial_name if state.is_hyper_param_search else None
        logging_dir = getattr(args, "logging_dir", None)  # transformers 4.x
        if logging_dir:
            return os.path.join(logging_dir, trial) if trial else logging_dir
        env = os.environ.get("TENSORBOARD_LOGGING_DIR")  # transformers 5.x (a search trial gets its own default)
        if env and not trial:
            return os.path.expanduser(env)
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        found = (_newest_run_of_this_process(os.path.join(args.output_dir, "runs"))
                 if {"tensorboard", "all"} & set(report_to) else None)
        return found or os.path.join(args.output_dir, default_logdir(), *([trial] if trial else []))


def _named_parameters(model: Any) -> frozenset[str]:
    """The keyword names a model's ``forward`` declares (not those a ``**kwargs`` would swallow)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _newest_run_of_this_process(root: str) -> str | None:
    """The directory under ``root`` whose event file from this host and process (torch's and tensorboardX's
    ``SummaryWriter`` put both in the name) was written last; never one of ours."""
    mark = f".{socket.gethostname()}.{os.getpid()}."
    newest: tuple[float, str] | None = None
    for directory, _, files in os.walk(root):
        for name in files:
            if "tfevents" in name and mark in name and ".gradients-" not in name:
                mtime = os.path.getmtime(os.path.join(directory, name))
                if newest is None or mtime > newest[0]:
                    newest = (mtime, directory)
    return newest[1] if newest else None
