"""The JAX/Optax GradientMonitor on real training of small Flax models (Linen and NNX), read back from its files.

Every expected value is computed in the test from ``jax.grad`` of the same loss on the same batch and weights (taken
before the chain's clipping), from the parameters before and after the step, or from the format's reference binning.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
flax = pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tb_gradient_plugin import format as fmt  # noqa: E402
from tb_gradient_plugin.guard import GUARD_CALLBACK, GUARD_SKIP, GradientExplosionWarning  # noqa: E402
from tb_gradient_plugin.jax import GradientMonitor, discover_layers  # noqa: E402
from tb_gradient_plugin.jax import monitor as monitor_module  # noqa: E402
from tb_gradient_plugin.runs import load_run  # noqa: E402

STEPS = 12


# ------------------------------------------------------------------------------------------------------- helpers


class MLP(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.tanh(nn.Dense(self.width)(x))
        return nn.Dense(1)(x)


def data(n: int = 64, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(seed), (n, 8))
    return x, jnp.sin(x[:, :2].sum(1, keepdims=True))


def layer_of(path) -> str:
    """A layer name computed independently of the monitor: the path's keys without the leaf."""
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    return ".".join(keys[:-1])


def per_layer(tree, reduce) -> dict[str, float]:
    """``reduce`` over the concatenated entries of each layer's leaves (float64)."""
    parts: dict[str, list[np.ndarray]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts.setdefault(layer_of(path), []).append(np.asarray(leaf, np.float64).reshape(-1))
    return {name: reduce(np.concatenate(p)) for name, p in parts.items()}


def norms(tree) -> dict[str, float]:
    return per_layer(tree, lambda a: float(np.sqrt(np.sum(a * a))))


def recorded(run, metric: str, step: int) -> dict[str, float]:
    i = int(np.searchsorted(run.steps, step))
    assert run.steps[i] == step
    return dict(zip(run.layers, run.layer_metrics[metric][i].astype(np.float64).tolist(), strict=True))


def assert_close(got: dict[str, float], want: dict[str, float], rtol: float) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, err_msg=name)


class LinenLoop:
    """A jitted Linen training step through the wrapped optimizer, remembering what the test needs to check it."""

    def __init__(self, monitor: GradientMonitor, tx, *, pass_params: bool = True, pass_loss: bool = True) -> None:
        self.model = MLP()
        self.x, self.y = data()
        self.params = self.model.init(jax.random.key(1), self.x)
        self.tx = monitor.wrap(tx)
        self.state = self.tx.init(self.params)
        self.traces = 0

        def loss_fn(params, x, y):
            return jnp.mean((self.model.apply(params, x) - y) ** 2)

        self.reference = jax.jit(jax.value_and_grad(loss_fn))

        @jax.jit
        def train_step(params, state, x, y):
            self.traces += 1
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            kwargs = {"loss": loss} if pass_loss else {}
            updates, state = self.tx.update(grads, state, params if pass_params else None, **kwargs)
            return optax.apply_updates(params, updates), state, loss

        self.train_step = train_step
        self.history: list[dict] = []

    def step(self, x=None, y=None) -> None:
        x = self.x if x is None else x
        y = self.y if y is None else y
        before = self.params
        loss, grads = self.reference(before, x, y)
        self.params, self.state, _ = self.train_step(before, self.state, x, y)
        self.history.append({"before": before, "after": self.params, "grads": grads, "loss": float(loss),
                             "state": self.state})


@pytest.fixture(params=["per leaf", "together"])
def conds(request, monkeypatch):
    """Both layouts of the gradients' conds: one per leaf (the CPU backend's) and as few as possible (other
    backends', where each cond waits for the host); only the backend query is replaced, the traced code is real."""
    if request.param == "together":
        monkeypatch.setattr(monitor_module, "_one_cond_per_leaf", lambda: False)
    return request.param


# ------------------------------------------------------------------------------------------------- Flax training


