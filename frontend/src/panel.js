// Everything the tab shows for one run: header, episode list, heatmap, loss overlay, layer drill-down. Two panels side
// by side make the run comparison; the app keeps them on one step axis.

import { getJson, isAbort } from "./api.js";
import { createChart, layerOption, lossOption } from "./charts.js";
import { clear, formatStep, formatValue, h, message } from "./dom.js";
import { renderEpisodes } from "./episodes.js";
import { Heatmap, metricName } from "./heatmap.js";
import { HistogramView } from "./histogram.js";
import { GUTTER, RIGHT } from "./layout.js";
import { nanGroupName, nanGroups, seriesLabel } from "./validation.js";

const REFETCH_DELAY_MS = 200;
const MAX_BINS = 2000;
const MAX_SPIKE_CHIPS = 10;
const MAX_NAN_CHIPS = 5;
const DRILL_METRICS = [
  { metric: "grad_norm", title: "grad norm", log: true },
  { metric: "update_ratio", title: "update ratio", log: true },
  { metric: "param_norm", title: "param norm", log: false },
];

export const HOW_TO_LOG_LAYERS = "To see which layer explodes, log per-layer statistics with tb_gradient_plugin: "
  + "GradientMonitor (PyTorch), GradientMonitorCallback (Keras) or GradientWriter.write(step, layers, grad_norm=...).";

/** A slot for one in-flight request: starting a new one aborts the previous, so late answers never overwrite. */
class Slot {
  constructor() {
    this.controller = null;
  }

  async run(fn) {
    if (this.controller) this.controller.abort();
    const controller = new AbortController();
    this.controller = controller;
    try {
      return await fn(controller.signal);
    } finally {
      if (this.controller === controller) this.controller = null;
    }
  }
}

export class RunPanel {
  constructor(app, info) {
    this.app = app;
    this.info = info;
    this.report = null;
    this.loss = null;
    this.heatmapData = null;
    this.lossChart = null;
    this.lossResize = null;
    this.lossWidth = 0;
    this.applyingView = false;
    this.layer = null;
    this.drillCharts = [];
    this.slots = { heatmap: new Slot(), loss: new Slot(), layer: new Slot(), hist: new Slot() };
    this.timers = {};
    this.logY = false;
    this.logChosen = null; // the user's pick of the log-scale box; null: automatic
    this.right = null;
    this.histView = null;

    this.heatmap = new Heatmap({
      palette: () => app.palette(),
      onSelectLayer: (name) => app.selectLayer(name),
      onZoom: (range) => app.setView(range, this),
    });
    this.header = h("div", { class: "run-header" });
    this.episodesEl = h("div", { class: "block episodes-block" });
    this.heatmapTitle = h("div", { class: "block-title" });
    this.legend = h("div", { class: "legend" });
    this.heatmapBody = h("div", { class: "block-body" });
    this.lossHead = h("div", { class: "loss-head" });
    this.lossEl = h("div", { class: "chart loss-chart" });
    this.lossBody = h("div", { class: "block-body" });
    this.drillEl = h("div", { class: "block drill", hidden: true });
    this.el = h("section", { class: "run-panel", dataset: { run: info.run } },
      this.header,
      this.episodesEl,
      h("div", { class: "block heatmap-block" },
        h("div", { class: "block-head" }, this.heatmapTitle, this.legend), this.heatmapBody),
      h("div", { class: "block loss-block" },
        h("div", { class: "block-head" }, h("div", { class: "block-title", text: "Loss" }), this.lossHead),
        this.lossBody),
      this.drillEl);
    this.renderHeader();
  }

  renderHeader() {
    const i = this.info;
    const parts = [i.source, `${formatStep(i.steps)} steps`];
    if (i.has_layers) parts.push(`${formatStep(i.layers)} layers`);
    parts.push(`${i.episodes} episode${i.episodes === 1 ? "" : "s"}`);
    this.header.replaceChildren(
      h("h2", { class: "run-name", title: i.run, text: i.run }),
      h("span", { class: "run-meta", text: parts.join(" · ") }));
  }

