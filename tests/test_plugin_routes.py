"""The plugin's HTTP routes through TensorBoard's own WSGI router (werkzeug test client), over real event files.

Also hostile requests: path traversal, huge or non-numeric parameters, HTML/unicode names.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from tb_gradient_plugin import backend, detect, plugin
from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.run_report import report_json
from tb_gradient_plugin.runs import load_run
from tb_gradient_plugin.writer import EventFile, GradientWriter

LAYERS = [f"blocks.{i}.fc" for i in range(6)]
EVIL_LAYER = "<img src=x onerror=alert(1)>"
EVIL_RUN = "<b>bold</b> ünïcødé \"quoted\" run"
SPIKE_STEP, SPIKE_LAYER, SPIKE_FACTOR = 2000, 3, 1000.0
NAN_STEP = 1500
N_STEPS = 3000
PREFIX = "/data/plugin/gradients/"


def _strict_json(body: bytes):
    """Parse JSON refusing NaN/Infinity tokens (what a browser's JSON.parse would refuse)."""
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(body, parse_constant=refuse)


def _write_spiky(path: Path, n: int = N_STEPS, *, layers: list[str] = LAYERS, nan_step: int | None = None,
                 seed: int = 0) -> np.ndarray:
    """A run with lognormal noise, one 1000x grad-norm spike at SPIKE_STEP in one layer; returns the grad norms."""
    rng = np.random.default_rng(seed)
    grads = rng.lognormal(0.0, 0.1, size=(n, len(layers))).astype(np.float32)
    if n > SPIKE_STEP:
        grads[SPIKE_STEP, SPIKE_LAYER] *= SPIKE_FACTOR
    if nan_step is not None:
        grads[nan_step, 1] = np.nan
    with GradientWriter(path) as w:
        for s in range(n):
            loss = 1.0 + 0.01 * rng.random() + (30.0 if s == SPIKE_STEP + 3 else 0.0)
            total = float(np.linalg.norm(grads[s][np.isfinite(grads[s])]))
            w.write(s, layers, grad_norm=grads[s], param_norm=np.full(len(layers), 10.0),
                    update_norm=grads[s] * 1e-3, loss=loss, total_grad_norm=total)
            if s % 100 == 0:
                counts = np.zeros((len(layers), fmt.HIST_BINS), dtype=np.int64)
                counts[:, 20] = 100 + s
                w.write_histograms(s, layers, counts)
    return grads


def _write_plain_loss(path: Path, n: int = 50) -> None:
    """A run as a plain script writes it: only a ``train/loss`` scalar (no per-layer data)."""
    from tensorboard.compat.proto import summary_pb2

    path.mkdir(parents=True)
    f = EventFile(str(path))
    for s in range(n):
        f.add_event(fmt.make_event(s, time.time(), [summary_pb2.Summary.Value(tag="train/loss",
                                                                                simple_value=1.0 / (s + 1))]))
    f.close()


def _client(logdir: Path | None, **flags) -> tuple[Client, plugin.GradientsPlugin]:
    from argparse import Namespace

    ns = Namespace(logdir_spec=flags.pop("logdir_spec", ""), reload_interval=flags.pop("reload_interval", 5.0))
    context = base_plugin.TBContext(logdir=str(logdir) if logdir else None, flags=ns)
    instance = plugin.GradientsLoader().load(context)
    return Client(application.TensorBoardWSGI([instance])), instance


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logdir")
    _write_spiky(root / "spiky", nan_step=NAN_STEP)
    _write_spiky(root / EVIL_RUN, n=300, layers=LAYERS[:4] + [EVIL_LAYER], seed=1)
    _write_plain_loss(root / "plain")
    return root


@pytest.fixture(scope="module")
def client(logdir) -> Client:
    return _client(logdir)[0]


def _get(client: Client, route: str, **params):
    resp = client.get(PREFIX + route, query_string=params)
    return resp.status_code, _strict_json(resp.get_data()), resp


# --------------------------------------------------------------------------------------------------------- routes


def test_runs_lists_every_run_with_source_and_episodes(client, logdir):
    code, doc, _ = _get(client, "runs")
    assert code == 200
    runs = {r["run"]: r for r in doc["runs"]}
    assert set(runs) == {"spiky", EVIL_RUN, "plain"}
    assert runs["spiky"]["source"] == "tb_gradient_plugin" and runs["spiky"]["layers"] == len(LAYERS)
    assert runs["spiky"]["has_layers"] and runs["spiky"]["has_histograms"] and runs["spiky"]["episodes"] >= 1
    assert runs["spiky"]["steps"] == N_STEPS
    assert not runs["plain"]["has_layers"] and runs["plain"]["source"] != "tb_gradient_plugin"
    assert all(isinstance(r["version"], int) for r in doc["runs"])


def test_runs_count_episodes_by_kind_so_the_tab_needs_no_episode_lists(client, logdir):
    code, doc, _ = _get(client, "runs")
    assert code == 200
    runs = {r["run"]: r for r in doc["runs"]}
    for name, entry in runs.items():
        run = load_run(str(logdir / name), name)
        kinds: dict[str, int] = {}
        for episode in detect.detect(run).episodes:
            kinds[episode.kind] = kinds.get(episode.kind, 0) + 1
        assert entry["episode_kinds"] == kinds and sum(kinds.values()) == entry["episodes"]
        assert entry["first_wall_time"] == run.first_wall_time and run.first_wall_time > 1e9  # a real start time
    # The spiky run's non-finite step is an alarming episode the tab counts from this route alone.
    assert runs["spiky"]["episode_kinds"].get("nonfinite", 0) >= 1


def test_episodes_are_the_auditors_to_the_step(client, logdir):
    code, doc, _ = _get(client, "episodes", run="spiky")
    assert code == 200
    run = load_run(str(logdir / "spiky"), "spiky")
    expect = json.loads(json.dumps(report_json(detect.detect(run), run.warnings, run,
                                              batches_shown=plugin.EPISODE_BATCHES)))
    assert doc == expect
    assert all(e["batches"] == [] for e in doc["episodes"] if e["kind"] in ("explosion", "nonfinite"))
    peaks = {e["peak_step"] for e in doc["episodes"]}
    assert SPIKE_STEP in peaks and NAN_STEP in peaks
    spike_episode = next(e for e in doc["episodes"] if e["peak_step"] == SPIKE_STEP)
    assert spike_episode["layers"][0]["name"] == LAYERS[SPIKE_LAYER]


@pytest.mark.parametrize("bins", [1, 7, 100, 2000])
def test_heatmap_keeps_a_one_step_spike_at_every_zoom(client, logdir, bins):
    grads = load_run(str(logdir / "spiky")).layer_metrics["grad_norm"]
    spike = float(grads[SPIKE_STEP, SPIKE_LAYER])
    code, doc, _ = _get(client, "heatmap", run="spiky", metric="grad_norm", bins=bins)
    assert code == 200
    assert doc["layers"] == LAYERS and len(doc["bin_start"]) == min(bins, N_STEPS) == len(doc["bin_end"])
    values = np.array(doc["values"], dtype=float)
    assert values.shape == (len(LAYERS), len(doc["bin_start"]))
    b = next(i for i, (s, e) in enumerate(zip(doc["bin_start"], doc["bin_end"], strict=True)) if s <= SPIKE_STEP <= e)
    assert values[SPIKE_LAYER, b] == pytest.approx(spike, rel=1e-5)
    assert np.nanmax(values) == pytest.approx(spike, rel=1e-5)
    nf = np.array(doc["nonfinite"])
    nan_bin = next(i for i, (s, e) in enumerate(zip(doc["bin_start"], doc["bin_end"], strict=True))
                   if s <= NAN_STEP <= e)
    assert nf[1, nan_bin] == 1 and nf.sum() == 1
    assert doc["offending"][0] in (LAYERS[SPIKE_LAYER], LAYERS[1])
    assert {e["peak_step"] for e in doc["episodes"]} >= {SPIKE_STEP, NAN_STEP}
    assert doc["step_range"] == [0, N_STEPS - 1]


def test_heatmap_window_and_update_ratio(client):
    code, doc, _ = _get(client, "heatmap", run="spiky", metric="update_ratio", bins=50, start=1990, end=2010)
    assert code == 200
    assert doc["bin_start"] == list(range(1990, 2011)) == doc["bin_end"] and doc["full_resolution"]
    row = np.array(doc["values"][SPIKE_LAYER], dtype=float)
    assert np.argmax(row) == 10 and row[10] > 50 * np.median(row)
    code, doc, _ = _get(client, "heatmap", run="spiky", start=N_STEPS + 10, end=N_STEPS + 20)
    assert code == 200 and doc["bin_start"] == [] and doc["values"] == [[]] * len(LAYERS)


def test_layer_route_full_resolution_in_window_envelope_outside(client, logdir):
    grads = load_run(str(logdir / "spiky")).layer_metrics["grad_norm"][:, SPIKE_LAYER]
    code, doc, _ = _get(client, "layer", run="spiky", layer=LAYERS[SPIKE_LAYER], metric="grad_norm",
                        start=1900, end=2100)
    assert code == 200
    steps = np.array(doc["steps"])
    inside = (steps >= 1900) & (steps <= 2100)
    assert inside.sum() == 201 and not doc["full_resolution"]
    np.testing.assert_allclose(np.array(doc["values"], dtype=float)[inside], grads[1900:2101], rtol=1e-5)
    assert len(steps) <= 201 + plugin.LINE_OUTSIDE_BINS + 1
    at = int(np.flatnonzero(steps == SPIKE_STEP)[0])
    assert doc["min"][at] == doc["max"][at] == doc["values"][at]
    assert doc["values"][at] > doc["threshold"][at] > doc["baseline"][at] > 0
    quiet = int(np.flatnonzero(steps == 1950)[0])
    assert doc["values"][quiet] < doc["threshold"][quiet]
    code, whole, _ = _get(client, "layer", run="spiky", layer=LAYERS[SPIKE_LAYER])
    assert code == 200 and whole["full_resolution"] and len(whole["steps"]) == N_STEPS
    assert whole["metric"] == "grad_norm"


def test_loss_route_marks_the_loss_spike(client):
    code, doc, _ = _get(client, "loss", run="spiky")
    assert code == 200
    assert len(doc["steps"]) == N_STEPS and doc["full_resolution"]
    assert SPIKE_STEP + 3 in {s["step"] for s in doc["spikes"]}
    assert doc["total_grad_norm"] is not None and len(doc["total_grad_norm"]["steps"]) == N_STEPS
    assert doc["val_loss"] is None
    code, plain, _ = _get(client, "loss", run="plain")
    assert code == 200 and len(plain["steps"]) == 50 and plain["values"][0] == 1.0


def test_histograms_route(client):
    code, doc, _ = _get(client, "histograms", run="spiky", layer=LAYERS[0])
    assert code == 200
    assert doc["steps"] == list(range(0, N_STEPS, 100))
    assert len(doc["bins"]) == fmt.HIST_BINS == len(doc["counts"][0]) and len(doc["log10_edges"]) == fmt.HIST_BINS - 3
    assert doc["counts"][5][20] == 600 and sum(doc["counts"][5]) == 600
    assert _get(client, "histograms", run="plain", layer="x")[0] == 404


def test_metrics_route_serves_the_format_registry(client):
    code, doc, _ = _get(client, "metrics")
    assert code == 200
    served = doc["metrics"]
    assert [m["name"] for m in served] == [m.name for m in fmt.METRIC_REGISTRY]
    for m, registered in zip(served, fmt.METRIC_REGISTRY, strict=True):
        assert m == {"name": registered.name, "scope": registered.scope, "storage": registered.storage,
                     "label": registered.label, "unit": registered.unit,
                     "derived_from": list(registered.derived_from)}
    by_name = {m["name"]: m for m in served}
    # Every metric the heatmap and layer routes accept has its label there, the derived one with its sources.
    assert set(plugin.METRICS) <= {m["name"] for m in served if m["scope"] == "layer"}
    assert by_name["update_ratio"]["derived_from"] == ["update_norm", "param_norm"]
    assert by_name["grad_max_abs"]["label"] == "max |grad|"
    # Per-step series of the loss route are named there too.
    assert by_name["total_grad_norm"]["scope"] == "step" and by_name["loss"]["label"] == "loss"
    # Another request is answered the same (from the cache).
    assert _get(client, "metrics")[1] == doc


def test_html_and_unicode_names_round_trip_as_data(client):
    code, doc, resp = _get(client, "heatmap", run=EVIL_RUN, bins=10)
    assert code == 200 and doc["run"] == EVIL_RUN and doc["layers"][-1] == EVIL_LAYER
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert b"<img" not in resp.get_data() and b"<b>" not in resp.get_data()
    code, doc, _ = _get(client, "layer", run=EVIL_RUN, layer=EVIL_LAYER)
    assert code == 200 and doc["layer"] == EVIL_LAYER


HOSTILE = [
    ("heatmap", {"run": "../../etc/passwd"}, 404),
    ("heatmap", {"run": "/etc/passwd"}, 404),
    ("episodes", {"run": "spiky/../spiky"}, 404),
    ("episodes", {"run": "."}, 404),
    ("episodes", {}, 400),
    ("heatmap", {"run": "spiky", "bins": "abc"}, 400),
    ("heatmap", {"run": "spiky", "bins": "0"}, 400),
    ("heatmap", {"run": "spiky", "bins": "-5"}, 400),
    ("heatmap", {"run": "spiky", "bins": "1e3"}, 400),
    ("heatmap", {"run": "spiky", "start": "abc"}, 400),
    ("heatmap", {"run": "spiky", "end": "nan"}, 400),
    ("heatmap", {"run": "spiky", "start": "-inf"}, 400),
    ("heatmap", {"run": "spiky", "start": "20", "end": "10"}, 400),
    ("heatmap", {"run": "spiky", "metric": "../../etc/passwd"}, 400),
    ("heatmap", {"run": "spiky", "metric": "loss"}, 400),
    ("heatmap", {"run": "plain"}, 404),
    ("layer", {"run": "spiky", "layer": "../../etc/passwd"}, 404),
    ("layer", {"run": "spiky"}, 400),
    ("layer", {"run": "spiky", "layer": LAYERS[0], "metric": "<script>"}, 400),
    ("histograms", {"run": "spiky", "layer": "nope"}, 404),
    ("loss", {"run": "\x00\ud800".encode("utf-8", "surrogatepass").decode("latin-1")}, 404),
]


@pytest.mark.parametrize(("route", "params", "status"), HOSTILE)
def test_hostile_parameters_get_a_json_error(client, route, params, status):
    code, doc, resp = _get(client, route, **params)
    assert code == status, doc
    assert isinstance(doc["error"], str) and doc["error"]
    assert resp.headers["Content-Type"].startswith("application/json")


def test_huge_bins_are_clamped_and_decimal_steps_rounded_outwards(client):
    code, doc, _ = _get(client, "heatmap", run="spiky", bins=str(10**40))
    assert code == 200 and doc["bins"] == plugin.MAX_BINS and len(doc["bin_start"]) == plugin.MAX_BINS
    code, doc, _ = _get(client, "heatmap", run="spiky", bins=100, start="1999.5", end="2000.2")
    assert code == 200 and doc["bin_start"] == [1999, 2000, 2001]


def test_static_files_by_allow_list_only(tmp_path, monkeypatch, logdir):
    (tmp_path / "index.js").write_text("export function render() {}\n")
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / "c1.mjs").write_text("export const x = 1;\n")
    (tmp_path / "notes.txt").write_text("not served\n")
    monkeypatch.setattr(plugin, "STATIC_DIR", str(tmp_path))
    client = _client(logdir)[0]
    resp = client.get(PREFIX + "index.js")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/javascript")
    assert resp.get_data(as_text=True) == "export function render() {}\n"
    assert client.get(PREFIX + "chunks/c1.mjs").headers["Content-Type"].startswith("text/javascript")
    for bad in ["notes.txt", "../plugin.py", "..%2Fplugin.py", "chunks/../index.js", "%2e%2e/plugin.py",
                "/etc/passwd", "nope.js", "chunks"]:
        resp = client.get(PREFIX + bad)
        assert resp.status_code == 404, bad
        assert "error" in _strict_json(resp.get_data())


