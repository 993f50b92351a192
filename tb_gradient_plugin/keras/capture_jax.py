"""Capture on Keras' JAX backend: inside the jitted train step, around the optimizer's ``stateless_apply``.

Keras' JAX ``train_step`` takes the gradients with ``jax.value_and_grad`` and hands them to
``optimizer.stateless_apply(optimizer_variables, grads, trainable_variables)``, which returns the new weights. Three
methods are wrapped on the instances (the classes are untouched) and the train function is jitted again:

- ``optimizer.stateless_apply``: sees the applied gradients, the weights before and after, the step
  (``optimizer.iterations`` from the optimizer state) and the learning rate; with a guard it asks the host whether to
  apply the step (an ordered ``io_callback``) and, if not, returns the weights and optimizer state unchanged
  (``lax.cond``);
- ``model._update_metrics_variables``: receives the unscaled batch loss;
- ``model.train_step``: after the step, a ``lax.cond`` on the step number reduces the statistics of a logged step on
  the device into a few small arrays, returned with the step's logs under a private key. Unlogged steps compute
  nothing;
- ``model._make_function``: wraps each jitted step so the host takes those arrays out of the logs before Keras (or
  any other callback) sees them, and keeps the ones of logged steps (counted on the host) to read at batch end.

No host callback sits in the compiled step without a guard: a computation with one is dispatched by JAX's slow path
(about a millisecond per step on CPU even when the callback never runs), which every-10-steps logging cannot afford.
The guard needs the host's judgement inside the step and keeps its ordered ``io_callback``.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import format as fmt
from .host import StepRecorder, layer_max, layer_norms, layer_sum
from .layers import group_by_layer, layer_paths
from .moments import moment_variables
from .patching import Patches
from .stats import _BIN_OF_LOG, _bin_tops

__all__ = ["JaxCapture"]

#: The logs key a hooked step returns its statistics under (taken out before Keras sees the logs).
_KEY = "__gradient_monitor__"


@dataclass
class _Plan:
    """Static facts of one trace: the layers, the variables each owns, where ``iterations`` sits in the state."""

    index: int  # its place in JaxCapture._plan_list (the step's statistics name their plan by it)
    layers: list[str]
    groups: list[list[int]]
    iterations: int
    moments: tuple[list[int], list[int]] | None  # where Adam's moments of each variable sit in the optimizer state


@dataclass
class _Traced:
    """Values of the step being traced, handed from ``stateless_apply`` to ``train_step`` (same trace)."""

    plan: _Plan
    step: Any
    lr: Any
    grads: list[Any]
    before: list[Any]
    after: list[Any]
    optimizer_after: list[Any]
    loss: Any = None


def _reductions(arrays: list[Any], count: bool = False) -> Any:
    """Per array: max|x|, sum((x / max|x|)**2) (no float32 overflow) and, with ``count``, the non-finite count (else
    zeros): ``[3, n]``. Entries are counted only in a step where some sum is not finite: a counting pass costs about
    10x a sum on the CPU, and only the gradients' count is recorded."""
    import jax
    import jax.numpy as jnp

    flats = [jnp.abs(x.astype(jnp.float32) if x.dtype != jnp.float64 else x).reshape(-1) for x in arrays]
    rows = []
    for a in flats:
        m = jnp.max(a) if a.size else jnp.zeros((), a.dtype)
        safe = jnp.where(jnp.isfinite(m) & (m > 0), m, jnp.ones_like(m))
        rows.append(jnp.stack([m, jnp.sum(jnp.square(a / safe))]).astype(jnp.float32))
    out = jnp.stack(rows, 1)
    zeros = jnp.zeros((1, len(flats)), jnp.float32)
    if count:
        counted = jax.lax.cond(jnp.all(jnp.isfinite(out[1])), lambda: zeros, lambda: jnp.stack(
            [jnp.sum(~jnp.isfinite(x)).astype(jnp.float32) for x in arrays])[None])
        return jnp.concatenate([out, counted])
    return jnp.concatenate([out, zeros])


