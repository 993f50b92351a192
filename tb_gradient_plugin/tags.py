"""Other tools' tags -> our series and per-layer metrics: the table of ``docs/TAG_MAPPING.md``.

The run store (``runs.py``) reads runs that never used our writer (Hugging Face Trainer, Lightning, Keras, YOLOv5,
Ignite, Composer, plain scripts). :func:`map_tag` says what one scalar tag means to us: a per-step series
(:class:`SeriesTag`) or a per-parameter norm that folds into the norm of its layer (:class:`ParamTag`, layer from
:func:`layer_of`). A tag it does not know is reported as unknown, never guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Series tags of other tools: tag -> (series, priority, tool hint). Lower priority wins when a run has several tags
#: for one series; a tool hint is a tag that only that tool writes.
_SERIES_TAGS: dict[str, tuple[str, int, str | None]] = {
    # loss
    "loss": ("loss", 2, None),
    "train/loss": ("loss", 1, None),
    "train_loss": ("loss", 2, None),
    "training_loss": ("loss", 3, None),
    "Loss/train": ("loss", 3, None),
    "loss/train": ("loss", 3, None),
    "training/loss": ("loss", 3, None),
    "loss/train/total": ("loss", 1, "composer"),
    "batch_loss": ("loss", 1, "keras"),
    "epoch_loss": ("loss", 4, "keras"),
    # learning rate
    "lr": ("lr", 2, None),
    "learning_rate": ("lr", 2, None),
    "train/lr": ("lr", 2, None),
    "train/learning_rate": ("lr", 1, "hf_trainer"),
    "charts/learning_rate": ("lr", 3, None),
    "x/lr0": ("lr", 2, "yolov5"),
    "epoch_learning_rate": ("lr", 4, "keras"),
    "batch_learning_rate": ("lr", 3, "keras"),
    # total gradient norm
    "grad_norm": ("total_grad_norm", 2, None),
    "total_grad_norm": ("total_grad_norm", 2, None),
    "total_norm": ("total_grad_norm", 2, None),
    "grad_norm/total": ("total_grad_norm", 2, None),
    "grad_norm_total": ("total_grad_norm", 2, None),
    "gradient_norm": ("total_grad_norm", 3, None),
    "train/grad_norm": ("total_grad_norm", 1, "hf_trainer"),
    "l2_norm/grad/global": ("total_grad_norm", 1, "composer"),
    # validation loss
    "val_loss": ("val_loss", 2, None),
    "val/loss": ("val_loss", 2, None),
    "eval/loss": ("val_loss", 1, "hf_trainer"),
    "valid_loss": ("val_loss", 3, None),
    "validation_loss": ("val_loss", 3, None),
    "Loss/val": ("val_loss", 3, None),
    "loss/val": ("val_loss", 3, None),
    "Loss/validation": ("val_loss", 3, None),
    "validation/loss": ("val_loss", 3, None),
    "valid/loss": ("val_loss", 3, None),
    "test/loss": ("val_loss", 4, None),
    "test_loss": ("val_loss", 4, None),
    # validation metrics that should rise (judged by the detector's validation check)
    "val_acc": ("val_accuracy", 2, None),
    "val_accuracy": ("val_accuracy", 2, None),
    "val/acc": ("val_accuracy", 2, None),
    "val/accuracy": ("val_accuracy", 2, None),
    "eval/accuracy": ("val_accuracy", 1, "hf_trainer"),
    "metrics/mAP_0.5": ("val_map", 1, "yolov5"),
    "metrics/mAP_0.5:0.95": ("val_map", 2, "yolov5"),
    # mixed precision
    "loss_scale": ("loss_scale", 2, None),
    "train/loss_scale": ("loss_scale", 2, None),
    "scaler/scale": ("loss_scale", 3, None),
    "amp/loss_scale": ("loss_scale", 3, None),
}

#: Keras' ``validation/`` directory: tags mapped there (the same names mean the validation series).
_VALIDATION_TAGS: dict[str, tuple[str, int, str | None]] = {
    "epoch_loss": ("val_loss", 1, "keras"),
    "evaluation_loss_vs_iterations": ("val_loss", 2, "keras"),
    "epoch_accuracy": ("val_accuracy", 1, "keras"),
    "evaluation_accuracy_vs_iterations": ("val_accuracy", 2, "keras"),
    "loss": ("val_loss", 3, None),
}

#: YOLOv5 logs its loss as components (box, object, class, and segmentation in -seg models); its total loss is their
#: sum, which is what this store calls ``loss`` / ``val_loss``.
_SUM_TAGS: dict[str, tuple[str, int, str | None]] = {
    f"{split}/{part}_loss": (series, 1, "yolov5")
    for split, series in (("train", "loss"), ("val", "val_loss"))
    for part in ("box", "obj", "cls", "seg")
}

#: Bookkeeping tags every tool writes that carry nothing to audit (kept out of ``unknown_tags`` to keep it useful).
_BOOKKEEPING = {"epoch", "batch", "step", "global_step", "hp_metric", "train/epoch", "trainer/global_step"}
_BOOKKEEPING_PATTERNS = (re.compile(r"^_hparams_/"), re.compile(r"/text_summary$"), re.compile(r"^keras$"))

#: Tool hints of tags that are not themselves mapped.
_TOOL_HINTS = (
    (re.compile(r"^hp_metric$"), "lightning"),
    (re.compile(r"^metrics/mAP_0\.5"), "yolov5"),
    (re.compile(r"^train/(train_runtime|train_samples_per_second|total_flos)$"), "hf_trainer"),
    (re.compile(r"^evaluation_\w+_vs_iterations$"), "keras"),
    (re.compile(r"^(epoch|batch)_\w+$"), "keras"),
)

_LR_MONITOR = re.compile(r"^lr-[A-Za-z0-9_]+(?:/(?:pg|group)0)?$")  # Lightning LearningRateMonitor, Composer


@dataclass(frozen=True)
class ParamTag:
    """A per-parameter norm tag: folds into the per-layer ``metric`` of the layer owning ``param``."""

    metric: str  # grad_norm | param_norm | update_norm | grad_max_abs | update_ratio
    param: str  # parameter path, dotted
    fold: str  # "l2": root of the sum of squares; "max": maximum
    level: int  # Lightning's _step (0) / plain (1) / _epoch (2): one level per metric is used, so units do not mix
    tool: str | None


@dataclass(frozen=True)
class SeriesTag:
    """A tag that is (a component of) one of our series."""

    series: str
    priority: float
    tool: str | None
    summed: bool = False  # a component: the series is the sum of the components logged at a step


_LIGHTNING_NORM = re.compile(r"^grad_(?P<norm>[0-9.]+|inf)_norm(?P<rest>/.+|_total)$")
_SUFFIX = re.compile(r"^(?P<base>.+?)(?P<sfx>_step|_epoch)$")
_PARAM_FAMILIES: tuple[tuple[re.Pattern[str], str, str, str, str | None], ...] = (
    # (pattern with group p, metric, fold, separator of the parameter path, tool)
    (re.compile(r"^(?:[^/]+/)?grads_norm/(?P<p>.+)$"), "grad_norm", "l2", "/", "ignite"),
    (re.compile(r"^(?:[^/]+/)?weights_norm/(?P<p>.+)$"), "param_norm", "l2", "/", "ignite"),
    (re.compile(r"^l2_norm/grad/(?P<p>.+)$"), "grad_norm", "l2", ".", "composer"),
    (re.compile(r"^l2_norm/param/(?P<p>.+)$"), "param_norm", "l2", ".", "composer"),
    (re.compile(r"^l2_norm/update/(?P<p>.+)$"), "update_norm", "l2", ".", "composer"),
    (re.compile(r"^l2_norm_ratio/update_param/(?P<p>.+)$"), "update_ratio", "max", ".", "composer"),
    (re.compile(r"^(?:grad_norm|grad_norms|gradient_norm|grad_norm_per_param)/(?P<p>.+)$"), "grad_norm", "l2", ".",
     None),
    (re.compile(r"^(?:param_norm|weight_norm)/(?P<p>.+)$"), "param_norm", "l2", ".", None),
)


def map_tag(tag: str, role: str = "main") -> SeriesTag | ParamTag | None:
    """What a scalar tag of another tool means to us; ``None`` when unknown.

    ``role`` is ``"validation"`` for tags of a Keras ``validation/`` directory.
    """
    if role == "validation":
        hit = _VALIDATION_TAGS.get(tag)
        return SeriesTag(*hit) if hit else None
    hit = _SERIES_TAGS.get(tag)
    if hit:
        return SeriesTag(*hit)
    hit = _SUM_TAGS.get(tag)
    if hit:
        return SeriesTag(*hit, summed=True)
    if _LR_MONITOR.match(tag):
        return SeriesTag("lr", 3, None)
    m = _LIGHTNING_NORM.match(tag)
    if m:
        return _lightning_norm(m.group("norm"), m.group("rest"))
    m = _SUFFIX.match(tag)
    if m:  # Lightning's on_step/on_epoch copies of a logged metric
        base = map_tag(m.group("base"))
        if isinstance(base, SeriesTag) and not base.summed:
            if m.group("sfx") == "_step":
                return SeriesTag(base.series, base.priority - 0.5, "lightning")
            if base.series == "val_loss":
                return SeriesTag("val_loss", base.priority + 0.5, "lightning")
            return SeriesTag(base.series + "_epoch", base.priority, "lightning")
    for pattern, metric, fold, sep, tool in _PARAM_FAMILIES:
        m = pattern.match(tag)
        if m and m.group("p") not in ("total", "global"):
            return ParamTag(metric, m.group("p").replace(sep, "."), fold, 1, tool)
    return None


def _lightning_norm(norm: str, rest: str) -> SeriesTag | ParamTag | None:
    level = 1
    m = _SUFFIX.match(rest)
    if m:
        rest, level = m.group("base"), (0 if m.group("sfx") == "_step" else 2)
    if norm in ("2", "2.0"):
        if rest == "_total":
            return SeriesTag("total_grad_norm", 1, "lightning")  # its _step/_epoch copies: map_tag's suffix rule
        return ParamTag("grad_norm", rest[1:], "l2", level, "lightning")
    if norm == "inf" and rest != "_total":
        return ParamTag("grad_max_abs", rest[1:], "max", level, "lightning")
    return None


def layer_of(param: str) -> str:
    """The layer owning a parameter: its path minus the last component (``layer1.weight`` -> ``layer1``).

    A path of one component, or one ending in a number (already a layer, like ``encoder.layers.3``), is its own layer.
    """
    head, dot, last = param.rpartition(".")
    if not dot or not head or last.isdigit():
        return param
    return head


def is_bookkeeping(tag: str) -> bool:
    """Whether an unmapped tag is one every tool writes and that carries nothing to audit (not an unknown tag)."""
    return tag in _BOOKKEEPING or any(p.search(tag) for p in _BOOKKEEPING_PATTERNS)


def tool_hint(tag: str) -> str | None:
    """The tool a tag that is not itself mapped betrays (``hp_metric``: Lightning), or None."""
    for pattern, tool in _TOOL_HINTS:
        if pattern.search(tag):
            return tool
    return None