def test_shipped_static_files_are_served_with_their_types(client):
    files = plugin.static_files()
    for name, (_, mimetype) in files.items():
        resp = client.get(PREFIX + name)
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith(mimetype)
    metadata = plugin.GradientsPlugin(base_plugin.TBContext()).frontend_metadata()
    assert metadata.es_module_path == "/index.js" and metadata.tab_name == "Gradients"


# ---------------------------------------------------------------------------------------------- activity and live


def test_is_active_for_our_data_and_for_plain_loss_logs(logdir, tmp_path, realruns):
    assert _client(logdir)[1].is_active()
    plain = tmp_path / "plain_only"
    _write_plain_loss(plain / "run")
    assert _client(plain)[1].is_active()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not _client(empty)[1].is_active()
    assert not _client(None)[1].is_active()
    hf = realruns / "aarugunj27__EnzymeKcatAnaylsis"
    client, instance = _client(hf)
    assert instance.is_active()
    code, doc, _ = _get(client, "runs")
    assert [r["source"] for r in doc["runs"]] == ["hf_trainer"]
    code, loss, _ = _get(client, "loss", run=doc["runs"][0]["run"])
    assert code == 200 and len(loss["steps"]) == 10 and loss["total_grad_norm"] is not None


def test_new_steps_appear_without_restart(tmp_path):
    run = tmp_path / "live"
    writer = GradientWriter(run, flush_secs=0.1)
    try:
        for s in range(100):
            writer.write(s, LAYERS, grad_norm=np.ones(len(LAYERS)), loss=1.0)
        writer.flush()
        client = _client(tmp_path)[0]
        _, first, _ = _get(client, "runs")
        assert first["runs"][0]["steps"] == 100
        for s in range(100, 250):
            writer.write(s, LAYERS, grad_norm=np.ones(len(LAYERS)), loss=1.0)
        writer.flush()
        time.sleep(backend.REFRESH_SECONDS + 0.1)
        _, second, _ = _get(client, "runs")
        assert second["runs"][0]["steps"] == 250 and second["runs"][0]["version"] > first["runs"][0]["version"]
        _, heat, _ = _get(client, "heatmap", run="live", bins=2000)
        assert heat["bin_end"][-1] == 249
        # The detector catches up in the background; meanwhile the last report is served, never an error.
        _wait_for_episodes(client, second["runs"][0]["version"])
        assert _get(client, "episodes", run="live")[1]["steps"] == 250
    finally:
        writer.close()


