"""Detection engine: episodes, ranking, loss spikes, advice, online == offline, and the labeled suite (small size)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import detection_suite as suite
from tb_gradient_plugin.detect import (
    DetectorConfig,
    OnlineDetector,
    Report,
    baseline_band,
    detect,
)
from tb_gradient_plugin.detect.baseline import Baseline, Points, log_positive, solve
from tb_gradient_plugin.reader import EventFileReader
from tb_gradient_plugin.runs import RunData, Series
from tb_gradient_plugin.types import update_ratio
from tb_gradient_plugin.writer import GradientWriter


def _run(n_steps: int = 2000, n_layers: int = 12, seed: int = 0, **series) -> RunData:
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps)
    trend = np.exp(-t / 300.0) * 3 + np.minimum(1, t / 100) + 0.002 * t / 10  # warm-up, decay, late rise
    g = (trend[:, None] * np.exp(rng.normal(0, 0.2, (n_steps, n_layers)))
         * np.linspace(1, 2, n_layers)[None, :]).astype(np.float32)
    layers = [f"layer{j}" for j in range(n_layers)]
    ser = {k: Series(np.arange(n_steps, dtype=np.int64), np.asarray(v, dtype=np.float64)) for k, v in series.items()}
    return RunData(name="r", source="tb_gradient_plugin", layers=layers, steps=t.astype(np.int64),
                   layer_metrics={"grad_norm": g, "nonfinite_count": np.zeros_like(g),
                                  "param_norm": np.full_like(g, 10.0), "update_norm": np.full_like(g, 0.01)},
                   present=np.ones((n_steps, n_layers), dtype=bool), series=ser)


def _reacting_loss(n: int, at: int, factor: float = 20.0) -> np.ndarray:
    """A falling training loss that spikes ``factor`` x at step ``at``: the loss reacting to a gradient spike."""
    loss = 2 * np.exp(-np.arange(n) / 700) * np.exp(np.random.default_rng(9).normal(0, 0.03, n)) + 0.3
    loss[at] *= factor
    return loss


def _online(run: RunData, config: DetectorConfig | None = None) -> Report:
    """Feed a RunData step by step into the online detector (as a training loop would)."""
    det = OnlineDetector(config, name=run.name, source=run.source)
    axis = np.unique(np.concatenate([run.steps] + [s.steps for s in run.series.values()]))
    pos = {int(s): i for i, s in enumerate(run.steps.tolist())}
    ser_pos = {k: {int(s): i for i, s in enumerate(v.steps.tolist())} for k, v in run.series.items()}
    for step in axis.tolist():
        layers, metrics = [], {}
        i = pos.get(step)
        if i is not None:
            cols = np.nonzero(run.present[i])[0]
            layers = [run.layers[c] for c in cols]
            metrics = {m: a[i, cols] for m, a in run.layer_metrics.items()}
        scalars = {k: float(run.series[k].values[p[step]]) for k, p in ser_pos.items() if step in p}
        det.update(step, layers, metrics, scalars)
    if run.histograms is not None:  # histograms come at their own cadence; only the layers logged at each step
        for k, step in enumerate(run.hist_steps.tolist()):
            cols = np.nonzero(run.histograms[k].sum(axis=1) > 0)[0]
            det.add_histograms(step, [run.layers[c] for c in cols], run.histograms[k, cols])
    return det.report()


def test_healthy_run_with_warmup_decay_and_late_rise_is_quiet():
    rep = detect(_run())
    assert [e for e in rep.episodes] == []
    assert rep.loss_spikes == []


def test_spike_the_loss_reacts_to_is_an_explosion_ranked_by_first_crossing_then_magnitude():
    run = _run(loss=_reacting_loss(2000, 1004))
    g = run.layer_metrics["grad_norm"]
    g[1000, 7] *= 40  # the origin crosses first ...
    g[1001, 2] *= 400  # ... a bigger crossing one step later ranks second
    g[1001, 9] *= 30
    rep = detect(run)
    (ep,) = rep.episodes
    assert ep.kind == "explosion"
    assert (ep.start_step, ep.end_step) == (1000, 1001)
    assert [f.name for f in ep.layers] == ["layer7", "layer2", "layer9"]
    assert ep.peak_step == 1001 and ep.severity == pytest.approx(ep.layers[1].ratio)
    assert 25 < ep.layers[0].ratio < 70
    assert ep.confirmed_by == ["loss_reaction"] and rep.spikes.count == 0


def test_the_same_spike_with_a_normal_loss_is_a_transient_spike_not_an_episode():
    run = _run(loss=_reacting_loss(2000, 1004, factor=1.0))
    g = run.layer_metrics["grad_norm"]
    g[1000, 7] *= 40
    g[1001, 2] *= 400
    rep = detect(run)
    assert rep.episodes == []
    assert (rep.spikes.count, rep.spikes.steps, rep.spikes.with_loss_spike) == (1, [1001], 0)
    assert rep.spikes.max_ratio == pytest.approx(400, rel=0.5)
    assert rep.spikes.summary().startswith("1 transient spike in 2,000 steps (0.5 per 1k), up to ")
    assert rep.spikes.summary().endswith("all followed by a normal loss")
    assert _online(run).to_json() == rep.to_json()


def test_a_hard_batch_raising_loss_and_gradient_at_once_is_not_a_reaction():
    """Both jump at the same step (the batch itself is unusual), as in TF-NMT's periodic bursts: a spike."""
    run = _run(loss=_reacting_loss(2000, 1000))
    run.layer_metrics["grad_norm"][1000, 7] *= 40
    rep = detect(run)
    assert rep.episodes == [] and rep.spikes.steps == [1000] and rep.spikes.with_loss_spike == 1


