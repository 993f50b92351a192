"""Route latency of the "gradients" plugin on a big run: cold (first load) and warm (cached), through TensorBoard's
own WSGI router, as a browser asks (gzip accepted).

Goal (issue): on a 500-layer x 100k-step run, every route answers in <= 300 ms warm and <= 3 s on first load.

    python benchmarks/bench_plugin.py                       # 500 layers x 100,000 steps (written once, reused)
    python benchmarks/bench_plugin.py --layers 50 --steps 10000 --logdir small_bench_logs
    python benchmarks/bench_plugin.py --cold-runs 5         # more fresh processes for the first-load numbers
    python benchmarks/bench_plugin.py --live-report 3       # only: a live run's report, full vs incremental
    python benchmarks/bench_plugin.py --live-report 3 --live-append 10   # ... after appends of 10 steps

First load is measured in fresh processes (``--cold-runs`` of them, the file in the OS page cache): the wall time
from the start of the process, and from the plugin's construction, until ``episodes`` and then ``heatmap`` have
answered, as the tab asks when it opens. One more process times the phases (read + fold into arrays, detection,
each route's first answer).

The run is written with GradientWriter (grad, param and update norms per layer, loss, total grad norm) with one
single-step spike; the benchmark also checks that the spike is in the heatmap and the episodes, so a fast wrong answer
cannot pass for a fast right one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from argparse import Namespace
from pathlib import Path

import numpy as np
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from tb_gradient_plugin import backend, plugin
from tb_gradient_plugin.writer import GradientWriter

WARM_GOAL_S = 0.300
COLD_GOAL_S = 3.0

#: One cold start: a fresh process constructs the plugin and asks what the tab asks first.
COLD = """
import time
t_start = time.perf_counter()
import json, sys
from argparse import Namespace
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client
from tb_gradient_plugin import plugin
t_plugin = time.perf_counter()
context = base_plugin.TBContext(logdir=sys.argv[1], flags=Namespace(logdir_spec="", reload_interval=5.0))
client = Client(application.TensorBoardWSGI([plugin.GradientsLoader().load(context)]))
answered = {}
for route in ("episodes?run=big", "heatmap?run=big&metric=grad_norm&bins=1000"):
    response = client.get("/data/plugin/gradients/" + route, headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200, response.get_data()[:300]
    answered[route.split("?")[0]] = time.perf_counter()
print(json.dumps({"imports": t_plugin - t_start,
                  **{name: t - t_start for name, t in answered.items()},
                  **{"from_plugin_" + name: t - t_plugin for name, t in answered.items()}}))
"""

#: The same first load, one phase at a time (in one fresh process, without the plugin's background thread).
PHASES = """
import time
t0 = time.perf_counter()
import gzip, json, sys
from tb_gradient_plugin import binning, detect
from tb_gradient_plugin.json_encoding import to_json
from tb_gradient_plugin.runs import RunStore
t1 = time.perf_counter()
store = RunStore(sys.argv[1])
store.refresh()
t2 = time.perf_counter()
data = store.get("big")
t3 = time.perf_counter()
report = detect.detect(data)
t4 = time.perf_counter()
gzip.compress(to_json(report.to_json()), compresslevel=1, mtime=0)
t5 = time.perf_counter()
bins = binning.bin_steps(data.steps, 1000)
pooled, nonfinite = binning.max_pool(data.layer_metrics["grad_norm"], bins, data.present)
t6 = time.perf_counter()
gzip.compress(to_json({"values": pooled.T, "nonfinite": nonfinite.T}), compresslevel=1, mtime=0)
t7 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "read files + fold into arrays": t2 - t1, "assemble RunData": t3 - t2,
                  "detect": t4 - t3, "episodes JSON": t5 - t4, "heatmap max-pool": t6 - t5,
                  "heatmap JSON + gzip": t7 - t6, "MB read": data.bytes_read / 1e6}))
