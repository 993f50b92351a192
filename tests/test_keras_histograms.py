"""Per-layer gradient histograms of GradientMonitorCallback in real ``model.fit`` runs, checked bin by bin against
:func:`tb_gradient_plugin.format.histogram_counts` of the gradients the step really took."""

from __future__ import annotations

import numpy as np
import pytest
from keras_env import keras, tf

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.keras import GradientMonitorCallback
from tb_gradient_plugin.runs import RunData, load_run

pytestmark = pytest.mark.slow


class WeightRecorder(keras.callbacks.Callback):
    """Saves all weights before every step (valid with steps_per_execution=1)."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[list[np.ndarray]] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append([np.array(w) for w in self.model.get_weights()])


def tape_counts(model: keras.Model, layers: dict[str, list], weights, xb, yb) -> np.ndarray:
    """Reference ``[layers, HIST_BINS]``: the gradient of ``train_step``'s loss at ``weights`` on one batch, by
    ``tf.GradientTape``, binned per layer by ``format.histogram_counts``."""
    model.set_weights(weights)
    with tf.GradientTape() as tape:
        y_pred = model(xb, training=True)
        loss = model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    by_id = {id(v): g.numpy() for v, g in zip(model.trainable_variables, grads, strict=True)}
    return np.stack([fmt.histogram_counts(np.concatenate([by_id[id(v)].ravel() for v in vs]))
                     for vs in layers.values()])


def load(tmp_path) -> RunData:
    run = load_run(str(tmp_path / "train"))
    assert run.warnings == []
    return run


def layer_sizes(layers: dict[str, list]) -> np.ndarray:
    return np.array([sum(int(np.prod(v.shape)) for v in vs) for vs in layers.values()])


# ----------------------------------------------------------------------------------------------------------- tests


def test_histograms_equal_the_reference_binning_of_the_tape_gradients(tmp_path):
    """Every second step of a real fit: each layer's counts equal ``format.histogram_counts`` of the tf.GradientTape
    gradient on the same batch and weights; every entry of every layer is counted on the same bins at every step; the
    run store exposes them as ``RunData.histograms`` and ``hist_steps`` next to the norms of every step."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4, 4, 2)),
        keras.layers.Conv2D(3, 3, activation="tanh", name="conv"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(5, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-2), name="fc"),
        keras.layers.Dense(1, name="out"),
    ])
    layers = {name: model.get_layer(name).trainable_weights for name in ("conv", "fc", "out")}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=False)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 4, 4, 2)).astype("float32"), rng.normal(size=(24, 1)).astype("float32")
    recorder = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path, every=1, histograms_every=2)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[recorder, monitor])
    monitor.close()

    run = load(tmp_path)
    assert run.layers == list(layers)
    assert run.steps.tolist() == list(range(6))
    assert run.hist_steps.tolist() == [0, 2, 4]
    assert run.histograms.shape == (3, len(layers), fmt.HIST_BINS)
    sizes = layer_sizes(layers)
    for i, step in enumerate(run.hist_steps):
        counts = run.histograms[i]
        np.testing.assert_array_equal(counts.sum(axis=1), sizes)
        batch = slice((step % 3) * 8, (step % 3 + 1) * 8)
        np.testing.assert_array_equal(counts, tape_counts(model, layers, recorder.before[step], x[batch], y[batch]))
        assert counts[:, fmt.HIST_NONFINITE].sum() == 0
    # The entries really spread over several decades (the test would be weak if all sat in one bin).
    assert np.count_nonzero(run.histograms.sum(axis=(0, 1))) >= 6