def _histogram(grads: list[Any], groups: list[list[int]]) -> Any:
    """Per-layer counts on the format's fixed bins, ``[layers * HIST_BINS]``: as :func:`.stats.histogram_counts`."""
    import jax.numpy as jnp

    tops = jnp.asarray(_bin_tops(np.dtype(np.float32)))
    bins = []
    for layer, idxs in enumerate(groups):
        for i in idxs:
            a = jnp.abs(grads[i].astype(jnp.float32).reshape(-1))
            a = jnp.where(jnp.isnan(a), jnp.inf, a)
            estimate = jnp.floor(jnp.log(a) * (2.0 / math.log(10.0)) + _BIN_OF_LOG)
            b = jnp.clip(estimate, fmt.HIST_ZERO, fmt.HIST_OVERFLOW).astype(jnp.int32)
            b = b + (a >= tops[b]).astype(jnp.int32)
            bins.append(b + layer * fmt.HIST_BINS)
    return jnp.bincount(jnp.concatenate(bins), length=len(groups) * fmt.HIST_BINS)


class JaxCapture:
    """Wraps one model's train step and its optimizer's ``stateless_apply``; steps are ``optimizer.iterations`` plus
    the steps the guard held back (counted on the host)."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder
        self.held = 0  # steps the guard held back: optimizer.iterations does not count them
        self._model: Any = None
        self._optimizer: Any = None
        self._hooked_function: Any = None
        self._patches = Patches()
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._plan_list: list[_Plan] = []
        self._traced: _Traced | None = None
        self.next_step = 0  # the step the next execution of the train step runs (held steps included)
        self._pending: deque[dict[str, Any]] = deque()  # logged steps' statistics (device arrays), not read yet
        self._read_lock = threading.Lock()
        self._plain = False  # building or tracing the model's own step: the hooks step aside
        self._original_train_step: Any = None

    def attach(self, model: Any, optimizer: Any) -> None:
        if optimizer is not self._optimizer or model is not self._model:
            self.detach()
            self._install(model, optimizer)
        if model.train_function is None or model.train_function is not self._hooked_function:
            self._hooked_function = model.train_function = self._train_function(model)
        self.next_step = int(optimizer.iterations) + self.held

    def _train_function(self, model: Any) -> Any:
        """Keras' train function made twice, with the hooks and without them, and one that runs either: a step the
        host will not record (and, without a guard, need not judge) runs the model's own compiled step, unchanged.

        One compiled step with a ``lax.cond`` on the step number costs every step, even where it is not taken: it keeps
        what it measures alive across the update Keras donates to the step (measured on a 10-layer dense model, 2 ms a
        step: 0.9 ms a step every 10 steps, 0.6 ms of it for taking the weights and optimizer state).
        """
        hooked_step = vars(model)["train_step"]
        self._plain = True
        model.train_step = self._original_train_step
        try:
            model.make_train_function(force=True)
            plain = model.train_function
        finally:
            model.train_step = hooked_step
            self._plain = False
        model.make_train_function(force=True)
        hooked = model.train_function
        recorder = self.recorder

        def train_function(state: Any, data: Any) -> Any:
            steps = max(1, int(getattr(model, "steps_per_execution", 1) or 1))  # steps one execution may run
            if recorder.guard is not None or (recorder.enabled and any(recorder.logged(self.next_step + i)
                                                                        for i in range(steps))):
                return hooked(state, data)
            self._plain = True  # the plain step may trace now: the optimizer's hook steps aside
            try:
                return plain(state, data)
            finally:
                self._plain = False

        return train_function

    def _install(self, model: Any, optimizer: Any) -> None:
        original_apply = optimizer.stateless_apply
        original_train_step = model.train_step
        original_metrics = model._update_metrics_variables
        original_make_function = model._make_function
        owners = layer_paths(model)

        def stateless_apply(optimizer_variables: Any, grads: Any, trainable_variables: Any) -> Any:
            if self._plain:
                return original_apply(optimizer_variables, grads, trainable_variables)
            return self._stateless_apply(optimizer, original_apply, owners, optimizer_variables, grads,
                                         trainable_variables)

        def update_metrics_variables(metrics_variables: Any, unscaled_loss: Any, *args: Any, **kwargs: Any) -> Any:
            if self._traced is not None:
                self._traced.loss = unscaled_loss
            return original_metrics(metrics_variables, unscaled_loss, *args, **kwargs)

        def train_step(state: Any, data: Any) -> Any:
            self._traced = None
            try:
                logs, state = original_train_step(state, data)
                if self._traced is not None and isinstance(logs, dict):
                    logs = {**logs, _KEY: self._emit(self._traced)}
            finally:
                self._traced = None
            return logs, state

        def make_function(step_function: Any, *args: Any, **kwargs: Any) -> Any:
            if self._plain:  # the model's own step: only counted
                def plain_step(state: Any, data: Any) -> Any:
                    out = step_function(state, data)
                    self.next_step += 1
                    return out

                return original_make_function(plain_step, *args, **kwargs)

            def step(state: Any, data: Any) -> Any:
                logs, state = step_function(state, data)
                if isinstance(logs, dict) and _KEY in logs:
                    logs = dict(logs)
                    self._collect(logs.pop(_KEY))
                return logs, state

            return original_make_function(step, *args, **kwargs)

        self._model, self._optimizer = model, optimizer
        self._original_train_step = original_train_step
        self._patches.set(optimizer, "stateless_apply", stateless_apply)
        self._patches.set(model, "_update_metrics_variables", update_metrics_variables)
        self._patches.set(model, "train_step", train_step)
        self._patches.set(model, "_make_function", make_function)

    def detach(self) -> None:
        """Restore the wrapped methods; the model's train function is made again without the hooks."""
        model = self._model
        self._patches.restore()
        if model is not None and self._hooked_function is not None and model.train_function is self._hooked_function:
            model.make_train_function(force=True)
        self._model = self._optimizer = self._hooked_function = None
        self._plans.clear()
        self._plan_list.clear()
        self._pending.clear()

    # ------------------------------------------------------------------------------------------------ traced code

    def _plan(self, optimizer: Any, owners: dict[int, str]) -> _Plan:
        variables = list(optimizer._trainable_variables)
        key = tuple(id(v) for v in variables)
        plan = self._plans.get(key)
        if plan is None:
            layers, groups = group_by_layer(variables, owners)
            index = {id(v): i for i, v in enumerate(optimizer.variables)}
            iterations = index[id(optimizer.iterations)]
            found = moment_variables(optimizer, variables)
            moments = None if found is None else tuple([index[id(m)] for m in ms] for ms in found)
            plan = self._plans[key] = _Plan(len(self._plan_list), layers, groups, iterations, moments)
            self._plan_list.append(plan)
        return plan

    def _stateless_apply(self, optimizer: Any, original: Any, owners: dict[int, str], optimizer_variables: Any,
                         grads: Any, trainable_variables: Any) -> Any:
        import jax
        import jax.numpy as jnp
        import keras
        from jax.experimental import io_callback

        plan = self._plan(optimizer, owners)
        optimizer_variables, grads = list(optimizer_variables), list(grads)
        trainable_variables = list(trainable_variables)
        with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_variables, strict=True))):
            lr = jnp.asarray(keras.ops.convert_to_tensor(optimizer.learning_rate), jnp.float32)
        iterations = jnp.asarray(optimizer_variables[plan.iterations], jnp.int32)
        if self.recorder.guard is None:
            step = iterations
            new_vars, new_opt = original(optimizer_variables, grads, trainable_variables)
        else:
            shapes = (jax.ShapeDtypeStruct((), jnp.bool_), jax.ShapeDtypeStruct((), jnp.int32))
            skip, step = io_callback(functools.partial(self._judge, plan), shapes, iterations, lr,
                                     _reductions(grads, count=True), ordered=True)
            new_vars, new_opt = jax.lax.cond(
                skip, lambda: (trainable_variables, optimizer_variables),
                lambda: tuple(map(list, original(optimizer_variables, grads, trainable_variables))))
        self._traced = _Traced(plan, step, lr, grads, trainable_variables, list(new_vars), list(new_opt))
        return new_vars, new_opt

    def _emit(self, t: _Traced) -> dict[str, Any]:
        """A logged step's statistics reduced on the device (zeros on other steps, which compute nothing)."""
        import jax
        import jax.numpy as jnp

        rec = self.recorder
        logged = t.step % rec.every == 0
        hist_step = jnp.asarray(False)
        if rec.histograms_every:
            hist_step = t.step % rec.histograms_every == 0
            logged = logged | hist_step
        loss = jnp.asarray(math.nan if t.loss is None else t.loss, jnp.float32)
        n_hist = len(t.plan.groups) * fmt.HIST_BINS if rec.histograms_every else 0
        moments = t.plan.moments
        rows = 9 + (6 if moments is not None else 0)

        def reduce() -> tuple[Any, Any]:
            parts = [_reductions(t.grads, count=True), _reductions(t.before),
                     _reductions([a - b for a, b in zip(t.after, t.before, strict=True)])]
            if moments is not None:
                parts += [_reductions([t.optimizer_after[i] for i in idxs]) for idxs in moments]
            counts = jnp.zeros([n_hist], jnp.int32)
            if rec.histograms_every:
                counts = jax.lax.cond(hist_step, lambda: _histogram(t.grads, t.plan.groups).astype(jnp.int32),
                                      lambda: counts)
            return jnp.concatenate(parts).astype(jnp.float32), counts

        def nothing() -> tuple[Any, Any]:
            return jnp.zeros([rows, len(t.grads)], jnp.float32), jnp.zeros([n_hist], jnp.int32)

        stats, counts = jax.lax.cond(logged, reduce, nothing)
        return {"plan": jnp.asarray(t.plan.index, jnp.int32), "has_loss": jnp.asarray(t.loss is not None),
                "step": jnp.asarray(t.step, jnp.int32), "loss": loss, "lr": t.lr, "stats": stats, "counts": counts}

    # ------------------------------------------------------------------------------------------------- host side

    def _judge(self, plan: _Plan, iterations: Any, lr: Any, g: Any) -> tuple[np.bool_, np.int32]:
        step = int(iterations) + self.held
        g = np.asarray(g, np.float64)
        groups = plan.groups
        skip = self.recorder.judge(step, plan.layers, layer_norms(g[0], g[1], groups), layer_max(g[0], groups),
                                   layer_sum(g[2], groups), float(lr))
        if skip:
            self.held += 1
        return np.bool_(skip), np.int32(step)

    def _collect(self, row: dict[str, Any]) -> None:
        """After each execution of the step (no wait): keep a logged step's statistics, still on the device."""
        step = self.next_step
        self.next_step += 1
        if self.recorder.enabled and self.recorder.logged(step):
            self._pending.append(row)

    def flush(self) -> None:
        """Read and write the statistics of the logged steps run so far (waits for them to finish), in step order."""
        import jax

        with self._read_lock:  # batch ends may run on several threads at once (Keras' asynchronous callbacks)
            while self._pending:
                row = jax.device_get(self._pending.popleft())  # one transfer call for all of the step's arrays
                self._write(self._plan_list[int(row["plan"])], row)

    def _write(self, plan: _Plan, row: dict[str, np.ndarray]) -> None:
        s = np.asarray(row["stats"], np.float64)
        groups = plan.groups
        moments = None
        if plan.moments is not None:
            moments = (layer_norms(s[9], s[10], groups), layer_norms(s[12], s[13], groups))
        counts = row["counts"]
        self.recorder.write(
            int(row["step"]), plan.layers, grad_norm=layer_norms(s[0], s[1], groups),
            param_norm=layer_norms(s[3], s[4], groups), update_norm=layer_norms(s[6], s[7], groups),
            grad_max_abs=layer_max(s[0], groups), nonfinite_count=layer_sum(s[2], groups), lr=float(row["lr"]),
            loss=float(row["loss"]) if bool(row["has_loss"]) else None, counts=counts if counts.size else None,
            moments=moments)
