"""What the Lightning and Hugging Face callbacks share: their options, a fresh guard per run, the monitor's lifetime.

The options are the fields of :class:`MonitorCallback`, so its generated ``__init__`` is the one place that lists
them; each framework's callback subclasses it and adds only where and when its framework is hooked in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, Literal

from ..guard import ExplosionGuard, OnExplosion
from .monitor import GradientMonitor, check_cadence

__all__ = ["MonitorCallback"]

#: Fields of :class:`MonitorCallback` that the callback uses itself; every other one is a GradientMonitor keyword.
_OWN_FIELDS = ("logdir", "on_explosion")


@dataclass(eq=False)
class MonitorCallback:
    """Base of the training-framework callbacks over :class:`~tb_gradient_plugin.torch.GradientMonitor`.

    ``logdir`` None (the default) writes where the framework keeps its own TensorBoard run; ``on_explosion`` turns on
    the explosion guard. Every other option is passed through to ``GradientMonitor`` (same name, same default, same
    meaning) and checked when the callback is built, so a bad one fails before training starts.
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

    def __post_init__(self) -> None:
        self.logdir = os.fspath(self.logdir) if self.logdir is not None else None
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

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
