"""PyTorch integration: per-layer gradient health recorded from the optimizer's own step hooks.

``GradientMonitor(model, optimizer, logdir)`` attaches to the optimizer (``register_step_pre_hook`` /
``register_step_post_hook``) so the training loop needs no extra call. On a logged step it computes, per layer, the
gradient L2 norm, parameter L2 norm, update L2 norm ``||w_after - w_before||``, max ``|g|`` and the count of
non-finite gradient entries with fused multi-tensor ops grouped by device and dtype, and moves all of them to the host
in one transfer. On a step that is not logged it does nothing but count.

Gradients are read where the backward pass ends (after DDP has averaged them, before any clipping or
``GradScaler.unscale_``) and divided by the loss scale, so the user sees the unscaled, pre-clip norms that tuning a
clipping threshold needs. See ``docs/PYTORCH.md``.
"""

from __future__ import annotations

import functools
import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import format as fmt
from . import optim_updates, weights_copy
from .guard import GUARD_RAISE, ExplosionGuard, GradientExplosionError, OnExplosion
from .writer import GradientWriter

__all__ = ["GradientMonitor", "discover_layers"]

ROOT_LAYER = "(root)"

try:  # DTensor (FSDP2, tensor parallel) exists in every torch this supports, but not in stripped-down builds.
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = Shard = None  # type: ignore[assignment,misc]


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind DDP / ``torch.compile`` wrappers, so layer names match the model's own paths."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
            continue
        return model


def discover_layers(
    model: nn.Module,
    *,
    include: str | None = None,
    exclude: str | None = None,
    group_depth: int | None = None,
    group_by: Callable[[str], str] | None = None,
) -> list[tuple[str, list[nn.Parameter]]]:
    """Layers of ``model`` in model order: ``(name, trainable parameters)``.

    A layer is a module that owns parameters directly, named by its ``named_modules()`` path (``(root)`` for the
    model's own parameters). ``include`` / ``exclude`` are regular expressions searched in that name; ``group_depth``
    keeps only the first N dotted components (``encoder.layers.3``) and ``group_by`` maps a name to its group, for
    deep models where one row per block is enough. Tied parameters belong to their first owner that the filters keep.
    """
    if group_depth is not None and group_by is not None:
        raise ValueError("pass at most one of group_depth and group_by")
    bad_depth = isinstance(group_depth, bool) or not isinstance(group_depth, int) or group_depth < 1
    if group_depth is not None and bad_depth:
        raise ValueError(f"group_depth must be a positive integer, got {group_depth!r}")
    inc = re.compile(include) if include is not None else None
    exc = re.compile(exclude) if exclude is not None else None
    seen: set[int] = set()
    groups: dict[str, list[nn.Parameter]] = {}
    for mod_name, module in _unwrap(model).named_modules():
        name = mod_name or ROOT_LAYER
        if (inc is not None and not inc.search(name)) or (exc is not None and exc.search(name)):
            continue  # before claiming its parameters: a tied one then goes to the owner the filter keeps
        direct = []
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                if p.requires_grad:
                    direct.append(p)
        if not direct:
            continue
        if group_by is not None:
            name = str(group_by(name))
        elif group_depth is not None and name != ROOT_LAYER:
            name = ".".join(name.split(".")[:group_depth])
        groups.setdefault(name, []).extend(direct)
    return list(groups.items())


