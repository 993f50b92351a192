// The drill-down of one layer of one run: a chart per metric against the detector's baseline and threshold, and the
// layer's gradient histograms over time, all on the shared step axis.

import { Slot, getJson, isAbort } from "./api.js";
import { createChart, layerOption } from "./charts.js";
import { h, message } from "./dom.js";
import { HistogramView } from "./histogram.js";
import { plotWidth } from "./layout.js";
import { metricLabel, runHasMetric } from "./metrics.js";

/** The charts of a drill-down, top to bottom; norms span decades, so most are drawn on a log axis. */
const DRILL_METRICS = [
  { metric: "grad_norm", log: true },
  { metric: "update_ratio", log: true },
  { metric: "param_norm", log: false },
];

export class LayerDrillDown {
  /**
   * @param {object} opts
   * @param {object} opts.app the tab (shared step range, layer selection, palette)
   * @param {string} opts.run the run shown
   * @param {() => object} opts.info the run's entry of the runs route (what it recorded)
   * @param {() => string[] | null} opts.layers the run's layers as its heatmap has them (null: not loaded)
   * @param {() => object[]} opts.episodes the run's episodes (from the episodes route)
   * @param {(range: {start: number, end: number} | null) => void} opts.onZoom a step range was dragged (null: reset)
   */
  constructor({ app, run, info, layers, episodes, onZoom }) {
    this.app = app;
    this.run = run;
    this.info = info;
    this.layers = layers;
    this.episodes = episodes;
    this.onZoom = onZoom;
    this.layer = null;
    this.charts = [];
    this.histView = null;
    this.histSlot = null;
    this.slots = { layer: new Slot(), hist: new Slot() };
    this.el = h("div", { class: "block drill", hidden: true });
  }

  /** Open the drill-down on layer `name` (hidden for a run without per-layer data). */
  show(name) {
    this.layer = name;
    const info = this.info();
    if (!info.has_layers) {
      this.el.hidden = true;
      return;
    }
    const layers = this.layers();
    const known = !layers || layers.includes(name);
    this.el.hidden = false;
    this.el.dataset.layer = name;
    this.dispose();
    const head = h("div", { class: "block-head" },
      h("div", { class: "block-title" }, "Layer ", h("span", { class: "drill-name", text: name })),
      h("button", { class: "link", type: "button", text: "close", onclick: () => this.app.selectLayer(null) }));
    if (!known) {
      this.el.replaceChildren(head, message("empty", "This run has no layer of that name.",
        "Layer names come from the model; the other run may have renamed or removed it."));
      return;
    }
    const body = h("div", { class: "drill-body" });
    for (const { metric, log } of DRILL_METRICS.filter((m) => runHasMetric(info, m.metric))) {
      const el = h("div", { class: "chart layer-chart", dataset: { metric } });
      const slot = h("div", { class: "drill-slot" }, el);
      body.append(slot);
      this.charts.push({ metric, title: metricLabel(metric), log, el, slot, chart: null, data: null });
    }
    if (info.has_histograms) {
      this.histView = new HistogramView({ palette: () => this.app.palette(), onZoom: this.onZoom });
      this.histSlot = h("div", { class: "drill-slot" }, message("loading", "Loading gradient histograms…"));
      body.append(h("div", { class: "drill-sub", text: "Gradient |g| distribution over time (share of the layer's "
        + "entries per log10 bin; NaN/Inf on top)" }), this.histSlot);
    }
    this.el.replaceChildren(head, body);
    this.loadMetrics();
    if (this.histView) this.loadHistograms();
  }

  hide() {
    this.layer = null;
    this.dispose();
    this.el.hidden = true;
  }

  dispose() {
    for (const d of this.charts) if (d.chart) d.chart.dispose();
    this.charts = [];
    if (this.histView) this.histView.destroy();
    this.histView = null;
  }

  /** Fetch the layer's series for the shared step window (again after a zoom). */
  async loadMetrics() {
    const name = this.layer;
    const view = this.app.view;
    const range = this.app.windowParams();
    const charts = this.charts;
    let answers;
    try {
      answers = await this.slots.layer.run((signal) => Promise.allSettled(charts.map(({ metric }) =>
        getJson("layer", { run: this.run, layer: name, metric, ...range }, signal))));
    } catch (err) {
      if (isAbort(err)) return;
      throw err;
    }
    if (name !== this.layer || charts !== this.charts) return;
    answers.forEach((answer, i) => {
      const d = charts[i];
      if (answer.status === "rejected") {
        if (isAbort(answer.reason)) return;
        if (d.chart) d.chart.dispose();
        d.chart = null;
        d.slot.replaceChildren(message("empty", `No ${d.title} for this layer.`, answer.reason.message));
        return;
      }
      d.data = answer.value;
      if (!d.data.values.some((v) => v !== null)) {
        if (d.chart) d.chart.dispose();
        d.chart = null;
        d.slot.replaceChildren(message("empty", `No ${d.title} recorded for this layer`
          + (view ? " in the zoomed range." : ".")));
        return;
      }
      if (!d.el.isConnected) d.slot.replaceChildren(d.el);
      if (!d.chart) d.chart = createChart(d.el);
      this.drawChart(d);
    });
  }

  drawChart(d) {
    // Norms span decades: a log axis (a zero, e.g. a frozen step, leaves a gap rather than a linear axis).
    const positive = d.data.values.some((v) => v !== null && v > 0);
    d.chart.setOption(layerOption({ data: d.data, title: d.title, range: this.app.range(),
      width: plotWidth(d.el), pal: this.app.palette(), log: d.log && positive, episodes: this.episodes() }), { notMerge: true });
  }

  async loadHistograms() {
    const name = this.layer;
    const view = this.histView;
    let data;
    try {
      data = await this.slots.hist.run((signal) => getJson("histograms", { run: this.run, layer: name }, signal));
    } catch (err) {
      if (isAbort(err)) return;
      if (view === this.histView) this.histSlot.replaceChildren(message("empty", "No gradient histograms for this layer.", err.message));
      return;
    }
    if (name !== this.layer || view !== this.histView) return;
    if (!data.steps.length) {
      this.histSlot.replaceChildren(message("empty", "No gradient histograms recorded for this layer."));
      return;
    }
    this.histSlot.replaceChildren(view.el);
    view.episodes = this.episodes();
    view.setData(data, this.app.range());
  }

  /** Show the shared step range `range` ({start, end}) without fetching. */
  setRange(range) {
    for (const { chart } of this.charts) {
      if (chart) chart.setOption({ xAxis: { min: range.start, max: range.end } });
    }
    if (this.histView && this.histView.data) this.histView.setRange(range);
  }

  /** The run's episodes changed: mark them anew. */
  episodesChanged() {
    if (this.histView) this.histView.setEpisodes(this.episodes());
    for (const d of this.charts) if (d.chart && d.data) this.drawChart(d);
  }

  redraw() {
    for (const d of this.charts) if (d.chart && d.data) this.drawChart(d);
    if (this.histView) this.histView.draw();
  }

  destroy() {
    for (const slot of Object.values(this.slots)) slot.abort();
    this.dispose();
  }
}