def test_linen_values_equal_the_reference_before_clipping(tmp_path, conds):
    """Per layer and step: gradient norm, max |g|, parameter norm and loss equal jax.grad's on the same batch and
    weights although the chain clips (its total norm is far above the clip), and the update norm is the change
    apply_updates made."""
    clip = 0.01
    with GradientMonitor(tmp_path, every=1) as monitor:
        loop = LinenLoop(monitor, optax.chain(optax.clip_by_global_norm(clip), optax.adamw(1e-2)))
        for _ in range(STEPS):
            loop.step()
    assert monitor.layers == ("params.Dense_0", "params.Dense_1", "params.Dense_2", "params.Dense_3")
    run = load_run(str(tmp_path))
    assert run.layers == list(monitor.layers) and list(run.steps) == list(range(STEPS))
    for step, h in enumerate(loop.history):
        grad = norms(h["grads"])
        assert np.sqrt(sum(v * v for v in grad.values())) > 2 * clip  # clipping changed this step's gradients
        assert_close(recorded(run, "grad_norm", step), grad, 1e-5)
        assert_close(recorded(run, "grad_max_abs", step), per_layer(h["grads"], lambda a: float(np.abs(a).max())),
                     1e-6)
        assert_close(recorded(run, "param_norm", step), norms(h["before"]), 1e-5)
        change = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                        h["after"], h["before"])
        assert_close(recorded(run, "update_norm", step), norms(change), 1e-4)
        assert recorded(run, "nonfinite_count", step) == dict.fromkeys(grad, 0.0)
        np.testing.assert_allclose(run.series["loss"].values[step], h["loss"], rtol=1e-6)
        np.testing.assert_allclose(run.series["total_grad_norm"].values[step],
                                   np.sqrt(sum(v * v for v in grad.values())), rtol=1e-5)
    ratio = run.update_ratio()
    assert ratio is not None and np.isfinite(ratio).all() and (ratio > 0).all()


def test_nnx_optimizer_records_the_model_layers(tmp_path):
    """NNX: ``nnx.Optimizer`` over the wrapped transformation, ``optimizer.update(model, grads, loss=loss)`` inside
    ``nnx.jit``; layers are the attribute paths (``blocks.0``), in natural order, values equal ``nnx.grad``'s."""

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.stem = nnx.Linear(8, 16, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(11)])
            self.head = nnx.Linear(16, 1, rngs=rngs)
            self.calls = nnx.Variable(jnp.zeros((), jnp.int32))  # not a parameter: never monitored

        def __call__(self, x):
            x = nnx.tanh(self.stem(x))
            for block in self.blocks:
                x = nnx.tanh(block(x))
            return self.head(x)

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    model = Net(nnx.Rngs(0))
    x, y = data()
    with GradientMonitor(tmp_path, every=1) as monitor:
        optimizer = nnx.Optimizer(model, monitor.wrap(optax.adamw(1e-2)), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
            optimizer.update(model, grads, loss=loss)
            return loss

        refs = []
        for _ in range(5):
            before = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.Param))
            refs.append((nnx.grad(loss_fn)(model, x, y), before))
            train_step(model, optimizer, x, y)
    run = load_run(str(tmp_path))
    assert run.layers == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6",
                          "blocks.7", "blocks.8", "blocks.9", "blocks.10", "head", "stem"]
    for step, (grads, before) in enumerate(refs):
        assert_close(recorded(run, "grad_norm", step), norms(grads), 1e-5)
        assert_close(recorded(run, "param_norm", step), norms(before), 1e-5)
    assert int(optimizer.opt_state.step[...]) == 5  # the monitor's counter, in the optimizer state
    # Adam's moments, found in the NNX optimizer's state, as the last step left them
    assert_close(recorded(run, "exp_avg_sq_norm", 4), moment_norms(optimizer.opt_state, "nu"), 1e-5)


def test_every_10_writes_every_tenth_step_and_compiles_once(tmp_path, conds):
    with GradientMonitor(tmp_path, every=10) as monitor:
        loop = LinenLoop(monitor, optax.adamw(1e-3))
        for _ in range(50):
            loop.step()
    assert loop.traces == 1 and loop.train_step._cache_size() == 1
    run = load_run(str(tmp_path))
    assert list(run.steps) == [0, 10, 20, 30, 40]
    assert list(run.series["loss"].steps) == [0, 10, 20, 30, 40]
    assert_close(recorded(run, "grad_norm", 30), norms(loop.history[30]["grads"]), 1e-5)
    assert int(loop.state.step) == 50


