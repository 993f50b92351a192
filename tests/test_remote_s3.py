"""Logdirs on S3, read through s3fs from a real S3-compatible server (moto's standalone server) that the tests start:
the auditor, the run store's ranged reads of a growing file, a real TensorBoard serving an ``s3://`` logdir, and the
errors for a missing bucket or missing credentials."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from s3server import S3Server, without_credentials
from tbserver import TensorBoardServer
from test_audit import tb_gradient, write

from tb_gradient_plugin import GradientWriter
from tb_gradient_plugin.cli import main
from tb_gradient_plugin.reader import HEAD_BYTES, TAIL_BYTES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def local_logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    write(root / "healthy", seed=1)
    write(root / "exploding", spike=400, seed=2)
    return root


def _audit(url: str, capsys) -> tuple[int, dict]:
    code = main(["audit", url, "--json", "--workers", "1"])
    return code, json.loads(capsys.readouterr().out)


def test_auditor_on_s3_matches_local(s3, local_logs, capsys):
    url = f"s3://{s3.bucket()}/team/logs"
    s3.upload(local_logs, url)
    remote_code, remote = _audit(url, capsys)
    local_code, local = _audit(str(local_logs), capsys)
    assert remote_code == local_code == 1
    assert remote == local
    runs = {r["run"]: r for r in remote["runs"]}
    assert set(runs) == {"healthy", "exploding"}
    assert runs["exploding"]["episodes"][0]["start_step"] == 400 and not runs["healthy"]["episodes"]


def test_auditor_on_s3_downloads_only_what_is_new_the_second_time(s3, local_logs, tmp_path, capsys):
    """A remote logdir is audited through the run cache: the second audit reads the files' identities, not their
    records, and says the same."""
    from tb_gradient_plugin import remote
    from tb_gradient_plugin.cache import HEAD_BLOCK

    url = f"s3://{s3.bucket()}/cached"
    s3.upload(local_logs, url)
    cache_dir = str(tmp_path / "cache")
    code = main(["audit", url, "--json", "--workers", "1", "--cache-dir", cache_dir])
    first = json.loads(capsys.readouterr().out)
    fs, _ = remote.filesystem(url)
    gets: list[bytes | None] = []

    def record(request, **_kwargs):
        if request.method == "GET" and "list-type" not in request.url:
            gets.append(request.headers.get("Range"))

    fs.s3.meta.events.register("before-send.s3.*", record)
    try:
        again = main(["audit", url, "--json", "--workers", "1", "--cache-dir", cache_dir])
    finally:
        fs.s3.meta.events.unregister("before-send.s3.*", record)
    assert (again, json.loads(capsys.readouterr().out)) == (code, first)
    assert gets and all(r is not None for r in gets)
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.decode().removeprefix("bytes=").split("-") for r in gets))
    assert fetched <= len(first["runs"]) * HEAD_BLOCK, fetched


def test_growing_file_is_read_with_ranged_requests_of_the_new_bytes(s3, tmp_path):
    """A refresh fetches only what was appended (plus the small checks that the file is still the same one), in
    ranged GETs, and sees the new steps."""
    from tb_gradient_plugin import remote
    from tb_gradient_plugin.runs import RunStore

    url = f"s3://{s3.bucket()}/logs"
    layers = ["a", "b"]
    writer = GradientWriter(tmp_path / "live")
    for step in range(300):
        writer.write(step, layers, grad_norm=[1.0, 2.0], loss=1.0)
    writer.flush()
    s3.upload(tmp_path, url)
    store = RunStore(url)
    store.refresh()
    assert len(store.get("live").steps) == 300
    (local_file,) = (tmp_path / "live").iterdir()
    size_before = local_file.stat().st_size

    fs, _ = remote.filesystem(url)
    requests: list[tuple[str, str, bytes | None]] = []

    def record(request, **_kwargs):
        requests.append((request.method, request.url, request.headers.get("Range")))

    fs.s3.meta.events.register("before-send.s3.*", record)
    try:
        for step in range(300, 500):
            writer.write(step, layers, grad_norm=[1.0, 2.0], loss=1.0)
        writer.flush()
        s3.upload(tmp_path, url)
        appended = local_file.stat().st_size - size_before
        requests.clear()
        store.refresh()
    finally:
        fs.s3.meta.events.unregister("before-send.s3.*", record)
        writer.close()
    assert list(store.get("live").steps) == list(range(500))
    gets = [(u, r) for m, u, r in requests if m == "GET" and "list-type" not in u]
    assert gets and all(r is not None for _, r in gets), gets  # every object read is a ranged read
    fetched = 0
    for _, r in gets:
        first, last = (int(x) for x in r.decode().removeprefix("bytes=").split("-"))
        fetched += last - first + 1
    # is it still the same file: its first bytes, the hash of the last block read before, and of the new last block
    checks = HEAD_BYTES + 2 * TAIL_BYTES
    assert appended <= fetched <= appended + checks, (fetched, appended)


def test_second_start_on_s3_reads_no_event_bytes_from_the_bucket(s3, tmp_path):
    """The persistent cache serves a remote logdir as it serves a local one: a second start lists every run with the
    same data while reading only each file's identity (size, ETag, first block), not its records; a file that grew
    since is read on from where the entry stopped, in ranged reads of the new bytes."""
    from tb_gradient_plugin import remote
    from tb_gradient_plugin.cache import HEAD_BLOCK, RunCache
    from tb_gradient_plugin.runs import RunStore

    url = f"s3://{s3.bucket()}/logs"
    logs = tmp_path / "logs"
    write(logs / "exploding", spike=400, seed=2)
    live = GradientWriter(logs / "live")
    for step in range(300):
        live.write(step, ["a", "b"], grad_norm=[1.0, 2.0], loss=1.0)
    live.flush()
    s3.upload(logs, url)
    cache_dir = str(tmp_path / "cache")
    first = RunStore(url, cache=RunCache.open(cache_dir))
    first.refresh()
    expected = {name: first.get(name) for name in first.run_names()}
    assert sorted(expected) == ["exploding", "live"]

    fs, _ = remote.filesystem(url)
    requests: list[tuple[str, str, bytes | None]] = []

    def record(request, **_kwargs):
        requests.append((request.method, request.url, request.headers.get("Range")))

    def fetched() -> int:
        gets = [r for m, u, r in requests if m == "GET" and "list-type" not in u]
        assert all(r is not None for r in gets), gets  # ranged reads only
        return sum(int(b) - int(a) + 1 for a, b in (r.decode().removeprefix("bytes=").split("-") for r in gets))

    fs.s3.meta.events.register("before-send.s3.*", record)
    try:
        second = RunStore(url, cache=RunCache.open(cache_dir))
        second.refresh()
        assert second.run_names() == sorted(expected)
        for name, data in expected.items():
            got = second.get(name)
            assert got.layers == data.layers and np.array_equal(got.steps, data.steps)
            for metric, values in data.layer_metrics.items():
                assert np.array_equal(got.layer_metrics[metric], values, equal_nan=True)
        assert fetched() <= 2 * HEAD_BLOCK  # the identities of the two files: no record was read

        (live_file,) = (logs / "live").iterdir()
        size_before = live_file.stat().st_size
        for step in range(300, 400):
            live.write(step, ["a", "b"], grad_norm=[1.0, 2.0], loss=1.0)
        live.flush()
        s3.upload(logs, url)
        requests.clear()
        third = RunStore(url, cache=RunCache.open(cache_dir))
        third.refresh()
    finally:
        fs.s3.meta.events.unregister("before-send.s3.*", record)
        live.close()
    assert list(third.get("live").steps) == list(range(400))
    appended = live_file.stat().st_size - size_before
    assert appended <= fetched() <= appended + 2 * HEAD_BLOCK + HEAD_BYTES + 2 * TAIL_BYTES


def _poll(tb: TensorBoardServer, predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        doc = tb.get_json("data/plugin/gradients/runs")
        if predicate(doc):
            return doc
        assert time.monotonic() < deadline, f"gave up waiting; last answer {doc}\n{tb.output[-3000:]}"
        time.sleep(0.5)


def test_tensorboard_serves_an_s3_logdir_and_a_run_growing_on_it(s3, local_logs, tmp_path):
    bucket = s3.bucket()
    url = f"s3://{bucket}/logs"
    s3.upload(local_logs, url)
    live = tmp_path / "live"
    writer = GradientWriter(live)
    for step in range(200):
        writer.write(step, ["a", "b"], grad_norm=[1.0, 2.0], loss=1.0)
    writer.flush()
    s3.upload(tmp_path, url)
    env = dict(os.environ, **s3.env, PYTHONPATH=str(REPO))
    with TensorBoardServer(url, env=env) as tb:
        doc = _poll(tb, lambda d: {r["run"] for r in d["runs"]} == {"healthy", "exploding", "live"}
                    and not d["loading"])
        assert "error" not in doc
        runs = {r["run"]: r for r in doc["runs"]}
        assert runs["exploding"]["episodes"] >= 1 and runs["live"]["steps"] == 200
        episodes = tb.get_json("data/plugin/gradients/episodes?run=exploding")
        assert episodes["episodes"][0]["start_step"] == 400
        listing = tb.get_json("data/plugins_listing")
        assert listing["gradients"]["enabled"]

        for step in range(200, 350):  # the run grows while served: uploaded again, longer (as a sync tool does)
            writer.write(step, ["a", "b"], grad_norm=[1.0, 2.0], loss=1.0)
        writer.close()
        s3.upload(tmp_path, url)
        _poll(tb, lambda d: {r["run"]: r for r in d["runs"]}["live"]["steps"] == 350)
        assert tb.alive
    assert "Gradients tab reads it" in tb.output  # TensorBoard itself cannot open s3:// with TensorFlow installed


def test_tensorboard_logdir_spec_with_an_s3_url(s3, local_logs, tmp_path):
    url = f"s3://{s3.bucket()}/logs"
    s3.upload(local_logs, url)
    write(tmp_path / "local_run", spike=300, seed=7)
    env = dict(os.environ, **s3.env, PYTHONPATH=str(REPO))
    with TensorBoardServer(None, env=env, extra_args=["--logdir_spec", f"team:{url},mine:{tmp_path}"]) as tb:
        doc = _poll(tb, lambda d: len(d["runs"]) == 3 and not d["loading"])
        assert {r["run"] for r in doc["runs"]} == {"team/healthy", "team/exploding", "mine/local_run"}
        episodes = tb.get_json("data/plugin/gradients/episodes?run=team/exploding")
        assert episodes["episodes"][0]["start_step"] == 400


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(tb_gradient() + list(args), capture_output=True, text=True, timeout=120,
                          env=dict(env, PYTHONPATH=str(REPO)))


def test_missing_bucket_is_a_usage_error_naming_the_url(s3):
    url = "s3://no-such-bucket-here/logs"
    proc = _cli(dict(os.environ, **s3.env), "audit", url)
    assert proc.returncode == 2, proc.stderr
    assert url in proc.stderr and "no bucket named 'no-such-bucket-here'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli(dict(os.environ, **s3.env), "compare", f"{url}/a", f"{url}/b")
    assert proc.returncode == 2 and f"{url}/a" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_missing_credentials_is_a_usage_error_naming_the_url(s3, local_logs):
    url = f"s3://{s3.bucket()}/logs"
    s3.upload(local_logs, url)
    proc = _cli(without_credentials(dict(os.environ, **s3.env)), "audit", url)
    assert proc.returncode == 2, proc.stderr
    assert url in proc.stderr and "no credentials" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plugin_reports_a_missing_bucket_and_keeps_serving(s3, caplog):
    """The data layer behind the routes: the run list says what is wrong, naming the URL, and nothing raises. The
    server's log gets one line saying so, not a traceback at every refresh."""
    from tb_gradient_plugin.backend import Backend

    url = "s3://no-such-bucket-either/logs"
    backend = Backend(url)
    with caplog.at_level(logging.WARNING, logger="tb_gradient_plugin"):
        for _ in range(3):
            backend._refreshed_at = -math.inf  # each call is a due refresh
            backend.refresh()
    assert backend.runs() == []
    assert url in backend.error and "no bucket" in backend.error
    logged = [r for r in caplog.records if r.name.startswith("tb_gradient_plugin")]
    assert len(logged) == 1 and url in logged[0].getMessage() and logged[0].exc_info is None


def test_unknown_protocol_is_a_usage_error_naming_the_url():
    from tb_gradient_plugin import audit
    from tb_gradient_plugin.auditor import UsageError

    with pytest.raises(UsageError, match=r"cannot read nosuchproto://bucket/logs: Protocol not known"):
        audit("nosuchproto://bucket/logs")
