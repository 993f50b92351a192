"""GradientMonitorCallback on Keras' JAX or torch backend, checked against that backend's own autodiff.

Run by ``test_keras_backends.py`` in a fresh process with ``KERAS_BACKEND`` set (Keras' backend is fixed per process):
``KERAS_BACKEND=jax pytest tests/keras_backend_cases.py``. The name keeps the default collection (TensorFlow backend)
from picking it up.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict

import keras
import keras_sample_ids
import numpy as np
import pytest

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.guard import GUARD_RAISE, GUARD_SKIP, GradientExplosionError
from tb_gradient_plugin.keras import GradientMonitorCallback
from tb_gradient_plugin.reader import EventFileReader

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(BACKEND not in ("jax", "torch"), reason="run by test_keras_backends.py per backend")
BATCH = 8
LAYERS = ["conv", "out"]


class Run:
    """What our reader decodes from ``log_dir/train``, by step."""

    def __init__(self, log_dir: str) -> None:
        self.layers: dict[int, tuple[str, ...]] = {}
        self.metrics: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.scalars: dict[str, dict[int, float]] = defaultdict(dict)
        files = sorted(glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*")))
        assert files, f"no event files in {log_dir}"
        for path in files:
            reader = EventFileReader(path, {})
            batch = reader.read()
            reader.finish()
            assert not reader.problems
            for rec in batch.layer_records:
                assert self.layers.setdefault(rec.step, rec.layers) == rec.layers
                self.metrics[rec.metric][rec.step] = rec.values
            for rec in batch.scalars:
                self.scalars[rec.tag][rec.step] = rec.value

    def layer(self, metric: str, step: int, name: str) -> np.ndarray:
        return self.metrics[metric][step][self.layers[step].index(name)]


class WeightRecorder(keras.callbacks.Callback):
    """Trainable weights before every step and after the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[list[np.ndarray]] = []
        self.final: list[np.ndarray] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append([np.array(keras.ops.convert_to_numpy(v)) for v in self.model.trainable_variables])

    def on_train_end(self, logs=None):
        self.final = [np.array(keras.ops.convert_to_numpy(v)) for v in self.model.trainable_variables]

    def after(self, i: int) -> list[np.ndarray]:
        return self.before[i + 1] if i + 1 < len(self.before) else self.final


def tiny_model(lr=0.01, steps_per_execution: int = 1) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5, 5, 1)), keras.layers.Conv2D(2, 3, activation="tanh", name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse", steps_per_execution=steps_per_execution)
    return model


def data(steps: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(steps * BATCH, 5, 5, 1)).astype("float32"),
            rng.normal(size=(steps * BATCH, 1)).astype("float32"))


