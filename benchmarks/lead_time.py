"""Lead time on the labeled suite: how many logged steps before the loss blows up each detector raises its alarm.

For every labeled explosion of a case with per-layer or total norms (loss-only runs are left out: a loss rule cannot
be ahead of the loss), the *event* is the first logged step, from the label's start on, where the loss is non-finite
or ``EVENT_FACTOR`` times its median over the ``PRE_POINTS`` logged losses before the label (the loss spike or first
NaN); labels whose loss never does that have no event and are not counted. A detector's *alarm* is the start of its
first detection that matches the label (the suite's matching: overlap within ``TOLERANCE`` logged steps), taken no
earlier than the label's start: a detection that began before the cause (a noisy rule's running alarm) did not
foresee it. The lead time is the number of logged steps from the alarm to the
event (negative: the alarm came after it); a label the detector misses has none.

Ours runs twice: as it is, and without the optimizer-state signals (the run's update norms, parameter norms, update
ratios and Adam moment norms removed), so the table shows what those signals add. Run
``python benchmarks/lead_time.py`` with the suite's options (``--small``, ``--trained DIR``, ``--demo DIR``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.detection_suite import (  # noqa: E402
    BASELINES,
    TOLERANCE,
    Case,
    Detected,
    all_cases,
    case_steps,
    run_baseline,
    run_ours,
)

EVENT_FACTOR = 3.0  # the loss this many times its level before the label: the loss spike
PRE_POINTS = 100  # logged losses before the label that define its level
#: Per-layer metrics that come from the optimizer's state or the applied update, not from the gradient.
OPTIMIZER_STATE = ("update_norm", "param_norm", "update_ratio", "exp_avg_norm", "exp_avg_sq_norm")

OURS = "ours (with optimizer state)"
OURS_WITHOUT = "ours (gradients only)"


def without_optimizer_state(case: Case) -> Case:
    """The case with its optimizer-state metrics removed."""
    run = replace(case.run, layer_metrics={k: v for k, v in case.run.layer_metrics.items()
                                           if k not in OPTIMIZER_STATE})
    return replace(case, run=run)


def event_step(case: Case, start: int, end: int) -> int | None:
    """The first step in [start, end + TOLERANCE points] where the loss is non-finite or EVENT_FACTOR x its level
    before ``start``; None when it never is (or the run logs no loss)."""
    loss = case.run.series.get("loss")
    if loss is None or not len(loss.steps):
        return None
    ls, lv = np.asarray(loss.steps, dtype=np.int64), np.asarray(loss.values, dtype=np.float64)
    k0 = int(np.searchsorted(ls, start))
    before = lv[max(0, k0 - PRE_POINTS):k0]
    before = before[np.isfinite(before)]
    if not before.size:
        return None
    level = float(np.median(before))
    steps = case_steps(case)
    k_end = int(np.searchsorted(steps, end, side="right")) - 1 + TOLERANCE
    last = int(steps[min(k_end, steps.size - 1)])
    sel = (ls >= start) & (ls <= last)
    with np.errstate(invalid="ignore"):
        hit = sel & (~np.isfinite(lv) | (lv >= EVENT_FACTOR * level if level > 0 else lv > level))
    idx = np.flatnonzero(hit)
    return int(ls[idx[0]]) if idx.size else None


@dataclass
class Leads:
    """Per detector: the lead times (logged steps) of the labeled events it caught, and how many events there were."""

    events: int = 0
    leads: list[int] = field(default_factory=list)

    def row(self, name: str) -> str:
        a = np.asarray(self.leads)
        if not a.size:
            return f"| {name} | 0/{self.events} | n/a | n/a | n/a |"
        return (f"| {name} | {a.size}/{self.events} | {np.median(a):.1f} | {np.mean(a):.1f} | "
                f"{int((a > 0).sum())}/{self.events} |")


def lead_times(cases: list[Case]) -> dict[str, Leads]:
    """Lead times of ours (with and without the optimizer-state signals) and the baselines over ``cases``."""
    detectors: dict[str, Callable[[Case], list[Detected]]] = {
        OURS: run_ours, OURS_WITHOUT: lambda c: run_ours(without_optimizer_state(c))}
    for name, rule in BASELINES.items():
        detectors[name] = lambda c, rule=rule: run_baseline(rule, c)
    out = {name: Leads() for name in detectors}
    for case in cases:
        if case.loss_only or not case.labels:
            continue
        events = [(lab, event_step(case, lab.start, lab.end)) for lab in case.labels]
        events = [(lab, ev) for lab, ev in events if ev is not None]
        if not events:
            continue
        steps = case_steps(case)
        for name, fn in detectors.items():
            dets = fn(case)
            out[name].events += len(events)
            for lab, ev in events:
                a = max(0, int(np.searchsorted(steps, lab.start)) - TOLERANCE)
                b = min(steps.size - 1, int(np.searchsorted(steps, lab.end, side="right")) - 1 + TOLERANCE)
                starts = [int(np.searchsorted(steps, d.start)) for d in dets
                          if int(np.searchsorted(steps, d.start)) <= b and int(np.searchsorted(steps, d.end)) >= a]
                if starts:
                    alarm = max(int(np.searchsorted(steps, lab.start)), min(starts))
                    out[name].leads.append(int(np.searchsorted(steps, ev)) - alarm)
    return out


def table(leads: dict[str, Leads]) -> str:
    lines = ["| detector | events caught | median lead (logged steps) | mean lead | alarms before the event |",
             "|---|---|---|---|---|"]
    lines += [lead.row(name) for name, lead in leads.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--realruns", default=None)
    ap.add_argument("--trained", default=None)
    ap.add_argument("--demo", default=None)
    args = ap.parse_args(argv)
    cases = all_cases(args.small, args.realruns, args.trained, args.demo)
    groups = sorted({c.group for c in cases if c.labels and not c.loss_only})
    for grp in groups + ["all"]:
        sel = [c for c in cases if grp == "all" or c.group == grp]
        print(f"\n### lead time: {grp}\n")
        print(table(lead_times(sel)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
