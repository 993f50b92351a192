// ECharts step charts (loss overlay, layer drill-down). Only the parts used are imported, to keep the
// bundle small. Tooltips are built as DOM elements with textContent, so names are never parsed as HTML.

import * as echarts from "echarts/core";
import { LineChart, ScatterChart } from "echarts/charts";
import {
  DataZoomInsideComponent,
  DataZoomSliderComponent,
  GridComponent,
  LegendComponent,
  MarkAreaComponent,
  MarkLineComponent,
  TooltipComponent,
} from "echarts/components";
import { CanvasRenderer } from "echarts/renderers";

import { h, formatStep, formatTick, formatValue } from "./dom.js";
import { GUTTER, RIGHT } from "./layout.js";
import { metricLabel } from "./metrics.js";
import { rgba } from "./theme.js";
import { causeLabel, nanGroupName, nanGroups, seriesLabel } from "./validation.js";

echarts.use([
  LineChart, ScatterChart, DataZoomInsideComponent, DataZoomSliderComponent, GridComponent, LegendComponent,
  MarkAreaComponent, MarkLineComponent, TooltipComponent, CanvasRenderer,
]);

/** An ECharts instance on `el` that follows the element's size. */
export function createChart(el) {
  const chart = echarts.init(el, null, { renderer: "canvas" });
  new ResizeObserver(() => chart.resize()).observe(el);
  return chart;
}

function axisStyle(pal) {
  return {
    axisLine: { lineStyle: { color: pal.axis } },
    axisTick: { lineStyle: { color: pal.axis } },
    axisLabel: { color: pal.textMuted, fontSize: 11, formatter: formatTick },
    splitLine: { lineStyle: { color: pal.grid } },
    nameTextStyle: { color: pal.textMuted, fontSize: 11 },
  };
}

function tooltipBase(pal) {
  return {
    trigger: "axis",
    confine: true,
    backgroundColor: pal.panel,
    borderColor: pal.grid,
    textStyle: { color: pal.text, fontSize: 12 },
    axisPointer: { type: "line", lineStyle: { color: pal.axis } },
  };
}

function stepAxis(pal, range, extra = {}) {
  return {
    type: "value",
    min: range.start,
    max: range.end,
    ...axisStyle(pal),
    splitLine: { show: false },
    axisLabel: { color: pal.textMuted, fontSize: 11, formatter: (v) => formatStep(v), hideOverlap: true },
    ...extra,
  };
}

function pairs(steps, values, positive = false) {
  const out = new Array(steps.length);
  for (let i = 0; i < steps.length; i++) {
    const v = values[i];
    out[i] = [steps[i], v === null || (positive && !(v > 0)) ? null : v];
  }
  return out;
}

/**
 * Which marker labels a chart shows. Markers come in data-dependent numbers (episodes, NaN evaluations, best steps,
 * loss spikes), and labels on one row that lie closer than their width overlap into an unreadable band. Offered in
 * priority order, a label is kept when its box on its row, in pixels for the current window and width, clears every
 * label kept before it; the marker of a hidden label is still drawn.
 */
class LabelRows {
  constructor(view, width) {
    this.view = view;
    this.width = width;
    this.rows = new Map();
    this.shown = [];
    this.hidden = 0;
  }

  x(step) {
    return ((step - this.view.start) / Math.max(1e-9, this.view.end - this.view.start)) * this.width;
  }

  /**
   * Whether `text` may show on `row`, anchored at step `at` (`align`: "center", or "right" for a label that ends
   * `inset` pixels left of `at`). A label whose anchor lies outside the window takes no room.
   */
  place(row, text, at, align = "center", inset = 0) {
    const x = this.x(at);
    if (x < -0.5 || x > this.width + 0.5) return false;
    const w = textWidth(text) + LABEL_PAD;
    const left = align === "right" ? x - inset - w : x - w / 2;
    const box = [left, left + w];
    const taken = this.rows.get(row) || [];
    if (taken.some(([a, b]) => box[0] < b && a < box[1])) {
      this.hidden++;
      return false;
    }
    taken.push(box);
    this.rows.set(row, taken);
    this.shown.push({ row, text, left: Math.round(box[0]), right: Math.round(box[1]) });
    return true;
  }
}

