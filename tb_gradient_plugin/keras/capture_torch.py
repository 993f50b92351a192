"""Capture on Keras' torch backend: the gradients of the backward pass, at the optimizer's ``apply``.

Keras' torch ``train_step`` runs eagerly: ``loss.backward()``, then ``optimizer.apply(grads, variables)`` with each
variable's ``.grad``. Wrapping ``apply`` (and ``scale_loss``, which receives the batch loss) on the optimizer instance
sees exactly the gradients ``fit`` applies. Unlogged steps cost a Python modulo; a logged step reduces every gradient,
weight, update (and Adam moment) with a few fused multi-tensor ops (``torch._foreach_norm``, sums of squares in
float64) and moves one small tensor to the host. The guard judges the step before ``apply`` is called, so a step it
skips is never applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import format as fmt
from .host import StepRecorder, layer_max, layer_sum, norms_to_layers
from .layers import group_by_layer, layer_paths
from .moments import moment_variables
from .patching import Patches

__all__ = ["TorchCapture"]



def _norms(tensors: list[Any]) -> Any:
    """Per tensor, the L2 norm with its squares summed in float64 (no float32 overflow), on the device."""
    import torch

    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))


def _grad_stats(grads: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per gradient: L2 norm, max|g| and non-finite count, in float64 on the host (one transfer; the counts, zero
    whenever the norm is finite, cost a second one only on a step with non-finite entries)."""
    import torch

    grads = [g.detach() for g in grads]
    live = [g for g in grads if g.numel()]
    maxes = torch.stack(torch._foreach_max(torch._foreach_abs(live))).to(torch.float64) if live else None
    norms = _norms(grads)
    host = torch.cat([norms] if maxes is None else [norms, maxes]).cpu().numpy()
    norm = host[:len(grads)]
    it = iter(host[len(grads):])
    gmax = np.array([next(it) if g.numel() else 0.0 for g in grads], np.float64)
    nonfinite = np.zeros(len(grads))
    for i in np.flatnonzero(~np.isfinite(norm)):
        nonfinite[i] = float((~torch.isfinite(grads[i])).sum())
    return norm, gmax, nonfinite


class TorchCapture:
    """Wraps one optimizer's ``apply`` and ``scale_loss``; counts steps on the host (skipped ones included)."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder
        self.step: int | None = None  # the next step's number
        self._optimizer: Any = None
        self._patches = Patches()
        self._loss: Any = None
        self._grouped_key: tuple[int, ...] = ()
        self._grouped: tuple[list[str], list[list[int]]] = ([], [])

    def attach(self, model: Any, optimizer: Any) -> None:
        if self.step is None:
            self.step = int(optimizer.iterations)
        if optimizer is self._optimizer:
            return
        self.detach()
        original_apply, original_scale_loss = optimizer.apply, optimizer.scale_loss
        owners = layer_paths(model)

        def scale_loss(loss: Any) -> Any:
            self._loss = loss
            return original_scale_loss(loss)

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            return self._apply(optimizer, original_apply, owners, grads, trainable_variables)

        self._optimizer = optimizer
        self._patches.set(optimizer, "scale_loss", scale_loss)
        self._patches.set(optimizer, "apply", apply)

    def detach(self) -> None:
        self._patches.restore()
        self._optimizer = None
        self._grouped_key = ()

    def _apply(self, optimizer: Any, original_apply: Any, owners: dict[int, str], grads: Any, variables: Any) -> Any:
        import torch

        rec = self.recorder
        if not rec.enabled:
            return original_apply(grads, variables)
        step = self.step
        self.step += 1
        listed = list(optimizer._trainable_variables if variables is None else variables)
        pairs = [(g, v) for g, v in zip(grads, listed, strict=True) if g is not None]
        logged = rec.logged(step)
        if not pairs or not (logged or rec.guard is not None):
            self._loss = None
            return original_apply(grads, variables)
        live_grads = [g for g, _ in pairs]
        live_vars = [v for _, v in pairs]
        layers, groups = self._layers(live_vars, owners)
        lr = float(optimizer.learning_rate)
        g_norm, g_max, g_nonfinite = _grad_stats(live_grads)
        grad_norm, grad_max = norms_to_layers(g_norm, groups), layer_max(g_max, groups)
        nonfinite = layer_sum(g_nonfinite, groups)
        skip = rec.judge(step, layers, grad_norm, grad_max, nonfinite, lr)
        if rec.error is not None:
            self._loss = None
            rec.raise_pending()
        with torch.no_grad():
            before = torch._foreach_mul([v.value for v in live_vars], 1.0) if logged else None
            result = None if skip else original_apply(grads, variables)
            if logged:
                after = [v.value.detach() for v in live_vars]
                parts = [_norms(before), _norms(torch._foreach_sub(after, before))]
                moments = moment_variables(optimizer, live_vars)
                if moments is not None:
                    parts += [_norms([m.value.detach() for m in ms]) for ms in moments]
                n = len(live_vars)
                host = torch.cat(parts).cpu().numpy().reshape(-1, n)
                counts = None
                if rec.hist_step(step):
                    counts = np.stack([
                        sum(fmt.histogram_counts(live_grads[i].detach().to(torch.float64).cpu().numpy())
                            for i in idxs)
                        for idxs in groups])
                loss = None if self._loss is None else float(self._loss.detach())
                rec.write(step, layers, grad_norm=grad_norm, param_norm=norms_to_layers(host[0], groups),
                          update_norm=norms_to_layers(host[1], groups), grad_max_abs=grad_max,
                          nonfinite_count=nonfinite, lr=lr, loss=loss, counts=counts,
                          moments=None if moments is None else (norms_to_layers(host[2], groups),
                                                                norms_to_layers(host[3], groups)))
        self._loss = None
        return result

    def _layers(self, variables: list[Any], owners: dict[int, str]) -> tuple[list[str], list[list[int]]]:
        """The layers of a set of variables, grouped once per set (the same set comes back every step)."""
        key = tuple(id(v) for v in variables)
        if self._grouped_key != key:
            self._grouped_key, self._grouped = key, group_by_layer(variables, owners)
        return self._grouped
