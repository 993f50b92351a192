"""The notebook API: ``from tb_gradient_plugin import audit; reports = audit("logdir")``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_audit import write

from tb_gradient_plugin import audit
from tb_gradient_plugin.auditor import UsageError
from tb_gradient_plugin.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb")
    write(root / "healthy", seed=1)
    write(root / "exploding", spike=400, seed=2)
    write(root / "a<b>&c", nan_from=500, seed=3)
    return root


@pytest.fixture(scope="module")
def reports(logdir):
    return audit(logdir)


def test_to_json_is_the_cli_run_object(reports, logdir, capsys):
    assert main(["audit", str(logdir), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [r.name for r in reports] == [r["run"] for r in doc["runs"]]
    for run, expected in zip(reports, doc["runs"], strict=True):
        assert run.to_json() == expected
    assert reports.to_json() == doc
    assert json.dumps(reports["exploding"].to_json(), allow_nan=False)  # plain JSON, as in --json


def test_to_pandas_lists_the_episodes(reports):
    frame = reports["exploding"].to_pandas()
    assert len(frame) == len(reports["exploding"].episodes) >= 1
    first = frame.iloc[0]
    assert (first["kind"], first["start_step"], first["top_layer"]) == ("explosion", 400, "block5.fc")
    assert reports["healthy"].to_pandas().empty and list(reports["healthy"].to_pandas().columns) == list(frame.columns)
    everything = reports.to_pandas()
    assert set(everything["run"]) == {"exploding", "a<b>&c"}
    assert "nonfinite" in set(everything[everything["run"] == "a<b>&c"]["kind"])


def test_repr_html_is_the_report_chart_of_the_run(reports):
    page = reports["exploding"]._repr_html_()
    assert page.startswith('<div class="tb-gradient-report"><style>')
    assert "<svg" in page and 'src="data:image/png;base64,' in page  # the loss chart and the heatmap
    assert "block5.fc" in page and "<script" not in page
    assert "body{" not in page and ".tb-gradient-report h2{" in page  # the style stays inside the fragment
    odd = reports["a<b>&c"]._repr_html_()
    assert "a&lt;b&gt;&amp;c" in odd and "a<b>&c" not in odd
    assert reports._repr_html_().count('<div class="tb-gradient-report">') == 3


def test_pandas_is_an_optional_import(reports, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # what `import pandas` meets where it is not installed
    with pytest.raises(ImportError, match=r"to_pandas\(\) needs pandas: pip install pandas"):
        reports["exploding"].to_pandas()
    assert reports["exploding"].to_json()["run"] == "exploding"  # the rest works without it


def test_bad_input(tmp_path, reports):
    with pytest.raises(UsageError, match="no such logdir"):
        audit(tmp_path / "missing")
    with pytest.raises(UsageError, match="no runs"):
        audit(tmp_path)
    with pytest.raises(KeyError):
        reports["no such run"]


def test_importing_the_package_loads_no_auditor_pandas_or_framework():
    """TensorBoard imports the package at start-up: ``audit`` must cost nothing until it is used."""
    code = ("import sys, tb_gradient_plugin; "
            "heavy = [m for m in ('tb_gradient_plugin.auditor', 'tb_gradient_plugin.detect', 'pandas', 'torch', "
            "'tensorflow', 'distributed') if m in sys.modules]; print(heavy); "
            "from tb_gradient_plugin import audit; print(audit.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         check=True).stdout.split("\n")
    assert out[:2] == ["[]", "tb_gradient_plugin.notebook"]
