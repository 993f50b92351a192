"""The run store and the plugin while event files change under them: files replaced or truncated under their name,
and reads of the logdir running in one thread while requests are answered in others."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from argparse import Namespace
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from tb_gradient_plugin import GradientWriter, backend, plugin
from tb_gradient_plugin.runs import RunData, RunStore, load_run

LAYERS = ["embed", "block0.attn", "block0.mlp", "head"]
REPLACED = "read again from the start"


def event_bytes(scratch: Path, steps: range, value: float, layers: list[str] = LAYERS) -> bytes:
    """The bytes of one event file written by our writer: grad_norm = ``value`` + step / 1e4 at every layer, so
    every step and every writing of a run has values of its own."""
    out = scratch / f"w{time.monotonic_ns()}"
    with GradientWriter(out) as w:
        for step in steps:
            g = np.full(len(layers), value + step / 1e4)
            w.write(step, layers, grad_norm=g, param_norm=np.full(len(layers), 10.0), loss=value + step / 1e4)
    (path,) = out.iterdir()
    data = path.read_bytes()
    shutil.rmtree(out)
    return data


def assert_same_run(a: RunData, b: RunData) -> None:
    assert a.layers == b.layers
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_array_equal(a.present, b.present)
    assert sorted(a.layer_metrics) == sorted(b.layer_metrics)
    for metric, values in a.layer_metrics.items():
        np.testing.assert_array_equal(values, b.layer_metrics[metric])
    assert sorted(a.series) == sorted(b.series)
    for name, series in a.series.items():
        np.testing.assert_array_equal(series.steps, b.series[name].steps)
        np.testing.assert_array_equal(series.values, b.series[name].values)
    assert a.events == b.events


def grad_at(run: RunData, step: int) -> float:
    return float(run.layer_metrics["grad_norm"][int(np.searchsorted(run.steps, step)), 0])


# ------------------------------------------------------------------------------------------ replaced or truncated


def _truncate_in_place(path: Path, new: bytes) -> None:
    with open(path, "r+b") as f:  # the same inode, shorter content: a user truncating, a job restarted
        f.truncate(0)
        f.write(new)


def _copy_over(path: Path, new: bytes) -> None:
    with open(path, "wb") as f:  # the same inode, rewritten (cp, a copy tool); longer than what was read
        f.write(new)


def _rename_over(path: Path, new: bytes) -> None:
    tmp = path.with_name(".incoming")  # a new inode under the old name (rsync, an atomic save)
    tmp.write_bytes(new)
    os.replace(tmp, path)


@pytest.mark.parametrize("replace, new_steps", [
    (_truncate_in_place, range(0, 40)),
    (_copy_over, range(0, 200)),
    (_rename_over, range(0, 120)),
])
def test_a_replaced_file_is_read_again_and_its_old_values_are_gone(tmp_path, replace, new_steps):
    run_dir = tmp_path / "logs" / "run"
    run_dir.mkdir(parents=True)
    path = run_dir / "events.out.tfevents.1000.host.1"
    path.write_bytes(event_bytes(tmp_path, range(0, 100), 1.0))
    store = RunStore(str(tmp_path / "logs"))
    store.refresh()
    before, version = store.get("run"), store.version("run")
    assert len(before.steps) == 100 and grad_at(before, 10) == pytest.approx(1.001)

    replace(path, event_bytes(tmp_path, new_steps, 5.0))
    assert store.refresh()
    after, new_version = store.get("run"), store.version("run")
    assert new_version > version
    assert after.steps.tolist() == list(new_steps)  # not the union with the old steps: no stale step survives
    assert grad_at(after, 10) == pytest.approx(5.001)
    assert after.events == len(new_steps) + 1  # the file-version event and one per step, counted once
    assert_same_run(after, load_run(str(run_dir)))
    assert any(REPLACED in w and path.name in w for w in after.warnings), after.warnings
    assert not any("@" in w for w in after.warnings)  # the old offset is not read as damage of the new content
    assert before.steps.tolist() == list(range(100))  # what was handed out earlier is left as it was

    store.refresh()  # settled: nothing more to do, the warning stays
    assert store.version("run") == new_version and any(REPLACED in w for w in store.get("run").warnings)


def test_a_growing_file_and_a_synced_copy_of_it_are_not_replacements(tmp_path):
    """A writer appending and rsync renaming a longer copy of the same file over it go on from the offset."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    whole = event_bytes(tmp_path, range(0, 300), 1.0)
    path = run_dir / "events.out.tfevents.1000.host.1"
    path.write_bytes(whole[:len(whole) // 3])
    store = RunStore(str(run_dir))
    store.refresh()
    first = store.get(".").bytes_read
    with open(path, "ab") as f:
        f.write(whole[len(whole) // 3:2 * len(whole) // 3])
    store.refresh()
    _rename_over(path, whole)
    store.refresh()
    run = store.get(".")
    assert run.steps.tolist() == list(range(300)) and not run.warnings
    assert run.bytes_read < first + len(whole)  # the first third was not read again
    assert_same_run(run, load_run(str(run_dir)))


def test_a_replaced_file_among_overlapping_files_resolves_steps_like_a_fresh_read(tmp_path):
    """Two files of one run (a resumed job) overlap in steps; the older one is rewritten. The later file still wins
    where both have a step, the rewritten file's new values fill the rest, and none of its old values remain."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    older = run_dir / "events.out.tfevents.1000.host.1"
    newer = run_dir / "events.out.tfevents.2000.host.1"
    older.write_bytes(event_bytes(tmp_path, range(0, 100), 1.0))
    newer.write_bytes(event_bytes(tmp_path, range(50, 150), 2.0))
    store = RunStore(str(run_dir))
    store.refresh()
    assert grad_at(store.get("."), 10) == pytest.approx(1.001) and grad_at(store.get("."), 60) == pytest.approx(2.006)

    _copy_over(older, event_bytes(tmp_path, list(range(0, 100)) + [200], 3.0))
    store.refresh()
    run = store.get(".")
    assert run.steps.tolist() == list(range(0, 150)) + [200]
    assert grad_at(run, 10) == pytest.approx(3.001)  # only the rewritten file has step 10: its new value
    assert grad_at(run, 60) == pytest.approx(2.006)  # both have step 60: the later file's, as in a fresh read
    assert grad_at(run, 200) == pytest.approx(3.02)
    assert run.series["loss"].values[10] == pytest.approx(3.001)
    assert_same_run(run, load_run(str(run_dir)))
    assert sum(REPLACED in w for w in run.warnings) == 1 and older.name in run.warnings[0]


def test_a_replaced_file_on_an_fsspec_filesystem(tmp_path):
    url = "memory://replaced_logs"
    fs = fsspec.filesystem("memory")
    path = "/replaced_logs/run/events.out.tfevents.1000.host.1"
    try:
        fs.pipe(path, event_bytes(tmp_path, range(0, 100), 1.0))
        store = RunStore(url)
        store.refresh()
        assert len(store.get("run").steps) == 100
        fs.pipe(path, event_bytes(tmp_path, range(0, 130), 7.0))  # replaced by a longer file
        store.refresh()
        run = store.get("run")
        assert run.steps.tolist() == list(range(130)) and grad_at(run, 99) == pytest.approx(7.0099)
        fs.pipe(path, event_bytes(tmp_path, range(0, 20), 8.0))  # and by a shorter one
        store.refresh()
        run = store.get("run")
        assert run.steps.tolist() == list(range(20)) and grad_at(run, 19) == pytest.approx(8.0019)
        assert sum(REPLACED in w for w in run.warnings) == 2
        assert_same_run(run, load_run(url + "/run"))
    finally:
        fs.rm("/replaced_logs", recursive=True)


class _NoTimeFileSystem(MemoryFileSystem):
    """An in-memory filesystem that keeps no modification or creation time (as some object stores and HTTP
    servers): a same-size rewrite changes nothing but the bytes."""

    protocol = "notime"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("notime://"))

    def info(self, path, **kwargs):
        return {k: v for k, v in super().info(path, **kwargs).items() if k not in ("created", "mtime")}


def test_a_same_size_rewrite_without_modification_times_is_noticed(tmp_path):
    """The rewrite keeps the file's size and first bytes (the same start of training) but not its later steps: the
    hash of the last block read tells it from the file read before."""
    fsspec.register_implementation("notime", _NoTimeFileSystem, clobber=True)
    fs = fsspec.filesystem("notime")
    path = "/same_size_logs/run/events.out.tfevents.1000.host.1"

    def written(later: float) -> bytes:  # steps 0-49 at 1.0, 50-99 at ``later``, fixed wall times
        out = tmp_path / f"w{later}"
        with GradientWriter(out) as w:
            for step in range(100):
                value = 1.0 if step < 50 else later
                w.write(step, LAYERS, grad_norm=np.full(len(LAYERS), value + step / 1e4), wall_time=float(step))
        (written_path,) = out.iterdir()
        return written_path.read_bytes()

    first, second = written(1.0), written(2.0)
    version_record = int.from_bytes(first[:8], "little") + 16  # the file-version event: its wall time differs
    rewrite = first[:version_record] + second[version_record:]
    assert len(rewrite) == len(first) and rewrite[:64] == first[:64] and rewrite != first
    try:
        fs.pipe(path, first)
        store = RunStore("notime://same_size_logs")
        store.refresh()
        assert grad_at(store.get("run"), 60) == pytest.approx(1.006)
        fs.pipe(path, rewrite)
        assert store.refresh()
        run = store.get("run")
        assert grad_at(run, 60) == pytest.approx(2.006) and grad_at(run, 10) == pytest.approx(1.001)
        assert sum(REPLACED in w for w in run.warnings) == 1
        store.refresh()  # unchanged since: read once, not again at every refresh
        assert sum(REPLACED in w for w in store.get("run").warnings) == 1
    finally:
        fs.rm("/same_size_logs", recursive=True)


# ------------------------------------------------------------------------------------- reads while others answer


class _GatedFile(io.BytesIO):
    """A file whose reads wait while the filesystem's gate is closed: a read in progress, held as long as a test
    needs (a slow network filesystem, a huge file), without timing guesses."""

    def __init__(self, data: bytes, fs: GatedMemoryFileSystem, path: str) -> None:
        super().__init__(data)
        self._fs = fs
        self._held = fs.hold_only is None or fs.hold_only in path

    def read(self, n: int | None = -1) -> bytes:
        if self._held and not self._fs.gate.is_set():
            self._fs.waiting.set()
            assert self._fs.gate.wait(timeout=60), "the test never opened the gate"
        with self._fs.count_lock:
            self._fs.reads += 1
        return super().read(n)


class GatedMemoryFileSystem(MemoryFileSystem):
    protocol = "gatedmem"
    store: dict = {}
    pseudo_dirs = [""]
    gate = threading.Event()
    waiting = threading.Event()
    hold_only: str | None = None  # a closed gate holds only the files whose path contains this (None: all)
    count_lock = threading.Lock()
    reads = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("gatedmem://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" in mode:
            return _GatedFile(f.getvalue(), self, path)
        return f


fsspec.register_implementation("gatedmem", GatedMemoryFileSystem, clobber=True)


@pytest.fixture
def gated(tmp_path):
    """A gated filesystem holding run ``small`` (50 steps) and run ``big`` (600 steps of 40 layers), gate open."""
    fs = fsspec.filesystem("gatedmem")
    GatedMemoryFileSystem.gate.set()
    GatedMemoryFileSystem.waiting.clear()
    GatedMemoryFileSystem.hold_only = None
    fs.pipe("/logs/small/events.out.tfevents.1000.host.1", event_bytes(tmp_path, range(0, 50), 1.0))
    layers = [f"layer{i}" for i in range(40)]
    fs.pipe("/logs/big/events.out.tfevents.1000.host.1", event_bytes(tmp_path, range(0, 600), 1.0, layers))
    yield fs, layers
    GatedMemoryFileSystem.gate.set()
    GatedMemoryFileSystem.hold_only = None
    fs.rm("/logs", recursive=True)


def _in_thread(target, *args) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = target(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _hold_next_read() -> None:
    """Close the gate: the next read of any file waits until the test opens it."""
    GatedMemoryFileSystem.waiting.clear()
    GatedMemoryFileSystem.gate.clear()


def test_routes_answer_from_the_last_state_while_a_big_read_is_in_progress(gated, tmp_path):
    fs, layers = gated
    context = base_plugin.TBContext(logdir="gatedmem://logs", flags=Namespace(logdir_spec="", reload_interval=5.0))
    instance = plugin.GradientsLoader().load(context)
    client = Client(application.TensorBoardWSGI([instance]))

    def runs() -> dict:
        import json

        resp = client.get("/data/plugin/gradients/runs")
        assert resp.status_code == 200
        return {r["run"]: r for r in json.loads(resp.get_data())["runs"]}

    first = runs()
    assert first["big"]["steps"] == 600 and first["small"]["steps"] == 50
    instance._backend.wait_idle()  # the first read's cache writes (answered before they finish) read file identities

    # Training goes on: the big run resumes into a second file, and the next read of it is held mid-way.
    fs.pipe("/logs/big/events.out.tfevents.2000.host.1", event_bytes(tmp_path, range(600, 1800), 2.0, layers))
    _hold_next_read()
    time.sleep(backend.REFRESH_SECONDS + 0.05)
    reader, read_result = _in_thread(runs)  # this request is due to refresh: it does the read
    assert GatedMemoryFileSystem.waiting.wait(timeout=30), "the refresh never reached the file"
    try:
        asker, answer = _in_thread(runs)
        asker.join(timeout=10)
        assert not asker.is_alive(), "the runs route waited for another request's read"
        assert "error" not in answer, answer.get("error")
        during = answer["value"]
        assert during["big"]["steps"] == 600 and during["big"]["version"] == first["big"]["version"]
        assert during["small"]["steps"] == 50
        heat, episodes = (_in_thread(client.get, f"/data/plugin/gradients/{route}")
                          for route in ("heatmap?run=small&bins=10", "episodes?run=big"))
        for thread, result in (heat, episodes):
            thread.join(timeout=10)
            assert not thread.is_alive() and result["value"].status_code == 200
        assert reader.is_alive()  # the read is still held: all of the above was answered during it
    finally:
        GatedMemoryFileSystem.gate.set()
    reader.join(timeout=60)
    assert "error" not in read_result, read_result.get("error")
    assert read_result["value"]["big"]["steps"] == 1800
    assert runs()["big"]["version"] > first["big"]["version"]
    store_data, _ = instance._backend.run("big")
    assert_same_run(store_data, load_run("gatedmem://logs/big"))


def test_during_the_first_read_runs_lists_what_is_read_and_a_read_run_answers(gated):
    """A logdir whose first read is slow (a network filesystem, many large runs): the run list shows the runs read so
    far, marked loading, and the tab can open one of them; a run not read yet is waited for, not a 404."""
    import json

    _hold_next_read()
    GatedMemoryFileSystem.hold_only = "/small/"  # runs are read in name order: "big" is read, then "small" is held
    context = base_plugin.TBContext(logdir="gatedmem://logs", flags=Namespace(logdir_spec="", reload_interval=5.0))
    instance = plugin.GradientsLoader().load(context)
    client = Client(application.TensorBoardWSGI([instance]))
    assert GatedMemoryFileSystem.waiting.wait(timeout=30), "the first read never reached the held run"
    try:
        asker, answer = _in_thread(client.get, "/data/plugin/gradients/runs")
        asker.join(timeout=plugin.FIRST_ANSWER_SECONDS + 10)
        assert not asker.is_alive(), "the runs route waited for the whole first read"
        doc = json.loads(answer["value"].get_data())
        assert doc["loading"] is True
        assert [r["run"] for r in doc["runs"]] == ["big"] and doc["runs"][0]["steps"] == 600
        assert instance._backend.is_active(timeout=0.1)  # the tab is offered before the whole logdir is read
        resp = client.get("/data/plugin/gradients/episodes?run=big")
        assert resp.status_code == 200 and json.loads(resp.get_data())["steps"] == 600
        waiter, waited = _in_thread(client.get, "/data/plugin/gradients/episodes?run=small")
        waiter.join(timeout=0.5)
        assert waiter.is_alive(), "a run not read yet was answered before its read"
    finally:
        GatedMemoryFileSystem.gate.set()
    waiter.join(timeout=60)
    assert waited["value"].status_code == 200 and json.loads(waited["value"].get_data())["steps"] == 50
    doc = json.loads(client.get("/data/plugin/gradients/runs").get_data())
    assert doc["loading"] is False and [r["run"] for r in doc["runs"]] == ["big", "small"]
    assert client.get("/data/plugin/gradients/episodes?run=nope").status_code == 404


def test_concurrent_refreshes_read_each_byte_once_and_equal_a_single_threaded_read(gated, tmp_path):
    fs, layers = gated
    store = RunStore("gatedmem://logs")
    _hold_next_read()
    first, first_result = _in_thread(store.refresh)
    assert GatedMemoryFileSystem.waiting.wait(timeout=30)
    second, second_result = _in_thread(store.refresh)
    time.sleep(0.2)  # the second refresh is under way (it waits for the first one's read, not for the gate)
    try:
        asker, names = _in_thread(store.run_names)
        asker.join(timeout=5)
        assert not asker.is_alive(), "listing the runs waited for the refresh"
        assert "big" not in names["value"]  # no run is published half read
    finally:
        GatedMemoryFileSystem.gate.set()
    for thread in (first, second):
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert "error" not in first_result and "error" not in second_result
    assert first_result["value"] is True
    sizes = {name: sum(fs.size(p) for p in fs.find(f"/logs/{name}")) for name in ("big", "small")}
    for name, size in sizes.items():
        data = store.get(name)
        assert data.bytes_read == size  # read once, by whichever refresh got there first
        assert_same_run(data, load_run(f"gatedmem://logs/{name}"))


def test_a_run_is_published_whole_while_it_is_being_read(gated, tmp_path):
    """``get`` during a read answers at once with the previous complete arrays, never a mix of old and new."""
    fs, layers = gated
    store = RunStore("gatedmem://logs")
    store.refresh()
    before, version = store.get("big"), store.version("big")
    fs.pipe("/logs/big/events.out.tfevents.2000.host.1", event_bytes(tmp_path, range(600, 900), 2.0, layers))
    _hold_next_read()
    refresher, result = _in_thread(store.refresh)
    assert GatedMemoryFileSystem.waiting.wait(timeout=30)
    try:
        asker, answer = _in_thread(lambda: (store.get("big"), store.version("big"), store.snapshot("big")))
        asker.join(timeout=5)
        assert not asker.is_alive(), "reading the store waited for the refresh"
        during, during_version, pair = answer["value"]
        assert during is before and during_version == version and pair == (before, version)
    finally:
        GatedMemoryFileSystem.gate.set()
    refresher.join(timeout=60)
    after, after_version = store.snapshot("big")
    assert after_version > version and after.steps.tolist() == list(range(900))
    assert before.steps.tolist() == list(range(600)) and before.layer_metrics["grad_norm"].shape == (600, 40)
    assert "error" not in result
