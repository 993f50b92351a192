"""The data that flows between the stages: a run's arrays (:class:`RunData`, :class:`Series`), as the run store builds
them, and what the detector found in them (:class:`Report` and its parts), as the plugin and the auditor show it.

They live apart from the modules that produce them so that the detector needs no run store (and no event reader) to
judge arrays, and the auditor and plugin read one vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

#: The kind of validation findings: a validation metric worsened after its best point, or went non-finite. Not a
#: gradient explosion (``Episode.validation`` says which and why), so ``--fail-on explosion`` does not fail on it.
VAL_KIND = "val_degradation"
#: The kind of slow-growth and saturated-clip findings: warnings (nothing broke yet), never an explosion, so only
#: ``--fail-on any`` fails on them. ``Episode.growth`` says which and why.
GROWTH_KIND = "growth"
#: Name used in findings for the run-level total gradient norm (not a layer of the model).
TOTAL = "total_grad_norm"


# ---------------------------------------------------------------------------------------------------------- run data


def update_ratio(update_norm: np.ndarray, param_norm: np.ndarray) -> np.ndarray:
    """The update ratio ``||w_t+1 - w_t|| / ||w_t||`` as float32, inf/NaN where the parameter norm is 0.

    The one definition of the derived metric: the run store, the detector (offline on row chunks, online per step)
    and the plugin's charts must agree on it to the bit, or a layer flagged in one view is not the one shown in another.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return (update_norm / param_norm).astype(np.float32)