@pytest.mark.parametrize("change, reason", [
    ("extreme", "extreme"),  # 10,000x in one layer of an otherwise quiet series
    ("persistent", "persistent"),  # up for 12 logged steps
    ("update", "update_ratio"),  # the applied update grew with the gradient (no clipping)
    ("collapse", "collapse"),  # the layer's gradient died right after
])
def test_what_makes_a_spike_an_explosion(change, reason):
    run = _run()
    g, upd = run.layer_metrics["grad_norm"], run.layer_metrics["update_norm"]
    if change == "extreme":
        g[1000, 4] *= 1e4
    elif change == "persistent":
        g[1000:1012, 4] *= 40
    else:
        g[1000, 4] *= 40
        if change == "update":
            upd[1000, 4] *= 80
        else:
            g[1001:1016, 4] = 0.0  # 15 steps: half the window after the spike, too short to be a dead layer
    rep = detect(run)
    (ep,) = rep.episodes
    assert ep.kind == "explosion" and ep.confirmed_by == [reason] and ep.layers[0].name == "layer4"
    assert rep.spikes.count == 0
    assert _online(run).to_json() == rep.to_json()


def test_chronic_spikes_with_a_rising_loss_are_one_finding():
    n = 6000
    loss = 2 * np.exp(-np.arange(n) / 700) + 0.3
    loss[4000:] *= np.linspace(1, 2.5, n - 4000)  # drifts up while the spikes recur
    run = _run(n, loss=loss)
    hits = np.arange(3000, n, 40)
    run.layer_metrics["grad_norm"][hits, 5] *= 30  # clipped-looking one-step spikes, every 40 steps
    rep = detect(run)
    (ep,) = rep.episodes
    assert ep.kind == "chronic" and ep.start_step == 3000 and ep.end_step == hits[-1]
    assert ep.chronic["loss_suffers"] and ep.chronic["events"] == hits.size and ep.chronic["explosions"] == 0
    assert ep.chronic["rate_per_1k"] == pytest.approx(25.0, rel=0.05)
    assert ep.layers[0].name == "layer5" and any("recurred" in a for a in ep.advice)
    assert rep.spikes.count == 0
    healthy = _run(n, loss=2 * np.exp(-np.arange(n) / 700) + 0.3)
    healthy.layer_metrics["grad_norm"][hits, 5] *= 30  # the same spikes while the loss keeps falling: a rate
    rep = detect(healthy)
    assert rep.episodes == [] and rep.spikes.count == hits.size

def test_nonfinite_is_always_an_episode_even_in_the_first_steps_with_init_advice():
    run = _run()
    run.layer_metrics["grad_norm"][2, 3] = np.nan
    run.layer_metrics["nonfinite_count"][2, 3] = 17
    run.layer_metrics["grad_norm"][1500, 5] = np.inf
    rep = detect(run)
    kinds = [(e.kind, e.start_step) for e in rep.episodes]
    assert kinds == [("nonfinite", 2), ("nonfinite", 1500)]
    first = rep.episodes[0]
    assert first.layers[0].name == "layer3" and first.layers[0].peak_value == 17
    assert any("initialization" in a for a in first.advice)
    assert not any("initialization" in a for a in rep.episodes[1].advice)
    doc = json.loads(json.dumps(rep.to_json()))  # strict JSON: inf became null
    assert doc["episodes"][0]["severity"] is None


