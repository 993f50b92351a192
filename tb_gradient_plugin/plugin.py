"""TensorBoard loader and HTTP routes of the "gradients" plugin: a thin JSON layer over the run store and detector.

TensorBoard keeps only a random sample of each tag of a plugin it does not know (10 or 100 points), which drops the
one-step spikes this plugin exists to show. So the plugin reads the logdir itself, through the same run store and
detector as the offline auditor (full fidelity, the same episodes to the step), whatever ``--samples_per_plugin``,
``--load_fast`` or ``--logdir_spec`` say. See ``docs/HTTP_API.md`` for the routes. Reading, refreshing and caching
are the data layer's (``backend.py``); this module checks a request's arguments and shapes the answer.

This is TensorBoard's entry-point module: an import error here stops TensorBoard from starting, so it imports only
what TensorBoard itself has already loaded; the run store and detector are imported on first use.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from . import binning, pyramid
from . import format as fmt
from .backend import Backend, UnknownRunError, parse_logdir_spec
from .json_encoding import to_json
from .types import FAILING_KINDS, update_ratio_inputs

logger = logging.getLogger(__name__)

#: Metrics the heatmap and layer routes accept: the registry's per-layer values (``update_ratio`` is derived).
METRICS: tuple[str, ...] = tuple(m.name for m in fmt.METRIC_REGISTRY
                                 if m.scope == "layer" and m.storage != fmt.HISTOGRAM)
MAX_BINS = 2000
DEFAULT_BINS = 1000
#: Points a line route sends at full resolution inside the requested window before it bins that too.
LINE_FULL_MAX = 5000
#: Points of the min/max envelope a line route sends for the part of the run outside the window.
LINE_OUTSIDE_BINS = 1000
MAX_HIST_STEPS = 2000
#: Batches the episodes route lists per episode (those closest to the peak); the ``batches`` route pages the rest,
#: ``BATCHES_PAGE`` at a time unless the client asks for up to ``MAX_BATCHES_PAGE``.
EPISODE_BATCHES = 16
BATCHES_PAGE = 256
MAX_BATCHES_PAGE = 1024
#: Per-step series that count as logged steps (as the detector counts them).
STEP_SERIES = ("total_grad_norm", "loss", "step_skipped", "loss_scale", "lr")
#: During the first read of the logdir, the run list waits this long, then answers with the runs read so far.
FIRST_ANSWER_SECONDS = 1.0
#: File types served from ``static/`` and their MIME types (anything else there is not served).
STATIC_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".map": "application/json",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".woff2": "font/woff2",
}
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: Where :meth:`GradientsLoader.fix_flags` keeps a remote ``--logdir`` (``--logdir_spec``) only this plugin can read.
REMOTE_LOGDIR_FLAG = "gradients_remote_logdir"
REMOTE_LOGDIR_SPEC_FLAG = "gradients_remote_logdir_spec"


class HTTPError(Exception):
    """A request the plugin refuses, with the status code and a message for the user."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------------------------------------ request arguments


def _arg(request: wrappers.Request, name: str, *, required: bool = True) -> str | None:
    value = request.args.get(name)
    if value is None or value == "":
        if required:
            raise HTTPError(400, f"missing query parameter {name!r}")
        return None
    return value


