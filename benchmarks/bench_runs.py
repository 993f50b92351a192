"""Latency of the ``runs`` route (what the tab's run overview and pickers read) on a logdir of many small runs.

    python benchmarks/bench_runs.py                       # 500 runs (written once into a temporary dir, reused)
    python benchmarks/bench_runs.py --runs 1000 --logdir sweep_logs
    python benchmarks/bench_runs.py --no-tensorboard      # only the in-process numbers

The logdir is ``benchmarks/many_runs.py``'s sweep: runs of 4 layers x 120-160 steps written by ``GradientWriter``,
one in 50 with a planted explosion, one with NaN gradients. Measured:

* in a fresh process, through TensorBoard's own WSGI router (werkzeug test client, gzip accepted): the time from the
  plugin's construction until ``runs`` lists every run with ``loading`` false, and then the latency of ``runs`` when
  no read of the logdir is due (it answers from what was read) and when one is due (every request then reads what is
  new in all N runs first: what a poll of the tab costs on a live logdir);
* through a real ``tensorboard`` process: the time from its start until ``runs`` lists every run, then the same
  warm latency over HTTP (TensorBoard's own loaders read the logdir meanwhile, as they do for a user).

The benchmark checks each answer (every run listed, every planted finding at its step), so a fast wrong answer
cannot pass for a fast right one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.many_runs import default_plants, write_many_runs  # noqa: E402

#: One fresh process: construct the plugin, ask ``runs`` until every run is listed, then time warm requests.
IN_PROCESS = """
import gzip, json, sys, time
from argparse import Namespace
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client
from tb_gradient_plugin import backend, plugin
logdir, expected, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
context = base_plugin.TBContext(logdir=logdir, flags=Namespace(logdir_spec="", reload_interval=5.0))
client = Client(application.TensorBoardWSGI([plugin.GradientsLoader().load(context)]))
def get():
    t = time.perf_counter()
    response = client.get("/data/plugin/gradients/runs", headers={"Accept-Encoding": "gzip"})
    body = response.get_data()
    seconds = time.perf_counter() - t
    assert response.status_code == 200, body[:300]
    return seconds, len(body), json.loads(gzip.decompress(body))
first, size, doc = get()
while doc["loading"] or len(doc["runs"]) < expected:
    time.sleep(0.05)
    _, size, doc = get()
listed = time.perf_counter() - t0
cached = [get()[0] for _ in range(repeats)]
due = []
for _ in range(repeats):
    time.sleep(backend.REFRESH_SECONDS + 0.05)
    due.append(get()[0])
seconds, size, doc = get()
print(json.dumps({"first_answer": first, "listed": listed, "cached": cached, "due": due, "gzip_bytes": size,
                  "json_bytes": len(json.dumps(doc)), "runs": doc["runs"]}))
"""


def _summary(times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    median = statistics.median(ordered)
    return f"median {median * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms   max {ordered[-1] * 1000:7.1f} ms"


def check(runs: list[dict], n: int) -> None:
    """Every run listed, every planted finding where it was planted, no finding in the other runs."""
    assert len(runs) == n, f"{len(runs)} runs listed, {n} written"
    plants = default_plants(n)
    by_name = {r["run"]: r for r in runs}
    for name, plant in plants.items():
        entry = by_name[name]
        assert entry["first_episode_step"] == plant.step, (name, entry)
        if plant.factor != plant.factor:  # NaN planted
            assert entry["worst_severity_nonfinite"], (name, entry)
        else:
            assert entry["worst_severity"] is not None and entry["worst_severity"] > plant.factor / 2, (name, entry)
    flagged = {r["run"] for r in runs if r["episodes"]}
    assert flagged == set(plants), f"findings in {sorted(flagged ^ set(plants))}"


def in_process(logdir: Path, n: int, repeats: int) -> None:
    out = subprocess.run([sys.executable, "-c", IN_PROCESS, str(logdir), str(n), str(repeats)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    check(result["runs"], n)
    print(f"\nin-process (TensorBoard's WSGI router), {n} runs")
    print(f"  first answer (a small part read)        {result['first_answer'] * 1000:8.1f} ms")
    print(f"  every run listed, from plugin start     {result['listed']:8.2f} s")
    print(f"  warm, no read due ({repeats:3d} requests)       {_summary(result['cached'])}")
    print(f"  warm, read due    ({repeats:3d} requests)       {_summary(result['due'])}")
    print(f"  answer size                             {result['gzip_bytes'] / 1024:8.1f} KiB gzipped "
          f"({result['json_bytes'] / 1024:.0f} KiB JSON)")


def through_tensorboard(logdir: Path, n: int, repeats: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from tbserver import TensorBoardServer

    started = time.perf_counter()
    with TensorBoardServer(logdir, reload_interval=30.0, env={**os.environ, "PYTHONPATH": str(REPO)}) as tb:
        up = time.perf_counter() - started

        def get() -> tuple[float, dict]:
            t = time.perf_counter()
            status, headers, body = tb.get("data/plugin/gradients/runs")
            seconds = time.perf_counter() - t
            assert status == 200, body[:300]
            raw = gzip.decompress(body) if headers.get("Content-Encoding") == "gzip" else body
            return seconds, json.loads(raw)

        _, doc = get()
        while doc["loading"] or len(doc["runs"]) < n:
            time.sleep(0.05)
            _, doc = get()
        listed = time.perf_counter() - started
        check(doc["runs"], n)
        due = []
        for _ in range(repeats):
            time.sleep(1.05)
            due.append(get()[0])
    print(f"\nreal tensorboard process, {n} runs")
    print(f"  tensorboard answering HTTP              {up:8.2f} s")
    print(f"  every run listed, from process start    {listed:8.2f} s  ({listed - up:.2f} s after HTTP)")
    print(f"  warm, read due    ({repeats:3d} requests)       {_summary(due)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--logdir", type=Path, default=None, help="where the runs are written (kept and reused)")
    parser.add_argument("--repeats", type=int, default=20, help="warm requests timed per case")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip the real tensorboard process")
    args = parser.parse_args()
    logdir = args.logdir or Path(tempfile.gettempdir()) / f"tb_gradient_bench_runs_{args.runs}"
    marker = logdir / f".complete-{args.runs}"
    if marker.exists():
        print(f"reusing {logdir} ({args.runs} runs)")
    else:
        if logdir.exists() and any(logdir.iterdir()):
            sys.exit(f"{logdir} holds other data; pass an empty or new --logdir")
        began = time.perf_counter()
        write_many_runs(logdir, args.runs)
        size = sum(f.stat().st_size for f in logdir.rglob("*tfevents*"))
        print(f"wrote {args.runs} runs ({size / 1e6:.1f} MB) in {time.perf_counter() - began:.1f} s")
        marker.touch()
    in_process(logdir, args.runs, args.repeats)
    if not args.no_tensorboard:
        through_tensorboard(logdir, args.runs, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
