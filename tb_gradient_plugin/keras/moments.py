"""Adam's moment state as Keras 3 optimizers keep it: the per-variable first and second moments.

Adam, AdamW, Nadam and Lamb keep ``_momentums`` and ``_velocities``, Adamax ``_m`` and ``_u`` (its second moment is
an infinity norm), each a list aligned with the optimizer's trainable variables. Other optimizers (SGD, RMSprop,
Lion, ...) have no such pair and record none. Their per-layer norms are what the
PyTorch monitor writes as ``exp_avg_norm`` and ``exp_avg_sq_norm``: a growing second moment shows a gradient
blow-up the optimizer has already absorbed into its step size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

__all__ = ["moment_variables"]

#: Adam-like optimizer classes (subclasses included) and the attribute names of their (first, second) moment lists.
_SLOTS = ((keras.optimizers.Adamax, "_m", "_u"),
          ((keras.optimizers.Adam, keras.optimizers.Nadam, keras.optimizers.Lamb), "_momentums", "_velocities"))


def moment_variables(optimizer: Any, variables: Sequence[Any]) -> tuple[list[Any], list[Any]] | None:
    """The first and second moment variables of each of ``variables`` (trainable variables ``optimizer`` updates),
    or None for an optimizer without Adam-like moments (SGD, RMSprop, ...)."""
    inner = getattr(optimizer, "inner_optimizer", None)  # a LossScaleOptimizer keeps the moments in its inner one
    if inner is not None:
        optimizer = inner
    for classes, first_name, second_name in _SLOTS:
        if not isinstance(optimizer, classes):
            continue
        first, second = vars(optimizer).get(first_name), vars(optimizer).get(second_name)
        if not isinstance(first, list) or not isinstance(second, list) or len(first) != len(second):
            continue
        try:
            index = [optimizer._get_variable_index(v) for v in variables]
        except (KeyError, AttributeError):
            return None
        if any(i >= len(first) for i in index):
            return None
        return [first[i] for i in index], [second[i] for i in index]
    return None