class Echo(keras.layers.Layer):
    """y = sum(x[:, lo:hi] * w): with the loss ``y_pred`` on batches of one, the gradient of ``w`` is exactly its
    slice of the input, so the test chooses every gradient entry (bin edges, zeros, NaN, Inf)."""

    def __init__(self, lo: int, hi: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lo, self.hi = lo, hi

    def build(self, input_shape):
        self.w = self.add_weight(shape=(self.hi - self.lo,), initializer="ones")

    def call(self, x):
        return tf.reduce_sum(x[:, self.lo:self.hi] * self.w, axis=-1, keepdims=True)


def edge_values() -> np.ndarray:
    """float32 magnitudes at and around every bin edge (exact powers of ten included), signed, plus zeros."""
    out = [0.0, -0.0, 1.0, 10.0, 1e10, -1e-3, 1e-30, 3e13]
    for edge in fmt.HIST_LOG10_EDGES:
        x = np.float32(10.0 ** edge)
        out += [np.nextafter(x, np.float32(0)), x, np.nextafter(x, np.float32(np.inf))]
    return np.array(out, np.float32) * np.where(np.arange(len(out)) % 2, 1, -1).astype(np.float32)


def test_bin_edges_nonfinite_entries_xla_steps_per_execution_and_loss_scaling(tmp_path):
    """XLA, steps_per_execution=3 and a LossScaleOptimizer, with gradient entries on both sides of every bin edge:
    each histogram step's counts equal the reference binning of the *unscaled* gradient, bit for bit. A step whose
    gradient holds NaN and Inf counts them in the non-finite bin (equal to the recorded non-finite count) and is
    recorded as skipped. With ``every=3, histograms_every=2`` the recorded steps are the union of both cadences."""
    values = edge_values()
    half = len(values) // 2
    rng = np.random.default_rng(1)
    x = np.stack([rng.permutation(values) for _ in range(7)])
    x[4, [3, 40, 90]] = [np.nan, np.inf, -np.inf]
    inputs = keras.Input((len(values),))
    outputs = keras.layers.Add(name="add")([Echo(0, half, name="a")(inputs), Echo(half, len(values), name="b")(inputs)])
    model = keras.Model(inputs, outputs)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=2.0 ** 8)
    model.compile(optimizer=optimizer, loss=lambda y_true, y_pred: y_pred, jit_compile=True, steps_per_execution=3)
    monitor = GradientMonitorCallback(tmp_path, every=3, histograms_every=2)
    model.fit(x, np.zeros((7, 1), "float32"), batch_size=1, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    monitor.close()

    run = load(tmp_path)
    assert run.layers == ["a", "b"]
    assert run.steps.tolist() == [0, 2, 3, 4, 6]
    assert run.hist_steps.tolist() == [0, 2, 4, 6]
    for i, step in enumerate(run.hist_steps):
        expected = np.stack([fmt.histogram_counts(x[step, :half]), fmt.histogram_counts(x[step, half:])])
        np.testing.assert_array_equal(run.histograms[i], expected)
    i4, s4 = run.hist_steps.tolist().index(4), run.steps.tolist().index(4)
    assert run.histograms[i4][:, fmt.HIST_NONFINITE].tolist() == [2, 1]
    np.testing.assert_array_equal(run.layer_metrics["nonfinite_count"][s4], [2, 1])
    assert run.series["step_skipped"].values[run.series["step_skipped"].steps.tolist().index(4)] == 1
    scales = dict(zip(run.series["loss_scale"].steps.tolist(), run.series["loss_scale"].values.tolist(), strict=True))
    assert scales[0] == 2.0 ** 8 and scales[6] == 2.0 ** 7  # the scale really changed, the counts did not


class SqrtDense(keras.layers.Layer):
    """y = x @ where(w < 0, 0, w ** 0.5): a finite forward whose gradient is Inf where w == 0 and NaN where w < 0."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 3), initializer="ones")

    def call(self, x):
        return x @ tf.where(self.w < 0, tf.zeros_like(self.w), self.w ** 0.5)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_nan_and_inf_gradient_entries_land_in_the_nonfinite_bin(tmp_path, run_eagerly):
    """NaN and Inf gradient entries are counted in the non-finite bin only (as many as the recorded non-finite
    count), the finite ones where the reference puts them; the same in a traced and an eager fit."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4,)), SqrtDense(name="sqrt"), keras.layers.Dense(1, name="out")])
    weights = np.ones((4, 3), "float32")
    weights[[0, 2, 3], [1, 1, 2]] = -1.0  # three NaN entries
    weights[[1, 2], [0, 2]] = 0.0  # two Inf entries
    model.get_layer("sqrt").set_weights([weights])
    layers = {"sqrt": model.get_layer("sqrt").trainable_weights, "out": model.get_layer("out").trainable_weights}
    model.compile(optimizer="sgd", loss="mse", jit_compile=False, run_eagerly=run_eagerly)
    x, y = np.ones((4, 4), "float32"), np.zeros((4, 1), "float32")
    recorder = WeightRecorder()
    monitor = GradientMonitorCallback(tmp_path, histograms_every=1)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[recorder, monitor])
    monitor.close()

    run = load(tmp_path)
    assert run.hist_steps.tolist() == [0]
    counts = run.histograms[0]
    reference = tape_counts(model, layers, recorder.before[0], x, y)
    np.testing.assert_array_equal(counts, reference)
    assert counts[:, fmt.HIST_NONFINITE].tolist() == [5, 0]
    np.testing.assert_array_equal(run.layer_metrics["nonfinite_count"][0], [5, 0])
    np.testing.assert_array_equal(counts.sum(axis=1), layer_sizes(layers))


@pytest.mark.parametrize("bad", [-1, True, 1.5, "10"])
def test_histograms_every_must_be_a_non_negative_integer(tmp_path, bad):
    with pytest.raises(ValueError, match="histograms_every"):
        GradientMonitorCallback(tmp_path, histograms_every=bad)
