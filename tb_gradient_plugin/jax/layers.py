"""Which leaves of a JAX parameter tree are monitored, and under which layer names.

A layer is a parameter tree path without its leaf name: ``params.Dense_0`` for the ``kernel`` and ``bias`` of a Flax
Linen ``Dense``, ``layers.0`` for an NNX ``nnx.List`` entry. NNX ``Variable`` wrappers (a trailing ``.value``) are
looked through, so ``nnx.state(model, nnx.Param)`` and its pure form give the same names. Only floating-point leaves are
monitored: integer, boolean and ``float0`` leaves (step counters, masks, the gradients of integer inputs) have no
gradient norm and are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

__all__ = ["ROOT_LAYER", "Layout", "discover_layers"]

ROOT_LAYER = "(root)"
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Layout:
    """How the flattened leaves of one tree structure map to layers (computed once per structure, at trace time)."""

    layers: tuple[str, ...]
    leaf_layer: tuple[int, ...]  # per flattened leaf: its layer's index, or -1 when the leaf is not monitored
    skipped: tuple[str, ...]  # paths of the leaves skipped for their dtype
    treedef: Any

    @property
    def monitored(self) -> list[int]:
        """Indices of the monitored leaves, in flattening order."""
        return [i for i, k in enumerate(self.leaf_layer) if k >= 0]


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _natural(name: str) -> tuple:
    """``Dense_10`` after ``Dense_2``: digit runs compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(name) if p)


def _order_key(tree: Any, path: tuple) -> tuple:
    """Where a leaf comes in the model: a plain dict's own (insertion) order where the tree still has it (Flax Linen
    creates its parameter dicts in call order), else the keys' natural order. A dict whose order is exactly the sorted
    one may have been rebuilt by jax (which flattens dicts sorted by key, ``Dense_10`` before ``Dense_2``): natural
    order then."""
    node: Any = tree
    out = []
    for key in path:
        natural = (1, 0, _natural(_key_name(key)))
        if type(node) is dict and hasattr(key, "key") and key.key in node:
            keys = list(node)
            try:
                rebuilt = keys == sorted(keys)
            except TypeError:  # keys of mixed types: not something jax sorted
                rebuilt = False
            out.append(natural if rebuilt else (0, keys.index(key.key), ()))
            node = node[key.key]
        else:
            out.append(natural)
            node = None
    return tuple(out)


def _is_float_array(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
        return False
    return np.dtype(dtype).kind == "f" and np.dtype(dtype) != jax.dtypes.float0


def discover_layers(
    tree: Any,
    *,
    include: str | None = None,
    exclude: str | None = None,
    group_depth: int | None = None,
    group_by: Callable[[str], str] | None = None,
) -> Layout:
    """The layers of a parameter (or gradient) tree, in model order.

    ``include`` / ``exclude`` are regular expressions searched in the layer name; ``group_depth`` keeps only the first N
    dotted components (``params.encoder``) and ``group_by`` maps a name to its group, as in the PyTorch monitor.
    Raises ``ValueError`` when the tree has no floating-point array leaf (or none the filters keep).
    """
    if group_depth is not None and group_by is not None:
        raise ValueError("pass at most one of group_depth and group_by")
    if group_depth is not None and (isinstance(group_depth, bool) or not isinstance(group_depth, int)
                                    or group_depth < 1):
        raise ValueError(f"group_depth must be a positive integer, got {group_depth!r}")
    inc = re.compile(include) if include is not None else None
    exc = re.compile(exclude) if exclude is not None else None
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not any(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for _, leaf in paths_leaves):
        raise ValueError("the parameter tree has no array leaves: nothing to monitor (pass the tree of parameters "
                         "the optimizer updates, e.g. variables['params'] or nnx.state(model, nnx.Param))")
    skipped: list[str] = []
    named: list[tuple[tuple, int, str]] = []  # (model order, leaf index, layer name)
    for i, (path, leaf) in enumerate(paths_leaves):
        keys = list(path)
        while keys and _key_name(keys[-1]) == "value" and type(keys[-1]).__name__ == "GetAttrKey":
            keys.pop()  # an NNX Variable's value: the variable is the leaf
        dotted = ".".join(_key_name(k) for k in keys)
        if not _is_float_array(leaf):
            skipped.append(dotted or ROOT_LAYER)
            continue
        name = ".".join(_key_name(k) for k in keys[:-1]) or ROOT_LAYER
        if (inc is not None and not inc.search(name)) or (exc is not None and exc.search(name)):
            continue
        if group_by is not None:
            name = str(group_by(name))
        elif group_depth is not None and name != ROOT_LAYER:
            name = ".".join(name.split(".")[:group_depth])
        named.append((_order_key(tree, tuple(path)), i, name))
    if not named:
        if skipped and len(skipped) == len(paths_leaves):
            raise ValueError(f"the parameter tree has no floating-point leaves ({len(skipped)} integer or boolean "
                             f"leaves, e.g. {skipped[0]!r}, are skipped): nothing to monitor")
        raise ValueError("no parameter matches the include/exclude filters: nothing to monitor")
    layers: list[str] = []
    index: dict[str, int] = {}
    leaf_layer = [-1] * len(paths_leaves)
    for _, i, name in sorted(named, key=lambda t: t[0]):
        if name not in index:
            index[name] = len(layers)
            layers.append(name)
        leaf_layer[i] = index[name]
    return Layout(tuple(layers), tuple(leaf_layer), tuple(skipped), treedef)
