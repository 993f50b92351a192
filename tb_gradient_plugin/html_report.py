"""The auditor's HTML report: one self-contained file (inline SVG and PNG data URIs, no script, no network).

Per run: the loss with its spikes, the layer x step heatmap of gradient norms with the episodes shaded, the ranked
offending layers and the advice. Charts are reduced with the plugin's max-pooling (:mod:`binning`), so a one-step
spike is visible at any report width. :func:`chart_data` runs in the auditor's worker processes and returns a small
picklable dict, so a report over hundreds of runs never holds their arrays; :func:`render` turns those dicts into HTML.
Every name that came from a file (runs, layers, tags, advice) is escaped.
"""

from __future__ import annotations

import base64
import html
import math
import re
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from .binning import bin_steps, envelope, max_pool
from .runs import RunData
from .sample_ids import peak_batch_text
from .types import TOTAL, fails_explosion
from .wording import relative_step

HEATMAP_BINS = 240
LOSS_BINS = 600
MAX_HEATMAP_LAYERS = 96
_W, _LOSS_H = 900, 180

# Perceptually ordered colour ramp (low -> high gradient norm), interpolated in between.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_ABSENT = (235, 235, 235)
_ZERO = (0, 0, 0)
_NONFINITE = (230, 0, 120)


def _floats(a: np.ndarray) -> list[float | None]:
    return [float(x) if math.isfinite(x) else None for x in np.asarray(a, dtype=np.float64).tolist()]


def chart_data(run: RunData, report_json: dict) -> dict:
    """What the report draws for one run, reduced to at most a few thousand numbers."""
    out: dict = {"loss": None, "val_loss": None, "heatmap": None}
    for name in ("loss", "val_loss"):
        s = run.series.get(name)
        if s is not None and len(s.steps):
            env = envelope(s.values, bin_steps(s.steps, LOSS_BINS))
            out[name] = {"start": env.bin_start.tolist(), "end": env.bin_end.tolist(), "max": _floats(env.max),
                         "min": _floats(env.min), "nonfinite": env.nonfinite.tolist()}
    metric = next((m for m in ("grad_norm", "grad_max_abs") if m in run.layer_metrics), None)
    if metric and len(run.steps) and run.layers:
        ranked = [f["name"] for e in report_json["episodes"] for f in e["layers"]]
        keep = _layers_to_show(run.layers, ranked)
        bins = bin_steps(run.steps, HEATMAP_BINS)
        values = run.layer_metrics[metric][:, keep]
        pooled, nonfinite = max_pool(values, bins, run.present[:, keep])
        out["heatmap"] = {"metric": metric, "layers": [run.layers[j] for j in keep], "total_layers": len(run.layers),
                          "start": bins.bin_start.tolist(), "end": bins.bin_end.tolist(),
                          "values": pooled.T.astype(np.float32), "nonfinite": nonfinite.T}
    return out


