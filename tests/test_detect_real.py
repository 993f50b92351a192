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