def update_ratio_inputs(layer_metrics: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Where a run's update ratio comes from: ``(ratio, None)`` when a tool logged it directly (Composer),
    ``(update_norm, param_norm)`` to divide with :func:`update_ratio`, None when the run has neither."""
    direct = layer_metrics.get("update_ratio")
    if direct is not None:
        return direct, None
    upd = layer_metrics.get("update_norm")
    par = layer_metrics.get("param_norm")
    if upd is None or par is None:
        return None
    return upd, par


class BatchIds(Mapping):
    """Sample ids by step (``step -> int64 ids``), packed: the sorted steps, and per step a slice of one flat array of
    ids. A mapping like a dict of arrays, at about a third of its memory (a step of 8 ids: 80 bytes against ~260), and
    pickled as three arrays. Immutable: the run store appends into buffers of its own and hands out snapshots."""

    __slots__ = ("steps", "offsets", "ids")

    def __init__(self, steps: np.ndarray | None = None, offsets: np.ndarray | None = None,
                 ids: np.ndarray | None = None) -> None:
        self.steps = np.zeros(0, dtype=np.int64) if steps is None else steps
        self.offsets = np.zeros(1, dtype=np.int64) if offsets is None else offsets
        self.ids = np.zeros(0, dtype=np.int64) if ids is None else ids

    @classmethod
    def from_dict(cls, batches: Mapping[int, np.ndarray]) -> BatchIds:
        steps = np.array(sorted(batches), dtype=np.int64)
        parts = [np.asarray(batches[s], dtype=np.int64).reshape(-1) for s in steps.tolist()]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        return cls(steps, offsets, np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))

    def _index(self, step: object) -> int:
        if not isinstance(step, (int, np.integer)):
            return -1
        k = int(np.searchsorted(self.steps, step))
        return k if k < len(self.steps) and self.steps[k] == step else -1

    def __getitem__(self, step: int) -> np.ndarray:
        k = self._index(step)
        if k < 0:
            raise KeyError(step)
        return self.ids[self.offsets[k]:self.offsets[k + 1]]

    def __contains__(self, step: object) -> bool:
        return self._index(step) >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps.tolist())

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"BatchIds({len(self)} steps, {len(self.ids)} ids)"

    def __getstate__(self) -> tuple:
        return self.steps, self.offsets, self.ids

    def __setstate__(self, state: tuple) -> None:
        self.steps, self.offsets, self.ids = state


@dataclass
class Series:
    """One per-step series (loss, lr, total grad norm, ...): sorted steps and their values."""

    steps: np.ndarray  # int64 [n], strictly increasing
    values: np.ndarray  # float64 [n]; NaN/Inf kept as logged


@dataclass
class RunData:
    """Everything known about one run, as arrays.

    ``layer_metrics[m][i, j]`` is metric ``m`` of layer ``layers[j]`` at step ``steps[i]``; ``present[i, j]`` says
    whether layer ``j`` was logged at that step at all (frozen or not-yet-added layers are absent, which is not the
    same as a logged NaN). ``series`` holds per-step series under our names: ``loss``, ``lr``, ``total_grad_norm``,
    ``loss_scale``, ``step_skipped``, ``guard_action`` and, for validation, ``val_loss`` (and others the run store
    recognises).
    """

    name: str
    source: str  # "tb_gradient_plugin" or the tool that wrote it: "hf_trainer", "lightning", "keras", "plain", ...
    layers: list[str] = field(default_factory=list)  # model order (first-seen order)
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    layer_metrics: dict[str, np.ndarray] = field(default_factory=dict)  # float32 [len(steps), len(layers)]
    present: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))
    series: dict[str, Series] = field(default_factory=dict)
    hist_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    histograms: np.ndarray | None = None  # int64 [len(hist_steps), len(layers), HIST_BINS], or None
    warnings: list[str] = field(default_factory=list)
    unknown_tags: list[str] = field(default_factory=list)
    events: int = 0  # intact events read: 0 means nothing at all could be read
    bytes_read: int = 0
    first_wall_time: float | None = None  # wall time of the earliest summary: when the run started
    last_wall_time: float | None = None  # wall time of the latest summary: when the run last wrote
    #: step -> int64 sample ids of its batch, for the steps whose ids were logged (``log_batch``); empty otherwise
    batches: BatchIds = field(default_factory=BatchIds)

    def update_ratio_available(self) -> bool:
        """Whether :meth:`update_ratio` has something to return (logged directly or derivable)."""
        return update_ratio_inputs(self.layer_metrics) is not None

    def update_ratio(self) -> np.ndarray | None:
        """update_norm / param_norm per (step, layer), or None when either is missing.

        Tools that log only the ratio (Composer) give it directly as the ``update_ratio`` layer metric.
        """
        inputs = update_ratio_inputs(self.layer_metrics)
        if inputs is None:
            return None
        values, param_norm = inputs
        return values if param_norm is None else update_ratio(values, param_norm)

    @property
    def num_values(self) -> int:
        """Logged values held (per-layer entries plus series points): the unit of the auditor's throughput."""
        per_layer = int(self.present.sum()) * max(1, len(self.layer_metrics))
        return per_layer + sum(len(s.steps) for s in self.series.values())

    def last_step(self) -> int | None:
        """The largest step of any per-layer metric or series, or None for an empty run."""
        candidates = [int(self.steps[-1])] if len(self.steps) else []
        candidates += [int(s.steps[-1]) for s in self.series.values() if len(s.steps)]
        return max(candidates) if candidates else None


# --------------------------------------------------------------------------------------------------- detector report


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _json_floats(doc: dict | None) -> dict | None:
    """A flat finding object with its non-finite floats as null."""
    if doc is None:
        return None
    return {k: _json_float(v) if isinstance(v, float) else v for k, v in doc.items()}


@dataclass
class LayerFinding:
    """One layer's part in an episode: which metric crossed, when first, when highest, and how far above baseline."""

    name: str
    metric: str  # grad_norm | update_ratio | grad_max_abs | nonfinite_count | total_grad_norm
    first_step: int
    peak_step: int
    peak_value: float
    ratio: float  # peak / baseline; inf for non-finite values

    def to_json(self) -> dict:
        return {"name": self.name, "metric": self.metric, "first_step": self.first_step, "peak_step": self.peak_step,
                "peak_value": _json_float(self.peak_value), "ratio": _json_float(self.ratio)}


@dataclass
class Episode:
    """A step range where gradients exploded (or went non-finite, or AMP skipped steps)."""

    kind: str
    start_step: int
    end_step: int
    peak_step: int
    severity: float  # peak over baseline; inf when values went non-finite
    layers: list[LayerFinding]  # ranked: [0] is the offending layer
    loss_spike_step: int | None = None
    advice: list[str] = field(default_factory=list)
    validation: dict | None = None  # kind val_degradation: the ValidationFinding (start_step = its best step)
    #: kind explosion / chronic: what showed that training broke (see CONFIRMATIONS)
    confirmed_by: list[str] = field(default_factory=list)
    #: kind chronic: the recurrence (events, explosions, spikes, rate_per_1k, loss_suffers, worst)
    chronic: dict | None = None
    #: kind dead: layers whose gradient died (layers, of, from_step, after_episode, restart_before)
    dead: dict | None = None
    #: kind growth: slow growth or a saturated clip (signal, summary and its numbers; see docs/AUDIT_JSON.md)
    growth: dict | None = None

    def to_json(self) -> dict:
        """JSON object; non-finite floats become null (JSON has no NaN/Inf)."""
        return {"kind": self.kind, "start_step": self.start_step, "end_step": self.end_step,
                "peak_step": self.peak_step, "severity": _json_float(self.severity),
                "layers": [f.to_json() for f in self.layers], "loss_spike_step": self.loss_spike_step,
                "advice": list(self.advice), "validation": self.validation,
                "confirmed_by": list(self.confirmed_by), "chronic": self.chronic, "dead": self.dead,
                "growth": _json_floats(self.growth)}


#: Why a group of crossings is an explosion: a level that stayed up, the loss spiked after it, the applied update
#: blew up (a clipped spike has a bounded update), a magnitude extreme enough on its own, or layers whose gradient
#: collapsed right after it (units the update killed).
CONFIRMATIONS = ("persistent", "loss_reaction", "update_ratio", "extreme", "collapse")
#: Kinds that fail ``--fail-on explosion``. A chronic finding exists only where something broke (one of its spikes was
#: an explosion, or the loss suffered), so it always does. Slow growth and a saturated clip (kind ``growth``) are
#: warnings: nothing broke yet, so they fail ``--fail-on any`` only.
FAILING_KINDS = ("explosion", "nonfinite", "chronic")


def fails_explosion(episode: Episode | dict) -> bool:
    """Whether an episode (or its JSON object) means training broke: what ``--fail-on explosion`` and the tab's
    warning sign go by. A validation finding never does (a NaN evaluation fails ``--fail-on nonfinite`` only)."""
    doc = episode if isinstance(episode, dict) else {"kind": episode.kind, "validation": episode.validation}
    return not doc.get("validation") and doc["kind"] in FAILING_KINDS


@dataclass
class AmpSkips:
    """Steps a mixed-precision loss scaler skipped for overflow: normal while the scale holds (one informational
    line), a non-finite episode once it collapses."""

    skipped: int = 0  # skipped steps while the scale was healthy
    logged_steps: int = 0
    last_scale: float | None = None  # the last finite loss scale logged
    collapsed: bool = False  # the scale collapsed somewhere (that is a non-finite episode)

    def summary(self) -> str:
        if not self.skipped and not self.collapsed:
            return "no AMP overflow skips"
        scale = ""
        if self.last_scale is not None and self.last_scale > 0:
            k = math.log2(self.last_scale)
            shown = f"2^{int(k)}" if k == int(k) else f"{self.last_scale:.3g}"
            scale = f"; the loss scale {'ended' if self.collapsed else 'settled'} at {shown}"
        verdict = "it collapsed: see the non-finite episode" if self.collapsed else "normal"
        return f"AMP skipped {self.skipped} of {self.logged_steps:,} steps{scale}: {verdict}"

    def to_json(self) -> dict:
        return {"skipped": self.skipped, "logged_steps": self.logged_steps, "last_scale": self.last_scale,
                "collapsed": self.collapsed, "summary": self.summary()}


@dataclass
class Spikes:
    """Transient gradient spikes: crossings after which nothing broke (a clipped one-step spike, a hard batch).

    Reported as a rate per 10,000 logged steps (the idea of OLMo 2's spike score), never as episodes.
    """

    count: int = 0
    logged_steps: int = 0
    max_ratio: float = 0.0
    steps: list[int] = field(default_factory=list)  # peak step of each spike, the first MAX_LISTED
    ratios: list[float] = field(default_factory=list)  # ... and its ratio over the baseline
    with_loss_spike: int = 0  # how many came with or were followed by a loss spike

    MAX_LISTED = 200

    @property
    def per_10k(self) -> float:
        return 1e4 * self.count / self.logged_steps if self.logged_steps else 0.0

    def summary(self) -> str:
        """One line, the same in the tab, the CLI and the HTML report."""
        if not self.count:
            return "no transient gradient spikes"
        plural = "s" if self.count != 1 else ""
        loss = ("all followed by a normal loss" if not self.with_loss_spike
                else f"{self.with_loss_spike} with a loss spike at or just after it")
        rate = f"{self.per_10k / 10:.2g} per 1k"
        return (f"{self.count} transient spike{plural} in {self.logged_steps:,} steps ({rate}), "
                f"up to {self.max_ratio:.3g}×, {loss}")

    def to_json(self) -> dict:
        return {"count": self.count, "logged_steps": self.logged_steps, "per_10k_steps": round(self.per_10k, 3),
                "max_ratio": _json_float(self.max_ratio), "steps": list(self.steps),
                "ratios": [_json_float(r) for r in self.ratios], "truncated": self.count > len(self.steps),
                "with_loss_spike": self.with_loss_spike, "summary": self.summary()}


@dataclass
class LossSpike:
    """A loss excursion above its own baseline; ``episode`` is the index of the gradient episode it followed."""

    step: int
    value: float
    baseline: float
    ratio: float
    episode: int | None = None

    def to_json(self) -> dict:
        return {"step": self.step, "value": _json_float(self.value), "baseline": _json_float(self.baseline),
                "ratio": _json_float(self.ratio), "episode": self.episode}


@dataclass
class ValidationFinding:
    """One validation series judged: its best point (the early-stopping point) and, when it worsened, why.

    ``cause`` is None (no degradation), ``overfitting`` (worse while the training loss kept improving),
    ``instability`` (worse from a gradient episode or loss spike at ``related_step``), ``degradation`` (the training
    loss did not improve either, or is unknown) or ``nonfinite`` (a NaN/Inf evaluation at ``worst_step``).
    """

    series: str
    higher_is_better: bool
    cause: str | None
    best_step: int | None
    best_value: float
    worst_step: int
    worst_value: float
    last_step: int
    change: float  # recent value over best (or best over recent, for a metric that should rise); inf: non-finite
    nonfinite_steps: list[int]
    last_value: float = math.nan
    related_step: int | None = None
    train_before: float = math.nan  # median training loss around the best point, and recently
    train_now: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.last_value):
            self.last_value = self.worst_value

    def to_json(self) -> dict:
        return {"series": self.series, "higher_is_better": self.higher_is_better, "cause": self.cause,
                "best_step": self.best_step, "early_stopping_step": self.best_step,
                "best_value": _json_float(self.best_value), "worst_step": self.worst_step,
                "worst_value": _json_float(self.worst_value), "last_step": self.last_step,
                "last_value": _json_float(self.last_value), "change": _json_float(self.change),
                "nonfinite_steps": list(self.nonfinite_steps), "related_step": self.related_step,
                "train_loss_before": _json_float(self.train_before), "train_loss_now": _json_float(self.train_now)}


@dataclass
class Report:
    """What the detector found in one run (the auditor's per-run JSON object)."""

    run: str
    source: str
    steps: int
    episodes: list[Episode]
    loss_spikes: list[LossSpike]
    warnings: list[str]
    validation: list[ValidationFinding] = field(default_factory=list)  # one per validation series (+ NaN findings)
    spikes: Spikes = field(default_factory=Spikes)
    amp: AmpSkips | None = None  # runs that logged a loss scale or skip flag

    def to_json(self) -> dict:
        return {"run": self.run, "source": self.source, "steps": self.steps,
                "episodes": [e.to_json() for e in self.episodes],
                "loss_spikes": [s.to_json() for s in self.loss_spikes], "warnings": list(self.warnings),
                "validation": [v.to_json() for v in self.validation], "spikes": self.spikes.to_json(),
                "amp": None if self.amp is None else self.amp.to_json()}