def test_amp_overflow_sawtooth_is_reported_apart_but_a_collapsing_scale_is_an_episode():
    n = 2000
    scale = np.full(n, 2.0**16)
    skipped = np.zeros(n)
    for s in (400, 900, 1400):  # benign: one overflow, the scale halves and grows back
        skipped[s] = 1
        scale[s:s + 200] /= 2
    skipped[1700:1730] = 1  # collapse: the scale halves every step
    scale[1700:1730] = 2.0**16 / 2.0 ** np.arange(1, 31)
    scale[1730:] = scale[1729]
    run = _run(n, loss_scale=scale, step_skipped=skipped)
    g = run.layer_metrics["grad_norm"]
    for s in list(np.nonzero(skipped)[0]):
        g[s, :4] = np.inf
    rep = detect(run)
    over = [e for e in rep.episodes if e.kind == "overflow_skip"]
    bad = [e for e in rep.episodes if e.kind != "overflow_skip"]
    assert [e.start_step for e in over][:3] == [400, 900, 1400]
    assert len(bad) == 1 and bad[0].kind == "nonfinite" and 1700 < bad[0].start_step < 1730
    assert all(e.layers == [] for e in over)  # the scaler's business: no offending layer
    assert rep.amp.collapsed and rep.amp.logged_steps == n and rep.amp.summary().endswith(
        "it collapsed: see the non-finite episode")
    assert _online(run).to_json() == rep.to_json()


def test_update_ratio_far_too_high_names_the_layer_and_value():
    run = _run()
    run.layer_metrics["update_norm"][1200:1210, 4] = 3.0  # ratio 0.3 against a baseline of 1e-3
    rep = detect(run)
    (ep,) = rep.episodes
    assert ep.layers[0].name == "layer4" and ep.layers[0].metric == "update_ratio"
    assert any("layer4 reached 0.3" in a and "learning rate" in a for a in ep.advice)


def test_update_ratio_jump_within_the_healthy_range_is_not_an_episode():
    run = _run()
    run.layer_metrics["update_norm"][1200:1210, 4] = 0.08  # 8x its baseline, but a ratio of only 0.008
    assert detect(run).episodes == []


def test_loss_spike_links_to_the_episode_and_orphan_spikes_are_reported():
    n = 2000
    rng = np.random.default_rng(3)
    loss = 2 * np.exp(-np.arange(n) / 700) * np.exp(rng.normal(0, 0.03, n)) + 0.3
    loss[1004] *= 20  # follows the gradient episode at 1000
    loss[1600] *= 20  # no gradient episode
    run = _run(n, loss=loss)
    run.layer_metrics["grad_norm"][1000, 1] *= 100
    rep = detect(run)
    (ep,) = rep.episodes
    assert ep.loss_spike_step == 1004
    assert [(s.step, s.episode) for s in rep.loss_spikes] == [(1004, 0), (1600, None)]
    assert rep.loss_spikes[0].ratio > 10


def test_clip_advice_comes_from_the_healthy_total_norm():
    run = _run(loss=_reacting_loss(2000, 1003))
    run.layer_metrics["grad_norm"][1000, 1] *= 100
    total = np.sqrt((run.layer_metrics["grad_norm"].astype(np.float64) ** 2).sum(axis=1))
    healthy = np.delete(total, 1000)
    q = np.quantile(healthy, 0.99)
    (ep,) = detect(run).episodes
    clip = [a for a in ep.advice if a.startswith("Clip")]
    assert clip and f"{q:.3g}" in clip[0]


def test_growth_through_depth_advises_normalization():
    run = _run(n_layers=10)
    g = run.layer_metrics["grad_norm"]
    g[1000, :] *= (10.0 ** np.linspace(3, 0, 10)).astype(np.float32)  # 1000x at the input, 1x at the output
    (ep,) = detect(run).episodes
    assert ep.layers[0].name == "layer0"
    assert any("through depth" in a and "normalization" in a for a in ep.advice)