  // --------------------------------------------------------------------------------------------------- loading

  async load() {
    this.episodesEl.replaceChildren(message("loading", "Loading episodes…"));
    this.heatmapBody.replaceChildren(message("loading", "Loading layer heatmap…"));
    this.lossBody.replaceChildren(message("loading", "Loading loss…"));
    this.updateHeatmapTitle();
    await Promise.all([this.loadEpisodesAndLoss(), this.loadHeatmap()]);
  }

  /** New data in the run (live training): reload everything in place, keeping zoom and selection. */
  async refresh(info) {
    this.info = info;
    this.renderHeader();
    await Promise.all([this.loadEpisodesAndLoss(), this.loadHeatmap()]);
    if (this.layer) this.showLayer(this.layer);
  }

  windowParams() {
    const view = this.app.view;
    return view ? { start: Math.floor(view.start), end: Math.ceil(view.end) } : {};
  }

  async loadEpisodesAndLoss() {
    const run = this.info.run;
    const [report, loss] = await Promise.allSettled([
      getJson("episodes", { run }),
      this.slots.loss.run((signal) => getJson("loss", { run, ...this.windowParams() }, signal)),
    ]);
    if (loss.status === "rejected" && isAbort(loss.reason)) return;
    if (report.status === "fulfilled") {
      this.report = report.value;
      this.episodesEl.replaceChildren(renderEpisodes(this.report, {
        onEpisode: (ep) => this.app.zoomToEpisode(ep),
        onLayer: (name) => this.app.selectLayer(name),
      }));
    } else {
      this.report = null;
      this.episodesEl.replaceChildren(message("error", "Could not load the episodes of this run.",
        report.reason.message, "Press TensorBoard's reload button to try again."));
    }
    if (loss.status === "fulfilled") {
      this.loss = loss.value;
      this.renderLoss();
    } else {
      this.loss = null;
      this.lossBody.replaceChildren(message("error", "Could not load the loss of this run.", loss.reason.message));
    }
    if (this.heatmapData) this.heatmap.setSpikes(this.spikeSteps());
    this.heatmap.setEpisodes(this.report ? this.report.episodes : null);
    if (this.histView) this.histView.setEpisodes(this.episodes());
    for (const d of this.drillCharts) if (d.chart && d.data) this.drawDrillChart(d);
    this.app.dataChanged();
  }

  episodes() {
    return this.report ? this.report.episodes : [];
  }

  validation() {
    return this.report ? this.report.validation || [] : [];
  }

  heatmapParams() {
    // One bin per CSS pixel of the plot (the heatmap fills the block's width, also before it is first shown).
    const bins = Math.max(20, Math.min(MAX_BINS, Math.floor(this.heatmapBody.clientWidth - GUTTER - RIGHT)));
    const params = { run: this.info.run, metric: this.app.metric, bins };
    return { ...params, ...this.windowParams() };
  }

  updateHeatmapTitle() {
    this.heatmapTitle.textContent = `Layers × steps — log10 ${metricName(this.app.metric)}`;
  }