def autodiff(model: keras.Model, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray):
    """Loss and gradients of the compiled loss (mean squared error) by the backend's own autodiff."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def loss_fn(tv):
            y_pred, _ = model.stateless_call(tv, [], jnp.asarray(x), training=True)
            return jnp.mean(jnp.square(y_pred - jnp.asarray(y)))

        loss, grads = jax.value_and_grad(loss_fn)([jnp.asarray(w) for w in weights])
        return float(loss), [np.asarray(g) for g in grads]
    import torch

    for v, w in zip(model.trainable_variables, weights, strict=True):
        v.assign(w)
    params = [v.value for v in model.trainable_variables]
    loss = torch.mean(torch.square(model(torch.as_tensor(x), training=True) - torch.as_tensor(y)))
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), [g.detach().cpu().numpy() for g in grads]


def norm(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(a.astype(np.float64))) for a in arrays)))


def test_values_equal_the_backends_autodiff(tmp_path):
    steps = 5
    x, y = data(steps)
    model = tiny_model(keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5))
    weights = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path, every=1, histograms_every=2)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[weights, monitor])
    monitor.close()
    run = Run(str(tmp_path))
    assert sorted(run.layers) == list(range(steps))
    assert sorted(run.metrics["grad_hist"]) == [0, 2, 4]
    for step in range(steps):
        before, after = weights.before[step], weights.after(step)
        xs, ys = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        loss, grads = autodiff(model, before, xs, ys)
        assert run.layers[step] == tuple(LAYERS)
        for layer, idxs in zip(LAYERS, ([0, 1], [2, 3]), strict=True):
            g = [grads[i] for i in idxs]
            assert run.layer("grad_norm", step, layer) == pytest.approx(norm(g), rel=1e-5)
            assert run.layer("grad_max_abs", step, layer) == pytest.approx(max(np.abs(a).max() for a in g), rel=1e-5)
            assert run.layer("nonfinite_count", step, layer) == 0
            assert run.layer("param_norm", step, layer) == pytest.approx(norm([before[i] for i in idxs]), rel=1e-6)
            update = norm([after[i].astype(np.float64) - before[i] for i in idxs])
            assert update > 0
            assert run.layer("update_norm", step, layer) == pytest.approx(update, rel=1e-4)
            if step % 2 == 0:
                expected = sum(fmt.histogram_counts(a) for a in g)
                np.testing.assert_array_equal(run.layer("grad_hist", step, layer), expected)
        assert run.scalars["loss"][step] == pytest.approx(loss, rel=1e-5)
        assert run.scalars["total_grad_norm"][step] == pytest.approx(norm(grads), rel=1e-5)
        assert run.scalars["lr"][step] == pytest.approx(0.01 * 0.5 ** (step / 2), rel=1e-6)


@pytest.mark.parametrize("steps_per_execution", [1, 3] if BACKEND == "jax" else [1])  # torch runs one step at a time
def test_every_10_writes_only_every_10th_step(tmp_path, steps_per_execution):
    """Only steps 0, 10 and 20 are written, over two fits; the model trains exactly as without the callback (on JAX
    the other steps run the model's own compiled step), and a logged step after unlogged ones measures the weights it
    trained on. Also when one execution runs 3 steps (a logged step inside one runs it hooked)."""
    x, y = data(25)
    model = tiny_model(steps_per_execution=steps_per_execution)
    weights = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path, every=10)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[weights, monitor])
    assert set(history.history) == {"loss"}  # the statistics a JAX step returns with its logs never reach Keras
    model.fit(x[:5 * BATCH], y[:5 * BATCH], batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[monitor])  # the same callback again: steps keep counting
    monitor.close()
    run = Run(str(tmp_path))
    assert sorted(run.layers) == [0, 10, 20]
    assert sorted(run.scalars["loss"]) == [0, 10, 20]
    plain = tiny_model(steps_per_execution=steps_per_execution)
    plain.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    plain.fit(x[:5 * BATCH], y[:5 * BATCH], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for ours, theirs in zip(model.trainable_variables, plain.trainable_variables, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs), rtol=1e-6)
    for step in (10, 20) if steps_per_execution == 1 else ():  # batch callbacks see every step only then
        loss, grads = autodiff(model, weights.before[step], x[step * BATCH:(step + 1) * BATCH],
                               y[step * BATCH:(step + 1) * BATCH])
        assert run.scalars["total_grad_norm"][step] == pytest.approx(norm(grads), rel=1e-5)
        assert run.scalars["loss"][step] == pytest.approx(loss, rel=1e-5)


def test_guard_skip_holds_back_a_nonfinite_step(tmp_path):
    x, y = data(6)
    x[3 * BATCH] = np.nan  # step 3: NaN gradients
    model = tiny_model()
    weights = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path, every=2, on_explosion="skip")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[weights, monitor])
    monitor.close()
    for i, (a, b) in enumerate(zip(weights.before[3], weights.after(3), strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"variable {i} changed in the held step")
    assert all(np.isfinite(w).all() for w in weights.final)
    assert any(not np.array_equal(a, b) for a, b in zip(weights.before[4], weights.after(4), strict=True))
    assert [(d.step, d.action) for d in monitor.guard.decisions] == [(3, GUARD_SKIP)]
    run = Run(str(tmp_path))
    assert sorted(run.layers) == [0, 2, 3, 4]  # step 3 is written because the guard acted on it
    assert run.scalars["guard_action"][3] == GUARD_SKIP
    assert run.layer("nonfinite_count", 3, "conv") > 0
    assert run.scalars["guard_action"][2] == 0


def test_guard_raise_stops_fit_and_records_the_step(tmp_path):
    x, y = data(6)
    x[2 * BATCH] = np.nan
    model = tiny_model()
    weights = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path, every=1, on_explosion="raise")
    with pytest.raises(GradientExplosionError) as info:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[weights, monitor])
    monitor.close()
    assert info.value.step == 2
    final = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
    for a, b in zip(weights.before[2], final, strict=True):
        np.testing.assert_array_equal(a, b)  # the step and any later one of the same fit were held back
    run = Run(str(tmp_path))
    assert run.scalars["guard_action"][2] == GUARD_RAISE
    assert max(run.layers) == 2


def test_loss_scale_optimizer_is_refused_clearly(tmp_path):
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), loss="mse")
    x, y = data(1)
    with pytest.raises(ValueError, match="LossScaleOptimizer"):
        model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[GradientMonitorCallback(tmp_path)])


@pytest.mark.parametrize("source", ["arrays", "dataset"])
def test_poisoned_sample_named_at_the_peak_and_skip_listed(tmp_path, source):
    dataset = keras_sample_ids.train_poisoned(tmp_path / "run", source)
    keras_sample_ids.check_poisoned(tmp_path / "run", dataset, tmp_path / "skip.json")


# Keras' torch trainer runs one step per execution only
@pytest.mark.parametrize("source, steps_per_execution",
                         [("arrays", 1), ("dataset", 1)] + ([("dataset", 4)] if BACKEND == "jax" else []))
def test_recorded_ids_are_the_samples_each_step_trained_on(tmp_path, source, steps_per_execution):
    keras_sample_ids.train_identity(tmp_path, source, steps_per_execution)
    keras_sample_ids.check_identity(tmp_path, shuffled=source == "dataset")


def test_sample_ids_over_two_fits_from_initial_epoch(tmp_path):
    keras_sample_ids.check_two_fits(tmp_path)


class MomentRecorder(keras.callbacks.Callback):
    """The optimizer's first and second moments after every step, read from its own variables."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        self.names = (first, second)
        self.after: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

    def on_train_batch_end(self, batch, logs=None):
        if BACKEND == "jax":
            self.model.jax_state_sync()  # JAX keeps the state outside the variables between steps
        opt = self.model.optimizer
        self.after.append(tuple([np.array(keras.ops.convert_to_numpy(v)) for v in getattr(opt, name)]
                                for name in self.names))


@pytest.mark.parametrize("optimizer, first, second", [
    (keras.optimizers.AdamW, "_momentums", "_velocities"), (keras.optimizers.Adamax, "_m", "_u")])
def test_adam_moment_norms_equal_the_optimizer_state(tmp_path, optimizer, first, second):
    steps = 4
    x, y = data(steps)
    model = tiny_model()
    model.compile(optimizer=optimizer(0.01), loss="mse")
    moments = MomentRecorder(first, second)
    monitor = GradientMonitorCallback(tmp_path, every=1)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, moments])
    monitor.close()
    run = Run(str(tmp_path))
    assert sorted(run.metrics["exp_avg_norm"]) == list(range(steps))
    for step in range(steps):
        m, v = moments.after[step]
        for layer, idxs in zip(LAYERS, ([0, 1], [2, 3]), strict=True):
            assert run.layer("exp_avg_norm", step, layer) == pytest.approx(norm([m[i] for i in idxs]), rel=1e-5)
            assert run.layer("exp_avg_sq_norm", step, layer) == pytest.approx(norm([v[i] for i in idxs]), rel=1e-5)
            assert norm([v[i] for i in idxs]) > 0


def test_sgd_writes_no_moment_norms(tmp_path):
    x, y = data(3)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    monitor = GradientMonitorCallback(tmp_path, every=1)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    monitor.close()
    run = Run(str(tmp_path))
    assert sorted(run.layers) == [0, 1, 2]
    assert "exp_avg_norm" not in run.metrics and "exp_avg_sq_norm" not in run.metrics