def test_lr_raise_is_named_in_the_advice():
    n = 2000
    lr = np.where(np.arange(n) < 900, 1e-3, 1e-1)
    run = _run(n, lr=lr)
    run.layer_metrics["grad_norm"][950:960, :] *= 100
    (ep,) = detect(run).episodes
    assert any("learning rate rose from 0.001 to 0.1" in a and "at step 900" in a for a in ep.advice)


def test_level_shift_costs_one_episode_not_the_rest_of_the_run():
    run = _run()
    run.layer_metrics["grad_norm"][800:, :] *= 20
    eps = detect(run).episodes
    assert len(eps) == 1 and eps[0].start_step == 800 and eps[0].end_step < 1000


def test_total_norm_only_run_and_loss_only_run():
    n = 1500
    rng = np.random.default_rng(1)
    tot = np.exp(rng.normal(0, 0.1, n))
    tot[700] = 5000.0  # without loss or update norms, only magnitude and persistence can confirm
    tot[300] = 60.0
    run = RunData("hf", "hf_trainer", series={"total_grad_norm": Series(np.arange(n) * 10, tot)})
    rep = detect(run)
    (ep,) = rep.episodes
    assert ep.start_step == 7000 and ep.layers[0].name == "total_grad_norm" and ep.confirmed_by == ["extreme"]
    assert rep.spikes.steps == [3000]
    loss = np.exp(rng.normal(0, 0.05, n))
    loss[900] = np.nan
    rep = detect(RunData("lo", "plain", series={"loss": Series(np.arange(n), loss)}))
    assert [(e.kind, e.start_step) for e in rep.episodes] == [("nonfinite", 900)]
    assert any("only the loss" in w for w in rep.warnings)


def test_online_gives_the_same_report_as_offline_on_the_same_data():
    cases = [suite.synthetic_case(7, 40, 2500), suite.synthetic_case(8, 30, 2000, amp=True)]
    run = _run(loss=_reacting_loss(2000, 1003), lr=np.full(2000, 1e-3))
    run.layer_metrics["grad_norm"][1000, 1] *= 100
    run.layer_metrics["grad_norm"][1500, 2] *= 100  # a transient spike: the same in both
    run.present[:300, 11] = False  # a layer added late
    run.present[1200:1300, 3] = False  # and one frozen for a while
    for rd in [run] + [c.run for c in cases]:
        off, on = detect(rd), _online(rd)
        assert off.episodes, rd.name
        assert on.to_json() == off.to_json(), rd.name


def test_online_returns_episodes_as_they_open_and_rejects_bad_input():
    det = OnlineDetector()
    opened = []
    rng = np.random.default_rng(0)
    for step in range(300):
        g = np.exp(rng.normal(0, 0.1, 3))
        if step == 200:
            g[1] = 1000.0
        opened += [(step, e.layers[0].name) for e in det.update(step, ["a", "b", "c"], {"grad_norm": g}, {})]
    assert opened == [(200, "b")]
    with pytest.raises(ValueError, match="increase"):
        det.update(10, ["a"], {"grad_norm": np.ones(1)}, {})
    with pytest.raises(ValueError, match="values for 2 layers"):
        det.update(400, ["a", "b"], {"grad_norm": np.ones(3)}, {})
    with pytest.raises(ValueError, match="ratio"):
        DetectorConfig(ratio=1.0)


def test_baseline_band_follows_the_series_and_flags_the_spike():
    steps = np.arange(1000)
    vals = np.exp(np.linspace(0, 3, 1000))  # grows 20x over the run: followed, not flagged
    vals[600] *= 100
    base, thr = baseline_band(steps, vals)
    assert np.all(np.isinf(thr[:16]))
    ok = np.isfinite(thr)
    assert np.all(vals[ok & (steps != 600)] < thr[ok & (steps != 600)])
    assert vals[600] > thr[600]
    assert 0.5 < vals[599] / base[599] < 2


def test_detect_reads_a_run_written_by_our_writer(tmp_path):
    rng = np.random.default_rng(5)
    layers = ["enc.0", "enc.1", "head"]
    with GradientWriter(tmp_path) as w:
        for step in range(400):
            g = np.exp(rng.normal(0, 0.1, 3))
            if step == 300:
                g[1] *= 5000
            w.write(step, layers, grad_norm=g, loss=1.0 + rng.random() * 0.01)
    batches = [EventFileReader(str(p)).read() for p in tmp_path.iterdir()]
    recs = [r for b in batches for r in b.layer_records]
    grad = np.stack([r.values for r in recs])
    steps = np.asarray([r.step for r in recs], dtype=np.int64)
    run = RunData("w", "tb_gradient_plugin", layers, steps, {"grad_norm": grad}, np.ones(grad.shape, bool))
    (ep,) = detect(run).episodes
    assert (ep.start_step, ep.layers[0].name) == (300, "enc.1")


