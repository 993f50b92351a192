"""Update norms ``||w_after - w_before||`` read from the optimizer's own state, without a copy of the weights.

For SGD, Adam and AdamW the step just taken is determined by what the optimizer keeps after it (momentum buffer,
moments, step count), the gradient and the weights after the step. Its norm then costs one read of the state it needs,
in pieces through one cache-sized buffer, where the copy costs a full weights copy (as much memory as the model) and
two more passes. Whatever this module cannot reproduce exactly (other optimizers, ``capturable`` / ``differentiable``,
tensor hyperparameters, a subclass's own ``step``, 16-bit weights, ...) is reported by :func:`unsupported_reason` so the
caller takes the copy instead; a hyperparameter changed while the step ran is caught after it
(:class:`UpdateModelError`).

The models, with ``w`` the weights after the step and ``buf`` the momentum buffer after it. Weight decay (SGD's, and
AdamW's decoupled one) acts on the weights *before* the step; they are solved for from ``w``:
``w_before = (w + lr * u) / (1 - lr * wd)`` where ``u`` is the rest of the step.

* SGD with momentum, not Nesterov: ``dw = -lr * buf`` (buf already holds gradient, weight decay and dampening).
* SGD otherwise: ``dw = -lr / (1 - lr * wd) * (s * g + momentum * buf + wd * w)``, ``s = -1`` under ``maximize``
  (``momentum * buf`` only with Nesterov).
* Adam / AdamW: ``u = m_hat / (sqrt(v_hat) + eps)`` from ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad)
  and each tensor's step count; Adam: ``dw = -lr * u`` (its L2 decay is inside the moments); decoupled decay (AdamW):
  ``dw = -lr / (1 - lr * wd) * (u + wd * w)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["StateUpdate", "UpdateModelError", "adam_moments", "hyperparameters", "unsupported_reason"]

#: Entries per piece: tensors are walked in flat pieces of this size through one buffer, on the CPU small enough to
#: stay in cache, on an accelerator large enough that the kernel launches per piece do not matter.
CHUNK_ELEMENTS = 1 << 18
DEVICE_CHUNK_ELEMENTS = 1 << 24
#: Tensors this small are copied before the step (see :class:`StateUpdate`).
SMALL_ELEMENTS = 4096

_HYPER = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize", "betas", "eps", "amsgrad",
          "decoupled_weight_decay")

try:  # DTensor (FSDP2): optimizer state of a sharded parameter is sharded like it.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]


class UpdateModelError(RuntimeError):
    """The state after the step does not determine the update exactly; the caller must not record a value."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _kind(optimizer: torch.optim.Optimizer) -> str | None:
    # Exact types only: a subclass may override ``step`` with an update this module does not know.
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    return None


def hyperparameters(optimizer: torch.optim.Optimizer) -> tuple:
    """The hyperparameters the update depends on, per parameter group: compared before and after the step to see
    that nothing changed them while it ran (then the state alone does not say which values the step used)."""
    return tuple(tuple(group.get(k) for k in _HYPER) for group in optimizer.param_groups)


def unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the coming step's update cannot be read from ``optimizer``'s state (``None``: it can)."""
    kind = _kind(optimizer)
    if kind is None:
        return f"{type(optimizer).__name__} is not SGD, Adam or AdamW"
    if isinstance(getattr(optimizer, "found_inf", None), torch.Tensor):
        return "a GradScaler drives this fused optimizer and may skip the step on the device"
    for group in optimizer.param_groups:
        if group.get("differentiable") or group.get("capturable"):
            return "differentiable or capturable optimizer"
        values = [group.get(k) for k in ("lr", "momentum", "dampening", "weight_decay", "eps")]
        values += list(group.get("betas", ()))
        if any(isinstance(v, torch.Tensor) for v in values):
            return "a hyperparameter is a tensor"
        for p in group["params"]:
            if p.is_complex():
                return "complex parameters"
            if p.dtype in (torch.float16, torch.bfloat16):
                return "16-bit weights: their rounding makes the applied update differ from the optimizer's"
            if p.grad is not None and p.grad.is_sparse:
                return "sparse gradients"
        if kind == "sgd" and group["nesterov"] and _sgd_foreach(group):
            return "Nesterov SGD with the foreach implementation rewrites the gradients in place"
    return None


def _sgd_foreach(group: dict) -> bool:
    """Whether SGD takes its multi-tensor path for this group (as ``torch.optim.sgd`` decides; non-CPU default)."""
    foreach, fused = group.get("foreach"), group.get("fused")
    if foreach is None and fused is None:
        return any(p.device.type != "cpu" for p in group["params"])
    return bool(foreach) and not fused


class StateUpdate:
    """One step's update norms from the optimizer's state: begun in the pre-step hook, finished in the post-step hook.

    Tensors of at most :data:`SMALL_ELEMENTS` entries (biases, norms, scalars) are copied instead: a copy of them
    costs nothing, and for so few entries the rounding of the weights themselves (which the copy sees and the state
    does not) need not average out.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, param_lists: Sequence[Sequence[torch.Tensor]]) -> None:
        self.optimizer = optimizer
        self.before = hyperparameters(optimizer)
        self.param_lists = [list(ps) for ps in param_lists]
        self.copies = [[_local(p.detach()).clone() if _local(p).numel() <= SMALL_ELEMENTS else None for p in ps]
                       for ps in self.param_lists]

    def finish(self, dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
        """Squared update norm of each parameter, per list given to the constructor: a ``dtype`` tensor on the
        parameters' device each. Raises :class:`UpdateModelError` where the state does not determine the update."""
        if hyperparameters(self.optimizer) != self.before:
            raise UpdateModelError("a hyperparameter (e.g. the learning rate) changed while the step ran")
        return [_update_sq(self.optimizer, ps, cs, dt)
                for ps, cs, dt in zip(self.param_lists, self.copies, dtypes, strict=True)]


def _update_sq(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], copies: list[torch.Tensor | None],
               dtype: torch.dtype) -> torch.Tensor:
    """A parameter without a gradient now was left alone by the step (these optimizers skip it, state included):
    its update is zero."""
    device = _local(params[0]).device
    out = torch.zeros(len(params), dtype=dtype, device=device)
    copied = [i for i, c in enumerate(copies) if c is not None]
    if copied:
        diff = torch._foreach_sub([copies[i] for i in copied], [_local(params[i].detach()) for i in copied])
        out[torch.tensor(copied, device=device)] = _norms_sq(diff, dtype)
    group_of = {id(p): k for k, group in enumerate(optimizer.param_groups) for p in group["params"]}
    members: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        if p.grad is not None and copies[i] is None:
            members.setdefault(group_of[id(p)], []).append(i)
    model = _sgd if _kind(optimizer) == "sgd" else _adam
    for k, idx in members.items():
        group = optimizer.param_groups[k]
        ps = [params[i] for i in idx]
        states = [optimizer.state.get(p) for p in ps]
        out[torch.tensor(idx, device=device)] = model(group, ps, states, dtype)
    return out


def _need(states: list[Any], key: str) -> list[torch.Tensor]:
    try:
        return [_local(s[key]) for s in states]
    except (KeyError, TypeError):
        raise UpdateModelError(f"optimizer state has no {key!r} after the step") from None


def _sgd(group: dict, params: list[torch.Tensor], states: list[Any], dtype: torch.dtype) -> torch.Tensor:
    lr, momentum, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
    if momentum != 0 and not group["nesterov"]:
        return _norms_sq(_need(states, "momentum_buffer"), dtype).mul_(lr * lr)
    grads = [_local(p.grad.detach()) for p in params]
    if momentum == 0 and wd == 0:
        return _norms_sq(grads, dtype).mul_(lr * lr)
    # ||s * g + momentum * buf + wd * w|| = ||g + s * momentum * buf + s * wd * w|| with s = -1 under maximize
    sign = -1.0 if group["maximize"] else 1.0
    lists = [grads]
    alphas = []
    if wd != 0:
        lists.append([_local(p.detach()) for p in params])
        alphas.append(sign * wd)
    if momentum != 0:
        lists.append(_need(states, "momentum_buffer"))
        alphas.append(sign * momentum)

    def kernel(out: torch.Tensor, pieces: list[torch.Tensor], _i: int) -> None:
        torch.add(pieces[0], pieces[1], alpha=alphas[0], out=out)
        if len(pieces) > 2:
            out.add_(pieces[2], alpha=alphas[1])

    coef = lr / (1.0 - lr * wd)
    return _piece_norms_sq(lists, kernel, dtype).mul_(coef * coef)


