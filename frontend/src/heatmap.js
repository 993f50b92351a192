// Layer × step heatmap on a plain canvas. The backend sends at most one bin per CSS pixel (max-pooled), so drawing
// is one pass over the pixels into an ImageData whatever the run size; ECharts' heatmap would build one element per
// cell and needs category axes, which cannot share the step axis with the line charts.

import { h, formatStep, formatValue } from "./dom.js";
import { GUTTER, drawStepAxis } from "./layout.js";
import { metricLabel } from "./metrics.js";
import { StepCanvas } from "./stepcanvas.js";
import { VIRIDIS, rgba } from "./theme.js";

const TRACK = 18; // episode / spike / non-finite track above the cells
const AXIS = 20; // step labels below the cells
const LABEL_OVERLAP = 3; // px two row labels may share
const THIN_ROW = 8; // px: rows thinner than this outline only the top offending layer

export function plotHeight(layerCount) {
  return Math.max(120, Math.min(540, layerCount * 18));
}

export class Heatmap extends StepCanvas {
  /**
   * @param {object} opts
   * @param {() => object} opts.palette current theme colours
   * @param {(layer: string) => void} opts.onSelectLayer a row was clicked
   * @param {(range: {start: number, end: number} | null) => void} opts.onZoom a step range was dragged (null: reset)
   */
  constructor({ palette, onSelectLayer, onZoom }) {
    super({ palette, onZoom, track: TRACK });
    this.onSelectLayer = onSelectLayer;
    this.colorRange = null;
    this.selected = null;
    this.spikes = [];
    this.episodes = null;
    this.hover = null;
    this.canvas = h("canvas", { class: "hm-canvas" });
    this.labels = h("div", { class: "hm-labels", style: { top: `${TRACK}px`, width: `${GUTTER - 12}px` } });
    this.tooltip = h("div", { class: "tooltip hm-tooltip", hidden: true });
    this.el = h("div", { class: "heatmap" }, this.canvas, this.labels, this.tooltip);
    this.listen();
  }

  /** Heatmap route answer, and the step range on screen ({start, end}). */
  setData(data, range) {
    this.data = data;
    this.setRangeAttributes(range);
    this.el.style.height = `${TRACK + plotHeight(data.layers.length) + AXIS}px`;
    this.renderLabels();
    this.draw();
  }

  setColorRange(range) {
    this.colorRange = range;
    this.draw();
  }

  setSelected(layer) {
    this.selected = layer;
    this.renderLabels();
    this.draw();
  }

  /** The run's episodes from the episodes route (they say which are validation findings); null: the heatmap's. */
  setEpisodes(episodes) {
    this.episodes = episodes;
    this.draw();
  }

  setSpikes(steps) {
    this.spikes = steps;
    this.draw();
  }

  /** [min, max] of log10 of the finite positive values, or null when there are none. */
  logExtent() {
    if (!this.data) return null;
    let lo = Infinity;
    let hi = -Infinity;
    for (const row of this.data.values) {
      for (const v of row) {
        if (v !== null && v > 0 && Number.isFinite(v)) {
          const l = Math.log10(v);
          if (l < lo) lo = l;
          if (l > hi) hi = l;
        }
      }
    }
    return lo <= hi ? [lo, hi] : null;
  }

  // ------------------------------------------------------------------------------------------------------ geometry

  geometry() {
    const width = this.el.clientWidth;
    const layers = this.data ? this.data.layers.length : 0;
    const ph = plotHeight(layers);
    return { width, pw: this.plotWidth(), ph, rowH: layers ? ph / layers : ph };
  }

  // ------------------------------------------------------------------------------------------------------ drawing

