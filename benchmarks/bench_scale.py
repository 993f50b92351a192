"""The Gradients tab on logdirs of any size: memory, start-up and latency of a real ``tensorboard`` with the plugin's
persistent cache (docs/CACHE.md), cold (empty cache) and on a second start.

Logdirs (written once with GradientWriter, reused): 224 layers x 20,000 steps x 5 metrics per run,

* ``runs10``: 10 runs (about 1.0 GB of event files),
* ``runs20``: 20 runs (about 2.0 GB; its first 10 runs are the files of ``runs10``, hard-linked),
* ``many200``: 200 runs of about 10 MB (2,000 steps each).

Every run holds one planted explosion (a 1000x one-step gradient spike in one layer, then a loss spike) at its own
step and layer. For each logdir the benchmark starts ``tensorboard`` twice on the same, initially empty, cache
directory and reports:

* resident memory of the server and its children (TensorBoard's data server) after ``runs`` listed every run and 4
  runs were opened (``episodes`` and ``heatmap``);
* time until ``runs`` lists every run (from the process start), cold and on the second start;
* ``episodes`` and ``heatmap`` latency: cold (first request of a run in the process) and warm (asked again);
* cache size relative to the event files;
* whether every planted explosion is found, and whether the tab's reports equal the offline auditor's (no cache).

One more start with the cache off (``--gradients_cache_dir off``: every run read and kept in memory, as before the
cache) gives the reference for the cold numbers, measured in the same run of the benchmark.

    python benchmarks/bench_scale.py                    # full size (3.0 GB of event files, about 3 GB of cache)
    python benchmarks/bench_scale.py --scale 0.1        # steps x 0.1: a quick run
    python benchmarks/bench_scale.py --root /big/disk --only runs10,runs20
    python benchmarks/bench_scale.py --hide-tensorflow  # TensorBoard as the plugin's own install gets it (no TF)

TensorFlow is not a dependency of the plugin. Where it is installed, TensorBoard imports it at start-up (about 10 s
and 600 MB on this benchmark's machine) whatever the plugin does; ``--hide-tensorflow`` makes ``import tensorflow``
fail in the servers started, so that TensorBoard runs on its own stub, as in an environment without TensorFlow.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from tb_gradient_plugin.writer import GradientWriter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from tbserver import TensorBoardServer  # noqa: E402 - the tests' server harness

LAYERS = 224
STEPS = 20_000
MANY_STEPS = 2_000
OPENED = 4
#: Environment of every server started (see --hide-tensorflow).
SERVER_ENV: dict[str, str] | None = None
GOALS = {"rss_mb": 500, "growth_mb": 50, "second_start_s": 3.0, "warm_heatmap_ms": 300, "cache_ratio": 1.2}


# ------------------------------------------------------------------------------------------------------- logdirs


def planted(run: int, runs: int, steps: int) -> tuple[int, int]:
    """(step, layer) of run ``run``'s planted explosion."""
    return int(steps * (0.3 + 0.5 * run / max(1, runs))), (run * 37) % LAYERS


def write_run(run_dir: Path, steps: int, spike: tuple[int, int], seed: int) -> None:
    names = [f"model.layers.{i // 4}.{('q', 'k', 'v', 'mlp')[i % 4]}" for i in range(LAYERS)]
    rng = np.random.default_rng(seed)
    noise = rng.lognormal(0.0, 0.05, size=(min(steps, 4096), LAYERS)).astype(np.float32)
    param = np.full(LAYERS, 10.0, dtype=np.float32)
    zeros = np.zeros(LAYERS, dtype=np.float32)
    with GradientWriter(run_dir) as w:
        for s in range(steps):
            g = noise[(s * 7 + seed) % len(noise)]
            if s == spike[0]:
                g = g.copy()
                g[spike[1]] *= 1000.0
            loss = 1.0 + 1e-3 * (s % 7) + (30.0 if s == spike[0] + 2 else 0.0)
            w.write(s, names, grad_norm=g, param_norm=param, update_norm=g * 1e-3, grad_max_abs=g * 0.1,
                    nonfinite_count=zeros, loss=loss, total_grad_norm=float(np.sqrt(np.sum(g.astype(np.float64) ** 2))))


