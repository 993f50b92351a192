"""The offline auditor, ``tb-gradient``: every run under one or more logdirs, judged without a server.

``tb-gradient audit PATH...`` prints a table per run (or ``--json``, or an ``--html`` report) and exits with a code a CI
job can act on; ``tb-gradient compare RUN_A RUN_B`` says which of two runs exploded and how their per-layer norms and
update ratios differ. The auditor reads runs through the same run store and detector as the TensorBoard plugin, so
both report the same episodes, to the step. Runs are read one by one (in worker processes when there are many), and
each worker hands back only the report and a small chart summary: a 10 GB logdir never sits in memory at once.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from .detect import DetectorConfig, detect
from .html_report import finding_name, layer_note, severity_text
from .reader import is_remote
from .run_report import failed_report, report_json
from .runs import RunData, find_runs, load_run
from .types import fails_explosion

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
#: Episode kinds that fail each ``--fail-on`` level ("any" also fails on loss spikes).
#: Worker processes are started only for this many runs and (unless ``--workers`` is given) this many bytes of event
#: files: below that, reading in this process is faster than starting workers.
PARALLEL_MIN_RUNS = 4
PARALLEL_MIN_BYTES = 32 * 1024 * 1024


class UsageError(Exception):
    """Bad input the user can fix (missing path, no runs): exit code 2 with this message."""


# ----------------------------------------------------------------------------------------------------- auditing


def audit_run(name: str, path: str, *, chart: bool = False, config: DetectorConfig | None = None) -> dict:
    """Read and judge one run. Returns a picklable result: ``report`` (the JSON run object) plus facts for display.

    Damage is not an error: what is intact is audited and the damage is listed in the report's warnings.
    """
    try:
        run = load_run(path, name)
    except Exception as exc:  # noqa: BLE001 - an unreadable run is reported, the others are still audited
        report = report_json(failed_report(name, "unknown", f"unreadable: {type(exc).__name__}: {exc}"))
        return {"report": report, "layers": 0, "events": 0, "values": 0, "bytes": 0, "unknown_tags": [],
                "chart": None}
    try:
        report = report_json(detect(run, config), run.warnings)
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


def _audit_task(args: tuple[str, str, bool]) -> dict:
    name, path, chart = args
    return audit_run(name, path, chart=chart)


def collect_runs(paths: Sequence[str], pattern: str | None = None) -> list[tuple[str, str]]:
    """(display name, run directory) for every run under ``paths``, filtered by the ``--run`` glob.

    With several paths a run's name starts with the path it was found under, so names stay unique.
    """
    targets: list[tuple[str, str]] = []
    for path in paths:
        try:
            runs = find_runs(path)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from exc
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
        for name, run_dir in runs:
            shown = name if len(paths) == 1 else (path if name == "." else f"{path.rstrip('/')}/{name}")
            if pattern is None or fnmatch.fnmatchcase(shown, pattern) or fnmatch.fnmatchcase(name, pattern):
                targets.append((shown, run_dir))
    return targets


def audit_runs(targets: Sequence[tuple[str, str]], *, chart: bool = False, workers: int | None = None,
               on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Audit every target, in parallel processes when there are many; results in the order of ``targets``."""
    if workers is None:
        big = _event_bytes(targets, PARALLEL_MIN_BYTES) >= PARALLEL_MIN_BYTES
        workers = min(len(targets), os.cpu_count() or 1, 8) if big else 1
    results: list[dict | None] = [None] * len(targets)
    if workers <= 1 or len(targets) < PARALLEL_MIN_RUNS:
        for i, (name, path) in enumerate(targets):
            results[i] = audit_run(name, path, chart=chart)
            if on_done:
                on_done(results[i])
    else:
        # "spawn": forking a process that runs the progress bar's thread could copy a held lock into the workers
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_audit_task, (name, path, chart)): i for i, (name, path) in enumerate(targets)}
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
    runs = []
    for r in results:
        obj = dict(r["report"])
        obj["layers"] = r["layers"]
        obj["unknown_tags"] = list(r["unknown_tags"])
        runs.append(obj)
    failed = failing(results, fail_on)
    return {"version": 1, "fail_on": fail_on, "failed": bool(failed),
            "failed_runs": [r["report"]["run"] for r in failed], "runs": runs}


