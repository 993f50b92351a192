"""The explosion guard of GradientMonitorCallback in real ``model.fit`` runs (TensorFlow backend, XLA on and off)."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
from keras_env import keras

from tb_gradient_plugin.guard import (
    GUARD_CALLBACK,
    GUARD_NONE,
    GUARD_RAISE,
    GUARD_SKIP,
    GUARD_WARN,
    GradientExplosionError,
    GradientExplosionWarning,
)
from tb_gradient_plugin.keras import GradientMonitorCallback
from tb_gradient_plugin.runs import load_run

pytestmark = pytest.mark.slow

BATCH = 8
STEPS = 50
SPIKE = 40  # the detector needs min_history (24) healthy steps before it judges a norm


def _data(spikes: tuple[int, ...] = (), nan_at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A linear regression task; the batches at ``spikes`` have 1000x larger inputs and targets (a bad batch)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 4)).astype("float32")
    for s in spikes:
        x[s * BATCH:(s + 1) * BATCH] *= 1000.0
    y = x.sum(axis=1, keepdims=True)
    if nan_at is not None:
        x[nan_at * BATCH] = math.nan
    return x, y


def _model(jit: bool, optimizer: keras.optimizers.Optimizer | None = None) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), loss="mse", jit_compile=jit)
    return model


class StepRecorder(keras.callbacks.Callback):
    """Weights and optimizer variables (slots and iteration count) before and after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[list[np.ndarray]] = []
        self.after: list[list[np.ndarray]] = []

    def _state(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.model.weights + self.model.optimizer.variables]

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(self._state())

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(self._state())

    def moved(self, step: int) -> bool:
        return any(not np.array_equal(a, b) for a, b in zip(self.before[step], self.after[step], strict=True))


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, *callbacks: keras.callbacks.Callback) -> None:
    # The recorder runs after the monitor's batch end, where a held step may still be applied late.
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks))


def _actions(logdir: str) -> dict[int, int]:
    series = load_run(os.path.join(logdir, "train")).series["guard_action"]
    return dict(zip(series.steps.tolist(), series.values.astype(int).tolist(), strict=True))


# ------------------------------------------------------------------------------------------------------ actions


@pytest.mark.parametrize("jit", [True, False], ids=["xla", "no-xla"])
def test_skip_holds_back_every_crossing_step_of_the_episode(tmp_path, jit):
    model = _model(jit)
    monitor = GradientMonitorCallback(tmp_path, on_explosion="skip")
    record = StepRecorder()
    _fit(model, *_data(spikes=(SPIKE, SPIKE + 1)), monitor, record)
    monitor.close()

    # weights, Adam's moments and its iteration count are untouched by both bad batches; training goes on after them
    assert not record.moved(SPIKE) and not record.moved(SPIKE + 1)
    assert record.moved(SPIKE - 1) and all(record.moved(s) for s in range(SPIKE + 2, STEPS))
    assert int(model.optimizer.iterations) == STEPS - 2
    assert [(d.step, d.action) for d in monitor.guard.decisions] == [(SPIKE, GUARD_SKIP), (SPIKE + 1, GUARD_SKIP)]
    assert monitor.guard.decisions[0].episodes[0].layers[0].name == "out"

    run = load_run(str(tmp_path / "train"))
    actions = _actions(str(tmp_path))
    assert sorted(actions) == list(range(STEPS))
    assert {s for s, a in actions.items() if a != GUARD_NONE} == {SPIKE, SPIKE + 1}
    assert actions[SPIKE] == GUARD_SKIP
    i, j = run.steps.tolist().index(SPIKE), run.layers.index("out")
    assert run.layer_metrics["grad_norm"][i, j] > 100 * np.median(run.layer_metrics["grad_norm"][:i, j])
    np.testing.assert_array_equal(run.layer_metrics["update_norm"][i], 0)


