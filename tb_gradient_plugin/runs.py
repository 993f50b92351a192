"""Run store: a logdir becomes runs, and each run becomes dense per-run arrays for the detector, plugin and auditor."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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

    def update_ratio(self) -> np.ndarray | None:
        """update_norm / param_norm per (step, layer), or None when either is missing."""
        upd = self.layer_metrics.get("update_norm")
        par = self.layer_metrics.get("param_norm")
        if upd is None or par is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return (upd / par).astype(np.float32)