def test_nan_gradients_are_counted_per_layer(tmp_path, conds):
    x, y = data()
    bad = x.at[3, 5].set(jnp.nan)  # one NaN input: every gradient entry it reaches is NaN
    with GradientMonitor(tmp_path) as monitor:
        loop = LinenLoop(monitor, optax.sgd(1e-2))
        loop.step()
        loop.step(x=bad)
    run = load_run(str(tmp_path))
    want = per_layer(loop.history[1]["grads"], lambda a: float((~np.isfinite(a)).sum()))
    assert sum(want.values()) > 0
    assert recorded(run, "nonfinite_count", 1) == want
    assert all(np.isnan(v) for name, v in recorded(run, "grad_norm", 1).items() if want[name] > 0)
    assert recorded(run, "nonfinite_count", 0) == dict.fromkeys(want, 0.0)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_huge_and_tiny_finite_gradients_are_measured_not_lost(tmp_path, conds, scale):
    """Gradients whose squares overflow (or underflow) float32 are measured scaled: finite and equal to the float64
    reference, on logged steps of the cond (every=2) as well as of an every-step monitor."""
    for every in (1, 2):
        with GradientMonitor(tmp_path / str(every), every=every) as monitor:
            loop = LinenLoop(monitor, optax.sgd(1e-40))
            for _ in range(3):
                loop.step(y=loop.y * scale)
        run = load_run(str(tmp_path / str(every)))
        for step in range(0, 3, every):
            grads = loop.history[step]["grads"]
            assert_close(recorded(run, "grad_norm", step), norms(grads), 1e-5)
            assert_close(recorded(run, "grad_max_abs", step), per_layer(grads, lambda a: float(np.abs(a).max())),
                         1e-6)
            assert recorded(run, "nonfinite_count", step) == dict.fromkeys(run.layers, 0.0)


@pytest.mark.parametrize("scale", [1e25, 1e-25])
def test_huge_and_tiny_parameters_and_updates_are_measured_and_a_frozen_layer_moves_by_zero(tmp_path, scale):
    """Parameters and updates whose squares overflow (or underflow) float32 are measured scaled: parameter and update
    norms equal the float64 reference of the weights before and after each step, with every=1 and on the logged steps
    of every=2. A layer the chain freezes (``set_to_zero``) records a zero update norm and its parameter norm."""
    rng = np.random.default_rng(0)
    start = {name: {"w": jnp.asarray(rng.normal(size=(32, 16)) * scale, jnp.float32),
                    "b": jnp.asarray(rng.normal(size=16) * scale, jnp.float32)} for name in ("dense", "frozen")}
    direction = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), start)

    def loss_fn(p):  # its gradient is ``direction``: the updates are 1e-3 * scale in size
        return sum(jnp.sum(a * d) for a, d in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(direction),
                                                   strict=True))

    labels = {"dense": {"w": "train", "b": "train"}, "frozen": {"w": "freeze", "b": "freeze"}}
    for every in (1, 2):
        with GradientMonitor(tmp_path / str(every), every=every) as monitor:
            tx = monitor.wrap(optax.multi_transform({"train": optax.sgd(1e-3 * scale), "freeze": optax.set_to_zero()},
                                                    labels))

            @jax.jit
            def train_step(p, s, tx=tx):
                loss, grads = jax.value_and_grad(loss_fn)(p)
                updates, s = tx.update(grads, s, p, loss=loss)
                return optax.apply_updates(p, updates), s

            params, state, history = start, tx.init(start), []
            for _ in range(3):
                after, state = train_step(params, state)
                history.append((params, after))
                params = after
        run = load_run(str(tmp_path / str(every)))
        assert list(run.steps) == list(range(0, 3, every))
        for step in run.steps.tolist():
            before, after = history[step]
            change = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                            after, before)
            assert norms(change)["frozen"] == 0.0 and norms(change)["dense"] > 0
            assert_close(recorded(run, "param_norm", step), norms(before), 1e-5)
            assert_close(recorded(run, "update_norm", step), norms(change), 1e-5)
            assert_close(recorded(run, "grad_norm", step), norms(direction), 1e-5)


def moment_norms(state, name: str) -> dict[str, float]:
    """Per layer, the norm of the ``name`` tree (``mu`` or ``nu``) of the one Adam state in an optimizer state."""
    found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: hasattr(x, "nu")) if hasattr(s, "nu")]
    assert len(found) == 1
    return norms(getattr(found[0], name))


