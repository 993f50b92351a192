"""Validation series: the early-stopping point of each, and whether (and why) it worsened after it.

A worse validation metric is not a gradient explosion: it becomes an episode of its own kind (``val_degradation``)
whose cause (overfitting, instability, degradation) decides the advice; a non-finite evaluation is a ``nonfinite``
episode.
"""

from __future__ import annotations

import math

import numpy as np

from ..types import VAL_KIND, Episode, LossSpike, Series, ValidationFinding
from .advice import fmt_num
from .baseline import MAD_TO_SIGMA
from .config import DetectorConfig

#: Validation series the run store provides, by name: whether higher is better (a metric) or lower (a loss).
VALIDATION_SERIES = {"val_loss": False, "val_acc": True, "val_accuracy": True, "val_map": True}
#: Any series named ``val_metric/<name>`` is a validation metric that should rise (e.g. ``val_metric/f1``).
VAL_METRIC_PREFIX = "val_metric/"


def validation_series(name: str) -> bool | None:
    """Whether a series is a validation metric: False for a loss (lower is better), True for a metric that should
    rise (accuracy, mAP, anything under ``val_metric/``), None for a series that is not a validation metric."""
    if name.startswith(VAL_METRIC_PREFIX) and len(name) > len(VAL_METRIC_PREFIX):
        return True
    return VALIDATION_SERIES.get(name)


def _smooth(v: np.ndarray, width: int) -> np.ndarray:
    """Centred running median (edges use what they have), so one noisy evaluation makes no best point."""
    if width <= 1 or v.size < 2 * width + 1:
        return v
    h = width // 2
    pad = np.concatenate([np.full(h, np.nan), v, np.full(h, np.nan)])
    return np.nanmedian(np.lib.stride_tricks.sliding_window_view(pad, width), axis=1)


