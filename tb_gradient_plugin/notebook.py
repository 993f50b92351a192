"""The auditor from a notebook: ``from tb_gradient_plugin import audit; reports = audit("logdir")``.

The same audit as ``tb-gradient audit`` (same runs, same reports, local worker processes or a Dask cluster), handed
back as objects instead of printed: each run's :class:`RunAudit` gives its ``--json`` object, its episodes as a
pandas table, and shows the HTML report's section for the run when it is the value of a cell.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .auditor import UsageError, audit_json, audit_runs, collect_runs, run_json

#: Columns of :meth:`RunAudit.to_pandas`, one row per episode.
EPISODE_COLUMNS = ("run", "kind", "start_step", "end_step", "peak_step", "severity", "layers", "top_layer",
                   "loss_spike_step", "advice")


def _pandas():
    try:
        import pandas
    except ImportError as exc:
        raise ImportError("to_pandas() needs pandas: pip install pandas") from exc
    return pandas


def _episode_rows(report: dict) -> list[dict]:
    return [{"run": report["run"], "kind": e["kind"], "start_step": e["start_step"], "end_step": e["end_step"],
             "peak_step": e["peak_step"], "severity": e["severity"], "layers": [f["name"] for f in e["layers"]],
             "top_layer": e["layers"][0]["name"] if e["layers"] else None,
             "loss_spike_step": e["loss_spike_step"], "advice": list(e["advice"])} for e in report["episodes"]]


class RunAudit:
    """One audited run, named ``name`` as in the audit."""

    def __init__(self, result: dict) -> None:
        self._result = result
        self.name: str = result["report"]["run"]

    @property
    def episodes(self) -> list[dict]:
        return list(self._result["report"]["episodes"])

    def to_json(self) -> dict:
        """The run's object, as in ``tb-gradient audit --json`` (schema in docs/AUDIT_JSON.md)."""
        return run_json(self._result)

    def to_pandas(self):
        """The run's episodes, one row each (columns :data:`EPISODE_COLUMNS`); pandas is imported here only."""
        return _pandas().DataFrame(_episode_rows(self._result["report"]), columns=list(EPISODE_COLUMNS))

    def _repr_html_(self) -> str:
        from .html_report import run_fragment

        return run_fragment(self._result)

    def __repr__(self) -> str:
        kinds = sorted({e["kind"] for e in self._result["report"]["episodes"]})
        found = f"{len(self.episodes)} episodes ({', '.join(kinds)})" if kinds else "no episode"
        return f"<RunAudit {self.name!r}: {found}>"


class AuditReports(list):
    """The runs of one audit, in order (a list of :class:`RunAudit`), plus the whole ``--json`` document."""

    def __init__(self, results: Iterable[dict]) -> None:
        self._results = list(results)
        super().__init__(RunAudit(r) for r in self._results)

    def __getitem__(self, key):
        """By position, as a list, or by run name."""
        if isinstance(key, str):
            for run in self:
                if run.name == key:
                    return run
            raise KeyError(key)
        return super().__getitem__(key)

    def to_json(self, fail_on: str = "explosion") -> dict:
        """The ``tb-gradient audit --json`` document of these runs."""
        return audit_json(self._results, fail_on)

    def to_pandas(self):
        """Every run's episodes in one table (column ``run`` says whose)."""
        rows = [row for r in self._results for row in _episode_rows(r["report"])]
        return _pandas().DataFrame(rows, columns=list(EPISODE_COLUMNS))

    def _repr_html_(self) -> str:
        from .html_report import run_fragment

        return "".join(run_fragment(r) for r in self._results)


def audit(*paths: str | os.PathLike, run: str | None = None, workers: int | None = None,
          scheduler: str | None = None, chart: bool = True, cache_dir: str | None = None) -> AuditReports:
    """Audit every run under ``paths`` (local paths or fsspec URLs), as ``tb-gradient audit`` does.

    ``run`` is the ``--run`` glob, ``workers`` the ``--workers`` count, ``scheduler`` a Dask scheduler's address
    (``--scheduler``), ``cache_dir`` the ``--cache-dir``. ``chart=False`` skips the chart data that ``_repr_html_``
    draws (a little faster). Raises :class:`~tb_gradient_plugin.auditor.UsageError` where the command would exit
    with code 2.
    """
    if not paths:
        raise UsageError("audit() needs at least one logdir")
    names = [os.fspath(p) for p in paths]
    targets = collect_runs(names, run)
    if not targets:
        raise UsageError(f"no runs (directories with event files) under {', '.join(names)}"
                         + (f" matching run={run!r}" if run else ""))
    return AuditReports(audit_runs(targets, chart=chart, workers=workers, scheduler=scheduler,
                                    cache_dir=cache_dir))
