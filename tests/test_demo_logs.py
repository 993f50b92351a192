"""demo_logs/: the committed runs show what the README promises, and the script that made them still runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tb_gradient_plugin.runs import find_runs, load_run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo_logs"
EXPLODING = {"mlp_lr_raised", "rnn_no_clip", "keras_high_lr", "plain_summarywriter"}
HEALTHY = {"mlp_healthy", "rnn_clipped", "keras_sane"}


@pytest.fixture(scope="module")
def demo_audit() -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "tb_gradient_plugin.audit", "audit", str(DEMO), "--json",
                          "--fail-on", "never"], capture_output=True, text=True, check=True)
    return {r["run"]: r for r in json.loads(out.stdout)["runs"]}


def test_demo_logs_are_small_and_complete(demo_audit):
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 10 * 1024 * 1024
    names = {name.split("/")[0] for name in demo_audit}
    assert names == EXPLODING | HEALTHY | {"amp_overflow"}


def test_exploding_runs_are_flagged_and_healthy_runs_are_clean(demo_audit):
    by_top = {name.split("/")[0]: rep for name, rep in demo_audit.items()}
    for name in EXPLODING:
        kinds = {e["kind"] for e in by_top[name]["episodes"]}
        assert kinds & {"explosion", "nonfinite"}, (name, kinds)
    for name in HEALTHY:
        assert [e["kind"] for e in by_top[name]["episodes"]] == [], name


def test_amp_overflow_skips_are_not_explosions(demo_audit):
    rep = demo_audit["amp_overflow"]
    skips = [e for e in rep["episodes"] if e["kind"] == "overflow_skip"]
    assert skips
    run = load_run(str(DEMO / "amp_overflow"))
    skipped_steps = run.series["step_skipped"].steps[run.series["step_skipped"].values > 0]
    for e in rep["episodes"]:
        if e["kind"] in ("explosion", "nonfinite"):
            inside = (skipped_steps >= e["start_step"]) & (skipped_steps <= e["end_step"])
            assert not inside.any(), e


def test_plain_summarywriter_run_is_audited_without_our_writer(demo_audit):
    run = load_run(str(DEMO / "plain_summarywriter"))
    assert run.source == "plain" and not run.layers
    assert {"loss", "total_grad_norm"} <= set(run.series)


@pytest.mark.slow
def test_demo_script_runs_on_a_reduced_size(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_logs.py"), "--out", str(out), "--scale", "0.05"],
                   check=True, capture_output=True, text=True, timeout=600)
    runs = dict(find_runs(str(out)))
    assert {name.split("/")[0] for name in runs} == EXPLODING | HEALTHY | {"amp_overflow"}
    for name, path in runs.items():
        data = load_run(path, name)
        assert data.series.get("loss") is not None and len(data.series["loss"].steps) >= 20, name
        if not name.startswith("plain"):
            assert data.layers and "grad_norm" in data.layer_metrics, name