@pytest.mark.parametrize("guard", [None, "skip"])
def test_adam_moment_norms_equal_the_optax_state(tmp_path, guard):
    """AdamW behind a clip and inject_hyperparams: per logged step and layer, the norms of Adam's first and second
    moment equal those of the state that step returned (the moments the step used)."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2))
    with GradientMonitor(tmp_path, every=2, on_explosion=guard) as monitor:
        loop = LinenLoop(monitor, tx)
        for _ in range(7):
            loop.step()
    run = load_run(str(tmp_path))
    assert list(run.steps) == [0, 2, 4, 6]
    for step in run.steps.tolist():
        state = loop.history[step]["state"]
        for metric, name in (("exp_avg_norm", "mu"), ("exp_avg_sq_norm", "nu")):
            want = moment_norms(state, name)
            assert all(v > 0 for v in want.values())
            assert_close(recorded(run, metric, step), want, 1e-5)
    assert moment_norms(loop.history[6]["state"], "nu") != moment_norms(loop.history[4]["state"], "nu")


def test_moments_of_a_partitioned_chain_and_none_without_adam(tmp_path):
    """multi_transform: Adam's layers get their moments, the SGD partition's get 0; plain SGD writes no moment tags."""
    labels = {"params": {f"Dense_{i}": "adam" if i < 2 else "sgd" for i in range(4)}}
    tx = optax.multi_transform({"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-2)}, labels)
    with GradientMonitor(tmp_path / "split") as monitor:
        loop = LinenLoop(monitor, tx)
        for _ in range(2):
            loop.step()
    run = load_run(str(tmp_path / "split"))
    got = recorded(run, "exp_avg_norm", 1)
    adam = [s for s in jax.tree_util.tree_leaves(loop.state.inner, is_leaf=lambda x: hasattr(x, "nu"))
            if hasattr(s, "nu")]
    mu = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), adam[0].mu,
                                is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    for i in range(2):
        layer = f"params.Dense_{i}"
        want = np.sqrt(sum(np.sum(a * a) for a in jax.tree_util.tree_leaves(mu["params"][f"Dense_{i}"])))
        np.testing.assert_allclose(got[layer], want, rtol=1e-5)
    assert got["params.Dense_2"] == 0.0 and got["params.Dense_3"] == 0.0
    with GradientMonitor(tmp_path / "sgd") as monitor:
        loop = LinenLoop(monitor, optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2, momentum=0.9)))
        loop.step()
    run = load_run(str(tmp_path / "sgd"))
    assert "grad_norm" in run.layer_metrics
    assert not {"exp_avg_norm", "exp_avg_sq_norm"} & set(run.layer_metrics)


def test_histograms_count_the_gradients_on_the_fixed_bins(tmp_path, conds):
    with GradientMonitor(tmp_path, every=2, histograms_every=3) as monitor:
        loop = LinenLoop(monitor, optax.adamw(1e-2))
        for _ in range(7):
            loop.step()
    run = load_run(str(tmp_path))
    assert list(run.hist_steps) == [0, 3, 6]
    assert list(run.steps) == [0, 2, 3, 4, 6]  # a histogram step is a logged step
    for k, step in enumerate(run.hist_steps):
        want = per_layer(loop.history[step]["grads"], fmt.histogram_counts)
        for j, name in enumerate(run.layers):
            np.testing.assert_array_equal(run.histograms[k, j], want[name], err_msg=f"{name} at {step}")


def test_learning_rate_is_the_one_each_step_used(tmp_path):
    """With ``optax.inject_hyperparams`` the rate is recorded, and at step t it is the rate step t applied: a schedule
    that raises it 10x at step 2 shows the new rate at step 2, where the update norm is that rate x the gradient's."""
    schedule = optax.piecewise_constant_schedule(0.01, {2: 10.0})
    with GradientMonitor(tmp_path) as monitor:
        loop = LinenLoop(monitor, optax.inject_hyperparams(optax.sgd)(learning_rate=schedule))
        for _ in range(4):
            loop.step()
    run = load_run(str(tmp_path))
    np.testing.assert_allclose(run.series["lr"].values, [0.01, 0.01, 0.1, 0.1], rtol=1e-6)
    for step in (1, 2):
        want = {k: schedule(step) * v for k, v in norms(loop.history[step]["grads"]).items()}
        assert_close(recorded(run, "update_norm", step), want, 1e-5)


