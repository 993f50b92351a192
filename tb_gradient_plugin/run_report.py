"""A run's report as JSON: the run object of ``docs/AUDIT_JSON.md``, which the plugin's ``episodes`` route serves too.

One builder for the auditor and the plugin, so that both say the same about a run, down to its warnings, and a run
that could not be read or judged still carries every field of the schema.
"""

from __future__ import annotations

from collections.abc import Sequence

from .detect import Report
from .sample_ids import add_episode_batches
from .types import RunData


def failed_report(run: str, source: str, why: str) -> Report:
    """An empty report that says why a run could not be read or judged: one such run must not end the audit of the
    others, nor take the plugin's run list down."""
    return Report(run=run, source=source, steps=0, episodes=[], loss_spikes=[], warnings=[why])


def report_json(report: Report, run_warnings: Sequence[str] = (), run: RunData | None = None, *,
                batches_shown: int | None = None) -> dict:
    """The run object: the detector's report, the run's own warnings (damaged or replaced files) first, and, from the
    run's data, the logged batches of its explosion and non-finite episodes (all of them, or the last
    ``batches_shown`` of each with ``batches_total``: see :func:`.sample_ids.add_episode_batches`)."""
    doc = report.to_json()
    doc["warnings"] = list(run_warnings) + [w for w in doc["warnings"] if w not in run_warnings]
    add_episode_batches(doc, run, shown=batches_shown)
    return doc
