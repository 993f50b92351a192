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
