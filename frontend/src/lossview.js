// The loss block of one run: the loss chart (loss spikes, episodes, validation markers, a second axis for the total
// gradient norm or a validation metric) and the chips above it, each a click away from its zoom.

import { Slot, getJson, isAbort } from "./api.js";
import { createChart, lossOption } from "./charts.js";
import { formatStep, formatValue, h, message } from "./dom.js";
import { plotWidth } from "./layout.js";
import { metricLabel } from "./metrics.js";
import { nanGroupName, nanGroups, seriesLabel } from "./validation.js";

const MAX_SPIKE_CHIPS = 10;
const MAX_NAN_CHIPS = 5;

export class LossView {
  /**
   * @param {object} opts
   * @param {object} opts.app the tab (shared step range, zoom, palette, status line)
   * @param {string} opts.run the run shown
   * @param {() => object[]} opts.episodes the run's episodes (from the episodes route)
   * @param {() => number[]} opts.transients the steps of its transient gradient spikes (the report's ``spikes``)
   * @param {() => object[]} opts.validation the run's validation findings
   * @param {(range: {start: number, end: number}) => void} opts.onZoom the chart was zoomed to a step range
   */
  constructor({ app, run, episodes, transients, validation, onZoom }) {
    this.app = app;
    this.run = run;
    this.episodes = episodes;
    this.transients = transients;
    this.validation = validation;
    this.onZoom = onZoom;
    this.data = null;
    this.chart = null;
    this.resize = null;
    this.width = 0;
    this.applyingView = false;
    this.slot = new Slot();
    this.logY = false;
    this.logChosen = null; // the user's pick of the log-scale box; null: automatic
    this.right = null;
    this.head = h("div", { class: "loss-head" });
    this.chartEl = h("div", { class: "chart loss-chart" });
    this.body = h("div", { class: "block-body" });
    this.el = h("div", { class: "block loss-block" },
      h("div", { class: "block-head" }, h("div", { class: "block-title", text: "Loss" }), this.head),
      this.body);
  }

  showLoading() {
    this.body.replaceChildren(message("loading", "Loading loss…"));
  }

  /** The loss route's answer for the shared step window (a newer request aborts this one). */
  fetch() {
    return this.slot.run((signal) => getJson("loss", { run: this.run, ...this.app.windowParams() }, signal));
  }

  /** The step window changed: fetch the loss again; a failure is told on the status line, the chart stays. */
  async reload() {
    let loss;
    try {
      loss = await this.fetch();
    } catch (err) {
      if (isAbort(err)) return;
      this.app.status.textContent = `Could not reload the loss: ${err.message}`;
      return;
    }
    this.setData(loss);
  }

  showError(detail) {
    this.data = null;
    this.body.replaceChildren(message("error", "Could not load the loss of this run.", detail));
  }

  /** Loss route answer: render the chart and the chips above it. */
  setData(loss) {
    this.data = loss;
    const hasTotal = loss.total_grad_norm && loss.total_grad_norm.steps.length;
    const hasVal = loss.val_loss && loss.val_loss.steps.length;
    if (!loss.steps.length && !hasTotal && !hasVal) {
      this.body.replaceChildren(message("empty", "No loss logged in this run.",
        "Pass loss=... to GradientWriter.write (the integrations log it when you give it to them), "
        + "or log a scalar named loss."));
      this.head.replaceChildren();
      return;
    }
    const spikes = loss.spikes || [];
    this.chartEl.dataset.spikeSteps = spikes.map((s) => s.step).join(",");
    const lines = [loss.values, loss.val_loss ? loss.val_loss.values : []];
    const positive = lines.every((values) => values.every((v) => v === null || v > 0));
    // A loss that blew up by orders of magnitude is flat on a linear axis: such a chart starts logarithmic.
    const finite = lines.flat().filter((v) => v !== null && Number.isFinite(v));
    const wide = finite.length > 0 && Math.max(...finite) > 1e3 * Math.min(...finite);
    this.logY = positive && (this.logChosen ?? wide);
    this.chartEl.dataset.logY = String(this.logY);
    const logToggle = h("label", { class: "toggle", title: "Logarithmic loss axis" },
      h("input", { type: "checkbox", checked: this.logY, disabled: !positive,
        onchange: (e) => {
          this.logChosen = e.target.checked;
          this.logY = e.target.checked;
          this.chartEl.dataset.logY = String(this.logY);
          this.draw();
        } }),
      " log scale");
    const chips = spikes.slice(0, MAX_SPIKE_CHIPS).map((s) => h("button", {
      class: "spike-chip", type: "button", dataset: { step: String(s.step) },
      title: `Loss ${formatValue(s.value)}, ×${formatValue(s.ratio)} its baseline. Click to zoom.`,
      onclick: () => this.app.zoomAround(s.step),
    }, `▼ ${formatStep(s.step)}`));
    this.head.replaceChildren(...[
      h("span", { class: "spike-summary", text: spikes.length
        ? `${spikes.length} loss spike${spikes.length === 1 ? "" : "s"}:` : "no loss spikes" }),
      ...chips,
      spikes.length > chips.length ? h("span", { class: "ep-more", text: `+${spikes.length - chips.length} more` }) : null,
      ...this.validationChips(),
      this.rightAxisSelect(),
      logToggle,
    ].filter(Boolean));
    if (!this.chartEl.isConnected) this.body.replaceChildren(this.chartEl);
    if (!this.chart) {
      this.chart = createChart(this.chartEl);
      this.chart.on("datazoom", () => this.onChartZoom());
      // Which marker labels fit depends on the width: a resized chart chooses again.
      this.resize = new ResizeObserver(() => {
        if (this.chartEl.clientWidth !== this.width) this.draw();
      });
      this.resize.observe(this.chartEl);
    }
    this.draw();
  }

