// The tab: run pickers, the shared step range and layer selection, one RunPanel per selected run, live reload.

import { getJson } from "./api.js";
import { h, message } from "./dom.js";
import { loadMetrics, metricLabel } from "./metrics.js";
import { RunOverview, findingCount } from "./overview.js";
import { RunPanel } from "./panel.js";
import { Theme } from "./theme.js";

/** TensorBoard's own auto-reload period. */
const RELOAD_MS = 30000;
const LOADING_POLL_MS = 1000;
/** From this many runs on, the tab opens on the run overview (a table of all runs) rather than on one run. */
const OVERVIEW_RUNS = 20;
/** The heatmap's metric choices, in the order offered (named by the served metric registry). */
const HEATMAP_METRICS = ["grad_norm", "update_ratio", "grad_max_abs", "param_norm"];

export class App {
  constructor(root) {
    this.root = root;
    this.theme = new Theme();
    this.runs = [];
    this.metric = "grad_norm";
    this.view = null;
    this.layer = null;
    this.panels = [];
    this.full = { start: 0, end: 1 };
    this.polling = false;
    this.loading = false;
    this.preferred = null;
    // While the first read of the logdir runs, the tab follows the most interesting run read so far, until the user
    // picks a run.
    this.autoPick = true;

    const picked = () => {
      this.autoPick = false;
      this.showRunView();
    };
    this.runA = h("select", { id: "run-a", "aria-label": "Run", onchange: picked });
    this.runB = h("select", { id: "run-b", "aria-label": "Compare with", onchange: picked });
    this.metricSelect = h("select", { id: "metric", "aria-label": "Heatmap metric", onchange: (e) => this.setMetric(e.target.value) });
    this.resetButton = h("button", { id: "reset-zoom", type: "button", disabled: true, text: "Reset zoom",
      onclick: () => this.setView(null, null) });
    this.overviewButton = h("button", { id: "overview-toggle", type: "button", "aria-pressed": "false",
      text: "All runs", onclick: () => (this.overview.shown ? this.showRunView() : this.showOverview()) });
    this.overview = new RunOverview({ onOpen: (run) => this.openRun(run) });
    // Until the user shows or leaves the overview, it is shown when the logdir holds many runs.
    this.overviewChosen = false;
    this.status = h("span", { class: "status", role: "status" });
    this.main = h("div", { class: "panels" });
    this.el = h("div", { class: "app" },
      h("div", { class: "toolbar" },
        h("label", {}, h("span", { text: "Run" }), this.runA),
        h("label", {}, h("span", { text: "Compare with" }), this.runB),
        h("label", {}, h("span", { text: "Heatmap" }), this.metricSelect),
        this.resetButton,
        this.overviewButton,
        this.status),
      this.overview.el,
      this.main);
    this.theme.onChange(() => this.panels.forEach((p) => p.redraw()));
  }

  palette() {
    return this.theme.palette;
  }

  async start() {
    this.root.append(this.el);
    this.main.replaceChildren(message("loading", "Loading runs…"));
    await this.poll(true);
    setInterval(() => this.poll(false), RELOAD_MS);
    this.watchReloadButton();
  }

  /** Also reload when the user presses TensorBoard's reload button (same-origin parent). */
  watchReloadButton() {
    let doc = null;
    try {
      doc = window.parent !== window ? window.parent.document : null;
    } catch {
      doc = null;
    }
    if (!doc) return;
    doc.addEventListener("click", (e) => {
      if (e.target instanceof Element && e.target.closest(".reload-button")) this.poll(false);
    }, true);
  }

  async poll(first) {
    if (this.polling) return;
    this.polling = true;
    try {
      const [answer] = await Promise.all([getJson("runs"), loadMetrics()]);
      this.fillMetricSelect();
      this.loading = Boolean(answer.loading);
      const count = answer.runs.length;
      this.status.textContent = this.loading
        ? `Reading the logdir… ${count} run${count === 1 ? "" : "s"} so far`
        : `Updated ${new Date().toLocaleTimeString()}`;
      this.status.classList.remove("error");
      await this.updateRuns(answer.runs, first);
      if (answer.error) this.status.textContent = `TensorBoard could not read the logdir: ${answer.error}`;
      // While the backend is still reading the logdir, look again soon instead of at the next reload.
      if (this.loading) setTimeout(() => this.poll(false), LOADING_POLL_MS);
    } catch (err) {
      if (first || !this.panels.length) {
        this.main.replaceChildren(message("error", "Could not load the list of runs.", err.message,
          "Check that TensorBoard is still running, then press its reload button."));
      }
      this.status.textContent = `Reload failed: ${err.message}`;
      this.status.classList.add("error");
    } finally {
      this.polling = false;
    }
  }