def ensure_logdirs(root: Path, scale: float, only: list[str]) -> dict[str, tuple[Path, int, int]]:
    """name -> (logdir, runs its spikes were planted for, steps per run); written once per scale (a marker file says
    it is complete). ``runs10`` holds the first 10 runs of ``runs20``, planted as there."""
    steps, many_steps = max(200, int(STEPS * scale)), max(100, int(MANY_STEPS * scale))
    base = root / f"scale-{scale:g}"
    big = base / "runs20"
    out: dict[str, tuple[Path, int, int]] = {}
    if {"runs10", "runs20"} & set(only):
        if not (big / ".complete").exists():
            t0 = time.perf_counter()
            for r in range(20):
                if not (big / f"run{r:02d}").exists():
                    write_run(big / f"run{r:02d}", steps, planted(r, 20, steps), seed=r)
            (big / ".complete").touch()
            print(f"wrote runs20 in {time.perf_counter() - t0:.0f} s", flush=True)
        ten = base / "runs10"
        if not (ten / ".complete").exists():
            for r in range(10):
                for f in (big / f"run{r:02d}").iterdir():
                    (ten / f"run{r:02d}").mkdir(parents=True, exist_ok=True)
                    os.link(f, ten / f"run{r:02d}" / f.name)
            (ten / ".complete").touch()
        out["runs10"], out["runs20"] = (ten, 20, steps), (big, 20, steps)
    if "many200" in only:
        many = base / "many200"
        if not (many / ".complete").exists():
            t0 = time.perf_counter()
            for r in range(200):
                if not (many / f"run{r:03d}").exists():
                    write_run(many / f"run{r:03d}", many_steps, planted(r, 200, many_steps), seed=r)
            (many / ".complete").touch()
            print(f"wrote many200 in {time.perf_counter() - t0:.0f} s", flush=True)
        out["many200"] = (many, 200, many_steps)
    return {name: out[name] for name in only if name in out}


def run_names(logdir: Path) -> list[str]:
    return sorted(p.name for p in logdir.iterdir() if p.is_dir())


# ---------------------------------------------------------------------------------------------------- measuring


def tree_rss(pid: int) -> tuple[int, int]:
    """Resident bytes of a process and all its descendants (Linux /proc): (the process, all together)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, own, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        total += rss
        own += rss if p == pid else 0
    return own, total


def fetch(tb: TensorBoardServer, route: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(tb.url + "data/plugin/gradients/" + route, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return json.loads(body), time.perf_counter() - t0


def one_start(logdir: Path, cache_dir: Path | str, names: list[str]) -> dict:
    """Start tensorboard, wait until every run is listed, open OPENED runs; the numbers of this start."""
    t_spawn = time.perf_counter()
    with TensorBoardServer(logdir, extra_args=["--gradients_cache_dir", str(cache_dir)], reload_interval=5.0,
                           timeout=600, env=SERVER_ENV) as tb:
        t_up = time.perf_counter()
        while True:
            doc, _ = fetch(tb, "runs")
            listed = [r for r in doc["runs"] if r["run"] in set(names)]
            if len(listed) == len(names) and not doc.get("loading"):
                break
            time.sleep(0.05)
        t_listed = time.perf_counter()
        rss_listed = tree_rss(tb._proc.pid)[1]
        lat: dict[str, list[float]] = {"episodes_cold": [], "heatmap_cold": [], "episodes_warm": [],
                                       "heatmap_warm": []}
        for name in names[:OPENED]:
            for route, query in (("episodes", f"episodes?run={name}"),
                                 ("heatmap", f"heatmap?run={name}&metric=grad_norm&bins=1000")):
                _, cold = fetch(tb, query)
                warm = min(fetch(tb, query)[1] for _ in range(3))
                lat[f"{route}_cold"].append(cold)
                lat[f"{route}_warm"].append(warm)
        server_rss, rss_opened = tree_rss(tb._proc.pid)
        reports = {name: fetch(tb, f"episodes?run={name}")[0] for name in names}
    return {"list_s": t_listed - t_spawn, "list_after_up_s": t_listed - t_up, "rss_listed": rss_listed,
            "rss_opened": rss_opened, "rss_opened_server": server_rss,
            "latency": {k: float(np.median(v)) for k, v in lat.items()},
            "latency_max": {k: float(np.max(v)) for k, v in lat.items()}, "reports": reports,
            "episodes": {r["run"]: r["episodes"] for r in listed}}


def audit(logdir: Path) -> dict[str, dict]:
    """The offline auditor's run objects (no cache involved)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "tb_gradient_plugin", "audit", "--json", "--fail-on", "never",
                          str(logdir)], env=env, capture_output=True, text=True, timeout=3600, check=True)
    return {r["run"]: r for r in json.loads(out.stdout)["runs"]}


