"""The persistent run cache (docs/CACHE.md): the same answers with a cold cache, a warm cache and no cache; an entry
that no longer matches its event files, or that is damaged, is never served; a second start reads no event file; and
memory stays within the budget whatever the size of the logdir (measured as memory, in a fresh process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from tb_gradient_plugin import cache, plugin, reader
from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.writer import GradientWriter

LAYERS = [f"blocks.{i}.fc" for i in range(5)]
SPIKE_STEP, SPIKE_LAYER = 700, 2
PREFIX = "/data/plugin/gradients/"
REPO = Path(__file__).resolve().parents[1]


def _steps(writer: GradientWriter, steps: range, rng: np.random.Generator) -> None:
    for s in steps:
        grads = rng.lognormal(0.0, 0.1, size=len(LAYERS)).astype(np.float32)
        if s == SPIKE_STEP:
            grads[SPIKE_LAYER] *= 1000.0
        loss = 1.0 + 0.01 * rng.random() + (30.0 if s == SPIKE_STEP + 2 else 0.0)
        writer.write(s, LAYERS, grad_norm=grads, param_norm=np.full(len(LAYERS), 10.0), update_norm=grads * 1e-3,
                     loss=loss, total_grad_norm=float(np.linalg.norm(grads)), batch_ids=np.arange(4) + 4 * s)
        if s % 100 == 0:
            counts = np.zeros((len(LAYERS), fmt.HIST_BINS), dtype=np.int64)
            counts[:, 20] = 100 + s
            writer.write_histograms(s, LAYERS, counts)


def _write(path: Path, n: int = 1200, seed: int = 0) -> None:
    with GradientWriter(path) as writer:
        _steps(writer, range(n), np.random.default_rng(seed))


def _event_file(run_dir: Path) -> Path:
    return next(p for p in run_dir.iterdir() if "tfevents" in p.name)


def _plugin(logdir: Path, cache_dir: str) -> plugin.GradientsPlugin:
    flags = Namespace(logdir_spec="", reload_interval=5.0, gradients_cache_dir=cache_dir, gradients_memory_mb=None)
    return plugin.GradientsLoader().load(base_plugin.TBContext(logdir=str(logdir), flags=flags))


QUERIES = [
    ("runs", {}),
    ("episodes", {"run": "a"}),
    ("heatmap", {"run": "a"}),
    ("heatmap", {"run": "a", "bins": 6}),  # bins of whole pyramid blocks
    ("heatmap", {"run": "a", "metric": "update_ratio", "bins": 4}),
    ("heatmap", {"run": "a", "start": 150, "end": 1100, "bins": 3}),
    ("layer", {"run": "a", "layer": LAYERS[SPIKE_LAYER]}),
    ("loss", {"run": "a"}),
    ("histograms", {"run": "a", "layer": LAYERS[0]}),
    ("episodes", {"run": "b"}),
]


def _answers(instance: plugin.GradientsPlugin) -> dict:
    client = Client(application.TensorBoardWSGI([instance]))
    out = {}
    for route, params in QUERIES:
        resp = client.get(PREFIX + route, query_string=params)
        assert resp.status_code == 200, (route, params, resp.get_data()[:300])
        doc = json.loads(resp.get_data())
        # data versions count the reads of one process: not part of the answer
        if route == "runs":
            for run in doc["runs"]:
                run.pop("version")
                run.pop("episodes_version")
        doc.pop("episodes_version", None)
        out[(route, json.dumps(params))] = doc
    instance._backend.wait_idle()  # requests are answered before the first read's cache writes have finished
    return out


class _ReadCounter:
    """Bytes of event files read in this process (what a cached start must not do)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        original = reader.RecordReader.read_chunks

        def counting(this, max_bytes=None):
            for chunk in original(this, max_bytes):
                self.bytes += len(chunk.buf)
                yield chunk

        monkeypatch.setattr(reader.RecordReader, "read_chunks", counting)


@pytest.fixture()
def logdir(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    _write(root / "a")
    _write(root / "b", n=300, seed=1)
    return root


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p.parent for p in cache_dir.rglob("manifest.json"))


