// Words for the detector's validation findings, shared by the episode list and the loss chart.

/** A validation finding's cause, as the tab names it. */
export function causeLabel(cause) {
  return { overfitting: "overfitting", instability: "instability", degradation: "training stalled",
    nonfinite: "non-finite" }[cause] || "no degradation";
}

/** A validation series' name as the tab shows it (`val_metric/f1` -> `val f1`). */
export function seriesLabel(name) {
  return name.replace(/^val_metric\//, "val ").replace(/_/g, " ");
}

/**
 * The NaN/Inf evaluations of the validation findings as the tab marks them: one group per run of consecutive NaN
 * evaluations (the detector makes one finding per run: no finite evaluation lies between its steps), and series that
 * turned NaN at the very same evaluations share one group. A model that went NaN stays NaN at every later
 * evaluation: one marker per evaluation would stack its labels and chips into an unreadable band.
 * Returns `[{series: [name, ...], steps: [step, ...], first, last}]` ordered by first step.
 */
export function nanGroups(validation) {
  const groups = new Map();
  for (const f of validation) {
    const steps = f.cause === "nonfinite" ? f.nonfinite_steps || [] : [];
    if (!steps.length) continue;
    const key = steps.join(",");
    if (!groups.has(key)) groups.set(key, { series: [], steps, first: steps[0], last: steps[steps.length - 1] });
    const group = groups.get(key);
    if (!group.series.includes(f.series)) group.series.push(f.series);
  }
  return [...groups.values()].sort((a, b) => a.first - b.first);
}

/** What a NaN group is called on the chart and its chip: `val loss NaN`, `val loss, val accuracy NaN`. */
export function nanGroupName(group) {
  return `${group.series.map(seriesLabel).join(", ")} NaN`;
}