def found_planted(report: dict, step: int) -> bool:
    return any(e["start_step"] <= step <= e["end_step"] for e in report["episodes"])


def same_report(tab: dict, auditor: dict) -> bool:
    """The tab's episodes route says what the auditor says; it lists an episode's batches nearest the peak only, with
    their total (the batches route pages the rest)."""
    tab = {**tab, "episodes": [dict(e) for e in tab.get("episodes", [])]}
    for shown, full in zip(tab["episodes"], auditor.get("episodes", []), strict=False):
        if "batches_total" in shown:
            every = full.get("batches", [])
            nearest = every[len(every) - len(shown["batches"]):]
            if shown.pop("batches_total") != len(every) or shown["batches"] != nearest:
                return False
            shown["batches"] = every
    return all(tab[key] == auditor[key] for key in tab if key in auditor)


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def baseline(work: Path) -> dict:
    """The same TensorBoard on an empty logdir: its own start-up time and memory, which no plugin can lower."""
    empty = work / "empty-logdir"
    empty.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with TensorBoardServer(empty, extra_args=["--gradients_cache_dir", str(work / "cache-empty")], timeout=600,
                           env=SERVER_ENV) as tb:
        fetch(tb, "runs")
        up = time.perf_counter() - t0
        own, total = tree_rss(tb._proc.pid)
    print(f"TensorBoard alone (empty logdir): runs answered {up:.1f} s after the start, resident {total / 2**20:.0f} MB"
          f" ({own / 2**20:.0f} MB the server process)", flush=True)
    return {"up_s": up, "rss": total, "rss_server": own}


