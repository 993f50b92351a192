"""``GradientMonitor``: per-layer gradient health recorded from the optimizer's own step hooks.

``GradientMonitor(model, optimizer, logdir)`` attaches to the optimizer (``register_step_pre_hook`` /
``register_step_post_hook``) so the training loop needs no extra call. On a logged step it computes, per layer, the
gradient L2 norm, parameter L2 norm, update L2 norm ``||w_after - w_before||``, max ``|g|`` and the count of
non-finite gradient entries with fused multi-tensor ops grouped by device and dtype (:mod:`.stats`), and moves all of
them to the host in one transfer. On a step that is not logged it does nothing but count.

Gradients are read where the backward pass ends (after DDP has averaged them, before any clipping or
``GradScaler.unscale_``) and divided by the loss scale, so the user sees the unscaled, pre-clip norms that tuning a
clipping threshold needs. See ``docs/PYTORCH.md``.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .. import format as fmt
from ..guard import GUARD_RAISE, ExplosionGuard, GradientExplosionError, OnExplosion
from ..writer import GradientWriter
from . import optim_updates, weights_copy
from .layers import discover_layers
from .stats import Group, Plan, grad_stats, is_sharded, local, make_plan, squared_norms, stat_dtype, to_layers

__all__ = ["GradientMonitor", "check_cadence"]


def check_cadence(every: int, histograms_every: int) -> None:
    """Validate the logging cadences (shared by the monitor and the callbacks built on it, so they fail alike)."""
    for label, value, low in (("every", every, 1), ("histograms_every", histograms_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")


def _as_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The optimizer, or the sequence of distinct optimizers, as a list."""
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise TypeError("optimizer must be a torch.optim.Optimizer or a sequence of them")
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ValueError("the same optimizer was passed twice")
    return optimizers


def _update_mode(value: Any, optimizers: Sequence[torch.optim.Optimizer]) -> str | bool:
    """Validated ``update_norms``: ``"auto"`` (``True``), ``"copy"``, ``"state"`` or ``False``."""
    if value is True:
        return "auto"
    if value is False:
        return False
    if value not in ("auto", "copy", "state"):
        raise ValueError(f"update_norms must be 'auto', 'copy', 'state', True or False, got {value!r}")
    if value == "state":
        for opt in optimizers:
            reason = optim_updates.unsupported_reason(opt)
            if reason is not None:
                raise ValueError(f"update_norms='state' is not possible for {type(opt).__name__}: {reason}; "
                                 "use 'auto' to fall back to a weights copy")
    return value


@dataclass
class _StepState:
    """What one logged step has gathered so far (device tensors until the single host transfer)."""

    grads: dict[str, torch.Tensor] | None = None  # grad_sq, grad_max, nonfinite: [L] each
    present: np.ndarray | None = None
    hist: torch.Tensor | None = None  # int64 [L, HIST_BINS]
    param_sq: torch.Tensor | None = None
    update_sq: torch.Tensor | None = None
    loss_scale: torch.Tensor | None = None
    skipped: list[torch.Tensor] = field(default_factory=list)
    lr: float | None = None
    snapshots: dict[int, tuple[list[torch.Tensor], Plan]] = field(default_factory=dict)
    state_updates: dict[int, tuple[optim_updates.StateUpdate, Plan]] = field(default_factory=dict)
    update_lost: bool = False  # an optimizer's update was not determined: no update norms this step
    exp_avg_sq: torch.Tensor | None = None  # squared norms of Adam's first moment per layer ...
    exp_avg_sq_sq: torch.Tensor | None = None  # ... and of its second moment
    moment_optimizers: int = 0  # optimizers that contributed them (all must, or none are written)
    guard_action: int | None = None  # the explosion guard's decision for this step, once made