def test_labeled_suite_small_meets_the_goals_and_beats_every_baseline():
    cases = suite.synthetic_cases(small=True)
    scores, _ = suite.evaluate(cases)
    ours = scores.pop("ours")
    assert ours.recall >= 0.98
    assert ours.false_per_10k <= 0.1
    assert ours.top1 >= 0.9
    for name, s in scores.items():
        assert ours.f1 > s.f1, name


def test_realruns_loss_only(realruns):
    cases = {c.name: c for c in suite.thirdparty_cases(str(realruns))}
    ppo = detect(cases["ZakSingh__omelette/ppo_logs/egraph-v0__PropLang_3__1__1655386763"].run)
    assert [s.step for s in ppo.loss_spikes] and all(24576 <= s.step <= 36864 for s in ppo.loss_spikes)
    for name in ("ZakSingh__omelette/lightning_logs/math", "Aydana1__Enhancing_YOLOv5l/runs/train/exp31"):
        rep = detect(cases[name].run)
        assert rep.episodes == [] and rep.loss_spikes == [], name
    assert math.isfinite(detect(cases["dparra2399__LearnedCoWSiP/experiments/illum_models/n2400_k8_sigma80"].run)
                         .loss_spikes[0].ratio)


def test_early_growth_before_a_full_baseline_window_is_not_an_explosion_but_a_huge_spike_is():
    """Gradient norms often grow 10-100x over the first tens of steps (out of the initialization, AMP settling):
    until a series has a full window of history only a crossing of ``max_ratio`` (50x) counts."""
    run = _run(n_steps=1000)
    g = run.layer_metrics["grad_norm"]
    g[:40] *= np.logspace(-1.5, 0, 40)[:, None].astype(np.float32)  # 30x over the first 40 steps, then steady
    rep = detect(run)
    assert rep.episodes == [] and rep.spikes.count == 0
    assert _online(run).to_json() == rep.to_json()
    g[45, 3] *= 200
    rep = detect(run)
    assert [e.start_step for e in rep.episodes] + rep.spikes.steps == [45]  # it crosses
    assert _online(run).to_json() == detect(run).to_json()
    late = _run(n_steps=1000)
    late.layer_metrics["grad_norm"][300, 3] *= 20  # the same 20x crossing with a mature baseline is one
    assert detect(late).spikes.steps == [300]


def test_demo_amp_run_early_growth_is_not_an_explosion():
    """fp16 autocast + GradScaler, healthy: norms grow 100x over steps 5-45 while the loss falls 0.7 -> 0.04."""
    import os

    from tb_gradient_plugin.runs import load_run

    run = load_run(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_logs",
                                "amp_overflow"))
    rep = detect(run)
    assert {e.kind for e in rep.episodes} == {"overflow_skip"}
    assert _online(run).to_json() == rep.to_json()


def test_loss_spikes_a_few_points_apart_with_a_normal_loss_between_are_two_spikes():
    """Two single-value loss spikes 5 points apart, the loss back to normal in between, are two events; a loss that
    stays high and dips under the threshold now and then is still one."""
    rng = np.random.default_rng(4)
    loss = np.exp(rng.normal(0, 0.05, 600))
    loss[300], loss[305] = 30.0, 40.0  # back to ~1 at 301..304
    loss[450:460] = 25.0
    loss[454] = 6.0  # under the 10x threshold, still far from the baseline: the same excursion
    run = RunData("lo", "plain", series={"loss": Series(np.arange(600), loss)})
    rep = detect(run)
    assert [s.step for s in rep.loss_spikes] == [300, 305, 450]
    assert _online(run).to_json() == rep.to_json()
    with pytest.raises(ValueError, match="loss_back_ratio"):
        DetectorConfig(loss_back_ratio=0.5)


