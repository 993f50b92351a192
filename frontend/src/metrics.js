// The metric registry the plugin serves (route `metrics`, the on-disk format's registry): how each metric is called
// and what it measures. Every label the tab shows for a metric comes from it, so the tab, the routes and the auditor
// name metrics alike. It is fetched once per tab.

import { getJson } from "./api.js";

let registry = new Map();
let loading = null;

/** Fetch the registry, once: later calls share the first answer (a failed fetch is tried again by the next call). */
export function loadMetrics() {
  if (!loading) {
    loading = getJson("metrics").then((doc) => {
      registry = new Map(doc.metrics.map((m) => [m.name, m]));
    }, (err) => {
      loading = null;
      throw err;
    });
  }
  return loading;
}

/** How the tab names a metric ("grad norm"); a name the registry does not hold is shown as it is. */
export function metricLabel(name) {
  const metric = registry.get(name);
  return metric ? metric.label : name;
}

/** Whether a run (an entry of the runs route) recorded `metric`; a run that lists no metrics is asked for every one. */
export function runHasMetric(info, metric) {
  return !info.metrics || info.metrics.includes(metric);
}
