"""``GradientMonitor``: per-layer gradient health of a JAX training loop, recorded by wrapping its Optax optimizer.

``monitor.wrap(tx)`` returns an Optax transformation whose ``update`` measures the gradients it is given (before any
clipping the wrapped chain does) and the change ``optax.apply_updates`` makes with the updates the wrapped chain
returns, inside the user's jitted step. The step counter lives in the optimizer state, so a logged step is decided
on the device: ``lax.cond`` skips every reduction on the other steps, and a logged step hands its few numbers per layer
to the host in one ordered ``io_callback`` (see :mod:`.host`). Nothing depends on Python values that change between
steps, so the step compiles once.

With ``on_explosion=``, every step's gradient norms are measured and compared on the device with the thresholds the
host's explosion guard returned for it after judging the step before (they ride in the optimizer state). A step that
crosses them is judged in full by the host before it is applied; with ``"skip"`` an explosion gets zero updates and the
wrapped optimizer's state stays as it was. See ``docs/JAX.md``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import io_callback

from .. import format as fmt
from ..guard import ExplosionGuard, OnExplosion
from ..writer import GradientWriter
from .host import HostRecorder, Spec
from .layers import Layout, discover_layers
from .moments import adam_moments
from .stats import grad_leaf, grad_leaves, layer_grad_stats, layer_norms, leaf_histogram, total_norm

__all__ = ["GradientMonitor", "MonitorState"]

#: The device holds a step slightly below the guard's thresholds, so float rounding can only make it ask the host about
#: a step the guard then lets through, never apply one the guard would have skipped.
_HOLD_MARGIN = 1.0 - 1e-6


def _one_cond_per_leaf() -> bool:
    """Whether each gradient leaf gets conds of its own (XLA's CPU backend) or all share as few as possible.

    On the CPU a cond is cheap, but one that takes every gradient keeps them all alive until it runs (page faults on
    every step, see :mod:`.stats`). On a GPU a cond reads its predicate back to the host before the stream goes on, so
    hundreds of them (one per leaf of a large model) would stall every step, while device memory is pooled and a longer
    lived gradient costs nothing.
    """
    return jax.default_backend() == "cpu"


class MonitorState(NamedTuple):
    """The wrapped optimizer's state: the monitor's step counter, the wrapped optimizer's own state and, with a guard,
    the thresholds the host set for this step (float32 ``[layers + 1]``: per layer, then the total norm)."""

    step: jax.Array
    inner: Any
    thresholds: jax.Array | None = None


def _learning_rate(inner_state: Any) -> jax.Array | None:
    """The learning rate of an ``optax.inject_hyperparams`` optimizer in the chain (None when there is none)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(inner_state)[0]:
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        if "hyperparams" in names and names[-1] == "learning_rate" and getattr(leaf, "size", 0) == 1:
            return jnp.asarray(leaf, jnp.float32).reshape(())
    return None


def _zeros_like(shapes: Any) -> Any:
    def zero(s: jax.ShapeDtypeStruct) -> Any:
        if s.dtype == jax.dtypes.float0:
            return np.zeros(s.shape, jax.dtypes.float0)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map(zero, shapes)


class GradientMonitor:
    """Records per-layer gradient statistics of a JAX/Optax training loop into TensorBoard event files.

    ``tx = monitor.wrap(optax_transformation)`` and train with ``tx`` as usual, inside or outside ``jit``; pass
    ``loss=loss`` to ``tx.update`` to record the loss too. Per logged step and layer (a parameter tree path without
    its leaf name): gradient L2 norm before the wrapped transformation, max |g|, non-finite count, parameter norm,
    update norm (of the change ``apply_updates`` makes) and so the update ratio; per step the total gradient norm,
    the loss and, with ``optax.inject_hyperparams``, the learning rate.

    Args:
        logdir: directory to write a new event file into.
        every: record every N-th step; on the others the compiled step only tests the counter.
        histograms_every: every N steps also record per-layer histograms of log10|g| on the format's fixed bins
            (0: never). A histogram step is also a logged step.
        on_explosion: the explosion guard: ``"skip"`` (an explosion gets zero updates and the wrapped optimizer's
            state is kept), ``"warn"``, a callable that gets the episode and may return ``"skip"``, or an
            :class:`~tb_gradient_plugin.guard.ExplosionGuard` with one of those. None: no guard. ``"raise"`` is refused:
            an exception on the host cannot stop a compiled step.
        include: regular expression a layer name must contain (``re.search``) to be recorded.
        exclude: regular expression of layer names not to record.
        group_depth: merge layers into groups named by the first N dotted name components.
        group_by: instead of ``group_depth``, a function from layer name to group name.
        flush_secs: how often (seconds) the event file is flushed to disk.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        every: int = 1,
        histograms_every: int = 0,
        on_explosion: OnExplosion = None,
        include: str | None = None,
        exclude: str | None = None,
        group_depth: int | None = None,
        group_by: Callable[[str], str] | None = None,
        flush_secs: float = 2.0,
    ) -> None:
        for label, value, low in (("every", every, 1), ("histograms_every", histograms_every, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        guard = ExplosionGuard.resolve(on_explosion)
        if guard is not None and guard.action == "raise":
            raise ValueError("on_explosion='raise' is not supported by the JAX monitor: an exception on the host "
                             "cannot stop a compiled step. Use 'skip' (the step is not applied), 'warn' or a callable")
        if group_depth is not None and group_by is not None:
            raise ValueError("pass at most one of group_depth and group_by")
        self.every = every
        self.histograms_every = histograms_every
        self._filters = {"include": include, "exclude": exclude, "group_depth": group_depth, "group_by": group_by}
        self._writer = GradientWriter(logdir, flush_secs=flush_secs)
        self._host = HostRecorder(self._writer, every, histograms_every, guard)
        self._layouts: dict[Any, Layout] = {}
        self._order: tuple[str, ...] | None = None  # layer order of the tree given to init (the model's order)
        self._wrapped = False
        self._warned: set[str] = set()
        self._closed = False

    # ----------------------------------------------------------------------------------------------------- public

    @property
    def guard(self) -> ExplosionGuard | None:
        """The explosion guard (``on_explosion=``), or None when it is off; ``guard.decisions`` lists what it did."""
        return self._host.guard

    @property
    def layers(self) -> tuple[str, ...]:
        """The recorded layers, in model order (known once the wrapped optimizer's ``init`` has run)."""
        return self._order or ()

    def wrap(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        """The Optax transformation to train with: ``tx`` itself, measured. One monitor wraps one optimizer."""
        self._check_open()
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(f"wrap() takes an optax.GradientTransformation, got {type(tx).__name__}")
        if self._wrapped:
            raise RuntimeError("this GradientMonitor already wraps an optimizer: one monitor records one training "
                               "loop (make another monitor, with its own logdir, for a second optimizer)")
        self._wrapped = True
        inner = optax.with_extra_args_support(tx)

        def init_fn(params: Any) -> MonitorState:
            self._check_open()
            layout = self._layout(params)
            if self._order is None:
                self._order = layout.layers
            thresholds = None
            if self.guard is not None:
                thresholds = jnp.full(len(layout.layers) + 1, jnp.inf, jnp.float32)
            return MonitorState(jnp.zeros((), jnp.int32), inner.init(params), thresholds)

        def update_fn(updates: Any, state: MonitorState, params: Any = None, **extra: Any) -> tuple[Any, MonitorState]:
            return self._update(inner, updates, state, params, extra)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def flush(self) -> None:
        """Wait for the steps dispatched so far to reach the event file, and write it out."""
        self._check_open()
        jax.effects_barrier()
        self._host.wait()
        self._writer.flush()

    def close(self) -> None:
        """Wait for the steps dispatched so far, write them and close the event file."""
        if self._closed:
            return
        self._closed = True
        try:
            jax.effects_barrier()
            self._host.wait()
        finally:
            self._host.close()
            self._writer.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------------- tracing

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("GradientMonitor is closed: it records nothing more (wrap the optimizer with a new one)")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def _layout(self, tree: Any) -> Layout:
        """The layout of a tree structure (cached: computed once per structure, at trace time)."""
        treedef = jax.tree_util.tree_structure(tree)
        layout = self._layouts.get(treedef)
        if layout is None:
            layout = discover_layers(tree, **self._filters)
            if self._order is not None and set(layout.layers) == set(self._order) and layout.layers != self._order:
                # The same layers in another structure (NNX: Variables at init, plain arrays at update): init's order.
                rank = {name: i for i, name in enumerate(self._order)}
                old = layout.layers
                leaf_layer = tuple(-1 if k < 0 else rank[old[k]] for k in layout.leaf_layer)
                layout = Layout(self._order, leaf_layer, layout.skipped, layout.treedef)
            if layout.skipped:
                self._warn_once("skipped", f"{len(layout.skipped)} non-floating leaves are not monitored (integer, "
                                f"boolean or float0: they have no gradient norm), e.g. {layout.skipped[0]!r}")
            self._layouts[treedef] = layout
        return layout

    def _update(self, inner: optax.GradientTransformationExtraArgs, updates: Any, state: Any, params: Any,
                extra: dict[str, Any]) -> tuple[Any, MonitorState]:
        self._check_open()
        if not isinstance(state, MonitorState):
            raise TypeError(f"the optimizer state must come from this wrapped optimizer's init(), got "
                            f"{type(state).__name__}")
        loss = extra.pop("loss", None)
        layout = self._layout(updates)
        n = len(layout.layers)
        idx = layout.monitored
        layer_of = [layout.leaf_layer[i] for i in idx]
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        weights = None
        if params is None:
            self._warn_once("params", "tx.update was called without params: update norms are recorded, parameter "
                            "norms (and so update ratios) are not")
        else:
            p_leaves = jax.tree_util.tree_leaves(params)
            if len(p_leaves) != len(leaves):
                raise ValueError(f"params has {len(p_leaves)} leaves and the gradients {len(leaves)}: pass the "
                                 "parameters the gradients are of")
            weights = [p_leaves[i] for i in idx]
        loss_value = None
        if loss is not None:
            loss_value = jnp.asarray(loss)
            if loss_value.size != 1:
                raise ValueError(f"loss must hold one value, got shape {tuple(loss_value.shape)}")
            loss_value = lax.stop_gradient(loss_value).reshape(()).astype(jnp.float32)
        # inject_hyperparams keeps the rate it used in the state it returns: read after the update, from that state
        has_lr = _learning_rate(state.inner) is not None
        has_moments = adam_moments(state.inner, updates) is not None
        spec = Spec(layout.layers, weights is not None, loss_value is not None, has_lr, has_moments)
        guard = self.guard
        step = state.step
        logged = step % self.every == 0
        hist_step = None
        if self.histograms_every:
            hist_step = step % self.histograms_every == 0
            logged = logged | hist_step
        # With a guard every step's gradients are measured (the device compares them with the thresholds); without
        # one, with every=1 every step is logged and no cond is needed.
        measure_when = None if guard is not None or self.every == 1 else logged
        grad_rows, hists = self._measure_grads(leaves, idx, measure_when, hist_step)
        grads = jax.tree_util.tree_unflatten(treedef, leaves)
        stats = layer_grad_stats(grad_rows, layer_of, n)
        total = total_norm(stats.norm)
        grad_part = [stats.norm, stats.max_abs, stats.nonfinite]
        hist_part = [] if hists is None else [jax.ops.segment_sum(hists, np.asarray(layer_of, np.int32),
                                                                  num_segments=n)]
        nan = jnp.full((), jnp.nan, jnp.float32)

        def head(inner_state: Any, total_norm_value: jax.Array) -> jax.Array:
            lr = _learning_rate(inner_state)
            return jnp.stack([nan if loss_value is None else loss_value, nan if lr is None else lr, total_norm_value])

        def apply() -> tuple[Any, Any]:
            return inner.update(grads, state.inner, params, **extra)

        n_weights = (4 if has_moments else 2) * n
        if guard is not None:
            self._check_thresholds(state, n)
        if guard is None or guard.action == "warn":  # "warn" warns from the host; it never holds a step back
            new_updates, new_inner = apply()
        else:
            thresholds = state.thresholds * _HOLD_MARGIN
            cross = ~jnp.isfinite(total) | jnp.any(stats.norm > thresholds[:n]) | (total > thresholds[n])
            ask = functools.partial(self._host.ask, spec)
            waiting = jnp.concatenate([head(state.inner, total), *grad_part, jnp.zeros(n_weights, jnp.float32)])
            skip = lax.cond(cross, lambda: io_callback(ask, jax.ShapeDtypeStruct((), jnp.bool_), step, waiting,
                                                       ordered=True),
                            lambda: jnp.zeros((), jnp.bool_))
            zero_updates = _zeros_like(jax.eval_shape(apply)[0])
            new_updates, new_inner = lax.cond(skip, lambda: (zero_updates, state.inner), apply)
        direct = measure_when is None and guard is None
        measure_weights = self._weight_norms(new_updates, new_inner, updates, params, weights, idx, layer_of, n,
                                             has_moments, None if direct or guard is not None else apply)
        weight_part = measure_weights() if direct else lax.cond(logged, measure_weights,
                                                                 lambda: jnp.zeros(n_weights, jnp.float32))
        packed = jnp.concatenate([head(new_inner, total), *grad_part, weight_part])
        report = functools.partial(self._host.report, spec)
        if guard is not None:
            next_thresholds = io_callback(report, jax.ShapeDtypeStruct((n + 1,), jnp.float32), step, packed,
                                          *hist_part, ordered=True)
            return new_updates, MonitorState(step + 1, new_inner, next_thresholds)
        if measure_when is None:
            io_callback(report, None, step, packed, *hist_part, ordered=True)
        else:
            lax.cond(logged, lambda: io_callback(report, None, step, packed, *hist_part, ordered=True), lambda: None)
        return new_updates, MonitorState(step + 1, new_inner, None)

    @staticmethod
    def _check_thresholds(state: MonitorState, n: int) -> None:
        if state.thresholds is None or state.thresholds.shape != (n + 1,):
            raise ValueError("the optimizer state was initialized for other parameters (or without a guard): "
                             "call init() of this wrapped optimizer on the parameters it updates")

    def _measure_grads(self, leaves: list[Any], idx: list[int], when: jax.Array | None,
                       hist_step: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """Each monitored gradient leaf's :func:`grad_leaf` row (and histogram on a histogram step), in a cond of
        its own when ``when`` is given; ``leaves`` is updated in place with the leaves the wrapped chain must read.

        Each leaf passes through an ``optimization_barrier`` together with its statistics, so the leaf is measured
        before the chain reads it: no gradient has to stay alive until some later cond runs (on the CPU that would
        make the step touch fresh memory, and page-fault, on every step). On other backends see
        :func:`_one_cond_per_leaf`.
        """
        if not _one_cond_per_leaf():
            return self._measure_grads_together([leaves[i] for i in idx], when, hist_step)
        empty = (jnp.zeros(3, jnp.float32), None if hist_step is None else jnp.zeros(fmt.HIST_BINS, jnp.int32))
        rows, hists = [], []
        for i in idx:
            g = leaves[i]

            def measure(g: jax.Array = g) -> tuple[jax.Array, jax.Array | None]:
                if hist_step is None:
                    return grad_leaf(g), None
                return grad_leaf(g), lax.cond(hist_step, lambda: leaf_histogram(g),
                                              lambda: jnp.zeros(fmt.HIST_BINS, jnp.int32))

            if when is None:
                out = measure()
            else:
                out = lax.cond(when, measure, lambda: empty)
            leaves[i], out = lax.optimization_barrier((g, out))
            rows.append(out[0])
            hists.append(out[1])
        return jnp.stack(rows), None if hist_step is None else jnp.stack(hists)

    @staticmethod
    def _measure_grads_together(grads: list[Any], when: jax.Array | None,
                                hist_step: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """:meth:`_measure_grads` with as few conds as possible: one on the step counter around all gradients, one
        rescue inside (:func:`grad_leaves`) and one for a histogram step."""
        k = len(grads)
        no_hist = jnp.zeros((k, fmt.HIST_BINS), jnp.int32)

        def measure() -> tuple[jax.Array, jax.Array | None]:
            if hist_step is None:
                return grad_leaves(grads), None
            return grad_leaves(grads), lax.cond(hist_step, lambda: jnp.stack([leaf_histogram(g) for g in grads]),
                                                lambda: no_hist)

        if when is None:
            return measure()
        return lax.cond(when, measure, lambda: (jnp.zeros((k, 3), jnp.float32), None if hist_step is None else no_hist))

    @staticmethod
    def _weight_norms(new_updates: Any, new_inner: Any, grads: Any, params: Any, weights: list[Any] | None,
                      idx: list[int], layer_of: list[int], n: int, has_moments: bool,
                      recompute: Callable[[], tuple[Any, Any]] | None) -> Callable[[], jax.Array]:
        """A function measuring parameter and update norms, then (with moments) Adam's moment norms of the new state.

        The update norm is the norm of the change ``optax.apply_updates`` makes: XLA computes the new parameters once
        for this and for the user's own ``apply_updates`` (the same operations on the same arrays), so the updates
        stay fused into it and are never written out, and the measuring reads the old and new parameters, which the
        step holds anyway. Without ``params`` the returned updates are measured; ``recompute`` (the chain's update, for
        a cond on the logged step) evaluates them again inside the cond, so that an unlogged step does not write them
        out.
        """
        if weights is not None:
            # Per monitored leaf, what optax.apply_updates computes (other leaves may be integer, with float0 updates)
            applied = jax.tree_util.tree_leaves(new_updates)
            after = [jnp.asarray(w + applied[i]).astype(jnp.asarray(w).dtype)
                     for w, i in zip(weights, idx, strict=True)]

            def changes() -> list[jax.Array]:
                out = []
                for new, old in zip(after, weights, strict=True):
                    dt = jnp.result_type(old.dtype, jnp.float32)
                    out.append(new.astype(dt) - old.astype(dt))
                return out

        def measure() -> jax.Array:
            if weights is None:
                applied = jax.tree_util.tree_leaves(new_updates if recompute is None else recompute()[0])
                parts = [jnp.zeros(n, jnp.float32), layer_norms(lambda: [applied[i] for i in idx], layer_of, n)]
            else:
                parts = [layer_norms(lambda: weights, layer_of, n), layer_norms(changes, layer_of, n)]
            moments = adam_moments(new_inner, grads) if has_moments else None
            if moments is not None:
                for kept in moments:
                    parts.append(layer_norms(lambda kept=kept: [jnp.zeros(0, jnp.float32) if kept[i] is None
                                                                else kept[i] for i in idx], layer_of, n))
            return jnp.concatenate(parts)

        return measure
