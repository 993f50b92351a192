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
  the device and sends them to the host in one ordered ``jax.debug.callback``. Unlogged steps compute nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import format as fmt
from .host import StepRecorder, layer_max, layer_norms, layer_sum
from .layers import group_by_layer, layer_paths
from .patching import Patches
from .stats import _BIN_OF_LOG, _bin_tops

__all__ = ["JaxCapture"]



@dataclass
class _Plan:
    """Static facts of one trace: the layers, the variables each owns, where ``iterations`` sits in the state."""

    layers: list[str]
    groups: list[list[int]]
    iterations: int


@dataclass
class _Traced:
    """Values of the step being traced, handed from ``stateless_apply`` to ``train_step`` (same trace)."""

    plan: _Plan
    step: Any
    lr: Any
    grads: list[Any]
    before: list[Any]
    after: list[Any]
    loss: Any = None


def _reductions(arrays: list[Any]) -> Any:
    """Per array: max|x|, sum((x / max|x|)**2) (no float32 overflow) and the non-finite count: ``[3, n]``."""
    import jax.numpy as jnp

    rows = []
    for x in arrays:
        a = jnp.abs(x.astype(jnp.float32) if x.dtype != jnp.float64 else x).reshape(-1)
        m = jnp.max(a) if a.size else jnp.zeros((), a.dtype)
        safe = jnp.where(jnp.isfinite(m) & (m > 0), m, jnp.ones_like(m))
        rows.append(jnp.stack([m, jnp.sum(jnp.square(a / safe)), jnp.sum(~jnp.isfinite(a)).astype(a.dtype)]))
    return jnp.stack(rows, 1)


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
        self._traced: _Traced | None = None

    def attach(self, model: Any, optimizer: Any) -> None:
        if optimizer is not self._optimizer or model is not self._model:
            self.detach()
            self._install(model, optimizer)
        if model.train_function is None or model.train_function is not self._hooked_function:
            model.make_train_function(force=True)
            self._hooked_function = model.train_function

    def _install(self, model: Any, optimizer: Any) -> None:
        original_apply = optimizer.stateless_apply
        original_train_step = model.train_step
        original_metrics = model._update_metrics_variables
        owners = layer_paths(model)

        def stateless_apply(optimizer_variables: Any, grads: Any, trainable_variables: Any) -> Any:
            return self._stateless_apply(optimizer, original_apply, owners, optimizer_variables, grads,
                                         trainable_variables)

        def update_metrics_variables(metrics_variables: Any, unscaled_loss: Any, *args: Any, **kwargs: Any) -> Any:
            if self._traced is not None:
                self._traced.loss = unscaled_loss
            return original_metrics(metrics_variables, unscaled_loss, *args, **kwargs)

        def train_step(state: Any, data: Any) -> Any:
            self._traced = None
            try:
                result = original_train_step(state, data)
                if self._traced is not None:
                    self._emit(self._traced)
            finally:
                self._traced = None
            return result

        self._model, self._optimizer = model, optimizer
        self._patches.set(optimizer, "stateless_apply", stateless_apply)
        self._patches.set(model, "_update_metrics_variables", update_metrics_variables)
        self._patches.set(model, "train_step", train_step)

    def detach(self) -> None:
        """Restore the wrapped methods; the model's train function is made again without the hooks."""
        model = self._model
        self._patches.restore()
        if model is not None and self._hooked_function is not None and model.train_function is self._hooked_function:
            model.make_train_function(force=True)
        self._model = self._optimizer = self._hooked_function = None
        self._plans.clear()

    # ------------------------------------------------------------------------------------------------ traced code

    def _plan(self, optimizer: Any, owners: dict[int, str]) -> _Plan:
        variables = list(optimizer._trainable_variables)
        key = tuple(id(v) for v in variables)
        plan = self._plans.get(key)
        if plan is None:
            layers, groups = group_by_layer(variables, owners)
            iterations = next(i for i, v in enumerate(optimizer.variables) if v is optimizer.iterations)
            plan = self._plans[key] = _Plan(layers, groups, iterations)
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
                                                      _reductions(grads), ordered=True)
            new_vars, new_opt = jax.lax.cond(
                skip, lambda: (trainable_variables, optimizer_variables),
                lambda: tuple(map(list, original(optimizer_variables, grads, trainable_variables))))
        self._traced = _Traced(plan, step, lr, grads, trainable_variables, list(new_vars))
        return new_vars, new_opt

    def _emit(self, t: _Traced) -> None:
        """On a logged step, reduce everything on the device and send it to the host in one ordered callback."""
        import jax
        import jax.numpy as jnp

        rec = self.recorder
        logged = t.step % rec.every == 0
        hist_step = jnp.asarray(False)
        if rec.histograms_every:
            hist_step = t.step % rec.histograms_every == 0
            logged = logged | hist_step
        loss = jnp.asarray(math.nan if t.loss is None else t.loss, jnp.float32)
        n_hist = len(t.plan.groups) * fmt.HIST_BINS

        def send(grads: list[Any], before: list[Any], after: list[Any]) -> None:
            g, p = _reductions(grads), _reductions(before)
            u = _reductions([a - b for a, b in zip(after, before, strict=True)])
            counts = jnp.zeros([n_hist if rec.histograms_every else 0], jnp.int32)
            if rec.histograms_every:
                counts = jax.lax.cond(hist_step, lambda: _histogram(grads, t.plan.groups).astype(jnp.int32),
                                      lambda: jnp.zeros([n_hist], jnp.int32))
            jax.debug.callback(functools.partial(self._write, t.plan, t.loss is not None), t.step, loss, t.lr,
                               jnp.concatenate([g, p, u]), counts, ordered=True)

        jax.lax.cond(logged, send, lambda *_: None, t.grads, t.before, t.after)

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

    def _write(self, plan: _Plan, has_loss: bool, step: Any, loss: Any, lr: Any, stats: Any, counts: Any) -> None:
        s = np.asarray(stats, np.float64)
        groups = plan.groups
        self.recorder.write(
            int(step), plan.layers, grad_norm=layer_norms(s[0], s[1], groups),
            param_norm=layer_norms(s[3], s[4], groups), update_norm=layer_norms(s[6], s[7], groups),
            grad_max_abs=layer_max(s[0], groups),
            nonfinite_count=layer_sum(s[2], groups), lr=float(lr), loss=float(loss) if has_loss else None,
            counts=np.asarray(counts) if counts.size else None)
