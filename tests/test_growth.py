"""Slow growth and a saturated clip (findings of kind ``growth``), and Adam's moment norms recorded by the monitor."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tb_gradient_plugin.auditor import failing
from tb_gradient_plugin.detect import DetectorConfig, OnlineDetector, detect
from tb_gradient_plugin.runs import find_runs, load_run
from tb_gradient_plugin.torch import GradientMonitor
from tb_gradient_plugin.types import GROWTH_KIND, TOTAL, RunData, Series, fails_explosion

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.detection_suite import synthetic_case  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo_logs"
HEALTHY_DEMO = {"mlp_healthy", "rnn_clipped", "keras_sane", "amp_overflow", "plain_summarywriter"}


def _ramp_run(factor: float, *, loss_falls: bool = False, jump: bool = False, n: int = 600, seed: int = 0) -> RunData:
    """Four layers whose gradient norms rise ``factor`` times over the run (a sudden jump with ``jump``), the total
    clipped at 1 all along, and a flat (or falling) loss."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    level = np.where(t >= n // 2, factor, 1.0) if jump else np.exp(np.log(factor) * t / (n - 1))
    g = (np.exp(rng.normal(0, 0.3, (n, 4))) * np.array([1.0, 0.5, 0.2, 0.1]) * level[:, None]).astype(np.float32)
    total = np.sqrt((g.astype(np.float64) ** 2).sum(axis=1))
    loss = (np.exp(-3 * t / n) if loss_falls else 1.0) * 2.0 + rng.normal(0, 0.02, n)
    return RunData("ramp", "tb_gradient_plugin", ["emb", "fc1", "fc2", "head"], t, {"grad_norm": g},
                   np.ones(g.shape, dtype=bool),
                   {"loss": Series(t, loss), "total_grad_norm": Series(t, total),
                    "clip_threshold": Series(t, np.ones(n))})


def _online(run: RunData) -> dict:
    det = OnlineDetector(name=run.name, source=run.source)
    g = run.layer_metrics["grad_norm"]
    for i, step in enumerate(run.steps.tolist()):
        det.update(step, run.layers, {"grad_norm": g[i]},
                   {k: float(s.values[i]) for k, s in run.series.items()})
    return det.report().to_json()


def _growth(report_json: dict, signal: str) -> list[dict]:
    return [e for e in report_json["episodes"] if e["kind"] == GROWTH_KIND and e["growth"]["signal"] == signal]


def test_slow_growth_is_found_on_a_70x_ramp_under_clipping_and_never_fails_explosion():
    run = _ramp_run(70.0)
    rep = detect(run).to_json()
    grown = _growth(rep, "slow_growth")
    assert len(grown) == 1
    ep = grown[0]
    assert ep["growth"]["series"] == TOTAL and ep["layers"][0]["name"] == TOTAL
    assert 40 < ep["growth"]["factor"] < 100
    assert {f["name"] for f in ep["layers"]} == {TOTAL, "emb", "fc1", "fc2", "head"}
    assert "grew" in ep["growth"]["summary"] and "did not improve" in ep["growth"]["summary"]
    assert ep["advice"] and not fails_explosion(ep)
    # the clip at 1 binds on nearly every step of the ramp
    clip = _growth(rep, "saturated_clip")
    assert len(clip) == 1 and clip[0]["growth"]["binding_share"] > 0.9
    assert clip[0]["growth"]["summary"].startswith("the clip binds on ")
    assert "the learning rate is effectively set by the clip" in clip[0]["growth"]["summary"]
    assert not any(fails_explosion(e) for e in rep["episodes"])
    results = [{"run": "ramp", "report": rep}]
    assert failing(results, "explosion") == [] and failing(results, "nonfinite") == []
    assert failing(results, "any") == results
    # online, step by step: the same report
    assert _online(run) == rep


def test_no_growth_where_the_loss_improves_the_rise_is_small_or_a_jump():
    for run in (_ramp_run(70.0, loss_falls=True), _ramp_run(10.0), _ramp_run(70.0, jump=True)):
        rep = detect(run).to_json()
        assert _growth(rep, "slow_growth") == [], run
        assert _online(run) == rep
    # the threshold is a config field
    assert _growth(detect(_ramp_run(10.0), DetectorConfig(growth_ratio=5.0)).to_json(), "slow_growth")


@pytest.mark.parametrize("seed", range(8))
def test_no_growth_on_the_suites_healthy_warmup_decay_runs(seed):
    case = synthetic_case(1000 + seed, 12, 3000, inject=False)
    assert not case.labels
    rep = detect(case.run)
    assert [e for e in rep.episodes if e.kind == GROWTH_KIND] == []