def test_layer_names_filters_and_groups():
    """Paths without the leaf, in the tree's own order where it has one (Linen: call order), natural order otherwise;
    include / exclude / group_depth / group_by as in the PyTorch monitor."""
    w = jnp.ones((2, 2))
    tree = {"encoder": {"Dense_2": {"kernel": w}, "Dense_10": {"kernel": w, "bias": w[0]}},
            "head": {"kernel": w}, "scale": w[0]}
    assert discover_layers(tree).layers == ("encoder.Dense_2", "encoder.Dense_10", "head", "(root)")
    rebuilt = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), jax.tree_util.tree_leaves(tree))
    assert list(rebuilt["encoder"]) == ["Dense_10", "Dense_2"]  # jax's own order, as a traced tree has it
    assert discover_layers(rebuilt).layers[:2] == ("encoder.Dense_2", "encoder.Dense_10")  # natural order
    assert discover_layers(tree, include="encoder", exclude="10").layers == ("encoder.Dense_2",)
    grouped = discover_layers(tree, group_depth=1)
    assert grouped.layers == ("encoder", "head", "(root)")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [".".join(str(k.key) for k in path) for path, _ in leaves]
    assert dict(zip(names, grouped.leaf_layer, strict=True)) == {
        "encoder.Dense_10.bias": 0, "encoder.Dense_10.kernel": 0, "encoder.Dense_2.kernel": 0, "head.kernel": 1,
        "scale": 2}
    assert discover_layers(tree, group_by=lambda n: n.split("_")[0]).layers == ("encoder.Dense", "head", "(root)")
    with pytest.raises(ValueError, match="matches the include/exclude filters"):
        discover_layers(tree, include="decoder")
    with pytest.raises(ValueError, match="at most one of group_depth and group_by"):
        discover_layers(tree, group_depth=1, group_by=str)


# ------------------------------------------------------------------------------------------------------ the guard


def exploding_loop(tmp_path, on_explosion, at: int = 30) -> tuple[LinenLoop, GradientMonitor]:
    """30 ordinary steps, then one batch whose labels are 1e6 times too large."""
    monitor = GradientMonitor(tmp_path, every=5, on_explosion=on_explosion)
    loop = LinenLoop(monitor, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)))
    for _ in range(at):
        loop.step()
    return loop, monitor


