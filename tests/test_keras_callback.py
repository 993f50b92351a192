"""GradientMonitorCallback in real ``model.fit`` runs, checked against ``tf.GradientTape`` and saved weights."""

from __future__ import annotations

import glob
import math
import os
from collections import defaultdict

import numpy as np
import pytest
from keras_env import keras, tf

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.keras import GradientMonitorCallback
from tb_gradient_plugin.reader import EventFileReader

#: The per-layer metrics the Keras callback records with an Adam-like optimizer: all of the format's.
KERAS_LAYER_METRICS = tuple(fmt.LAYER_METRICS)

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------------------- helpers


class Run:
    """Everything our reader decodes from the event files of one directory, by step."""

    def __init__(self, directory: str) -> None:
        self.layers: dict[int, tuple[str, ...]] = {}
        self.metrics: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.scalars: dict[str, dict[int, float]] = defaultdict(dict)
        self.other_scalars: dict[str, dict[int, float]] = defaultdict(dict)
        self.problems = []
        layouts: dict[str, tuple[str, ...]] = {}
        files = sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))
        assert files, f"no event files in {directory}"
        for path in files:
            reader = EventFileReader(path, layouts)
            batch = reader.read()
            reader.finish()
            self.problems += reader.problems
            for rec in batch.layer_records:
                assert self.layers.setdefault(rec.step, rec.layers) == rec.layers
                self.metrics[rec.metric][rec.step] = rec.values
            for rec in batch.scalars:
                (self.scalars if rec.ours else self.other_scalars)[rec.tag][rec.step] = rec.value

    @property
    def steps(self) -> list[int]:
        return sorted(self.layers)

    def layer(self, metric: str, step: int, name: str) -> float:
        return float(self.metrics[metric][step][self.layers[step].index(name)])