def test_readme_spike_labels_match_the_documented_facts(realruns):
    """n2400_k8_sigma80: "36 spike points, forming 30 separate excursions ... Each excursion is a single value,
    sometimes written at two consecutive steps"; the first 5 % of the points are outside the README's facts."""
    (case,) = [c for c in suite.thirdparty_cases(str(realruns)) if c.name.endswith("n2400_k8_sigma80")]
    loss = case.run.series["loss"]
    assert suite.readme_spike_points(loss.values).size == 36
    assert len(case.labels) == 30
    assert sum(lab.end != lab.start for lab in case.labels) == 6
    assert (1551499, 1551499) in [(lab.start, lab.end) for lab in case.labels]  # 15.7, 10.1x its window median
    assert case.unscored == [(int(loss.steps[0]), int(loss.steps[int(0.05 * loss.steps.size) - 1]))]
    sc = suite.score_case(case, suite.run_ours(case))
    assert (sc.found, sc.false) == (30, 0)


def test_unscored_span_counts_neither_healthy_steps_nor_false_detections():
    run = RunData("lo", "plain", series={"loss": Series(np.arange(100), np.ones(100))})
    case = suite.Case("lo", "thirdparty", run, [suite.Label(80, 80, "explosion", None)], loss_only=True,
                      unscored=[(0, 9)])
    dets = [suite.Detected(5, 5, None), suite.Detected(40, 40, None), suite.Detected(80, 80, None)]
    sc = suite.score_case(case, dets)
    assert (sc.healthy_points, sc.detections, sc.false, sc.true_detections, sc.found) == (89, 2, 1, 1, 1)


def test_detector_does_not_import_the_run_store():
    """The detector judges arrays: RunData and the result types come from tb_gradient_plugin.types."""
    code = "import sys, tb_gradient_plugin.detect; print('tb_gradient_plugin.runs' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_update_ratio_has_one_definition_for_the_run_store_and_both_detector_paths():
    run = _run(n_steps=400, n_layers=4)
    par = run.layer_metrics["param_norm"]
    par[200, 1] = 0.0  # a zero parameter norm: an infinite ratio, never a crossing
    run.layer_metrics["update_norm"][300, 2] = 1.0  # ratio 0.1 against a baseline of 1e-3
    ratio = run.update_ratio()
    np.testing.assert_array_equal(ratio, update_ratio(run.layer_metrics["update_norm"], par))
    assert ratio.dtype == np.float32 and np.isinf(ratio[200, 1])
    rep = detect(run)
    found = [(f.name, f.metric, f.first_step) for e in rep.episodes for f in e.layers]
    assert found == [("layer2", "update_ratio", 300)]
    assert _online(run).to_json() == rep.to_json()


def test_layers_whose_gradient_dies_are_one_dead_finding_after_the_explosion():
    """A spike kills two layers: their gradients are exactly zero from a few steps later on."""
    run = _run()
    g = run.layer_metrics["grad_norm"]
    g[1000, 3] *= 40
    g[1005:, 3] = 0.0
    g[1006:, 8] = 0.0
    rep = detect(run)
    kinds = [(e.kind, e.start_step) for e in rep.episodes]
    assert kinds == [("explosion", 1000), ("dead", 1005)]
    explosion, dead = rep.episodes
    assert explosion.confirmed_by == ["collapse"]
    assert [f.name for f in dead.layers] == ["layer3", "layer8"] and dead.end_step == 1999
    assert dead.dead == {"layers": 2, "of": 12, "from_step": 1005, "vanished": 0, "after_episode": 1000,
                         "restart_before": 1000}
    assert [f.ratio for f in dead.layers] == [0.0, 0.0]
    assert any("2 of 12 layers went to exactly zero" in a and "before step 1000" in a for a in dead.advice)
    assert _online(run).to_json() == rep.to_json()


def test_a_gradient_that_vanishes_far_below_its_baseline_is_dead_too():
    """Not exactly zero, but 1e5x below its own baseline for the rest of the run (saturated units): dead. A layer
    only 1e3x below is not; nor is a vanished stretch shorter than ``dead_points``."""
    run = _run()
    g = run.layer_metrics["grad_norm"]
    g[1300:, 4] *= 1e-5
    g[1300:, 6] *= 1e-3
    g[1500:1510, 9] *= 1e-6
    rep = detect(run)
    (dead,) = rep.episodes
    assert dead.kind == "dead" and dead.start_step == 1300 and dead.end_step == 1999
    assert dead.dead == {"layers": 1, "of": 12, "from_step": 1300, "vanished": 1, "after_episode": None,
                         "restart_before": None}
    (layer,) = dead.layers
    assert layer.name == "layer4" and layer.peak_value == pytest.approx(float(g[1300, 4]))
    assert 1e-6 < layer.ratio < 1e-4  # the gradient over its baseline at the onset
    assert any("fell 10,000× or more below their baseline from step 1300" in a for a in dead.advice)
    assert _online(run).to_json() == rep.to_json()


