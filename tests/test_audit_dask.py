"""``tb-gradient audit --scheduler``: the per-run audit on a Dask cluster (a LocalCluster of 2 worker processes) gives
the same JSON as the local audit; an unreachable scheduler is a clear error with exit code 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_audit import tb_gradient, write

from tb_gradient_plugin import audit

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    write(root / "healthy", seed=1)
    write(root / "exploding", spike=400, seed=2)
    write(root / "nan", nan_from=500, seed=3)
    write(root / "transient", transient=300, seed=4)
    write(root / "group" / "late", spike=500, seed=5)
    return root


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(tb_gradient() + list(args), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def _audited_on_workers(cluster) -> int:
    """Tasks of the per-run audit the cluster's scheduler has run so far."""
    return sum(p.state_counts.get("memory", 0) for name, p in cluster.scheduler.task_prefixes.items()
               if "audit_task" in name)


def test_cluster_json_equals_local_json(logdir, cluster):
    before = _audited_on_workers(cluster)
    on_cluster = cli("audit", str(logdir), "--json", "--scheduler", cluster.scheduler_address)
    local = cli("audit", str(logdir), "--json", "--workers", "2")
    assert on_cluster.returncode == local.returncode == 1, on_cluster.stderr + local.stderr
    doc = json.loads(on_cluster.stdout)
    assert doc == json.loads(local.stdout)
    assert [r["run"] for r in doc["runs"]] == ["exploding", "group/late", "healthy", "nan", "transient"]
    assert _audited_on_workers(cluster) - before == 5  # one task per run, on the cluster


def test_notebook_api_on_the_cluster(logdir, cluster):
    remote = audit(logdir, scheduler=cluster.scheduler_address)
    assert remote.to_json() == audit(logdir, workers=1).to_json()
    assert "<svg" in remote["exploding"]._repr_html_()  # the chart data came back from the workers too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_exit_code_2(logdir):
    address = f"tcp://127.0.0.1:{_free_port()}"
    proc = cli("audit", str(logdir), "--scheduler", address)
    assert proc.returncode == 2
    assert f"cannot reach the Dask scheduler at {address}" in proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout


def test_scheduler_and_workers_exclude_each_other(logdir):
    proc = cli("audit", str(logdir), "--scheduler", "tcp://127.0.0.1:1", "--workers", "2")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_without_dask_the_error_says_which_extra(logdir, monkeypatch):
    from tb_gradient_plugin.auditor import UsageError

    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` meets where it is not installed
    with pytest.raises(UsageError, match=r"needs dask.distributed: pip install 'tb_gradient_plugin\[dask\]'"):
        audit(logdir, scheduler="tcp://127.0.0.1:1")
