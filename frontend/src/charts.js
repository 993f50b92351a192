// ECharts step charts (loss overlay, layer drill-down, histograms). Only the parts used are imported, to keep the
// bundle small. Tooltips are built as DOM elements with textContent, so names are never parsed as HTML.

import * as echarts from "echarts/core";
import { HeatmapChart, LineChart, ScatterChart } from "echarts/charts";
import {
  DataZoomInsideComponent,
  DataZoomSliderComponent,
  GridComponent,
  LegendComponent,
  MarkAreaComponent,
  MarkLineComponent,
  TooltipComponent,
  VisualMapContinuousComponent,
} from "echarts/components";
import { CanvasRenderer } from "echarts/renderers";

import { h, formatStep, formatValue } from "./dom.js";
import { GUTTER, RIGHT } from "./layout.js";
import { VIRIDIS, rgba } from "./theme.js";

echarts.use([
  HeatmapChart, LineChart, ScatterChart, DataZoomInsideComponent, DataZoomSliderComponent, GridComponent,
  LegendComponent, MarkAreaComponent, MarkLineComponent, TooltipComponent, VisualMapContinuousComponent,
  CanvasRenderer,
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
    axisLabel: { color: pal.textMuted, fontSize: 11 },
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

function episodeAreas(episodes, pal) {
  return episodes.map((ep) => [
    {
      xAxis: ep.start_step - 0.5,
      itemStyle: { color: rgba(pal.episode[ep.kind] || pal.accent, pal.episodeAlpha) },
      label: { show: true, position: "insideTop", color: pal.episode[ep.kind] || pal.accent, fontSize: 10,
        formatter: ep.kind.replace("_", " ") },
    },
    { xAxis: ep.end_step + 0.5 },
  ]);
}

/** Loss curve with spikes, episodes shaded behind it, the gap from each episode's peak to the spike it caused. */
export function lossOption({ loss, episodes, full, pal, logY }) {
  const spikes = loss.spikes || [];
  const gaps = [];
  for (const s of spikes) {
    const ep = s.episode === null || s.episode === undefined ? null : episodes[s.episode];
    if (ep && s.step > ep.peak_step && s.value !== null) {
      gaps.push([
        { coord: [ep.peak_step, s.value], symbol: "circle", symbolSize: 5 },
        { coord: [s.step, s.value], symbol: "arrow", symbolSize: 7,
          label: { show: true, formatter: `+${s.step - ep.peak_step} steps`, color: pal.spike, fontSize: 10 } },
      ]);
    }
  }
  const series = [
    {
      name: "loss",
      type: "line",
      data: pairs(loss.steps, loss.values, logY),
      showSymbol: false,
      sampling: "minmax",
      lineStyle: { width: 1.25, color: pal.line },
      itemStyle: { color: pal.line },
      connectNulls: false,
      z: 3,
      markArea: { silent: true, data: episodeAreas(episodes, pal) },
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
  if (loss.total_grad_norm && loss.total_grad_norm.steps.length) {
    yAxis.push({ type: "log", position: "right", ...axisStyle(pal), splitLine: { show: false },
      axisLabel: { color: pal.secondLine, fontSize: 11 } });
    series.push({
      name: "total grad norm",
      type: "line",
      yAxisIndex: 1,
      data: pairs(loss.total_grad_norm.steps, loss.total_grad_norm.values, true),
      showSymbol: false,
      sampling: "minmax",
      lineStyle: { width: 1, color: pal.secondLine, opacity: 0.8 },
      itemStyle: { color: pal.secondLine },
      z: 2,
    });
  }
  if (loss.val_loss && loss.val_loss.steps.length) {
    series.push({
      name: "val loss",
      type: "line",
      data: pairs(loss.val_loss.steps, loss.val_loss.values, logY),
      symbolSize: 4,
      lineStyle: { width: 1, color: pal.valLine, type: "dashed" },
      itemStyle: { color: pal.valLine },
      z: 4,
    });
  }
  return {
    animation: false,
    grid: { left: GUTTER, right: RIGHT, top: 28, bottom: 54 },
    legend: { top: 0, left: GUTTER, textStyle: { color: pal.textMuted, fontSize: 11 }, itemHeight: 8,
      data: series.map((s) => s.name).filter((n) => n !== "min" && n !== "range") },
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
}

function lossTooltip(params) {
  const list = Array.isArray(params) ? params : [params];
  if (!list.length) return "";
  const rows = [h("div", { class: "tt-title", text: `step ${formatStep(list[0].value[0])}` })];
  for (const p of list) {
    if (p.seriesName === "min" || p.seriesName === "range") continue;
    if (p.seriesName === "loss spike") {
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

/** One metric of one layer, with its envelope (when binned) and the detector's baseline / threshold band. */
export function layerOption({ data, title, range, pal, log }) {
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
    z: 3 });
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

/** Histograms of log10|g| over time: steps across, bins up, colour = log(1 + count). */
export function histogramOption({ data, pal }) {
  const cells = [];
  let max = 0;
  data.counts.forEach((row, i) => {
    row.forEach((c, j) => {
      if (c > 0) {
        const v = Math.log1p(c);
        if (v > max) max = v;
        cells.push([i, j, v]);
      }
    });
  });
  return {
    animation: false,
    grid: { left: GUTTER, right: RIGHT, top: 8, bottom: 28 },
    tooltip: {
      confine: true,
      backgroundColor: pal.panel,
      borderColor: pal.grid,
      textStyle: { color: pal.text, fontSize: 12 },
      formatter: (p) => h("div", {},
        h("div", { class: "tt-title", text: `step ${formatStep(data.steps[p.value[0]])}` }),
        h("div", { text: `log10|g| bin ${data.bins[p.value[1]]}` }),
        h("div", { text: `${Math.round(Math.expm1(p.value[2])).toLocaleString("en-US")} entries` })),
    },
    xAxis: { type: "category", data: data.steps.map(String), ...axisStyle(pal), splitLine: { show: false } },
    yAxis: { type: "category", data: data.bins, ...axisStyle(pal), splitLine: { show: false },
      axisLabel: { color: pal.textMuted, fontSize: 10, interval: 5 } },
    visualMap: { show: false, min: 0, max: Math.max(1, max), dimension: 2,
      inRange: { color: VIRIDIS.filter((_, i) => i % 32 === 0 || i === 255).map(([r, g, b]) => `rgb(${r},${g},${b})`) } },
    series: [{ type: "heatmap", data: cells, progressive: 5000 }],
  };
}