def test_zero_and_vanished_layers_make_one_finding_that_counts_both():
    run = _run()
    g = run.layer_metrics["grad_norm"]
    g[1000, 3] *= 40
    g[1005:, 3] = 0.0
    g[1010:, 7] *= 1e-6
    rep = detect(run)
    dead = rep.episodes[-1]
    assert [(f.name, f.ratio > 0) for f in dead.layers] == [("layer3", False), ("layer7", True)]
    assert dead.dead["layers"] == 2 and dead.dead["vanished"] == 1 and dead.dead["after_episode"] == 1000
    assert any("went to exactly zero (1) or fell 10,000× or more below their baseline (1)" in a for a in dead.advice)
    assert _online(run).to_json() == rep.to_json()


@given(seed=st.integers(0, 10_000), drops=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 5),
                                                            st.floats(1e-7, 1e-2)), max_size=6))
@settings(max_examples=40, deadline=None)
def test_offline_points_far_below_the_baseline_equal_the_sequential_ones(seed, drops):
    """:func:`solve`'s low points are exactly those :meth:`Baseline.below` finds point by point."""
    cfg = DetectorConfig(block=8, window_blocks=4, min_history=16, mature_history=32)
    rng = np.random.default_rng(seed)
    v = np.exp(rng.normal(0, 0.5, (400, 6)))
    v[rng.random((400, 6)) < 0.02] *= 30  # crossings move the baselines
    for at, col, factor in drops:
        v[at:at + 20, col] *= factor
    valid = rng.random((400, 6)) > 0.05
    _, _, _, (rows, cols, base) = solve(Points(v, valid), cfg, cfg.ratio, cfg.z, cfg.min_history,
                                          cfg.mature_history, low_ratio=1e3)
    seq = Baseline(6, cfg, cfg.ratio, cfg.z, cfg.min_history, cfg.mature_history)
    found = {}
    for i in range(400):
        logv, ok = log_positive(v[i])
        below = seq.below(logv, ok & valid[i], math.log(1e3))
        for c in np.nonzero(~np.isnan(below))[0].tolist():
            found[(i, c)] = below[c]
        seq.step(logv, ok & valid[i])
    assert dict(zip(zip(rows.tolist(), cols.tolist(), strict=True), base.tolist(), strict=True)) == found


def test_a_layer_that_never_had_a_gradient_or_dies_only_briefly_is_not_dead():
    run = _run()
    g = run.layer_metrics["grad_norm"]
    g[:, 2] = 0.0  # unused from the start (a frozen or unused embedding): not dead
    g[1200:1210, 5] = 0.0  # ten steps: shorter than dead_points
    rep = detect(run)
    assert rep.episodes == []
    assert _online(run).to_json() == rep.to_json()


def test_a_loss_spike_after_layers_died_links_to_the_explosion_not_the_dead_finding():
    run = _run(loss=_reacting_loss(2000, 1500))
    g = run.layer_metrics["grad_norm"]
    g[1000, 3] *= 40
    g[1005:, 3] = 0.0
    rep = detect(run)
    assert [e.kind for e in rep.episodes] == ["explosion", "dead"]
    assert [(s.step, s.episode) for s in rep.loss_spikes] == [(1500, None)]
    assert _online(run).to_json() == rep.to_json()


@given(seed=st.integers(0, 10_000), spans=st.lists(st.tuples(st.integers(100, 1900), st.integers(1, 400),
                                                            st.integers(0, 11), st.sampled_from([0.0, 1e-6, 1e-3])),
                                                  min_size=1, max_size=5))
@settings(max_examples=15, deadline=None)
def test_dead_layers_online_equal_offline_for_any_mix_of_zeros_and_vanished_stretches(seed, spans):
    run = _run(n_steps=2000, seed=seed)
    g = run.layer_metrics["grad_norm"]
    for at, length, col, factor in spans:
        g[at:at + length, col] *= factor
    rep = detect(run)
    assert _online(run).to_json() == rep.to_json()
