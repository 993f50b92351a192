"""Which Keras layers are monitored, and under which names.

A layer is a Keras layer that owns variables directly, named by its path in the model (``encoder/dense_1``); the
variables of a layer are grouped so that its statistics are one value per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

__all__ = ["group_by_layer", "layer_paths"]


def layer_paths(model: keras.Model) -> dict[int, str]:
    """``id(variable)`` -> path of the layer that owns it directly, relative to the model (``encoder/dense_1``)."""
    owners: dict[int, str] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(model, "")]
    while stack:
        layer, path = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        for var in list(layer._trainable_variables) + list(layer._non_trainable_variables):
            owners.setdefault(id(var), path or model.name)
        children = list(getattr(layer, "_layers", []))
        for child in reversed(children):  # reversed: the stack pops them in model order
            stack.append((child, f"{path}/{child.name}" if path else child.name))
    return owners


def group_by_layer(variables: Sequence[Any], owners: dict[int, str]) -> tuple[list[str], list[list[int]]]:
    """Layer names in first-seen (model) order, and the indices of ``variables`` each layer owns."""
    names: list[str] = []
    groups: list[list[int]] = []
    index: dict[str, int] = {}
    for i, var in enumerate(variables):
        name = owners.get(id(var))
        if name is None:  # a variable not owned by any layer of the model: name it after its own path
            name = str(getattr(var, "path", "") or getattr(var, "name", f"variable_{i}")).rsplit("/", 1)[0]
        if name not in index:
            index[name] = len(names)
            names.append(name)
            groups.append([])
        groups[index[name]].append(i)
    return names, groups