@pytest.mark.parametrize("jit", [True, False], ids=["xla", "no-xla"])
def test_raise_stops_fit_before_the_step_is_applied(tmp_path, jit):
    model = _model(jit)
    monitor = GradientMonitorCallback(tmp_path, every=3, on_explosion="raise")
    record = StepRecorder()
    with pytest.raises(GradientExplosionError) as info:
        _fit(model, *_data(spikes=(SPIKE,)), monitor, record)
    assert info.value.step == SPIKE and info.value.episode.layers[0].name == "out"
    # the recorder's batch end never ran for the raising step: compare with the state it saw before it
    assert len(record.after) == SPIKE
    now = [v.numpy() for v in model.weights + model.optimizer.variables]
    assert all(np.array_equal(a, b) for a, b in zip(record.before[SPIKE], now, strict=True))
    assert int(model.optimizer.iterations) == SPIKE

    actions = _actions(str(tmp_path))  # written and flushed before fit raised
    assert max(actions) == SPIKE and actions[SPIKE] == GUARD_RAISE
    assert set(actions) == set(range(0, SPIKE, 3)) | {SPIKE}
    monitor.close()


def test_warn_once_per_episode_and_the_steps_apply(tmp_path):
    model = _model(True)
    monitor = GradientMonitorCallback(tmp_path, on_explosion="warn")
    record = StepRecorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, *_data(spikes=(SPIKE, SPIKE + 1)), monitor, record)
    monitor.close()
    found = [str(w.message) for w in caught if issubclass(w.category, GradientExplosionWarning)]
    assert len(found) == 1 and f"gradient explosion at step {SPIKE}: out" in found[0]
    assert record.moved(SPIKE) and record.moved(SPIKE + 1)
    actions = _actions(str(tmp_path))
    assert actions[SPIKE] == GUARD_WARN and actions[SPIKE + 1] == GUARD_NONE


@pytest.mark.parametrize("jit", [True, False], ids=["xla", "no-xla"])
def test_nonfinite_batch_is_skipped_from_the_first_steps(tmp_path, jit):
    model = _model(jit)
    monitor = GradientMonitorCallback(tmp_path, on_explosion="skip")
    record = StepRecorder()
    _fit(model, *_data(nan_at=2), monitor, record)
    monitor.close()
    assert not record.moved(2) and record.moved(1) and record.moved(3)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    [decision] = monitor.guard.decisions
    assert decision.step == 2 and decision.action == GUARD_SKIP and decision.episodes[0].kind == "nonfinite"
    assert _actions(str(tmp_path))[2] == GUARD_SKIP