def _layers_to_show(layers: Sequence[str], ranked: Sequence[str]) -> list[int]:
    """All layers (model order) when few; otherwise the offending ones plus an even sample of the rest."""
    n = len(layers)
    if n <= MAX_HEATMAP_LAYERS:
        return list(range(n))
    index = {name: j for j, name in enumerate(layers)}
    chosen = {index[name] for name in ranked if name in index}
    chosen = set(sorted(chosen)[:MAX_HEATMAP_LAYERS // 2])
    room = MAX_HEATMAP_LAYERS - len(chosen)
    chosen |= set(np.linspace(0, n - 1, room).round().astype(int).tolist())
    return sorted(chosen)


# ------------------------------------------------------------------------------------------------------- pictures


def _png(rgb: np.ndarray) -> str:
    """A truecolour PNG data URI from a uint8 [h, w, 3] array (zlib + the four chunks a PNG needs)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _colours(values: np.ndarray, nonfinite: np.ndarray) -> tuple[np.ndarray, float, float]:
    """log10 of the pooled values on the colour ramp; returns the image and the log10 range it spans."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(values > 0, np.log10(values), np.nan)
    finite = np.isfinite(logs)
    lo, hi = (float(np.min(logs[finite])), float(np.max(logs[finite]))) if finite.any() else (0.0, 1.0)
    t = np.clip((logs - lo) / max(hi - lo, 1e-9), 0, 1) * (len(_RAMP) - 1)
    t = np.where(finite, t, 0)
    i = np.minimum(t.astype(int), len(_RAMP) - 2)
    f = (t - i)[..., None]
    rgb = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    rgb[~finite] = _ABSENT
    rgb[values == 0] = _ZERO  # logged, but exactly zero: a dead or disconnected layer, not a missing one
    rgb[nonfinite] = _NONFINITE
    return rgb.astype(np.uint8), lo, hi


def _x(step: float, first: int, last: int, width: float) -> float:
    return (step - first) / max(last - first + 1, 1) * width


def _episode_bands(episodes: list[dict], first: int, last: int, width: float, height: float) -> str:
    parts = []
    for e in episodes:
        x0 = _x(e["start_step"], first, last, width)
        x1 = max(_x(e["end_step"] + 1, first, last, width), x0 + 2)
        colour = "#e6007820" if e["kind"] == "nonfinite" else "#ff8c0030"
        edge = "#e60078" if e["kind"] == "nonfinite" else "#ff8c00"
        parts.append(f'<rect x="{x0:.1f}" y="0" width="{x1 - x0:.1f}" height="{height}" fill="{colour}" '
                     f'stroke="{edge}" stroke-width="1"><title>{html.escape(e["kind"])} {e["start_step"]}'
                     f'–{e["end_step"]}</title></rect>')
    return "".join(parts)


#: Margins of the loss chart around its plot: room for the value axis (left), the legend (top) and the step axis.
_ML, _MR, _MT, _MB = 64, 12, 24, 30


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round values (1, 2 or 5 times a power of ten apart) from ``lo`` to ``hi``."""
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _num(v: float) -> str:
    return f"{v:g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.0e}"


def _step_axis(first: int, last: int, width: float, y: float) -> str:
    """Tick marks and step labels along ``y`` for steps ``first``..``last`` over ``width`` pixels."""
    out = [f'<line x1="0" x2="{width}" y1="{y}" y2="{y}" stroke="#999"/>']
    for t in _ticks(first, last):
        x = _x(t, first, last, width)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 4}" stroke="#999"/>'
                   f'<text x="{x:.1f}" y="{y + 15}" text-anchor="middle">{int(t)}</text>')
    return f'<g class="axis x-axis">{"".join(out)}</g>'


def _legend(items: list[tuple[str, str]]) -> str:
    """Swatches and names along the top margin: (SVG of the swatch at 0,0, text)."""
    out, x = [], 0.0
    for swatch, text in items:
        out.append(f'<g transform="translate({x:.0f},-14)">{swatch}<text x="16" y="4">{html.escape(text)}</text></g>')
        x += 26 + 7 * len(text)
    return f'<g class="legend">{"".join(out)}</g>'


def _loss_svg(chart: dict, episodes: list[dict], spikes: list[dict], transients: list[int]) -> str:
    loss, val = chart["loss"], chart["val_loss"]
    lines = [s for s in (loss, val) if s is not None]
    first = min(s["start"][0] for s in lines)
    last = max(s["end"][-1] for s in lines)
    vals = [v for s in lines for v in s["max"] + s["min"] if v is not None]
    positive = [v for v in vals if v > 0]
    log = bool(positive) and len(positive) == len(vals) and max(positive) / min(positive) > 100
    if vals:
        lo, hi = (math.log10(min(positive)), math.log10(max(positive))) if log else (min(vals), max(vals))
    else:
        lo, hi = 0.0, 1.0
    span = (hi - lo) or 1.0
    pw, ph = _W - _ML - _MR, _LOSS_H - _MT - _MB

    def y(v: float) -> float:
        return ph - ((math.log10(v) if log else v) - lo) / span * ph

    def path(s: dict, key: str) -> str:
        out, pen = [], "M"
        for st, en, v in zip(s["start"], s["end"], s[key], strict=True):
            if v is None:
                pen = "M"
                continue
            out.append(f"{pen}{_x((st + en) / 2, first, last, pw):.1f},{y(v):.1f}")
            pen = "L"
        return " ".join(out)

    body = [_episode_bands(episodes, first, last, pw, ph)]
    body += [f'<line x1="{_x(st, first, last, pw):.1f}" x2="{_x(st, first, last, pw):.1f}" y1="0" y2="{ph}" '
             f'stroke="#7f7f7f" stroke-dasharray="2,3"><title>transient gradient spike at step {st}</title></line>'
             for st in transients]
    for s, colour, label in ((loss, "#1f77b4", "loss"), (val, "#2ca02c", "val_loss")):
        if s is None:
            continue
        body.append(f'<path d="{path(s, "min")}" stroke="{colour}" stroke-opacity="0.35" fill="none"/>')
        body.append(f'<path d="{path(s, "max")}" stroke="{colour}" fill="none"><title>{label}</title></path>')
        for st, bad in zip(s["start"], s["nonfinite"], strict=True):
            if bad:
                body.append(f'<text x="{_x(st, first, last, pw):.1f}" y="12" fill="#e60078" font-size="12">'
                            f'NaN<title>{label} non-finite at {st}</title></text>')
    for sp in spikes:
        if sp.get("value") is not None and (sp["value"] > 0 or not log):
            body.append(f'<circle cx="{_x(sp["step"], first, last, pw):.1f}" cy="{y(sp["value"]):.1f}" r="4" '
                        f'fill="none" stroke="#d62728" stroke-width="2"><title>loss spike at step {sp["step"]}'
                        f'</title></circle>')
    ticks = [10.0 ** k for k in range(math.ceil(lo), math.floor(hi) + 1)] if log else _ticks(lo, hi, 4)
    if log and len(ticks) < 2:  # less than two decades on screen: label the ends
        ticks = [10.0 ** lo, 10.0 ** hi]
    yaxis = [f'<line x1="0" x2="0" y1="0" y2="{ph}" stroke="#999"/>']
    for t in ticks:
        ty = y(t)
        yaxis.append(f'<line x1="-4" x2="0" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#999"/>'
                     f'<text x="-6" y="{ty + 4:.1f}" text-anchor="end">{_num(t)}</text>')
    legend = [('<line x1="0" x2="12" y1="0" y2="0" stroke="#1f77b4" stroke-width="2"/>', "loss")]
    if val is not None:
        legend.append(('<line x1="0" x2="12" y1="0" y2="0" stroke="#2ca02c" stroke-width="2"/>', "val_loss"))
    legend += [('<circle cx="6" cy="0" r="4" fill="none" stroke="#d62728" stroke-width="2"/>', "loss spike"),
               ('<rect x="0" y="-5" width="12" height="10" fill="#ff8c0030" stroke="#ff8c00"/>', "episode")]
    if transients:
        legend.append(('<line x1="6" x2="6" y1="-6" y2="6" stroke="#7f7f7f" stroke-dasharray="2,3"/>',
                       "transient gradient spike"))
    scale = "log scale" if log else "linear scale"
    return (f'<figure><svg viewBox="0 0 {_W} {_LOSS_H}" width="{_W}" height="{_LOSS_H}" class="chart" role="img" '
            f'font-size="11" fill="#444"><g transform="translate({_ML},{_MT})">'
            f'{"".join(body)}<g class="axis y-axis">{"".join(yaxis)}</g>{_step_axis(first, last, pw, ph)}'
            f'{_legend(legend)}</g></svg><figcaption>loss{" and val_loss" if val else ""} by step, {scale}'
            '</figcaption></figure>')


def _heatmap_html(hm: dict, episodes: list[dict]) -> str:
    values = np.asarray(hm["values"], dtype=np.float64)
    rgb, lo, hi = _colours(values, np.asarray(hm["nonfinite"], dtype=bool))
    rows, cols = values.shape
    row_h = max(3, min(14, 420 // max(rows, 1)))
    height = rows * row_h
    first, last = hm["start"][0], hm["end"][-1]
    labels = "".join(f'<div style="height:{row_h}px">{html.escape(name)}</div>' for name in hm["layers"]) \
        if row_h >= 10 else ""
    shown = f'{rows} of {hm["total_layers"]} layers' if rows < hm["total_layers"] else f"{rows} layers"
    return (f'<figure><div class="hm"><div class="labels">{labels}</div><div class="hmimg">'
            f'<img src="{_png(rgb)}" width="{_W}" height="{height}" alt="heatmap">'
            f'<svg viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" class="bands">'
            f'{_episode_bands(episodes, first, last, _W, height)}</svg>'
            f'<svg viewBox="0 -1 {_W} 22" width="{_W}" height="22" font-size="11" fill="#444" '
            'style="overflow:visible">'
            f'{_step_axis(first, last, _W - 1, 0)}</svg></div></div>'
            f'<figcaption>{html.escape(hm["metric"])} per layer (rows, model order, {shown}) and step (columns, '
            f'max per column, steps {first}–{last}); colour log10 {lo:.2f} … {hi:.2f}; black: exactly 0; '
            f'grey: not logged; magenta: NaN/Inf</figcaption></figure>')


# --------------------------------------------------------------------------------------------------------- render

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:32px;border-top:1px solid #ddd;padding-top:16px;word-break:break-all}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
word-break:break-word;vertical-align:top}th{background:#f4f4f4}.ok{color:#217a21}.bad{color:#b00020;font-weight:600}
.chart{background:#fafafa;border:1px solid #eee}.hm{display:flex;gap:6px}.labels{font-size:10px;line-height:1;
text-align:right;max-width:220px;overflow:hidden;white-space:nowrap}.hmimg{position:relative}
.hmimg img{image-rendering:pixelated;display:block}.hmimg svg.bands{position:absolute;left:0;top:0}
.eps td:nth-child(-n+4),.eps th:nth-child(-n+4),.eps td:nth-child(6),.eps th:nth-child(6){white-space:nowrap}
.eps td:nth-child(5){min-width:200px}.chart text{font-family:system-ui,sans-serif}
figure{margin:8px 0}figcaption{font-size:12px;color:#666}.warn{color:#8a5a00}code{word-break:break-all}
"""


def _summary_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        rep = r["report"]
        kinds = sorted({e["kind"] for e in rep["episodes"]})
        cls = "bad" if any(fails_explosion(e) for e in rep["episodes"]) else "ok"
        spikes = rep.get("spikes") or {}
        rows.append(f'<tr><td><a href="#run-{r["index"]}">{html.escape(rep["run"])}</a></td>'
                    f'<td>{html.escape(rep["source"])}</td><td>{rep["steps"]}</td><td>{r["layers"]}</td>'
                    f'<td class="{cls}">{len(rep["episodes"])} {html.escape(", ".join(kinds))}</td>'
                    f'<td>{len(rep["loss_spikes"])}</td><td>{spikes.get("count", 0)}</td>'
                    f'<td>{len(rep["warnings"])}</td></tr>')
    return ("<table><tr><th>run</th><th>source</th><th>steps</th><th>layers</th><th>episodes</th>"
            f"<th>loss spikes</th><th>transient spikes</th><th>warnings</th></tr>{''.join(rows)}</table>")


def _episodes_table(episodes: list[dict]) -> str:
    rows = []
    for e in episodes:
        layers = ", ".join(f'{html.escape(finding_name(f))} ({layer_note(e, f)})' for f in e["layers"][:5])
        after = "" if e["loss_spike_step"] is None else \
            f'step {e["loss_spike_step"]} ({relative_step(e["loss_spike_step"] - e["peak_step"])})'
        batch = peak_batch_text(e)
        advice = "".join(f"<li>{html.escape(a)}</li>" for a in e["advice"] + ([batch] if batch else []))
        cls = "bad" if fails_explosion(e) else "warn"
        rows.append(f'<tr><td class="{cls}">{html.escape(e["kind"])}</td><td>{e["start_step"]}–{e["end_step"]}</td>'
                    f'<td>{e["peak_step"]}</td><td>{severity_text(e)}</td><td>{layers}</td><td>{after}</td>'
                    f'<td><ul>{advice}</ul></td></tr>')
    return ('<table class="eps"><tr><th>kind</th><th>steps</th><th>peak</th><th>severity</th>'
            "<th>offending layers (ratio)</th>"
            f"<th>loss spike</th><th>advice</th></tr>{''.join(rows)}</table>")


def _ratio(x: float | None) -> str:
    return "non-finite" if x is None else f"{x:.3g}×"


def finding_name(finding: dict) -> str:
    """A finding's layer, or the run-level series it is (a run without per-layer data), named as what it is."""
    return "total gradient norm" if finding.get("metric") == TOTAL else finding["name"]


def severity_text(episode: dict) -> str:
    """Peak over baseline; none for findings that measure no excess (dead layers, AMP skips); for slow growth the
    growth, for a saturated clip the share of steps it binds on."""
    growth = episode.get("growth")
    if growth:
        if growth["signal"] == "saturated_clip":
            return f"clip binds on {100 * growth['binding_share']:.0f} %"
        return f"{_ratio(growth['factor'])} growth"
    return "—" if episode["kind"] in ("dead", "overflow_skip") else _ratio(episode["severity"])


def layer_note(episode: dict, finding: dict) -> str:
    """How far a layer was off in an episode: its ratio over the baseline, or, for a dead layer, since when (the
    table of the CLI and this report say the same)."""
    if not episode.get("dead"):
        return _ratio(finding.get("ratio"))
    return f"{'vanished' if finding.get('ratio') else 'zero'} from {finding['first_step']}"


def render(results: list[dict], title: str = "Gradient audit") -> str:
    """The whole report. ``results`` are the auditor's per-run results (``report`` JSON, ``layers``, ``chart``)."""
    sections = [_run_section(r) for r in results]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{_summary_table(results)}'
            f'{"".join(sections)}</body></html>')


#: The class that scopes the report's style when one run's section is shown inside another page (a notebook).
FRAGMENT_CLASS = "tb-gradient-report"


def run_fragment(result: dict) -> str:
    """One run's section of the report (episodes, loss chart, heatmap), with its style scoped to it, for embedding
    in a page that has its own (a notebook cell's output)."""
    style = _scoped_css("." + FRAGMENT_CLASS)
    return f'<div class="{FRAGMENT_CLASS}"><style>{style}</style>{_run_section(result)}</div>'


def _scoped_css(scope: str) -> str:
    """The report's style with every selector inside ``scope`` (``body`` becomes the scope itself)."""
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", _CSS):
        scoped = [scope if s.strip() == "body" else f"{scope} {s.strip()}" for s in selectors.split(",")]
        rules.append(f"{','.join(scoped)}{{{body.strip()}}}")
    return "".join(rules)


def _run_section(r: dict) -> str:
    rep, chart = r["report"], r.get("chart") or {}
    parts = [f'<h2 id="run-{r["index"]}">{html.escape(rep["run"])} '
             f'<small>({html.escape(rep["source"])}, {rep["steps"]} steps, {r["layers"]} layers)</small></h2>']
    if rep["episodes"]:
        parts.append(_episodes_table(rep["episodes"]))
    else:
        parts.append('<p class="ok">No gradient episode found.</p>')
    spikes = rep.get("spikes") or {}
    if spikes.get("count"):
        parts.append(f'<p class="spikes">{html.escape(spikes["summary"])}: not episodes (nothing broke).</p>')
    amp = rep.get("amp") or {}
    if amp.get("skipped") or amp.get("collapsed"):
        parts.append(f'<p class="amp">{html.escape(amp["summary"])}.</p>')
    parts += [f'<p class="growth">{html.escape(e["growth"]["summary"])} (a warning: nothing broke yet).</p>'
              for e in rep["episodes"] if e.get("growth")]
    if chart.get("loss") or chart.get("val_loss"):
        parts.append(_loss_svg(chart, rep["episodes"], rep["loss_spikes"], spikes.get("steps", [])))
    if chart.get("heatmap"):
        parts.append(_heatmap_html(chart["heatmap"], rep["episodes"]))
    elif not chart.get("loss"):
        parts.append("<p>Nothing to draw: this run logged neither a loss nor per-layer norms.</p>")
    if rep["warnings"]:
        parts.append("<ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>' for w in rep["warnings"])
                     + "</ul>")
    if r.get("unknown_tags"):
        tags = ", ".join(f"<code>{html.escape(t)}</code>" for t in r["unknown_tags"][:50])
        more = f" and {len(r['unknown_tags']) - 50} more" if len(r["unknown_tags"]) > 50 else ""
        parts.append(f"<p><small>Tags not used by the audit: {tags}{more}</small></p>")
    return "".join(parts)