def check_cadence(every: int, histograms_every: int) -> None:
    """Validate the logging cadences (shared by the monitor and the callbacks built on it, so they fail alike)."""
    for label, value, low in (("every", every, 1), ("histograms_every", histograms_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")


def monitor_options(*, every: int, update_norms: bool | str, histograms_every: int, include: str | None,
                    exclude: str | None, group_depth: int | None, group_by: Callable[[str], str] | None,
                    flush_secs: float) -> dict[str, Any]:
    """The :class:`GradientMonitor` keywords a training-framework callback passes through, checked when the callback
    is built (not when training starts)."""
    check_cadence(every, histograms_every)
    return {"every": every, "update_norms": update_norms, "histograms_every": histograms_every, "include": include,
            "exclude": exclude, "group_depth": group_depth, "group_by": group_by, "flush_secs": flush_secs}


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


def _stat_dtype(device: torch.device) -> torch.dtype:
    # Sums of squares in float64 so a norm of 1e20 does not overflow; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _shard_groups(t: torch.Tensor) -> tuple:
    """Process groups over which a DTensor is sharded (its norms must be reduced over them); empty otherwise."""
    if DTensor is None or not isinstance(t, DTensor):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(dim) for dim, pl in enumerate(t.placements) if isinstance(pl, Shard))


@dataclass
class _Group:
    """Tensors of one device / dtype / sharding, with the layer index of each (cached on the device)."""

    params: list[torch.Tensor]
    index: torch.Tensor
    pgs: tuple


@dataclass
class _Plan:
    """How to reduce the monitored parameters that have gradients at this step."""

    present: np.ndarray  # bool [L]: layers with at least one gradient
    groups: list[_Group]


def _make_plan(params: Sequence[nn.Parameter], layer_of: Sequence[int], n_layers: int, key: tuple[bool, ...]) -> _Plan:
    present = np.zeros(n_layers, dtype=bool)
    buckets: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}
    for p, layer, has in zip(params, layer_of, key, strict=True):
        if not has:
            continue
        present[layer] = True
        local = _local(p)
        pgs = _shard_groups(p)
        ts, ls = buckets.setdefault((local.device, p.grad.dtype, p.dtype, pgs), ([], []))
        ts.append(p)
        ls.append(layer)
    groups = [
        _Group(ts, torch.tensor(ls, dtype=torch.long, device=k[0]), k[3]) for k, (ts, ls) in buckets.items()
    ]
    return _Plan(present, groups)


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
    snapshots: dict[int, tuple[list[torch.Tensor], _Plan]] = field(default_factory=dict)
    state_updates: dict[int, tuple[optim_updates.StateUpdate, _Plan]] = field(default_factory=dict)
    update_lost: bool = False  # an optimizer's update was not determined: no update norms this step
    guard_action: int | None = None  # the explosion guard's decision for this step, once made


