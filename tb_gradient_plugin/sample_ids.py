"""The batches behind a finding: which logged sample ids an episode's steps trained on, and the skip list built from
them (``tb-gradient audit --skip-list``).

A training loop records each step's sample ids with ``GradientMonitor.log_batch`` (the Lightning and HF callbacks
do it for batches that carry an index field); the run store reads them back as ``RunData.batches``. Here they meet
the detector's episodes: the run object of ``docs/AUDIT_JSON.md`` gets, per explosion or non-finite episode, the
batches from its start to its peak, and the skip list names the batches at the peaks, so the next run can leave
those samples out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .types import BatchIds, RunData, Series

#: Episode kinds that get ``batches``: the ones where one step's data can be the cause.
BATCH_KINDS = ("explosion", "nonfinite")
SKIP_LIST_VERSION = 1


def _in_range(steps: np.ndarray, first: int, last: int) -> np.ndarray:
    return steps[np.searchsorted(steps, first, side="left"):np.searchsorted(steps, last, side="right")]


def _position_series(run: RunData) -> tuple[Series, Series] | None:
    """The run's epoch and batch-in-epoch series (what Keras records with sample ids, or without where they are
    unknown), if both were logged."""
    epoch, index = run.series.get("epoch"), run.series.get("batch_index")
    return None if epoch is None or index is None else (epoch, index)


def _value_at(series: Series, step: int) -> int | None:
    k = int(np.searchsorted(series.steps, step))
    if k < len(series.steps) and series.steps[k] == step and np.isfinite(series.values[k]):
        return int(series.values[k])
    return None


class RunBatches:
    """A run's recorded batches, by step: the steps with sample ids or a position, and each one's entry.

    Built once per run object (one sort of the recorded steps), so that every episode, and every page the plugin's
    ``batches`` route serves, is two binary searches plus its own entries.
    """

    def __init__(self, run: RunData | None) -> None:
        ids = run.batches if run is not None else BatchIds()
        self._ids = ids if isinstance(ids, BatchIds) else BatchIds.from_dict(ids)
        self._positions = _position_series(run) if run is not None else None
        id_steps = self._ids.steps
        pos_steps = self._positions[0].steps if self._positions is not None else np.zeros(0, dtype=np.int64)
        self.steps = np.union1d(id_steps, pos_steps)

    def between(self, first: int, last: int) -> np.ndarray:
        """The recorded steps from ``first`` to ``last``, both included, in order."""
        return _in_range(self.steps, first, last)

    def entry(self, step: int) -> dict:
        """``{"step", "ids"}``, plus ``"epoch"`` and ``"batch"`` (the index in the epoch) where those were recorded."""
        ids = self._ids.get(step)
        entry: dict = {"step": step, "ids": [] if ids is None else ids.tolist()}
        if self._positions is not None:
            epoch, index = (_value_at(series, step) for series in self._positions)
            if epoch is not None and index is not None:
                entry.update(epoch=epoch, batch=index)
        return entry

    def entries(self, steps: np.ndarray) -> list[dict]:
        return [self.entry(step) for step in steps.tolist()]


def add_episode_batches(report: dict, run: RunData | None, *, shown: int | None = None) -> None:
    """Give every explosion and non-finite episode of a run object its ``batches``: the entry of every recorded step
    from the episode's start to its peak (:meth:`RunBatches.entry`); ``[]`` when nothing was. Findings about
    validation evaluations get ``[]``: no training batch ran at an evaluation.

    ``shown``: list only the last ``shown`` (those closest to the peak, the peak's included) and add
    ``batches_total``, the full count; the plugin's episodes route does, so that an episode of thousands of steps
    does not put millions of ids into the JSON the tab loads (its ``batches`` route pages through the rest)."""
    recorded = RunBatches(run)
    for ep in report.get("episodes", []):
        if ep.get("kind") not in BATCH_KINDS:
            continue
        steps = np.zeros(0, np.int64) if ep.get("validation") else recorded.between(ep["start_step"], ep["peak_step"])
        if shown is not None:
            ep["batches_total"] = len(steps)
            steps = steps[len(steps) - min(shown, len(steps)):]
        ep["batches"] = recorded.entries(steps)


def peak_batches(report: dict) -> list[dict]:
    """The batches at the peaks of a run object's episodes (those with ``batches``): each ``batches`` entry (``step``,
    ``ids``, and ``epoch``/``batch`` where recorded) with the episode's ``kind``."""
    out = []
    for ep in report.get("episodes", []):
        at_peak = [b for b in ep.get("batches") or [] if b["step"] == ep["peak_step"]]
        out.extend(dict(b, kind=ep["kind"]) for b in at_peak)
    return out


#: Ids a line of text lists before it says how many more there are.
SHOWN_IDS = 16


def peak_batch_text(episode: dict) -> str | None:
    """One line naming the batch at an episode's peak (the command line's and the HTML report's), or None."""
    at_peak = [b for b in episode.get("batches") or [] if b["step"] == episode["peak_step"]]
    if not at_peak:
        return None
    batch = at_peak[0]
    ids = batch["ids"]
    parts = [f"epoch {batch['epoch']}, batch {batch['batch']}"] if "epoch" in batch else []
    if ids:
        more = f", … (+{len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else ""
        parts.append("sample ids " + ", ".join(str(i) for i in ids[:SHOWN_IDS]) + more)
    return f"Batch at the peak (step {episode['peak_step']}): {'; '.join(parts)}." if parts else None


def skip_list(reports: Sequence[dict]) -> dict:
    """The ``--skip-list`` document: per run with a recorded batch at an episode's peak, those batches and the union
    of their ids (the samples a next run can leave out). Format in ``docs/AUDIT_JSON.md``."""
    runs = []
    for report in reports:
        found = peak_batches(report)
        if found:  # a batch known only by its position (Keras without ids) is listed, with no ids
            ids = sorted({i for b in found for i in b["ids"]})
            runs.append({"run": report["run"], "batches": found, "ids": ids})
    return {"version": SKIP_LIST_VERSION, "runs": runs}
