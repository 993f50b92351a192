"""What the Lightning and Hugging Face callbacks share: their options, a fresh guard per run, the monitor's lifetime.

The options are the fields of :class:`MonitorCallback`, so its generated ``__init__`` is the one place that lists
them; each framework's callback subclasses it and adds only where and when its framework is hooked in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch

from ..guard import ExplosionGuard, OnExplosion
from .monitor import GradientMonitor, check_cadence

__all__ = ["ID_FIELDS", "MonitorCallback", "find_batch_ids"]

#: Fields of :class:`MonitorCallback` that the callback uses itself; every other one is a GradientMonitor keyword.
_OWN_FIELDS = ("logdir", "on_explosion", "batch_ids")
#: Batch fields (dict keys or attributes) the callbacks take as the batch's sample ids, first match wins.
ID_FIELDS = ("idx", "index", "indices", "sample_id", "sample_ids", "sample_idx")
#: ``batch_ids``: where a batch's sample ids are. None looks for a field of :data:`ID_FIELDS` holding integers; a
#: string names the field; a function maps the batch to its ids; False records none.
BatchIds = str | Callable[[Any], Any] | bool | None


def _field(batch: Any, name: str) -> Any:
    if isinstance(batch, Mapping):
        return batch.get(name)
    return getattr(batch, name, None)


def _integers(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.integer)
    return isinstance(value, Sequence) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in value)


def find_batch_ids(batch: Any, where: BatchIds) -> tuple[str | None, Any]:
    """(field name, ids) of a batch per ``where`` (see :data:`BatchIds`); (None, None) when there are none. An
    automatically found field that does not hold integers is not taken (it is a feature, not an id)."""
    if where is False:
        return None, None
    if callable(where):
        return None, where(batch)
    if isinstance(where, str):
        return where, _field(batch, where)
    for name in ID_FIELDS:
        value = _field(batch, name)
        if value is not None and _integers(value):
            return name, value
    return None, None


@dataclass(eq=False)
class MonitorCallback:
    """Base of the training-framework callbacks over :class:`~tb_gradient_plugin.torch.GradientMonitor`.

    ``logdir`` None (the default) writes where the framework keeps its own TensorBoard run; ``on_explosion`` turns on
    the explosion guard; ``batch_ids`` says where a batch's sample ids are (:data:`BatchIds`), recorded with
    ``GradientMonitor.log_batch``. Every other option is passed through to ``GradientMonitor`` (same name, same
    default, same meaning) and checked when the callback is built, so a bad one fails before training starts.
    """

    logdir: str | os.PathLike | None = None
    _: KW_ONLY
    every: int = 1
    on_explosion: OnExplosion = None
    update_norms: bool | Literal["auto", "copy", "state"] = "auto"
    histograms_every: int = 0
    include: str | None = None
    exclude: str | None = None
    group_depth: int | None = None
    group_by: Callable[[str], str] | None = None
    flush_secs: float = 2.0
    batch_ids: BatchIds = None

    def __post_init__(self) -> None:
        self.logdir = os.fspath(self.logdir) if self.logdir is not None else None
        where = self.batch_ids
        if not (where is None or where is False or isinstance(where, str) or callable(where)):
            raise TypeError(f"batch_ids must be None, False, a field name or a function, got {self.batch_ids!r}")
        check_cadence(self.every, self.histograms_every)
        self._guard_spec = ExplosionGuard.resolve(self.on_explosion)
        self._guard: ExplosionGuard | None = None
        self.monitor: GradientMonitor | None = None

    @property
    def _options(self) -> dict[str, Any]:
        """The keywords passed through to ``GradientMonitor``."""
        return {f.name: getattr(self, f.name) for f in fields(MonitorCallback) if f.name not in _OWN_FIELDS}

    @property
    def guard(self) -> ExplosionGuard | None:
        """The explosion guard of the current (or last) training run, with ``guard.decisions``; None when it is off."""
        return self._guard

    def _new_guard(self) -> ExplosionGuard | None:
        """A fresh guard per run: its detector must not judge a new run against the last one's baseline."""
        spec = self._guard_spec
        self._guard = None if spec is None else ExplosionGuard(spec.action, spec.config)
        return self._guard

    def _log_batch(self, batch: Any) -> str | None:
        """Record the batch's sample ids, where ``batch_ids`` finds some; the field they came from, if named."""
        if self.monitor is None or self.monitor.closed:
            return None
        name, ids = find_batch_ids(batch, self.batch_ids)
        if ids is None:
            return None
        self.monitor.log_batch(ids)
        return name

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