  async loadHeatmap() {
    this.updateHeatmapTitle();
    if (this.info.has_layers && !this.hasMetric(this.app.metric)) {
      this.heatmapData = null;
      this.legend.replaceChildren();
      this.heatmapBody.replaceChildren(message("empty", `This run did not record ${metricName(this.app.metric)}.`,
        this.app.metric === "update_ratio"
          ? "Update ratios need parameter and update norms: log param_norm and update_norm (GradientWriter.write "
            + "accepts both). Pick log10 grad norm above meanwhile."
          : "Pick log10 grad norm above."));
      return;
    }
    if (!this.info.has_layers) {
      this.heatmapData = null;
      this.legend.replaceChildren();
      this.heatmapBody.replaceChildren(message("empty", "This run has no per-layer data.",
        `It was written by ${this.info.source}: the loss and total gradient norm it logged are shown below.`,
        HOW_TO_LOG_LAYERS));
      return;
    }
    let data;
    try {
      data = await this.slots.heatmap.run((signal) => getJson("heatmap", this.heatmapParams(), signal));
    } catch (err) {
      if (isAbort(err)) return;
      this.heatmapData = null;
      this.heatmapBody.replaceChildren(message("error", `Could not load the ${metricName(this.app.metric)} heatmap.`,
        err.message, this.app.metric === "update_ratio"
          ? "Update ratios need parameter and update norms (param_norm, update_norm) in the log."
          : "Press TensorBoard's reload button to try again."));
      return;
    }
    this.heatmapData = data;
    if (!this.app.view && data.step_range) this.layerRange = data.step_range;
    const hasValues = data.values.some((row) => row.some((v) => v !== null))
      || data.nonfinite.some((row) => row.some((v) => v === 1));
    if (!data.layers.length || (!hasValues && !this.app.view)) {
      this.heatmapBody.replaceChildren(message("empty", `No ${metricName(this.app.metric)} values in this run yet.`,
        this.app.metric === "grad_norm" ? HOW_TO_LOG_LAYERS
          : "Pick another metric above, or log this one (GradientWriter.write accepts param_norm and update_norm)."));
      return;
    }
    if (!this.heatmap.el.isConnected) this.heatmapBody.replaceChildren(this.heatmap.el);
    this.heatmap.selected = this.app.layer;
    this.heatmap.spikes = this.spikeSteps();
    this.heatmap.setData(data, this.app.range());
    this.app.dataChanged();
  }

  spikeSteps() {
    return this.loss ? (this.loss.spikes || []).map((s) => s.step) : [];
  }

  /** [first, last] step this run has data for (layers or loss), or null. */
  stepRange() {
    let lo = Infinity;
    let hi = -Infinity;
    if (this.layerRange) [lo, hi] = this.layerRange;
    if (this.loss && this.loss.steps.length) {
      const last = this.loss.step_end || this.loss.steps;
      lo = Math.min(lo, this.loss.steps[0]);
      hi = Math.max(hi, last[last.length - 1]);
    }
    return lo <= hi ? [lo, hi] : null;
  }

  // ----------------------------------------------------------------------------------------------------- loss

