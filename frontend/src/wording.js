// How findings put one step in relation to another ("1 step before the peak", "at the peak"): the tab's copy of
// tb_gradient_plugin/wording.py, word for word (tests/test_wording.py compares the two), so the tab, the command line
// and the HTML report say it alike.

const RELATIVE_STEP = {
  before: (count, anchor) => `${count} before ${anchor}`,
  at: (anchor) => `at ${anchor}`,
  after: (count, anchor) => `${count} after ${anchor}`,
};
export const PEAK = "the peak";

/** "1 step", "2 steps", "1,200 steps". */
export function stepsCount(n) {
  return `${n.toLocaleString("en-US")} step${n === 1 ? "" : "s"}`;
}

/** Where a step lies relative to `anchor`, `delta` steps from it: never a negative count of steps after. */
export function relativeStep(delta, anchor = PEAK) {
  const d = Math.trunc(delta);
  if (d === 0) return RELATIVE_STEP.at(anchor);
  return RELATIVE_STEP[d > 0 ? "after" : "before"](stepsCount(Math.abs(d)), anchor);
}