def test_cold_warm_and_no_cache_give_the_same_answers(logdir, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    cold = _answers(_plugin(logdir, str(cache_dir)))
    assert len(_entries(cache_dir)) == 2
    assert not any(cache_dir in p.parents for p in logdir.rglob("*")) and not list(logdir.rglob("*.bin"))
    counter = _ReadCounter(monkeypatch)
    warm_plugin = _plugin(logdir, str(cache_dir))
    warm = _answers(warm_plugin)
    assert counter.bytes == 0, "a second start must not read the event files"
    none = _answers(_plugin(logdir, "off"))
    assert cold == none
    assert warm == none
    runs = {r["run"]: r for r in none[("runs", "{}")]["runs"]}
    assert runs["a"]["episodes"] >= 1 and runs["a"]["last_wall_time"] >= runs["a"]["first_wall_time"]
    episodes = next(doc for (route, _), doc in none.items() if route == "episodes")
    assert any(b["ids"] for e in episodes["episodes"] for b in e.get("batches", []))  # batch ids survive the cache
    heat = none[("heatmap", json.dumps({"run": "a", "bins": 6}))]
    assert heat["offending"][0] == LAYERS[SPIKE_LAYER]
    column = np.array(heat["values"][SPIKE_LAYER], dtype=float)
    assert np.nanmax(column) > 100  # the one-step spike survives a bin of ~200 steps


def _cold_then(logdir: Path, cache_dir: Path) -> None:
    backend_ = _plugin(logdir, str(cache_dir))._backend
    backend_.wait_loaded(60)
    for name, data, version in backend_.runs():
        backend_.report(name, data, version)
    backend_.wait_idle()


def _same_as_without_cache(logdir: Path, cache_dir: Path) -> None:
    assert _answers(_plugin(logdir, str(cache_dir))) == _answers(_plugin(logdir, "off"))


def test_a_grown_file_is_read_on_from_where_the_cache_stopped(tmp_path, monkeypatch):
    logdir, cache_dir = tmp_path / "logs", tmp_path / "cache"
    rng = np.random.default_rng(0)
    writer = GradientWriter(logdir / "a")
    _steps(writer, range(600), rng)
    writer.flush()
    _write(logdir / "b", n=300, seed=1)
    _cold_then(logdir, cache_dir)
    size_before = _event_file(logdir / "a").stat().st_size
    _steps(writer, range(600, 1200), rng)
    writer.close()
    grown = _event_file(logdir / "a").stat().st_size - size_before
    counter = _ReadCounter(monkeypatch)
    warm = _answers(_plugin(logdir, str(cache_dir)))
    assert 0 < counter.bytes <= grown + 64 * 1024, "only the appended bytes are read"
    monkeypatch.undo()
    assert warm == _answers(_plugin(logdir, "off"))
    episodes = warm[("episodes", json.dumps({"run": "a"}))]["episodes"]
    assert any(e["start_step"] <= SPIKE_STEP <= e["end_step"] for e in episodes)  # found in the appended part


def _settled(instance: plugin.GradientsPlugin) -> dict:
    """The answers once the reports of grown runs, recomputed in the background, describe the data served."""
    backend_ = instance._backend
    for _ in range(400):
        _answers(instance)  # asks for the reports, which starts their recomputation
        if all(backend_._reports.get(name, (-1, None))[0] >= version for name, _, version in backend_.runs()):
            return _answers(instance)
        time.sleep(0.05)
    raise AssertionError("reports were not recomputed")


def test_a_live_run_stays_in_memory_while_it_grows_and_is_cached_once_idle(tmp_path, monkeypatch):
    logdir, cache_dir = tmp_path / "logs", tmp_path / "cache"
    rng = np.random.default_rng(0)
    writer = GradientWriter(logdir / "a")
    _steps(writer, range(400), rng)
    writer.flush()
    _write(logdir / "b", n=300, seed=1)
    instance = _plugin(logdir, str(cache_dir))
    _answers(instance)
    store = instance._backend._store
    assert store._runs["a"].spilled  # read once: written to the cache, out of memory
    _steps(writer, range(400, 1200), rng)
    writer.close()
    store.refresh()
    assert not store._runs["a"].spilled and store._runs["a"].dirty  # growing: served from memory
    growing = _settled(instance)
    assert growing == _answers(_plugin(logdir, "off"))
    store.refresh()  # nothing new: idle, so written to the cache (with its report) and dropped from memory
    assert store._runs["a"].spilled and not store._runs["a"].dirty
    assert _answers(instance) == growing
    from tb_gradient_plugin import backend as backend_module

    judged = []
    original_judge = backend_module._judge
    monkeypatch.setattr(backend_module, "_judge", lambda data: judged.append(data.name) or original_judge(data))
    counter = _ReadCounter(monkeypatch)
    assert _answers(_plugin(logdir, str(cache_dir))) == growing
    assert counter.bytes == 0 and judged == []


def test_a_replaced_file_is_read_again(logdir, tmp_path):
    cache_dir = tmp_path / "cache"
    _cold_then(logdir, cache_dir)
    shutil.rmtree(logdir / "a")
    _write(logdir / "a", n=900, seed=7)  # other content, same run name
    _same_as_without_cache(logdir, cache_dir)


def test_a_truncated_file_is_read_again(logdir, tmp_path):
    cache_dir = tmp_path / "cache"
    _cold_then(logdir, cache_dir)
    path = _event_file(logdir / "a")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    _same_as_without_cache(logdir, cache_dir)
    doc = _answers(_plugin(logdir, str(cache_dir)))[("heatmap", json.dumps({"run": "a"}))]
    assert doc["step_range"][1] < 1100


@pytest.mark.parametrize("target", ["arrays.bin", "state.pkl", "manifest.json", "report.pkl"])
def test_a_corrupted_cache_file_is_rebuilt_never_served(logdir, tmp_path, target):
    cache_dir = tmp_path / "cache"
    _cold_then(logdir, cache_dir)
    for entry in _entries(cache_dir):
        path = entry / target
        body = bytearray(path.read_bytes())
        middle = len(body) // 2
        body[middle:middle + 8] = bytes(b ^ 0x5A for b in body[middle:middle + 8])
        path.write_bytes(bytes(body))
    _same_as_without_cache(logdir, cache_dir)
    # rebuilt: the entries pass their checks again, and a further start serves them without reading event files
    for entry in _entries(cache_dir):
        manifest, _, _, _ = cache.Entry(entry).load()
        index, inode = cache.Entry(entry).snapshot()
        cache.Entry(entry).mapped(list(index), index, inode)
        assert manifest["format"] == cache.CACHE_FORMAT_VERSION


def test_a_truncated_arrays_file_is_rebuilt(logdir, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    _cold_then(logdir, cache_dir)
    for entry in _entries(cache_dir):
        with open(entry / "arrays.bin", "r+b") as handle:
            handle.truncate(100)
    counter = _ReadCounter(monkeypatch)
    answers = _answers(_plugin(logdir, str(cache_dir)))
    assert counter.bytes > 0  # read again from the event files
    monkeypatch.undo()
    assert answers == _answers(_plugin(logdir, "off"))


def test_another_reader_version_reads_again_another_detector_version_judges_again(logdir, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    _cold_then(logdir, cache_dir)
    from tb_gradient_plugin import backend as backend_module

    judged = []
    original_judge = backend_module._judge
    monkeypatch.setattr(backend_module, "_judge", lambda data: judged.append(data.name) or original_judge(data))
    monkeypatch.setitem(cache._versions, "detector", "another-detector")
    counter = _ReadCounter(monkeypatch)
    warm = _answers(_plugin(logdir, str(cache_dir)))
    assert counter.bytes == 0 and sorted(set(judged)) == ["a", "b"]  # arrays reused, reports computed again
    assert warm == _answers(_plugin(logdir, "off"))

    monkeypatch.setitem(cache._versions, "reader", "another-reader")
    counter.bytes = 0
    _answers(_plugin(logdir, str(cache_dir)))
    assert counter.bytes > 0


def test_an_unwritable_cache_directory_means_no_cache_and_one_warning(logdir, tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with caplog.at_level("WARNING"):
        answers = _answers(_plugin(logdir, str(blocker / "cache")))
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and str(blocker) in warnings[0].getMessage()
    assert answers == _answers(_plugin(logdir, "off"))


def test_default_cache_directory_is_the_users_not_the_logdir(monkeypatch):
    monkeypatch.delenv(cache.ENV_CACHE_DIR, raising=False)
    import platformdirs

    assert cache.default_cache_dir() == platformdirs.user_cache_dir("tb_gradient_plugin", appauthor=False)


# ------------------------------------------------------------------------------------------------------- memory

MEASURE = textwrap.dedent("""
    import ctypes, gc, json, sys
    from argparse import Namespace
    from tensorboard.plugins import base_plugin
    from tb_gradient_plugin import plugin

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    logdir, cache_dir, budget_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
    flags = Namespace(logdir_spec="", reload_interval=5.0, gradients_cache_dir=cache_dir,
                      gradients_memory_mb=budget_mb)
    instance = plugin.GradientsLoader().load(base_plugin.TBContext(logdir=logdir, flags=flags))
    backend = instance._backend
    backend.wait_loaded(600)
    backend.wait_idle()
    runs = backend.runs()
    for name, data, version in runs:
        backend.report(name, data, version)
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss()
    for name, _, _ in runs:  # open every run: heatmap of every metric, at full resolution
        data, version = backend.run(name)
        report = backend.report(name, data, version)
        for metric in sorted(data.layer_metrics):
            instance._build_heatmap(name, data, report, metric, 4000, None, None)
        del data
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    store = backend._store
    mapped = store.cache.budget.mapped_bytes if store.cache is not None else None
    print(json.dumps({"listed": before, "opened": rss(), "mapped": mapped}))
""")


def _write_big(root: Path, runs: int, steps: int, layers: int) -> int:
    names = [f"model.layers.{j}" for j in range(layers)]
    rng = np.random.default_rng(0)
    grads = rng.lognormal(0.0, 0.1, size=(steps, layers)).astype(np.float32)
    for r in range(runs):
        with GradientWriter(root / f"run{r:02d}") as writer:
            for s in range(steps):
                writer.write(s, names, grad_norm=grads[s], param_norm=grads[s], update_norm=grads[s], loss=1.0)
    return steps * layers * (3 * 4 + 1)  # bytes of one run's arrays: three float32 metrics and the present mask


def _measure(logdir: Path, cache_dir: str, budget_mb: float) -> dict:
    # One malloc arena: the reading, cache-writing and detection threads would otherwise each keep an arena of freed
    # heap (about 10 MB, kept or given back depending on which thread freed what), noise as large as a run here.
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(logdir), cache_dir, str(budget_mb)], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_stays_within_the_budget_on_a_logdir_four_times_larger(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    run_bytes = _write_big(small, 3, 4000, 200)
    for r in range(3):
        shutil.copytree(small / f"run{r:02d}", large / f"run{r:02d}")
    for r in range(3, 12):
        shutil.copytree(small / f"run{r % 3:02d}", large / f"run{r:02d}")
    budget_mb = 2.5 * run_bytes / 2**20  # room for two runs' arrays
    budget = budget_mb * 2**20
    cached_small = _measure(small, str(tmp_path / "cache"), budget_mb)
    cached_large = _measure(large, str(tmp_path / "cache"), budget_mb)
    uncached_large = _measure(large, "off", budget_mb)
    # Without the cache every run's arrays stay in memory: the measure sees them (the control).
    assert uncached_large["opened"] - cached_small["opened"] > 6 * run_bytes
    # With it, mapped arrays stay within the budget, and 4x the runs add far less than one run's arrays each.
    assert cached_large["mapped"] <= budget
    assert cached_large["opened"] - cached_large["listed"] <= budget + 8 * 2**20
    assert cached_large["opened"] - cached_small["opened"] <= run_bytes


def test_the_auditor_reads_through_the_cache_when_given_one(tmp_path, monkeypatch):
    """``load_run(cache=...)`` (the auditor's ``--cache-dir``): a second read of an unchanged run reads no event
    byte, a grown one only what was appended, and the audit says the same as without the cache every time."""
    from tb_gradient_plugin.auditor import audit_run

    logdir, cache_dir = tmp_path / "logs", str(tmp_path / "cache")
    rng = np.random.default_rng(0)
    writer = GradientWriter(logdir / "a")
    _steps(writer, range(600), rng)
    writer.flush()
    run = str(logdir / "a")
    plain = audit_run("a", run, cache_dir="off")
    assert audit_run("a", run, cache_dir=cache_dir) == plain
    assert len(_entries(Path(cache_dir))) == 1
    counter = _ReadCounter(monkeypatch)
    assert audit_run("a", run, cache_dir=cache_dir) == plain
    assert counter.bytes == 0
    size_before = _event_file(logdir / "a").stat().st_size
    _steps(writer, range(600, 1200), rng)
    writer.close()
    grown = _event_file(logdir / "a").stat().st_size - size_before
    got = audit_run("a", run, cache_dir=cache_dir)
    assert 0 < counter.bytes <= grown + 64 * 1024
    monkeypatch.undo()
    assert got == audit_run("a", run, cache_dir="off")
    assert any(e["start_step"] <= SPIKE_STEP <= e["end_step"] for e in got["report"]["episodes"])


def test_a_live_runs_pyramid_grows_with_the_appended_steps_only(tmp_path, monkeypatch):
    """While a run grows, its published data carries max pyramids equal to ones built on all its rows, and a refresh
    pools only the steps appended since the last one (plus the last partial block), not the whole run again."""
    from tb_gradient_plugin import pyramid
    from tb_gradient_plugin.runs import RunStore

    logdir = tmp_path / "logs"
    rng = np.random.default_rng(0)
    writer = GradientWriter(logdir / "a")
    _steps(writer, range(400), rng)
    writer.flush()
    store = RunStore(str(logdir), cache=cache.RunCache.open(str(tmp_path / "cache")))
    store.refresh()
    pooled_rows: list[int] = []
    original = pyramid._base_level

    def counting(values, present, divide_by, base):
        pooled_rows.append(values.shape[0])
        return original(values, present, divide_by, base)

    monkeypatch.setattr(pyramid, "_base_level", counting)
    incremental = 0
    for start in range(400, 1200, 100):
        _steps(writer, range(start, start + 100), rng)
        writer.flush()
        pooled_rows.clear()
        store.refresh()
        data = store.get("a")
        assert data.pyramids and len(data.steps) == start + 100
        for metric, pyr in data.pyramids.items():
            values = data.layer_metrics["update_norm" if metric == "update_ratio" else metric]
            divide_by = data.layer_metrics["param_norm"] if metric == "update_ratio" else None
            fresh = original(values, data.present, divide_by, pyramid.BASE_BLOCK)
            assert np.array_equal(pyr.levels[0].max, fresh[0].astype(np.float32), equal_nan=True)
            assert np.array_equal(pyr.levels[0].bad, fresh[1])
        incremental += max(pooled_rows) < pyramid.BASE_BLOCK + 100
    writer.close()
    assert incremental >= 5  # most refreshes pooled only the new rows (a buffer that grew its capacity: all of them)


def _long_episode_run(path: Path) -> None:
    """An explosion whose spikes (every 8th step, each larger than the last, within the merge gap) form one episode
    of about 400 steps, with sample ids logged at every step."""
    rng = np.random.default_rng(0)
    with GradientWriter(path) as writer:
        for s in range(1600):
            grads = np.exp(rng.normal(0.0, 0.1, 2))
            if 1000 <= s <= 1400 and (s - 1000) % 8 == 0:
                grads[1] *= 1e3 * 2 ** ((s - 1000) / 40)
            writer.write(s, ["a", "b"], grad_norm=grads, loss=1.0, batch_ids=np.arange(4) + 4 * s)


def _pages(client: Client, run: str, episode: dict, limit: int) -> list[dict]:
    """An episode's batches, paged backwards from its peak through the ``batches`` route."""
    out: list[dict] = []
    end = episode["peak_step"]
    while True:
        resp = client.get(PREFIX + "batches", query_string={"run": run, "start": episode["start_step"], "end": end,
                                                             "limit": limit})
        assert resp.status_code == 200, resp.get_data()[:300]
        page = json.loads(resp.get_data())
        assert page["total"] == episode["batches_total"] - len(out)
        out = page["batches"] + out
        if not page["batches"] or len(out) == episode["batches_total"]:
            return out
        end = page["batches"][0]["step"] - 1


def test_a_long_episode_lists_every_batch_with_and_without_the_cache(tmp_path: Path) -> None:
    from tb_gradient_plugin.auditor import audit_run

    root = tmp_path / "logs"
    _long_episode_run(root / "long")
    audited = next(e for e in audit_run("long", str(root / "long"))["report"]["episodes"] if e["kind"] == "explosion")
    assert (audited["start_step"], audited["peak_step"]) == (1000, 1400)
    # the audit JSON: every step from the start to the peak, each with its own ids (no cap at 256)
    assert [b["step"] for b in audited["batches"]] == list(range(1000, 1401))
    assert all(b["ids"] == [4 * b["step"] + i for i in range(4)] for b in audited["batches"])
    answers = []
    for cache_dir in (str(tmp_path / "cache"), str(tmp_path / "cache"), "off"):  # cold, warm, none
        client = Client(application.TensorBoardWSGI([_plugin(root, cache_dir)]))
        doc = json.loads(client.get(PREFIX + "episodes", query_string={"run": "long"}).get_data())
        episode = next(e for e in doc["episodes"] if e["kind"] == "explosion")
        # the tab's route lists the batches closest to the peak and says how many there are
        assert episode["batches_total"] == 401
        assert episode["batches"] == audited["batches"][-plugin.EPISODE_BATCHES:]
        assert _pages(client, "long", episode, 100) == audited["batches"]
        bad = client.get(PREFIX + "batches", query_string={"run": "long", "start": 0, "end": 9, "limit": 0})
        assert bad.status_code == 400 and b"limit" in bad.get_data()
        answers.append(_pages(client, "long", episode, plugin.MAX_BATCHES_PAGE))
    assert answers[0] == answers[1] == answers[2] == audited["batches"]


def test_an_array_of_one_value_is_stored_as_that_value(logdir, tmp_path):
    """A large array whose every entry holds one value (a run where every layer is logged at every step: its logged
    mask) costs no bytes in the arrays file, and reads back equal, read-only."""
    _cold_then(logdir, tmp_path / "cache")
    entry = next(e for e in _entries(tmp_path / "cache") if (e / "manifest.json").read_text().count('"const"'))
    body = json.loads((entry / "manifest.json").read_text())["body"]
    constant = {name: meta for name, meta in body["arrays"].items() if "const" in meta}
    stored = {name: meta for name, meta in body["arrays"].items() if "const" not in meta}
    assert "present" in constant, sorted(constant)
    assert (entry / "arrays.bin").stat().st_size == body["arrays_bytes"]
    assert body["arrays_bytes"] < sum(np.prod(m["shape"]) * np.dtype(m["dtype"]).itemsize
                                      for m in body["arrays"].values())
    assert all("offset" in meta for meta in stored.values())
    view = cache._constant_view(constant["present"])
    assert view.shape == tuple(constant["present"]["shape"]) and view.all() and not view.flags.writeable


def test_a_report_judged_before_the_first_cache_write_goes_into_the_entry(logdir, tmp_path):
    """The tab answers before a first read's cache writes finish: a report judged while a run's write is still queued
    is written with the entry, so a second start does not judge the run again."""
    import threading

    from tb_gradient_plugin import detect
    from tb_gradient_plugin.runs import RunStore

    store = RunStore(str(logdir), cache=cache.RunCache.open(str(tmp_path / "cache")))
    gate = threading.Event()
    original = store._publishable

    def held(run, root):
        gate.wait(30)
        return original(run, root)

    store._publishable = held
    refresh = threading.Thread(target=store.refresh, kwargs={"listed": lambda: None})
    refresh.start()
    for _ in range(600):
        if store.run_names() == ["a", "b"]:
            break
        time.sleep(0.05)
    data, version = store.snapshot("a")  # published from memory, its write held back
    assert store._runs["a"].entry is None or not (store._runs["a"].entry.path / "manifest.json").exists()
    report = detect.detect(data)
    store.save_report("a", version, report)
    gate.set()
    refresh.join(60)
    again = RunStore(str(logdir), cache=cache.RunCache.open(str(tmp_path / "cache")))
    again.refresh()
    assert again.cached_report("a", again.version("a")) is not None


def test_a_cache_write_waits_while_a_detection_or_response_is_computed(logdir, tmp_path):
    """Cache writes yield to what a user waits for: none starts while ``hold_writes`` is held, all of them once it is
    released (the runs are served from memory meanwhile)."""
    import threading

    from tb_gradient_plugin.runs import RunStore

    cache_dir = tmp_path / "cache"
    store = RunStore(str(logdir), cache=cache.RunCache.open(str(cache_dir)))
    listed = threading.Event()
    with store.hold_writes():
        refresh = threading.Thread(target=store.refresh, kwargs={"listed": listed.set})
        refresh.start()
        assert listed.wait(60)
        time.sleep(0.5)
        assert _entries(cache_dir) == [] and refresh.is_alive()
        assert store.get("a").__dict__.get("cached") is None  # served from memory
    refresh.join(60)
    assert not refresh.is_alive() and len(_entries(cache_dir)) == 2
    assert store.get("a").__dict__.get("cached") is not None


def test_the_plugin_judges_each_run_before_its_first_cache_write(logdir, tmp_path, monkeypatch):
    """On a first read the plugin judges each run just before writing it: on the cache's writer thread while the next
    run is read, the last one on the thread that read it. Every entry is written with its report, no detection
    competes with a write, and a second start judges nothing."""
    import threading

    from tb_gradient_plugin import backend, runs

    judged: list[str] = []
    written: dict[str, bool] = {}
    original_judge, original_write = backend._judge, runs._write_entry

    def judge(data):
        judged.append((data.name, threading.current_thread().name))
        return original_judge(data)

    def write(cache_, run, data, report=None):
        written[run.name] = report is not None
        return original_write(cache_, run, data, report)

    monkeypatch.setattr(backend, "_judge", judge)
    monkeypatch.setattr(runs, "_write_entry", write)
    instance = _plugin(logdir, str(tmp_path / "cache"))
    instance._backend.wait_loaded(60)
    instance._backend.wait_idle()
    assert written == {"a": True, "b": True}
    assert [run for run, _ in judged] == ["a", "b"], judged
    assert judged[0][1].startswith("tb-gradient-cache") and judged[1][1] == "tb-gradient-warmup", judged
    judged.clear()
    assert _answers(_plugin(logdir, str(tmp_path / "cache"))) == _answers(_plugin(logdir, "off"))
    assert len(judged) == 2  # the run without the cache only: the cached start judged nothing


#: A training job appends to one run while the run store follows it; prints the store's resident memory (MB) after
#: each refresh and whether what it serves equals a fresh read.
LIVE = r"""
import json, os, sys
import numpy as np
sys.path.insert(0, sys.argv[4])
from test_runs_live import assert_same_run
from tb_gradient_plugin.cache import RunCache
from tb_gradient_plugin.runs import RunStore, load_run
from tb_gradient_plugin.writer import GradientWriter

logdir, cache_dir, budget_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
layers = [f"l{i}" for i in range(200)]
store = RunStore(logdir, cache=None if cache_dir == "off" else RunCache.open(cache_dir, int(budget_mb * 2**20)))
rng = np.random.default_rng(0)
rss, step = [], 0
with GradientWriter(os.path.join(logdir, "live")) as writer:
    for chunk in range(8):
        for _ in range(5000):
            g = rng.random(200).astype(np.float32)
            writer.write(step, layers, grad_norm=g, param_norm=g + 1, update_norm=g * 1e-3)
            step += 1
        writer.flush()
        store.refresh()
        rss.append(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
assert_same_run(store.get("live"), load_run(os.path.join(logdir, "live")))
print(json.dumps({"rss": rss, "steps": int(len(store.get("live").steps))}))
"""


@pytest.mark.slow
def test_a_growing_run_larger_than_its_share_of_the_budget_holds_only_what_each_refresh_touches(tmp_path):
    """A live run of 40,000 steps x 200 layers (3 x 32 MB of values, an 8 MB mask) followed through 8 appends: with
    the cache (budget 40 MB) its values move into file-backed buffers whose pages are handed back after each refresh,
    so the store's memory stays flat while the run grows; without it, it grows with the run (the control). Served
    data equals a fresh read either way."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "1"}
    out = {}
    for mode in ("cache", "off"):
        logdir = tmp_path / mode
        logdir.mkdir()
        cache_dir = str(tmp_path / "cache") if mode == "cache" else "off"
        done = subprocess.run([sys.executable, "-c", LIVE, str(logdir), cache_dir, "40", str(REPO / "tests")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        assert out[mode]["steps"] == 40_000
    grown = {mode: doc["rss"][-1] - doc["rss"][1] for mode, doc in out.items()}
    assert grown["off"] > 60, out["off"]["rss"]  # the control: 6 appends of 5,000 rows (~4 MB each per metric)
    assert grown["cache"] < 20, out["cache"]["rss"]