class GradientMonitor:
    """Records per-layer gradient statistics of a PyTorch model into TensorBoard event files.

    ``GradientMonitor(model, optimizer, logdir, every=1)`` (or ``writer=`` an open ``SummaryWriter`` or
    :class:`~tb_gradient_plugin.writer.GradientWriter`) and keep training as usual; ``optimizer.step()`` triggers the
    recording. Pass ``scaler=`` the ``torch.amp.GradScaler`` under mixed precision so norms are unscaled and skipped
    steps are recorded as overflow skips. Several optimizers (a list) each record the layers they own; one training
    step ends when each has stepped once.

    Only rank 0 of a distributed job writes; with sharded (DTensor / FSDP2) parameters every rank takes part in the
    reductions, so the norms are those of the full tensors.

    ``on_explosion="warn" | "raise" | "skip" | callable`` turns on the explosion guard (:mod:`.guard`): every step
    is then measured and judged before the optimizer applies it (see ``docs/INTEGRATIONS.md``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        logdir: str | None = None,
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
    ) -> None:
        check_cadence(every, histograms_every)
        if grads_at not in ("backward", "step", "manual"):
            raise ValueError(f"grads_at must be 'backward', 'step' or 'manual', got {grads_at!r}")
        self._guard = ExplosionGuard.resolve(on_explosion)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError("optimizer must be a torch.optim.Optimizer or a sequence of them")
        if len({id(o) for o in optimizers}) != len(optimizers):
            raise ValueError("the same optimizer was passed twice")
        layers = discover_layers(model, include=include, exclude=exclude, group_depth=group_depth, group_by=group_by)
        if not layers:
            what = "trainable parameters" if include is None and exclude is None else "layers matching the filters"
            raise ValueError(f"the model has no {what}: nothing to monitor")

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

        self._sharded = any(DTensor is not None and isinstance(p, DTensor) for p in self._all_params)
        dist = torch.distributed
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # Replicated training (DDP): other ranks hold the same gradients, so they need not compute anything.
        # With a guard every rank judges the (identical) gradients itself, so all ranks skip the same steps.
        self._inert = self.rank != 0 and not self._sharded and self._guard is None
        self._writer: GradientWriter | None = None
        self._owns_writer = False
        if self.rank == 0:
            if isinstance(writer, GradientWriter):
                if logdir is not None:
                    raise ValueError("pass exactly one of logdir or writer")
                self._writer = writer
            else:
                self._writer = GradientWriter(logdir, writer=writer, flush_secs=flush_secs)
                self._owns_writer = True

        self._step = 0
        self._closed = False
        self._loss: Any = None
        self._stepped: set[int] = set()
        self._state: _StepState | None = None
        self._plans: dict[tuple[bool, ...], _Plan] = {}
        self._grad_hooks: list[Any] = []
        self._capture_queued = False
        self._in_scaler_step: dict[int, bool] = {}
        self._handles: list[Any] = []
        self._scaler_step: Callable | None = None
        if not self._inert:
            ref = weakref.ref(self)
            for opt in optimizers:
                if not hasattr(opt, "register_step_pre_hook"):
                    raise TypeError(f"{type(opt).__name__} has no step hooks (needs torch >= 2.0)")
                self._handles.append(opt.register_step_pre_hook(_weak(ref, "_pre_step")))
                self._handles.append(opt.register_step_post_hook(_weak(ref, "_post_step")))
                if self._guard is not None and grads_at != "manual":
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
            local = [_local(p.detach()) for p in g.params]
            norms = torch._foreach_norm(local, 2, dtype=torch.float32)
            self._accumulate(state, "param_sq", g, torch.stack(norms).to(_stat_dtype(g.index.device)).square_())
            if self.update_norms and not from_state:
                snaps.extend(weights_copy.copies(local))
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
                torch._foreach_sub_(before, [_local(p.detach()) for p in g.params])
                norms = torch._foreach_norm(before, 2, dtype=torch.float32)
                del before
                self._accumulate(state, "update_sq", g, torch.stack(norms).to(_stat_dtype(g.index.device)).square_())
            del snaps
        if state is not None and k in state.state_updates:
            self._state_update_norms(state, k, optimizer, *state.state_updates.pop(k))
        self._optimizer_done(k)

    def _state_update_norms(self, state: _StepState, k: int, optimizer: torch.optim.Optimizer,
                            pending: optim_updates.StateUpdate, plan: _Plan) -> None:
        """Update norms of the step just taken from the optimizer's state (see :mod:`.optim_updates`)."""
        try:
            values = pending.finish([_stat_dtype(g.index.device) for g in plan.groups])
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
                    norms = torch._foreach_norm([_local(p.detach()) for p in g.params], 2, dtype=torch.float32)
                    sq = torch.stack(norms).to(_stat_dtype(g.index.device)).square_()
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

    def _plan_for(self, params: Sequence[nn.Parameter], layer_of: Sequence[int]) -> _Plan:
        key = tuple(p.grad is not None for p in params)
        cache_key = (id(params), *key)
        plan = self._plans.get(cache_key)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            plan = self._plans[cache_key] = _make_plan(params, layer_of, len(self.layers), key)
        return plan

    def _accumulate(self, state: _StepState, name: str, group: _Group, per_tensor: torch.Tensor) -> None:
        """Sum per-tensor values into per-layer ones (max for ``grad_max``), then over shards where sharded."""
        n = len(self.layers)
        dev = group.index.device
        if name == "grad_max":
            out = torch.zeros(n, dtype=per_tensor.dtype, device=dev).scatter_reduce_(0, group.index, per_tensor, "amax")
        else:
            out = torch.zeros(n, dtype=per_tensor.dtype, device=dev).index_add_(0, group.index, per_tensor)
        for pg in group.pgs:
            op = torch.distributed.ReduceOp.MAX if name == "grad_max" else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(out, op=op, group=pg)
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
        logged, hist = self._logged() or self._guard is not None, self._hist_step()
        for g in plan.groups:
            grads = [_grad_entries(p) for p in g.params]
            dev = g.index.device
            dt = _stat_dtype(dev)
            inv = None if scale is None else scale.to(dev, dt).reciprocal().reshape(())
            if hist:
                # One pass per gradient gives its counts and, on a logged step, its norm and max |g| too.
                passes = [_hist_pass(t, inv, logged) for t in grads]
                counts = torch.stack([c for c, _, _ in passes])
                implicit = [_local(p.grad).numel() - t.numel() for p, t in zip(g.params, grads, strict=True)]
                if any(implicit):  # a sparse gradient's entries it does not store are zeros
                    counts[:, fmt.HIST_ZERO] += torch.tensor(implicit, device=counts.device)
                if logged:
                    self._accumulate(state, "grad_sq", g, torch.stack([sq for _, sq, _ in passes]).to(dt))
                    self._accumulate(state, "grad_max", g, torch.stack([m for _, _, m in passes]).to(dt))
                    self._accumulate(state, "nonfinite", g, counts[:, fmt.HIST_NONFINITE].to(dt))
                layer_counts = torch.zeros(len(self.layers), fmt.HIST_BINS, dtype=torch.int64, device=dev)
                layer_counts.index_add_(0, g.index, counts)
                for pg in g.pgs:
                    torch.distributed.all_reduce(layer_counts, group=pg)
                state.hist = layer_counts if state.hist is None else state.hist + layer_counts.to(state.hist.device)
            elif logged:
                # Scaled gradients are huge by design: their squares overflow float32, so accumulate in float64.
                acc = torch.float32 if inv is None else dt
                norms = torch.stack(torch._foreach_norm(grads, 2, dtype=acc)).to(dt)
                maxes = _max_abs(grads, acc).to(dt)
                if inv is not None:
                    norms, maxes = norms * inv, maxes * inv
                bad = _nonfinite_counts(grads, maxes).to(dt)
                self._accumulate(state, "grad_sq", g, norms.square_())
                self._accumulate(state, "grad_max", g, maxes)
                self._accumulate(state, "nonfinite", g, bad)

    def _finish_step(self) -> None:
        """End of one training step: one host transfer and one write if it is recorded; then count it."""
        state, self._state = self._state, None
        loss, self._loss = self._loss, None
        self._stepped.clear()
        self._capture_queued = False
        try:
            if state is not None and state.grads is not None and self._writer is not None:
                self._write(self._step, state, loss)
        finally:
            self._step += 1
            self._sync_grad_hooks()

    def _write(self, step: int, state: _StepState, loss: Any) -> None:
        n = len(self.layers)
        parts: list[tuple[str, torch.Tensor]] = []
        for name in ("grad_sq", "grad_max", "nonfinite"):
            if name in state.grads:
                parts.append((name, state.grads[name]))
        for name in ("param_sq", "update_sq"):
            if getattr(state, name) is not None and not (name == "update_sq" and state.update_lost):
                parts.append((name, getattr(state, name)))
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
        dt = _stat_dtype(home)
        flat = torch.cat([t.reshape(-1).to(home, dt, non_blocking=True) for _, t in parts])
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
            self._writer.write(step, names, **kwargs)
        if "hist" in values:
            counts = values["hist"].reshape(n, fmt.HIST_BINS)[present]
            self._writer.write_histograms(step, names, np.rint(counts).astype(np.int64))