  async updateRuns(runs, first) {
    const before = new Map(this.runs.map((r) => [r.run, r]));
    this.runs = runs;
    const names = runs.map((r) => r.run);
    this.overviewButton.textContent = `All runs (${runs.length})`;
    if (!this.overviewChosen && this.autoPick && runs.length >= OVERVIEW_RUNS) this.setOverview(true);
    const listChanged = first || names.join("\n") !== [...before.keys()].join("\n");
    if (!runs.length) {
      this.overview.update(runs, null);
      this.fillSelects();
      this.disposePanels();
      this.main.replaceChildren(this.loading ? message("loading", "Reading the logdir…") : message("empty", "No runs with gradient data yet.",
        "Log training with tb_gradient_plugin (GradientMonitor for PyTorch, GradientMonitorCallback for Keras, "
        + "or GradientWriter), or point TensorBoard at runs written by Lightning, Hugging Face, Keras, YOLOv5 or "
        + "Ignite: their loss and gradient norms show here too.",
        "This page checks for new data every 30 seconds and when you press TensorBoard's reload button."));
      return;
    }
    if (!this.panels.length || this.autoPick) this.preferred = await this.mostInteresting(runs);
    if (listChanged) this.fillSelects();
    else if (this.autoPick && names.includes(this.preferred)) this.runA.value = this.preferred;
    // The last update of the first read still moves to a worse run; after it the choice stays the user's.
    const follow = this.autoPick && this.panels.length > 0 && this.panels[0].info.run !== this.runA.value;
    if (!this.loading) this.autoPick = false;
    this.overview.update(runs, this.runA.value);
    // Panels are not drawn behind the overview: they catch up when the run view is shown again.
    if (this.overview.shown) return;
    await this.syncPanels(follow);
  }

  /** Open (or rebuild) the picked runs' panels, or bring open panels up to the runs' current versions. */
  async syncPanels(follow) {
    const names = this.runs.map((r) => r.run);
    if (!this.panels.length || follow || this.panels.some((p) => !names.includes(p.info.run))) {
      await this.selectRuns();
      return;
    }
    await Promise.all(this.panels.map((p) => {
      const info = this.runs.find((r) => r.run === p.info.run);
      return info.version !== p.info.version ? p.refresh(info) : null;
    }));
  }

  // ------------------------------------------------------------------------------------------------- run overview

  setOverview(flag) {
    this.overview.show(flag);
    this.main.hidden = flag;
    this.overviewButton.setAttribute("aria-pressed", String(flag));
  }

  showOverview() {
    this.overviewChosen = true;
    this.overview.update(this.runs, this.runA.value);
    this.setOverview(true);
  }

  /** Leave the overview for the runs picked in the toolbar. */
  async showRunView() {
    this.overviewChosen = true;
    this.setOverview(false);
    if (!this.runs.length) return;
    await this.selectRuns();
    await this.syncPanels(false);
  }

  /** A row of the overview was picked: open that run (the comparison run stays). */
  async openRun(run) {
    this.autoPick = false;
    this.runA.value = run;
    if (this.runB.value === run) this.runB.value = "";
    await this.showRunView();
  }

  /** The heatmap's metric choices, once the metric registry (their labels) has arrived. */
  fillMetricSelect() {
    if (this.metricSelect.options.length) return;
    this.metricSelect.replaceChildren(...HEATMAP_METRICS.map((value) => h("option",
      { value, text: `log10 ${metricLabel(value)}` })));
    this.metricSelect.value = this.metric;
  }

  fillSelects() {
    const keepA = this.runA.value;
    const keepB = this.runB.value;
    // AMP overflow skips are normal: they do not count towards the warning sign.
    const option = (r) => h("option", { value: r.run, text: findingCount(r) ? `${r.run} (${findingCount(r)} ⚠)` : r.run });
    this.runA.replaceChildren(...this.runs.map(option));
    this.runB.replaceChildren(h("option", { value: "", text: "— none —" }), ...this.runs.map(option));
    const names = this.runs.map((r) => r.run);
    const fallback = names.includes(this.preferred) ? this.preferred : names[0] || "";
    this.runA.value = names.includes(keepA) && !this.autoPick ? keepA : fallback;
    this.runB.value = names.includes(keepB) ? keepB : "";
  }

  /**
   * The run to open on, so the first look shows a problem if there is one: the most episodes that broke training
   * (the runs route's `alarming`: explosions, chronic instability, non-finite values and evaluations), ties broken
   * by the most recent run, then by episodes of any kind. No run's episode list is read.
   */
  async mostInteresting(runs) {
    const recency = await this.recencyRanks(runs);
    const key = (r) => [r.alarming || 0, recency.get(r.run) ?? -1, r.episodes];
    let pick = null;
    for (const r of runs) {
      if (!pick) {
        pick = r;
        continue;
      }
      const [a, b] = [key(r), key(pick)];
      const i = a.findIndex((v, j) => v !== b[j]);
      if (i >= 0 && a[i] > b[i]) pick = r;
    }
    return pick ? pick.run : null;
  }

