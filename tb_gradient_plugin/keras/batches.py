"""Which samples a Keras step trained on: its epoch, its index in the epoch and, where they can be known, sample ids.

Keras hands callbacks no batch, only its index, so ids are known only where the index determines the batch:

* ``fit(x, y, shuffle=False)`` with arrays or tensors (``steps_per_epoch`` unset): batch ``b`` of every epoch holds
  samples ``b * batch_size`` up to ``(b + 1) * batch_size`` of the training part of ``x``;
* ``fit(IndexedBatches(x, y, batch_size=..., seed=...), shuffle=False)``: a dataset that shuffles its samples itself,
  in an order that is a pure function of its seed and the epoch, so the callback can name each batch's samples
  without seeing the batch. ``shuffle=False`` because ``fit``'s default reorders a dataset's batches at random.

Keras' own shuffle is not replayed here: it differs by backend and version. The callback learns which data its
``fit`` was given from the arguments of the running ``fit`` call (:func:`fit_arguments`); a training loop that calls
callbacks some other way gets the epoch and batch index only.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import keras
import numpy as np

__all__ = ["BatchTracker", "IndexedBatches", "fit_arguments"]

#: The arguments of ``fit`` that say how its data is batched (every backend's trainer names them so).
_FIT_ARGS = ("x", "batch_size", "shuffle", "steps_per_epoch")
#: ``fit``'s batch size for arrays when neither ``batch_size`` nor ``steps_per_epoch`` is given.
_KERAS_DEFAULT_BATCH = 32


def _as_array(leaf: Any) -> np.ndarray:
    array = np.asarray(leaf)
    if array.ndim < 1:
        raise ValueError(f"IndexedBatches needs arrays with a sample axis, got a scalar {leaf!r}")
    return array


class IndexedBatches(keras.utils.PyDataset):
    """Batches of in-memory arrays whose sample ids the callback records, shuffled per epoch by a seeded generator.

    Pass it to ``fit`` with ``shuffle=False`` (``fit``'s own shuffle would reorder the batches at random, and the
    callback then records no ids).

    ``x``, ``y`` and ``sample_weight`` are arrays or tensors (or nested structures of them, as ``fit`` takes), all
    with the same number of samples ``n``. The samples of epoch ``e`` are taken in the order :meth:`order` gives:
    ``numpy.random.default_rng([seed, e]).permutation(n)`` with ``shuffle=True`` (a new order each epoch, the same for
    the same seed in any run), ``0 .. n-1`` with ``shuffle=False``. Batch ``b`` is ``order(e)[b * batch_size:(b + 1)
    * batch_size]``, the last one shorter when ``batch_size`` does not divide ``n``.

    ``epoch`` is the epoch whose order the batches take. ``GradientMonitorCallback`` sets it to Keras' epoch number
    when each epoch of ``fit`` begins (:meth:`set_epoch`, as a distributed sampler is told its epoch), so the
    ``epoch`` of a recorded batch is the one to pass to :meth:`order`; without the callback it counts the calls of
    ``on_epoch_end``. Keyword arguments beyond these (``workers``,
    ``use_multiprocessing``, ``max_queue_size``) go to :class:`keras.utils.PyDataset`.
    """

    def __init__(self, x: Any, y: Any = None, sample_weight: Any = None, *, batch_size: int = 32,
                 shuffle: bool = True, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._parts = [keras.tree.map_structure(_as_array, part) for part in (x, y, sample_weight) if part is not None]
        if not self._parts:
            raise ValueError("IndexedBatches needs x")
        lengths = {len(leaf) for part in self._parts for leaf in keras.tree.flatten(part)}
        if len(lengths) != 1:
            raise ValueError(f"x, y and sample_weight must hold the same number of samples, got {sorted(lengths)}")
        self.num_samples = lengths.pop()
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.epoch = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order): one permutation per epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The sample ids of ``epoch`` in the order its batches take them."""
        cached = self._order
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle
                 else np.arange(self.num_samples))
        self._order = (epoch, order)
        return order

    def batch_ids(self, index: int, epoch: int | None = None) -> np.ndarray:
        """The sample ids of batch ``index`` of ``epoch`` (default: the current one)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: the dataset has {len(self)} batches")
        order = self.order(self.epoch if epoch is None else epoch)
        return order[index * self.batch_size:(index + 1) * self.batch_size]

    def __getitem__(self, index: int) -> tuple:
        ids = self.batch_ids(index)
        return tuple(keras.tree.map_structure(lambda a: a[ids], part) for part in self._parts)

    def set_epoch(self, epoch: int) -> None:
        """Take the order of ``epoch`` from now on."""
        self.epoch = int(epoch)

    def on_epoch_end(self) -> None:
        self.epoch += 1


def fit_arguments(model: Any) -> dict[str, Any] | None:
    """``x``, ``batch_size``, ``shuffle`` and ``steps_per_epoch`` of the ``fit`` call of ``model`` that is running
    the caller (``x`` after ``validation_split`` took its part), or None outside such a call."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code.co_name == "fit":
                local = frame.f_locals
                if local.get("self") is model and all(name in local for name in _FIT_ARGS):
                    return {name: local[name] for name in _FIT_ARGS}
            frame = frame.f_back
        return None
    finally:
        del frame