def _step_arg(request: wrappers.Request, name: str, rounding: Callable[[float], int]) -> int | None:
    """An optional step bound. Accepts integers and finite decimals (a zoomed chart sends those), rounded outwards."""
    text = _arg(request, name, required=False)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise HTTPError(400, f"{name} must be a step number, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise HTTPError(400, f"{name} must be a finite step number, got {text[:40]!r}")
    return rounding(value)


def _window_args(request: wrappers.Request) -> tuple[int | None, int | None]:
    start = _step_arg(request, "start", math.floor)
    end = _step_arg(request, "end", math.ceil)
    if start is not None and end is not None and start > end:
        raise HTTPError(400, f"start ({start}) is after end ({end})")
    return start, end


def _count_arg(request: wrappers.Request, name: str, default: int, most: int) -> int:
    """A positive integer argument, ``default`` when absent; above ``most`` is a clear error, not a silent cut."""
    text = _arg(request, name, required=False)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise HTTPError(400, f"{name} must be a positive integer, got {text[:40]!r}") from None
    if not 1 <= value <= most:
        raise HTTPError(400, f"{name} must be from 1 to {most}, got {value}")
    return value


def _bins_arg(request: wrappers.Request) -> int:
    """Bins for the heatmap: an integer >= 1; more than MAX_BINS is clamped (a screen has no more columns)."""
    text = _arg(request, "bins", required=False)
    if text is None:
        return DEFAULT_BINS
    try:
        bins = int(text)
    except ValueError:
        raise HTTPError(400, f"bins must be a positive integer, got {text[:40]!r}") from None
    if bins < 1:
        raise HTTPError(400, f"bins must be a positive integer, got {bins}")
    return min(bins, MAX_BINS)


def _metric_arg(request: wrappers.Request) -> str:
    metric = _arg(request, "metric", required=False) or "grad_norm"
    if metric not in METRICS:
        raise HTTPError(400, f"unknown metric {metric[:60]!r}; expected one of {', '.join(METRICS)}")
    return metric


# ------------------------------------------------------------------------------------------------------------ plugin


class GradientsPlugin(base_plugin.TBPlugin):
    """Routes under ``/data/plugin/gradients/`` (see docs/HTTP_API.md) and the tab's static bundle."""

    plugin_name = fmt.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        flags = context.flags
        spec_text = (getattr(flags, REMOTE_LOGDIR_SPEC_FLAG, "") or getattr(flags, "logdir_spec", "")) \
            if flags is not None else ""
        reload_interval = getattr(flags, "reload_interval", 5.0) if flags is not None else 5.0
        self._backend = Backend(
            getattr(flags, REMOTE_LOGDIR_FLAG, None) or context.logdir or None,
            parse_logdir_spec(spec_text) if spec_text and not context.logdir else None,
            reload=reload_interval != 0,
            cache_dir=getattr(flags, "gradients_cache_dir", None) or None,
            memory_mb=getattr(flags, "gradients_memory_mb", None),
        )
        self._backend.start()

    # ------------------------------------------------------------------------------------------- TBPlugin interface

    def get_plugin_apps(self) -> dict[str, Callable]:
        routes: dict[str, Callable] = {
            "/runs": self._route(self._runs),
            "/episodes": self._route(self._episodes),
            "/batches": self._route(self._batches),
            "/heatmap": self._route(self._heatmap),
            "/layer": self._route(self._layer),
            "/loss": self._route(self._loss),
            "/histograms": self._route(self._histograms),
            "/metrics": self._route(self._metrics),
        }
        routes["/*"] = self._serve_static
        return routes

    def is_active(self) -> bool:
        """True when a run holds our per-layer data or a loss / grad-norm series the run store recognises."""
        return self._backend.is_active(timeout=5.0)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Gradients")

    # ----------------------------------------------------------------------------------------------- route plumbing

    def _route(self, handler: Callable[[wrappers.Request], Any]) -> Callable:
        name = handler.__name__.lstrip("_")

        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            try:
                # While the first read runs, routes answer from the runs it has read (see Backend); after it, the
                # request that finds a read due does it.
                if self._backend.wait_loaded(timeout=0):
                    self._backend.refresh()
                body = handler(request)
            except HTTPError as err:
                return http_util.Respond(request, {"error": err.message}, "application/json", code=err.code)
            except UnknownRunError as err:
                return http_util.Respond(request, {"error": str(err)}, "application/json", code=404)
            except Exception:  # noqa: BLE001 - answer with an error, never take the server down
                logger.exception("gradients plugin: %s failed", name)
                return http_util.Respond(request, {"error": f"internal error in {name}; see the TensorBoard log"},
                                         "application/json", code=500)
            return http_util.Respond(request, body, "application/json", content_encoding="gzip")

        app.__name__ = name
        return app

    def _cached(self, key: tuple, build: Callable[[], Any]) -> bytes:
        """Gzipped JSON of ``build()``, cached on a key that includes the run's data version."""
        body = self._backend.cache.get(key)
        if body is None:
            with self._backend.computing():
                body = gzip.compress(to_json(build()), compresslevel=1, mtime=0)
            self._backend.cache.put(key, body, len(body))
        return body

    # ------------------------------------------------------------------------------------------------------ routes

    def _runs(self, request: wrappers.Request) -> bytes:
        # A small logdir is read within this wait and listed whole; a large one is listed as far as it is read.
        loading = not self._backend.wait_loaded(FIRST_ANSWER_SECONDS)
        entries = []
        for name, data, version in self._backend.runs():
            report, seen = self._backend.report(name, data, version)
            entries.append({
                "run": name,
                "source": data.source,
                "steps": self._step_count(name, data, version),
                "layers": len(data.layers),
                "episodes": len(report.episodes),
                "episode_kinds": dict(Counter(e.kind for e in report.episodes)),
                # episodes that broke training, a NaN evaluation included (the tab opens on the run with the most)
                "alarming": sum(e.kind in FAILING_KINDS for e in report.episodes),
                "spikes": report.spikes.count,
                # Orders runs by start without TensorBoard's run list; null where the store does not keep it.
                "first_wall_time": data.first_wall_time,
                **_overview(report, data),
                "has_layers": bool(data.layers) and bool(data.layer_metrics),
                "has_histograms": len(data.hist_steps) > 0,  # never maps a cached run's histograms
                "metrics": sorted(data.layer_metrics) + (["update_ratio"] if data.update_ratio_available() else []),
                "version": int(version),
                "episodes_version": int(seen),
            })
        doc = {"runs": entries, "loading": loading}
        if self._backend.error:
            doc["error"] = self._backend.error
        return gzip.compress(to_json(doc), compresslevel=1, mtime=0)

    def _step_count(self, run: str, data: Any, version: int) -> int:
        """Logged steps of a run, counted as the detector counts them (per-layer steps and per-step series)."""
        key = ("steps", run, version)
        count = self._backend.cache.get(key)
        if count is None:
            parts = [np.asarray(data.steps, dtype=np.int64)]
            parts += [np.asarray(data.series[name].steps, dtype=np.int64) for name in STEP_SERIES
                      if name in data.series]
            count = int(np.unique(np.concatenate(parts)).size)
            self._backend.cache.put(key, count, 64)
        return count

    def _episodes(self, request: wrappers.Request) -> bytes:
        run = _arg(request, "run")
        data, version = self._backend.run(run)
        report, seen = self._backend.report(run, data, version)

        def build() -> dict:
            from .run_report import report_json  # as the auditor reports it

            return report_json(report, data.warnings, data, batches_shown=EPISODE_BATCHES)

        return self._cached(("episodes", run, version, seen), build)

    def _batches(self, request: wrappers.Request) -> bytes:
        """The recorded batches of a step range, the last ``limit`` of them: the pages of an episode's batches
        beyond the ``EPISODE_BATCHES`` the episodes route lists."""
        run = _arg(request, "run")
        start, end = _window_args(request)
        if start is None or end is None:
            raise HTTPError(400, "batches needs both start and end")
        limit = _count_arg(request, "limit", BATCHES_PAGE, MAX_BATCHES_PAGE)
        data, version = self._backend.run(run)

        def build() -> dict:
            from .sample_ids import RunBatches  # as the auditor lists them

            recorded = RunBatches(data)
            steps = recorded.between(start, end)
            page = steps[len(steps) - min(limit, len(steps)):]
            return {"run": run, "start": start, "end": end, "total": len(steps), "batches": recorded.entries(page)}

        return self._cached(("batches", run, version, start, end, limit), build)

    def _heatmap(self, request: wrappers.Request) -> bytes:
        run = _arg(request, "run")
        metric = _metric_arg(request)
        bins = _bins_arg(request)
        start, end = _window_args(request)
        data, version = self._backend.run(run)
        _require_metric(data, metric)
        report, seen = self._backend.report(run, data, version)
        key = ("heatmap", run, version, seen, metric, bins, start, end)
        return self._cached(key, lambda: self._build_heatmap(run, data, (report, seen), metric, bins, start, end))

    def _build_heatmap(self, run: str, data: Any, detected: tuple[Any, int], metric: str, n_bins: int,
                       start: int | None, end: int | None) -> dict:
        report, episodes_version = detected
        bins = binning.bin_steps(data.steps, n_bins, start, end)
        # A cached run pools whole blocks from its in-memory pyramid and reads only the bins' edges from the cache.
        pyramids = getattr(data, "pyramids", {})
        present = data.present
        if metric == "update_ratio":  # divided a chunk at a time, never as a full-size copy
            values, divide_by = update_ratio_inputs(data.layer_metrics)
            pooled, nonfinite = pyramid.max_pool(pyramids.get(metric), values, bins, present, divide_by=divide_by)
        else:
            pooled, nonfinite = pyramid.max_pool(pyramids.get(metric), data.layer_metrics[metric], bins, present)
        counts = data.layer_metrics.get("nonfinite_count")
        if counts is not None and metric != "nonfinite_count":
            pooled_counts, _ = pyramid.max_pool(pyramids.get("nonfinite_count"), counts, bins, present)
            nonfinite |= pooled_counts > 0
        return {
            "run": run,
            "metric": metric,
            "layers": list(data.layers),
            "bin_start": bins.bin_start,
            "bin_end": bins.bin_end,
            "values": pooled.T,
            "nonfinite": nonfinite.T,
            "offending": _offending(report),
            "episodes": [{"kind": e.kind, "start_step": e.start_step, "end_step": e.end_step,
                          "peak_step": e.peak_step} for e in report.episodes],
            "step_range": [int(data.steps[0]), int(data.steps[-1])] if len(data.steps) else None,
            "episodes_version": episodes_version,
            "bins": n_bins,
            "full_resolution": bins.full_resolution,
        }

    def _layer(self, request: wrappers.Request) -> bytes:
        run = _arg(request, "run")
        layer = _arg(request, "layer")
        metric = _metric_arg(request)
        start, end = _window_args(request)
        data, version = self._backend.run(run)
        if layer not in data.layers:
            raise HTTPError(404, f"run {run[:200]!r} has no layer {layer[:200]!r}")
        _require_metric(data, metric)
        key = ("layer", run, version, layer, metric, start, end)
        return self._cached(key, lambda: self._build_layer(run, data, version, layer, metric, start, end))

    def _build_layer(self, run: str, data: Any, version: int, layer: str, metric: str,
                     start: int | None, end: int | None) -> dict:
        steps, values, baseline, threshold = self._layer_series(run, data, version, layer, metric)
        env = binning.split_envelope(steps, values, start, end, full_max=LINE_FULL_MAX,
                                     outside_bins=LINE_OUTSIDE_BINS)
        at = np.clip(env.peak_index, 0, max(0, len(steps) - 1))
        missing = env.peak_index < 0
        return {
            "run": run,
            "layer": layer,
            "metric": metric,
            "steps": env.bin_start,
            "step_end": env.bin_end,
            "values": env.values,
            "min": env.min,
            "max": env.max,
            "nonfinite": env.nonfinite,
            "baseline": np.where(missing, np.nan, baseline[at]) if len(steps) else env.values,
            "threshold": np.where(missing, np.nan, threshold[at]) if len(steps) else env.values,
            "full_resolution": env.full_resolution,
        }

    def _layer_series(self, run: str, data: Any, version: int, layer: str, metric: str) -> tuple:
        """One layer's logged (steps, values) and its baseline band, computed once per data version."""
        key = ("layer-series", run, version, layer, metric)
        cached = self._backend.cache.get(key)
        if cached is None:
            j = data.layers.index(layer)
            column = _metric_values(data, metric)[:, j]
            logged = np.asarray(data.present[:, j], dtype=bool)
            steps = data.steps[logged]
            values = np.asarray(column[logged], dtype=np.float64)
            baseline, threshold = _detector().baseline_band(steps, values)
            cached = (steps, values, np.asarray(baseline, dtype=np.float64), np.asarray(threshold, dtype=np.float64))
            self._backend.cache.put(key, cached, 32 * len(steps))
        return cached

    def _loss(self, request: wrappers.Request) -> bytes:
        run = _arg(request, "run")
        start, end = _window_args(request)
        data, version = self._backend.run(run)
        report, seen = self._backend.report(run, data, version)
        return self._cached(("loss", run, version, seen, start, end),
                            lambda: self._build_loss(run, data, report, start, end))

    def _build_loss(self, run: str, data: Any, report: Any, start: int | None, end: int | None) -> dict:
        def line(name: str) -> dict | None:
            series = data.series.get(name)
            if series is None:
                return None
            env = binning.split_envelope(series.steps, series.values, start, end, full_max=LINE_FULL_MAX,
                                         outside_bins=LINE_OUTSIDE_BINS)
            return {"steps": env.bin_start, "step_end": env.bin_end, "values": env.values, "min": env.min,
                    "max": env.max, "full_resolution": env.full_resolution}

        loss = line("loss") or {"steps": [], "step_end": [], "values": [], "min": [], "max": [],
                                "full_resolution": True}
        return {
            "run": run,
            **loss,
            "spikes": [{"step": s.step, "value": s.value, "baseline": s.baseline, "ratio": s.ratio,
                        "episode": s.episode} for s in report.loss_spikes],
            "total_grad_norm": line("total_grad_norm"),
            "val_loss": line("val_loss"),
            # The other validation series the detector judges (accuracy, mAP, val_metric/*), for a second axis.
            "val_metrics": {name: {**line(name), "higher_is_better": rising} for name in sorted(data.series)
                            if name != "val_loss" and (rising := _detector().validation_series(name)) is not None},
        }

    def _histograms(self, request: wrappers.Request) -> bytes:
        run = _arg(request, "run")
        layer = _arg(request, "layer")
        data, version = self._backend.run(run)
        if layer not in data.layers:
            raise HTTPError(404, f"run {run[:200]!r} has no layer {layer[:200]!r}")
        if data.histograms is None or len(data.hist_steps) == 0:
            raise HTTPError(404, f"run {run[:200]!r} recorded no gradient histograms")

        def build() -> dict:
            j = data.layers.index(layer)
            pick = np.arange(len(data.hist_steps))
            if len(pick) > MAX_HIST_STEPS:
                pick = np.unique(np.linspace(0, len(pick) - 1, MAX_HIST_STEPS).round().astype(np.int64))
            return {
                "run": run,
                "layer": layer,
                "steps": np.asarray(data.hist_steps)[pick],
                "log10_edges": fmt.HIST_LOG10_EDGES,
                "bins": histogram_labels(),
                "counts": np.asarray(data.histograms[pick, j, :], dtype=np.int64),
                "subsampled": len(pick) < len(data.hist_steps),
            }

        return self._cached(("histograms", run, version, layer), build)

    def _metrics(self, request: wrappers.Request) -> bytes:
        return self._cached(("metrics",), lambda: {"metrics": [m.to_json() for m in fmt.METRIC_REGISTRY]})

    # ------------------------------------------------------------------------------------------------------ static

    @wrappers.Request.application
    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        """Files of ``static/`` by exact name; the request path is looked up in a listing, never opened as a path."""
        prefix = "/data/plugin/" + self.plugin_name + "/"
        path = request.path
        index = path.find(prefix)
        name = path[index + len(prefix):] if index >= 0 else ""
        files = static_files()
        if name not in files:
            return http_util.Respond(request, {"error": f"no such file: {name[:200]!r}"}, "application/json",
                                     code=404)
        full, mimetype = files[name]
        with open(full, "rb") as handle:
            content = handle.read()
        return http_util.Respond(request, content, mimetype)


def static_files() -> dict[str, tuple[str, str]]:
    """Allow-list of servable files: relative name -> (file path, MIME type), for the known file types only."""
    found: dict[str, tuple[str, str]] = {}
    for root, dirs, names in os.walk(STATIC_DIR):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for filename in names:
            mimetype = STATIC_TYPES.get(os.path.splitext(filename)[1].lower())
            if mimetype is None or filename.startswith("."):
                continue
            full = os.path.join(root, filename)
            found[os.path.relpath(full, STATIC_DIR).replace(os.sep, "/")] = (full, mimetype)
    return found


def histogram_labels() -> list[str]:
    """Human labels of the format's fixed histogram bins on |g|."""
    edges = fmt.HIST_LOG10_EDGES
    labels = ["0", f"(0, 1e{edges[0]:g})"]
    labels += [f"[1e{a:g}, 1e{b:g})" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    labels += [f">= 1e{edges[-1]:g}", "NaN/Inf"]
    return labels


def _require_metric(data: Any, metric: str) -> None:
    if not data.layers:
        raise HTTPError(404, f"run {data.name[:200]!r} has no per-layer data")
    if metric == "update_ratio":
        needed = () if update_ratio_inputs(data.layer_metrics) is not None else ("update_norm", "param_norm")
    else:
        needed = (metric,)
    missing = [m for m in needed if m not in data.layer_metrics]
    if missing:
        raise HTTPError(404, f"run {data.name[:200]!r} did not record {', '.join(missing)}")


def _metric_values(data: Any, metric: str) -> np.ndarray:
    if metric == "update_ratio":
        return data.update_ratio()
    return data.layer_metrics[metric]


def _detector() -> Any:
    """The detector module, imported on first use (never at TensorBoard's start-up)."""
    from . import detect

    return detect


def _overview(report: Any, data: Any) -> dict:
    """What the tab's run overview lists besides the counts: where the first finding starts, how bad the worst one
    is, and when the run last wrote. AMP overflow skips are normal and no finding, as in the run picker's count."""
    findings = [e for e in report.episodes if e.kind != "overflow_skip"]
    severities = [float(e.severity) for e in report.episodes if e.kind in FAILING_KINDS]
    finite = [s for s in severities if math.isfinite(s)]
    nonfinite = len(finite) < len(severities)
    return {
        "first_episode_step": min((int(e.start_step) for e in findings), default=None),
        "worst_severity": None if nonfinite or not finite else max(finite),
        "worst_severity_nonfinite": nonfinite,
        "last_wall_time": data.last_wall_time,
    }


def _offending(report: Any) -> list[str]:
    """Layer names ranked across episodes: most severe episode first, each episode's own ranking within it."""
    ranked: list[str] = []
    for episode in sorted(report.episodes, key=lambda e: -float(e.severity)):
        for finding in episode.layers:
            if finding.name not in ranked:
                ranked.append(finding.name)
    return ranked


class GradientsLoader(base_plugin.TBLoader):
    """Entry point ``gradients`` of the ``tensorboard_plugins`` group."""

    def define_flags(self, parser: Any) -> None:
        """The cache and memory options (see docs/CACHE.md); the environment variables are the fallback."""
        group = parser.add_argument_group("gradients plugin")
        group.add_argument("--gradients_cache_dir", metavar="DIR", default=None,
                           help="Directory of the Gradients tab's persistent cache of run summaries (default: "
                                "$TB_GRADIENT_CACHE_DIR, else the user's cache directory; 'off' disables it). "
                                "Never inside the logdir.")
        group.add_argument("--gradients_memory_mb", metavar="MB", type=float, default=None,
                           help="Memory budget of the Gradients tab for runs' full-resolution arrays mapped from "
                                "the cache; least recently used runs are unmapped beyond it (default: "
                                "$TB_GRADIENT_MEMORY_MB, else 400).")

    def fix_flags(self, flags: Any) -> None:
        """``--logdir s3://...`` (or a ``--logdir_spec`` holding one) with TensorFlow installed and no tensorflow-io:
        TensorBoard refuses to start, since its loaders cannot open the URL. This plugin reads it through fsspec, so
        it takes the flag's value for itself and leaves TensorBoard's own loaders none (their tabs stay empty), with a
        warning that says so."""
        if getattr(flags, "inspect", False):
            return
        from .remote import tensorboard_reads

        for name, keep in (("logdir", REMOTE_LOGDIR_FLAG), ("logdir_spec", REMOTE_LOGDIR_SPEC_FLAG)):
            value = getattr(flags, name, "") or ""
            paths = parse_logdir_spec(value).values() if name == "logdir_spec" else [value]
            unreadable = [p for p in paths if not tensorboard_reads(p)]
            if unreadable:
                setattr(flags, keep, value)
                setattr(flags, name, "")
                logger.warning("TensorBoard cannot open %s itself (TensorFlow without tensorflow-io): the Gradients "
                               "tab reads it; TensorBoard's other tabs stay empty. Install tensorflow-io, or run "
                               "TensorBoard without TensorFlow, for them.", ", ".join(unreadable))

    def load(self, context: base_plugin.TBContext) -> GradientsPlugin:
        return GradientsPlugin(context)