def test_guard_skip_keeps_weights_and_optimizer_state(tmp_path, conds):
    loop, monitor = exploding_loop(tmp_path, "skip")
    inner_before = loop.state.inner
    loop.step(y=loop.y * 1e6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loop.history[-1]["after"], loop.history[-1]["before"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, loop.state.inner, inner_before)
    loop.step()  # training goes on
    changed = jax.tree_util.tree_map(lambda a, b: bool((np.asarray(a) != np.asarray(b)).any()),
                                     loop.history[-1]["after"], loop.history[-1]["before"])
    assert all(jax.tree_util.tree_leaves(changed))
    monitor.close()
    assert [(d.step, d.action) for d in monitor.guard.decisions] == [(30, GUARD_SKIP)]
    assert monitor.guard.decisions[0].episodes[0].kind == "explosion"
    run = load_run(str(tmp_path))
    # step 30 is not one `every=5` logs, but the guard acted on it: written with its gradients and the decision
    guard = dict(zip(run.series["guard_action"].steps.tolist(), run.series["guard_action"].values.tolist(),
                     strict=True))
    assert guard[30] == GUARD_SKIP and guard[25] == 0 and 31 not in guard
    assert recorded(run, "grad_norm", 30)["params.Dense_3"] > 1e4


def test_guard_skips_non_finite_gradients_from_the_first_step(tmp_path):
    """Non-finite gradients cross on the device before the detector has any baseline."""
    with GradientMonitor(tmp_path, on_explosion="skip") as monitor:
        loop = LinenLoop(monitor, optax.adamw(1e-2))
        loop.step(x=loop.x.at[0, 0].set(jnp.inf))
        jax.tree_util.tree_map(np.testing.assert_array_equal, loop.history[-1]["after"], loop.history[-1]["before"])
    assert [d.action for d in monitor.guard.decisions] == [GUARD_SKIP]


def test_guard_warn_applies_the_step_and_warns(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop, monitor = exploding_loop(tmp_path, "warn")
        loop.step(y=loop.y * 1e6)
        monitor.close()
    assert [w for w in caught if issubclass(w.category, GradientExplosionWarning) and "step 30" in str(w.message)]
    assert not np.array_equal(loop.history[-1]["after"]["params"]["Dense_3"]["bias"],
                              loop.history[-1]["before"]["params"]["Dense_3"]["bias"])


@pytest.mark.parametrize("answer", [None, "skip"])
def test_guard_callable_decides(tmp_path, answer):
    seen = []

    def on_explosion(episode):
        seen.append(episode)
        return answer

    loop, monitor = exploding_loop(tmp_path, on_explosion)
    loop.step(y=loop.y * 1e6)
    monitor.close()
    assert len(seen) == 1 and seen[0].start_step == 30
    same = np.array_equal(loop.history[-1]["after"]["params"]["Dense_3"]["bias"],
                          loop.history[-1]["before"]["params"]["Dense_3"]["bias"])
    assert same == (answer == "skip")
    assert [d.action for d in monitor.guard.decisions] == [GUARD_SKIP if answer else GUARD_CALLBACK]


# ------------------------------------------------------------------------------------------------------ bad input


def test_a_tree_without_arrays_is_refused(tmp_path):
    with GradientMonitor(tmp_path) as monitor:
        tx = monitor.wrap(optax.sgd(0.1))
        with pytest.raises(ValueError, match="no array leaves"):
            tx.init({"a": {"b": 1.0}})
        with pytest.raises(ValueError, match="no array leaves"):
            tx.init({})


def test_integer_leaves_are_skipped_with_a_warning(tmp_path):
    params = {"dense": {"kernel": jnp.ones((3, 2)), "count": jnp.zeros((), jnp.int32)}}
    with GradientMonitor(tmp_path) as monitor:
        tx = monitor.wrap(optax.set_to_zero())
        with pytest.warns(UserWarning, match="1 non-floating leaves are not monitored.*dense.count"):
            state = tx.init(params)
        grads = {"dense": {"kernel": jnp.full((3, 2), 2.0), "count": np.zeros((), jax.dtypes.float0)}}
        tx.update(grads, state, params)
    run = load_run(str(tmp_path))
    assert run.layers == ["dense"]
    np.testing.assert_allclose(run.layer_metrics["grad_norm"][0], [np.sqrt(6 * 4.0)])
    with GradientMonitor(tmp_path / "ints") as monitor:
        with pytest.raises(ValueError, match="no floating-point leaves"):
            monitor.wrap(optax.sgd(0.1)).init({"step": jnp.zeros((), jnp.int32)})


def test_a_closed_monitor_says_so(tmp_path):
    monitor = GradientMonitor(tmp_path)
    loop = LinenLoop(monitor, optax.sgd(0.1))
    loop.step()
    monitor.close()
    with pytest.raises(RuntimeError, match="GradientMonitor is closed"):
        loop.tx.init(loop.params)  # traced anew: refused at once
    with pytest.warns(RuntimeWarning, match="GradientMonitor is closed: step 1 .* not recorded"):
        loop.step()  # compiled before: it still trains, and says once that nothing is recorded
        jax.effects_barrier()
    with pytest.raises(RuntimeError, match="GradientMonitor is closed"):
        monitor.wrap(optax.sgd(0.1))
    assert list(load_run(str(tmp_path)).steps) == [0]


def test_an_error_on_the_host_is_raised_at_close_and_training_goes_on(tmp_path):
    """An exception in the guard's callable is not raised inside the compiled step (JAX would keep it and fail every
    later callback of the process): recording stops with a warning, and close() raises it."""
    def on_explosion(episode):
        raise KeyError("from the callable")

    loop, monitor = exploding_loop(tmp_path, on_explosion, at=25)
    with pytest.warns(RuntimeWarning, match="gradient recording stopped: KeyError"):
        loop.step(y=loop.y * 1e6)
        jax.effects_barrier()
    loop.step()
    with pytest.raises(RuntimeError, match="recording the gradient statistics failed: KeyError"):
        monitor.close()
    with GradientMonitor(tmp_path / "next") as other:  # ordered callbacks of the process still work
        LinenLoop(other, optax.sgd(0.1)).step()
    assert list(load_run(str(tmp_path / "next")).steps) == [0]


def test_update_without_params_records_update_norms_and_warns(tmp_path):
    with GradientMonitor(tmp_path) as monitor:
        loop = LinenLoop(monitor, optax.sgd(0.1), pass_params=False, pass_loss=False)
        with pytest.warns(UserWarning, match="without params: update norms are recorded, parameter norms"):
            loop.step()
        loop.step()
    run = load_run(str(tmp_path))
    assert "param_norm" not in run.layer_metrics and "loss" not in run.series
    want = norms(jax.tree_util.tree_map(lambda g: 0.1 * np.asarray(g, np.float64), loop.history[1]["grads"]))
    assert_close(recorded(run, "update_norm", 1), want, 1e-5)


def test_other_arguments_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="'raise' is not supported"):
        GradientMonitor(tmp_path, on_explosion="raise")
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        GradientMonitor(tmp_path, every=0)
    with GradientMonitor(tmp_path) as monitor:
        with pytest.raises(TypeError, match="optax.GradientTransformation"):
            monitor.wrap(lambda g: g)
        tx = monitor.wrap(optax.sgd(0.1))
        with pytest.raises(RuntimeError, match="already wraps"):
            monitor.wrap(optax.sgd(0.1))
        params = {"w": {"k": jnp.ones(3)}}
        state = tx.init(params)
        with pytest.raises(ValueError, match="loss must hold one value"):
            tx.update(params, state, params, loss=jnp.ones(3))
        with pytest.raises(TypeError, match="must come from this wrapped optimizer"):
            tx.update(params, optax.sgd(0.1).init(params), params)


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def test_the_package_does_not_import_jax_and_a_missing_extra_is_named():
    proc = run_python("""
        import sys
        import tb_gradient_plugin, tb_gradient_plugin.plugin, tb_gradient_plugin.auditor, tb_gradient_plugin.writer
        assert "jax" not in sys.modules and "optax" not in sys.modules, "imported jax"
        sys.modules["optax"] = None  # as if the extra were not installed
        try:
            import tb_gradient_plugin.jax
        except ImportError as err:
            print(err)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "tb_gradient_plugin.jax needs JAX and Optax" in proc.stdout and "[jax]" in proc.stdout


def test_sharded_arrays_give_global_norms(tmp_path):
    """Two devices, the kernel and the batch split across them: the recorded norms are those of the whole arrays."""
    proc = run_python(f"""
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from tb_gradient_plugin.jax import GradientMonitor
        from tb_gradient_plugin.runs import load_run
        assert jax.device_count() == 2
        mesh = Mesh(np.array(jax.devices()), ("d",))
        params = {{"dense": {{"kernel": jax.random.normal(jax.random.key(0), (8, 64)), "bias": jnp.zeros(64)}}}}
        params = jax.device_put(params, {{"dense": {{"kernel": NamedSharding(mesh, P(None, "d")),
                                                   "bias": NamedSharding(mesh, P("d"))}}}})
        x = jax.device_put(jax.random.normal(jax.random.key(1), (32, 8)), NamedSharding(mesh, P("d")))
        def loss_fn(p, x):
            return jnp.mean(jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2)
        monitor = GradientMonitor({str(tmp_path)!r})
        tx = monitor.wrap(optax.sgd(0.1))
        state = tx.init(params)
        @jax.jit
        def step(p, s, x):
            loss, g = jax.value_and_grad(loss_fn)(p, x)
            u, s = tx.update(g, s, p, loss=loss)
            return optax.apply_updates(p, u), s
        g = jax.grad(loss_fn)(params, x)
        assert len(g["dense"]["kernel"].sharding.device_set) == 2
        want = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree_util.tree_leaves(g)))
        pnorm = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree_util.tree_leaves(params)))
        params, state = step(params, state, x)
        monitor.close()
        run = load_run({str(tmp_path)!r})
        np.testing.assert_allclose(run.layer_metrics["grad_norm"][0, 0], want, rtol=1e-5)
        np.testing.assert_allclose(run.layer_metrics["param_norm"][0, 0], pnorm, rtol=1e-5)
        print("ok")
    """, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
