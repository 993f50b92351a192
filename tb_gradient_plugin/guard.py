"""The explosion guard: judges each training step before the optimizer applies it, and acts on an explosion.

Framework-free (numpy in, a decision out): the PyTorch monitor and the Lightning / Hugging Face callbacks feed it the
step's per-layer gradient statistics between backward and the optimizer step, which is the last moment a bad step can
still be refused. It runs the same :class:`~tb_gradient_plugin.detect.OnlineDetector` as the auditor, so what it acts on
is what the Gradients tab and ``tb-gradient`` later report.

Actions (``on_explosion=``): ``"warn"`` (a :class:`GradientExplosionWarning` naming the step and the offending
layers), ``"raise"`` (:class:`GradientExplosionError`), ``"skip"`` (the optimizer step is not applied) or a callable
that gets the :class:`~tb_gradient_plugin.detect.Episode` and may return ``"skip"``. Each decision is recorded per step
as ``guard_action`` with the codes below, so the tab shows what the guard did.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .detect import DetectorConfig, Episode, OnlineDetector

__all__ = [
    "GUARD_CALLBACK",
    "GUARD_NONE",
    "GUARD_RAISE",
    "GUARD_SKIP",
    "GUARD_WARN",
    "ExplosionGuard",
    "GradientExplosionError",
    "GradientExplosionWarning",
    "GuardDecision",
    "OnExplosion",
]

#: ``guard_action`` codes written at a step: nothing done (the guard was on and the step was fine, or it continues an
#: episode that was already reported) ...
GUARD_NONE = 0
#: ... a warning was issued ...
GUARD_WARN = 1
#: ... the step raised :class:`GradientExplosionError` (training stopped there) ...
GUARD_RAISE = 2
#: ... the optimizer step was skipped (weights and optimizer state unchanged) ...
GUARD_SKIP = 3
#: ... the user's callable was called and let the step through.
GUARD_CALLBACK = 4

#: Episode kinds the guard acts on. AMP overflow skips are the loss scaler doing its job: never acted on.
ACTED_KINDS = ("explosion", "nonfinite")
_ACTIONS = ("warn", "raise", "skip")

class GradientExplosionWarning(UserWarning):
    """Issued by ``on_explosion="warn"``; filter it like any warning (``warnings.simplefilter("error", ...)``)."""


class GradientExplosionError(RuntimeError):
    """Raised by ``on_explosion="raise"`` before the exploding step is applied; ``.episode`` says where and why."""

    def __init__(self, episode: Episode, step: int) -> None:
        self.episode = episode
        self.step = step
        super().__init__(describe(episode, step))


@dataclass(frozen=True)
class GuardDecision:
    """What the guard decided for one step: the ``guard_action`` code and the episodes that triggered it."""

    step: int
    action: int
    episodes: tuple[Episode, ...] = ()

    @property
    def skip(self) -> bool:
        """Whether the optimizer step must not be applied."""
        return self.action == GUARD_SKIP


def describe(episode: Episode, step: int, top: int = 3) -> str:
    """One line naming the step, the kind of episode and the top layers with how far above baseline they are."""
    parts = []
    for f in episode.layers[:top]:
        if math.isfinite(f.ratio):
            parts.append(f"{f.name} ({f.metric} {f.peak_value:.3g}, {f.ratio:.3g}x baseline)")
        else:
            parts.append(f"{f.name} ({f.metric}: non-finite)")
    what = {"nonfinite": "non-finite gradients", "spike": "gradient spike"}.get(episode.kind, "gradient explosion")
    layers = "; ".join(parts) if parts else "no layer attributed"
    more = f" (+{len(episode.layers) - top} more)" if len(episode.layers) > top else ""
    return f"{what} at step {step}: {layers}{more}"


class ExplosionGuard:
    """Feeds an :class:`OnlineDetector` one step at a time and decides what happens to each step.

    Pass it as ``on_explosion=ExplosionGuard("skip", config)`` to tune the detector; a plain ``"warn"`` / ``"raise"``
    / ``"skip"`` / callable uses the default :class:`DetectorConfig`.

    It acts on explosions, which it can tell before the step is applied: non-finite gradients, a crossing of
    ``config.extreme_ratio`` times the baseline, and a group of crossings that reached ``config.persist_points``
    steps. A lone clipped spike is not an explosion (the auditor counts it in the run's spike rate), and whether the
    loss reacts is only known after the step: ``spikes=True`` acts on every crossing as well.

    Warn, raise and the callable happen once per episode (its first acted-on step). ``"skip"`` (or a callable that
    returned ``"skip"``) refuses every crossing step of the episode from then on, not only the first: a step that
    still crosses the threshold is still dangerous. Crossings at most ``config.merge_gap`` judged steps apart belong to
    one episode, as in the auditor.
    """

    def __init__(self, on_explosion: str | Callable[[Episode], Any], config: DetectorConfig | None = None, *,
                 spikes: bool = False) -> None:
        if isinstance(on_explosion, str):
            if on_explosion not in _ACTIONS:
                raise ValueError(f"on_explosion must be one of {_ACTIONS}, a callable or None, got {on_explosion!r}")
        elif not callable(on_explosion):
            raise TypeError(
                f"on_explosion must be one of {_ACTIONS}, a callable or None, got {type(on_explosion).__name__}"
            )
        if config is not None and not isinstance(config, DetectorConfig):
            raise TypeError(f"config must be a DetectorConfig, got {type(config).__name__}")
        self.action = on_explosion
        self.config = config or DetectorConfig()
        self.spikes = bool(spikes)
        # merge_gap 0: the detector then reports every crossing step, and the guard groups them itself, so that "skip"
        # can refuse the steps that continue an episode as well as the one that opened it.
        self._detector = OnlineDetector(replace(self.config, merge_gap=0))
        self._judged = 0
        self._last_crossing: int | None = None
        self._group_steps = 0  # crossing steps of the current group
        self._acted = False  # the current group was acted on
        self._skipping = False
        #: Every step on which the guard did something (warned, raised, skipped or called back), in order.
        self.decisions: list[GuardDecision] = []

    @classmethod
    def resolve(cls, on_explosion: OnExplosion, config: DetectorConfig | None = None) -> ExplosionGuard | None:
        """The guard for an ``on_explosion=`` argument: None (off), an action, a callable or a ready guard."""
        if on_explosion is None:
            return None
        if isinstance(on_explosion, ExplosionGuard):
            if config is not None:
                raise ValueError("pass the detector config to the ExplosionGuard itself, not next to it")
            return on_explosion
        return cls(on_explosion, config)

    def check(
        self,
        step: int,
        layers: Sequence[str],
        metrics: Mapping[str, np.ndarray],
        scalars: Mapping[str, float] | None = None,
    ) -> GuardDecision:
        """Judge one step from its statistics (before the optimizer applies it) and carry out the action.

        ``metrics`` are per-layer arrays aligned with ``layers`` (``grad_norm``, ``grad_max_abs``,
        ``nonfinite_count``); ``scalars`` per-step values (``total_grad_norm``, ``step_skipped``). Raises
        :class:`GradientExplosionError` for ``"raise"``; the caller records the step first if it wants it on disk.
        """
        crossing = [e for e in self._detector.update(step, layers, dict(metrics), dict(scalars or {}))
                    if e.kind != "overflow_skip"]
        judged, self._judged = self._judged, self._judged + 1
        if not crossing:
            return GuardDecision(step, GUARD_NONE)
        if not self._continues(judged):
            self._group_steps, self._acted = 0, False
        self._last_crossing = judged
        self._group_steps += 1
        episodes = tuple(self._acted_on(e) for e in crossing if self._acts_on(e))
        if not episodes:
            return GuardDecision(step, GUARD_NONE)
        if self._acted:
            decision = GuardDecision(step, GUARD_SKIP if self._skipping else GUARD_NONE, episodes)
        else:
            self._acted = True
            decision = self._act(step, episodes)
        if decision.action != GUARD_NONE:
            self.decisions.append(decision)
        return decision

    def _continues(self, judged: int) -> bool:
        """Whether a crossing at judged step ``judged`` belongs to the current group."""
        return self._last_crossing is not None and judged - self._last_crossing <= self.config.merge_gap

    def _acts_on(self, episode: Episode) -> bool:
        if episode.kind in ACTED_KINDS:
            return True
        return episode.kind == "spike" and (self.spikes or self._group_steps >= self.config.persist_points)

    def _acted_on(self, episode: Episode) -> Episode:
        """A crossing the guard acts on, named for why: a persistent group is an explosion; a spike stays a spike."""
        if episode.kind == "spike" and self._group_steps >= self.config.persist_points:
            return replace(episode, kind="explosion", confirmed_by=["persistent"])
        return episode

    def next_thresholds(self, layers: Sequence[str]) -> tuple[np.ndarray, float]:
        """Per layer of ``layers``, the gradient norm above which the guard acts on the next step, and the total
        norm's.

        For integrations that must decide inside a compiled step, before :meth:`check` can run (see
        :meth:`OnlineDetector.next_thresholds`): ``inf`` during the detector's warm-up; non-finite gradients always
        count. That is the crossing threshold while the guard acts on spikes or on the current group (acted on, or
        one step from persistent), else the extreme one.
        """
        group = self._continues(self._judged) and (self._acted or self._group_steps + 1 >= self.config.persist_points)
        return self._detector.next_thresholds(layers, extreme=not (self.spikes or group))

    def _act(self, step: int, episodes: tuple[Episode, ...]) -> GuardDecision:
        """First crossing of a new episode: do what the user asked."""
        first = episodes[0]
        self._skipping = False
        if self.action == "warn":
            warnings.warn(describe(first, step), GradientExplosionWarning, stacklevel=2)
            return GuardDecision(step, GUARD_WARN, episodes)
        if self.action == "raise":
            self.decisions.append(GuardDecision(step, GUARD_RAISE, episodes))
            raise GradientExplosionError(first, step)
        if self.action == "skip":
            self._skipping = True
            return GuardDecision(step, GUARD_SKIP, episodes)
        answers = [self.action(ep) for ep in episodes]
        for answer in answers:
            if answer not in (None, "skip"):
                raise ValueError(f"an on_explosion callable must return None or 'skip', got {answer!r}")
        self._skipping = "skip" in answers
        return GuardDecision(step, GUARD_SKIP if self._skipping else GUARD_CALLBACK, episodes)


#: What ``on_explosion=`` accepts: None (off), ``"warn"`` / ``"raise"`` / ``"skip"``, a callable, or a ready guard.
OnExplosion = str | Callable[[Episode], Any] | ExplosionGuard | None