def _wait_for_episodes(client, version: int, timeout: float = 30.0) -> None:
    """Until the first run's episodes are judged on data ``version`` (the detector runs in the background)."""
    deadline = time.monotonic() + timeout
    while _get(client, "runs")[1]["runs"][0]["episodes_version"] < version:
        assert time.monotonic() < deadline, "episodes never caught up with the data"
        time.sleep(0.2)


def test_a_run_restarted_into_the_same_file_name_is_shown_as_it_is_now(tmp_path):
    """A job restarted into the same directory rewrites its event file under the same name: the tab shows the new
    content only (nothing of the old one), and the run's warnings say that the file was read again."""
    _write_spiky(tmp_path / "scratch", n=2500, seed=3)
    _write_spiky(tmp_path / "job", n=300, seed=4)
    (live,) = (tmp_path / "job").iterdir()
    client = _client(tmp_path / "job")[0]
    _, before, _ = _get(client, "runs")
    assert [(r["run"], r["steps"]) for r in before["runs"]] == [(".", 300)]
    (restarted,) = (tmp_path / "scratch").iterdir()
    live.write_bytes(restarted.read_bytes())
    time.sleep(backend.REFRESH_SECONDS + 0.1)
    _, after, _ = _get(client, "runs")
    assert after["runs"][0]["steps"] == 2500 and after["runs"][0]["version"] > before["runs"][0]["version"]
    _, heat, _ = _get(client, "heatmap", run=".", bins=2000)
    assert heat["bin_end"][-1] == 2499
    _wait_for_episodes(client, after["runs"][0]["version"])
    _, rep, _ = _get(client, "episodes", run=".")
    assert any(live.name in w and "read again from the start" in w for w in rep["warnings"]), rep["warnings"]
    run = load_run(str(tmp_path / "job"), ".")
    expect = report_json(detect.detect(run), (), run, batches_shown=plugin.EPISODE_BATCHES)
    assert rep == json.loads(json.dumps(expect)) | {"warnings": rep["warnings"]}


