"""Adam's moments in an Optax state: found by structure, so any chain, wrapper or optimizer that keeps them qualifies.

The second moment lags the gradient it averages, so its norm is an early warning of the step size collapsing or
exploding; the PyTorch monitor records the same two norms from ``exp_avg`` / ``exp_avg_sq``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from .layers import _key_name

__all__ = ["adam_moments"]


def _keeps_moments(node: Any) -> bool:
    """An optimizer state with a first and second moment (``ScaleByAdamState``, ``ScaleByBeliefState``, ...)."""
    return not isinstance(node, jax.Array) and hasattr(node, "mu") and hasattr(node, "nu")


def _is_masked(node: Any) -> bool:
    return isinstance(node, optax.MaskedNode)


def _path(path: tuple) -> tuple[str, ...]:
    """A tree path as names, an NNX Variable's trailing ``.value`` dropped (the state may wrap what the updates
    don't)."""
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value" and type(path[-1]).__name__ == "GetAttrKey":
        names.pop()
    return tuple(names)


def _aligned(tree: Any, like: list[tuple[tuple[str, ...], Any]]) -> list[Any] | None:
    """The leaves of ``tree`` one per (path, leaf) of the updates in ``like`` (None where ``optax.masked`` left that
    part out: a ``MaskedNode`` stands for a whole subtree), or None when the tree is not shaped like the parameters."""
    found = {_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)[0]}
    out = []
    for path, ref in like:
        leaf = found.get(path)
        if leaf is None:
            if not any(_is_masked(found.get(path[:k])) for k in range(len(path))):
                return None
            out.append(None)
        elif _is_masked(leaf):
            out.append(None)
        elif getattr(leaf, "shape", None) == getattr(ref, "shape", ()):
            out.append(leaf)
        else:
            return None
    return out


def adam_moments(inner_state: Any, updates: Any) -> tuple[list[Any | None], list[Any | None]] | None:
    """Per leaf of the ``updates`` tree (in flattening order), the first and second moment the wrapped chain keeps
    for it (None where none does), or None when the chain keeps no moments shaped like the parameters (SGD, ...).

    States are found anywhere in the chain (``chain``, ``inject_hyperparams``, ``masked``, ``multi_transform``): any
    state with ``mu`` and ``nu`` trees shaped like the parameters (Adam, AdamW, LAMB, AdaBelief, ...). Each leaf takes
    its moments from the first state that keeps them for it, so the partitions of a ``multi_transform`` combine.
    """
    leaves = [(_path(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]]
    firsts: list[Any | None] = [None] * len(leaves)
    seconds: list[Any | None] = [None] * len(leaves)
    seen = False
    for node in jax.tree_util.tree_leaves(inner_state, is_leaf=_keeps_moments):
        if not _keeps_moments(node):
            continue
        mu, nu = _aligned(node.mu, leaves), _aligned(node.nu, leaves)
        if mu is None or nu is None:
            continue
        for i, (m, v) in enumerate(zip(mu, nu, strict=True)):
            if firsts[i] is None and m is not None and v is not None:
                firsts[i], seconds[i] = m, v
                seen = True
    return (firsts, seconds) if seen else None