  renderLoss() {
    const loss = this.loss;
    const hasTotal = loss.total_grad_norm && loss.total_grad_norm.steps.length;
    const hasVal = loss.val_loss && loss.val_loss.steps.length;
    if (!loss.steps.length && !hasTotal && !hasVal) {
      this.lossBody.replaceChildren(message("empty", "No loss logged in this run.",
        "Pass loss=... to GradientWriter.write (the integrations log it when you give it to them), "
        + "or log a scalar named loss."));
      this.lossHead.replaceChildren();
      return;
    }
    const spikes = loss.spikes || [];
    this.lossEl.dataset.spikeSteps = spikes.map((s) => s.step).join(",");
    const lines = [loss.values, loss.val_loss ? loss.val_loss.values : []];
    const positive = lines.every((values) => values.every((v) => v === null || v > 0));
    // A loss that blew up by orders of magnitude is flat on a linear axis: such a chart starts logarithmic.
    const finite = lines.flat().filter((v) => v !== null && Number.isFinite(v));
    const wide = finite.length > 0 && Math.max(...finite) > 1e3 * Math.min(...finite);
    this.logY = positive && (this.logChosen ?? wide);
    this.lossEl.dataset.logY = String(this.logY);
    const logToggle = h("label", { class: "toggle", title: "Logarithmic loss axis" },
      h("input", { type: "checkbox", checked: this.logY, disabled: !positive,
        onchange: (e) => {
          this.logChosen = e.target.checked;
          this.logY = e.target.checked;
          this.lossEl.dataset.logY = String(this.logY);
          this.drawLoss();
        } }),
      " log scale");
    const chips = spikes.slice(0, MAX_SPIKE_CHIPS).map((s) => h("button", {
      class: "spike-chip", type: "button", dataset: { step: String(s.step) },
      title: `Loss ${formatValue(s.value)}, ×${formatValue(s.ratio)} its baseline. Click to zoom.`,
      onclick: () => this.app.zoomAround(s.step),
    }, `▼ ${formatStep(s.step)}`));
    this.lossHead.replaceChildren(...[
      h("span", { class: "spike-summary", text: spikes.length
        ? `${spikes.length} loss spike${spikes.length === 1 ? "" : "s"}:` : "no loss spikes" }),
      ...chips,
      spikes.length > chips.length ? h("span", { class: "ep-more", text: `+${spikes.length - chips.length} more` }) : null,
      ...this.validationChips(),
      this.rightAxisSelect(),
      logToggle,
    ].filter(Boolean));
    if (!this.lossEl.isConnected) this.lossBody.replaceChildren(this.lossEl);
    if (!this.lossChart) {
      this.lossChart = createChart(this.lossEl);
      this.lossChart.on("datazoom", () => this.onLossZoom());
      // Which marker labels fit depends on the width: a resized chart chooses again.
      this.lossResize = new ResizeObserver(() => {
        if (this.lossEl.clientWidth !== this.lossWidth) this.drawLoss();
      });
      this.lossResize.observe(this.lossEl);
    }
    this.drawLoss();
  }

  /**
   * Chips for the validation findings, each a click away from its zoom: the best (early-stopping) step of each
   * judged series, and the NaN evaluations, one chip per run of consecutive ones (`nanGroups`).
   */
  validationChips() {
    const validation = this.validation();
    const judged = validation.filter((v) => v.cause !== "nonfinite" && v.best_step !== null);
    this.lossEl.dataset.bestSteps = judged.map((v) => `${v.series}:${v.best_step}`).join(",");
    const groups = nanGroups(validation);
    this.lossEl.dataset.nanSteps = [...new Set(groups.flatMap((g) => g.steps))].sort((a, b) => a - b).join(",");
    this.lossEl.dataset.nanGroups = groups.map((g) => (g.steps.length > 1 ? `${g.first}-${g.last}` : `${g.first}`))
      .join(",");
    const shown = groups.slice(0, MAX_NAN_CHIPS);
    return [
      ...judged.map((v) => h("button", {
        class: `best-chip${v.cause ? " degraded" : ""}`, type: "button",
        dataset: { step: String(v.best_step), series: v.series },
        title: `Best ${seriesLabel(v.series)}: ${formatValue(v.best_value)} at step ${formatStep(v.best_step)}`
          + (v.cause ? ", the early-stopping point (it got worse after it)" : "") + ". Click to zoom.",
        onclick: () => this.app.zoomAround(v.best_step),
      }, `◆ ${v.cause ? "early stop" : "best"} ${seriesLabel(v.series)} @ ${formatStep(v.best_step)}`)),
      ...shown.map((g) => this.nanChip(g)),
      groups.length > shown.length
        ? h("span", { class: "ep-more nan-more", text: `+${groups.length - shown.length} more NaN` }) : null,
    ];
  }

  nanChip(g) {
    const name = nanGroupName(g);
    const n = g.steps.length;
    return h("button", {
      class: "nan-chip", type: "button",
      dataset: { step: String(g.first), end: String(g.last), count: String(n), series: g.series.join(",") },
      title: n > 1
        ? `${name}/Inf at ${n} evaluations in a row, steps ${formatStep(g.first)}–${formatStep(g.last)} (no finite `
          + "evaluation between them). Click to zoom."
        : `${name}/Inf at step ${formatStep(g.first)}. Click to zoom.`,
      onclick: () => (n > 1 ? this.app.zoomToSteps(g.first, g.last) : this.app.zoomAround(g.first)),
    }, n > 1 ? `✕ ${name} from ${formatStep(g.first)} (${n} evaluations)` : `✕ ${name} @ ${formatStep(g.first)}`);
  }

