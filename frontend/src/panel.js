// Everything the tab shows for one run: header, episode list, heatmap, loss view (lossview.js), layer drill-down
// (drilldown.js). Two panels side by side make the run comparison; the app keeps them on one step axis.

import { Slot, getJson, isAbort } from "./api.js";
import { clear, formatStep, formatValue, h, message } from "./dom.js";
import { LayerDrillDown } from "./drilldown.js";
import { renderEpisodes } from "./episodes.js";
import { Heatmap } from "./heatmap.js";
import { GUTTER, RIGHT } from "./layout.js";
import { LossView } from "./lossview.js";
import { metricLabel, runHasMetric } from "./metrics.js";

const REFETCH_DELAY_MS = 200;
const MAX_BINS = 2000;

export const HOW_TO_LOG_LAYERS = "To see which layer explodes, log per-layer statistics with tb_gradient_plugin: "
  + "GradientMonitor (PyTorch), GradientMonitorCallback (Keras) or GradientWriter.write(step, layers, grad_norm=...).";

export class RunPanel {
  constructor(app, info) {
    this.app = app;
    this.info = info;
    this.report = null;
    this.heatmapData = null;
    this.slot = new Slot();
    this.timers = {};

    this.heatmap = new Heatmap({
      palette: () => app.palette(),
      onSelectLayer: (name) => app.selectLayer(name),
      onZoom: (range) => app.setView(range, this),
    });
    this.loss = new LossView({
      app,
      run: info.run,
      episodes: () => this.episodes(),
      transients: () => (this.report && this.report.spikes ? this.report.spikes.steps : []),
      validation: () => this.validation(),
      onZoom: (range) => app.setView(range, this),
    });
    this.drill = new LayerDrillDown({
      app,
      run: info.run,
      info: () => this.info,
      layers: () => (this.heatmapData ? this.heatmapData.layers : null),
      episodes: () => this.episodes(),
      onZoom: (range) => app.setView(range, this),
    });
    this.header = h("div", { class: "run-header" });
    this.episodesEl = h("div", { class: "block episodes-block" });
    this.heatmapTitle = h("div", { class: "block-title" });
    this.legend = h("div", { class: "legend" });
    this.heatmapBody = h("div", { class: "block-body" });
    this.el = h("section", { class: "run-panel", dataset: { run: info.run } },
      this.header,
      this.episodesEl,
      h("div", { class: "block heatmap-block" },
        h("div", { class: "block-head" }, this.heatmapTitle, this.legend), this.heatmapBody),
      this.loss.el,
      this.drill.el);
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
    this.loss.showLoading();
    this.updateHeatmapTitle();
    await Promise.all([this.loadEpisodesAndLoss(), this.loadHeatmap()]);
  }

  /** New data in the run (live training): reload everything in place, keeping zoom and selection. */
  async refresh(info) {
    this.info = info;
    this.renderHeader();
    await Promise.all([this.loadEpisodesAndLoss(), this.loadHeatmap()]);
    if (this.drill.layer) this.showLayer(this.drill.layer);
  }

  async loadEpisodesAndLoss() {
    const run = this.info.run;
    const [report, loss] = await Promise.allSettled([getJson("episodes", { run }), this.loss.fetch()]);
    if (loss.status === "rejected" && isAbort(loss.reason)) return;
    if (report.status === "fulfilled") {
      this.report = report.value;
      this.episodesEl.replaceChildren(renderEpisodes(this.report, {
        run,
        onEpisode: (ep) => this.app.zoomToEpisode(ep),
        onLayer: (name) => this.app.selectLayer(name),
      }));
    } else {
      this.report = null;
      this.episodesEl.replaceChildren(message("error", "Could not load the episodes of this run.",
        report.reason.message, "Press TensorBoard's reload button to try again."));
    }
    if (loss.status === "fulfilled") this.loss.setData(loss.value);
    else this.loss.showError(loss.reason.message);
    if (this.heatmapData) this.heatmap.setSpikes(this.loss.spikeSteps());
    this.heatmap.setEpisodes(this.report ? this.report.episodes : null);
    this.drill.episodesChanged();
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
    return { ...params, ...this.app.windowParams() };
  }

  updateHeatmapTitle() {
    this.heatmapTitle.textContent = `Layers × steps — log10 ${metricLabel(this.app.metric)}`;
  }

  async loadHeatmap() {
    this.updateHeatmapTitle();
    const label = metricLabel(this.app.metric);
    if (this.info.has_layers && !runHasMetric(this.info, this.app.metric)) {
      this.heatmapData = null;
      this.legend.replaceChildren();
      this.heatmapBody.replaceChildren(message("empty", `This run did not record ${label}.`,
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
      data = await this.slot.run((signal) => getJson("heatmap", this.heatmapParams(), signal));
    } catch (err) {
      if (isAbort(err)) return;
      this.heatmapData = null;
      this.heatmapBody.replaceChildren(message("error", `Could not load the ${label} heatmap.`,
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
      this.heatmapBody.replaceChildren(message("empty", `No ${label} values in this run yet.`,
        this.app.metric === "grad_norm" ? HOW_TO_LOG_LAYERS
          : "Pick another metric above, or log this one (GradientWriter.write accepts param_norm and update_norm)."));
      return;
    }
    if (!this.heatmap.el.isConnected) this.heatmapBody.replaceChildren(this.heatmap.el);
    this.heatmap.selected = this.app.layer;
    this.heatmap.spikes = this.loss.spikeSteps();
    this.heatmap.setData(data, this.app.range());
    this.app.dataChanged();
  }

  /** [first, last] step this run has data for (layers or loss), or null. */
  stepRange() {
    let lo = Infinity;
    let hi = -Infinity;
    if (this.layerRange) [lo, hi] = this.layerRange;
    const loss = this.loss.stepRange();
    if (loss) {
      lo = Math.min(lo, loss[0]);
      hi = Math.max(hi, loss[1]);
    }
    return lo <= hi ? [lo, hi] : null;
  }

  // --------------------------------------------------------------------------------------------------- view

  /** The shared step range changed: redraw at once; `refetch` (a zoom) also asks the backend to re-bin. */
  applyView(origin, refetch) {
    const range = this.app.range();
    if (this.heatmapData) this.heatmap.setRange(range);
    // A grown step axis changes which marker labels fit: redraw; a zoom redraws when its data comes back.
    if (!refetch) this.loss.draw();
    else if (origin !== this || !this.app.view) this.loss.applyView();
    this.drill.setRange(range);
    if (!refetch) return;
    if (this.info.has_layers) this.schedule("heatmap", () => this.loadHeatmap());
    if (this.drill.layer) this.schedule("layer", () => this.drill.loadMetrics());
    this.schedule("loss", () => this.loss.reload());
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
    this.heatmap.setSelected(name);
    this.drill.show(name);
  }

  hideLayer() {
    this.heatmap.setSelected(null);
    this.drill.hide();
  }

  // ------------------------------------------------------------------------------------------------- theme

  redraw() {
    this.heatmap.draw();
    this.loss.draw();
    this.drill.redraw();
  }

  destroy() {
    this.slot.abort();
    for (const t of Object.values(this.timers)) clearTimeout(t);
    this.loss.destroy();
    this.heatmap.destroy();
    this.drill.destroy();
    clear(this.el);
    this.el.remove();
  }
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