def _adam(group: dict, params: list[torch.Tensor], states: list[Any], dtype: torch.dtype) -> torch.Tensor:
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    beta1, beta2 = (float(b) for b in group["betas"])
    decoupled = bool(group.get("decoupled_weight_decay")) and wd != 0
    steps = _need(states, "step")
    m = _need(states, "exp_avg")
    v = _need(states, "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq")
    device = m[0].device
    # u = m_hat / (sqrt(v_hat) + eps) = c * m / (sqrt(v) + q * eps), with q = sqrt(1 - beta2^t), c = q / (1 - beta1^t)
    # per tensor (its own step count t), as torch computes the bias corrections.
    host = _host_steps(steps)
    if host is not None:
        if min(host) < 1:
            raise UpdateModelError("a parameter's step count is 0 after the step")
        q = [math.sqrt(1.0 - beta2**t) for t in host]
        c = torch.tensor([qi / (1.0 - beta1**t) for qi, t in zip(q, host, strict=True)], dtype=dtype, device=device)
        eps_q: list[Any] = [qi * eps for qi in q]
    else:  # step counts on the device (fused): per-tensor factors as 0-d device tensors, so nothing syncs
        t_dev = torch.stack([s.reshape(()) for s in steps]).to(dtype)
        q_dev = (1.0 - torch.pow(beta2, t_dev)).sqrt_()
        c = q_dev / (1.0 - torch.pow(beta1, t_dev))
        eps_q = list((q_dev * eps).to(m[0].dtype).unbind())
    if not decoupled:  # ||u|| = c * ||m / (sqrt(v) + q * eps)||
        def kernel(out: torch.Tensor, pieces: list[torch.Tensor], i: int) -> None:
            torch.sqrt(pieces[1], out=out)
            out.add_(eps_q[i])
            torch.div(pieces[0], out, out=out)

        return _piece_norms_sq([m, v], kernel, dtype).mul_(c.square()).mul_(lr * lr)

    # ||u + wd * w|| = wd * ||w + m / (k * (sqrt(v) + q * eps))||, k = wd / c: one pass over each of m, v and w
    k = (wd / c).tolist() if host is not None else list((wd / c).to(m[0].dtype).unbind())
    weights = [_local(p.detach()) for p in params]

    def kernel_decoupled(out: torch.Tensor, pieces: list[torch.Tensor], i: int) -> None:
        torch.sqrt(pieces[1], out=out)
        out.add_(eps_q[i])
        if isinstance(k[i], float):  # one pass less: addcdiv takes the factor as a number
            torch.addcdiv(pieces[2], pieces[0], out, value=1.0 / k[i], out=out)
        else:
            torch.addcdiv(pieces[2], pieces[0], out.mul_(k[i]), out=out)

    coef = lr * wd / (1.0 - lr * wd)
    return _piece_norms_sq([m, v, weights], kernel_decoupled, dtype).mul_(coef * coef)


def _host_steps(steps: list[torch.Tensor]) -> list[float] | None:
    """Step counts as Python floats where reading them is free (CPU tensors); None where it would sync."""
    if any(isinstance(s, torch.Tensor) and s.device.type != "cpu" for s in steps):
        return None
    return [float(s) for s in steps]


def _norms_sq(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).to(dtype).square_()


def _piece_norms_sq(lists: list[list[torch.Tensor]], kernel: Any, dtype: torch.dtype) -> torch.Tensor:
    """Per tensor ``i``, the sum over its flat pieces of ``||kernel(piece)||^2``, where ``kernel(out, pieces, i)``
    writes into one reused buffer of at most :data:`CHUNK_ELEMENTS` (:data:`DEVICE_CHUNK_ELEMENTS` on an
    accelerator) entries: that buffer is the only memory the computation takes, and on the CPU it stays in cache
    while the state streams through once."""
    first = lists[0]
    device = first[0].device
    size = CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    buffer = torch.empty(min(size, max(t.numel() for t in first)), dtype=first[0].dtype, device=device)
    norms: list[torch.Tensor] = []
    owners: list[int] = []
    for i in range(len(first)):
        tensors = [lst[i] for lst in lists]
        numel = tensors[0].numel()
        if numel == 0:
            continue
        if numel > size and all(t.is_contiguous() for t in tensors):
            flat = [t.view(-1) for t in tensors]
            pieces = [[f[j:j + size] for f in flat] for j in range(0, numel, size)]
        else:
            pieces = [tensors]
        for piece in pieces:
            n = piece[0].numel()
            out = buffer[:n].view(piece[0].shape) if n <= buffer.numel() else torch.empty_like(piece[0])
            kernel(out, piece, i)
            norms.append(torch.linalg.vector_norm(out, dtype=torch.float32))
            owners.append(i)
    result = torch.zeros(len(first), dtype=dtype, device=device)
    if norms:
        result.index_add_(0, torch.tensor(owners, device=device), torch.stack(norms).to(dtype).square_())
    return result


def adam_moments(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Adam's first and second moments (``exp_avg``, ``exp_avg_sq``) of each of ``params`` as the optimizer keeps
    them (the local shard of a sharded one), for their norms: an early warning, as the second moment lags the
    gradient it averages. A parameter without state yet contributes an empty tensor (norm 0); None where the
    optimizer keeps no such moments (SGD, ...). Any optimizer whose state has both keys qualifies (Adam, AdamW,
    NAdam, RAdam)."""
    firsts: list[torch.Tensor] = []
    seconds: list[torch.Tensor] = []
    seen = False
    for p in params:
        st = optimizer.state.get(p)
        m = st.get("exp_avg") if isinstance(st, dict) else None
        v = st.get("exp_avg_sq") if isinstance(st, dict) else None
        if isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor):
            seen = True
            firsts.append(_local(m))
            seconds.append(_local(v))
        else:
            empty = _local(p.detach()).new_zeros(0)
            firsts.append(empty)
            seconds.append(empty)
    return (firsts, seconds) if seen else None
