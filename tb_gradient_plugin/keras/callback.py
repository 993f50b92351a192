"""``GradientMonitorCallback``: records the gradients Keras 3 ``model.fit`` actually applies.

No Keras callback sees gradients, and Keras' ``train_step`` is compiled (``tf.function``, often XLA). So the callback
hooks in one level lower: it wraps the compiled optimizer's ``apply`` (which every ``train_step`` reaches through
``apply_gradients``) and ``scale_loss`` (which receives the batch loss), and has the train function traced again.
The wrappers run *inside* the traced step and, on logged steps only (a ``tf.cond`` on the step counter), compute every
statistic on the device into a small ring buffer of non-trainable variables. The callback reads that buffer once per
logged batch (one host transfer) and hands the numbers to :class:`~tb_gradient_plugin.writer.GradientWriter`.
Unlogged steps cost two branch tests and a counter increment. Every ``histograms_every`` steps the same row also
carries each layer's gradient entries counted into the format's fixed log10|g| bins, in one fused pass over all layers.

Between fits the hooks stay in the traced function, switched off by a flag, so calling ``fit`` again with the same
callback does not trace (or XLA-compile) again. ``close()`` removes them: the optimizer gets its own methods back and
the train function is traced afresh on the next ``fit``.

With ``on_explosion=`` the same wrapper also holds back a step whose gradient norms cross thresholds the host's
explosion guard left in a variable after judging the step before; the host then judges the step in full at batch end
and has the last word (a held step it lets through is applied then). See ``docs/KERAS.md``, "Explosion guard".

On Keras' JAX and torch backends the same callback delegates to :class:`.backends.CaptureDriver`, which hooks the
JAX train step's ``stateless_apply`` or the torch optimizer's ``apply`` (:mod:`.capture_jax`, :mod:`.capture_torch`).
Other backends fail when the callback is constructed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from .. import format as fmt
from ..guard import GUARD_NONE, GUARD_RAISE, GUARD_SKIP, ExplosionGuard, GradientExplosionError, OnExplosion
from ..writer import GradientWriter
from .backends import CaptureDriver, check_backend
from .batches import BatchTracker
from .layers import group_by_layer, layer_paths
from .moments import moment_variables
from .patching import Patches
from .stats import grad_stats, histogram_counts

__all__ = ["GradientMonitorCallback"]

#: Columns of a ``before`` row: step, loss, lr, loss scale, total norm, then 4 blocks of one value per layer and, with
#: histograms on, ``HIST_BINS`` counts per layer (zeros on a logged step that is not a histogram step).
_PRE_FIXED = 5
#: Columns of an ``after`` row: step, skipped, then the update norms and, for an Adam-like optimizer, the norms of its
#: first and second moments (one value per layer each).
_POST_FIXED = 2
#: Columns of a guard row: step, loss, lr, loss scale, held (1: the step was not applied), then 3 blocks of one value
#: per layer: gradient sum of squares (scaled), max |g| (scaled), non-finite count.
_GUARD_FIXED = 5
#: The in-graph check holds a step slightly below the detector's thresholds, so that float rounding can only make it
#: hold a step the detector lets through (which is then applied late, exactly), never the other way round.
_HOLD_MARGIN = 1.0 - 1e-6
#: ``_Probe.let_through``: no crossing step is let through (the default: hold every crossing step).
_HOLD_ALL = -1


def _validate_model(model: Any) -> None:
    """Clear errors for models the monitor cannot observe (before ``fit`` fails somewhere less readable)."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"GradientMonitorCallback needs a Keras 3 model (keras.Model), got {type(model).__module__}."
            f"{type(model).__qualname__}"
        )
    if not getattr(model, "compiled", False):
        raise RuntimeError("the model is not compiled: call model.compile(optimizer=..., loss=...) before fit")
    if getattr(model, "optimizer", None) is None:
        raise RuntimeError("the model was compiled without an optimizer, so there are no applied gradients to record")


