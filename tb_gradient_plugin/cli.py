"""``tb-gradient``, the auditor's command line.

``tb-gradient audit PATH...`` prints a table per run (or ``--json``, or an ``--html`` report) and exits with a code a CI
job can act on; ``tb-gradient compare RUN_A RUN_B`` says which of two runs exploded and how their per-layer norms and
update ratios differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence

from .auditor import UsageError, audit_json, audit_runs, collect_runs, compare_runs, failing
from .html_report import finding_name, layer_note, severity_text
from .remote import RemoteLogdirError
from .runs import load_run
from .sample_ids import peak_batch_text, skip_list
from .types import fails_explosion
from .wording import relative_step

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def _ratio(x: float | None) -> str:
    return "non-finite" if x is None else f"{x:.3g}×"


def _print_tables(results: Sequence[dict], console) -> None:
    from rich.box import SIMPLE_HEAD
    from rich.table import Table

    # at 80 columns (a pipe, a CI log) only the run name and source wrap, never the counts and kinds
    summary = Table(title="Gradient audit", title_justify="left", box=SIMPLE_HEAD)
    longest = max((len(r["report"]["run"]) for r in results), default=3)
    summary.add_column("run", overflow="fold", min_width=min(16, longest))
    summary.add_column("source", overflow="fold", max_width=18)
    for col in ("steps", "layers"):
        summary.add_column(col, no_wrap=True, justify="right")
    summary.add_column("episodes", min_width=12, overflow="fold")
    summary.add_column("spikes:\nloss /\ntransient", min_width=9)
    for r in results:
        rep = r["report"]
        found = _findings(rep)
        kinds = sorted({e["kind"] for e in found})
        bad = any(fails_explosion(e) for e in found)
        episodes = f"[bold red]{len(found)} {', '.join(kinds)}[/]" if bad else \
            (f"{len(found)} {', '.join(kinds)}" if kinds else "[green]0[/]")
        spikes = rep.get("spikes") or {}
        transient = f"{spikes['count']} ({spikes['per_10k_steps'] / 10:.2g}/1k)" if spikes.get("count") else "0"
        summary.add_row(_esc(rep["run"]), rep["source"], str(rep["steps"]), str(r["layers"]), episodes,
                        f"{len(rep['loss_spikes'])} / {transient}")
    console.print(summary)
    for r in results:
        rep = r["report"]
        if rep.get("spikes", {}).get("count"):
            console.print(_esc(f"{rep['run']}: {rep['spikes']['summary']}"), soft_wrap=True)
        amp = rep.get("amp") or {}
        if amp.get("skipped") or amp.get("collapsed"):
            console.print(_esc(f"{rep['run']}: {amp['summary']}"), soft_wrap=True)
        for e in rep["episodes"]:
            if e.get("growth"):
                console.print(_esc(f"{rep['run']}: {e['growth']['summary']} (a warning: nothing broke yet)"),
                              soft_wrap=True)
        found = _findings(rep)
        if not found:
            continue
        table = Table(title=f"{_esc(rep['run'])} ({rep['source']})", title_justify="left", show_lines=True,
                      box=SIMPLE_HEAD)
        for col in ("kind", "steps", "peak", "severity"):
            table.add_column(col, no_wrap=True)
        table.add_column("offending layers (peak / baseline)", overflow="fold", ratio=3)
        table.add_column("loss spike", ratio=1)
        for e in found:
            layers = "\n".join(_esc(f"{i + 1}. {finding_name(f)} [{f.get('metric', '')}] {layer_note(e, f)}")
                               for i, f in enumerate(e["layers"][:3]))
            if len(e["layers"]) > 3:
                layers += f"\n(+{len(e['layers']) - 3} more)"
            spike = "—" if e["loss_spike_step"] is None else \
                f"step {e['loss_spike_step']} ({relative_step(e['loss_spike_step'] - e['peak_step'])})"
            table.add_row(e["kind"], f"{e['start_step']}–{e['end_step']}", str(e["peak_step"]),
                          severity_text(e), layers, spike)
        console.print(table)
        # the same advice for several episodes (e.g. every AMP overflow skip) is printed once, with where it applies
        advice: dict[str, list[str]] = {}
        for e in found:
            for line in e["advice"]:
                advice.setdefault(line, []).append(f"{e['kind']} at {e['start_step']}")
        for line, where in advice.items():
            label = where[0] if len(where) == 1 else f"{where[0]} and {len(where) - 1} more"
            console.print(_esc(f"  • [{label}] {line}"), highlight=False)
        for e in rep["episodes"]:
            batch = peak_batch_text(e)
            if batch:
                console.print(_esc(f"  • [{e['kind']} at {e['start_step']}] {batch}"), highlight=False)


def _findings(report: dict) -> list[dict]:
    """The episodes the tables list: normal AMP overflow skips are the run's one ``amp`` line instead."""
    return [e for e in report["episodes"] if e["kind"] != "overflow_skip"]


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _print_warnings(results: Sequence[dict]) -> None:
    for r in results:
        for w in r["report"]["warnings"]:
            print(f"tb-gradient: warning: {r['report']['run']}: {w}", file=sys.stderr)


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
        results = audit_runs(targets, chart=bool(args.html), workers=args.workers, scheduler=args.scheduler,
                             on_done=lambda _r: progress.advance(task), cache_dir=args.cache_dir)
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
    if args.skip_list:
        _write_skip_list(args.skip_list, results)
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


def _write_skip_list(path: str, results: Sequence[dict]) -> None:
    """The batches at the episodes' peaks, per run, as JSON (format in docs/AUDIT_JSON.md)."""
    doc = skip_list([r["report"] for r in results])
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    except OSError as exc:
        raise UsageError(f"cannot write the skip list {path}: {exc}") from exc


def _cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    runs = []
    for path in (args.run_a, args.run_b):
        try:
            runs.append(load_run(path, path))
        except (FileNotFoundError, RemoteLogdirError) as exc:  # their message names the path
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
    audit.add_argument("--skip-list", metavar="FILE", help="also write the sample ids of the batches at the "
                       "episodes' peaks, per run, as JSON (recorded with GradientMonitor.log_batch)")
    audit.add_argument("--run", metavar="GLOB", help="only runs whose name matches this glob")
    audit.add_argument("--cache-dir", metavar="DIR", help="keep what reading each run produced here and read only "
                       "what is new next time (default: for remote logdirs only, in the user's cache directory or "
                       "TB_GRADIENT_CACHE_DIR; 'off': never)")
    where = audit.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    where.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="audit the runs on this Dask cluster "
                       "(needs the [dask] extra; the workers must reach the logdir's paths)")
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
