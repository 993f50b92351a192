"""The plugin inside a real ``tensorboard`` process (both loaders, ``--path_prefix``, ``--logdir_spec``).

TensorBoard itself would keep 10 or 100 random points of each of our tags; these tests check that the plugin still
shows a one-step spike among 20,000 steps, and that steps appended by another process appear without a restart.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from tbserver import TensorBoardServer

from tb_gradient_plugin.writer import GradientWriter

pytestmark = pytest.mark.slow

LAYERS = ["embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head"]
STEPS = 20_000
SPIKE_STEP, SPIKE_LAYER = 12_345, 2
LATE_SPIKE_STEP, LATE_SPIKE_LAYER = 20_600, 4

APPEND = textwrap.dedent("""
    import sys
    import numpy as np
    from tb_gradient_plugin.writer import GradientWriter

    run, first, last, spike_step, spike_layer = sys.argv[1], *map(int, sys.argv[2:6])
    layers = sys.argv[6].split(",")
    rng = np.random.default_rng(first)
    with GradientWriter(run) as w:
        for s in range(first, last):
            g = rng.lognormal(0.0, 0.05, len(layers))
            if s == spike_step:
                g[spike_layer] *= 5000.0
            w.write(s, layers, grad_norm=g, loss=1.0)
""")


def _append(run: Path, first: int, last: int, spike_step: int, spike_layer: int) -> None:
    """Write steps [first, last) from a separate Python process, as a training job would."""
    subprocess.run([sys.executable, "-c", APPEND, str(run), str(first), str(last), str(spike_step),
                    str(spike_layer), ",".join(LAYERS)], check=True, timeout=300)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A logdir with one 20,000-step run holding a single-step 5000x spike in one layer."""
    root = tmp_path_factory.mktemp("template")
    rng = np.random.default_rng(0)
    with GradientWriter(root / "train") as w:
        for s in range(STEPS):
            g = rng.lognormal(0.0, 0.05, len(LAYERS))
            if s == SPIKE_STEP:
                g[SPIKE_LAYER] *= 5000.0  # extreme: an explosion on its own (500x would be a transient spike)
            w.write(s, LAYERS, grad_norm=g, loss=1.0)
    return root


def _quote(**params) -> str:
    return urllib.parse.urlencode(params)


def _poll(fn, timeout: float = 60.0):
    """Call ``fn`` until it returns a truthy value (the data arrives asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _spike_cell(heatmap: dict, step: int, layer: int) -> tuple[float, float]:
    """(value of the bin holding ``step`` in row ``layer``, largest other value in that row)."""
    b = next(i for i, (s, e) in enumerate(zip(heatmap["bin_start"], heatmap["bin_end"], strict=True))
             if s <= step <= e)
    row = np.array(heatmap["values"][layer], dtype=float)
    return row[b], float(np.nanmax(np.delete(row, b)))


@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_spike_survives_and_appended_steps_appear(template, tmp_path, load_fast):
    logdir = tmp_path / "logs"
    shutil.copytree(template, logdir)
    with TensorBoardServer(logdir, extra_args=[f"--load_fast={load_fast}"]) as tb:
        listing = _poll(lambda: (tb.get_json("data/plugins_listing").get("gradients") or {}).get("enabled"))
        assert listing, tb.output
        runs = tb.get_json("data/plugin/gradients/runs")["runs"]
        assert [(r["run"], r["steps"], r["layers"]) for r in runs] == [("train", STEPS, len(LAYERS))]

        heat = tb.get_json("data/plugin/gradients/heatmap?" + _quote(run="train", metric="grad_norm", bins=300))
        assert len(heat["bin_start"]) == 300
        spike, others = _spike_cell(heat, SPIKE_STEP, SPIKE_LAYER)
        assert spike > 100 * others
        episodes = tb.get_json("data/plugin/gradients/episodes?run=train")["episodes"]
        assert [(e["peak_step"], e["layers"][0]["name"]) for e in episodes] == [(SPIKE_STEP, LAYERS[SPIKE_LAYER])]
        assert heat["offending"][0] == LAYERS[SPIKE_LAYER]

        _append(logdir / "train", STEPS, STEPS + 1000, LATE_SPIKE_STEP, LATE_SPIKE_LAYER)
        grown = _poll(lambda: [r for r in tb.get_json("data/plugin/gradients/runs")["runs"]
                               if r["steps"] == STEPS + 1000])
        assert grown, tb.get_json("data/plugin/gradients/runs")
        assert grown[0]["version"] > runs[0]["version"]
        heat = tb.get_json("data/plugin/gradients/heatmap?" + _quote(run="train", bins=2000))
        assert heat["step_range"] == [0, STEPS + 999]
        late, others = _spike_cell(heat, LATE_SPIKE_STEP, LATE_SPIKE_LAYER)
        assert late > 100 * others
        # Episodes follow once the detector, running in the background, has seen the new steps.
        peaks = _poll(lambda: [e["peak_step"] for e in tb.get_json("data/plugin/gradients/episodes?run=train")
                               ["episodes"]] == [SPIKE_STEP, LATE_SPIKE_STEP])
        assert peaks, tb.get_json("data/plugin/gradients/episodes?run=train")["episodes"]
        assert tb.alive


def test_path_prefix_and_logdir_spec(template, tmp_path):
    other = tmp_path / "other"
    with GradientWriter(other / "seed1") as w:
        for s in range(50):
            w.write(s, ["<b>bold</b>"], grad_norm=[1.0], loss=1.0)
    spec = f"base:{template},cmp:{other}"
    with TensorBoardServer(None, extra_args=["--logdir_spec", spec, "--path_prefix=/tb/x"]) as tb:
        assert tb.url.endswith("/tb/x/")
        listing = _poll(lambda: (tb.get_json("data/plugins_listing").get("gradients") or {}).get("enabled"))
        assert listing, tb.output
        meta = tb.get_json("data/plugins_listing")["gradients"]
        assert meta["tab_name"] == "Gradients"
        assert meta["loading_mechanism"]["module_path"] == "/tb/x/data/plugin/gradients/index.js"
        runs = {r["run"]: r["steps"] for r in tb.get_json("data/plugin/gradients/runs")["runs"]}
        assert runs == {"base/train": STEPS, "cmp/seed1": 50}
        layer = tb.get_json("data/plugin/gradients/layer?" + _quote(run="cmp/seed1", layer="<b>bold</b>"))
        assert layer["layer"] == "<b>bold</b>" and len(layer["steps"]) == 50
        status, headers, body = tb.get("data/plugin/gradients/heatmap?" + _quote(run="../../etc/passwd"))
        assert status == 404 and headers["Content-Type"].startswith("application/json") and b"error" in body
        status, _, _ = tb.get("data/plugin/gradients/..%2F..%2Fplugin.py")
        assert status == 404
        assert tb.alive