@dataclass
class _Probe:
    """Device-side state for one set of trainable variables (one trace of the train step)."""

    layers: list[str]
    groups: list[list[int]]
    snapshots: list[Any]  # tf.Variable per trainable variable: its value before the logged step's update
    pre: Any  # tf.Variable float64 [slots, _PRE_FIXED + 4 * layers (+ HIST_BINS * layers)]
    post: Any  # tf.Variable float64 [slots, _POST_FIXED + layers]
    slots: int
    has_loss: bool
    loss_scaled: bool  # whether the optimizer is a LossScaleOptimizer (record loss scale and skipped steps)
    guard: _GuardState | None = None
    moments: tuple[list[Any], list[Any]] | None = None  # Adam's first and second moment of each variable


@dataclass
class _GuardState:
    """Device-side state of the explosion guard for one probe: every step's row, thresholds, a held step's gradients.

    ``rows`` is a ring of 2 rows (one step per execution is written and the host reads it before the next execution).
    ``thresholds`` and ``total_threshold`` are the detector's thresholds for the next step (float64, +inf in its
    warm-up); ``held`` the gradients of the last step that was not applied, so the host can apply it late when the
    detector lets it through (None in ``"warn"`` mode, which never holds a step).
    """

    rows: Any
    thresholds: Any
    total_threshold: Any
    held: list[Any] | None
    variables: list[Any]  # the trainable variables ``held`` is aligned with
    host_thresholds: np.ndarray  # what ``thresholds`` and ``total_threshold`` hold, to write them only on change


