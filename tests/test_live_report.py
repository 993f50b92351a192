"""A live run's report made incrementally: fed in appended chunks, the online detector's report equals a full
detection after every chunk, and data that did not only append is refused (then judged offline)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import detection_suite as suite
from tb_gradient_plugin import backend as backend_module
from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.backend import Backend
from tb_gradient_plugin.detect import detect
from tb_gradient_plugin.live_report import LiveDetector
from tb_gradient_plugin.runs import find_runs, load_run
from tb_gradient_plugin.types import RunData, Series
from tb_gradient_plugin.writer import GradientWriter

DEMO_LOGS = Path(__file__).resolve().parents[1] / "demo_logs"


def _prefix(run: RunData, last: int, *, copy: bool = False) -> RunData:
    """The run as a live read sees it once training has logged up to step ``last``: views of the same arrays (as the
    run store appends in place), or fresh copies (as after the store moved its buffers)."""
    take = np.array if copy else np.asarray
    n = int(np.searchsorted(run.steps, last, side="right"))
    h = int(np.searchsorted(run.hist_steps, last, side="right"))
    series = {}
    for name, s in run.series.items():
        k = int(np.searchsorted(s.steps, last, side="right"))
        series[name] = Series(take(s.steps[:k]), take(s.values[:k]))
    logged = np.nonzero(run.present[:n].any(axis=0))[0]  # the store lists a layer once it was logged
    c = int(logged[-1]) + 1 if logged.size else 0
    return RunData(name=run.name, source=run.source, layers=list(run.layers[:c]), steps=take(run.steps[:n]),
                   layer_metrics={m: take(a[:n, :c]) for m, a in run.layer_metrics.items()},
                   present=take(run.present[:n, :c]), series=series, hist_steps=take(run.hist_steps[:h]),
                   histograms=None if run.histograms is None or not h else take(run.histograms[:h, :c]))


def _last_steps(run: RunData) -> np.ndarray:
    parts = [np.asarray(run.steps)] + [np.asarray(s.steps) for s in run.series.values()]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _fed_in_chunks(run: RunData, chunks: int = 5, *, copy: bool = False) -> int:
    """Feed ``run`` in ``chunks`` appended pieces; every report must equal a full detection on the data so far.
    Returns how many pieces were judged incrementally (0: the run was refused at once, as not judgeable online)."""
    axis = _last_steps(run)
    if not axis.size:
        return 0
    cuts = sorted({int(axis[min(axis.size - 1, int(f * axis.size))]) for f in np.linspace(0.3, 1.0, chunks)})
    cuts[-1] = int(axis[-1])
    live = LiveDetector(run.name, run.source)
    judged = 0
    for k, cut in enumerate(cuts):
        data = _prefix(run, cut, copy=copy)
        got = live.advance(data)
        if live.broken:  # what the online detector cannot see as the offline one does, found before it fed it
            assert k == 0 and not judged, f"{run.name}: refused after {k} pieces of data that only appended"
            return 0
        if got is not None:  # None: this piece is judged offline (a validation point after the last step)
            assert got.to_json() == detect(data).to_json(), f"{run.name}: differs after piece {k} (up to {cut})"
            judged += 1
    return judged


def _synthetic(n: int = 1500, layers: int = 10, seed: int = 0) -> RunData:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    g = (np.exp(-t / 300.0)[:, None] * 3 + 1) * np.exp(rng.normal(0, 0.2, (n, layers))) * np.linspace(1, 2, layers)
    g = g.astype(np.float32)
    names = [f"layer{j}" for j in range(layers)]
    loss = 2 * np.exp(-t / 700) * np.exp(rng.normal(0, 0.03, n)) + 0.3
    run = RunData(name="synthetic", source="tb_gradient_plugin", layers=names, steps=t.astype(np.int64),
                  layer_metrics={"grad_norm": g, "nonfinite_count": np.zeros_like(g),
                                 "param_norm": np.full_like(g, 10.0), "update_norm": g * np.float32(1e-3)},
                  present=np.ones((n, layers), dtype=bool),
                  series={"loss": Series(t.astype(np.int64), loss),
                          "total_grad_norm": Series(t.astype(np.int64), np.sqrt((g.astype(np.float64) ** 2).sum(1))),
                          "lr": Series(t.astype(np.int64), np.full(n, 1e-3))})
    return run


def _with_findings(run: RunData) -> RunData:
    """Explosions (one the loss reacts to), a NaN, AMP overflow skips, a validation series that worsens, histograms
    at their own cadence, and a layer that appears late."""
    n = len(run.steps)
    g, upd = run.layer_metrics["grad_norm"], run.layer_metrics["update_norm"]
    g[400, 3] *= 40
    upd[400, 3] *= 80
    g[700:712, 5] *= 40
    g[900, 2] = np.nan
    run.layer_metrics["nonfinite_count"][900, 2] = 3
    run.series["loss"].values[1004] *= 20
    g[1000, 7] *= 400
    t = run.steps
    scale = np.full(n, 65536.0)
    skipped = np.zeros(n)
    skipped[[300, 301, 1200]] = 1
    scale[300:] /= 2
    scale[1200:] /= 2
    run.series["loss_scale"] = Series(t.copy(), scale)
    run.series["step_skipped"] = Series(t.copy(), skipped)
    val_steps = t[99::100].copy()
    val = 1.0 - 0.3 * np.exp(-val_steps / 300.0)
    val[val_steps > 1000] += 0.5
    run.series["val_loss"] = Series(val_steps, val)
    run.present[:600, -1] = False  # the last layer is logged from step 600 on
    for m in run.layer_metrics.values():
        m[:600, -1] = np.nan
    rng = np.random.default_rng(3)
    run.hist_steps = t[::250].copy()
    run.histograms = rng.integers(0, 50, (len(run.hist_steps), len(run.layers), fmt.HIST_BINS)).astype(np.int64)
    run.histograms[:3, -1] = 0
    return run


@pytest.mark.parametrize("copy", [False, True])
def test_synthetic_run_with_every_kind_of_finding_fed_in_chunks_equals_a_full_detection(copy):
    run = _with_findings(_synthetic())
    assert {e.kind for e in detect(run).episodes} >= {"explosion", "nonfinite", "val_degradation"}
    assert _fed_in_chunks(run, 7, copy=copy) == 7


def test_chunks_of_one_step_each_and_a_step_completed_in_a_later_read():
    """The newest step is judged but never committed: its scalars may arrive in the next read."""
    run = _with_findings(_synthetic())
    live = LiveDetector(run.name, run.source)
    for last in range(380, 420):
        data = _prefix(run, last)
        half = _prefix(run, last)  # the newest step's loss not read yet
        half.series["loss"] = Series(half.series["loss"].steps[:-1], half.series["loss"].values[:-1])
        for d in (half, data):
            assert live.advance(d).to_json() == detect(d).to_json()


def test_data_that_did_not_only_append_is_refused():
    run = _with_findings(_synthetic())
    changes = {
        "a row rewritten": lambda d: d.layer_metrics["grad_norm"].__setitem__((100, 1), 5.0),
        "a loss value rewritten": lambda d: d.series["loss"].values.__setitem__(10, 9.0),
        "layers reordered": lambda d: d.layers.reverse(),
        "a step inserted": lambda d: setattr(d, "steps", np.r_[d.steps[:50], d.steps[50:] + 1]),
        "a histogram rewritten": lambda d: d.histograms.__setitem__((0, 0, 0), 99),
        "another source": lambda d: setattr(d, "source", "keras"),
    }
    for why, change in changes.items():
        live = LiveDetector(run.name, run.source)
        assert live.advance(_prefix(run, 800)) is not None
        data = _prefix(run, 1200, copy=True)
        change(data)
        assert live.advance(data) is None, why


def test_a_validation_point_off_the_step_axis_is_refused_not_misjudged():
    run = _synthetic(n=600)
    run.steps = run.steps * 10  # logged every 10th step; validation in between
    for s in run.series.values():
        s.steps = s.steps * 10
    run.series["val_loss"] = Series(np.array([1505, 3505, 5505]), np.array([1.0, 0.9, 1.5]))
    live = LiveDetector(run.name, run.source)
    assert live.advance(run) is None and live.broken
    ahead = _prefix(run, 1500)  # a validation point after the last step logged so far: judged offline, for now
    ahead.series["val_loss"] = Series(np.array([1505]), np.array([1.0]))
    live = LiveDetector(run.name, run.source)
    assert live.advance(ahead) is None and not live.broken


def test_demo_logs_fed_in_chunks_equal_a_full_detection():
    judged = 0
    for name, path in find_runs(str(DEMO_LOGS)):
        judged += _fed_in_chunks(load_run(path, name)) > 0
    assert judged >= 8


def test_real_third_party_runs_fed_in_chunks_equal_a_full_detection(realruns):
    judged = [_fed_in_chunks(case.run) for case in suite.thirdparty_cases(str(realruns))]
    assert sum(j > 0 for j in judged) >= len(judged) // 2


# ------------------------------------------------------------------------------------------- through the plugin


def _log(w: GradientWriter, steps: range, spike: int | None = None, scale: float = 1.0) -> None:
    names = [f"block{i}.{p}" for i in range(4) for p in ("attn", "mlp")]
    rng = np.random.default_rng(steps.start)
    for s in steps:
        g = np.exp(rng.normal(0, 0.1, len(names))).astype(np.float32) * scale
        if s == spike:
            g[3] *= 500
        w.write(s, names, grad_norm=g, param_norm=np.full(len(names), 10.0), update_norm=g * 1e-3,
                loss=1.0 + 0.01 * (s % 5) + (30.0 if spike is not None and s == spike + 2 else 0.0),
                total_grad_norm=float(np.sqrt((g.astype(np.float64) ** 2).sum())), lr=1e-3)
    w.flush()


def _write(logdir: Path, steps: range, scale: float = 1.0) -> None:
    with GradientWriter(logdir) as w:
        _log(w, steps, scale=scale)


def _served_after_refresh(b: Backend, run: str) -> tuple[dict, dict]:
    """Refresh, then wait for the background detection of the new version; (served report, full detection)."""
    b.refresh()
    data, version = b.run(run)
    deadline = time.monotonic() + 60
    while True:
        report, at = b.report(run, data, version)
        if at >= version:
            return report.to_json(), detect(data).to_json()
        assert time.monotonic() < deadline, "the report of the new version never came"
        time.sleep(0.02)


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("cache", ["off", "dir"])
def test_a_live_run_written_in_chunks_is_judged_incrementally_and_a_replaced_file_offline(tmp_path, monkeypatch,
                                                                                          cache):
    monkeypatch.setattr(backend_module, "REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(backend_module, "LIVE_DETECT_SECONDS", 0.0)
    logdir = tmp_path / "logs"
    run_dir = logdir / "live"
    writer = GradientWriter(run_dir, flush_secs=3600)  # training: one file, flushed after each chunk
    _log(writer, range(0, 300))
    b = Backend(str(logdir), cache_dir="off" if cache == "off" else str(tmp_path / "cache"))
    b.refresh()
    data, version = b.run("live")
    b.report("live", data, version)  # the first report, computed while the request waits

    _log(writer, range(300, 400))  # live: the next report is made offline, and an online detector catches up
    served, full = _served_after_refresh(b, "live")
    assert served == full
    _wait(lambda: b.live_stats["catch_up"] == 1, "no online detector caught up")

    for start in range(400, 1000, 150):
        _log(writer, range(start, start + 150), spike=start + 60 if start == 700 else None)
        before = dict(b.live_stats)
        served, full = _served_after_refresh(b, "live")
        assert served == full
        assert b.live_stats["incremental"] == before["incremental"] + 1
        assert b.live_stats["offline"] == before["offline"]
    assert any(e["start_step"] == 760 for e in served["episodes"])

    writer.close()

    # A file replaced under its name with other values: the run is read again; its report is made offline.
    (first,) = (p for p in run_dir.iterdir() if p.name.startswith("events"))
    other = tmp_path / "other"
    _write(other, range(0, 300), scale=3.0)
    (replacement,) = other.iterdir()
    os.replace(replacement, first)
    before = dict(b.live_stats)
    served, full = _served_after_refresh(b, "live")
    assert served == full
    assert b.live_stats["fallback"] == before["fallback"] + 1
    assert b.live_stats["offline"] == before["offline"] + 1


def test_a_fork_of_the_online_detector_is_independent_of_it():
    run = _with_findings(_synthetic())
    live = LiveDetector(run.name, run.source)
    live.advance(_prefix(run, 1100))
    before = live.detector.report().to_json()
    twin = live.detector.fork()
    LiveDetector._feed(live, twin, _prefix(run, 1300), np.arange(1100, 1301))
    assert live.detector.report().to_json() == before == detect(_prefix(run, 1099)).to_json()
    assert twin.report().to_json() == detect(_prefix(run, 1300)).to_json()
