"""The explosion guard's framework-free decision logic (numpy in, a decision out; no framework imported)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tb_gradient_plugin.detect import DetectorConfig
from tb_gradient_plugin.guard import (
    GUARD_CALLBACK,
    GUARD_NONE,
    GUARD_RAISE,
    GUARD_WARN,
    ExplosionGuard,
    GradientExplosionError,
    GradientExplosionWarning,
)

LAYERS = ["embed", "block.0", "block.1", "head"]
SPIKE = 40  # the detector needs min_history (24) healthy points before it judges


def _norms(step: int, rng: np.random.Generator) -> np.ndarray:
    norms = np.array([1.0, 0.5, 0.3, 0.2]) * np.exp(rng.normal(0, 0.05, 4))
    if step in (SPIKE, SPIKE + 1):
        norms[2] *= 1e4  # an extreme jump: an explosion on its own
    return norms


def _feed(guard: ExplosionGuard, steps: int, nan_at: int | None = None) -> list:
    rng = np.random.default_rng(0)
    out = []
    for step in range(steps):
        g = _norms(step, rng)
        nonfinite = np.zeros(4)
        if step == nan_at:
            g[1], nonfinite[1] = math.nan, 3
        metrics = {"grad_norm": g, "grad_max_abs": g / 4, "nonfinite_count": nonfinite}
        out.append(guard.check(step, LAYERS, metrics, {"total_grad_norm": float(np.sqrt(np.sum(g * g)))}))
    return out


# ------------------------------------------------------------------------------------------------ decision logic


def test_warn_names_step_and_offending_layer_once_per_episode():
    guard = ExplosionGuard("warn")
    with pytest.warns(GradientExplosionWarning) as caught:
        decisions = _feed(guard, 60)
    assert [d.step for d in decisions if d.action != GUARD_NONE] == [SPIKE]
    assert decisions[SPIKE].action == GUARD_WARN
    assert decisions[SPIKE].episodes[0].layers[0].name == "block.1"
    messages = [str(w.message) for w in caught if issubclass(w.category, GradientExplosionWarning)]
    assert len(messages) == 1
    assert f"step {SPIKE}" in messages[0] and "block.1" in messages[0] and "x baseline" in messages[0]
    assert [d.step for d in guard.decisions] == [SPIKE]


def test_skip_refuses_every_crossing_step_of_the_episode():
    decisions = _feed(ExplosionGuard("skip"), 60)
    skipped = [d.step for d in decisions if d.skip]
    assert skipped == [SPIKE, SPIKE + 1]
    assert all(d.action == GUARD_NONE for d in decisions if d.step not in skipped)


def test_raise_carries_the_episode():
    guard = ExplosionGuard("raise")
    with pytest.raises(GradientExplosionError) as info:
        _feed(guard, 60)
    assert info.value.step == SPIKE
    assert info.value.episode.kind == "explosion"
    assert info.value.episode.layers[0].name == "block.1"
    assert "block.1" in str(info.value)
    assert guard.decisions[-1].action == GUARD_RAISE


def test_callable_gets_the_episode_and_may_skip():
    seen = []
    decisions = _feed(ExplosionGuard(lambda ep: seen.append(ep) or "skip"), 60)
    assert [ep.layers[0].name for ep in seen] == ["block.1"]  # called once per episode ...
    assert [d.step for d in decisions if d.skip] == [SPIKE, SPIKE + 1]  # ... its "skip" holds for the episode

    seen.clear()
    decisions = _feed(ExplosionGuard(lambda ep: seen.append(ep)), 60)
    assert decisions[SPIKE].action == GUARD_CALLBACK and decisions[SPIKE + 1].action == GUARD_NONE


def test_nonfinite_gradients_act_at_once_even_without_history():
    decisions = _feed(ExplosionGuard("skip"), 5, nan_at=2)
    assert [d.step for d in decisions if d.skip] == [2]
    assert decisions[2].episodes[0].kind == "nonfinite"
    assert decisions[2].episodes[0].layers[0].name == "block.0"


def test_amp_overflow_skips_are_not_acted_on():
    guard = ExplosionGuard("raise")
    for step in range(30):
        bad = step == 20
        g = np.full(4, math.inf if bad else 1.0)
        metrics = {"grad_norm": g, "grad_max_abs": g, "nonfinite_count": np.full(4, 5.0 if bad else 0.0)}
        decision = guard.check(step, LAYERS, metrics, {"step_skipped": 1.0 if bad else 0.0})
        assert decision.action == GUARD_NONE


def test_custom_detector_config_and_bad_arguments():
    guard = ExplosionGuard.resolve(ExplosionGuard("skip", DetectorConfig(min_history=8, block=4)))
    assert guard is not None and guard.config.min_history == 8
    assert ExplosionGuard.resolve(None) is None
    with pytest.raises(ValueError, match="on_explosion must be one of"):
        ExplosionGuard("ignore")
    with pytest.raises(TypeError, match="on_explosion must be one of"):
        ExplosionGuard(3)
    with pytest.raises(TypeError, match="DetectorConfig"):
        ExplosionGuard("warn", {"ratio": 3})
    with pytest.raises(ValueError, match="config"):
        ExplosionGuard.resolve(guard, DetectorConfig())
    bad = ExplosionGuard(lambda ep: "stop")
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="must return None or 'skip'"):
        for step in range(60):
            g = _norms(step, rng)
            bad.check(step, LAYERS, {"grad_norm": g}, {})


def _feed_spikes(guard: ExplosionGuard, spikes: dict[int, float], steps: int = 120) -> list:
    """Healthy steps with the ``block.1`` norm multiplied by ``spikes[step]`` where given."""
    rng = np.random.default_rng(1)
    out = []
    for step in range(steps):
        g = np.array([1.0, 0.5, 0.3, 0.2]) * np.exp(rng.normal(0, 0.05, 4))
        g[2] *= spikes.get(step, 1.0)
        out.append(guard.check(step, LAYERS, {"grad_norm": g}, {}))
    return out


def test_a_lone_clipped_spike_is_not_acted_on_unless_spikes_are_asked_for():
    plain = _feed_spikes(ExplosionGuard("skip"), {80: 40.0})
    assert all(d.action == GUARD_NONE for d in plain)
    eager = ExplosionGuard("skip", spikes=True)
    decisions = _feed_spikes(eager, {80: 40.0})
    assert [d.step for d in decisions if d.skip] == [80]
    assert decisions[80].episodes[0].kind == "spike"


def test_crossings_that_persist_are_acted_on_from_the_step_they_become_an_explosion():
    cfg = DetectorConfig()
    guard = ExplosionGuard("skip", cfg)
    decisions = _feed_spikes(guard, {s: 40.0 for s in range(80, 92)})
    acted = [d.step for d in decisions if d.skip]
    assert acted == list(range(80 + cfg.persist_points - 1, 92))
    (first,) = decisions[acted[0]].episodes
    assert first.kind == "explosion" and first.confirmed_by == ["persistent"]


def test_next_thresholds_are_the_extreme_ones_until_a_group_is_about_to_count():
    """For a compiled step that must hold a step back before the guard sees it (Keras)."""
    cfg = DetectorConfig()
    guard, eager = ExplosionGuard("skip", cfg), ExplosionGuard("skip", cfg, spikes=True)
    rng = np.random.default_rng(2)
    for step in range(80 + cfg.persist_points - 1):
        g = np.array([1.0, 0.5, 0.3, 0.2]) * np.exp(rng.normal(0, 0.05, 4))
        if step >= 80:
            g[2] *= 40.0
        if step == 80:
            extreme, _ = guard.next_thresholds(LAYERS)
            crossing, _ = eager.next_thresholds(LAYERS)
            assert np.all(np.isfinite(crossing)) and np.all(extreme > 100 * crossing)
        guard.check(step, LAYERS, {"grad_norm": g}, {})
        eager.check(step, LAYERS, {"grad_norm": g}, {})
    # the group has persist_points - 1 crossings: the next one makes it an explosion, so the crossing threshold holds
    now, _ = guard.next_thresholds(LAYERS)
    np.testing.assert_allclose(now, eager.next_thresholds(LAYERS)[0])
