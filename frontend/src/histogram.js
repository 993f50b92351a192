// A layer's gradient histograms over time, drawn on the shared step axis (like TensorBoard's Distributions tab, but
// on the format's fixed log10|g| bins): one column per recorded step, reaching half-way to its neighbours, one row per
// bin, colour = share of the step's entries. The plot spans the same x as the heatmap and the ECharts step charts,
// so an episode sits at one x in all of them.

import { h, formatStep } from "./dom.js";
import { GUTTER, drawStepAxis } from "./layout.js";
import { StepCanvas } from "./stepcanvas.js";
import { VIRIDIS } from "./theme.js";

const TRACK = 10; // episode bar above the cells
const AXIS = 20;
const PLOT = 180;
const NAN_GAP = 3; // gap between the NaN/Inf row (top) and the value bins

export class HistogramView extends StepCanvas {
  /**
   * @param {object} opts
   * @param {() => object} opts.palette current theme colours
   * @param {(range: {start: number, end: number} | null) => void} opts.onZoom a step range was dragged (null: reset)
   */
  constructor({ palette, onZoom }) {
    super({ palette, onZoom, track: TRACK });
    this.episodes = [];
    this.canvas = h("canvas", { class: "hv-canvas" });
    this.tooltip = h("div", { class: "tooltip hv-tooltip", hidden: true });
    this.el = h("div", { class: "hist-view", style: { height: `${TRACK + PLOT + AXIS}px` } }, this.canvas, this.tooltip);
    this.el.dataset.plotLeft = String(GUTTER);
    this.listen();
  }

  /** Histograms route answer, and the step range on screen ({start, end}). */
  setData(data, range) {
    this.data = data;
    this.rows = visibleRows(data);
    this.columns = columnsOf(data.steps);
    const bad = data.bins.length - 1;
    this.el.dataset.steps = String(data.steps.length);
    this.el.dataset.nonfiniteSteps = data.counts.filter((row) => row[bad] > 0).map((_, i) => data.steps[i]).join(",");
    this.setRange(range);
  }

  setEpisodes(episodes) {
    this.episodes = episodes || [];
    this.draw();
  }

  // --------------------------------------------------------------------------------------------------- geometry

  /** y extent [top, bottom] in CSS pixels of display row `r` (row 0 = NaN/Inf at the top). */
  rowBox(r) {
    const n = this.rows.length;
    const rowH = (PLOT - NAN_GAP) / n;
    const top = TRACK + r * rowH + (r > 0 ? NAN_GAP : 0);
    return [top, top + rowH];
  }

  // ---------------------------------------------------------------------------------------------------- drawing

  draw() {
    if (!this.data || !this.range || !this.el.isConnected) return;
    const pal = this.palette();
    const pw = this.plotWidth();
    const { ctx, dpr } = this.resize(this.el.clientWidth, TRACK + PLOT + AXIS);
    this.el.dataset.plotWidth = String(pw);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = pal.absent;
    ctx.fillRect(GUTTER, TRACK, pw, PLOT);
    ctx.save();
    ctx.beginPath();
    ctx.rect(GUTTER, 0, pw, TRACK + PLOT);
    ctx.clip();
    const drawn = this.drawCells(ctx, pal, pw);
    this.drawEpisodes(ctx, pal, pw, this.episodes, { top: TRACK, height: PLOT, bar: 1, line: 4, shade: false });
    this.drawDragBand(ctx, pal, TRACK, PLOT);
    ctx.restore();
    this.el.dataset.drawnColumns = String(drawn);
    this.drawBinLabels(ctx, pal);
    drawStepAxis(ctx, pal, this.range, pw, TRACK + PLOT, formatStep);
  }

  drawCells(ctx, pal, pw) {
    const { counts } = this.data;
    const bad = this.data.bins.length - 1;
    let drawn = 0;
    this.columns.forEach(([a, b], i) => {
      const xa = GUTTER + this.xOf(a, pw);
      const xb = Math.max(xa + 1, GUTTER + this.xOf(b, pw));
      if (xb < GUTTER || xa > GUTTER + pw) return;
      drawn++;
      const row = counts[i];
      let max = 0;
      for (const c of row) if (c > max) max = c;
      if (!max) return;
      const scale = 255 / Math.log1p(max);
      this.rows.forEach((bin, r) => {
        const c = row[bin];
        if (!c) return;
        const [ya, yb] = this.rowBox(r);
        if (bin === bad) {
          ctx.fillStyle = `rgb(${pal.nonfinite.join(",")})`;
        } else {
          const [cr, cg, cb] = VIRIDIS[Math.max(24, Math.min(255, Math.round(Math.log1p(c) * scale)))];
          ctx.fillStyle = `rgb(${cr},${cg},${cb})`;
        }
        ctx.fillRect(xa, ya, xb - xa, Math.max(1, yb - ya));
      });
    });
    return drawn;
  }

