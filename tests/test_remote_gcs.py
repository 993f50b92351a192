"""Logdirs on Google Cloud Storage, read through gcsfs from a real GCS JSON API server the tests start (the
``gcp-storage-emulator`` package): the auditor, the run store on a growing file and its cache, and the error for a
missing bucket."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gcsserver import GCSServer
from test_audit import write

from tb_gradient_plugin import GradientWriter
from tb_gradient_plugin.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gcs():
    with GCSServer() as server:
        yield server


@pytest.fixture(scope="module")
def local_logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    write(root / "healthy", seed=1)
    write(root / "exploding", spike=400, seed=2)
    return root


def _audit(target: str, capsys, *extra: str) -> tuple[int, dict]:
    code = main(["audit", target, "--json", "--workers", "1", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_auditor_on_gcs_matches_local(gcs, local_logs, capsys, tmp_path):
    url = f"gs://{gcs.bucket()}/team/logs"
    gcs.upload(local_logs, url)
    local = _audit(str(local_logs), capsys)
    assert _audit(url, capsys, "--cache-dir", str(tmp_path / "cache")) == local
    assert local[0] == 1 and {r["run"] for r in local[1]["runs"]} == {"healthy", "exploding"}
    assert _audit(url, capsys, "--cache-dir", str(tmp_path / "cache")) == local  # served from the cache


def test_run_store_on_gcs_follows_a_growing_file_and_restarts_from_its_cache(gcs, tmp_path):
    from tb_gradient_plugin.cache import RunCache
    from tb_gradient_plugin.runs import RunStore

    url = f"gs://{gcs.bucket()}/logs"
    logs, cache_dir = tmp_path / "logs", str(tmp_path / "cache")
    with GradientWriter(logs / "live") as writer:
        for step in range(300):
            writer.write(step, ["a", "b"], grad_norm=[1.0, 2.0], loss=1.0)
        writer.flush()
        gcs.upload(logs, url)
        store = RunStore(url, cache=RunCache.open(cache_dir))
        store.refresh()
        assert list(store.get("live").steps) == list(range(300))
        for step in range(300, 500):
            writer.write(step, ["a", "b"], grad_norm=[1.0, 2.0 if step != 450 else 5000.0], loss=1.0)
        writer.flush()
        gcs.upload(logs, url)
        store.refresh()
        assert list(store.get("live").steps) == list(range(500))
    again = RunStore(url, cache=RunCache.open(cache_dir))
    again.refresh()
    data = again.get("live")
    assert list(data.steps) == list(range(500))
    assert np.nanmax(data.layer_metrics["grad_norm"][:, 1]) == 5000.0


def test_missing_gcs_bucket_is_a_usage_error_naming_the_url(gcs, capsys):
    url = "gs://no-such-bucket-here/logs"
    assert main(["audit", url]) == 2
    err = capsys.readouterr().err
    assert url in err and "no bucket" in err
