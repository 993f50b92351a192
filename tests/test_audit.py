"""The auditor CLI, run as a real subprocess: output, JSON, HTML, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tb_gradient_plugin import GradientWriter

REPO = Path(__file__).resolve().parents[1]
LAYERS = [f"block{i}.fc" for i in range(12)]


def tb_gradient() -> list[str]:
    exe = Path(sys.executable).with_name("tb-gradient")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tb_gradient_plugin"]


def cli(*args: str, timeout: float = 120, columns: int = 200) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS=str(columns))
    return subprocess.run(tb_gradient() + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def write(path: Path, steps: int = 600, *, spike: int | None = None, nan_from: int | None = None,
          transient: int | None = None, layers=LAYERS, seed: int = 0) -> None:
    """A run written by our writer; ``spike``: layer 5 explodes for 3 steps; ``nan_from``: layer 2 goes NaN;
    ``transient``: layer 3 jumps 40x for one step while the loss stays normal (a clipped spike)."""
    rng = np.random.default_rng(seed)
    with GradientWriter(path) as w:
        for s in range(steps):
            g = np.exp(rng.normal(0, 0.1, len(layers)))
            if s == transient:
                g[3] *= 40
            loss = 2.0 * np.exp(-s / 200) + 0.1 + rng.normal(0, 0.005)
            if spike is not None and spike <= s < spike + 3:
                g[5] *= 1000
            if spike is not None and s == spike + 4:
                loss *= 30
            if nan_from is not None and s >= nan_from:
                g[2] = np.nan
                loss = float("nan")
            w.write(s, layers, grad_norm=g, param_norm=np.full(len(layers), 10.0), update_norm=g * 1e-3,
                    loss=loss, lr=1e-3, total_grad_norm=float(np.sqrt(np.nansum(g * g))))


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    write(root / "healthy", seed=1)
    write(root / "exploding", spike=400, seed=2)
    write(root / "nan", nan_from=500, seed=3)
    return root


def audit_json(*args: str) -> tuple[dict, subprocess.CompletedProcess]:
    proc = cli("audit", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout), proc


def test_table_output_and_exit_code(logdir):
    proc = cli("audit", str(logdir))
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    for text in ("healthy", "exploding", "nan", "explosion", "nonfinite", "block5.fc", "block2.fc",
                 "tb_gradient_plugin"):
        assert text in out
    assert "Clip the total gradient norm" in out  # advice lines are printed


def test_json_schema_and_findings(logdir):
    doc, _ = audit_json(str(logdir))
    runs = {r["run"]: r for r in doc["runs"]}
    assert list(runs) == ["exploding", "healthy", "nan"]
    for r in doc["runs"]:
        assert set(r) >= {"run", "source", "steps", "episodes", "loss_spikes", "warnings"}
        assert isinstance(r["steps"], int) and r["source"] == "tb_gradient_plugin" and r["layers"] == 12
        for e in r["episodes"]:
            assert set(e) >= {"kind", "start_step", "end_step", "peak_step", "severity", "layers",
                              "loss_spike_step", "advice"}
            assert all("name" in f for f in e["layers"])
        for s in r["loss_spikes"]:
            assert isinstance(s["step"], int)
    assert runs["healthy"]["episodes"] == []
    (ep,) = [e for e in runs["exploding"]["episodes"] if e["kind"] == "explosion"]
    assert ep["start_step"] == 400 and ep["layers"][0]["name"] == "block5.fc"
    assert ep["loss_spike_step"] == 404
    nonfinite = [e for e in runs["nan"]["episodes"] if e["kind"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["start_step"] == 500 and nonfinite[0]["layers"][0]["name"] == "block2.fc"
    assert doc["failed"] is True and doc["failed_runs"] == ["exploding", "nan"]


@pytest.mark.parametrize(("glob", "fail_on", "code"), [
    ("healthy", "explosion", 0),
    ("exploding", "explosion", 1),
    ("exploding", "nonfinite", 0),
    ("nan", "nonfinite", 1),
    ("exploding", "never", 0),
    ("healthy", "any", 0),
    ("exploding", "any", 1),
])
def test_fail_on_and_run_glob(logdir, glob, fail_on, code):
    proc = cli("audit", str(logdir), "--run", glob, "--fail-on", fail_on, "--json")
    assert proc.returncode == code, proc.stderr
    assert [r["run"] for r in json.loads(proc.stdout)["runs"]] == [glob]


def test_usage_errors_exit_2(tmp_path, logdir):
    assert cli("audit").returncode == 2
    assert cli("audit", str(logdir), "--fail-on", "sometimes").returncode == 2
    assert cli("frobnicate").returncode == 2
    missing = cli("audit", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "no such logdir" in missing.stderr
    empty = cli("audit", str(tmp_path))
    assert empty.returncode == 2 and "no runs" in empty.stderr
    no_match = cli("audit", str(logdir), "--run", "zzz*")
    assert no_match.returncode == 2 and "matching" in no_match.stderr
    a_file = tmp_path / "events.txt"
    a_file.write_text("not a logdir")
    is_file = cli("audit", str(a_file))
    assert is_file.returncode == 2 and "not a directory" in is_file.stderr
    assert "Traceback" not in is_file.stderr and len(is_file.stderr.strip().splitlines()) == 1


def test_unreadable_input_exit_2(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.out.tfevents.123.host").write_bytes(os.urandom(20000))
    proc = cli("audit", str(tmp_path))
    assert proc.returncode == 2
    assert "nothing could be read" in proc.stderr


def test_a_run_not_read_or_not_judged_still_gets_the_whole_run_object(logdir, monkeypatch):
    """The fallback reports carry every field of the run object (docs/AUDIT_JSON.md), ``validation`` included."""
    from tb_gradient_plugin import auditor as audit

    fields = set(audit.audit_run("healthy", str(logdir / "healthy"))["report"])
    assert "validation" in fields

    def unreadable(path, name=None, cache=None):
        raise OSError("disk on fire")

    with monkeypatch.context() as patch:
        patch.setattr(audit, "load_run", unreadable)
        report = audit.audit_run("gone", str(logdir / "healthy"))["report"]
    assert set(report) == fields and report["validation"] == [] and report["episodes"] == []
    assert report["warnings"] == ["unreadable: OSError: disk on fire"] and report["source"] == "unknown"

    def broken(run, config=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(audit, "detect", broken)
    result = audit.audit_run("healthy", str(logdir / "healthy"))
    report = result["report"]
    assert set(report) == fields and report["validation"] == [] and report["steps"] == 0
    assert report["warnings"][-1] == "could not be audited: RuntimeError: boom" and "RuntimeError" in result["error"]
    (run,) = audit.audit_json([result | {"index": 0}], "explosion")["runs"]
    assert run["validation"] == [] and run["layers"] == 12


def test_damaged_file_audited_with_warning(tmp_path):
    write(tmp_path / "run", spike=400)
    path = next((tmp_path / "run").iterdir())
    data = bytearray(path.read_bytes())
    cut = len(data) // 5
    data[cut:cut + 64] = b"\x00" * 64
    path.write_bytes(bytes(data[:-9]))  # and a truncated tail
    proc = cli("audit", str(tmp_path), "--json")
    assert proc.returncode == 1  # the explosion after the damage is still found: not exit 2
    (run,) = json.loads(proc.stdout)["runs"]
    assert any(e["kind"] == "explosion" and e["start_step"] == 400 for e in run["episodes"])
    assert len(run["warnings"]) >= 2
    assert "ends inside a record" in proc.stderr and "warning" in proc.stderr


def test_html_report_self_contained_and_escaped(tmp_path, logdir):
    hostile = tmp_path / "logs" / "<script>alert(1)</script>"
    write(hostile, steps=100, layers=["<img src=x onerror=alert(1)>", "ok"], seed=4)
    write(tmp_path / "logs" / "exploding", spike=400, seed=2)
    report = tmp_path / "report.html"
    proc = cli("audit", str(tmp_path / "logs"), "--html", str(report))
    assert proc.returncode == 1, proc.stderr
    page = report.read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from a network
    assert page.count("<svg") >= 2 and "data:image/png;base64," in page  # pictures, not only tables
    assert "block5.fc" in page and "Clip the total gradient norm" in page


def test_realruns_audit(realruns, tmp_path):
    """Every third-party run is read and judged; the healthy ones come out clean."""
    report = tmp_path / "real.html"
    proc = cli("audit", str(realruns), "--json", "--fail-on", "never", "--html", str(report))
    assert proc.returncode == 0, proc.stderr
    runs = {r["run"]: r for r in json.loads(proc.stdout)["runs"]}
    assert len(runs) == 16
    healthy = [
        "Aydana1__Enhancing_YOLOv5l/runs/train/exp31",
        "ZakSingh__omelette/lightning_logs/math",
        "TheCodeheadMT__TensorBoard-Tutorial/archive/logs/mod1-reuters-1690485395",
        "dparra2399__LearnedCoWSiP/experiments/illum_peak_models/n1024_k8_sigma10_peak030_counts1000",
        "inwaves__prob-models/lightning_logs/version_82",
        "aarugunj27__EnzymeKcatAnaylsis/logs",
    ]
    for name in healthy:
        assert not [e for e in runs[name]["episodes"] if e["kind"] in ("explosion", "nonfinite")], name
    for name, run in runs.items():
        assert run["steps"] > 0, name
    assert runs["aarugunj27__EnzymeKcatAnaylsis/logs"]["source"] == "hf_trainer"
    nmt = [name for name in runs if "train_log" in name]  # TF-NMT: heavy-tailed pre-clip norms, healthy training
    assert len(nmt) == 4
    for name in nmt:
        assert runs[name]["episodes"] == [], name
    assert sum(runs[name]["spikes"]["count"] > 0 for name in nmt) >= 3
    assert "TensorBoard-Tutorial" in report.read_text(encoding="utf-8")


def test_realrun_with_nan_flagged_nonfinite(realruns):
    """YOLOv5 run whose validation losses are NaN at epoch 10 (its only non-finite values): a nonfinite finding,
    which fails ``--fail-on nonfinite`` but not the default ``explosion`` (it is a validation finding)."""
    proc = cli("audit", str(realruns), "--json", "--run", "*yolov5m6_34", "--fail-on", "nonfinite")
    assert proc.returncode == 1, proc.stderr
    (run,) = json.loads(proc.stdout)["runs"]
    nonfinite = [e for e in run["episodes"] if e["kind"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["start_step"] == 10 and nonfinite[0]["validation"]["cause"] == "nonfinite"
    assert cli("audit", str(realruns), "--run", "*yolov5m6_34").returncode == 0


@pytest.mark.slow
def test_two_hundred_runs_in_parallel(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(200):
        with GradientWriter(tmp_path / f"trial_{i:03d}") as w:
            for s in range(60):
                g = np.exp(rng.normal(0, 0.05, 3))
                if i == 77 and s == 50:
                    g[1] *= 1e4
                w.write(s, ["a", "b", "c"], grad_norm=g, loss=1.0)
    proc = cli("audit", str(tmp_path), "--json", "--workers", "2", timeout=300)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["runs"]) == 200 and [r["run"] for r in doc["runs"]] == sorted(r["run"] for r in doc["runs"])
    assert doc["failed_runs"] == ["trial_077"]


def test_compare_runs(logdir):
    proc = cli("compare", str(logdir / "healthy"), str(logdir / "exploding"), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["a"]["exploded"] is False and doc["b"]["exploded"] is True
    assert doc["b"]["first_episode"]["start_step"] == 400
    assert "did not explode" in doc["verdict"] and "400" in doc["verdict"]
    assert doc["layers"][0]["name"] == "block5.fc"  # the most different layer first
    assert doc["layers"][0]["grad_norm"]["max_ratio"] > 100
    assert doc["common_layers"] == 12
    table = cli("compare", str(logdir / "healthy"), str(logdir / "exploding"))
    assert table.returncode == 0 and "block5.fc" in table.stdout and "did not explode" in table.stdout
    assert cli("compare", str(logdir / "healthy"), str(logdir / "missing")).returncode == 2


def test_several_paths_prefix_names(logdir, tmp_path):
    write(tmp_path / "other", steps=100, seed=5)
    doc, _ = audit_json(str(logdir), str(tmp_path), "--run", "*other*")
    assert [r["run"] for r in doc["runs"]] == [f"{tmp_path}/other"]


def test_transient_spikes_are_a_rate_that_fails_only_fail_on_any(tmp_path):
    write(tmp_path / "spiky", transient=300, seed=4)
    for fail_on, code in (("explosion", 0), ("nonfinite", 0), ("any", 1)):
        assert cli("audit", str(tmp_path), "--fail-on", fail_on).returncode == code, fail_on
    doc, _ = audit_json(str(tmp_path), "--fail-on", "never")
    (run,) = doc["runs"]
    assert run["episodes"] == []
    spikes = run["spikes"]
    assert (spikes["count"], spikes["steps"], spikes["logged_steps"], spikes["with_loss_spike"]) == (1, [300], 600, 0)
    assert spikes["per_10k_steps"] == pytest.approx(16.667, abs=1e-3) and 20 < spikes["max_ratio"] < 80
    table = cli("audit", str(tmp_path)).stdout
    assert spikes["summary"] in table.replace("\n", " ") and "spiky" in table


def test_a_run_level_series_is_named_as_what_it_is(tmp_path):
    """A run without per-layer data: its finding is the total gradient norm, not a layer called total_grad_norm."""
    rng = np.random.default_rng(6)
    with GradientWriter(tmp_path / "hf") as w:
        for s in range(400):
            w.write(s, [], loss=1.0, total_grad_norm=float(np.exp(rng.normal(0, 0.05))) * (5000.0 if s == 300 else 1))
    table = cli("audit", str(tmp_path)).stdout
    assert "1. total gradient norm [total_grad_norm]" in table and "1. total_grad_norm" not in table


def test_fsspec_url_in_process(logdir, capsys):
    """A logdir behind an fsspec URL (memory://, as for s3:// or gs://) audits like a local one."""
    import fsspec

    from tb_gradient_plugin.cli import main

    fs = fsspec.filesystem("memory")
    for path in (logdir / "exploding").iterdir():
        with fs.open(f"/remote_logs/exploding/{path.name}", "wb") as f:
            f.write(path.read_bytes())
    try:
        code = main(["audit", "memory://remote_logs", "--json"])
    finally:
        fs.rm("/remote_logs", recursive=True)
    assert code == 1
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["run"] == "exploding" and run["episodes"][0]["start_step"] == 400


def test_tables_stay_readable_at_80_columns(logdir):
    """A pipe or a CI log is 80 columns wide: counts, kinds and headers are never cut or wrapped letter by letter."""
    out = cli("audit", str(logdir), columns=80).stdout
    lines = out.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    head = next(i for i, line in enumerate(lines) if "episodes" in line)
    summary = lines[head + 2:head + 2 + 3]
    assert any("1 explosion" in line for line in summary) and any("1 nonfinite" in line for line in summary)
    assert sum(line.strip() == "" for line in lines[:head]) <= 2  # no column of single letters above the header
    assert "kind" in out and "severity" in out and "offending layers" in out