  /** Which line the loss chart's second axis shows: the total gradient norm or a validation metric. */
  rightAxisSelect() {
    const metrics = Object.entries(this.loss.val_metrics || {}).filter(([, line]) => line && line.steps.length);
    const choices = [];
    if (this.loss.total_grad_norm && this.loss.total_grad_norm.steps.length) {
      choices.push(["total_grad_norm", "total grad norm"]);
    }
    for (const [name] of metrics) choices.push([name, seriesLabel(name)]);
    if (!choices.some(([name]) => name === this.right)) {
      const degraded = this.validation().find((v) => v.cause && v.cause !== "nonfinite"
        && metrics.some(([name]) => name === v.series));
      this.right = degraded ? degraded.series : choices.length ? choices[0][0] : null;
    }
    this.lossEl.dataset.rightAxis = this.right || "";
    if (choices.length < 2) return null;
    return h("label", { class: "toggle", title: "Line on the right axis" }, "right axis ",
      h("select", { class: "right-axis", "aria-label": "Right axis",
        onchange: (e) => {
          this.right = e.target.value;
          this.lossEl.dataset.rightAxis = this.right;
          this.drawLoss();
        } }, choices.map(([value, text]) => h("option", { value, text, selected: value === this.right }))));
  }

  drawLoss() {
    if (!this.lossChart || !this.loss) return;
    this.lossWidth = this.lossEl.clientWidth;
    const { option, marks } = lossOption({ loss: this.loss, episodes: this.episodes(), validation: this.validation(),
      full: this.app.fullRange(), view: this.app.range(), width: plotWidth(this.lossEl), pal: this.app.palette(),
      logY: this.logY, right: this.right });
    // What the chart marks, for whoever checks it without reading its canvas.
    const view = this.app.view;
    Object.assign(this.lossEl.dataset, { nanLines: String(marks.nanLines), nanSpans: String(marks.nanSpans),
      labels: JSON.stringify(marks.labels), hiddenLabels: String(marks.hiddenLabels),
      labelView: view ? `${Math.round(view.start)}-${Math.round(view.end)}` : "" });
    this.applyingView = true;
    this.lossChart.setOption(option, { notMerge: true });
    this.applyingView = false;
    this.applyLossView();
  }

  applyLossView() {
    if (!this.lossChart) return;
    const full = this.app.fullRange();
    const view = this.app.view;
    const zoom = view ? { startValue: view.start, endValue: view.end } : { start: 0, end: 100 };
    this.applyingView = true;
    this.lossChart.setOption({ xAxis: { min: full.start, max: full.end }, dataZoom: [zoom, zoom] });
    this.applyingView = false;
  }

  onLossZoom() {
    if (this.applyingView) return;
    const dz = this.lossChart.getOption().dataZoom[0];
    const full = this.app.fullRange();
    const span = full.end - full.start;
    const start = dz.startValue ?? full.start + (dz.start / 100) * span;
    const end = dz.endValue ?? full.start + (dz.end / 100) * span;
    this.app.setView({ start, end }, this);
  }

  // --------------------------------------------------------------------------------------------------- view