class GradientMonitor:
    """Records per-layer gradient statistics of a PyTorch model into TensorBoard event files.

    Build it and keep training as usual: ``optimizer.step()`` triggers the recording through the optimizer's step
    hooks. Only rank 0 of a distributed job writes; with sharded (DTensor / FSDP2) parameters every rank takes part in
    the reductions, so the norms are those of the full tensors. See ``docs/PYTORCH.md``.

    Args:
        model: the module whose layers are recorded. DDP and ``torch.compile`` wrappers are looked through, so layer
            names are the model's own ``named_modules()`` paths.
        optimizer: the optimizer that trains ``model``, or a list of them: each records the layers it owns, and one
            training step ends when each has stepped once.
        logdir: directory to write a new event file into (rank 0 only).
        writer: instead of ``logdir``, an open ``torch.utils.tensorboard.SummaryWriter`` to append to (so its scalars
            and ours are one run), or a :class:`~tb_gradient_plugin.writer.GradientWriter`, which the monitor then
            flushes but does not close.
        every: record every N-th optimizer step; the others cost a counter.
        scaler: the ``torch.amp.GradScaler`` in use, so that norms are unscaled, the loss scale is recorded and a step
            the scaler skips is recorded as an overflow skip rather than an explosion.
        update_norms: where the update norms ``||w_after - w_before||`` come from: ``"auto"`` (or True) the
            optimizer's state where that is exact, else a weights copy; ``"copy"`` always the copy; ``"state"`` always
            the state (an optimizer it cannot model is refused); False records none.
        histograms_every: every N steps also record per-layer histograms of log10|g| on the format's fixed bins
            (0: never).
        grads_at: where gradients are read: ``"backward"`` where backward ends (after DDP's averaging, before any
            clipping), ``"step"`` what the optimizer sees, ``"manual"`` only at :meth:`capture_gradients` (for
            integrations that know their framework's moment).
        include: regular expression a layer name must contain (``re.search``) to be recorded.
        exclude: regular expression of layer names not to record.
        group_depth: merge layers into groups named by the first N dotted name components (``encoder.layers.3``).
        group_by: instead of ``group_depth``, a function from layer name to group name.
        flush_secs: how often (seconds) an event file the monitor opened is flushed to disk.
        on_explosion: the explosion guard (:mod:`tb_gradient_plugin.guard`): ``"warn"``, ``"raise"``, ``"skip"``, a
            callable that gets the episode and may return ``"skip"``, or an ``ExplosionGuard``. Every step is then
            measured and judged before the optimizer applies it (see ``docs/INTEGRATIONS.md``). None: no guard.
        clip: the total-norm clipping threshold the training loop applies (``clip_grad_norm_(params, clip)``),
            recorded with every logged step so the audit can tell how often the clip binds (the norms recorded are
            the pre-clip ones). Change :attr:`clip` when the loop changes it. None: no clipping recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        logdir: str | os.PathLike | None = None,
        *,
        writer: Any = None,
        every: int = 1,
        scaler: Any = None,
        update_norms: bool | Literal["auto", "copy", "state"] = "auto",
        histograms_every: int = 0,
        grads_at: Literal["backward", "step", "manual"] = "backward",
        include: str | None = None,
        exclude: str | None = None,
        group_depth: int | None = None,
        group_by: Callable[[str], str] | None = None,
        flush_secs: float = 2.0,
        on_explosion: OnExplosion = None,
        clip: float | None = None,
    ) -> None:
        check_cadence(every, histograms_every)
        self.clip = clip
        if grads_at not in ("backward", "step", "manual"):
            raise ValueError(f"grads_at must be 'backward', 'step' or 'manual', got {grads_at!r}")
        self._guard = ExplosionGuard.resolve(on_explosion)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = _as_optimizers(optimizer)
        layers = discover_layers(model, include=include, exclude=exclude, group_depth=group_depth, group_by=group_by)
        if not layers:
            what = "trainable parameters" if include is None and exclude is None else "layers matching the filters"
            raise ValueError(f"the model has no {what}: nothing to monitor")
        self._assign_layers(layers, optimizers)
        self._optimizers = optimizers
        self._opt_index = {id(o): k for k, o in enumerate(optimizers)}
        self.every = every
        self.histograms_every = histograms_every
        self.update_norms = _update_mode(update_norms, optimizers)
        # Per optimizer, how its update norms are computed: "state" (from its own state) or "copy" (weights copy).
        self._update_paths: list[str | None] = [
            None if not self.update_norms else
            "copy" if self.update_norms == "copy" or optim_updates.unsupported_reason(o) else "state"
            for o in optimizers
        ]
        self._copy_only: set[int] = set()  # optimizers whose state once failed to determine the update
        self.grads_at = grads_at
        self._scaler = scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None

        dist = torch.distributed
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # Replicated training (DDP): other ranks hold the same gradients, so they need not compute anything.
        # With a guard every rank judges the (identical) gradients itself, so all ranks skip the same steps.
        sharded = any(is_sharded(p) for p in self._all_params)
        self._inert = self.rank != 0 and not sharded and self._guard is None
        self._open_writer(logdir, writer, flush_secs)

        self._step = 0
        self._closed = False
        self._loss: Any = None
        self._batch_ids: list[torch.Tensor | np.ndarray] = []  # this step's log_batch calls
        self._stepped: set[int] = set()
        self._state: _StepState | None = None
        self._plans: dict[tuple[bool, ...], Plan] = {}
        self._grad_hooks: list[Any] = []
        self._capture_queued = False
        self._in_scaler_step: dict[int, bool] = {}
        self._handles: list[Any] = []
        self._scaler_step: Callable | None = None
        if not self._inert:
            self._attach_hooks()

    def _assign_layers(self, layers: list[tuple[str, list[nn.Parameter]]],
                       optimizers: list[torch.optim.Optimizer]) -> None:
        """Each layer's parameters go to the optimizer that owns them; layers no optimizer owns are not recorded."""
        owner: dict[int, int] = {}
        for k, opt in enumerate(optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    owner.setdefault(id(p), k)
        names: list[str] = []
        self._params: list[list[nn.Parameter]] = [[] for _ in optimizers]  # per optimizer, model order
        self._layer_of: list[list[int]] = [[] for _ in optimizers]
        for name, params in layers:
            owned = [(owner[id(p)], p) for p in params if id(p) in owner]
            if not owned:
                continue
            for k, p in owned:
                self._params[k].append(p)
                self._layer_of[k].append(len(names))
            names.append(name)
        if not names:
            raise ValueError(
                "the optimizer does not own any of the model's trainable parameters "
                "(was it built for another model, or before the model was replaced?)"
            )
        self.layers: tuple[str, ...] = tuple(names)
        self._all_params = [p for ps in self._params for p in ps]
        self._all_layer_of = [i for ls in self._layer_of for i in ls]

    def _open_writer(self, logdir: str | os.PathLike | None, writer: Any, flush_secs: float) -> None:
        """Rank 0 writes: to the user's GradientWriter as is, else to one of its own (on ``logdir`` or ``writer``)."""
        self._writer: GradientWriter | None = None
        self._owns_writer = False
        if self.rank != 0:
            return
        if isinstance(writer, GradientWriter):
            if logdir is not None:
                raise ValueError("pass exactly one of logdir or writer")
            self._writer = writer
        else:
            self._writer = GradientWriter(logdir, writer=writer, flush_secs=flush_secs)
            self._owns_writer = True

    def _attach_hooks(self) -> None:
        """The optimizers' step hooks (weak: the optimizer must not keep the monitor alive), the scaler's step wrapper
        and, for the coming step, the end-of-backward gradient hooks."""
        ref = weakref.ref(self)
        for opt in self._optimizers:
            if not hasattr(opt, "register_step_pre_hook"):
                raise TypeError(f"{type(opt).__name__} has no step hooks (needs torch >= 2.0)")
            self._handles.append(opt.register_step_pre_hook(_weak(ref, "_pre_step")))
            self._handles.append(opt.register_step_post_hook(_weak(ref, "_post_step")))
            if self._guard is not None and self.grads_at != "manual":
                self._handles.append(opt.register_step_pre_hook(_weak(ref, "_guard_pre_step")))
        if self._scaler is not None:
            self._wrap_scaler(ref)
        self._sync_grad_hooks()

    # ----------------------------------------------------------------------------------------------------- public

    @property
    def step(self) -> int:
        """Number under which the current (not yet finished) optimizer step will be recorded."""
        return self._step

    def set_global_step(self, step: int) -> None:
        """Record the current optimizer step as ``step`` (and count on from there), e.g. to match the user's own
        step numbering after resuming from a checkpoint."""
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self._step = step
        self._sync_grad_hooks()

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Remember this step's loss; it is written with the step's statistics (no host sync here)."""
        self._check_open()
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must hold one value, got shape {tuple(loss.shape)}")
            self._loss = loss.detach()
        else:
            self._loss = float(loss)

    def log_batch(self, ids: torch.Tensor | Sequence[int]) -> None:
        """Remember the sample ids (dataset indices, or any integer ids) of this step's batch, so that an episode can
        name the batch behind it (``batches`` in the audit JSON, ``tb-gradient audit --skip-list``).

        Call it once per batch before ``optimizer.step()``; with gradient accumulation, once per micro-batch (the
        step records them all). A tensor is kept as it is, on its device: its ids reach the host with the step's
        statistics, in the step's one host transfer, so this causes no device sync. Under DDP rank 0 records the ids
        of its own shard.
        """
        self._check_open()
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"batch ids must be an integer tensor, got {ids.dtype}")
            part: torch.Tensor | np.ndarray = ids.detach().reshape(-1)
        else:
            arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
            if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
                raise TypeError(f"batch ids must be integers, got {arr.dtype}")
            part = arr.astype(np.int64).reshape(-1)
        if self._writer is not None:
            self._batch_ids.append(part)

    @property
    def clip(self) -> float | None:
        """The clipping threshold recorded with each logged step (None: none)."""
        return self._clip

    @clip.setter
    def clip(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"clip must be a positive finite number or None, got {value!r}")
        self._clip = value

    @property
    def update_norm_paths(self) -> tuple[str | None, ...]:
        """Per optimizer, where the last logged step's update norms came from: ``"state"`` (the optimizer's own
        state, no weights copy), ``"copy"`` (a weights copy) or None (``update_norms=False``)."""
        return tuple(self._update_paths)

    @property
    def guard(self) -> ExplosionGuard | None:
        """The explosion guard (``on_explosion=``), or None when it is off; ``guard.decisions`` lists what it did."""
        return self._guard

    def capture_gradients(self) -> None:
        """Measure the coming step's gradients now, as they are, and let the explosion guard judge the step.

        For ``grads_at="manual"``: integrations call it where their framework holds the step's final gradients
        before the optimizer applies them (Lightning's ``on_before_optimizer_step``: unscaled, not yet clipped). The
        gradients must already be unscaled. With a guard set, a step it skips has every gradient set to None here.
        """
        self._check_open()
        if self._inert or not self._active():
            return
        state = self._state_now()
        self._capture_grads(None)
        if self._scaler is not None:
            state.loss_scale = self._scale_tensor()
        self._guard_step()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Finish a partly recorded step, detach every hook and flush/close the output."""
        if self._closed:
            return
        if self._stepped:
            self._finish_step()
        self._closed = True
        for handle in self._handles + self._grad_hooks:
            handle.remove()
        self._handles, self._grad_hooks = [], []
        if self._scaler is not None and self._scaler.__dict__.get("step") is self._scaler_step:
            del self._scaler.__dict__["step"]
        if self._writer is not None:
            if self._owns_writer:
                self._writer.close()
            else:
                self._writer.flush()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------------- schedule

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("GradientMonitor is closed")

    def _logged(self) -> bool:
        return self._step % self.every == 0

    def _hist_step(self) -> bool:
        return self.histograms_every > 0 and self._step % self.histograms_every == 0

    def _active(self) -> bool:
        return self._logged() or self._hist_step() or self._guard is not None

    def _sync_grad_hooks(self) -> None:
        """Have the end-of-backward capture hooks registered exactly while the coming step is recorded."""
        want = self.grads_at == "backward" and not self._inert and not self._closed and self._active()
        if want and not self._grad_hooks:
            ref = weakref.ref(self)
            hook = _weak(ref, "_on_grad")
            self._grad_hooks = [p.register_post_accumulate_grad_hook(hook) for p in self._all_params]
        elif not want and self._grad_hooks:
            for handle in self._grad_hooks:
                handle.remove()
            self._grad_hooks = []

    # ----------------------------------------------------------------------------------------------------- hooks

    def _on_grad(self, _param: torch.Tensor) -> None:
        if self._capture_queued:
            return
        self._capture_queued = True
        engine = torch.autograd.Variable._execution_engine
        # Queued twice: callbacks queued during backward (DDP's gradient averaging) run first, ours after them.
        engine.queue_callback(lambda: engine.queue_callback(self._capture_after_backward))

    def _capture_after_backward(self) -> None:
        self._capture_queued = False
        if not self._closed and self._active():
            self._capture_grads(self._scale_tensor())  # with gradient accumulation the last backward wins

    def _pre_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        k = self._opt_index[id(optimizer)]
        if k in self._stepped:  # this optimizer steps again before the others: the previous step is over
            self._finish_step()
        if not self._active():
            return
        state = self._state_now()
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for optimizers that unscale themselves
        if isinstance(found_inf, torch.Tensor):
            state.skipped.append(found_inf.detach().reshape(-1)[:1].clone())
        if state.grads is None and self.grads_at != "manual":
            grad_scale = getattr(optimizer, "grad_scale", None)
            if isinstance(found_inf, torch.Tensor):
                scale = grad_scale.detach().clone() if isinstance(grad_scale, torch.Tensor) else None
            else:
                scale = None  # GradScaler.step unscales before calling step
            self._capture_grads(scale)
        if state.lr is None:
            lr = optimizer.param_groups[0].get("lr")
            state.lr = float(lr) if lr is not None else None
        if not self._logged():
            return
        plan = self._plan_for(self._params[k], self._layer_of[k])
        if not plan.groups:
            return
        from_state = self._update_from_state(k, optimizer)
        snaps: list[torch.Tensor] = []
        for g in plan.groups:
            weights = [local(p.detach()) for p in g.params]
            self._accumulate(state, "param_sq", g, squared_norms(weights, g.index.device))
            if self.update_norms and not from_state:
                snaps.extend(weights_copy.copies(weights))
        if from_state:
            state.state_updates[k] = (optim_updates.StateUpdate(optimizer, [g.params for g in plan.groups]), plan)
        elif self.update_norms:
            state.snapshots[k] = (snaps, plan)

    def _update_from_state(self, k: int, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this step's update norms of optimizer ``k`` come from its state (else from a weights copy)."""
        if not self.update_norms:
            return False
        use = self.update_norms != "copy" and k not in self._copy_only
        use = use and optim_updates.unsupported_reason(optimizer) is None
        self._update_paths[k] = "state" if use else "copy"
        return use

    def _post_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        k = self._opt_index[id(optimizer)]
        self._in_scaler_step[id(optimizer)] = False  # the step ran: not an overflow skip
        state = self._state
        if state is not None and k in state.snapshots:
            snaps, plan = state.snapshots.pop(k)
            start = 0
            for g in plan.groups:
                before = snaps[start:start + len(g.params)]
                start += len(g.params)
                torch._foreach_sub_(before, [local(p.detach()) for p in g.params])
                sq = squared_norms(before, g.index.device)
                del before
                self._accumulate(state, "update_sq", g, sq)
            del snaps
        if state is not None and k in state.state_updates:
            self._state_update_norms(state, k, optimizer, *state.state_updates.pop(k))
        if state is not None and self._logged():
            self._moment_norms(state, k, optimizer)
        self._optimizer_done(k)

    def _moment_norms(self, state: _StepState, k: int, optimizer: torch.optim.Optimizer) -> None:
        """Norms of Adam's moments per layer, read from the optimizer's state after the step (no copy, no sync)."""
        plan = self._plan_for(self._params[k], self._layer_of[k])
        found = False
        for g in plan.groups:
            moments = optim_updates.adam_moments(optimizer, g.params)
            if moments is None:
                continue
            found = True
            for name, tensors in zip(("exp_avg_sq", "exp_avg_sq_sq"), moments, strict=True):
                self._accumulate(state, name, g, squared_norms(tensors, g.index.device))
        state.moment_optimizers += found

    def _state_update_norms(self, state: _StepState, k: int, optimizer: torch.optim.Optimizer,
                            pending: optim_updates.StateUpdate, plan: Plan) -> None:
        """Update norms of the step just taken from the optimizer's state (see :mod:`.optim_updates`)."""
        try:
            values = pending.finish([stat_dtype(g.index.device) for g in plan.groups])
        except optim_updates.UpdateModelError as err:
            # Which update the step made is unknown: record none for this step rather than a wrong one.
            state.update_lost = True
            self._copy_only.add(k)
            self._update_paths[k] = "copy"
            warnings.warn(f"update norms of step {self._step} are not recorded ({err}); "
                          f"{type(optimizer).__name__} uses a weights copy from now on", RuntimeWarning, stacklevel=2)
            return
        for g, sq in zip(plan.groups, values, strict=True):
            self._accumulate(state, "update_sq", g, sq)

    def _guard_pre_step(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        """Registered after ``_pre_step``: the step's gradients are measured by now and not yet applied."""
        self._guard_step()

    def _guard_step(self) -> None:
        """Feed the guard this step's gradient statistics (one host transfer) and carry out its decision, once."""
        state = self._state
        if self._guard is None or state is None or state.grads is None or state.guard_action is not None:
            return
        if "grad_sq" not in state.grads:
            return  # no monitored parameter has a gradient: nothing to judge
        parts = [state.grads["grad_sq"], state.grads["grad_max"], state.grads["nonfinite"]]
        if state.skipped:  # found_inf of an optimizer that unscales itself
            parts.append(sum(s.to(parts[0].device).float().clamp(max=1) for s in state.skipped).reshape(1))
        if state.loss_scale is not None:
            parts.append(state.loss_scale.reshape(1))
        n = len(self.layers)
        host = torch.cat([t.reshape(-1).to(parts[0].device, torch.float64) for t in parts]).cpu().numpy()
        present = state.present
        grad_sq = host[:n][present]
        metrics = {"grad_norm": np.sqrt(grad_sq), "grad_max_abs": host[n:2 * n][present],
                   "nonfinite_count": host[2 * n:3 * n][present]}
        scalars = {"total_grad_norm": float(np.sqrt(grad_sq.sum()))}
        if self._scaler is not None or state.skipped:
            # Under a loss scaler non-finite gradients are an overflow the scaler skips, not an explosion (unless
            # the scale collapses, which the detector sees from the loss scale).
            found = float(host[3 * n]) if state.skipped else float(metrics["nonfinite_count"].sum() > 0)
            scalars["step_skipped"] = found
        if state.loss_scale is not None:
            scalars["loss_scale"] = float(host[-1])
        names = [name for name, here in zip(self.layers, present, strict=True) if here]
        try:
            decision = self._guard.check(self._step, names, metrics, scalars)
        except GradientExplosionError:
            state.guard_action = GUARD_RAISE
            self._finish_step()  # the step is over: record it (with the decision) before training stops
            self.flush()
            raise
        state.guard_action = decision.action
        if decision.skip:  # standard optimizers leave a parameter without gradient (and its state) untouched
            for opt in self._optimizers:
                for group in opt.param_groups:
                    for p in group["params"]:
                        p.grad = None

    def _wrap_scaler(self, ref: weakref.ReferenceType) -> None:
        """See steps ``GradScaler.step`` skips: it then never calls ``optimizer.step``, so no step hook fires."""
        original = self._scaler.step

        def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            monitor = ref()
            if monitor is None or monitor._closed or id(optimizer) not in monitor._opt_index:
                return original(optimizer, *args, **kwargs)
            monitor._in_scaler_step[id(optimizer)] = True
            result = original(optimizer, *args, **kwargs)
            if monitor._in_scaler_step.pop(id(optimizer), False):
                monitor._skipped_step(optimizer)
            return result

        self._scaler_step = step
        self._scaler.step = step

    def _skipped_step(self, optimizer: torch.optim.Optimizer) -> None:
        k = self._opt_index[id(optimizer)]
        if k in self._stepped:
            self._finish_step()
        if self._active():
            state = self._state_now()
            if state.grads is None:
                self._capture_grads(None)  # GradScaler.step has unscaled them
            state.skipped.append(torch.ones(1))
            if self._logged():
                plan = self._plan_for(self._params[k], self._layer_of[k])
                for g in plan.groups:  # weights did not move: parameter norm as is, update norm zero
                    sq = squared_norms([local(p.detach()) for p in g.params], g.index.device)
                    self._accumulate(self._state, "param_sq", g, sq)
                    if self.update_norms:
                        self._accumulate(self._state, "update_sq", g, torch.zeros_like(sq))
        self._optimizer_done(k)

    def _optimizer_done(self, k: int) -> None:
        self._stepped.add(k)
        if len(self._stepped) == len(self._optimizers):
            self._finish_step()

    # ----------------------------------------------------------------------------------------------- computation

    def _state_now(self) -> _StepState:
        if self._state is None:
            self._state = _StepState()
        return self._state

    def _scale_tensor(self) -> torch.Tensor | None:
        """The loss scale the current gradients are multiplied by (a device tensor: reading it must not sync)."""
        if self._scaler is None:
            return None
        scale = getattr(self._scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            return scale.detach().clone()
        return torch.tensor([float(self._scaler.get_scale())])

    def _plan_for(self, params: Sequence[nn.Parameter], layer_of: Sequence[int]) -> Plan:
        key = tuple(p.grad is not None for p in params)
        cache_key = (id(params), *key)
        plan = self._plans.get(cache_key)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            plan = self._plans[cache_key] = make_plan(params, layer_of, len(self.layers), key)
        return plan

    def _accumulate(self, state: _StepState, name: str, group: Group, per_tensor: torch.Tensor) -> None:
        """Add one group's per-tensor values to the step's per-layer ``name`` (max for ``grad_max``)."""
        out = to_layers(per_tensor, group, len(self.layers), amax=name == "grad_max")
        target = state.grads if name in ("grad_sq", "grad_max", "nonfinite") else None
        if target is not None:
            prev = target.get(name)
            if prev is None:
                target[name] = out
            else:
                out = out.to(prev.device, non_blocking=True)
                target[name] = torch.maximum(prev, out) if name == "grad_max" else prev + out
            return
        prev = getattr(state, name)
        setattr(state, name, out if prev is None else prev + out.to(prev.device, non_blocking=True))

    def _capture_grads(self, scale: torch.Tensor | None) -> None:
        """Per-layer gradient statistics of every monitored parameter, divided by the loss scale ``scale``."""
        state = self._state_now()
        plan = self._plan_for(self._all_params, self._all_layer_of)
        state.grads, state.present, state.hist = {}, plan.present, None
        state.loss_scale = scale
        norms, hist = self._logged() or self._guard is not None, self._hist_step()
        for g in plan.groups:
            per_tensor, counts = grad_stats(g, scale, len(self.layers), norms=norms, hist=hist)
            for name, values in per_tensor.items():
                self._accumulate(state, name, g, values)
            if counts is not None:
                state.hist = counts if state.hist is None else state.hist + counts.to(state.hist.device)

    def _finish_step(self) -> None:
        """End of one training step: one host transfer and one write if it is recorded; then count it."""
        state, self._state = self._state, None
        loss, self._loss = self._loss, None
        ids, self._batch_ids = self._batch_ids, []
        self._stepped.clear()
        self._capture_queued = False
        try:
            if state is not None and state.grads is not None and self._writer is not None:
                self._write(self._step, state, loss, ids)
        finally:
            self._step += 1
            self._sync_grad_hooks()

    def _write(self, step: int, state: _StepState, loss: Any, ids: list[torch.Tensor | np.ndarray]) -> None:
        n = len(self.layers)
        parts: list[tuple[str, torch.Tensor]] = []
        for name in ("grad_sq", "grad_max", "nonfinite"):
            if name in state.grads:
                parts.append((name, state.grads[name]))
        for name in ("param_sq", "update_sq"):
            if getattr(state, name) is not None and not (name == "update_sq" and state.update_lost):
                parts.append((name, getattr(state, name)))
        if state.exp_avg_sq is not None and state.moment_optimizers == len(self._optimizers):
            parts += [("exp_avg_sq", state.exp_avg_sq), ("exp_avg_sq_sq", state.exp_avg_sq_sq)]
        if isinstance(loss, torch.Tensor):
            parts.append(("loss", loss))
        if state.loss_scale is not None:
            parts.append(("loss_scale", state.loss_scale))
        if state.skipped:
            parts.append(("skipped", sum(s.to(state.skipped[0].device).float().clamp(max=1) for s in state.skipped)))
        if state.hist is not None:
            parts.append(("hist", state.hist))
        if not parts:
            return
        home = parts[0][1].device
        dt = stat_dtype(home)
        flat = torch.cat([t.reshape(-1).to(home, dt, non_blocking=True) for _, t in parts])
        # ids of the home device are copied behind the statistics on its stream, so the one sync below covers them
        ids = [p.to("cpu", non_blocking=True) if isinstance(p, torch.Tensor) and p.device == home else p for p in ids]
        host = flat.cpu().numpy()  # the one device-to-host transfer of the step
        values: dict[str, np.ndarray] = {}
        pos = 0
        for name, t in parts:
            values[name] = host[pos:pos + t.numel()]
            pos += t.numel()

        present = state.present
        names = [self.layers[i] for i in range(n) if present[i]]
        if not names:
            return
        kwargs: dict[str, Any] = {}
        if state.guard_action is not None:
            kwargs["guard_action"] = float(state.guard_action)
        # With a guard every step is measured; only logged steps, and steps the guard acted on, are written.
        if "grad_sq" in values and (self._logged() or bool(state.guard_action)):
            grad_sq = values["grad_sq"][present]
            kwargs["grad_norm"] = np.sqrt(grad_sq)
            kwargs["grad_max_abs"] = values["grad_max"][present]
            kwargs["nonfinite_count"] = values["nonfinite"][present]
            kwargs["total_grad_norm"] = float(np.sqrt(grad_sq.sum()))
            if "param_sq" in values:
                kwargs["param_norm"] = np.sqrt(values["param_sq"][present])
            if "update_sq" in values:
                kwargs["update_norm"] = np.sqrt(values["update_sq"][present])
            if "exp_avg_sq" in values:
                kwargs["exp_avg_norm"] = np.sqrt(values["exp_avg_sq"][present])
                kwargs["exp_avg_sq_norm"] = np.sqrt(values["exp_avg_sq_sq"][present])
            if self._clip is not None:
                kwargs["clip_threshold"] = self._clip
            if "loss" in values:
                kwargs["loss"] = float(values["loss"][0])
            elif isinstance(loss, float):
                kwargs["loss"] = loss
            if state.lr is not None:
                kwargs["lr"] = state.lr
            if "loss_scale" in values:
                kwargs["loss_scale"] = float(values["loss_scale"][0])
            if self._scaler is not None:
                kwargs["step_skipped"] = float(values["skipped"][0]) if "skipped" in values else 0.0
            if ids:
                kwargs["batch_ids"] = np.concatenate([p.cpu().numpy() if isinstance(p, torch.Tensor) else p
                                                      for p in ids]).astype(np.int64)
            self._writer.write(step, names, **kwargs)
        if "hist" in values:
            counts = values["hist"].reshape(n, fmt.HIST_BINS)[present]
            self._writer.write_histograms(step, names, np.rint(counts).astype(np.int64))


def _weak(ref: weakref.ReferenceType, method: str) -> Callable[..., None]:
    """A hook that calls ``method`` on the monitor while it is alive: the optimizer must not keep it alive."""

    def hook(*args: Any) -> None:
        monitor = ref()
        if monitor is not None and not monitor._closed:
            getattr(monitor, method)(*args)

    return hook