  renderLabels() {
    if (!this.data) return;
    const { rowH } = this.geometry();
    const offending = new Map(this.data.offending.map((name, i) => [name, i + 1]));
    const dense = rowH >= 11;
    const height = Math.max(rowH, 13);
    // Thin rows cannot each carry a name: the top offending layer, the selected one, then the other offending ones
    // by rank get a label where it clears the labels placed before it (a few pixels of overlap aside); a non-finite
    // episode can make every layer of a big model offending.
    const priority = ({ name, rank }) => (rank === 1 ? 0 : name === this.selected ? 1 : 1 + (rank ?? Infinity));
    const wanted = this.data.layers.map((name, r) => ({ name, r, rank: offending.get(name) }))
      .filter(({ name, rank }) => dense || rank || name === this.selected)
      .sort((a, b) => priority(a) - priority(b) || a.r - b.r);
    const room = height - LABEL_OVERLAP;
    const taken = [];
    const kept = wanted.filter(({ r }) => {
      const top = r * rowH + rowH / 2 - height / 2;
      if (taken.some((t) => top < t + room && t < top + room)) return false;
      taken.push(top);
      return true;
    }).sort((a, b) => a.r - b.r);
    const rows = kept.map(({ name, r, rank }) => h(
      "div",
      {
        class: `row-label${rank ? " offending" : ""}${name === this.selected ? " selected" : ""}`,
        title: rank ? `${name} — offending layer #${rank}` : name,
        dataset: { layer: name, rank: rank ? String(rank) : undefined },
        style: { top: `${r * rowH + rowH / 2 - height / 2}px`, height: `${height}px`, lineHeight: `${height}px` },
        onclick: () => this.onSelectLayer(name),
      },
      rank ? h("span", { class: "rank", text: `#${rank}` }) : null,
      h("span", { class: "name", text: name }),
    ));
    this.labels.dataset.hiddenLabels = String(wanted.length - kept.length);
    this.labels.style.height = `${plotHeight(this.data.layers.length)}px`;
    this.labels.replaceChildren(...rows);
  }

  draw() {
    if (!this.data || !this.range || !this.el.isConnected) return;
    const pal = this.palette();
    const { width, pw, ph, rowH } = this.geometry();
    const { ctx, dpr } = this.resize(width, TRACK + ph + AXIS);
    const cells = this.cells(pal, Math.round(pw * dpr), Math.round(ph * dpr));
    ctx.putImageData(cells.image, Math.round(GUTTER * dpr), Math.round(TRACK * dpr));
    this.el.dataset.drawnCells = String(cells.drawn);
    this.el.dataset.plotLeft = String(GUTTER);
    this.el.dataset.plotWidth = String(pw);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    this.drawOverlays(ctx, pal, pw, ph, rowH);
    this.drawAxis(ctx, pal, pw, ph);
  }

  /** The cells as an image, rebuilt only when data, range, colours or size changed (hover redraws reuse it). */
  cells(pal, pw, ph) {
    const key = [this.data, this.range.start, this.range.end, ...(this.colorRange || []), pal.dark, pw, ph];
    if (!this.cellCache || key.some((v, i) => v !== this.cellCache.key[i])) {
      this.cellCache = { key, ...this.drawCells(pal, pw, ph) };
    }
    return this.cellCache;
  }

