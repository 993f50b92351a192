"""How findings put one step in relation to another ("1 step before the peak", "at the peak", "3 steps after the
peak"): one table, used by the advice, the command line and the HTML report, and mirrored word for word by the
tab's ``frontend/src/wording.js`` (a test compares the two).
"""

from __future__ import annotations

#: The wording of a step ``delta`` logged steps from an anchor ("the peak"), by the sign of ``delta``.
RELATIVE_STEP = {
    "before": "{count} before {anchor}",
    "at": "at {anchor}",
    "after": "{count} after {anchor}",
}
#: The anchors findings use.
PEAK = "the peak"
EPISODE_START = "the episode's start"


def steps_count(n: int) -> str:
    """``"1 step"``, ``"2 steps"``, ``"1,200 steps"``."""
    return f"{n:,} step{'' if n == 1 else 's'}"


def relative_step(delta: int, anchor: str = PEAK) -> str:
    """Where a step lies relative to ``anchor``, ``delta`` steps from it: never a negative count of steps after."""
    delta = int(delta)
    if delta == 0:
        return RELATIVE_STEP["at"].format(anchor=anchor)
    side = "after" if delta > 0 else "before"
    return RELATIVE_STEP[side].format(count=steps_count(abs(delta)), anchor=anchor)