class WeightRecorder(keras.callbacks.Callback):
    """Saves all weights before every step and after the last one (valid with steps_per_execution=1)."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[list[np.ndarray]] = []
        self.final: list[np.ndarray] | None = None

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append([np.array(w) for w in self.model.get_weights()])

    def on_train_end(self, logs=None):
        self.final = [np.array(w) for w in self.model.get_weights()]

    def weights_after(self, i: int) -> list[np.ndarray]:
        return self.before[i + 1] if i + 1 < len(self.before) else self.final


def conv_model(seed: int = 0) -> tuple[keras.Model, dict[str, list]]:
    """A conv net with batch norm, an L2-regularised nested head, and its expected layer -> variables map."""
    keras.utils.set_random_seed(seed)
    head = keras.Sequential(
        [keras.layers.Dense(6, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-2), name="fc1"),
         keras.layers.Dense(1, name="out")], name="head")
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.Flatten(name="flat")(h)
    model = keras.Model(inputs, head(h), name="convnet")
    layers = {
        "conv": model.get_layer("conv").trainable_weights,
        "bn": model.get_layer("bn").trainable_weights,
        "head/fc1": head.get_layer("fc1").trainable_weights,
        "head/out": head.get_layer("out").trainable_weights,
    }
    return model, layers


def data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 2)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def tape_reference(model, layers, weights, xb, yb, scale: float = 1.0):
    """Per-layer gradient norms / max|g|, total norm and loss at ``weights`` on one batch, by tf.GradientTape."""
    model.set_weights(weights)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(yb, tf.cast(model(xb, training=True), "float32"))
        loss = loss + tf.add_n(model.losses) if model.losses else loss
        scaled = loss * scale
    grads = [g.numpy().astype(np.float64) / scale for g in tape.gradient(scaled, variables)]
    by_id = {id(v): g for v, g in zip(variables, grads, strict=True)}
    norms = {name: math.sqrt(sum(float(np.sum(by_id[id(v)] ** 2)) for v in vs)) for name, vs in layers.items()}
    maxes = {name: max(float(np.max(np.abs(by_id[id(v)]))) for v in vs) for name, vs in layers.items()}
    total = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads))
    return norms, maxes, total, float(loss)


def layer_norms(model, layers, weights) -> dict[str, float]:
    """Per-layer L2 norm of the trainable variables in a ``model.get_weights()`` list."""
    index = {id(v): i for i, v in enumerate(model.weights)}
    return {name: math.sqrt(sum(float(np.sum(weights[index[id(v)]].astype(np.float64) ** 2)) for v in vs))
            for name, vs in layers.items()}


def layer_deltas(model, layers, before, after) -> dict[str, float]:
    index = {id(v): i for i, v in enumerate(model.weights)}
    return {name: math.sqrt(sum(float(np.sum((after[index[id(v)]].astype(np.float64)
                                              - before[index[id(v)]].astype(np.float64)) ** 2)) for v in vs))
            for name, vs in layers.items()}


# ----------------------------------------------------------------------------------------------------------- tests


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "sgd_momentum_clipnorm": lambda: keras.optimizers.SGD(5e-2, momentum=0.9, clipnorm=0.5),
    "adamw_schedule": lambda: keras.optimizers.AdamW(
        keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=2, decay_rate=0.5), weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_recorded_statistics_equal_gradient_tape_and_saved_weights(tmp_path, opt_name):
    """Every step of a real fit: per-layer grad norms, max|g|, total norm and loss equal tf.GradientTape on the same
    batch and weights; param norms and update norms (so update ratios) equal the saved weights before and after."""
    model, layers = conv_model()
    optimizer = OPTIMIZERS[opt_name]()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    x, y = data()
    recorder = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path, every=1)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[recorder, monitor])
    monitor.close()

    run = Run(str(tmp_path / "train"))
    assert run.problems == []
    assert run.steps == list(range(6))
    for step in run.steps:
        assert run.layers[step] == tuple(layers)
        xb, yb = x[(step % 3) * 8:(step % 3 + 1) * 8], y[(step % 3) * 8:(step % 3 + 1) * 8]
        before, after = recorder.before[step], recorder.weights_after(step)
        norms, maxes, total, loss = tape_reference(model, layers, before, xb, yb)
        params = layer_norms(model, layers, before)
        deltas = layer_deltas(model, layers, before, after)
        for name in layers:
            assert run.layer("grad_norm", step, name) == pytest.approx(norms[name], rel=1e-4)
            assert run.layer("grad_max_abs", step, name) == pytest.approx(maxes[name], rel=1e-4)
            assert run.layer("nonfinite_count", step, name) == 0
            assert run.layer("param_norm", step, name) == pytest.approx(params[name], rel=1e-6)
            assert run.layer("update_norm", step, name) == pytest.approx(deltas[name], rel=1e-5, abs=1e-12)
            ratio = run.layer("update_norm", step, name) / run.layer("param_norm", step, name)
            assert ratio == pytest.approx(deltas[name] / params[name], rel=1e-5)
            assert deltas[name] > 0
        assert run.scalars["total_grad_norm"][step] == pytest.approx(total, rel=1e-4)
        assert run.scalars["loss"][step] == pytest.approx(loss, rel=1e-4)
        model.optimizer.iterations.assign(step)  # the learning rate schedule is evaluated at the step's iteration
        expected_lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        assert run.scalars["lr"][step] == pytest.approx(expected_lr, rel=1e-6)
    assert "loss_scale" not in run.scalars and "step_skipped" not in run.scalars


def test_steps_per_execution_and_xla_record_the_same_steps_and_values(tmp_path):
    """With jit_compile and steps_per_execution=3 (the epoch's 5 batches end in a short execution), every logged step
    of ``every=2`` is recorded, with the values of an identical plain run (which the tape test validates)."""
    x, y = data(40)
    runs = {}
    for name, kwargs in (("plain", {"jit_compile": False}), ("xla_spe", {"jit_compile": True,
                                                                          "steps_per_execution": 3})):
        model, _ = conv_model(seed=3)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", **kwargs)
        monitor = GradientMonitorCallback(tmp_path / name, every=2)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
        monitor.close()
        runs[name] = Run(str(tmp_path / name / "train"))
    plain, fast = runs["plain"], runs["xla_spe"]
    assert fast.problems == []
    assert plain.steps == fast.steps == [0, 2, 4, 6, 8]
    for step in plain.steps:
        for metric in KERAS_LAYER_METRICS:
            np.testing.assert_allclose(fast.metrics[metric][step], plain.metrics[metric][step], rtol=2e-3, atol=1e-7)
        for metric in ("loss", "total_grad_norm", "lr"):
            assert fast.scalars[metric][step] == pytest.approx(plain.scalars[metric][step], rel=2e-3)


def test_diverging_run_shows_the_explosion_in_the_file(tmp_path):
    """A deep ReLU net at a high learning rate: the file shows the norms growing by orders of magnitude, then
    non-finite gradients counted per layer (with max|g| and norms non-finite there) and a non-finite loss."""
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(128, 16)).astype("float32"), rng.normal(size=(128, 1)).astype("float32")
    model = keras.Sequential([keras.Input((16,))]
                             + [keras.layers.Dense(32, activation="relu", kernel_initializer="he_normal")
                                for _ in range(8)] + [keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    monitor = GradientMonitorCallback(tmp_path)
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    monitor.close()

    run = Run(str(tmp_path / "train"))
    assert run.steps == list(range(8))
    total = np.array([run.scalars["total_grad_norm"][s] for s in run.steps])
    finite = total[np.isfinite(total)]
    assert finite.max() > 1e3 * finite[0]
    counts = np.stack([run.metrics["nonfinite_count"][s] for s in run.steps])
    bad_steps = np.flatnonzero(counts.sum(axis=1) > 0)
    assert bad_steps.size > 0
    first_bad = run.steps[bad_steps[0]]
    assert not math.isfinite(run.scalars["total_grad_norm"][first_bad])
    bad_layers = counts[bad_steps[0]] > 0
    assert not np.any(np.isfinite(run.metrics["grad_norm"][first_bad][bad_layers]))
    assert not np.any(np.isfinite(run.metrics["grad_max_abs"][first_bad][bad_layers]))
    assert np.all(np.isfinite(run.metrics["grad_norm"][first_bad][~bad_layers]))
    assert not math.isfinite(run.scalars["loss"][run.steps[-1]])


class SqrtDense(keras.layers.Layer):
    """y = x @ where(w > 0, w ** 0.5, 0): finite forward, but d/dw is NaN exactly where w < 0."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 3), initializer="ones")

    def call(self, x):
        return x @ tf.where(self.w > 0, self.w ** 0.5, tf.zeros_like(self.w))


def test_nonfinite_entries_are_counted_exactly_per_layer(tmp_path):
    model = keras.Sequential([keras.Input((4,)), SqrtDense(name="sqrt"), keras.layers.Dense(1, name="out")])
    weights = np.ones((4, 3), "float32")
    weights[[0, 2, 3], [1, 1, 2]] = -1.0
    model.get_layer("sqrt").set_weights([weights])
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    x, y = np.ones((4, 4), "float32"), np.ones((4, 1), "float32")
    monitor = GradientMonitorCallback(tmp_path)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
    monitor.close()
    run = Run(str(tmp_path / "train"))
    assert run.layers[0] == ("sqrt", "out")
    assert run.layer("nonfinite_count", 0, "sqrt") == 3
    assert run.layer("nonfinite_count", 0, "out") == 0
    assert math.isnan(run.layer("grad_max_abs", 0, "sqrt"))
    assert math.isfinite(run.layer("grad_norm", 0, "out"))
    assert math.isfinite(run.scalars["loss"][0])


def test_mixed_precision_records_unscaled_norms_and_overflow_skips(tmp_path):
    """A LossScaleOptimizer starting at 2**24 overflows float16 for a few steps: those are recorded as skipped (loss
    scale halving, nothing applied); applied steps carry unscaled norms equal to tf.GradientTape's."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(16, activation="relu", dtype="mixed_float16", name="a"),
                              keras.layers.Dense(1, dtype="float32", name="b")])
    layers = {"a": model.get_layer("a").trainable_weights, "b": model.get_layer("b").trainable_weights}
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3), initial_scale=2.0 ** 24)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    recorder = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[recorder, monitor])
    monitor.close()

    run = Run(str(tmp_path / "train"))
    assert run.steps == list(range(16))
    skipped = [run.scalars["step_skipped"][s] for s in run.steps]
    scales = [run.scalars["loss_scale"][s] for s in run.steps]
    assert scales[0] == 2.0 ** 24
    assert 0 < sum(skipped) < len(skipped) and skipped[0] == 1
    for step in run.steps:
        before, after = recorder.before[step], recorder.weights_after(step)
        deltas = layer_deltas(model, layers, before, after)
        if skipped[step]:
            assert np.sum(run.metrics["nonfinite_count"][step]) > 0
            assert all(run.layer("update_norm", step, n) == 0 == deltas[n] for n in layers)
            if step + 1 in run.scalars["loss_scale"]:
                assert scales[step + 1] == scales[step] / 2
            continue
        assert np.all(run.metrics["nonfinite_count"][step] == 0)
        xb, yb = x[step * 4:(step + 1) * 4], y[step * 4:(step + 1) * 4]
        norms, _, total, loss = tape_reference(model, layers, before, xb, yb, scale=scales[step])
        for name in layers:
            assert run.layer("grad_norm", step, name) == pytest.approx(norms[name], rel=1e-2)
            assert run.layer("update_norm", step, name) == pytest.approx(deltas[name], rel=1e-5)
        assert run.scalars["total_grad_norm"][step] == pytest.approx(total, rel=1e-2)
        assert run.scalars["loss"][step] == pytest.approx(loss, rel=1e-2)
        assert run.scalars["total_grad_norm"][step] < 1e3  # unscaled: nowhere near the 2**15-ish loss scale


def test_frozen_and_unfrozen_layers_and_a_shared_run_with_keras_tensorboard(tmp_path):
    """One callback over four fits (all trainable; middle layer frozen and recompiled; unfrozen again; once more
    without recompiling): steps keep counting, the frozen layer is absent from its steps, the last fit reuses the
    traced function, and Keras' own TensorBoard callback shares log_dir/train. Between fits the hooks are off (a fit
    without the callback writes nothing); ``close()`` gives the optimizer its own methods back."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="d1"), keras.layers.Dense(4, name="d2"),
                              keras.layers.Dense(1, name="d3")])
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    monitor = GradientMonitorCallback(tmp_path, every=1)
    board = keras.callbacks.TensorBoard(str(tmp_path), update_freq="epoch")
    frozen_unchanged, optimizers, functions = [], [], []
    for trainable, recompile in ((True, True), (False, True), (True, True), (True, False)):
        model.get_layer("d2").trainable = trainable
        if recompile:
            model.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse", jit_compile=False)
        frozen_before = model.get_layer("d2").get_weights()[0].copy()
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor, board])
        frozen_unchanged.append(np.array_equal(frozen_before, model.get_layer("d2").get_weights()[0]))
        optimizers.append(model.optimizer)
        functions.append(model.train_function)
    assert frozen_unchanged == [False, True, False, False]
    assert all("apply" not in vars(opt) and "scale_loss" not in vars(opt) for opt in optimizers[:2])
    assert functions[3] is functions[2]  # the fourth fit did not trace again

    train_dir = str(tmp_path / "train")
    monitor._writer.flush()
    size_before = sum(os.path.getsize(p) for p in glob.glob(train_dir + "/events.out.tfevents.*"))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert sum(os.path.getsize(p) for p in glob.glob(train_dir + "/events.out.tfevents.*")) == size_before
    monitor.close()
    assert "apply" not in vars(model.optimizer) and "scale_loss" not in vars(model.optimizer)
    assert model.train_function is not functions[3]

    run = Run(train_dir)
    assert run.problems == []
    assert run.steps == list(range(8))
    all_layers, unfrozen = ("d1", "d2", "d3"), ("d1", "d3")
    assert [run.layers[s] for s in run.steps] == [all_layers] * 2 + [unfrozen] * 2 + [all_layers] * 4
    assert set(run.other_scalars) >= {"epoch_loss"}  # Keras' own summaries, decoded from the same run directory
    assert len([p for p in glob.glob(train_dir + "/events.out.tfevents.*") if not p.endswith(".v2")]) == 1


