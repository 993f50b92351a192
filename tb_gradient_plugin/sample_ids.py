"""The batches behind a finding: which logged sample ids an episode's steps trained on, and the skip list built from
them (``tb-gradient audit --skip-list``).

A training loop records each step's sample ids with ``GradientMonitor.log_batch`` (the Lightning and HF callbacks
do it for batches that carry an index field); the run store reads them back as ``RunData.batches``. Here they meet
the detector's episodes: the run object of ``docs/AUDIT_JSON.md`` gets, per explosion or non-finite episode, the
batches from its start to its peak, and the skip list names the batches at the peaks, so the next run can leave
those samples out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Episode kinds that get ``batches``: the ones where one step's data can be the cause.
BATCH_KINDS = ("explosion", "nonfinite")
#: At most this many recorded steps per episode (those closest to its peak): a slow episode of thousands of steps
#: would otherwise put millions of ids into the JSON the tab loads.
MAX_BATCH_STEPS = 256
SKIP_LIST_VERSION = 1


def _sorted_steps(batches: Mapping[int, np.ndarray]) -> np.ndarray:
    return np.sort(np.fromiter(batches.keys(), dtype=np.int64, count=len(batches)))


def add_episode_batches(report: dict, batches: Mapping[int, np.ndarray]) -> None:
    """Give every explosion and non-finite episode of a run object its ``batches``: ``{"step", "ids"}`` for each
    recorded step from the episode's start to its peak (``[]`` when none was recorded). Findings about validation
    evaluations get ``[]``: no training batch ran at an evaluation."""
    steps = _sorted_steps(batches) if batches else np.zeros(0, dtype=np.int64)
    for ep in report.get("episodes", []):
        if ep.get("kind") not in BATCH_KINDS:
            continue
        if ep.get("validation") or not steps.size:
            ep["batches"] = []
            continue
        lo = int(np.searchsorted(steps, ep["start_step"], side="left"))
        hi = int(np.searchsorted(steps, ep["peak_step"], side="right"))
        chosen = steps[max(lo, hi - MAX_BATCH_STEPS):hi].tolist()
        ep["batches"] = [{"step": s, "ids": batches[s].tolist()} for s in chosen]


def peak_batches(report: dict) -> list[dict]:
    """The batches at the peaks of a run object's episodes (those with ``batches``): ``{"step", "kind", "ids"}``."""
    out = []
    for ep in report.get("episodes", []):
        at_peak = [b for b in ep.get("batches") or [] if b["step"] == ep["peak_step"]]
        out.extend({"step": b["step"], "kind": ep["kind"], "ids": list(b["ids"])} for b in at_peak)
    return out


#: Ids a line of text lists before it says how many more there are.
SHOWN_IDS = 16


def peak_batch_text(episode: dict) -> str | None:
    """One line naming the batch at an episode's peak (the command line's and the HTML report's), or None."""
    at_peak = [b for b in episode.get("batches") or [] if b["step"] == episode["peak_step"]]
    if not at_peak:
        return None
    ids = at_peak[0]["ids"]
    shown = ", ".join(str(i) for i in ids[:SHOWN_IDS]) + (f", … (+{len(ids) - SHOWN_IDS} more)"
                                                         if len(ids) > SHOWN_IDS else "")
    return f"Batch at the peak (step {episode['peak_step']}): sample ids {shown}."


def skip_list(reports: Sequence[dict]) -> dict:
    """The ``--skip-list`` document: per run with a recorded batch at an episode's peak, those batches and the union
    of their ids (the samples a next run can leave out). Format in ``docs/AUDIT_JSON.md``."""
    runs = []
    for report in reports:
        found = peak_batches(report)
        if found:
            ids = sorted({i for b in found for i in b["ids"]})
            runs.append({"run": report["run"], "batches": found, "ids": ids})
    return {"version": SKIP_LIST_VERSION, "runs": runs}