# ------------------------------------------------------------------------------------------------------ display


def _ratio(x: float | None) -> str:
    return "non-finite" if x is None else f"{x:.3g}×"


def _print_tables(results: Sequence[dict], console) -> None:
    from rich.table import Table

    summary = Table(title="Gradient audit", title_justify="left")
    longest = max((len(r["report"]["run"]) for r in results), default=3)
    summary.add_column("run", overflow="fold", min_width=min(24, longest))
    for col in ("source", "steps", "layers"):
        summary.add_column(col, no_wrap=True)
    summary.add_column("episodes", overflow="fold")
    summary.add_column("loss spikes", no_wrap=True)
    summary.add_column("transient spikes", no_wrap=True)
    for r in results:
        rep = r["report"]
        kinds = sorted({e["kind"] for e in rep["episodes"]})
        bad = any(fails_explosion(e) for e in rep["episodes"])
        episodes = f"[bold red]{len(rep['episodes'])} {', '.join(kinds)}[/]" if bad else \
            (f"{len(rep['episodes'])} {', '.join(kinds)}" if kinds else "[green]0[/]")
        spikes = rep.get("spikes") or {}
        transient = f"{spikes['count']} ({spikes['per_10k_steps'] / 10:.2g}/1k)" if spikes.get("count") else "0"
        summary.add_row(_esc(rep["run"]), rep["source"], str(rep["steps"]), str(r["layers"]), episodes,
                        str(len(rep["loss_spikes"])), transient)
    console.print(summary)
    for r in results:
        rep = r["report"]
        if rep.get("spikes", {}).get("count"):
            console.print(_esc(f"{rep['run']}: {rep['spikes']['summary']}"), soft_wrap=True)
        amp = rep.get("amp") or {}
        if amp.get("skipped") or amp.get("collapsed"):
            console.print(_esc(f"{rep['run']}: {amp['summary']}"), soft_wrap=True)
        if not rep["episodes"]:
            continue
        table = Table(title=f"{_esc(rep['run'])} ({rep['source']})", title_justify="left", show_lines=True)
        for col in ("kind", "steps", "peak", "severity", "offending layers (peak / baseline)", "loss spike"):
            table.add_column(col, overflow="fold")
        for e in rep["episodes"]:
            layers = "\n".join(_esc(f"{i + 1}. {finding_name(f)} [{f.get('metric', '')}] {layer_note(e, f)}")
                               for i, f in enumerate(e["layers"][:3]))
            if len(e["layers"]) > 3:
                layers += f"\n(+{len(e['layers']) - 3} more)"
            spike = "—" if e["loss_spike_step"] is None else \
                f"step {e['loss_spike_step']} ({e['loss_spike_step'] - e['start_step']} steps after start)"
            table.add_row(e["kind"], f"{e['start_step']}–{e['end_step']}", str(e["peak_step"]),
                          severity_text(e), layers, spike)
        console.print(table)
        # the same advice for several episodes (e.g. every AMP overflow skip) is printed once, with where it applies
        advice: dict[str, list[str]] = {}
        for e in rep["episodes"]:
            for line in e["advice"]:
                advice.setdefault(line, []).append(f"{e['kind']} at {e['start_step']}")
        for line, where in advice.items():
            label = where[0] if len(where) == 1 else f"{where[0]} and {len(where) - 1} more"
            console.print(_esc(f"  • [{label}] {line}"), highlight=False)


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _print_warnings(results: Sequence[dict]) -> None:
    for r in results:
        for w in r["report"]["warnings"]:
            print(f"tb-gradient: warning: {r['report']['run']}: {w}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------- audit


def _cmd_audit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    targets = collect_runs(args.paths, args.run)
    if not targets:
        where = ", ".join(args.paths)
        raise UsageError(f"no runs (directories with event files) under {where}"
                         + (f" matching --run {args.run!r}" if args.run else ""))
    err = Console(stderr=True)
    progress = Progress(TextColumn("reading runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    with progress:
        task = progress.add_task("audit", total=len(targets))
        results = audit_runs(targets, chart=bool(args.html), workers=args.workers,
                             on_done=lambda _r: progress.advance(task))
    _print_warnings(results)
    if not any(r["events"] for r in results):
        raise UsageError("nothing could be read: no intact event in any run")
    errors = [r for r in results if r.get("error")]
    for r in errors:
        print(f"tb-gradient: internal error in run {r['report']['run']}:\n{r['error']}", file=sys.stderr)
    if args.html:
        from .html_report import render

        try:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(render(results, title=f"Gradient audit of {', '.join(args.paths)}"))
        except OSError as exc:
            raise UsageError(f"cannot write the HTML report {args.html}: {exc}") from exc
    if args.json:
        json.dump(audit_json(results, args.fail_on), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        _print_tables(results, Console(highlight=False))
    if errors:
        return EXIT_ERROR  # an incomplete audit is never reported as clean
    if args.fail_on != "never" and failing(results, args.fail_on):
        return EXIT_FINDINGS
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------- compare


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
        rep = report_json(detect(run), run.warnings)
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


def _cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    runs = []
    for path in (args.run_a, args.run_b):
        try:
            runs.append(load_run(path, path))
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from exc
    if not all(r.events for r in runs):
        raise UsageError("nothing could be read from " + " and ".join(r.name for r in runs if not r.events))
    result = compare_runs(runs[0], runs[1], top=args.top)
    for key in ("a", "b"):
        for w in result[key]["warnings"]:
            print(f"tb-gradient: warning: {result[key]['run']}: {w}", file=sys.stderr)
    if args.json:
        json.dump(result, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
        return EXIT_OK
    console = Console(highlight=False)
    console.print(_esc(result["verdict"]))
    table = Table(title=f"Per-layer difference, B = {_esc(args.run_b)} relative to A = {_esc(args.run_a)}",
                  title_justify="left")
    for col in ("layer", "grad norm median A → B", "grad norm max A → B", "update ratio median A → B",
                "update ratio max A → B"):
        table.add_column(col, overflow="fold")
    for e in result["layers"]:
        cells = [_esc(e["name"])]
        for metric in ("grad_norm", "update_ratio"):
            m = e.get(metric)
            for stat in ("median", "max"):
                cells.append("—" if m is None else
                             f"{_g(m['a_' + stat])} → {_g(m['b_' + stat])} ({_ratio(m[stat + '_ratio'])})")
        table.add_row(*cells)
    console.print(table)
    if result["only_a"] or result["only_b"]:
        console.print(f"layers only in A: {len(result['only_a'])}, only in B: {len(result['only_b'])}")
    return EXIT_OK


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tb-gradient", description="Audit TensorBoard logdirs for exploding "
                                     "gradients, offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser("audit", help="audit every run under one or more logdirs",
                           description="Exit codes: 0 nothing found (or --fail-on never), 1 findings matching "
                           "--fail-on, 2 usage error or unreadable input.")
    audit.add_argument("paths", nargs="+", metavar="PATH", help="logdir (local path or fsspec URL)")
    audit.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    audit.add_argument("--html", metavar="REPORT.html", help="also write a self-contained HTML report")
    audit.add_argument("--fail-on", choices=("never", "explosion", "nonfinite", "any"), default="explosion",
                       help="which findings make the exit code 1 (default: explosion, i.e. explosion or nonfinite "
                       "episodes; any: any episode or loss spike)")
    audit.add_argument("--run", metavar="GLOB", help="only runs whose name matches this glob")
    audit.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    compare = sub.add_parser("compare", help="compare two runs (e.g. with and without a fix)")
    compare.add_argument("run_a", metavar="RUN_A", help="run directory")
    compare.add_argument("run_b", metavar="RUN_B", help="run directory")
    compare.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    compare.add_argument("--top", type=int, default=20, help="layers listed (largest differences first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 clean, 1 findings, 2 usage error or unreadable input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "audit":
            return _cmd_audit(args)
        return _cmd_compare(args)
    except UsageError as exc:
        print(f"tb-gradient: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # output piped into `head`: not an error of the audit
        sys.stderr.close()
        return EXIT_OK
    except Exception:  # noqa: BLE001 - a crash must never read as exit 1 ("findings") in CI
        traceback.print_exc()
        print("tb-gradient: error: the audit failed (traceback above)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