def test_reader_decodes_every_metric_like_any_writer_run(tmp_path):
    """The plugin's reader sees the full format (all per-layer metrics, loss, total norm, lr) and nothing else."""
    model, layers = conv_model(seed=5)
    model.compile(optimizer="adam", loss="mse", jit_compile=False)
    x, y = data(16)
    monitor = GradientMonitorCallback(tmp_path, every=3)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[monitor])
    monitor.close()
    files = glob.glob(str(tmp_path / "train" / "events.out.tfevents.*"))
    assert len(files) == 1
    reader = EventFileReader(files[0])
    batch = reader.read()
    reader.finish()
    assert reader.problems == [] and batch.other_tags == set()
    assert {r.metric for r in batch.layer_records} == set(KERAS_LAYER_METRICS)
    assert {r.step for r in batch.layer_records} == {0, 3, 6}
    assert {(r.tag, r.ours) for r in batch.scalars} == {("loss", True), ("total_grad_norm", True), ("lr", True),
                                                         ("epoch", True), ("batch_index", True)}
    assert all(r.layers == tuple(layers) and r.values.dtype == np.float32 for r in batch.layer_records)


class MomentRecorder(keras.callbacks.Callback):
    """The optimizer's first and second moments after every step, read from its own variables."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        self.names = (first, second)
        self.after: list[tuple[list[np.ndarray], ...]] = []

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        self.after.append(tuple([np.array(v.numpy()) for v in getattr(opt, name)] for name in self.names))


def _check_moment_norms(run: Run, layers: dict[str, list], optimizer, after: list, steps: list[int]) -> None:
    """The recorded moment norms at ``steps`` are those of the optimizer's moments after each step, per layer."""
    assert sorted(run.metrics["exp_avg_norm"]) == sorted(run.metrics["exp_avg_sq_norm"]) == steps
    for step in steps:
        for name, variables in layers.items():
            index = [optimizer._get_variable_index(v) for v in variables]
            for metric, values in zip(("exp_avg_norm", "exp_avg_sq_norm"), after[step], strict=True):
                expected = math.sqrt(sum(float(np.sum(values[i].astype(np.float64) ** 2)) for i in index))
                assert expected > 0
                assert run.layer(metric, step, name) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("optimizer, first, second", [
    (keras.optimizers.Adam, "_momentums", "_velocities"), (keras.optimizers.Adamax, "_m", "_u")])
