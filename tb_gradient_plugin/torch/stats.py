"""The device side of the monitor's statistics: per-tensor reductions, fused per device and dtype, summed into
per-layer values on the device (and over the shards of sharded tensors), never read on the host here.

Gradient statistics come from ``torch._foreach_norm`` per group of tensors, or, on a histogram step, from one pass per
gradient that bins its entries on the format's fixed log10|g| bins by a table lookup on their float32 bit patterns
(see :func:`_bin_table`) and gives its norm and max |g| from the same cache-sized pieces.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import format as fmt

__all__ = ["Group", "Plan", "grad_stats", "is_sharded", "local", "make_plan", "squared_norms", "stat_dtype",
           "to_layers"]

try:  # DTensor (FSDP2, tensor parallel) exists in every torch this supports, but not in stripped-down builds.
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = Shard = None  # type: ignore[assignment,misc]


def stat_dtype(device: torch.device) -> torch.dtype:
    """Sums of squares in float64 so a norm of 1e20 does not overflow; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor: its statistics then need every rank (a reduction over its shards)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (the tensor itself unless it is a DTensor)."""
    return t.to_local() if is_sharded(t) else t


def _shard_groups(t: torch.Tensor) -> tuple:
    """Process groups over which a DTensor is sharded (its norms must be reduced over them); empty otherwise."""
    if not is_sharded(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(dim) for dim, pl in enumerate(t.placements) if isinstance(pl, Shard))


@dataclass
class Group:
    """Tensors of one device / dtype / sharding, with the layer index of each (cached on the device)."""

    params: list[torch.Tensor]
    index: torch.Tensor
    pgs: tuple


@dataclass
class Plan:
    """How to reduce the monitored parameters that have gradients at this step."""

    present: np.ndarray  # bool [L]: layers with at least one gradient
    groups: list[Group]


def make_plan(params: Sequence[nn.Parameter], layer_of: Sequence[int], n_layers: int, key: tuple[bool, ...]) -> Plan:
    """Group the parameters whose ``key`` entry is true (those with a gradient) by device, dtypes and sharding."""
    present = np.zeros(n_layers, dtype=bool)
    buckets: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}
    for p, layer, has in zip(params, layer_of, key, strict=True):
        if not has:
            continue
        present[layer] = True
        here = local(p)
        pgs = _shard_groups(p)
        ts, ls = buckets.setdefault((here.device, p.grad.dtype, p.dtype, pgs), ([], []))
        ts.append(p)
        ls.append(layer)
    groups = [
        Group(ts, torch.tensor(ls, dtype=torch.long, device=k[0]), k[3]) for k, (ts, ls) in buckets.items()
    ]
    return Plan(present, groups)


def squared_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Squared L2 norm per tensor (one fused kernel), in the statistics dtype of ``device``."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).to(stat_dtype(device)).square_()


def to_layers(per_tensor: torch.Tensor, group: Group, n_layers: int, *, amax: bool = False) -> torch.Tensor:
    """Per-tensor values summed into per-layer ones (max with ``amax``), then over the shards where sharded."""
    out = torch.zeros(n_layers, dtype=per_tensor.dtype, device=group.index.device)
    if amax:
        out.scatter_reduce_(0, group.index, per_tensor, "amax")
    else:
        out.index_add_(0, group.index, per_tensor)
    for pg in group.pgs:
        op = torch.distributed.ReduceOp.MAX if amax else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(out, op=op, group=pg)
    return out


def grad_stats(group: Group, scale: torch.Tensor | None, n_layers: int, *, norms: bool,
               hist: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The gradient statistics of one group, divided by the loss scale ``scale``: with ``norms``, per tensor
    ``grad_sq``, ``grad_max`` and ``nonfinite`` (statistics dtype); with ``hist``, the per-layer histogram counts
    (int64 ``[n_layers, HIST_BINS]``, summed over shards)."""
    grads = [_grad_entries(p) for p in group.params]
    dev = group.index.device
    dt = stat_dtype(dev)
    inv = None if scale is None else scale.to(dev, dt).reciprocal().reshape(())
    if hist:
        # One pass per gradient gives its counts and, with norms, its norm and max |g| too.
        passes = [_hist_pass(t, inv, norms) for t in grads]
        counts = torch.stack([c for c, _, _ in passes])
        implicit = [local(p.grad).numel() - t.numel() for p, t in zip(group.params, grads, strict=True)]
        if any(implicit):  # a sparse gradient's entries it does not store are zeros
            counts[:, fmt.HIST_ZERO] += torch.tensor(implicit, device=counts.device)
        per_tensor: dict[str, torch.Tensor] = {}
        if norms:
            per_tensor = {"grad_sq": torch.stack([sq for _, sq, _ in passes]).to(dt),
                          "grad_max": torch.stack([m for _, _, m in passes]).to(dt),
                          "nonfinite": counts[:, fmt.HIST_NONFINITE].to(dt)}
        layer_counts = torch.zeros(n_layers, fmt.HIST_BINS, dtype=torch.int64, device=dev)
        layer_counts.index_add_(0, group.index, counts)
        for pg in group.pgs:
            torch.distributed.all_reduce(layer_counts, group=pg)
        return per_tensor, layer_counts
    if not norms:
        return {}, None
    # Scaled gradients are huge by design: their squares overflow float32, so accumulate in float64.
    acc = torch.float32 if inv is None else dt
    norm = torch.stack(torch._foreach_norm(grads, 2, dtype=acc)).to(dt)
    maxes = _max_abs(grads, acc).to(dt)
    if inv is not None:
        norm, maxes = norm * inv, maxes * inv
    bad = _nonfinite_counts(grads, maxes).to(dt)
    return {"grad_sq": norm.square_(), "grad_max": maxes, "nonfinite": bad}, None


def _grad_entries(p: torch.Tensor) -> torch.Tensor:
    """The gradient entries the statistics read: a sparse gradient's stored values, summed where an index repeats
    (every other entry is zero, which changes no norm, max or count of non-finite values)."""
    grad = local(p.grad.detach())
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
    dt = stat_dtype(grad.device)
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