def _grad_entries(p: torch.Tensor) -> torch.Tensor:
    """The gradient entries the statistics read: a sparse gradient's stored values, summed where an index repeats
    (every other entry is zero, which changes no norm, max or count of non-finite values)."""
    grad = _local(p.grad.detach())
    if grad.layout == torch.sparse_coo:
        return grad.coalesce().values()
    if grad.layout != torch.strided:  # compressed layouts store each index once
        return grad.values()
    return grad


def _max_abs(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """max |t| per tensor (NaN if it holds one; 0 for an empty one, e.g. a rank's empty shard of a small parameter).

    On accelerators the fused infinity norm is one kernel for all tensors; on the CPU that norm takes a slow path,
    while ``aminmax`` runs at memory speed.
    """
    out = torch.zeros(len(tensors), dtype=dtype, device=tensors[0].device)
    nonempty = [i for i, t in enumerate(tensors) if t.numel()]
    if not nonempty:
        return out
    chosen = [tensors[i] for i in nonempty]
    if chosen[0].device.type == "cpu":
        ends = torch.stack([x for pair in map(torch.aminmax, chosen) for x in pair]).to(dtype)
        maxes = ends.abs_().view(-1, 2).amax(dim=1)  # amax propagates NaN
    else:
        maxes = torch.stack(torch._foreach_norm(chosen, float("inf"), dtype=dtype)).to(dtype)
    if len(nonempty) == len(tensors):
        return maxes
    out[nonempty] = maxes
    return out


def _nonfinite_counts(tensors: list[torch.Tensor], maxes: torch.Tensor) -> torch.Tensor:
    """Count of NaN/Inf entries per tensor.

    A tensor whose max |g| is finite has none. On the CPU, reading that is free, so only the (rare) tensors with a
    non-finite entry are counted; on an accelerator, deciding would cost a host sync, so all are counted there.
    """
    if maxes.device.type == "cpu":
        counts = torch.zeros(len(tensors), dtype=torch.int64)
        for i in torch.nonzero(~torch.isfinite(maxes)).reshape(-1).tolist():
            counts[i] = torch.isfinite(tensors[i]).logical_not_().sum()
        return counts
    return torch.stack([torch.isfinite(t).logical_not_().sum() for t in tensors])


_THRESHOLDS = fmt.histogram_edge_values(np.float32)
_CELL_BITS = 16  # a float32 magnitude's bit pattern >> 16: sign-free exponent and the top 7 mantissa bits
_CELL = 1 << _CELL_BITS


def _bin_table() -> np.ndarray:
    """Lookup table that bins a float32 magnitude from its bit pattern (monotonic in the value for magnitudes).

    Per cell ``c`` of 2^16 consecutive bit patterns ``h``: ``first_bin * 2^16 + (2^16 - low) - c * 2^16``, where
    ``first_bin`` is the bin of the cell's first value and ``low`` the low 16 bits of the one threshold inside the cell
    (2^16 if none). Then ``(table[h >> 16] + h) >> 16`` is the bin: the sum is ``first_bin * 2^16 + (2^16 - low) +
    (h & 0xFFFF)``, which carries into the bin exactly when the entry is at or above that threshold. Cells are far
    narrower than the half-decade bins, so a cell holds at most one threshold. Zero, subnormals and non-finite values
    fall out of the same lookup.
    """
    thresholds = _THRESHOLDS.view(np.int32).astype(np.int64)
    if np.any((thresholds[1:] >> _CELL_BITS) <= (thresholds[:-1] >> _CELL_BITS)):
        raise RuntimeError("two histogram thresholds share one lookup cell")
    starts = np.arange(1 << (31 - _CELL_BITS), dtype=np.int64) << _CELL_BITS
    below = np.searchsorted(thresholds, starts, side="right")  # thresholds <= the cell's first value
    first_bin = fmt.HIST_UNDERFLOW + below
    inside = np.minimum(below, len(thresholds) - 1)
    has = (below < len(thresholds)) & (thresholds[inside] < starts + _CELL)
    low = np.where(has, thresholds[inside] - starts, _CELL)
    first_bin[0], low[0] = fmt.HIST_ZERO, 1  # bit pattern 0 is zero; the rest of cell 0 is subnormal (underflow)
    nonfinite = starts >= 0x7F800000
    first_bin[nonfinite], low[nonfinite] = fmt.HIST_NONFINITE, _CELL
    return (first_bin * _CELL + (_CELL - low) - starts).astype(np.int32)


_BIN_TABLE = _bin_table()
#: Entries per piece on the CPU: the int32 temporaries of a piece (4 MiB in all) stay in the last-level cache.
_HIST_PIECE = 1 << 18
#: On the CPU, consecutive entries are counted into this many separate copies of the bins (summed at the end):
#: incrementing one counter per entry serialises on the few bins most entries fall into.
_HIST_LANES = 16
_LANE_STRIDE = 64
_tables_on: dict[torch.device, torch.Tensor] = {}


@functools.cache
def _cpu_lanes() -> torch.Tensor:
    """Per entry of a CPU piece, the offset of the copy of the bins it is counted into."""
    return (torch.arange(_HIST_PIECE, dtype=torch.int32) % _HIST_LANES) * _LANE_STRIDE


def _hist_pass(grad: torch.Tensor, inv_scale: torch.Tensor | None,
               stats: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Counts of one gradient's entries on the format's fixed log10|g| bins, equal to
    :func:`tb_gradient_plugin.format.histogram_counts` of the float32 magnitudes; with ``stats``, also its squared L2
    norm and max |g| (NaN if it holds one), taken from the same pieces while they are in cache.

    Binned from the float32 bit patterns with one table lookup (see :func:`_bin_table`), where a search among the
    thresholds per entry costs several times more. On the CPU the entries go through in cache-sized pieces, each
    entry counted into one of :data:`_HIST_LANES` copies of the bins. The magnitudes' bit patterns order like the
    magnitudes (NaN above infinity), so their integer max is the max |g|.
    """
    table = _tables_on.get(grad.device)
    if table is None:
        table = _tables_on[grad.device] = torch.from_numpy(_BIN_TABLE).to(grad.device)
    flat = grad.reshape(-1)
    n = flat.numel()
    dt = _stat_dtype(grad.device)
    zero = torch.zeros((), dtype=dt, device=grad.device) if stats else None
    if n == 0:
        return torch.zeros(fmt.HIST_BINS, dtype=torch.int64, device=grad.device), zero, zero
    cpu = grad.device.type == "cpu"
    size = min(_HIST_PIECE, n) if cpu else n
    lanes = _HIST_LANES if cpu else 1
    counts = torch.zeros(lanes * _LANE_STRIDE, dtype=torch.int64, device=grad.device)
    bits, cell, idx = (torch.empty(size, dtype=torch.int32, device=grad.device) for _ in range(3))
    convert = inv_scale is not None or flat.dtype != torch.float32
    scale = inv_scale.to(torch.float32) if inv_scale is not None else None
    # Unscaled sums of squares in float64: a scaled gradient's true norm may still overflow float32's squares.
    acc = torch.float32 if scale is None else dt
    norms: list[torch.Tensor] = []
    maxes: list[torch.Tensor] = []
    for start in range(0, n, size):
        piece = flat[start:start + size]
        k = piece.numel()
        if convert:
            piece = piece.to(torch.float32, copy=True).abs_()
            if scale is not None:
                piece.mul_(scale)
        b, c, i = bits[:k], cell[:k], idx[:k]
        torch.bitwise_and(piece.view(torch.int32), 0x7FFFFFFF, out=b)
        if stats:
            norms.append(torch.linalg.vector_norm(piece, dtype=acc))
            maxes.append(b.max())
        torch.bitwise_right_shift(b, _CELL_BITS, out=c)
        torch.index_select(table, 0, c, out=i)
        i += b
        i >>= _CELL_BITS
        if cpu:
            i += _cpu_lanes()[:k]
        counts += torch.bincount(i, minlength=counts.numel())
    counts = counts.view(lanes, _LANE_STRIDE).sum(0)[:fmt.HIST_BINS]
    if not stats:
        return counts, None, None
    sq = torch.stack(norms).to(dt).square_().sum()
    return counts, sq, torch.stack(maxes).max().view(torch.float32).to(dt)


def _weak(ref: weakref.ReferenceType, method: str) -> Callable[..., None]:
    """A hook that calls ``method`` on the monitor while it is alive: the optimizer must not keep it alive."""

    def hook(*args: Any) -> None:
        monitor = ref()
        if monitor is not None and not monitor._closed:
            getattr(monitor, method)(*args)

    return hook