  /** |g| bin edges (powers of ten) in the gutter, spaced so that labels never overlap; "NaN/Inf" and "0" by name. */
  drawBinLabels(ctx, pal) {
    const { log10_edges: edges, bins } = this.data;
    const bad = bins.length - 1;
    const [ya, yb] = this.rowBox(0);
    const rowH = yb - ya;
    ctx.fillStyle = pal.textMuted;
    ctx.font = "10px Roboto, sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const right = GUTTER - 6;
    let lastY = -Infinity;
    this.rows.forEach((bin, r) => {
      const [top, bottom] = this.rowBox(r);
      if (bin === bad || bin === 0) {
        ctx.fillText(bin === bad ? "NaN/Inf" : "0", right, (top + bottom) / 2);
        lastY = (top + bottom) / 2;
        return;
      }
      // The lower edge of a log bin, where it is a whole power of ten.
      const lower = bin - 2;
      if (lower < 0 || lower >= edges.length) return;
      const e = edges[lower];
      if (e !== Math.round(e) || bottom - lastY < 14 || (rowH < 4 && e % 3 !== 0)) return;
      ctx.fillText(`1e${e}`, right, bottom);
      lastY = bottom;
    });
  }

  // ------------------------------------------------------------------------------------------------ interaction

  /** Where a mouse event falls: x from the plot's left edge, y from the canvas top (as `rowBox` counts). */
  locate(event) {
    const at = this.locateIn(event, PLOT);
    return { ...at, y: at.y + TRACK };
  }

  onLeave() {
    this.tooltip.hidden = true;
  }

  onMove(event) {
    if (!this.data || !this.range) return;
    const at = this.locate(event);
    if (this.dragTo(at)) return;
    const step = this.stepAt(at.x, at.pw);
    const i = this.columns.findIndex(([a, b]) => step >= a && step <= b);
    const r = this.rows.findIndex((_, k) => {
      const [top, bottom] = this.rowBox(k);
      return at.y >= top && at.y < bottom;
    });
    if (!at.inPlot || i < 0 || r < 0) {
      this.tooltip.hidden = true;
      return;
    }
    const row = this.data.counts[i];
    const total = row.reduce((s, c) => s + c, 0);
    const c = row[this.rows[r]];
    this.tooltip.replaceChildren(
      h("div", { class: "tt-title", text: `step ${formatStep(this.data.steps[i])}` }),
      h("div", { text: `|g| in ${this.data.bins[this.rows[r]]}` }),
      h("div", { text: `${c.toLocaleString("en-US")} entries${total ? ` (${((100 * c) / total).toFixed(1)}%)` : ""}` }),
      h("div", { class: "tt-muted", text: "drag: zoom · double-click: reset" }));
    this.tooltip.hidden = false;
    const x = GUTTER + at.x;
    const flip = x + 14 + 240 > this.el.clientWidth;
    this.tooltip.style.left = flip ? "" : `${x + 14}px`;
    this.tooltip.style.right = flip ? `${this.el.clientWidth - x + 14}px` : "";
    this.tooltip.style.top = `${at.y + 12}px`;
  }
}

/** Bins shown, top to bottom: NaN/Inf, then the span of value bins that ever held an entry (largest |g| on top). */
function visibleRows(data) {
  const bad = data.bins.length - 1;
  let lo = Infinity;
  let hi = -Infinity;
  for (const row of data.counts) {
    for (let k = 0; k < bad; k++) {
      if (row[k] > 0) {
        if (k < lo) lo = k;
        if (k > hi) hi = k;
      }
    }
  }
  if (!(lo <= hi)) return [bad];
  // A bin of margin either side, so the outermost entries do not sit on the plot's edge.
  lo = Math.max(0, lo - 1);
  hi = Math.min(bad - 1, hi + 1);
  const rows = [bad];
  for (let k = hi; k >= lo; k--) rows.push(k);
  return rows;
}

/** [from, to] step extent of each recorded step's column: half-way to the neighbours (±0.5 for a lone step). */
function columnsOf(steps) {
  return steps.map((s, i) => {
    const left = i > 0 ? (s + steps[i - 1]) / 2 : s - (i + 1 < steps.length ? (steps[i + 1] - s) / 2 : 0.5);
    const right = i + 1 < steps.length ? (s + steps[i + 1]) / 2 : s + (i > 0 ? (s - steps[i - 1]) / 2 : 0.5);
    return [left, right];
  });
}