def judge_validation(series: dict[str, Series], loss: Series | None, episodes: list[Episode], spikes: list[LossSpike],
                cfg: DetectorConfig) -> list[ValidationFinding]:
    """Judge every validation series of a run: its best point, and whether (and why) it worsened after it."""
    out = []
    for name in sorted(series):
        rising = validation_series(name)
        s = series[name]
        if rising is None or len(s.steps) == 0:
            continue
        steps = np.asarray(s.steps, dtype=np.int64)
        vals = np.asarray(s.values, dtype=np.float64)
        fin = np.isfinite(vals)
        # lower is better in ``score`` for both kinds of series
        score = np.where(fin, -vals if rising else vals, np.nan)
        for grp in _runs_of(~fin):
            before = np.nonzero(fin[:grp[0]])[0]
            b = int(before[np.argmin(score[before])]) if before.size else None
            out.append(ValidationFinding(
                name, bool(rising), "nonfinite", None if b is None else int(steps[b]),
                math.nan if b is None else float(vals[b]), int(steps[grp[0]]), float(vals[grp[0]]),
                int(steps[grp[-1]]), math.inf, [int(steps[i]) for i in grp]))
        idx = np.nonzero(fin)[0]
        if idx.size == 0:
            continue
        if idx.size < cfg.val_min_points:  # too few evaluations to tell a worsening from noise: only the best one
            raw_best = int(idx[np.argmin(score[idx])])
            out.append(ValidationFinding(name, bool(rising), None, int(steps[raw_best]), float(vals[raw_best]),
                                         int(steps[idx[-1]]), float(vals[idx[-1]]), int(steps[idx[-1]]), 1.0, []))
            continue
        sm = _smooth(score[idx], cfg.val_smooth)
        k = int(np.argmin(sm))
        near = idx[max(0, k - cfg.val_smooth // 2):k + cfg.val_smooth // 2 + 1]
        best = int(near[np.argmin(score[near])])  # the evaluation to stop at: the best raw point near the smooth best
        after = idx[idx > best]
        finding = ValidationFinding(name, bool(rising), None, int(steps[best]), float(vals[best]),
                                    int(steps[idx[-1]]), float(vals[idx[-1]]), int(steps[idx[-1]]), 1.0, [])
        out.append(finding)
        recent = after[-max(cfg.val_patience, after.size // 4):]
        ref = abs(float(sm[k])) or 1.0
        worse = (score[recent] - sm[k]) / ref
        # the noise of one evaluation: robust scatter around the running median (0 for a smooth series)
        noise = MAD_TO_SIGMA * float(np.median(np.abs(score[idx] - sm))) / ref
        need = max(cfg.val_min_worsening, cfg.val_noise_z * noise)
        if after.size < cfg.val_patience or not np.median(worse) >= need:
            raw_best = int(idx[np.argmin(score[idx])])  # not degraded: simply the best evaluation
            finding.best_step, finding.best_value = int(steps[raw_best]), float(vals[raw_best])
            continue
        worst = int(after[np.argmax(score[after])])
        onset = int(after[np.argmax((score[after] - sm[k]) / ref >= need)])
        finding.worst_step, finding.worst_value = int(steps[worst]), float(vals[worst])
        finding.change = float(1.0 + np.median(worse))
        finding.cause = _val_cause(finding, int(steps[onset]), loss, episodes, spikes, int(steps[recent[0]]))
    return out


def _runs_of(mask: np.ndarray) -> list[np.ndarray]:
    idx = np.nonzero(mask)[0]
    return np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1) if idx.size else []


def _val_cause(f: ValidationFinding, onset: int, loss: Series | None, episodes: list[Episode],
               spikes: list[LossSpike], recent_from: int) -> str:
    """instability (a gradient episode or loss spike between the best point and the onset of the worsening),
    overfitting (the training loss kept improving meanwhile) or degradation (neither: training got worse too)."""
    best = f.best_step
    for ep in episodes:
        if ep.kind in ("explosion", "nonfinite") and ep.end_step >= best and ep.start_step <= onset:
            f.related_step = ep.start_step
            return "instability"
    for sp in spikes:
        if best <= sp.step <= onset:
            f.related_step = sp.step
            return "instability"
    if loss is None or len(loss.steps) == 0:
        return "degradation"
    ls, lv = np.asarray(loss.steps), np.asarray(loss.values, dtype=np.float64)
    ok = np.isfinite(lv)
    before = lv[ok & (ls <= best)]
    now = lv[ok & (ls >= recent_from)]
    if before.size == 0 or now.size == 0:
        return "degradation"
    before = before[-max(1, now.size):]
    f.train_before, f.train_now = float(np.median(before)), float(np.median(now))
    return "overfitting" if f.train_now < f.train_before else "degradation"


def _val_episode(f: ValidationFinding) -> Episode:
    """The finding as an episode of kind ``val_degradation`` (never an explosion: the auditor's ``--fail-on
    explosion`` ignores it), with the advice that fits its cause. A non-finite evaluation is a ``nonfinite`` episode
    (with the same ``validation`` details): NaN weights or activations are a finding whatever the cause."""
    what = f"validation {f.series}"
    best_txt = (f"its best point was step {f.best_step} ({fmt_num(f.best_value)})" if f.best_step is not None
                else "there was no finite value before it")
    if f.cause == "nonfinite":
        more = len(f.nonfinite_steps) - 1
        advice = [f"{what} was non-finite at step {f.worst_step}" +
                  (f" and at the {more} evaluation{'s' if more > 1 else ''} after it in a row (through step "
                   f"{f.nonfinite_steps[-1]})" if more else "") +
                  f"; {best_txt}. Check the evaluation (empty batches, log of 0, an overflow under mixed precision) "
                  "and the weights of that checkpoint."]
        return Episode("nonfinite", f.worst_step, f.nonfinite_steps[-1], f.worst_step, math.inf, [], None, advice,
                       f.to_json())
    pct = f"{abs(f.change - 1) * 100:.0f}%"
    head = (f"{what} was best at step {f.best_step} ({fmt_num(f.best_value)}) and has been {pct} worse since (last "
            f"{fmt_num(f.last_value)} at step {f.last_step})")
    if f.cause == "overfitting":
        advice = [f"{head} while the training loss kept improving ({fmt_num(f.train_before)} -> "
                  f"{fmt_num(f.train_now)}): the model is overfitting, not exploding. Stop early at step "
                  f"{f.best_step} (keep that checkpoint), or regularize (weight decay, dropout, augmentation, more "
                  "data)."]
    elif f.cause == "instability":
        advice = [f"{head}, and it began with the training instability at step {f.related_step}: fix that episode "
                  "(see its advice) rather than stopping early; until then, the checkpoint of step "
                  f"{f.best_step} is the one to keep."]
    else:
        advice = [f"{head} while the training loss did not improve either: "
                  "training itself stalled or diverged; check the learning rate and the data. The checkpoint of "
                  f"step {f.best_step} is the best so far."]
    return Episode(VAL_KIND, f.best_step, f.last_step, f.worst_step, float(f.change), [], None, advice, f.to_json())


def with_validation(episodes: list[Episode], spikes: list[LossSpike], findings: list[ValidationFinding]
                     ) -> list[Episode]:
    """Gradient and validation episodes in step order; loss spikes keep pointing at their gradient episode."""
    extra = [_val_episode(f) for f in findings if f.cause is not None]
    if not extra:
        return episodes
    merged = sorted(range(len(episodes) + len(extra)),
                    key=lambda k: ((episodes + extra)[k].start_step, k >= len(episodes), k))
    where = {old: new for new, old in enumerate(merged)}
    for s in spikes:
        if s.episode is not None:
            s.episode = where[s.episode]
    return [(episodes + extra)[k] for k in merged]
