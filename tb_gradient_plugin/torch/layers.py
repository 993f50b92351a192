"""Which layers of a PyTorch model are monitored, and under which names.

A layer is a module that owns parameters directly, named by its ``named_modules()`` path; wrappers (DDP,
``torch.compile``) are looked through so that the names are the model's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

__all__ = ["ROOT_LAYER", "discover_layers"]

ROOT_LAYER = "(root)"


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
