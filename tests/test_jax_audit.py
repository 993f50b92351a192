"""Runs written by the JAX monitor from real Flax training, read like any other: the run store maps them, the offline
auditor finds the explosion where training produced one, and the plugin's routes report what the auditor does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nn = pytest.importorskip("flax.linen")

import jax.numpy as jnp  # noqa: E402
from tensorboard.backend import application  # noqa: E402
from tensorboard.plugins import base_plugin  # noqa: E402
from werkzeug.test import Client  # noqa: E402

from tb_gradient_plugin import detect, plugin  # noqa: E402
from tb_gradient_plugin.jax import GradientMonitor  # noqa: E402
from tb_gradient_plugin.run_report import report_json  # noqa: E402
from tb_gradient_plugin.runs import load_run  # noqa: E402

pytestmark = pytest.mark.slow
EXPLODE_AT = 150


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(16)(x))
        x = nn.tanh(nn.Dense(16)(x))
        return nn.Dense(1)(x)


def train(logdir: Path, explode_at: int | None, steps: int = 250) -> None:
    """SGD on a small regression; at ``explode_at`` one corrupted batch (labels off by 10^4)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = rng.normal(size=(256, 1)).astype("float32")
    model = Net()
    params = model.init(jax.random.key(0), x[:1])

    def loss_fn(p, xb, yb):
        return jnp.mean((model.apply(p, xb) - yb) ** 2)

    with GradientMonitor(logdir) as monitor:
        tx = monitor.wrap(optax.sgd(0.01))
        state = tx.init(params)

        @jax.jit
        def train_step(p, s, xb, yb):
            loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
            updates, s = tx.update(grads, s, p, loss=loss)
            return optax.apply_updates(p, updates), s

        for step in range(steps):
            i = np.random.default_rng(step).integers(0, 256, 32)
            scale = 1e4 if step == explode_at else 1.0
            params, state = train_step(params, state, x[i], y[i] * scale)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jax_runs")
    train(root / "clean", None)
    train(root / "exploded", EXPLODE_AT)
    return root


def test_the_auditor_finds_the_explosion_of_a_jax_run(logdir):
    run = load_run(str(logdir / "exploded"))
    assert run.source == "tb_gradient_plugin" and run.layers == ["params.Dense_0", "params.Dense_1", "params.Dense_2"]
    assert len(run.steps) == 250 and {"grad_norm", "param_norm", "update_norm"} <= set(run.layer_metrics)
    exe = Path(sys.executable).with_name("tb-gradient")
    proc = subprocess.run([str(exe), "audit", "--json", str(logdir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # findings
    runs = {r["run"]: r for r in json.loads(proc.stdout)["runs"]}
    assert not [e for e in runs["clean"]["episodes"] if e["kind"] in ("explosion", "nonfinite")]
    bad = [e for e in runs["exploded"]["episodes"] if e["kind"] in ("explosion", "nonfinite")]
    assert bad and bad[0]["start_step"] <= EXPLODE_AT <= bad[0]["end_step"]
    assert bad[0]["layers"][0]["name"] in run.layers
    assert runs["exploded"]["loss_spikes"] and runs["exploded"]["loss_spikes"][0]["step"] == EXPLODE_AT


def test_the_plugin_reports_what_the_auditor_does(logdir):
    context = base_plugin.TBContext(logdir=str(logdir), flags=Namespace(logdir_spec="", reload_interval=5.0))
    client = Client(application.TensorBoardWSGI([plugin.GradientsLoader().load(context)]))
    runs = {r["run"]: r for r in client.get("/data/plugin/gradients/runs").get_json()["runs"]}
    assert set(runs) == {"clean", "exploded"}
    assert runs["exploded"]["source"] == "tb_gradient_plugin" and runs["exploded"]["layers"] == 3
    doc = client.get("/data/plugin/gradients/episodes", query_string={"run": "exploded"}).get_json()
    run = load_run(str(logdir / "exploded"), "exploded")
    expect = json.loads(json.dumps(report_json(detect.detect(run), run.warnings, run)))
    for got, want in zip(doc["episodes"], expect["episodes"], strict=True):  # the route pages an episode's batches
        if "batches" in want:
            assert got.pop("batches_total") == len(want["batches"])
    assert doc == expect and any(e["start_step"] <= EXPLODE_AT <= e["end_step"] for e in doc["episodes"])


def test_adam_moment_norms_are_read_like_the_torch_ones(tmp_path):
    """A JAX run trained with AdamW carries Adam's moment norms under the registry's names: the run store maps them,
    the plugin offers them as heatmap metrics and serves them, and the auditor reads the run."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model = Net()
    params = model.init(jax.random.key(0), x[:1])

    def loss_fn(p):
        return jnp.mean((model.apply(p, x) - y) ** 2)

    with GradientMonitor(tmp_path / "adam") as monitor:
        tx = monitor.wrap(optax.adamw(1e-2))
        state = tx.init(params)

        @jax.jit
        def train_step(p, s):
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p, loss=loss)
            return optax.apply_updates(p, updates), s

        for _ in range(5):
            params, state = train_step(params, state)
    run = load_run(str(tmp_path / "adam"))
    assert {"exp_avg_norm", "exp_avg_sq_norm"} <= set(run.layer_metrics)
    assert run.layer_metrics["exp_avg_sq_norm"].shape == (5, 3)
    context = base_plugin.TBContext(logdir=str(tmp_path), flags=Namespace(logdir_spec="", reload_interval=5.0))
    client = Client(application.TensorBoardWSGI([plugin.GradientsLoader().load(context)]))
    entry = client.get("/data/plugin/gradients/runs").get_json()["runs"][0]
    assert {"exp_avg_norm", "exp_avg_sq_norm"} <= set(entry["metrics"])
    heat = client.get("/data/plugin/gradients/heatmap", query_string={"run": "adam", "metric": "exp_avg_sq_norm"})
    assert heat.status_code == 200 and heat.get_json()["layers"] == run.layers
    exe = Path(sys.executable).with_name("tb-gradient")
    proc = subprocess.run([str(exe), "audit", "--json", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    assert [r["run"] for r in json.loads(proc.stdout)["runs"]] == ["adam"]