  drawCells(pal, pw, ph) {
    const { values, nonfinite, bin_start: bs, bin_end: be, layers } = this.data;
    const image = new ImageData(pw, ph);
    const pixels = new Uint32Array(image.data.buffer);
    const pack = ([r, g, b]) => ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;
    const absent = pack(hexRgb(pal.absent));
    pixels.fill(absent);
    const lut = VIRIDIS.map(pack);
    const bad = pack(pal.nonfinite);
    const [lo, hi] = this.colorRange || this.logExtent() || [0, 1];
    const scale = hi > lo ? 255 / (hi - lo) : 0;
    const L = layers.length;
    let drawn = 0;
    for (let b = 0; b < bs.length; b++) {
      const xa = Math.max(0, Math.floor(this.xOf(bs[b] - 0.5, pw)));
      const xb = Math.min(pw, Math.max(xa + 1, Math.floor(this.xOf(be[b] + 0.5, pw))));
      if (xb <= 0 || xa >= pw) continue;
      for (let r = 0; r < L; r++) {
        const v = values[r][b];
        const isBad = nonfinite[r][b] === 1;
        if (v === null && !isBad) continue;
        let color;
        if (isBad) color = bad;
        else if (!(v > 0)) color = lut[0];
        else color = lut[Math.max(0, Math.min(255, Math.round((Math.log10(v) - lo) * scale)))];
        drawn++;
        const ya = Math.floor((r * ph) / L);
        const yb = Math.max(ya + 1, Math.floor(((r + 1) * ph) / L));
        for (let y = ya; y < yb; y++) pixels.fill(color, y * pw + xa, y * pw + xb);
      }
    }
    return { image, drawn };
  }

  drawOverlays(ctx, pal, pw, ph, rowH) {
    const { layers, offending, nonfinite, bin_start: bs, bin_end: be } = this.data;
    // AMP overflow skips are normal: no episode band here (the track still ticks their non-finite bins).
    const episodes = (this.episodes || this.data.episodes).filter((ep) => ep.kind !== "overflow_skip");
    const X = (step) => GUTTER + this.xOf(step, pw);
    ctx.save();
    ctx.beginPath();
    ctx.rect(GUTTER, 0, pw, TRACK + ph);
    ctx.clip();
    this.drawEpisodes(ctx, pal, pw, episodes, { top: TRACK, height: ph, bar: 3, line: 6, shade: true });
    // Bins holding a non-finite gradient: a tick in the track.
    ctx.fillStyle = rgba(rgbHex(pal.nonfinite), 1);
    for (let b = 0; b < bs.length; b++) {
      if (nonfinite.some((row) => row[b] === 1)) {
        const xa = X(bs[b] - 0.5);
        ctx.fillRect(xa, 10, Math.max(2, X(be[b] + 0.5) - xa), 6);
      }
    }
    // Loss spikes: a downward triangle at the top of the track.
    ctx.fillStyle = pal.spike;
    for (const step of this.spikes) {
      const x = X(step);
      ctx.beginPath();
      ctx.moveTo(x - 4, TRACK - 9);
      ctx.lineTo(x + 4, TRACK - 9);
      ctx.lineTo(x, TRACK - 2);
      ctx.fill();
    }
    ctx.restore();
    // Offending rows and the selected row: outlined across the plot, marked at the gutter.
    const rowBox = (name) => {
      const r = layers.indexOf(name);
      return r < 0 ? null : [TRACK + r * rowH, Math.max(rowH, 2)];
    };
    // On thin rows, outlines of neighbouring offending layers would cover each other's cells: there only the top
    // one is outlined, and the markers in the gutter shrink to the row.
    const thin = rowH < THIN_ROW;
    const half = thin ? Math.max(2, rowH / 2) : 5;
    offending.forEach((name, i) => {
      const box = rowBox(name);
      if (!box) return;
      if (i === 0 || !thin) {
        // Outline just outside the row, so that the row's own cells stay visible however thin it is.
        const lw = i === 0 ? 2 : 1;
        const gap = box[1] < 4 ? 1.5 : 0;
        ctx.strokeStyle = pal.accent;
        ctx.lineWidth = lw;
        ctx.strokeRect(GUTTER - lw / 2, box[0] - lw / 2 - gap, pw + lw, box[1] + lw + 2 * gap);
      }
      ctx.fillStyle = pal.accent;
      ctx.beginPath();
      const cy = box[0] + box[1] / 2;
      ctx.moveTo(GUTTER - 9, cy - half);
      ctx.lineTo(GUTTER - 2, cy);
      ctx.lineTo(GUTTER - 9, cy + half);
      ctx.fill();
    });
    const sel = this.selected ? rowBox(this.selected) : null;
    if (sel) {
      ctx.strokeStyle = pal.selected;
      ctx.lineWidth = 1.5;
      ctx.setLineDash([4, 3]);
      ctx.strokeRect(GUTTER, sel[0] - 2.75, pw, sel[1] + 5.5);
      ctx.setLineDash([]);
    }
    if (this.hover && this.hover.row >= 0 && !this.drag) {
      ctx.strokeStyle = pal.text;
      ctx.lineWidth = 1;
      ctx.strokeRect(GUTTER, TRACK + this.hover.row * rowH, pw, Math.max(rowH, 1));
    }
    this.drawDragBand(ctx, pal, TRACK, ph);
  }