class GradientMonitorCallback(keras.callbacks.Callback):
    """Per-layer gradient health of ``model.fit`` for TensorBoard, without touching ``train_step``.

    Records, every ``every`` optimizer steps and per Keras layer (name: the layer's path in the model), the L2 norm,
    max |g| and non-finite count of the gradient the optimizer is given (unscaled under mixed precision, before the
    optimizer's own clipping), the parameter norm before the step and the norm of the actual update
    ``w_after - w_before``; per step the total gradient norm, the batch loss, the learning rate and, with a
    ``LossScaleOptimizer``, the loss scale and whether the step was skipped for overflow.

    With ``histograms_every=N`` (0: off), every N steps also records each layer's gradient entries counted into the
    format's fixed log10|g| bins (unscaled, like the norms), so a blow-up shows whether the whole distribution moved or
    a few entries did. A histogram step is also a logged step: all the statistics above are recorded with it.

    ``on_explosion="warn" | "raise" | "skip" | callable | ExplosionGuard`` turns on the explosion guard
    (:mod:`.guard`): every step is judged before the optimizer applies it, and ``guard_action`` is recorded.

    Each logged step also records which batch it trained on: its ``epoch``, its ``batch_index`` and, where ``fit``'s
    data names them (arrays with ``shuffle=False``, or an :class:`~.batches.IndexedBatches`), its sample ids.

    Files go to ``log_dir/train``, the directory Keras' own ``TensorBoard(log_dir)`` callback writes its training
    summaries to, so both appear as one run. See ``docs/KERAS.md``.
    """

    def __init__(self, log_dir: str | os.PathLike, every: int = 1, *, histograms_every: int = 0,
                 flush_secs: float = 2.0, on_explosion: OnExplosion = None) -> None:
        backend = check_backend()
        super().__init__()
        self._guard = ExplosionGuard.resolve(on_explosion)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if isinstance(histograms_every, bool) or not isinstance(histograms_every, int) or histograms_every < 0:
            raise ValueError(f"histograms_every must be a non-negative integer (0: off), got {histograms_every!r}")
        #: JAX and torch backends: the capture that does the work of the hooks below (None on TensorFlow).
        self._driver = (None if backend == "tensorflow" else
                        CaptureDriver(backend, os.fspath(log_dir), every, histograms_every, flush_secs, self._guard))
        # On JAX the batch-end hook only re-raises a guard decision, so Keras may keep dispatching steps
        # asynchronously instead of waiting for each step's logs (a "raise" then surfaces one batch later at most).
        self.async_safe = backend == "jax"
        self.log_dir = os.fspath(log_dir)
        self.every = every
        self.histograms_every = histograms_every
        self._flush_secs = flush_secs
        self._writer: GradientWriter | None = None
        self._step_var: Any = None  # int64: steps this callback has counted (the next step's number)
        self._loss_var: Any = None  # float64: the batch loss of the step being traced
        self._probes: dict[tuple[int, ...], _Probe] = {}
        self._active: list[_Probe] = []
        self._enabled: Any = None  # bool: whether the hooks record (off between fits)
        self._optimizer: Any = None  # the optimizer whose methods are wrapped
        self._hooked_function: Any = None  # the model's train function traced with the hooks
        self._patches = Patches()
        self._original_apply: Any = None  # the optimizer's own apply (to apply a held step late)
        self._last_written = -1
        self._epoch_base = 0
        self._batches = BatchTracker()  # the epoch, index and (where known) sample ids of each step's batch
        self._next_step: int | None = None  # JAX and torch: the number of the next step, counted on the host
        self._batch_begin = 0
        self._loss_traced = False
        self._let_through: Any = None  # int64: crossing steps up to this one are applied (a callable let them through)
        self._let_through_host = _HOLD_ALL  # what _let_through should hold ...
        self._let_through_set = _HOLD_ALL  # ... and what it holds
        self._last_judged = -1
        self._guard_actions: dict[int, int] = {}  # guard_action of judged steps whose logged row is not written yet
        self._guard_rows: list[tuple[int, list[str], dict[str, Any]]] = []  # acted-on steps that `every` does not log

    @property
    def guard(self) -> ExplosionGuard | None:
        """The explosion guard (``on_explosion=``), or None when it is off; ``guard.decisions`` lists what it did."""
        return self._guard

    # ------------------------------------------------------------------------------------------------ keras hooks

    def set_model(self, model: Any) -> None:
        if not isinstance(model, keras.Model):
            _validate_model(model)  # raises the TypeError for non-Keras models
        super().set_model(model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        _validate_model(model)
        self._batches.train_begin(model)
        if self._driver is not None:
            self._driver.train_begin(model)
            if self._next_step is None:
                self._next_step = int(model.optimizer.iterations)
            return
        import tensorflow as tf

        optimizer = model.optimizer
        if self._guard is not None and int(getattr(model, "steps_per_execution", 1) or 1) != 1:
            raise ValueError(
                "on_explosion needs steps_per_execution=1: the guard decides each step from the host's judgement of "
                f"the step before, and within one execution of {model.steps_per_execution} steps there is none"
            )
        if self._writer is None or self._writer.closed:
            self._writer = GradientWriter(os.path.join(self.log_dir, "train"), flush_secs=self._flush_secs)
        if self._step_var is None:
            with tf.init_scope():
                self._step_var = tf.Variable(int(optimizer.iterations), dtype=tf.int64, trainable=False,
                                             name="gradient_monitor_step")
                self._loss_var = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="gradient_monitor_loss")
                self._enabled = tf.Variable(False, trainable=False, name="gradient_monitor_enabled")
                self._let_through = tf.Variable(_HOLD_ALL, dtype=tf.int64, trainable=False,
                                                name="gradient_monitor_let_through")
        if optimizer is not self._optimizer:
            self._detach()
            other = getattr(vars(optimizer).get("apply"), "gradient_monitor", None)
            if other is not None:  # one monitor per optimizer: the newest takes over
                other._detach()
            self._install(model, optimizer)
        if model.train_function is None or model.train_function is not self._hooked_function:
            # Not traced with the hooks (first fit, or recompiled since): trace it again, lazily on first call.
            model.make_train_function(force=True)
            self._hooked_function = model.train_function
            self._active = []
        self._enabled.assign(True)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._driver is None:
            self._epoch_base = int(self._step_var.numpy())
        else:  # JAX runs steps asynchronously: the host counts them instead of reading the device's counter
            self._epoch_base = self._next_step
        self._batches.epoch_begin(epoch, self._epoch_base)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._batch_begin = batch
        if self._driver is not None:
            self._write_positions(batch)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._driver is not None:
            self._driver.batch_end()
            return
        if self._guard is not None:
            self._judge()
        # Steps [lo, hi] ran in this execution (hi may overshoot on a short last execution: an extra read at worst).
        lo, hi = self._epoch_base + self._batch_begin, self._epoch_base + batch
        if self._guard_rows or any(n and hi // n >= -(-lo // n) for n in (self.every, self.histograms_every)):
            self._drain()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._driver is not None:
            self._driver.epoch_end()
            return
        self._drain()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._driver is not None:
            self._driver.train_end()
            return
        # The hooks stay in the traced train function, switched off, so the next fit need not trace it again.
        self._enabled.assign(False)
        if self._guard is not None:
            self._judge()
        self._drain()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Detach from the model (its optimizer and train function lose the hooks) and close the event file."""
        if self._driver is not None:
            self._driver.close()
            return
        model = self.model
        if model is not None and self._hooked_function is not None and model.train_function is self._hooked_function:
            model.make_train_function(force=True)
        self._detach()
        if self._writer is not None:
            self._writer.close()

    # ------------------------------------------------------------------------------------------------ installation

    def _install(self, model: keras.Model, optimizer: Any) -> None:
        original_apply = optimizer.apply
        original_scale_loss = optimizer.scale_loss
        owners = layer_paths(model)

        def scale_loss(loss):
            self._record_loss(loss)
            return original_scale_loss(loss)

        def apply(grads, trainable_variables=None):
            return self._apply(optimizer, original_apply, owners, grads, trainable_variables)

        apply.gradient_monitor = self
        self._optimizer = optimizer
        self._original_apply = original_apply
        self._patches.set(optimizer, "scale_loss", scale_loss)
        self._patches.set(optimizer, "apply", apply)

    def _detach(self) -> None:
        """Restore the optimizer's methods and forget the device state (a new trace will be needed)."""
        if self._enabled is not None:
            self._enabled.assign(False)
        self._patches.restore()
        self._optimizer = None
        self._original_apply = None
        self._hooked_function = None
        self._probes.clear()
        self._active = []

    # ---------------------------------------------------------------------------------------- traced (in-graph) code

    def _record_loss(self, loss: Any) -> None:
        import tensorflow as tf

        self._loss_traced = True
        self._loss_var.assign(tf.cast(tf.stop_gradient(tf.reduce_mean(loss)), tf.float64))

    def _probe(self, optimizer: Any, variables: list[Any], grads: list[Any], owners: dict[int, str],
               has_loss: bool) -> _Probe:
        import tensorflow as tf

        key = tuple(id(v) for v in variables) + (int(has_loss),)
        probe = self._probes.get(key)
        if probe is None:
            layers, groups = group_by_layer(variables, owners)
            spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
            # One row per recorded step of an execution (see the row index in _apply), plus one.
            slots = sum(-(-spe // n) for n in (self.every, self.histograms_every) if n) + 1
            width = _PRE_FIXED + (4 + (fmt.HIST_BINS if self.histograms_every else 0)) * len(layers)
            moments = moment_variables(optimizer, variables)
            post_width = _POST_FIXED + (1 if moments is None else 3) * len(layers)
            with tf.init_scope():
                snapshots = [tf.Variable(tf.zeros(tuple(v.shape), tf.as_dtype(v.dtype)), trainable=False)
                             for v in variables]
                pre = tf.Variable(tf.fill([slots, width], tf.constant(-1.0, tf.float64)), trainable=False)
                post = tf.Variable(tf.fill([slots, post_width], tf.constant(-1.0, tf.float64)), trainable=False)
            loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
            probe = _Probe(layers, groups, snapshots, pre, post, slots, has_loss, loss_scaled,
                           self._guard_state(variables, grads, layers), moments)
            self._probes[key] = probe
        if all(p is not probe for p in self._active):
            self._active.append(probe)
        return probe

    def _guard_state(self, variables: list[Any], grads: list[Any], layers: list[str]) -> _GuardState | None:
        import tensorflow as tf

        if self._guard is None:
            return None
        # Traced again mid-run (a new fit after close(), a recompiled model): start from the detector's thresholds.
        host_thresholds, host_total = self._guard.next_thresholds(layers)
        with tf.init_scope():
            rows = tf.Variable(tf.fill([2, _GUARD_FIXED + 3 * len(layers)], tf.constant(-1.0, tf.float64)),
                               trainable=False)
            thresholds = tf.Variable(host_thresholds.astype(np.float64), trainable=False)
            total_threshold = tf.Variable(host_total, dtype=tf.float64, trainable=False)
            held = None
            if self._guard.action != "warn":  # warn never holds a step back
                held = [tf.Variable(tf.zeros(tuple(v.shape), g.dtype), trainable=False)
                        for v, g in zip(variables, grads, strict=True)]
        return _GuardState(rows, thresholds, total_threshold, held, variables, np.append(host_thresholds, host_total))

    def _apply(self, optimizer: Any, original_apply: Any, owners: dict[int, str], grads: Any, variables: Any) -> Any:
        import tensorflow as tf

        if variables is None:
            variables = list(optimizer._trainable_variables)
        grads, variables = list(grads), list(variables)
        if not optimizer.built:  # as apply() would, but first: its state (loss scale, counters) is read below
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(variables)
        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        if not pairs:  # nothing to measure, but the step still counts
            result = original_apply(grads, variables)
            self._step_var.assign_add(1)
            self._loss_traced = False
            return result
        live_grads = [tf.convert_to_tensor(g) for g, _ in pairs]
        live_vars = [v for _, v in pairs]
        probe = self._probe(optimizer, live_vars, live_grads, owners, self._loss_traced)
        step = tf.convert_to_tensor(self._step_var.read_value())
        every = tf.constant(self.every, tf.int64)
        row_index = step // every
        due = tf.equal(step % every, 0)
        hist_step = tf.constant(False)
        if self.histograms_every:
            hist_every = tf.constant(self.histograms_every, tf.int64)
            hist_step = tf.equal(step % hist_every, 0)
            due = tf.logical_or(due, hist_step)
            # Strictly increasing over recorded steps, and it grows by at most ceil(spe / every) + ceil(spe /
            # histograms_every) within one execution: distinct ring slots for all the rows one execution writes.
            row_index += step // hist_every
        logged = tf.logical_and(self._enabled.read_value(), due)
        slot = row_index % probe.slots

        loss_scaled = probe.loss_scaled
        scale = (tf.cast(tf.convert_to_tensor(optimizer.dynamic_scale), tf.float64) if loss_scaled
                 else tf.constant(float(optimizer.loss_scale_factor or 1.0), tf.float64))
        counter = optimizer.inner_optimizer._iterations if loss_scaled else optimizer._iterations
        applied_before = tf.convert_to_tensor(counter)
        lr = tf.cast(tf.convert_to_tensor(optimizer.learning_rate), tf.float64)
        loss = self._loss_var.read_value() if probe.has_loss else tf.constant(math.nan, tf.float64)

        # With a guard every step's gradient statistics are needed (the host judges each step); without one they are
        # computed only on logged steps, inside the branch.
        stats = grad_stats(live_grads, probe.groups) if probe.guard is not None else None

        def before():
            row = self._before_row(probe, live_grads, live_vars, step, loss, lr, scale, stats)
            if self.histograms_every:
                n = len(probe.groups) * fmt.HIST_BINS
                unscale = scale if loss_scaled or optimizer.loss_scale_factor else None
                counts = tf.cond(
                    hist_step,
                    lambda: tf.cast(histogram_counts(live_grads, probe.groups, unscale), tf.float64),
                    lambda: tf.zeros([n], tf.float64))
                row = tf.concat([row, counts], 0)
            probe.pre.scatter_nd_update(tf.reshape(slot, [1, 1]), row[None, :])
            return tf.constant(True)

        tf.cond(logged, before, lambda: tf.constant(False))
        if probe.guard is None:
            result = original_apply(grads, variables)
            held = tf.constant(False)
        else:
            result = None  # Keras' apply returns nothing
            held = self._guarded_apply(probe, original_apply, grads, variables, live_grads, stats, step, scale)
            self._guard_row(probe, stats, step, loss, lr, scale, held)

        def after():
            # A step the guard held back is not an overflow skip (``guard_action`` records it).
            skipped = tf.cast(tf.logical_and(tf.equal(tf.convert_to_tensor(counter), applied_before),
                                             tf.logical_not(held)), tf.float64)
            updates = []
            for idxs in probe.groups:
                total = tf.add_n([
                    tf.reduce_sum(tf.square(tf.cast(tf.convert_to_tensor(live_vars[i].value), tf.float64)
                                            - tf.cast(probe.snapshots[i].read_value(), tf.float64)))
                    for i in idxs
                ])
                updates.append(tf.sqrt(total))
            if probe.moments is not None:  # after the update, as the optimizer keeps them for the next step
                for moment in probe.moments:
                    sumsq = [tf.reduce_sum(tf.square(tf.cast(tf.convert_to_tensor(m.value), tf.float64)))
                             for m in moment]
                    updates += [tf.sqrt(tf.add_n([sumsq[i] for i in idxs])) for idxs in probe.groups]
            row = tf.concat([tf.stack([tf.cast(step, tf.float64), skipped]), tf.stack(updates)], 0)
            probe.post.scatter_nd_update(tf.reshape(slot, [1, 1]), row[None, :])
            return tf.constant(True)

        tf.cond(logged, after, lambda: tf.constant(False))
        self._step_var.assign_add(1)
        self._loss_traced = False  # the next trace must see its own scale_loss call
        return result

    def _guarded_apply(self, probe: _Probe, original_apply: Any, grads: list[Any], variables: list[Any],
                       live_grads: list[Any], stats: tuple[Any, Any, Any], step: Any, scale: Any) -> Any:
        """Apply the step unless it crosses the detector's thresholds for it; returns whether it was held back.

        O(layers) comparisons against thresholds the host set after judging the step before, so the step stays
        compiled (no host round-trip). A held step's gradients are kept so the host can still apply it if its full
        judgement lets the step through.
        """
        import tensorflow as tf

        guard = probe.guard
        if guard.held is None:  # "warn" acts at batch end and never holds a step back
            original_apply(grads, variables)
            return tf.constant(False)
        layer_sumsq = stats[0]
        total_sumsq = tf.reduce_sum(layer_sumsq)
        finite = tf.math.is_finite(total_sumsq)
        over = tf.logical_or(
            tf.reduce_any(tf.sqrt(layer_sumsq) / scale > guard.thresholds.read_value() * _HOLD_MARGIN),
            tf.sqrt(total_sumsq) / scale > guard.total_threshold.read_value() * _HOLD_MARGIN)
        cross = tf.logical_and(finite, over)
        if not probe.loss_scaled:  # under a loss scale optimizer non-finite gradients are its overflow skips
            cross = tf.logical_or(cross, tf.logical_not(finite))
        if not isinstance(self._guard.action, str):  # a callable may have let the episode's crossings through
            cross = tf.logical_and(cross, step > self._let_through.read_value())
        hold = tf.logical_and(self._enabled.read_value(), cross)

        def keep() -> Any:
            for var, g in zip(guard.held, live_grads, strict=True):
                var.assign(g)
            return tf.constant(True)

        def apply() -> Any:
            original_apply(grads, variables)
            return tf.constant(False)

        return tf.cond(hold, keep, apply)

    def _guard_row(self, probe: _Probe, stats: tuple[Any, Any, Any], step: Any, loss: Any, lr: Any, scale: Any,
                   held: Any) -> None:
        """Every step's gradient statistics for the host's judgement (written only while the callback is on)."""
        import tensorflow as tf

        def write() -> Any:
            fixed = tf.stack([tf.cast(step, tf.float64), loss, lr, scale, tf.cast(held, tf.float64)])
            row = tf.concat([fixed, *stats], 0)
            probe.guard.rows.scatter_nd_update(tf.reshape(step % 2, [1, 1]), row[None, :])
            return tf.constant(True)

        tf.cond(self._enabled.read_value(), write, lambda: tf.constant(False))

    @staticmethod
    def _before_row(probe: _Probe, grads: list[Any], variables: list[Any], step: Any, loss: Any, lr: Any,
                    scale: Any, stats: tuple[Any, Any, Any] | None) -> Any:
        """Gradient and parameter statistics of a logged step, and the weight snapshot for the update norm."""
        import tensorflow as tf

        params = []
        for v, snap in zip(variables, probe.snapshots, strict=True):
            value = tf.convert_to_tensor(v.value)
            snap.assign(value)
            params.append(tf.reduce_sum(tf.square(tf.cast(value, tf.float64))))
        layer_sumsq, layer_max, nonfinite = stats if stats is not None else grad_stats(grads, probe.groups)
        param_norm = tf.sqrt(tf.stack([tf.add_n([params[i] for i in idxs]) for idxs in probe.groups]))
        total_sumsq = tf.reduce_sum(layer_sumsq)
        fixed = tf.stack([tf.cast(step, tf.float64), loss, lr, scale, tf.sqrt(total_sumsq) / scale])
        return tf.concat([fixed, tf.sqrt(layer_sumsq) / scale, param_norm, layer_max / scale, nonfinite], 0)

    # ----------------------------------------------------------------------------------------------- host side

    def _judge(self) -> None:
        """Let the guard judge every step not judged yet (one host read), carry out its decisions, set thresholds."""
        guard = self._guard
        rows: list[tuple[int, _Probe, np.ndarray]] = []
        for probe in self._active:
            if probe.guard is not None:
                for row in probe.guard.rows.numpy():
                    if int(row[0]) > self._last_judged:
                        rows.append((int(row[0]), probe, row))
        rows.sort(key=lambda r: r[0])
        for step, probe, row in rows:
            n = len(probe.layers)
            sumsq, gmax, nonfinite = row[_GUARD_FIXED:].reshape(3, n)
            scale = float(row[3])
            with np.errstate(invalid="ignore", over="ignore"):
                metrics = {"grad_norm": np.sqrt(sumsq) / scale, "grad_max_abs": gmax / scale,
                           "nonfinite_count": nonfinite}
                scalars = {"total_grad_norm": float(np.sqrt(sumsq.sum())) / scale}
            if probe.loss_scaled:  # the optimizer skips non-finite steps itself: overflows, not explosions
                scalars["step_skipped"] = float(not np.isfinite(sumsq.sum()))
                scalars["loss_scale"] = scale
            self._last_judged = step
            try:
                decision = guard.check(step, probe.layers, metrics, scalars)
            except GradientExplosionError:
                # The step was held back in the graph; record it, and everything before it, then stop training.
                self._record_guard(step, probe, row, metrics, scalars, GUARD_RAISE)
                self._drain()
                self._writer.flush()
                raise
            if row[4] > 0.5 and not decision.skip:
                # Held back in the graph, but the full judgement lets it through (a callable answered None, or the
                # in-graph margin): apply it now, before the next step runs, as it would have been.
                self._original_apply([h.value() for h in probe.guard.held], probe.guard.variables)
            if decision.episodes and not isinstance(guard.action, str):
                self._let_through_host = (_HOLD_ALL if decision.action == GUARD_SKIP
                                          else step + guard.config.merge_gap)
            self._record_guard(step, probe, row, metrics, scalars, decision.action)
        if not rows:
            return
        if self._let_through_set != self._let_through_host:
            self._let_through.assign(self._let_through_host)
            self._let_through_set = self._let_through_host
        for probe in self._active:
            state = probe.guard
            if state is None or state.held is None:
                continue
            thresholds, total = guard.next_thresholds(probe.layers)
            wanted = np.append(thresholds, total)
            if not np.array_equal(state.host_thresholds, wanted):
                state.thresholds.assign(thresholds)
                state.total_threshold.assign(total)
                state.host_thresholds = wanted

    def _record_guard(self, step: int, probe: _Probe, row: np.ndarray, metrics: dict[str, np.ndarray],
                      scalars: dict[str, float], action: int) -> None:
        """Keep a judged step's ``guard_action`` for its logged row, or queue a row of its own if it is not logged."""
        if step % self.every == 0 or (self.histograms_every and step % self.histograms_every == 0):
            self._guard_actions[step] = action
        elif action != GUARD_NONE:  # acted on: written with its gradient statistics so the tab shows the layers
            extras: dict[str, Any] = dict(metrics, **scalars, lr=float(row[2]), guard_action=action)
            if probe.has_loss:
                extras["loss"] = float(row[1])
            self._guard_rows.append((step, probe.layers, extras))

    def _position(self, step: int) -> dict[str, Any]:
        """Which batch a step trained on: its epoch, its index in the epoch and, where known, its sample ids (every
        step of an epoch is written by the epoch's end, so a step at or after the epoch's first is one of it)."""
        return self._batches.position(step)

    def _write_positions(self, batch: int) -> None:
        """JAX and torch: write the batch of each logged step of the execution about to run, beside the statistics
        the capture writes for the step. Here, not at batch end: Keras calls this hook in order on the main thread,
        while JAX's batch ends run asynchronously, in any order, and a guard's "raise" ends ``fit`` at one."""
        recorder = self._driver.recorder
        steps = self.params.get("steps") if self.params else None
        last = batch + max(1, int(getattr(self.model, "steps_per_execution", 1) or 1)) - 1
        if steps:
            last = min(last, steps - 1)
        for step in range(self._epoch_base + batch, self._epoch_base + last + 1):
            position = self._position(step)
            if position and recorder.enabled and recorder.writer is not None and recorder.logged(step):
                recorder.writer.write(step, [], **position)
        self._next_step = max(self._next_step, self._epoch_base + last + 1)

    def _drain(self) -> None:
        """Write every complete recorded step in the ring buffers that is newer than the last one written."""
        if self._writer is None:
            return
        rows: list[tuple[int, _Probe | None, Any, Any]] = []
        for probe in self._active:
            pre, post = probe.pre.numpy(), probe.post.numpy()
            for i in range(probe.slots):
                step = int(pre[i, 0])
                if step > self._last_written and int(post[i, 0]) == step:
                    rows.append((step, probe, pre[i], post[i]))
        rows += [(step, None, layers, extras) for step, layers, extras in self._guard_rows]
        self._guard_rows = []
        rows.sort(key=lambda r: r[0])
        for step, probe, pre, post in rows:
            if probe is None:  # a step the guard acted on that `every` does not log
                self._writer.write(step, pre, **post, **self._position(step))
                self._last_written = max(self._last_written, step)
                continue
            n = len(probe.layers)
            blocks = pre[_PRE_FIXED:_PRE_FIXED + 4 * n].reshape(4, n)
            extras: dict[str, Any] = {}
            if probe.has_loss:
                extras["loss"] = pre[1]
            if probe.loss_scaled:
                extras["loss_scale"] = pre[3]
                extras["step_skipped"] = post[1]
            if step in self._guard_actions:
                extras["guard_action"] = self._guard_actions.pop(step)
            if probe.moments is not None:
                extras["exp_avg_norm"] = post[_POST_FIXED + n:_POST_FIXED + 2 * n]
                extras["exp_avg_sq_norm"] = post[_POST_FIXED + 2 * n:]
            extras.update(self._position(step))
            self._writer.write(
                step, probe.layers,
                grad_norm=blocks[0], param_norm=blocks[1], update_norm=post[_POST_FIXED:_POST_FIXED + n],
                grad_max_abs=blocks[2], nonfinite_count=blocks[3], total_grad_norm=pre[4], lr=pre[2], **extras,
            )
            if self.histograms_every and step % self.histograms_every == 0:
                counts = pre[_PRE_FIXED + 4 * n:].reshape(n, fmt.HIST_BINS)
                self._writer.write_histograms(step, probe.layers, np.rint(counts).astype(np.int64))
            self._last_written = step
        for step in [s for s in self._guard_actions if s <= self._last_written]:
            del self._guard_actions[step]