def _samples(x: Any) -> int | None:
    """How many samples ``x`` holds when it is arrays or tensors (a structure of them), else None."""
    leaves = keras.tree.flatten(x) if x is not None else []
    shapes = [getattr(leaf, "shape", None) for leaf in leaves]
    if not shapes or any(s is None or len(s) < 1 or s[0] is None for s in shapes):
        return None
    return int(shapes[0][0])


class _InOrder:
    """Arrays ``fit`` takes in order: batch ``b`` is samples ``b * batch_size`` up to the end of the data."""

    def __init__(self, samples: int, batch_size: int) -> None:
        self.samples, self.batch_size = samples, batch_size

    def ids(self, index: int) -> np.ndarray | None:
        first = index * self.batch_size
        return np.arange(first, min(first + self.batch_size, self.samples)) if first < self.samples else None


class _FromDataset:
    """An :class:`IndexedBatches` in Keras' epoch ``epoch`` (kept here: the dataset's own moves on at its end)."""

    def __init__(self, dataset: IndexedBatches, epoch: int) -> None:
        dataset.set_epoch(epoch)
        self.dataset = dataset
        self.epoch = epoch

    def ids(self, index: int) -> np.ndarray | None:
        return self.dataset.batch_ids(index, self.epoch) if index < len(self.dataset) else None


class BatchTracker:
    """What the callback records about a step's batch: ``epoch``, ``batch_index`` and, where known, ``batch_ids``.

    Call :meth:`train_begin` from ``on_train_begin`` (it reads the running ``fit``'s arguments) and
    :meth:`epoch_begin` with the number of the epoch's first step; :meth:`position` then answers for any step of the
    epoch until the next one begins.
    """

    def __init__(self) -> None:
        self._data: Any = None  # IndexedBatches or (samples, batch size) of in-order arrays; None: no ids
        self._source: _InOrder | _FromDataset | None = None
        self._epoch: int | None = None
        self._first_step = 0

    def train_begin(self, model: Any) -> None:
        self._data, self._source, self._epoch = None, None, None
        args = fit_arguments(model)
        if args is None or args["steps_per_epoch"] is not None:  # batches then run on across epochs
            return
        x = args["x"]
        if isinstance(x, IndexedBatches):
            if args["shuffle"]:
                warnings.warn(
                    "GradientMonitorCallback records no sample ids for this fit: fit(shuffle=True), the default, "
                    "reorders an IndexedBatches' batches at random. Pass shuffle=False; IndexedBatches shuffles its "
                    "samples itself (seeded).", stacklevel=2)
                return
            self._data = x
            return
        samples = _samples(x)
        if samples is not None and not args["shuffle"]:
            self._data = (samples, int(args["batch_size"] or _KERAS_DEFAULT_BATCH))

    def epoch_begin(self, epoch: int, first_step: int) -> None:
        self._epoch, self._first_step = epoch, first_step
        if isinstance(self._data, IndexedBatches):
            # Before Keras asks the dataset for this epoch's first batch (and after the last epoch's on_epoch_end).
            self._source = _FromDataset(self._data, epoch)
        elif self._data is not None:
            self._source = _InOrder(*self._data)

    def position(self, step: int) -> dict[str, Any]:
        """``epoch``, ``batch_index`` and ``batch_ids`` (where known) of a step of the current epoch; {} for a step
        before it."""
        if self._epoch is None or step < self._first_step:
            return {}
        index = step - self._first_step
        out: dict[str, Any] = {"epoch": self._epoch, "batch_index": index}
        ids = self._source.ids(index) if self._source is not None else None
        if ids is not None:
            out["batch_ids"] = ids
        return out
