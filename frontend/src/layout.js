// Horizontal geometry shared by the heatmap and the ECharts step charts, so one step sits at one x in every chart.

/** Width in CSS pixels of the layer-name column left of every plot. */
export const GUTTER = 180;
/** Right margin of every plot (room for a second y axis on the loss chart). */
export const RIGHT = 56;

/** Nice round tick values covering [lo, hi], about `count` of them. */
export function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

/**
 * Step labels under a canvas plot that spans [GUTTER, GUTTER + pw] for `range` ({start, end}), at height `y`: the
 * heatmap and the histogram view draw the same axis as the ECharts step charts.
 */
export function drawStepAxis(ctx, pal, range, pw, y, format) {
  const span = Math.max(1, range.end - range.start);
  ctx.fillStyle = pal.textMuted;
  ctx.strokeStyle = pal.axis;
  ctx.font = "11px Roboto, sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.lineWidth = 1;
  for (const t of niceTicks(range.start, range.end, Math.max(2, Math.floor(pw / 90)))) {
    if (t !== Math.round(t)) continue;
    const x = GUTTER + ((t - range.start) / span) * pw;
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x, y + 4);
    ctx.stroke();
    ctx.fillText(format(t), x, y + 6);
  }
}

/** The width in pixels of a step chart's plot inside `el` (a chart not laid out yet counts as a narrow one). */
export function plotWidth(el) {
  return Math.max(200, el.clientWidth - GUTTER - RIGHT);
}