  /** The shared step range changed: redraw at once; `refetch` (a zoom) also asks the backend to re-bin. */
  applyView(origin, refetch) {
    const range = this.app.range();
    if (this.heatmapData) this.heatmap.setRange(range);
    // A grown step axis changes which marker labels fit: redraw; a zoom redraws when its data comes back.
    if (!refetch) this.drawLoss();
    else if (origin !== this || !this.app.view) this.applyLossView();
    for (const { chart } of this.drillCharts) {
      if (chart) chart.setOption({ xAxis: { min: range.start, max: range.end } });
    }
    if (this.histView && this.histView.data) this.histView.setRange(range);
    if (!refetch) return;
    if (this.info.has_layers) this.schedule("heatmap", () => this.loadHeatmap());
    if (this.layer) this.schedule("layer", () => this.loadLayerMetrics());
    this.schedule("loss", () => this.reloadLoss());
  }

  async reloadLoss() {
    let loss;
    try {
      loss = await this.slots.loss.run((signal) => getJson("loss", { run: this.info.run, ...this.windowParams() },
        signal));
    } catch (err) {
      if (isAbort(err)) return;
      this.status(`Could not reload the loss: ${err.message}`);
      return;
    }
    this.loss = loss;
    this.renderLoss();
  }

  status(text) {
    this.app.status.textContent = text;
  }

  schedule(name, fn) {
    clearTimeout(this.timers[name]);
    this.timers[name] = setTimeout(fn, REFETCH_DELAY_MS);
  }

  setColorRange(range) {
    if (this.heatmapData) this.heatmap.setColorRange(range);
    this.legend.replaceChildren(...(range ? legendItems(range, this.app.palette()) : []));
  }

  // ---------------------------------------------------------------------------------------------- drill-down

  showLayer(name) {
    this.layer = name;
    this.heatmap.setSelected(name);
    if (!this.info.has_layers) {
      this.drillEl.hidden = true;
      return;
    }
    const known = !this.heatmapData || this.heatmapData.layers.includes(name);
    this.drillEl.hidden = false;
    this.drillEl.dataset.layer = name;
    this.disposeDrill();
    const head = h("div", { class: "block-head" },
      h("div", { class: "block-title" }, "Layer ", h("span", { class: "drill-name", text: name })),
      h("button", { class: "link", type: "button", text: "close", onclick: () => this.app.selectLayer(null) }));
    if (!known) {
      this.drillEl.replaceChildren(head, message("empty", "This run has no layer of that name.",
        "Layer names come from the model; the other run may have renamed or removed it."));
      return;
    }
    const body = h("div", { class: "drill-body" });
    for (const spec of DRILL_METRICS.filter((m) => this.hasMetric(m.metric))) {
      const el = h("div", { class: "chart layer-chart", dataset: { metric: spec.metric } });
      const slot = h("div", { class: "drill-slot" }, el);
      body.append(slot);
      this.drillCharts.push({ spec, el, slot, chart: null, data: null });
    }
    if (this.info.has_histograms) {
      this.histView = new HistogramView({ palette: () => this.app.palette(), onZoom: (range) => this.app.setView(range, this) });
      this.histSlot = h("div", { class: "drill-slot" }, message("loading", "Loading gradient histograms…"));
      body.append(h("div", { class: "drill-sub", text: "Gradient |g| distribution over time (share of the layer's "
        + "entries per log10 bin; NaN/Inf on top)" }), this.histSlot);
    }
    this.drillEl.replaceChildren(head, body);
    this.loadLayerMetrics();
    if (this.histView) this.loadHistograms();
  }

  /** Whether the run recorded `metric` (older backends do not list metrics: then ask for every one). */
  hasMetric(metric) {
    return !this.info.metrics || this.info.metrics.includes(metric);
  }

  hideLayer() {
    this.layer = null;
    this.heatmap.setSelected(null);
    this.disposeDrill();
    this.drillEl.hidden = true;
  }

  disposeDrill() {
    for (const d of this.drillCharts) if (d.chart) d.chart.dispose();
    this.drillCharts = [];
    if (this.histView) this.histView.destroy();
    this.histView = null;
  }

