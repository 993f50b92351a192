// A layer's gradient histograms over time, drawn on the shared step axis (like TensorBoard's Distributions tab, but
// on the format's fixed log10|g| bins): one column per recorded step, reaching half-way to its neighbours, one row per
// bin, colour = share of the step's entries. The plot spans the same x as the heatmap and the ECharts step charts,
// so an episode sits at one x in all of them.

import { h, formatStep } from "./dom.js";
import { GUTTER, RIGHT, drawStepAxis } from "./layout.js";
import { VIRIDIS, rgba } from "./theme.js";

const TRACK = 10; // episode bar above the cells
const AXIS = 20;
const PLOT = 180;
const NAN_GAP = 3; // gap between the NaN/Inf row (top) and the value bins
const DRAG_MIN_PX = 5;

export class HistogramView {
  /**
   * @param {object} opts
   * @param {() => object} opts.palette current theme colours
   * @param {(range: {start: number, end: number} | null) => void} opts.onZoom a step range was dragged (null: reset)
   */
  constructor({ palette, onZoom }) {
    this.palette = palette;
    this.onZoom = onZoom;
    this.data = null;
    this.range = null;
    this.episodes = [];
    this.drag = null;
    this.canvas = h("canvas", { class: "hv-canvas" });
    this.tooltip = h("div", { class: "tooltip hv-tooltip", hidden: true });
    this.el = h("div", { class: "hist-view", style: { height: `${TRACK + PLOT + AXIS}px` } }, this.canvas, this.tooltip);
    this.el.dataset.plotLeft = String(GUTTER);
    this.canvas.addEventListener("mousemove", (e) => this.onMove(e));
    this.canvas.addEventListener("mouseleave", () => {
      this.tooltip.hidden = true;
    });
    this.canvas.addEventListener("mousedown", (e) => this.onDown(e));
    this.canvas.addEventListener("dblclick", () => this.onZoom(null));
    this.onUpListener = (e) => this.onUp(e);
    window.addEventListener("mouseup", this.onUpListener);
    this.observer = new ResizeObserver(() => this.draw());
    this.observer.observe(this.el);
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

  setRange(range) {
    this.range = range;
    this.el.dataset.viewStart = String(Math.round(range.start));
    this.el.dataset.viewEnd = String(Math.round(range.end));
    this.draw();
  }

  setEpisodes(episodes) {
    this.episodes = episodes || [];
    this.draw();
  }

  destroy() {
    window.removeEventListener("mouseup", this.onUpListener);
    this.observer.disconnect();
  }

  // --------------------------------------------------------------------------------------------------- geometry

  plotWidth() {
    return Math.max(10, this.el.clientWidth - GUTTER - RIGHT);
  }

  xOf(step, pw) {
    return GUTTER + ((step - this.range.start) / Math.max(1, this.range.end - this.range.start)) * pw;
  }

  stepAt(x, pw) {
    return this.range.start + ((x - GUTTER) / pw) * Math.max(1, this.range.end - this.range.start);
  }

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
    const width = this.el.clientWidth;
    const height = TRACK + PLOT + AXIS;
    const pw = this.plotWidth();
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(height * dpr);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    this.el.dataset.plotWidth = String(pw);
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.fillStyle = pal.absent;
    ctx.fillRect(GUTTER, TRACK, pw, PLOT);
    ctx.save();
    ctx.beginPath();
    ctx.rect(GUTTER, 0, pw, TRACK + PLOT);
    ctx.clip();
    const drawn = this.drawCells(ctx, pal, pw);
    this.drawEpisodes(ctx, pal, pw);
    if (this.drag && this.drag.x1 !== undefined) {
      ctx.fillStyle = rgba(pal.selected, 0.25);
      ctx.fillRect(Math.min(this.drag.x0, this.drag.x1), TRACK, Math.abs(this.drag.x1 - this.drag.x0), PLOT);
    }
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
      const xa = this.xOf(a, pw);
      const xb = Math.max(xa + 1, this.xOf(b, pw));
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

  drawEpisodes(ctx, pal, pw) {
    for (const ep of this.episodes) {
      const color = ep.validation ? pal.episode.val_degradation : pal.episode[ep.kind] || pal.accent;
      const xa = this.xOf(ep.start_step - 0.5, pw);
      const xb = Math.max(xa + 2, this.xOf(ep.end_step + 0.5, pw));
      if (ep.validation) {
        ctx.strokeStyle = ep.kind === "nonfinite" ? pal.episode.nonfinite : color;
        ctx.lineWidth = 3;
        ctx.setLineDash([5, 3]);
        ctx.beginPath();
        ctx.moveTo(xa, 4);
        ctx.lineTo(xb, 4);
        ctx.stroke();
        ctx.setLineDash([]);
        continue;
      }
      ctx.fillStyle = color;
      ctx.fillRect(xa, 1, xb - xa, 6);
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.strokeRect(xa, TRACK + 0.75, xb - xa, PLOT - 1.5);
    }
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

  locate(event) {
    const rect = this.canvas.getBoundingClientRect();
    const x = event.clientX - rect.left;
    const y = event.clientY - rect.top;
    const pw = this.plotWidth();
    return { x: Math.max(GUTTER, Math.min(GUTTER + pw, x)), y, pw,
      inPlot: x >= GUTTER && x <= GUTTER + pw && y >= TRACK && y < TRACK + PLOT };
  }

  onMove(event) {
    if (!this.data || !this.range) return;
    const at = this.locate(event);
    if (this.drag) {
      this.drag.x1 = at.x;
      this.draw();
      return;
    }
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
    const flip = at.x + 14 + 240 > this.el.clientWidth;
    this.tooltip.style.left = flip ? "" : `${at.x + 14}px`;
    this.tooltip.style.right = flip ? `${this.el.clientWidth - at.x + 14}px` : "";
    this.tooltip.style.top = `${at.y + 12}px`;
  }

  onDown(event) {
    if (event.button !== 0 || !this.data || !this.range) return;
    const at = this.locate(event);
    if (!at.inPlot) return;
    event.preventDefault();
    this.drag = { x0: at.x, pw: at.pw };
  }

  onUp() {
    if (!this.drag) return;
    const drag = this.drag;
    this.drag = null;
    const x1 = drag.x1 === undefined ? drag.x0 : drag.x1;
    if (Math.abs(x1 - drag.x0) >= DRAG_MIN_PX) {
      const a = Math.round(this.stepAt(Math.min(drag.x0, x1), drag.pw));
      const b = Math.round(this.stepAt(Math.max(drag.x0, x1), drag.pw));
      this.onZoom({ start: a, end: Math.max(b, a + 1) });
    }
    this.draw();
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
