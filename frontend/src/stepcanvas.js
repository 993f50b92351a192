// What the heatmap and the histogram view share as canvas plots on the step axis: the plot spans
// [GUTTER, GUTTER + pw] like the ECharts step charts, a drag over it zooms every chart to that step range, a
// double-click resets, and episodes are marked at the same x in both.

import { GUTTER, RIGHT } from "./layout.js";
import { rgba } from "./theme.js";

const DRAG_MIN_PX = 5;

export class StepCanvas {
  /**
   * @param {object} opts
   * @param {() => object} opts.palette current theme colours
   * @param {(range: {start: number, end: number} | null) => void} opts.onZoom a step range was dragged (null: reset)
   * @param {number} opts.track height in CSS pixels of the episode track above the plot
   */
  constructor({ palette, onZoom, track }) {
    this.palette = palette;
    this.onZoom = onZoom;
    this.track = track;
    this.data = null;
    this.range = null;
    this.drag = null;
  }

  /** Wires `this.canvas` (inside `this.el`): hover, drag-to-zoom, double-click reset, redraw on resize. */
  listen() {
    this.canvas.addEventListener("mousemove", (e) => this.onMove(e));
    this.canvas.addEventListener("mouseleave", () => this.onLeave());
    this.canvas.addEventListener("mousedown", (e) => this.onDown(e));
    this.canvas.addEventListener("dblclick", () => this.onZoom(null));
    this.onUpListener = (e) => this.onUp(e);
    window.addEventListener("mouseup", this.onUpListener);
    this.observer = new ResizeObserver(() => this.draw());
    this.observer.observe(this.el);
  }

  destroy() {
    window.removeEventListener("mouseup", this.onUpListener);
    this.observer.disconnect();
  }

  setRange(range) {
    this.setRangeAttributes(range);
    this.draw();
  }

  /** The step range on screen ({start, end}), also as data attributes (the browser tests read them). */
  setRangeAttributes(range) {
    this.range = range;
    this.el.dataset.viewStart = String(Math.round(range.start));
    this.el.dataset.viewEnd = String(Math.round(range.end));
  }

  // ------------------------------------------------------------------------------------------------------ geometry

  plotWidth() {
    return Math.max(10, this.el.clientWidth - GUTTER - RIGHT);
  }

  /** x in CSS pixels, relative to the plot's left edge, of a (fractional) step. */
  xOf(step, pw) {
    const { start, end } = this.range;
    return ((step - start) / Math.max(1, end - start)) * pw;
  }

  /** The (fractional) step at x CSS pixels from the plot's left edge. */
  stepAt(x, pw) {
    const { start, end } = this.range;
    return start + (x / pw) * Math.max(1, end - start);
  }

  /** Sizes the canvas to width × height CSS pixels at the screen's pixel ratio; the context comes back cleared. */
  resize(width, height) {
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(height * dpr);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    return { ctx, dpr };
  }

  /**
   * Where a mouse event falls: x from the plot's left edge (clamped to the plot), y from the plot's top, and whether
   * it is inside the plot of height `plotHeight`.
   */
  locateIn(event, plotHeight) {
    const rect = this.canvas.getBoundingClientRect();
    const pw = this.plotWidth();
    const x = event.clientX - rect.left - GUTTER;
    const y = event.clientY - rect.top - this.track;
    const inPlot = x >= 0 && x <= pw && y >= 0 && y < plotHeight;
    return { x: Math.max(0, Math.min(pw, x)), y, pw, inPlot };
  }

  // ------------------------------------------------------------------------------------------------------- drawing

  /**
   * Episodes over the plot (top `top`, height `height`): a bar in the track at `bar` and an outline over the cells,
   * with the cells shaded where `shade`. Validation findings are about the model's evaluations, not its layers: they
   * get a dashed line in the track at `line` only.
   */
  drawEpisodes(ctx, pal, pw, episodes, { top, height, bar, line, shade }) {
    for (const ep of episodes) {
      const color = pal.episode[ep.kind] || pal.accent;
      const xa = GUTTER + this.xOf(ep.start_step - 0.5, pw);
      const xb = Math.max(xa + 2, GUTTER + this.xOf(ep.end_step + 0.5, pw));
      if (ep.validation) {
        ctx.strokeStyle = ep.kind === "nonfinite" ? color : pal.episode.val_degradation;
        ctx.lineWidth = 3;
        ctx.setLineDash([5, 3]);
        ctx.beginPath();
        ctx.moveTo(xa, line);
        ctx.lineTo(xb, line);
        ctx.stroke();
        ctx.setLineDash([]);
        continue;
      }
      if (shade) {
        ctx.fillStyle = rgba(color, pal.episodeAlpha / 2);
        ctx.fillRect(xa, top, xb - xa, height);
      }
      ctx.fillStyle = color;
      ctx.fillRect(xa, bar, xb - xa, 6);
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.strokeRect(xa, top + 0.75, xb - xa, height - 1.5);
    }
  }

  /** The band being dragged out, over the plot (top `top`, height `height`). */
  drawDragBand(ctx, pal, top, height) {
    if (!this.drag || this.drag.x1 === undefined) return;
    ctx.fillStyle = rgba(pal.selected, 0.25);
    ctx.fillRect(GUTTER + Math.min(this.drag.x0, this.drag.x1), top, Math.abs(this.drag.x1 - this.drag.x0), height);
  }

  // --------------------------------------------------------------------------------------------------- interaction

  /** Extends a drag in progress to `at` (from `locate`); false when there is none. */
  dragTo(at) {
    if (!this.drag) return false;
    this.drag.x1 = at.x;
    this.draw();
    return true;
  }

  onDown(event) {
    if (event.button !== 0 || !this.data || !this.range) return;
    const at = this.locate(event);
    if (!at.inPlot) return;
    event.preventDefault();
    this.drag = { x0: at.x, pw: at.pw, at };
  }

  onUp(event) {
    if (!this.drag) return;
    const drag = this.drag;
    this.drag = null;
    const x1 = drag.x1 === undefined ? drag.x0 : drag.x1;
    if (Math.abs(x1 - drag.x0) >= DRAG_MIN_PX) {
      const a = Math.round(this.stepAt(Math.min(drag.x0, x1), drag.pw));
      const b = Math.round(this.stepAt(Math.max(drag.x0, x1), drag.pw));
      this.onZoom({ start: a, end: Math.max(b, a + 1) });
    } else if (event.target === this.canvas) {
      this.onClick(drag.at);
    }
    this.draw();
  }

  /** A click (a press and release without a drag) at `at`, where `locate` put the press. */
  onClick() {}
}