  /** Steps of the detector's loss spikes (the heatmap marks them too). */
  spikeSteps() {
    return this.data ? (this.data.spikes || []).map((s) => s.step) : [];
  }

  /** [first, last] step of the loss, or null. */
  stepRange() {
    if (!this.data || !this.data.steps.length) return null;
    const last = this.data.step_end || this.data.steps;
    return [this.data.steps[0], last[last.length - 1]];
  }

  /**
   * Chips for the validation findings, each a click away from its zoom: the best (early-stopping) step of each
   * judged series, and the NaN evaluations, one chip per run of consecutive ones (`nanGroups`).
   */
  validationChips() {
    const validation = this.validation();
    const judged = validation.filter((v) => v.cause !== "nonfinite" && v.best_step !== null);
    this.chartEl.dataset.bestSteps = judged.map((v) => `${v.series}:${v.best_step}`).join(",");
    const groups = nanGroups(validation);
    this.chartEl.dataset.nanSteps = [...new Set(groups.flatMap((g) => g.steps))].sort((a, b) => a - b).join(",");
    this.chartEl.dataset.nanGroups = groups.map((g) => (g.steps.length > 1 ? `${g.first}-${g.last}` : `${g.first}`))
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

  /** Which line the chart's second axis shows: the total gradient norm or a validation metric. */
  rightAxisSelect() {
    const metrics = Object.entries(this.data.val_metrics || {}).filter(([, line]) => line && line.steps.length);
    const choices = [];
    if (this.data.total_grad_norm && this.data.total_grad_norm.steps.length) {
      choices.push(["total_grad_norm", metricLabel("total_grad_norm")]);
    }
    for (const [name] of metrics) choices.push([name, seriesLabel(name)]);
    if (!choices.some(([name]) => name === this.right)) {
      const degraded = this.validation().find((v) => v.cause && v.cause !== "nonfinite"
        && metrics.some(([name]) => name === v.series));
      this.right = degraded ? degraded.series : choices.length ? choices[0][0] : null;
    }
    this.chartEl.dataset.rightAxis = this.right || "";
    if (choices.length < 2) return null;
    return h("label", { class: "toggle", title: "Line on the right axis" }, "right axis ",
      h("select", { class: "right-axis", "aria-label": "Right axis",
        onchange: (e) => {
          this.right = e.target.value;
          this.chartEl.dataset.rightAxis = this.right;
          this.draw();
        } }, choices.map(([value, text]) => h("option", { value, text, selected: value === this.right }))));
  }

  draw() {
    if (!this.chart || !this.data) return;
    this.width = this.chartEl.clientWidth;
    const { option, marks } = lossOption({ loss: this.data, episodes: this.episodes(), transients: this.transients(),
      validation: this.validation(),
      full: this.app.fullRange(), view: this.app.range(), width: plotWidth(this.chartEl), pal: this.app.palette(),
      logY: this.logY, right: this.right });
    // What the chart marks, for whoever checks it without reading its canvas.
    const view = this.app.view;
    Object.assign(this.chartEl.dataset, { nanLines: String(marks.nanLines), nanSpans: String(marks.nanSpans),
      transients: String(marks.transients),
      labels: JSON.stringify(marks.labels), hiddenLabels: String(marks.hiddenLabels),
      labelView: view ? `${Math.round(view.start)}-${Math.round(view.end)}` : "" });
    this.applyingView = true;
    this.chart.setOption(option, { notMerge: true });
    this.applyingView = false;
    this.applyView();
  }

  /** Show the shared step range (without rebuilding the chart). */
  applyView() {
    if (!this.chart) return;
    const full = this.app.fullRange();
    const view = this.app.view;
    const zoom = view ? { startValue: view.start, endValue: view.end } : { start: 0, end: 100 };
    this.applyingView = true;
    this.chart.setOption({ xAxis: { min: full.start, max: full.end }, dataZoom: [zoom, zoom] });
    this.applyingView = false;
  }

  onChartZoom() {
    if (this.applyingView) return;
    const dz = this.chart.getOption().dataZoom[0];
    const full = this.app.fullRange();
    const span = full.end - full.start;
    const start = dz.startValue ?? full.start + (dz.start / 100) * span;
    const end = dz.endValue ?? full.start + (dz.end / 100) * span;
    this.onZoom({ start, end });
  }

  destroy() {
    this.slot.abort();
    if (this.resize) this.resize.disconnect();
    if (this.chart) this.chart.dispose();
  }
}