  async loadLayerMetrics() {
    const name = this.layer;
    const view = this.app.view;
    const range = this.windowParams();
    const charts = this.drillCharts;
    let answers;
    try {
      answers = await this.slots.layer.run((signal) => Promise.allSettled(charts.map(({ spec }) =>
        getJson("layer", { run: this.info.run, layer: name, metric: spec.metric, ...range }, signal))));
    } catch (err) {
      if (isAbort(err)) return;
      throw err;
    }
    if (name !== this.layer || charts !== this.drillCharts) return;
    answers.forEach((answer, i) => {
      const d = charts[i];
      if (answer.status === "rejected") {
        if (isAbort(answer.reason)) return;
        if (d.chart) d.chart.dispose();
        d.chart = null;
        d.slot.replaceChildren(message("empty", `No ${d.spec.title} for this layer.`, answer.reason.message));
        return;
      }
      d.data = answer.value;
      if (!d.data.values.some((v) => v !== null)) {
        if (d.chart) d.chart.dispose();
        d.chart = null;
        d.slot.replaceChildren(message("empty", `No ${d.spec.title} recorded for this layer`
          + (view ? " in the zoomed range." : ".")));
        return;
      }
      if (!d.el.isConnected) d.slot.replaceChildren(d.el);
      if (!d.chart) d.chart = createChart(d.el);
      this.drawDrillChart(d);
    });
  }

  drawDrillChart(d) {
    // Norms span decades: a log axis (a zero, e.g. a frozen step, leaves a gap rather than a linear axis).
    const positive = d.data.values.some((v) => v !== null && v > 0);
    d.chart.setOption(layerOption({ data: d.data, title: d.spec.title, range: this.app.range(),
      width: plotWidth(d.el), pal: this.app.palette(), log: d.spec.log && positive, episodes: this.episodes() }), { notMerge: true });
  }

  async loadHistograms() {
    const name = this.layer;
    const view = this.histView;
    let data;
    try {
      data = await this.slots.hist.run((signal) => getJson("histograms", { run: this.info.run, layer: name }, signal));
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

  // ------------------------------------------------------------------------------------------------- theme

  redraw() {
    this.heatmap.draw();
    this.drawLoss();
    for (const d of this.drillCharts) if (d.chart && d.data) this.drawDrillChart(d);
    if (this.histView) this.histView.draw();
  }

  destroy() {
    for (const slot of Object.values(this.slots)) if (slot.controller) slot.controller.abort();
    for (const t of Object.values(this.timers)) clearTimeout(t);
    if (this.lossResize) this.lossResize.disconnect();
    if (this.lossChart) this.lossChart.dispose();
    this.heatmap.destroy();
    this.disposeDrill();
    clear(this.el);
    this.el.remove();
  }
}

/** The width in pixels of a step chart's plot inside `el` (a chart not laid out yet counts as a narrow one). */
function plotWidth(el) {
  return Math.max(200, el.clientWidth - GUTTER - RIGHT);
}

function legendItems([lo, hi], pal) {
  const bar = h("canvas", { class: "legend-bar", width: "96", height: "8" });
  const ctx = bar.getContext("2d");
  const grad = ctx.createLinearGradient(0, 0, 96, 0);
  grad.addColorStop(0, "rgb(68,1,84)");
  grad.addColorStop(0.5, "rgb(32,144,140)");
  grad.addColorStop(1, "rgb(253,231,37)");
  ctx.fillStyle = grad;
  ctx.fillRect(0, 0, 96, 8);
  const [r, g, b] = pal.nonfinite;
  return [
    h("span", { text: formatValue(10 ** lo) }), bar, h("span", { text: formatValue(10 ** hi) }),
    h("span", { class: "swatch", style: { background: `rgb(${r},${g},${b})` } }), h("span", { text: "NaN/Inf" }),
    h("span", { class: "swatch swatch-episode", style: { borderColor: pal.episode.explosion } }),
    h("span", { text: "episode" }),
    h("span", { class: "swatch-offending", text: "▶" }), h("span", { text: "offending layer" }),
  ];
}