const LABEL_FONT = "10px sans-serif"; // ECharts' default family, at the size of every marker label
const LABEL_PAD = 6;
let measure = null;

function textWidth(text) {
  if (!measure) measure = document.createElement("canvas").getContext("2d");
  measure.font = LABEL_FONT;
  return measure.measureText(text).width;
}

/** Where a marker area's label sits: the middle of the part of [a, b] inside the window. */
function visibleMiddle(a, b, view) {
  return (Math.max(a, view.start) + Math.min(b, view.end)) / 2;
}

/** Shading for episodes, named where `labels` (a LabelRows) finds room; NaN evaluations are validationMarkers'. */
function episodeAreas(episodes, pal, labels) {
  // Several validation series may degrade over the same steps: one area for them, not a darker stack.
  const seen = new Set();
  const shown = episodes.filter((ep) => {
    if (!ep.validation) return true;
    if (ep.kind === "nonfinite") return false;
    const key = `${ep.kind}:${ep.start_step}:${ep.end_step}:${ep.validation.cause}`;
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
  const { view } = labels;
  return shown.map((ep) => {
    const [a, b] = [ep.start_step - 0.5, ep.end_step + 0.5];
    if (ep.validation) {
      // A validation finding: a dashed frame from the best step to the last evaluation, labelled with its cause, so
      // it reads as "the evaluations got worse" and never as one more gradient episode.
      const color = pal.episode.val_degradation;
      const text = `validation: ${causeLabel(ep.validation.cause)}`;
      return [
        {
          xAxis: a,
          itemStyle: { color: rgba(color, pal.episodeAlpha / 2), borderColor: color, borderWidth: 1,
            borderType: "dashed" },
          label: { show: labels.place("inside", text, Math.min(b, view.end), "right", 5),
            position: "insideTopRight", color, fontSize: 10, formatter: text },
        },
        { xAxis: b },
      ];
    }
    const color = pal.episode[ep.kind] || pal.accent;
    const text = ep.kind.replace("_", " ");
    return [
      {
        xAxis: a,
        itemStyle: { color: rgba(color, pal.episodeAlpha) },
        label: { show: labels.place("inside", text, visibleMiddle(a, b, view)),
          position: "insideTop", color, fontSize: 10, formatter: text },
      },
      { xAxis: b },
    ];
  });
}

/** A line of the loss route ({steps, values, ...}) that holds at least one point. */
function hasPoints(line) {
  return Boolean(line && line.steps && line.steps.length);
}

/**
 * The best points (early-stopping points) of the validation findings and their NaN evaluations, labelled above the
 * plot so the step to keep can be read off the chart: a vertical line per best step and per isolated NaN
 * evaluation, one dashed span per run of consecutive NaN evaluations (`nanGroups`). Best steps claim their label
 * room first, then the longest NaN runs.
 */
function validationMarkers(validation, pal, labels) {
  const lines = [];
  const areas = [];
  const byStep = new Map();
  for (const f of validation.filter((v) => v.cause !== "nonfinite" && v.best_step !== null)) {
    if (!byStep.has(f.best_step)) byStep.set(f.best_step, []);
    byStep.get(f.best_step).push(f);
  }
  for (const [step, found] of byStep) {
    const degraded = found.some((f) => f.cause !== null);
    const text = `◆ ${degraded ? "early stop" : "best"} @ ${formatStep(step)}`;
    lines.push({
      xAxis: step,
      lineStyle: { color: pal.valLine, type: "solid", width: degraded ? 1.5 : 1, opacity: degraded ? 1 : 0.6 },
      label: { show: labels.place("above", text, step), position: "end", color: pal.valLine, fontSize: 10,
        formatter: text },
    });
  }
  const color = pal.episode.nonfinite;
  const groups = nanGroups(validation);
  const byLength = [...groups].sort((a, b) => b.steps.length - a.steps.length || a.first - b.first);
  const show = new Map(byLength.map((g) => {
    const text = `✕ ${nanGroupName(g)}${g.steps.length > 1 ? ` (${g.steps.length} evaluations)` : ""}`;
    const at = g.steps.length > 1 ? visibleMiddle(g.first - 0.5, g.last + 0.5, labels.view) : g.first;
    return [g, { text, show: labels.place("above", text, at) }];
  }));
  for (const g of groups) {
    const { text, show: visible } = show.get(g);
    const label = { show: visible, color, fontSize: 10, formatter: text };
    if (g.steps.length === 1) {
      lines.push({ name: "nan", xAxis: g.first, lineStyle: { color, type: "dashed", width: 1.5 },
        label: { ...label, position: "end" } });
    } else {
      areas.push([
        { name: "nan", xAxis: g.first - 0.5, label: { ...label, position: "top" },
          // Light: the gradient episode that made the model NaN usually shades the same steps.
          itemStyle: { color: rgba(color, pal.episodeAlpha / 2), borderColor: color, borderWidth: 1.5,
            borderType: "dashed" } },
        { xAxis: g.last + 0.5 },
      ]);
    }
  }
  return { lines, areas };
}

/**
 * Loss curve with spikes, episodes shaded behind it, the gap from each episode's peak to the spike it caused; the
 * validation loss on the same axis with its best step marked; `right` picks the second axis's line: "total_grad_norm"
 * or one of `loss.val_metrics` (accuracy, mAP...). `view` (the step window shown) and `width` (the plot's width in
 * pixels) decide which marker labels fit. Returns the ECharts option and `marks`, what the chart marks and labels.
 */
export function lossOption({ loss, episodes, transients = [], validation, full, view, width, pal, logY, right }) {
  const labels = new LabelRows(view, width);
  const markers = validationMarkers(validation, pal, labels);
  const spikes = loss.spikes || [];
  const gaps = [];
  for (const s of spikes) {
    const ep = s.episode === null || s.episode === undefined ? null : episodes[s.episode];
    if (ep && s.step > ep.peak_step && s.value !== null) {
      const text = `+${s.step - ep.peak_step} steps`;
      gaps.push([
        { coord: [ep.peak_step, s.value], symbol: "circle", symbolSize: 5 },
        { coord: [s.step, s.value], symbol: "arrow", symbolSize: 7,
          label: { show: labels.place("gap", text, s.step), formatter: text, color: pal.spike, fontSize: 10 } },
      ]);
    }
  }
  const series = [
    {
      name: metricLabel("loss"),
      type: "line",
      data: pairs(loss.steps, loss.values, logY),
      showSymbol: false,
      sampling: "minmax",
      lineStyle: { width: 1.25, color: pal.line },
      itemStyle: { color: pal.line },
      connectNulls: false,
      z: 3,
      markArea: { silent: true, data: episodeAreas(episodes, pal, labels) },
      markLine: { silent: true, animation: false, lineStyle: { color: pal.spike, type: "dashed", width: 1 },
        data: gaps },
    },
    {
      name: "loss spike",
      type: "scatter",
      data: spikes.filter((s) => s.value !== null).map((s) => [s.step, s.value, s.ratio, s.episode]),
      symbol: "triangle",
      symbolSize: 11,
      symbolRotate: 180,
      itemStyle: { color: pal.spike, borderColor: pal.background, borderWidth: 1 },
      z: 5,
    },
  ];
  if (loss.full_resolution === false && loss.min && loss.max) series.unshift(...envelopeSeries(loss, pal, logY));
  const yAxis = [{ type: logY ? "log" : "value", scale: true, ...axisStyle(pal) }];
  const metrics = loss.val_metrics || {};
  const rightLine = right === "total_grad_norm" ? loss.total_grad_norm : metrics[right];
  if (hasPoints(rightLine)) {
    const isNorm = right === "total_grad_norm";
    const color = isNorm ? pal.secondLine : pal.valMetric;
    yAxis.push({ type: isNorm ? "log" : "value", scale: true, position: "right", ...axisStyle(pal),
      splitLine: { show: false }, axisLabel: { color, fontSize: 11, formatter: formatTick } });
    series.push({
      name: isNorm ? metricLabel("total_grad_norm") : seriesLabel(right),
      type: "line",
      yAxisIndex: 1,
      data: pairs(rightLine.steps, rightLine.values, isNorm),
      showSymbol: !isNorm && rightLine.steps.length < 200,
      symbolSize: 4,
      sampling: isNorm ? "minmax" : undefined,
      lineStyle: { width: 1, color, opacity: isNorm ? 0.8 : 1, type: isNorm ? "solid" : "dotted" },
      itemStyle: { color },
      z: isNorm ? 2 : 4,
    });
  }
  const best = [];
  for (const f of validation.filter((v) => v.cause !== "nonfinite" && v.best_step !== null && v.best_value !== null)) {
    if (f.series === "val_loss") best.push({ value: [f.best_step, f.best_value, f.series], yAxisIndex: 0 });
    else if (f.series === right && hasPoints(rightLine)) best.push({ value: [f.best_step, f.best_value, f.series] });
  }
  if (hasPoints(loss.val_loss)) {
    series.push({
      name: "val loss",
      type: "line",
      data: pairs(loss.val_loss.steps, loss.val_loss.values, logY),
      showSymbol: loss.val_loss.steps.length < 200,
      symbolSize: 4,
      connectNulls: false,
      lineStyle: { width: 1.5, color: pal.valLine, type: "dashed" },
      itemStyle: { color: pal.valLine },
      z: 4,
    });
  }
  for (const [axis, points] of [[0, best.filter((b) => b.value[2] === "val_loss")],
    [1, best.filter((b) => b.value[2] !== "val_loss")]]) {
    if (!points.length) continue;
    series.push({
      name: "best (early stop)",
      type: "scatter",
      yAxisIndex: axis,
      data: points.map((b) => b.value),
      symbol: "diamond",
      symbolSize: 12,
      itemStyle: { color: pal.valLine, borderColor: pal.background, borderWidth: 1.5 },
      z: 6,
    });
  }
  series.push({ name: "validation markers", type: "line", data: [], silent: true,
    markLine: { silent: true, animation: false, symbol: "none", data: markers.lines },
    markArea: { silent: true, data: markers.areas } });
  if (transients.length) {
    // Transient gradient spikes (nothing broke): thin dotted lines, a rate rather than episodes.
    series.push({ name: "transient gradient spike", type: "line", data: [], silent: true,
      itemStyle: { color: pal.secondLine },
      markLine: { silent: true, animation: false, symbol: "none", label: { show: false },
        lineStyle: { color: pal.secondLine, type: "dotted", width: 1, opacity: 0.7 },
        data: transients.map((step) => ({ xAxis: step })) } });
  }
  const hidden = new Set(["min", "range", "validation markers"]);
  const marks = {
    nanLines: markers.lines.filter((m) => m.name === "nan").length,
    nanSpans: markers.areas.length,
    labels: labels.shown,
    hiddenLabels: labels.hidden,
    transients: transients.length,
  };
  const option = {
    animation: false,
    // Room above the plot for the labels of the validation markers.
    grid: { left: GUTTER, right: RIGHT, top: validation.length ? 44 : 28, bottom: 54 },
    legend: { top: 0, left: GUTTER, textStyle: { color: pal.textMuted, fontSize: 11 }, itemHeight: 8,
      data: [...new Set(series.map((s) => s.name))].filter((n) => !hidden.has(n)) },
    tooltip: { ...tooltipBase(pal), formatter: lossTooltip },
    xAxis: stepAxis(pal, full),
    yAxis,
    dataZoom: [
      { type: "inside", xAxisIndex: 0, filterMode: "none", zoomOnMouseWheel: "shift", moveOnMouseWheel: false },
      { type: "slider", xAxisIndex: 0, filterMode: "none", height: 16, bottom: 6, left: GUTTER, right: RIGHT,
        showDetail: false, borderColor: pal.grid, textStyle: { color: pal.textMuted },
        fillerColor: rgba(pal.selected, 0.15), handleStyle: { color: pal.selected, borderColor: pal.selected } },
    ],
    series,
  };
  return { option, marks };
}

function lossTooltip(params) {
  const list = Array.isArray(params) ? params : [params];
  if (!list.length) return "";
  const rows = [h("div", { class: "tt-title", text: `step ${formatStep(list[0].value[0])}` })];
  for (const p of list) {
    if (p.seriesName === "min" || p.seriesName === "range") continue;
    if (p.seriesName === "best (early stop)") {
      rows.push(h("div", { class: "tt-val", text: `best ${seriesLabel(p.value[2])}: ${formatValue(p.value[1])}` }));
    } else if (p.seriesName === "loss spike") {
      rows.push(h("div", { class: "tt-accent", text: `loss spike ×${formatValue(p.value[2])} above baseline` }));
      if (p.value[3] !== null && p.value[3] !== undefined) {
        rows.push(h("div", { class: "tt-muted", text: `follows episode #${p.value[3] + 1}` }));
      }
    } else if (p.value[1] !== null && p.value[1] !== undefined) {
      rows.push(h("div", { text: `${p.seriesName}: ${formatValue(p.value[1])}` }));
    }
  }
  return rows.length > 1 ? h("div", {}, rows) : "";
}

/** The min/max band of a binned line (where one point stands for many steps). */
function envelopeSeries(data, pal, log) {
  const ok = (i) => data.max[i] !== null && data.min[i] !== null && (!log || data.min[i] > 0);
  return [
    { name: "min", type: "line", stack: "env", showSymbol: false, lineStyle: { opacity: 0 }, silent: true, z: 1,
      data: data.steps.map((s, i) => [s, ok(i) ? data.min[i] : null]) },
    { name: "range", type: "line", stack: "env", showSymbol: false, lineStyle: { opacity: 0 }, silent: true, z: 1,
      areaStyle: { color: pal.envelope },
      data: data.steps.map((s, i) => [s, ok(i) ? data.max[i] - data.min[i] : null]) },
  ];
}

/**
 * One metric of one layer, with its envelope (when binned) and the detector's baseline / threshold band; `width`
 * (the plot's width in pixels) decides which episode names fit.
 */
export function layerOption({ data, title, range, width, pal, log, episodes = [] }) {
  const { steps } = data;
  const series = [];
  if (!data.full_resolution) series.push(...envelopeSeries(data, pal, log));
  if (data.baseline && data.threshold) {
    series.push(
      { name: "baseline", type: "line", data: pairs(steps, data.baseline, log), showSymbol: false,
        lineStyle: { color: pal.baseline, type: "dashed", width: 1 }, itemStyle: { color: pal.baseline }, z: 2 },
      { name: "threshold", type: "line", data: pairs(steps, data.threshold, log), showSymbol: false,
        lineStyle: { color: pal.threshold, type: "dashed", width: 1 }, itemStyle: { color: pal.threshold }, z: 2 },
    );
  }
  series.push({ name: title, type: "line", data: pairs(steps, data.values, log), showSymbol: steps.length < 60,
    symbolSize: 3, sampling: "minmax", lineStyle: { color: pal.line, width: 1.25 }, itemStyle: { color: pal.line },
    z: 3, markArea: { silent: true,
      data: episodeAreas(episodes.filter((ep) => !ep.validation), pal, new LabelRows(range, width)) } });
  return {
    animation: false,
    grid: { left: GUTTER, right: RIGHT, top: 24, bottom: 24 },
    legend: { top: 0, left: GUTTER, textStyle: { color: pal.textMuted, fontSize: 11 }, itemHeight: 8,
      data: [title, "baseline", "threshold"].filter((n) => series.some((s) => s.name === n)) },
    tooltip: { ...tooltipBase(pal), formatter: layerTooltip },
    xAxis: stepAxis(pal, range),
    yAxis: { type: log ? "log" : "value", scale: true, name: title, nameLocation: "middle", nameGap: 44,
      nameRotate: 90, ...axisStyle(pal) },
    series,
  };
}

function layerTooltip(params) {
  const list = Array.isArray(params) ? params : [params];
  if (!list.length) return "";
  const rows = [h("div", { class: "tt-title", text: `step ${formatStep(list[0].value[0])}` })];
  for (const p of list) {
    if (p.seriesName === "min" || p.seriesName === "range") continue;
    rows.push(h("div", { text: `${p.seriesName}: ${formatValue(p.value[1])}` }));
  }
  return h("div", {}, rows);
}
