"""The labeled suite's heavy-tailed group: the TF NMT logs, the synthetic profiles measured on them, the labeled
explosions on a heavy-tailed background, and the ``lstm_lm`` corpus."""

from __future__ import annotations

import numpy as np

from benchmarks import detection_suite as suite
from benchmarks import suite_real_runs as real
from tb_gradient_plugin.runs import RunData, Series


def test_tf_nmt_logs_read_as_a_global_norm_with_the_readme_counts(realruns):
    """H1-H4: ``grad_norm`` is the total norm, there are no layers, and the README's 5x / 10x spike counts hold."""
    cases = suite.heavytail_thirdparty_cases(str(realruns))
    assert [(suite.readme_spike_points(c.run.series["total_grad_norm"].values, 5).size,
             suite.readme_spike_points(c.run.series["total_grad_norm"].values).size) for c in cases] == [
        (65, 15), (23, 16), (20, 14), (23, 1)]
    for c in cases:
        assert c.group == "heavytail" and c.labels == [] and not c.loss_only
        assert c.run.layers == [] and {"loss", "total_grad_norm"} <= set(c.run.series)
        assert "clipped_gradient" in c.run.unknown_tags
        steps = c.run.series["total_grad_norm"].steps
        skip = int(0.05 * steps.size)
        assert c.unscored == [(int(steps[0]), int(steps[skip - 1]))]
        assert suite.score_case(c, []).healthy_points == steps.size - skip


def test_a_run_with_only_a_global_norm_is_scored_on_its_steps_by_every_detector():
    rng = np.random.default_rng(0)
    g = np.exp(rng.normal(0, 0.05, 400))
    g[300] *= 4000  # extreme: an explosion on its own (a 40x one would be a transient spike, never scored)
    axis = np.arange(400)
    run = RunData("g", "plain", series={"total_grad_norm": Series(axis, g), "loss": Series(axis, np.ones(400))})
    case = suite.Case("g", "heavytail", run, [])
    (det,) = suite.run_baseline(suite.rule_rolling_median, case)
    assert (det.start, det.layer) == (300, "total_grad_norm")
    assert [(d.start, d.layer) for d in suite.run_ours(case)] == [(300, "total_grad_norm")]
    sc = suite.score_case(case, [det])
    assert (sc.healthy_points, sc.false) == (400, 1)


def test_healthy_profiles_have_the_measured_spike_rates_a_quiet_loss_and_clipped_updates():
    cases = {c.meta["profile"]: c for c in suite.heavytail_synthetic_cases(small=True) if not c.labels}
    # measured on H2, H4, H3, H1 (per 10k): 20 / 14, 20 / 0.9, 129 / 90, 688 / 159
    bounds = {"bursts": ((12, 30), (6, 22)), "mild": ((12, 30), (0, 4)), "clockwork": ((100, 140), (60, 110)),
              "dense": ((500, 850), (100, 220))}
    assert set(cases) == set(bounds)
    for name, ((lo5, hi5), (lo10, hi10)) in bounds.items():
        c = cases[name]
        total = c.run.series["total_grad_norm"].values
        rates = suite.spike_rates(total)
        assert lo5 <= rates["over5_per10k"] <= hi5 and lo10 <= rates["over10_per10k"] <= hi10, (name, rates)
        spikes = suite.readme_spike_points(total, 5)
        loss = c.run.series["loss"].values
        assert np.all(loss[spikes] < 1.5 * suite.window_medians(loss)[spikes]), name  # the loss does not react
        ratio = c.run.update_ratio()
        assert np.max(ratio / np.median(ratio, axis=0)) < 10, name  # clipping bounds the updates


def test_labeled_heavytail_events_loss_reacts_after_the_spike_and_chronic_spikes_recur():
    cases = {c.name.rsplit("-", 1)[1]: c for c in suite.heavytail_synthetic_cases(small=True) if c.labels}
    reacts, chronic = cases["loss_reacts"], cases["chronic"]
    (lab,) = reacts.labels
    loss = reacts.run.series["loss"].values
    assert 1 <= lab.end - lab.start <= 3
    assert loss[lab.end] > 4 * np.median(loss[lab.start - 50:lab.start]) > 2 * loss[lab.start]
    origin = reacts.run.layers.index(lab.layer)
    g = reacts.run.layer_metrics["grad_norm"]
    assert np.argmax(g[lab.start] / np.median(g[lab.start - 50:lab.start], axis=0)) == origin

    (lab,) = chronic.labels
    n = chronic.run.steps.size
    assert lab.end == n - 1
    col = chronic.run.layer_metrics["grad_norm"][:, chronic.run.layers.index(lab.layer)]
    hits = suite.readme_spike_points(col, 5)
    assert (hits >= lab.start).sum() / (n - lab.start) > 10 * (hits < lab.start).sum() / lab.start
    loss = chronic.run.series["loss"].values
    assert np.median(loss[-100:]) > 1.8 * np.median(loss[int(0.8 * n) - 100:int(0.8 * n)])


def test_lstm_lm_corpus_garbled_stretches_make_their_own_batches():
    """Every epoch meets the same 3 consecutive garbled batches and 1 more: clockwork bursts and single spikes."""
    sentences, batches = real.lm_corpus()
    assert len(batches) == 500 and all(b.size == real.LM_BATCH for b in batches)
    longest = [min(sentences[i].size for i in b) for b in batches]
    garbled = [k for k, n in enumerate(longest) if n > 41]  # clean lines are at most 40 tokens + the end mark
    runs = np.split(np.asarray(garbled), np.nonzero(np.diff(garbled) > 1)[0] + 1)
    assert sorted(r.size for r in runs) == [1, 3]
    assert all(max(sentences[i].size for i in b) <= 41 for k, b in enumerate(batches) if k not in garbled)