def test_no_growth_on_the_demos_healthy_runs():
    runs = dict(find_runs(str(DEMO)))
    assert HEALTHY_DEMO <= set(runs)
    for name in HEALTHY_DEMO:
        rep = detect(load_run(runs[name], name))
        assert [e.to_json() for e in rep.episodes if e.kind == GROWTH_KIND] == [], name


def _train(logdir: str, clip: float, steps: int = 60, opt_cls: type = torch.optim.Adam
           ) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = opt_cls(model.parameters(), lr=1e-2)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    with GradientMonitor(model, opt, logdir, clip=clip) as monitor:
        for step in range(steps):
            i = (step * 32) % 256
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])
            monitor.log_loss(loss)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return model, opt


def test_saturated_clip_is_found_on_a_real_torch_run_with_a_tight_clip(tmp_path):
    _train(str(tmp_path / "tight"), clip=1e-3)
    run = load_run(str(tmp_path / "tight"))
    np.testing.assert_allclose(run.series["clip_threshold"].values, 1e-3, rtol=1e-6)
    rep = detect(run).to_json()
    clip = _growth(rep, "saturated_clip")
    assert len(clip) == 1
    info = clip[0]["growth"]
    assert info["judged_steps"] == 60 and info["binding_share"] == 1.0
    assert info["summary"] == "the clip binds on 100 % of steps: the learning rate is effectively set by the clip"
    assert not fails_explosion(clip[0])
    # a clip that never binds is no finding
    _train(str(tmp_path / "loose"), clip=1e6)
    assert _growth(detect(load_run(str(tmp_path / "loose"))).to_json(), "saturated_clip") == []


def test_clip_must_be_positive():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="clip"):
        GradientMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1), None, clip=0.0)


def test_adam_moment_norms_equal_the_optimizer_state(tmp_path):
    model, opt = _train(str(tmp_path), clip=1e6, steps=20)
    run = load_run(str(tmp_path))
    assert run.layers == ["0", "2"]
    for metric, key in (("exp_avg_norm", "exp_avg"), ("exp_avg_sq_norm", "exp_avg_sq")):
        ref = [np.sqrt(sum(float(opt.state[p][key].double().square().sum()) for p in layer.parameters()))
               for layer in (model[0], model[2])]
        np.testing.assert_allclose(run.layer_metrics[metric][-1], ref, rtol=1e-5)
        assert np.all(run.layer_metrics[metric] > 0)
    # an optimizer without moments records none
    _train(str(tmp_path / "sgd"), clip=1e6, steps=5, opt_cls=torch.optim.SGD)
    assert "exp_avg_norm" not in load_run(str(tmp_path / "sgd")).layer_metrics


def test_cli_json_and_html_show_growth_and_fail_on_any_only(tmp_path, capsys):
    import json

    from tb_gradient_plugin import GradientWriter
    from tb_gradient_plugin.cli import main

    run = _ramp_run(70.0)
    g, total = run.layer_metrics["grad_norm"], run.series["total_grad_norm"].values
    with GradientWriter(tmp_path / "logs" / "ramp") as writer:
        for i, step in enumerate(run.steps.tolist()):
            writer.write(step, run.layers, grad_norm=g[i], total_grad_norm=float(total[i]),
                         loss=float(run.series["loss"].values[i]), clip_threshold=1.0)
    logs = str(tmp_path / "logs")
    assert main(["audit", logs]) == 0  # --fail-on explosion: a warning is no failure
    assert "clip binds on" in capsys.readouterr().out
    assert main(["audit", logs, "--json", "--fail-on", "any"]) == 1
    doc = json.loads(capsys.readouterr().out)
    kinds = [(e["kind"], e["growth"]["signal"]) for e in doc["runs"][0]["episodes"]]
    assert sorted(kinds) == [(GROWTH_KIND, "saturated_clip"), (GROWTH_KIND, "slow_growth")]
    html = tmp_path / "report.html"
    assert main(["audit", logs, "--html", str(html)]) == 0
    text = html.read_text()
    assert "growth" in text and "the learning rate is effectively set by the clip" in text


def test_lead_time_table_of_the_suite():
    from benchmarks import lead_time
    from benchmarks.detection_suite import synthetic_cases

    leads = lead_time.lead_times(synthetic_cases(True))
    assert list(leads)[:2] == [lead_time.OURS, lead_time.OURS_WITHOUT] and len(leads) == 6
    ours = leads[lead_time.OURS]
    assert ours.events > 0 and len(ours.leads) == ours.events  # every event with a loss spike is caught
    assert all(lead >= 0 for lead in ours.leads)  # and never after the loss blew up
    table = lead_time.table(leads)
    assert table.count("\n") == 7 and "median lead" in table