def test_callable_is_asked_once_and_its_answer_is_carried_out(tmp_path):
    # "skip": both crossing steps held back; None: the held step is applied late, exactly as "warn" applies it
    seen = []
    model = _model(True)
    monitor = GradientMonitorCallback(tmp_path / "skip", on_explosion=lambda ep: seen.append(ep) or "skip")
    record = StepRecorder()
    _fit(model, *_data(spikes=(SPIKE, SPIKE + 1)), monitor, record)
    monitor.close()
    assert len(seen) == 1 and seen[0].layers[0].name == "out"
    assert not record.moved(SPIKE) and not record.moved(SPIKE + 1) and record.moved(SPIKE + 2)
    assert [d.action for d in monitor.guard.decisions] == [GUARD_SKIP, GUARD_SKIP]

    seen.clear()
    let_through = _model(True)
    monitor = GradientMonitorCallback(tmp_path / "none", on_explosion=seen.append)
    record = StepRecorder()
    _fit(let_through, *_data(spikes=(SPIKE, SPIKE + 1)), monitor, record)
    monitor.close()
    assert len(seen) == 1 and record.moved(SPIKE) and record.moved(SPIKE + 1)
    assert [(d.step, d.action) for d in monitor.guard.decisions] == [(SPIKE, GUARD_CALLBACK)]
    assert _actions(str(tmp_path / "none"))[SPIKE] == GUARD_CALLBACK

    warned = _model(True)
    reference = GradientMonitorCallback(tmp_path / "warn", on_explosion="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientExplosionWarning)
        _fit(warned, *_data(spikes=(SPIKE, SPIKE + 1)), reference)
    reference.close()
    for a, b in zip(let_through.weights + let_through.optimizer.variables,
                    warned.weights + warned.optimizer.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_in_graph_hold_that_the_detector_lets_through_is_applied_late(tmp_path):
    # The detector wins: a step held back by the in-graph thresholds but not skipped by the full judgement (here the
    # threshold variable is forced down before every step from 30 on) is applied before the next step, exactly.
    model = _model(True)
    monitor = GradientMonitorCallback(tmp_path, on_explosion="skip")
    record = StepRecorder()

    class ForceHold(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch >= 30:
                monitor._active[0].guard.thresholds.assign([1e-12, 1e-12])

    _fit(model, *_data(), ForceHold(), monitor, record)
    monitor.close()
    assert monitor.guard.decisions == []
    assert all(record.moved(s) for s in range(STEPS))
    # update norms are measured before the late apply: 0 from step 30 on
    held = load_run(str(tmp_path / "train")).layer_metrics["update_norm"]
    assert (held[30:] == 0).all() and (held[:30] > 0).all()
    reference = _model(True)
    _fit(reference, *_data())
    for a, b in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- recording, AMP


def test_acted_steps_are_written_even_when_every_does_not_log_them(tmp_path):
    model = _model(True)
    monitor = GradientMonitorCallback(tmp_path, every=10, on_explosion="skip")
    _fit(model, *_data(spikes=(43, 44)), monitor)
    monitor.close()
    run = load_run(str(tmp_path / "train"))
    assert run.steps.tolist() == [0, 10, 20, 30, 40, 43, 44]
    assert _actions(str(tmp_path)) == {0: 0, 10: 0, 20: 0, 30: 0, 40: 0, 43: GUARD_SKIP, 44: GUARD_SKIP}
    i, j = run.steps.tolist().index(43), run.layers.index("out")
    assert run.layer_metrics["grad_norm"][i, j] > 100 * run.layer_metrics["grad_norm"][0, j]
    assert math.isfinite(run.series["loss"].values[run.series["loss"].steps.tolist().index(43)])


def test_loss_scale_overflows_are_not_explosions(tmp_path):
    model = _model(True, keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1e-2)))
    monitor = GradientMonitorCallback(tmp_path, on_explosion="raise")
    _fit(model, *_data(nan_at=30), monitor)  # must not raise: the optimizer skips the step itself
    monitor.close()
    assert monitor.guard.decisions == []
    # the overflow reached the optimizer (the guard did not hold it back), which backed its loss scale off
    assert float(model.optimizer.dynamic_scale) == model.optimizer.initial_scale / 2
    run = load_run(str(tmp_path / "train"))
    skipped = dict(zip(run.series["step_skipped"].steps.tolist(), run.series["step_skipped"].values.tolist(),
                       strict=True))
    assert skipped[30] == 1 and sum(skipped.values()) == 1


def test_no_guard_no_guard_state_and_no_guard_action(tmp_path):
    model = _model(True)
    monitor = GradientMonitorCallback(tmp_path)
    _fit(model, *_data(spikes=(SPIKE,)), monitor)
    assert monitor.guard is None
    assert monitor._probes and all(p.guard is None for p in monitor._probes.values())
    monitor.close()
    assert "guard_action" not in load_run(str(tmp_path / "train")).series


def test_bad_arguments_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="on_explosion"):
        GradientMonitorCallback(tmp_path, on_explosion="explode")
    with pytest.raises(TypeError, match="on_explosion"):
        GradientMonitorCallback(tmp_path, on_explosion=3)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=4)
    x, y = _data()
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        _fit(model, x, y, GradientMonitorCallback(tmp_path, on_explosion="skip"))
    assert not (tmp_path / "train").exists()  # refused before anything was hooked or written
