"""The offline auditor: every run under one or more logdirs, judged without a server.

The auditor reads runs through the same run store and detector as the TensorBoard plugin, so both report the same
episodes, to the step. Runs are read one by one (in worker processes when there are many), and each worker hands back
only the report and a small chart summary: a 10 GB logdir never sits in memory at once. On a Dask cluster the same
per-run task runs on its workers (:mod:`.fleet`). The command line lives in :mod:`.cli`, the notebook API in
:mod:`.notebook`.
"""

from __future__ import annotations

import fnmatch
import math
import multiprocessing
import os
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from .cache import RunCache
from .detect import DetectorConfig, detect
from .reader import is_remote
from .remote import RemoteLogdirError
from .run_report import failed_report, report_json
from .runs import RunData, find_runs, load_run
from .types import fails_explosion

#: Worker processes are started only for this many runs and (unless ``workers`` is given) this many bytes of event
#: files: below that, reading in this process is faster than starting workers.
PARALLEL_MIN_RUNS = 4
PARALLEL_MIN_BYTES = 32 * 1024 * 1024


class UsageError(Exception):
    """Bad input the user can fix (missing path, no runs): exit code 2 with this message."""


def run_cache(path: str, cache_dir: str | None = None) -> RunCache | None:
    """The run cache an audit of ``path`` reads through (docs/CACHE.md): by default only a remote logdir's runs are
    cached (in the user's cache directory, or ``TB_GRADIENT_CACHE_DIR``), so that auditing a bucket again downloads
    only what is new, while a local logdir is read faster than a cache entry is written. ``cache_dir``: that
    directory for every logdir; ``"off"``: no cache."""
    if cache_dir is None and not is_remote(path):
        return None
    return RunCache.open(cache_dir)


def audit_run(name: str, path: str, *, chart: bool = False, config: DetectorConfig | None = None,
              cache_dir: str | None = None) -> dict:
    """Read and judge one run. Returns a picklable result: ``report`` (the JSON run object) plus facts for display.

    Damage is not an error: what is intact is audited and the damage is listed in the report's warnings.
    ``cache_dir``: see :func:`run_cache`.
    """
    try:
        run = load_run(path, name, cache=run_cache(path, cache_dir))
    except Exception as exc:  # noqa: BLE001 - an unreadable run is reported, the others are still audited
        report = report_json(failed_report(name, "unknown", f"unreadable: {type(exc).__name__}: {exc}"))
        return {"report": report, "layers": 0, "events": 0, "values": 0, "bytes": 0, "unknown_tags": [],
                "chart": None}
    try:
        report = report_json(detect(run, config), run.warnings, run)
        result = {"report": report, "layers": len(run.layers), "events": run.events, "values": run.num_values,
                  "bytes": run.bytes_read, "unknown_tags": run.unknown_tags, "chart": None}
        if chart:
            from .html_report import chart_data

            result["chart"] = chart_data(run, report)
    except Exception as exc:  # noqa: BLE001 - one run's failure must not end the audit of the others
        why = f"could not be audited: {type(exc).__name__}: {exc}"
        report = report_json(failed_report(name, run.source, why), run.warnings)
        return {"report": report, "layers": len(run.layers), "events": run.events, "values": 0, "bytes": 0,
                "unknown_tags": run.unknown_tags, "chart": None, "error": traceback.format_exc()}
    return result


def _audit_task(args: tuple[str, str, bool, str | None]) -> dict:
    name, path, chart, cache_dir = args
    return audit_run(name, path, chart=chart, cache_dir=cache_dir)


def collect_runs(paths: Sequence[str], pattern: str | None = None) -> list[tuple[str, str]]:
    """(display name, run directory) for every run under ``paths``, filtered by the ``--run`` glob.

    With several paths a run's name starts with the path it was found under, so names stay unique.
    """
    targets: list[tuple[str, str]] = []
    for path in paths:
        try:
            runs = find_runs(path)
        except (FileNotFoundError, RemoteLogdirError) as exc:  # their message names the path
            raise UsageError(str(exc)) from exc
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
        for name, run_dir in runs:
            shown = name if len(paths) == 1 else (path if name == "." else f"{path.rstrip('/')}/{name}")
            if pattern is None or fnmatch.fnmatchcase(shown, pattern) or fnmatch.fnmatchcase(name, pattern):
                targets.append((shown, run_dir))
    return targets


def audit_runs(targets: Sequence[tuple[str, str]], *, chart: bool = False, workers: int | None = None,
               on_done: Callable[[dict], None] | None = None, scheduler: str | None = None,
               cache_dir: str | None = None) -> list[dict]:
    """Audit every target, in parallel processes when there are many, or on a Dask cluster when ``scheduler`` is its
    address; results in the order of ``targets``. ``cache_dir``: see :func:`run_cache` (on a cluster, each worker's
    own disk)."""
    if scheduler is not None:
        from .fleet import audit_on_cluster

        # a worker's working directory is its own: it gets absolute paths (the same on a shared filesystem)
        tasks = [(name, path if is_remote(path) else os.path.abspath(path), chart, cache_dir)
                 for name, path in targets]
        results = audit_on_cluster(scheduler, tasks, _audit_task, on_done)
        for i, r in enumerate(results):
            r["index"] = i
        return results
    if workers is None:
        big = _event_bytes(targets, PARALLEL_MIN_BYTES) >= PARALLEL_MIN_BYTES
        workers = min(len(targets), os.cpu_count() or 1, 8) if big else 1
    results: list[dict | None] = [None] * len(targets)
    if workers <= 1 or len(targets) < PARALLEL_MIN_RUNS:
        for i, (name, path) in enumerate(targets):
            results[i] = audit_run(name, path, chart=chart, cache_dir=cache_dir)
            if on_done:
                on_done(results[i])
    else:
        # "spawn": forking a process that runs the progress bar's thread could copy a held lock into the workers
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_audit_task, (name, path, chart, cache_dir)): i
                       for i, (name, path) in enumerate(targets)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if on_done:
                    on_done(results[futures[future]])
    for i, r in enumerate(results):
        r["index"] = i
    return results  # type: ignore[return-value]


