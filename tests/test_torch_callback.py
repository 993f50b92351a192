"""The options the Lightning and Hugging Face callbacks share: GradientMonitor's own keywords, defaults and checks."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from tb_gradient_plugin.guard import ExplosionGuard
from tb_gradient_plugin.torch import GradientMonitor
from tb_gradient_plugin.torch.callback import MonitorCallback


def test_callback_options_are_monitor_keywords_with_the_same_defaults():
    monitor = inspect.signature(GradientMonitor).parameters
    callback = inspect.signature(MonitorCallback).parameters
    assert list(callback)[0] == "logdir" and callback["logdir"].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    # batch_ids is the callbacks' own: where a framework's batch holds its sample ids (the monitor gets the ids)
    assert callback["batch_ids"].default is None and callback["batch_ids"].kind == inspect.Parameter.KEYWORD_ONLY
    for name, param in callback.items():
        if name == "batch_ids":
            continue
        assert name in monitor, name
        assert param.default == monitor[name].default, name
        if name != "logdir":
            assert param.kind == inspect.Parameter.KEYWORD_ONLY, name


def test_callback_passes_every_other_option_to_the_monitor(tmp_path):
    def by_block(name: str) -> str:
        return name.split(".")[0]

    callback = MonitorCallback(Path(tmp_path), every=3, update_norms="copy", histograms_every=2, include="0|2",
                               exclude="4", group_by=by_block, flush_secs=5.0, on_explosion="warn")
    assert callback.logdir == str(tmp_path)
    assert callback._options == {"every": 3, "update_norms": "copy", "histograms_every": 2, "include": "0|2",
                                 "exclude": "4", "group_depth": None, "group_by": by_block, "flush_secs": 5.0}
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, opt, callback.logdir, **callback._options) as monitor:
        assert (monitor.every, monitor.histograms_every, monitor.update_norms) == (3, 2, "copy")
        assert monitor.layers == ("0", "2")


def test_callback_checks_options_when_built_and_makes_a_fresh_guard_per_run():
    with pytest.raises(ValueError, match="every"):
        MonitorCallback(every=0)
    with pytest.raises(ValueError, match="histograms_every"):
        MonitorCallback(histograms_every=-1)
    with pytest.raises(ValueError, match="on_explosion"):
        MonitorCallback(on_explosion="explode")
    with pytest.raises(TypeError):
        MonitorCallback(None, 1)  # options are keyword-only

    callback = MonitorCallback(on_explosion="skip")
    assert callback.guard is None and callback.monitor is None
    first = callback._new_guard()
    second = callback._new_guard()
    assert isinstance(first, ExplosionGuard) and first.action == second.action == "skip"
    assert first is not second and callback.guard is second
    assert MonitorCallback()._new_guard() is None
