"""Capture on Keras' torch backend: the gradients of the backward pass, at the optimizer's ``apply``.

Keras' torch ``train_step`` runs eagerly: ``loss.backward()``, then ``optimizer.apply(grads, variables)`` with each
variable's ``.grad``. Wrapping ``apply`` (and ``scale_loss``, which receives the batch loss) on the optimizer instance
sees exactly the gradients ``fit`` applies. Unlogged steps cost a Python modulo; a logged step reduces every gradient,
weight and update on the device (float64) and moves one small tensor to the host. The guard judges the step before
``apply`` is called, so a step it skips is never applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import format as fmt
from .host import StepRecorder, layer_max, layer_norms, layer_sum
from .layers import group_by_layer, layer_paths
from .patching import Patches

__all__ = ["TorchCapture"]



def _reductions(tensors: list[Any]) -> Any:
    """Per tensor: max|x|, sum((x / max|x|)**2) and the non-finite count, as one float64 ``[3, n]`` host array."""
    import torch

    rows = []
    for t in tensors:
        a = t.detach().to(torch.float64).abs()
        m = a.max() if a.numel() else torch.zeros((), dtype=torch.float64, device=a.device)
        safe = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
        rows.append(torch.stack([m, torch.square(a / safe).sum(), (~torch.isfinite(a)).sum().to(torch.float64)]))
    return torch.stack(rows, 1).cpu().numpy()


class TorchCapture:
    """Wraps one optimizer's ``apply`` and ``scale_loss``; counts steps on the host (skipped ones included)."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder
        self.step: int | None = None  # the next step's number
        self._optimizer: Any = None
        self._patches = Patches()
        self._loss: Any = None

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
        layers, groups = group_by_layer(live_vars, owners)
        lr = float(optimizer.learning_rate)
        g = _reductions(live_grads)
        grad_norm, grad_max = layer_norms(g[0], g[1], groups), layer_max(g[0], groups)
        nonfinite = layer_sum(g[2], groups)
        skip = rec.judge(step, layers, grad_norm, grad_max, nonfinite, lr)
        if rec.error is not None:
            self._loss = None
            rec.raise_pending()
        before = [v.value.detach().clone() for v in live_vars] if logged else None
        result = None if skip else original_apply(grads, variables)
        if logged:
            with torch.no_grad():
                p = _reductions(before)
                u = _reductions([v.value.detach() - b for v, b in zip(live_vars, before, strict=True)])
            counts = None
            if rec.hist_step(step):
                counts = np.stack([
                    sum(fmt.histogram_counts(live_grads[i].detach().to(torch.float64).cpu().numpy()) for i in idxs)
                    for idxs in groups])
            loss = None if self._loss is None else float(self._loss.detach())
            rec.write(step, layers, grad_norm=grad_norm, param_norm=layer_norms(p[0], p[1], groups),
                      update_norm=layer_norms(u[0], u[1], groups), grad_max_abs=grad_max, nonfinite_count=nonfinite,
                      lr=lr, loss=loss, counts=counts)
        self._loss = None
        return result