def _event_bytes(targets: Sequence[tuple[str, str]], enough: int) -> int:
    """Size of the targets' event files, counted until ``enough`` (remote logdirs count as big: they are slow)."""
    total = 0
    for _, path in targets:
        if is_remote(path):
            return enough
        for directory, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(directory, f)) for f in files if "tfevents" in f)
            if total >= enough:
                return total
    return total


def _fails(episode: dict, fail_on: str) -> bool:
    """``explosion``: what broke training (validation findings and transient spikes never do; a chronic finding
    when the loss suffered); ``nonfinite``: any non-finite finding, a NaN evaluation included."""
    if fail_on == "explosion":
        return fails_explosion(episode)
    return fail_on == "nonfinite" and episode["kind"] == "nonfinite"


def failing(results: Sequence[dict], fail_on: str) -> list[dict]:
    """The results whose findings match ``--fail-on`` (``any``: any episode, loss spike or transient spike)."""
    if fail_on == "any":
        return [r for r in results if r["report"]["episodes"] or r["report"]["loss_spikes"]
                or r["report"].get("spikes", {}).get("count")]
    return [r for r in results if any(_fails(e, fail_on) for e in r["report"]["episodes"])]


def audit_json(results: Sequence[dict], fail_on: str) -> dict:
    """The ``--json`` document (schema in docs/AUDIT_JSON.md)."""
    failed = failing(results, fail_on)
    return {"version": 1, "fail_on": fail_on, "failed": bool(failed),
            "failed_runs": [r["report"]["run"] for r in failed], "runs": [run_json(r) for r in results]}


def run_json(result: dict) -> dict:
    """One run's object of the ``--json`` document."""
    obj = dict(result["report"])
    obj["layers"] = result["layers"]
    obj["unknown_tags"] = list(result["unknown_tags"])
    return obj


def _layer_stats(run: RunData, metric: str) -> dict[str, tuple[float, float]]:
    """Per layer: (median, max) of the finite logged values of one metric."""
    values = run.update_ratio() if metric == "update_ratio" else run.layer_metrics.get(metric)
    if values is None or not len(run.steps):
        return {}
    vals = np.where(run.present & np.isfinite(values), values, np.nan).astype(np.float64)
    logged = ~np.isnan(vals).all(axis=0)
    with np.errstate(all="ignore"):
        med = np.full(len(run.layers), np.nan)
        top = np.full(len(run.layers), np.nan)
        med[logged] = np.nanmedian(vals[:, logged], axis=0)
        top[logged] = np.nanmax(vals[:, logged], axis=0)
    return {name: (float(med[j]), float(top[j])) for j, name in enumerate(run.layers) if logged[j]}


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def compare_runs(a: RunData, b: RunData, top: int = 20) -> dict:
    """Which run exploded, when, and how per-layer gradient norms and update ratios differ (B relative to A)."""
    reports = {}
    for key, run in (("a", a), ("b", b)):
        rep = report_json(detect(run), run.warnings, run)
        bad = [e for e in rep["episodes"] if fails_explosion(e)]
        rep["exploded"] = bool(bad)
        rep["first_episode"] = bad[0] if bad else None
        rep["layers"] = len(run.layers)
        reports[key] = rep
    layers = []
    stats = {m: (_layer_stats(a, m), _layer_stats(b, m)) for m in ("grad_norm", "update_ratio")}
    common = [name for name in a.layers if name in set(b.layers)]
    for name in common:
        entry: dict = {"name": name}
        score = 0.0
        for metric, (sa, sb) in stats.items():
            if name in sa and name in sb:
                (ma, xa), (mb, xb) = sa[name], sb[name]
                with np.errstate(all="ignore"):
                    ratio_max = xb / xa if xa > 0 else math.nan
                    ratio_med = mb / ma if ma > 0 else math.nan
                entry[metric] = {"a_median": _num(ma), "b_median": _num(mb), "a_max": _num(xa), "b_max": _num(xb),
                                 "max_ratio": _num(ratio_max), "median_ratio": _num(ratio_med)}
                for r in (ratio_max, ratio_med):
                    if math.isfinite(r) and r > 0:
                        score = max(score, abs(math.log(r)))
        entry["difference"] = score
        layers.append(entry)
    layers.sort(key=lambda e: -e["difference"])
    return {"a": reports["a"], "b": reports["b"], "verdict": _verdict(reports["a"], reports["b"]),
            "common_layers": len(common), "only_a": [n for n in a.layers if n not in set(b.layers)][:50],
            "only_b": [n for n in b.layers if n not in set(a.layers)][:50], "layers": layers[:top]}


def _verdict(a: dict, b: dict) -> str:
    def one(rep: dict) -> str:
        e = rep["first_episode"]
        if e is None:
            return f"{rep['run']} did not explode"
        layer = f", offending layer {e['layers'][0]['name']}" if e["layers"] else ""
        return f"{rep['run']} exploded ({e['kind']}) at steps {e['start_step']}–{e['end_step']}{layer}"

    return f"{one(a)}; {one(b)}."