def test_adam_moment_norms_equal_the_optimizer_state_after_the_step(tmp_path, optimizer, first, second):
    model, layers = conv_model(seed=4)
    opt = optimizer(1e-2)
    model.compile(optimizer=opt, loss="mse", jit_compile=True)
    x, y = data(16)
    moments = MomentRecorder(first, second)
    monitor = GradientMonitorCallback(tmp_path, every=2)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, moments])
    monitor.close()
    run = Run(str(tmp_path / "train"))
    _check_moment_norms(run, layers, opt, moments.after, [0, 2])


@pytest.mark.parametrize("case", ["guard", "loss scale"])
def test_adam_moment_norms_with_the_guard_and_under_a_loss_scale(tmp_path, case):
    """The guard's path (every step's gradients measured and judged in the step) and a LossScaleOptimizer (moments kept
    by its inner optimizer, a float16 model part) record the moments of the optimizer that applied the step."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(16, activation="relu", name="a",
                                                 dtype="mixed_float16" if case == "loss scale" else None),
                              keras.layers.Dense(1, dtype="float32", name="b")])
    layers = {"a": model.get_layer("a").trainable_weights, "b": model.get_layer("b").trainable_weights}
    adam = keras.optimizers.Adam(1e-2)
    opt = keras.optimizers.LossScaleOptimizer(adam, initial_scale=2.0 ** 6) if case == "loss scale" else adam
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(32, 8)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")

    class Moments(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.after: list = []

        def on_train_batch_end(self, batch, logs=None):
            self.after.append([[np.array(v.numpy()) for v in getattr(adam, name)]
                               for name in ("_momentums", "_velocities")])

    moments = Moments()
    monitor = GradientMonitorCallback(tmp_path, every=2, on_explosion="skip" if case == "guard" else None)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, moments])
    monitor.close()
    run = Run(str(tmp_path / "train"))
    if case == "guard":
        assert set(run.scalars["guard_action"].values()) == {0.0}  # a healthy run: every step applied
    _check_moment_norms(run, layers, adam, moments.after, [0, 2, 4, 6])


def test_sgd_writes_no_moment_norms(tmp_path):
    model, _ = conv_model(seed=4)
    model.compile(optimizer=keras.optimizers.SGD(1e-2, momentum=0.9), loss="mse")
    x, y = data(8)
    monitor = GradientMonitorCallback(tmp_path)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
    monitor.close()
    run = Run(str(tmp_path / "train"))
    assert run.steps == [0, 1]
    assert "exp_avg_norm" not in run.metrics and "exp_avg_sq_norm" not in run.metrics


class OwnTrainStep(keras.Model):
    """A user's own train_step that applies gradients itself and never calls ``optimizer.scale_loss``."""

    def train_step(self, data):
        xb, yb = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((self(xb, training=True) - yb) ** 2)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return {"loss": loss}


@pytest.mark.parametrize("kind", ["run_eagerly", "own_train_step"])
def test_eager_fit_and_a_custom_train_step_are_recorded(tmp_path, kind):
    keras.utils.set_random_seed(6)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1, name="o")(keras.layers.Dense(3, name="h")(inputs))
    model = OwnTrainStep(inputs, outputs) if kind == "own_train_step" else keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse", run_eagerly=kind == "run_eagerly")
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    recorder = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path, every=2)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[recorder, monitor])
    monitor.close()
    run = Run(str(tmp_path / "train"))
    assert run.steps == [0, 2, 4, 6]
    layers = {"h": model.get_layer("h").trainable_weights, "o": model.get_layer("o").trainable_weights}
    for step in run.steps:
        assert run.layers[step] == ("h", "o")
        deltas = layer_deltas(model, layers, recorder.before[step], recorder.weights_after(step))
        assert run.layer("update_norm", step, "h") == pytest.approx(deltas["h"], rel=1e-5)
    # The batch loss reaches the monitor through optimizer.scale_loss, which an own train_step does not call.
    assert ("loss" in run.scalars) == (kind == "run_eagerly")
