"""The HTML report's pictures: spikes survive the reduction, many layers are sampled around the offending ones."""

from __future__ import annotations

import numpy as np

from tb_gradient_plugin.html_report import MAX_HEATMAP_LAYERS, chart_data, render
from tb_gradient_plugin.runs import RunData, Series


def make_run(layers: int, steps: int, spike: tuple[int, int]) -> RunData:
    rng = np.random.default_rng(0)
    grads = np.exp(rng.normal(0, 0.1, (steps, layers))).astype(np.float32)
    grads[spike] = 1e4
    grads[steps // 2, 0] = np.nan
    names = [f"layers.{i}" for i in range(layers)]
    loss = np.ones(steps)
    loss[spike[0] + 2] = 50.0
    return RunData(name="r", source="tb_gradient_plugin", layers=names, steps=np.arange(steps, dtype=np.int64),
                   layer_metrics={"grad_norm": grads}, present=np.ones((steps, layers), dtype=bool),
                   series={"loss": Series(np.arange(steps, dtype=np.int64), loss)})


def test_heatmap_keeps_one_step_spike_and_offending_layer():
    run = make_run(layers=300, steps=20000, spike=(12345, 211))
    report = {"episodes": [{"kind": "explosion", "start_step": 12345, "end_step": 12345, "peak_step": 12345,
                            "layers": [{"name": "layers.211"}]}]}
    chart = chart_data(run, report)
    hm = chart["heatmap"]
    assert len(hm["layers"]) <= MAX_HEATMAP_LAYERS and hm["total_layers"] == 300
    row = hm["layers"].index("layers.211")
    assert np.nanmax(hm["values"][row]) == 1e4  # a single step among 20,000 is still in its column
    assert hm["nonfinite"][hm["layers"].index("layers.0")].any()
    assert max(v for v in chart["loss"]["max"] if v is not None) == 50.0


def test_render_draws_each_run():
    run = make_run(layers=5, steps=300, spike=(100, 2))
    report = {"run": "r<&>", "source": "tb_gradient_plugin", "steps": 300, "loss_spikes": [], "warnings": ["w<b>"],
              "episodes": [{"kind": "explosion", "start_step": 100, "end_step": 101, "peak_step": 100,
                            "severity": 1e4, "loss_spike_step": 102, "advice": ["lower <lr>"],
                            "layers": [{"name": "layers.2", "ratio": 1e4}]}]}
    page = render([{"index": 0, "report": report, "layers": 5, "unknown_tags": ["x<y"],
                    "chart": chart_data(run, report)}])
    assert "r&lt;&amp;&gt;" in page and "w&lt;b&gt;" in page and "lower &lt;lr&gt;" in page and "x&lt;y" in page
    assert "<b>" not in page and page.count("data:image/png;base64,") == 1 and "<svg" in page


def test_dead_layers_say_whether_they_went_to_zero_or_vanished():
    """The CLI table and the report name a dead layer's onset, and whether it hit zero or fell far below its
    baseline; other findings show their ratio over the baseline."""
    from tb_gradient_plugin.html_report import layer_note

    dead = {"kind": "dead", "dead": {"layers": 2, "vanished": 1}}
    assert layer_note(dead, {"first_step": 45, "ratio": 0}) == "zero from 45"
    assert layer_note(dead, {"first_step": 1300, "ratio": 3.1e-5}) == "vanished from 1300"
    assert layer_note({"kind": "explosion", "dead": None}, {"first_step": 3, "ratio": 134.2}) == "134×"