def hide_tensorflow(work: Path) -> dict[str, str]:
    """An environment in which ``import tensorflow`` raises ImportError (a package of that name that says so)."""
    shadow = work / "no-tensorflow" / "tensorflow"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text('raise ImportError("TensorFlow is hidden from this benchmark\'s servers")\n')
    path = os.pathsep.join(p for p in (str(shadow.parent), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def bench(name: str, logdir: Path, runs: int, steps: int, work: Path) -> dict:
    names = run_names(logdir)
    cache_dir = work / f"cache-{name}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    events = sum(f.stat().st_size for f in logdir.rglob("*tfevents*"))
    print(f"\n{name}: {len(names)} runs x {steps} steps, {events / 1e9:.2f} GB of event files", flush=True)
    nocache = one_start(logdir, "off", names)  # as before the cache: everything read and kept in memory
    cold = one_start(logdir, cache_dir, names)
    second = one_start(logdir, cache_dir, names)
    cache_bytes = size_of(cache_dir)
    reference = audit(logdir)
    found = sum(found_planted(second["reports"][n], planted(int(n[3:]), runs, steps)[0]) for n in names)
    same = all(same_report(start["reports"][n], reference[n]) for start in (nocache, cold, second) for n in names)
    result = {"name": name, "runs": len(names), "steps": steps, "event_bytes": events, "cache_bytes": cache_bytes,
              "cold": {k: v for k, v in cold.items() if k not in ("reports", "episodes")},
              "second": {k: v for k, v in second.items() if k not in ("reports", "episodes")},
              "nocache": {k: v for k, v in nocache.items() if k not in ("reports", "episodes")},
              "planted_found": found, "same_as_auditor": same}
    print_result(result)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return result


def print_result(r: dict) -> None:
    mb = 2**20
    c, s = r["cold"], r["second"]
    print(f"  resident memory (server + children), runs listed / {OPENED} runs opened:"
          f" cold {c['rss_listed'] / mb:.0f} / {c['rss_opened'] / mb:.0f} MB,"
          f" second start {s['rss_listed'] / mb:.0f} / {s['rss_opened'] / mb:.0f} MB  (goal <= {GOALS['rss_mb']} MB);"
          f" the server process alone {c['rss_opened_server'] / mb:.0f} / {s['rss_opened_server'] / mb:.0f} MB")
    print(f"  every run listed after: cold {c['list_s']:.1f} s (server up + {c['list_after_up_s']:.1f} s),"
          f" second start {s['list_s']:.1f} s (up + {s['list_after_up_s']:.1f} s)"
          f"  (goal <= {GOALS['second_start_s']} s)")
    n = r["nocache"]
    print(f"  without the cache (--gradients_cache_dir off): resident {n['rss_listed'] / mb:.0f} /"
          f" {n['rss_opened'] / mb:.0f} MB, every run listed after {n['list_s']:.1f} s"
          f" (server up + {n['list_after_up_s']:.1f} s); cold cache / no cache, after the server is up:"
          f" {c['list_after_up_s'] / max(n['list_after_up_s'], 1e-9):.2f}x")
    for start, label in ((n, "no cache"), (c, "cold cache"), (s, "second start")):
        lat, top = start["latency"], start["latency_max"]
        print(f"  {label}: episodes first {lat['episodes_cold'] * 1e3:.0f} ms (max {top['episodes_cold'] * 1e3:.0f}),"
              f" again {lat['episodes_warm'] * 1e3:.0f} ms; heatmap first {lat['heatmap_cold'] * 1e3:.0f} ms"
              f" (max {top['heatmap_cold'] * 1e3:.0f}), again {lat['heatmap_warm'] * 1e3:.0f} ms")
    print(f"  cache {r['cache_bytes'] / 1e9:.2f} GB = {r['cache_bytes'] / r['event_bytes']:.2f}x the event files"
          f" (goal <= {GOALS['cache_ratio']}x)")
    print(f"  planted explosions found: {r['planted_found']} of {r['runs']}; reports equal the auditor's (no cache):"
          f" {r['same_as_auditor']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "tb-gradient-bench-scale",
                        help="where the logdirs are written (reused) and the caches are made")
    parser.add_argument("--scale", type=float, default=1.0, help="steps per run x this (0.1: a quick run)")
    parser.add_argument("--only", default="runs10,runs20,many200", help="comma-separated logdirs to measure")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--hide-tensorflow", action="store_true",
                        help="start TensorBoard where `import tensorflow` fails (its stub, as without TensorFlow)")
    args = parser.parse_args()
    if args.hide_tensorflow:
        global SERVER_ENV
        SERVER_ENV = hide_tensorflow(args.root)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    logdirs = ensure_logdirs(args.root, args.scale, only)
    alone = baseline(args.root)
    results = [bench(name, path, runs, steps, args.root) for name, (path, runs, steps) in logdirs.items()]
    for r in results:
        above = (r["second"]["rss_opened"] - alone["rss"]) / 2**20
        print(f"{r['name']}: above TensorBoard alone, second start: {above:+.0f} MB resident, every run listed"
              f" {r['second']['list_s'] - alone['up_s']:+.1f} s later")
    by_name = {r["name"]: r for r in results}
    if "runs10" in by_name and "runs20" in by_name:
        growth = by_name["runs20"]["second"]["rss_opened"] - by_name["runs10"]["second"]["rss_opened"]
        growth_cold = by_name["runs20"]["cold"]["rss_opened"] - by_name["runs10"]["cold"]["rss_opened"]
        print(f"\nmemory growth from runs10 to runs20: second start {growth / 2**20:+.0f} MB, cold"
              f" {growth_cold / 2**20:+.0f} MB (goal <= {GOALS['growth_mb']} MB)")
    if args.json:
        args.json.write_text(json.dumps({"tensorboard_alone": alone, "logdirs": results}, indent=1))
    ok = all(r["planted_found"] == r["runs"] and r["same_as_auditor"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
