"""The wording of relative steps: one table, the same words in the tab (``frontend/src/wording.js``), the command
line, the HTML report and the advice."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tb_gradient_plugin.wording import EPISODE_START, relative_step, steps_count

REPO = Path(__file__).resolve().parents[1]
DELTAS = [-1234, -2, -1, 0, 1, 2, 3, 1000]


def test_relative_steps_read_right() -> None:
    assert relative_step(-1) == "1 step before the peak"
    assert relative_step(0) == "at the peak"
    assert relative_step(3) == "3 steps after the peak"
    assert relative_step(-2) == "2 steps before the peak"
    assert relative_step(1200) == "1,200 steps after the peak"
    assert relative_step(0, EPISODE_START) == "at the episode's start"
    assert relative_step(-4, EPISODE_START) == "4 steps before the episode's start"
    assert steps_count(1) == "1 step" and steps_count(0) == "0 steps"
    assert all("-" not in relative_step(d) for d in DELTAS)  # never "-1 steps after"


def test_the_tab_words_relative_steps_as_python_does() -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed to check the tab's wording"
    script = ("import { relativeStep } from './frontend/src/wording.js';"
              f"const d = {json.dumps(DELTAS)};"
              "console.log(JSON.stringify([d.map((x) => relativeStep(x)), d.map((x) => relativeStep(x, "
              f"{json.dumps(EPISODE_START)}))]));")
    out = subprocess.run([node, "--input-type=module", "-e", script], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert json.loads(out) == [[relative_step(d) for d in DELTAS], [relative_step(d, EPISODE_START) for d in DELTAS]]