"""


def _child(code: str, logdir: Path) -> dict:
    # a first load: with an empty run cache of its own (docs/CACHE.md), which it fills as it reads
    with tempfile.TemporaryDirectory(prefix="bench-plugin-cache-") as cache_dir:
        env = {**os.environ, "TB_GRADIENT_CACHE_DIR": cache_dir}
        out = subprocess.run([sys.executable, "-c", code, str(logdir)], capture_output=True, text=True, check=True,
                             env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_first_load(logdir: Path, runs: int) -> list[dict]:
    """Time ``runs`` cold starts (after one read of the files, so that they come from the page cache)."""
    for f in (logdir / "big").iterdir():
        with open(f, "rb") as handle:
            while handle.read(1 << 24):
                pass
    return [_child(COLD, logdir) for _ in range(runs)]


def write_run(run_dir: Path, layers: int, steps: int, spike: tuple[int, int], start: int = 0) -> float:
    """Write ``steps`` steps of ``layers`` layers; returns seconds taken."""
    names = [f"model.layers.{i // 4}.{('q', 'k', 'v', 'mlp')[i % 4]}" for i in range(layers)]
    rng = np.random.default_rng(start)
    param = np.full(layers, 10.0, dtype=np.float32)
    noise = rng.lognormal(0.0, 0.05, size=(min(steps, 4096), layers)).astype(np.float32)
    t0 = time.perf_counter()
    with GradientWriter(run_dir) as w:
        for s in range(start, start + steps):
            g = noise[s % len(noise)]
            if s == spike[0]:
                g = g.copy()
                g[spike[1]] *= 1000.0
            w.write(s, names, grad_norm=g, param_norm=param, update_norm=g * 1e-3, loss=1.0 + 1e-3 * (s % 7),
                    total_grad_norm=float(np.sqrt(np.sum(g.astype(np.float64) ** 2))))
    return time.perf_counter() - t0


def ensure_logdir(logdir: Path, layers: int, steps: int, spike: tuple[int, int]) -> None:
    marker = logdir / f".complete-{layers}x{steps}"
    if marker.exists():
        print(f"reusing {logdir} ({layers} layers x {steps} steps)")
        return
    if logdir.exists() and any(logdir.iterdir()):
        sys.exit(f"{logdir} holds other data; pass an empty or new --logdir")
    seconds = write_run(logdir / "big", layers, steps, spike)
    size = sum(f.stat().st_size for f in (logdir / "big").iterdir())
    print(f"wrote {layers} layers x {steps} steps in {seconds:.1f} s ({size / 1e6:.0f} MB)")
    marker.touch()


class Timer:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.rows: list[tuple[str, str, float, int]] = []

    def get(self, route: str, kind: str, **params) -> dict:
        url = "/data/plugin/gradients/" + route + ("?" + urllib.parse.urlencode(params) if params else "")
        t0 = time.perf_counter()
        resp = self.client.get(url, headers={"Accept-Encoding": "gzip"})
        body = resp.get_data()
        seconds = time.perf_counter() - t0
        if resp.status_code != 200:
            raise SystemExit(f"{url} -> {resp.status_code}: {body[:300]!r}")
        if resp.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(body)
        else:
            raw = body
        self.rows.append((kind, url, seconds, len(body)))
        return json.loads(raw)

    def warm(self, route: str, repeats: int = 5, **params) -> None:
        for _ in range(repeats):
            self.get(route, "warm", **params)


def live_report(logdir: Path, layers: int, steps: int, appends: int, size: int = 1000) -> None:
    """A live run's report after each of ``appends`` appends of ``size`` steps, in process CPU time: a full detection
    against the online detector fed only the new steps (docs/CACHE.md), on the same data, alternating which goes
    first; and what catching the online detector up with the run's history costs once."""
    from tb_gradient_plugin import detect
    from tb_gradient_plugin.live_report import LiveDetector
    from tb_gradient_plugin.runs import RunStore

    def cpu(fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        return out, time.process_time() - t0

    started = time.time()
    store = RunStore(str(logdir))
    try:
        store.refresh()
        data = store.get("big")
        _, full = cpu(detect.detect, data)
        live = LiveDetector(data.name, data.source)
        report, catch_up = cpu(live.advance, data)
        assert report is not None and report.to_json() == detect.detect(data).to_json()
        print(f"\nlive report on {layers} layers x {steps} steps (process CPU seconds)")
        print(f"  full detection {full:.2f}; catching an online detector up with the history {catch_up:.2f} "
              f"({catch_up / full:.1f} full detections)")
        rows = []
        for k in range(appends):
            write_run(logdir / "big", layers, size, (-1, 0), start=steps + size * k)
            _, read = cpu(store.refresh)
            data = store.get("big")
            timed = {}
            for name in (("full", "incremental") if k % 2 else ("incremental", "full")):
                timed[name] = cpu(detect.detect if name == "full" else live.advance, data)
            assert timed["incremental"][0].to_json() == timed["full"][0].to_json()
            rows.append((read, timed["full"][1], timed["incremental"][1]))
            print(f"  +{size:,} steps #{k + 1}: read {read:.2f}, full detection {timed['full'][1]:.2f}, "
                  f"incremental {timed['incremental'][1]:.3f} ({timed['full'][1] / timed['incremental'][1]:.1f}x)")
        ratios = sorted(f / i for _, f, i in rows)
        full_med = statistics.median(r + f for r, f, _ in rows)
        inc_med = statistics.median(r + i for r, _, i in rows)
        print(f"  read + report after {size:,} new steps: full median {full_med:.2f}, incremental median "
              f"{inc_med:.2f}; detection alone {statistics.median(ratios):.1f}x faster "
              f"(range {ratios[0]:.1f}-{ratios[-1]:.1f}x)")
    finally:
        for f in (logdir / "big").iterdir():  # drop the appended files so the next benchmark run starts alike
            if f.stat().st_mtime >= started and f.name.startswith("events"):
                os.remove(f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--logdir", type=Path, default=None,
                        help="where the run is written (kept and reused); default: a temporary directory")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh processes timed for the first load")
    parser.add_argument("--live-report", type=int, default=0, metavar="N",
                        help="only time a live run's report (full vs incremental) over N appends of steps")
    parser.add_argument("--live-append", type=int, default=1000, metavar="STEPS",
                        help="steps per append for --live-report (default 1,000)")
    args = parser.parse_args()
    spike = (args.steps * 2 // 3, args.layers // 3)
    logdir = args.logdir or Path(tempfile.gettempdir()) / f"tb_gradient_bench_{args.layers}x{args.steps}"
    ensure_logdir(logdir, args.layers, args.steps, spike)
    if args.live_report:
        live_report(logdir, args.layers, args.steps, args.live_report, args.live_append)
        return 0

    colds = cold_first_load(logdir, max(1, args.cold_runs))
    phases = _child(PHASES, logdir)
    print(f"\nfirst load in a fresh process, {len(colds)} runs (seconds)")
    print(f"{'until':44s} {'best':>7s} {'median':>7s}")
    for key, label in (("imports", "imports done (tensorboard, plugin module)"),
                       ("episodes", "episodes answered, from process start"),
                       ("heatmap", "heatmap answered, from process start"),
                       ("from_plugin_episodes", "episodes answered, from plugin construction"),
                       ("from_plugin_heatmap", "heatmap answered, from plugin construction")):
        times = [c[key] for c in colds]
        print(f"{label:44s} {min(times):7.2f} {statistics.median(times):7.2f}")
    print("\nfirst load by phase, one fresh process (seconds)")
    for label, value in phases.items():
        print(f"  {label:34s} {value:8.2f}")
    cold_goal = statistics.median(c["heatmap"] for c in colds)

    started = time.time()
    t0 = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="bench-plugin-cache-")  # a first load: the run cache starts empty
    flags = Namespace(logdir_spec="", reload_interval=5.0, gradients_cache_dir=cache_dir, gradients_memory_mb=None)
    instance = plugin.GradientsLoader().load(base_plugin.TBContext(logdir=str(logdir), flags=flags))
    timer = Timer(Client(application.TensorBoardWSGI([instance])))
    runs = timer.get("runs", "cold (first load: read logdir + detect)")
    while not runs["runs"]:  # still reading: the run list answers with the runs read so far
        runs = timer.get("runs", "cold (first load: read logdir + detect)")
    load_s = time.perf_counter() - t0
    run = runs["runs"][0]
    assert run["steps"] == args.steps and run["layers"] == args.layers, run
    layer = f"model.layers.{spike[1] // 4}.{('q', 'k', 'v', 'mlp')[spike[1] % 4]}"

    cold = [
        ("episodes", {"run": "big"}),
        ("heatmap", {"run": "big", "metric": "grad_norm", "bins": 1000}),
        ("heatmap", {"run": "big", "metric": "grad_norm", "bins": 2000}),
        ("heatmap", {"run": "big", "metric": "update_ratio", "bins": 1000}),
        ("heatmap", {"run": "big", "metric": "grad_norm", "bins": 1000, "start": spike[0] - 5000,
                     "end": spike[0] + 5000}),
        ("layer", {"run": "big", "layer": layer, "metric": "grad_norm"}),
        ("layer", {"run": "big", "layer": layer, "metric": "grad_norm", "start": spike[0] - 100,
                   "end": spike[0] + 100}),
        ("loss", {"run": "big"}),
    ]
    for route, params in cold:
        doc = timer.get(route, "cold (data loaded, first request)", **params)
        if route == "episodes":
            assert spike[0] in {e["peak_step"] for e in doc["episodes"]}, "spike missing from episodes"
        if route == "heatmap" and params["metric"] == "grad_norm":
            row = np.array(doc["values"][spike[1]], dtype=float)
            b = next(i for i, (s, e) in enumerate(zip(doc["bin_start"], doc["bin_end"], strict=True))
                     if s <= spike[0] <= e)
            assert row[b] > 100 * np.nanmedian(row), "spike missing from heatmap"
    for route, params in [("runs", {})] + cold:
        timer.warm(route, **params)

    # Live: a training job appends 1,000 steps; the next request reads them and recomputes what depends on them.
    write_run(logdir / "big", args.layers, 1000, (-1, 0), start=args.steps)
    time.sleep(backend.REFRESH_SECONDS)
    timer.get("runs", "live (after 1,000 new steps: read + detect)")
    timer.get("heatmap", "live (after 1,000 new steps: read + detect)", run="big", metric="grad_norm", bins=1000)
    for f in (logdir / "big").iterdir():  # drop the appended file so the next benchmark run starts alike
        if f.stat().st_mtime >= started and f.name.startswith("events"):
            os.remove(f)
    shutil.rmtree(cache_dir, ignore_errors=True)

    print(f"\nfirst load (construct plugin -> first /runs answered): {load_s:.2f} s "
          f"(goal <= {COLD_GOAL_S:.0f} s)")
    print(f"{'kind':46s} {'seconds':>8s} {'kB sent':>8s}  route")
    for kind, url, seconds, size in timer.rows:
        if kind != "warm":
            print(f"{kind:46s} {seconds:8.3f} {size / 1e3:8.0f}  {url}")
    warm: dict[str, list[float]] = {}
    for kind, url, seconds, _ in timer.rows:
        if kind == "warm":
            warm.setdefault(url, []).append(seconds)
    worst = 0.0
    for url, times in warm.items():
        med = statistics.median(times)
        worst = max(worst, med)
        print(f"{'warm (median of ' + str(len(times)) + ')':46s} {med:8.3f} {'':8s}  {url}")
    cold_worst = max(s for k, _, s, _ in timer.rows if k.startswith("cold (data"))
    print(f"\nworst warm median: {worst * 1000:.0f} ms (goal <= {WARM_GOAL_S * 1000:.0f} ms): "
          f"{'met' if worst <= WARM_GOAL_S else 'NOT met'}")
    print(f"first load: {load_s:.2f} s, worst first request after load: {cold_worst:.2f} s")
    print(f"fresh process to episodes + heatmap answered: median {cold_goal:.2f} s (goal <= {COLD_GOAL_S:.0f} s): "
          f"{'met' if cold_goal <= COLD_GOAL_S else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