  drawAxis(ctx, pal, pw, ph) {
    drawStepAxis(ctx, pal, this.range, pw, TRACK + ph, formatStep);
  }

  // ------------------------------------------------------------------------------------------------- interaction

  locate(event) {
    const { ph, rowH } = this.geometry();
    const at = this.locateIn(event, ph);
    return { ...at, row: at.inPlot ? Math.floor(at.y / rowH) : -1 };
  }

  onMove(event) {
    if (!this.data || !this.range) return;
    const at = this.locate(event);
    if (this.dragTo(at)) return;
    this.hover = at.inPlot ? at : null;
    this.canvas.style.cursor = at.inPlot ? "crosshair" : "default";
    this.draw();
    if (!at.inPlot || at.row >= this.data.layers.length) {
      this.tooltip.hidden = true;
      return;
    }
    const step = this.stepAt(at.x, at.pw);
    const b = findBin(this.data.bin_start, this.data.bin_end, step);
    const name = this.data.layers[at.row];
    const lines = [h("div", { class: "tt-title", text: name })];
    if (b >= 0) {
      const v = this.data.values[at.row][b];
      const bad = this.data.nonfinite[at.row][b] === 1;
      const s0 = this.data.bin_start[b];
      const s1 = this.data.bin_end[b];
      lines.push(h("div", { text: s0 === s1 ? `step ${formatStep(s0)}` : `steps ${formatStep(s0)}–${formatStep(s1)}` }));
      lines.push(h("div", { text: `${metricLabel(this.data.metric)}: ${bad ? "non-finite (NaN/Inf)" : formatValue(v)}` }));
      if (!bad && v > 0) lines.push(h("div", { class: "tt-muted", text: `log10 = ${Math.log10(v).toFixed(2)}` }));
    }
    const rank = this.data.offending.indexOf(name);
    if (rank >= 0) lines.push(h("div", { class: "tt-accent", text: `offending layer #${rank + 1}` }));
    lines.push(h("div", { class: "tt-muted", text: "click: layer details · drag: zoom · double-click: reset" }));
    this.tooltip.replaceChildren(...lines);
    this.tooltip.hidden = false;
    const left = GUTTER + at.x + 14;
    const flip = left + 260 > this.el.clientWidth;
    this.tooltip.style.left = flip ? "" : `${left}px`;
    this.tooltip.style.right = flip ? `${this.el.clientWidth - GUTTER - at.x + 14}px` : "";
    this.tooltip.style.top = `${TRACK + at.y + 12}px`;
  }

  onLeave() {
    this.hover = null;
    this.tooltip.hidden = true;
    if (!this.drag) this.draw();
  }

  onClick(at) {
    if (at.row >= 0 && at.row < this.data.layers.length) this.onSelectLayer(this.data.layers[at.row]);
  }
}

function findBin(starts, ends, step) {
  let lo = 0;
  let hi = starts.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (step < starts[mid] - 0.5) hi = mid - 1;
    else if (step > ends[mid] + 0.5) lo = mid + 1;
    else return mid;
  }
  return -1;
}

function hexRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function rgbHex([r, g, b]) {
  return `#${((1 << 24) | (r << 16) | (g << 8) | b).toString(16).slice(1)}`;
}
