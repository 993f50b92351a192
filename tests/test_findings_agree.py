"""Findings that agree with each other: the advice names the layer the ranking puts first (or says why not), and
relative steps read the same, and right, in the command line and the HTML report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tb_gradient_plugin import GradientWriter
from tb_gradient_plugin.auditor import audit_run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo_logs"


def _nonfinite(report: dict) -> dict:
    return next(e for e in report["episodes"] if e["kind"] == "nonfinite" and e["validation"] is None)


def test_advice_names_the_top_ranked_layer_on_the_raised_learning_rate_demo() -> None:
    ep = _nonfinite(audit_run("mlp_lr_raised", str(DEMO / "mlp_lr_raised"))["report"])
    line = next(a for a in ep["advice"] if a.startswith("Gradients became non-finite"))
    assert re.match(r"Gradients became non-finite in (\S+) at step", line).group(1) == ep["layers"][0]["name"]


def test_advice_says_why_the_top_ranked_layer_is_not_where_it_went_non_finite(tmp_path: Path) -> None:
    """Layer ``a`` grows first and furthest; ``b`` is the one whose gradient overflows: both are named, with why."""
    rng = np.random.default_rng(0)
    with GradientWriter(tmp_path) as w:
        for s in range(300):
            g = np.exp(rng.normal(0, 0.05, 3))
            loss = 1.0
            if s >= 200:
                g[0] *= 10.0 ** min(4, 1 + (s - 200) / 2)
                g[1] *= 3.0 ** min(3, (s - 200) / 3)
            nonfinite = np.zeros(3)
            if s >= 206:
                g[1], nonfinite[1], loss = np.inf, 7, float("nan")
            w.write(s, ["a", "b", "c"], grad_norm=g, nonfinite_count=nonfinite, loss=loss)
    ep = _nonfinite(audit_run("run", str(tmp_path))["report"])
    assert ep["layers"][0]["name"] == "a" and ep["layers"][0]["first_step"] == 200
    line = next(a for a in ep["advice"] if a.startswith("Gradients became non-finite"))
    assert line.startswith("Gradients became non-finite in b at step 206 after growing from step 200.")
    assert "a is ranked first because it was the furthest above its baseline when the episode began" in line


def test_relative_steps_in_the_command_line_and_the_html_report(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    out = subprocess.run([sys.executable, "-m", "tb_gradient_plugin", "audit", str(DEMO / "mlp_lr_raised"),
                          "--fail-on", "never", "--html", str(report)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, COLUMNS="250"), cwd=REPO).stdout
    flat = " ".join(out.split())
    # the demo's loss spiked at step 304, one step before the gradients peaked at 305
    assert "step 304 (1 step before the peak)" in flat
    assert "The loss spiked at step 304, 1 step before the peak of the gradients (step 305)." in flat
    assert "(at step 300, at the episode's start)" in flat
    page = report.read_text(encoding="utf-8")
    assert "step 304 (1 step before the peak)" in page
    for text in (flat, page):
        assert not re.search(r"-\d+ steps? after|\b0 steps (before|after)", text)
