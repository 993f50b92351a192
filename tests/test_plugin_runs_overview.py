"""The ``runs`` route on a logdir of 500 small runs: every run listed with what the tab's run overview shows (episodes
by kind, first episode step, worst severity, source, steps, first and last wall time), checked against the run store
and the detector. Timings live in ``benchmarks/bench_runs.py``.
"""

from __future__ import annotations

import json
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from benchmarks.many_runs import RUN_SPACING_S, T0, Planted, run_name, write_many_runs
from tb_gradient_plugin import detect, plugin
from tb_gradient_plugin.runs import load_run
from tb_gradient_plugin.writer import GradientWriter

N = 500
STEPS = 40  # run i logs STEPS + i % 5 * 10 steps
PLANTS = {
    run_name(123): Planted(step=30, factor=100.0),
    run_name(321): Planted(step=32, factor=1000.0),
    run_name(2): Planted(step=35, factor=float("nan")),
}
AMP = "amp_skips"
AMP_SKIPS = (100, 200)
#: Keys the route had before the overview; they must stay.
OLD_KEYS = {"run", "source", "steps", "layers", "episodes", "episode_kinds", "alarming", "spikes", "first_wall_time",
            "has_layers", "has_histograms", "metrics", "version", "episodes_version"}


def _write_amp(path: Path) -> None:
    """Mixed precision done right: two overflows, each skipped by the scaler (Inf gradients, the scale halves)."""
    rng = np.random.default_rng(4)
    scale = 2.0**16
    with GradientWriter(str(path)) as writer:
        for step in range(300):
            grad = np.exp(rng.normal(0.0, 0.05, 3))
            skipped = step in AMP_SKIPS
            if skipped:
                grad[:] = np.inf
                scale /= 2
            writer.write(step, ["a", "b", "c"], grad_norm=grad, loss=1.0 + rng.normal(0.0, 0.01), loss_scale=scale,
                         step_skipped=float(skipped), wall_time=T0 - 86400 + step)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many_runs")
    write_many_runs(root, N, steps=STEPS, plants=PLANTS, plain=1)
    _write_amp(root / AMP)
    return root


@pytest.fixture(scope="module")
def listed(logdir: Path) -> dict[str, dict]:
    """The route's answer once the first read is done, by run name."""
    context = base_plugin.TBContext(logdir=str(logdir), flags=Namespace(logdir_spec="", reload_interval=5.0))
    client = Client(application.TensorBoardWSGI([plugin.GradientsLoader().load(context)]))
    deadline = time.monotonic() + 300
    while True:
        response = client.get("/data/plugin/gradients/runs")
        assert response.status_code == 200, response.get_data()[:300]
        doc = json.loads(response.get_data())
        if not doc["loading"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not doc["loading"] and "error" not in doc
    return {r["run"]: r for r in doc["runs"]}


def test_every_run_is_listed_with_its_facts(listed: dict[str, dict]) -> None:
    assert len(listed) == N + 2
    for i in range(N):
        entry = listed[run_name(i)]
        assert OLD_KEYS <= set(entry)
        steps = STEPS + i % 5 * 10
        assert entry["steps"] == steps and entry["source"] == "tb_gradient_plugin"
        assert entry["first_wall_time"] == T0 + i * RUN_SPACING_S
        assert entry["last_wall_time"] == T0 + i * RUN_SPACING_S + steps - 1
    plain = listed["plain_000"]
    assert plain["source"] == "plain" and plain["last_wall_time"] == T0 + N * RUN_SPACING_S + STEPS - 1


def test_planted_findings_and_only_those(logdir: Path, listed: dict[str, dict]) -> None:
    flagged = {name for name, entry in listed.items() if entry["episodes"]}
    assert flagged == set(PLANTS) | {AMP}
    for name, plant in PLANTS.items():
        entry = listed[name]
        report = detect.detect(load_run(str(logdir / name), name))
        assert entry["first_episode_step"] == plant.step == min(e.start_step for e in report.episodes)
        if np.isnan(plant.factor):
            assert entry["episode_kinds"] == {"nonfinite": 1}
            assert entry["worst_severity"] is None and entry["worst_severity_nonfinite"] is True
        else:
            assert entry["episode_kinds"] == {"explosion": 1}
            worst = max(e.severity for e in report.episodes)
            assert entry["worst_severity"] == pytest.approx(worst) and entry["worst_severity"] > plant.factor / 2
            assert entry["worst_severity_nonfinite"] is False
    assert listed[run_name(321)]["worst_severity"] > listed[run_name(123)]["worst_severity"]


def test_healthy_runs_and_amp_skips_have_no_first_episode_or_severity(listed: dict[str, dict]) -> None:
    healthy = listed[run_name(0)]
    assert healthy["episode_kinds"] == {} and healthy["first_episode_step"] is None
    assert healthy["worst_severity"] is None and healthy["worst_severity_nonfinite"] is False
    # AMP overflow skips are episodes but no finding: the overview neither dates nor rates them.
    amp = listed[AMP]
    assert amp["episode_kinds"] == {"overflow_skip": len(AMP_SKIPS)}
    assert amp["first_episode_step"] is None and amp["worst_severity"] is None
    assert amp["worst_severity_nonfinite"] is False and amp["last_wall_time"] == T0 - 86400 + 299
