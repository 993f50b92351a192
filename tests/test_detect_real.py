"""The real-training part of the labeled suite, reduced: a deep MLP and an RNN, healthy and with the LR raised."""

from __future__ import annotations

import pytest

from benchmarks import detection_suite as suite
from benchmarks import suite_real_runs as real


@pytest.mark.slow
def test_real_small_runs_lr_raise_found_and_healthy_twins_quiet(tmp_path):
    pytest.importorskip("torch")
    real.train(str(tmp_path), ["mlp", "rnn"], log=lambda _msg: None)
    cases = suite.real_cases(str(tmp_path), ["mlp", "rnn"])
    assert sorted(c.name for c in cases) == ["mlp-healthy", "mlp-lr_raised", "rnn-healthy", "rnn-lr_raised"]
    for c in cases:
        dets = suite.run_ours(c)
        if c.labels:
            assert dets and dets[0].start >= c.labels[0].start - suite.TOLERANCE, c.name
        else:
            assert dets == [], c.name
    scores, _ = suite.evaluate(cases)
    ours = scores.pop("ours")
    assert ours.recall == 1.0 and ours.false == 0
    assert all(ours.f1 >= s.f1 for s in scores.values())


def test_label_skips_update_ratios_in_the_healthy_range_and_keeps_statistical_ties():
    """A learning-rate change multiplies every layer's update ratio by the same factor at the same step: the label
    is not a layer whose updates stay at 2.5e-4 of its weights, and layers whose ratios differ by less than the
    uncertainty of their pre-change median are tied."""
    import numpy as np

    from tb_gradient_plugin.runs import RunData

    rng = np.random.default_rng(0)
    n, change = 300, 200
    lr = np.where(np.arange(n) < change, 1.0, 200.0)[:, None]
    level = np.array([1e-6, 1e-3, 1e-3, 1e-3])
    noise = np.exp(rng.normal(0, [0.3, 0.3, 0.3, 0.01], (n, 4)))
    upd = level * lr * noise
    upd[change] = level * 200 * np.array([1.3, 1.0, 0.97, 0.7])  # ratios 260x (healthy range), 200x, 194x, 140x
    param = np.ones((n, 4))
    run = RunData("r", "tb_gradient_plugin", ["tiny", "a", "b", "smooth"], np.arange(n),
                  {"grad_norm": np.ones((n, 4)), "param_norm": param, "update_norm": upd * param},
                  np.ones((n, 4), dtype=bool))
    layers, step = real.first_crossing_layers(run, change)
    assert step == change
    assert set(layers) == {"a", "b"}
    lab = suite.Label(change, n - 1, "explosion", layers[0], layers[1:])
    case = suite.Case("r", "real", run, [lab])
    assert suite.score_case(case, [suite.Detected(change, n - 1, "b")]).layer_hits == 1
    assert suite.score_case(case, [suite.Detected(change, n - 1, "tiny")]).layer_hits == 0