def test_logdir_spec_names_runs_like_tensorboard(tmp_path):
    _write_spiky(tmp_path / "a" / "r1", n=50)
    _write_spiky(tmp_path / "b", n=60)
    spec = f"first:{tmp_path / 'a'},second:{tmp_path / 'b'}"
    assert backend.parse_logdir_spec(spec) == {"first": str(tmp_path / "a"), "second": str(tmp_path / "b")}
    # Unnamed groups: the first keeps TensorBoard's plain run names, a second one is named by its path.
    assert backend.parse_logdir_spec("gs://bucket/x,s3://b/y") == {"": "gs://bucket/x", "s3://b/y": "s3://b/y"}
    client = _client(None, logdir_spec=spec)[0]
    _, doc, _ = _get(client, "runs")
    assert {r["run"]: r["steps"] for r in doc["runs"]} == {"first/r1": 50, "second": 60}


def test_a_corrupt_file_does_not_break_the_routes(tmp_path):
    _write_spiky(tmp_path / "ok", n=300)
    shutil.copytree(tmp_path / "ok", tmp_path / "broken")
    event_file = next((tmp_path / "broken").iterdir())
    data = bytearray(event_file.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    event_file.write_bytes(bytes(data))
    client = _client(tmp_path)[0]
    code, doc, _ = _get(client, "runs")
    assert code == 200 and {r["run"] for r in doc["runs"]} == {"ok", "broken"}
    for run in ("ok", "broken"):
        assert _get(client, "heatmap", run=run, bins=100)[0] == 200
        assert _get(client, "episodes", run=run)[0] == 200


def test_entry_point_module_imports_nothing_heavy():
    code = ("import sys, tb_gradient_plugin.plugin as p; "
            "heavy = [m for m in ('torch', 'tensorflow', 'keras', 'tb_gradient_plugin.runs', "
            "'tb_gradient_plugin.detect') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_run_the_detector_fails_on_is_listed_with_the_reason(tmp_path, monkeypatch):
    """One run that breaks the detector must not turn the run list into an error for every run."""
    from tb_gradient_plugin import detect as detect_module

    _write_spiky(tmp_path / "good", n=300)
    _write_spiky(tmp_path / "cursed", n=300)
    real = detect_module.detect

    def flaky(data, config=None):
        if data.name == "cursed":
            raise RuntimeError("boom")
        return real(data, config)

    monkeypatch.setattr(detect_module, "detect", flaky)
    c, _ = _client(tmp_path)
    code, doc, _ = _get(c, "runs")
    assert code == 200 and {r["run"] for r in doc["runs"]} == {"good", "cursed"}
    code, rep, _ = _get(c, "episodes", run="cursed")
    assert code == 200 and rep["episodes"] == [] and any("detection failed: RuntimeError: boom" in w
                                                        for w in rep["warnings"])
    code, rep, _ = _get(c, "episodes", run="good")
    assert code == 200 and rep["steps"] == 300 and not any("detection failed" in w for w in rep["warnings"])