  /**
   * Run name -> recency (higher = more recent): the wall time of each run's first event where the runs route has it
   * for every run, else the position in TensorBoard's run list (ordered by start time), where it answers.
   */
  async recencyRanks(runs) {
    if (runs.every((r) => typeof r.first_wall_time === "number")) {
      return new Map(runs.map((r) => [r.run, r.first_wall_time]));
    }
    const ranks = new Map();
    let order;
    try {
      order = await getJson("../../runs");
    } catch {
      return ranks;
    }
    if (!Array.isArray(order)) return ranks;
    // TensorBoard may name sub-directories as runs of their own (a Keras run's train/ and validation/): such a
    // name counts for the longest of our runs it lies in.
    const ours = new Set(runs.map((r) => r.run));
    order.forEach((name, i) => {
      let run = typeof name === "string" ? name : "";
      while (run && !ours.has(run)) run = run.includes("/") ? run.slice(0, run.lastIndexOf("/")) : "";
      if (run) ranks.set(run, i);
    });
    return ranks;
  }

  async selectRuns() {
    const chosen = [this.runA.value, this.runB.value].filter((r, i, all) => r && all.indexOf(r) === i);
    const current = this.panels.map((p) => p.info.run);
    if (chosen.join("\n") === current.join("\n")) return;
    this.disposePanels();
    this.view = null;
    this.resetButton.disabled = true;
    this.panels = chosen.map((run) => new RunPanel(this, this.runs.find((r) => r.run === run)));
    this.main.classList.toggle("compare", this.panels.length > 1);
    this.main.replaceChildren(...this.panels.map((p) => p.el));
    await Promise.all(this.panels.map((p) => p.load()));
    if (this.layer) this.panels.forEach((p) => p.showLayer(this.layer));
  }

  disposePanels() {
    for (const p of this.panels) p.destroy();
    this.panels = [];
  }

  setMetric(metric) {
    this.metric = metric;
    for (const p of this.panels) p.loadHeatmap();
  }

  // ----------------------------------------------------------------------------------------- shared step axis

  fullRange() {
    return this.full;
  }

  range() {
    return this.view || this.full;
  }

  /** The zoomed step window as route parameters (`start`, `end`); none when the whole run is shown. */
  windowParams() {
    const view = this.view;
    return view ? { start: Math.floor(view.start), end: Math.ceil(view.end) } : {};
  }

  /** A panel got new data: the shared step axis and colour scale may have grown. */
  dataChanged() {
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of this.panels) {
      const r = p.stepRange();
      if (r) {
        lo = Math.min(lo, r[0]);
        hi = Math.max(hi, r[1]);
      }
    }
    if (lo <= hi) {
      const full = { start: lo, end: Math.max(hi, lo + 1) };
      if (full.start !== this.full.start || full.end !== this.full.end) {
        this.full = full;
        for (const p of this.panels) p.applyView(null, false);
      }
    }
    let cLo = Infinity;
    let cHi = -Infinity;
    for (const p of this.panels) {
      const e = p.heatmapData ? p.heatmap.logExtent() : null;
      if (e) {
        cLo = Math.min(cLo, e[0]);
        cHi = Math.max(cHi, e[1]);
      }
    }
    for (const p of this.panels) p.setColorRange(cLo <= cHi ? [cLo, cHi] : null);
  }

  /** Zoom every chart to `view` ({start, end} in steps; null = everything). */
  setView(view, origin) {
    let next = null;
    if (view) {
      const start = Math.max(this.full.start, Math.min(view.start, view.end));
      const end = Math.min(this.full.end, Math.max(view.start, view.end));
      if (end > start && (start > this.full.start || end < this.full.end)) next = { start, end };
    }
    const same = next && this.view ? next.start === this.view.start && next.end === this.view.end : next === this.view;
    if (same) return;
    this.view = next;
    this.resetButton.disabled = !next;
    document.documentElement.dataset.view = next ? `${Math.round(next.start)}-${Math.round(next.end)}` : "";
    for (const p of this.panels) p.applyView(origin, true);
  }

  zoomToEpisode(ep) {
    if (ep.validation) {
      // From the best (early-stopping) step to the worst evaluation: where the validation curve turned.
      this.zoomToSteps(ep.validation.best_step ?? ep.start_step,
        Math.max(ep.end_step, ep.validation.worst_step ?? ep.end_step));
      return;
    }
    const last = Math.max(ep.end_step, ep.loss_spike_step ?? ep.end_step);
    const pad = Math.max(5, Math.round((last - ep.start_step + 1) * 1.5));
    this.setView({ start: ep.start_step - pad, end: last + pad }, null);
    if (ep.layers && ep.layers.length) this.selectLayer(ep.layers[0].name);
  }

  /** Zoom to steps `first`..`last` with a margin on either side (a run of NaN evaluations, say). */
  zoomToSteps(first, last) {
    const span = this.full.end - this.full.start;
    const pad = Math.max(5, Math.round((last - first + 1) * 0.15), Math.round(span * 0.02));
    this.setView({ start: first - pad, end: last + pad }, null);
  }

  zoomAround(step) {
    const span = this.full.end - this.full.start;
    const pad = Math.max(10, Math.round(span * 0.03));
    this.setView({ start: step - pad, end: step + pad }, null);
  }

  selectLayer(name) {
    this.layer = name;
    for (const p of this.panels) {
      if (name) p.showLayer(name);
      else p.hideLayer();
    }
  }
}
