"""What a read of an event file decodes to: every value, gathered per (metric, layout) and per scalar tag into
blocks of numpy arrays in file order (a :class:`Batch`), the run store's input.

The decoders add values one record at a time (the general path) or a whole block of records at once (the bulk
decoder, :mod:`tb_gradient_plugin.bulk_decode`) to a :class:`Collector`; it merges them per key, in file order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np


class LayerRecord(NamedTuple):
    """One per-layer metric (or histogram) of one step, already attributed to its layers."""

    step: int
    wall_time: float
    metric: str
    layers: tuple[str, ...]
    values: np.ndarray  # float32 [layers] for metrics, int64 [layers, HIST_BINS] for histograms


class ScalarRecord(NamedTuple):
    """A scalar: one of our per-step series (``tag`` = metric name, ``ours``) or any other tool's scalar tag."""

    step: int
    wall_time: float
    tag: str
    value: float
    ours: bool


class Piece(NamedTuple):
    """Values of one block key from consecutive records, in file order."""

    steps: np.ndarray  # int64 [n]
    wall_times: np.ndarray  # float64 [n]
    values: np.ndarray  # [n, ...]
    order: np.ndarray  # int64 [n], increasing: file position of each value (orders values across blocks)


def _join(pieces: list[Piece]) -> Piece:
    if len(pieces) == 1:
        return pieces[0]
    return Piece(*(np.concatenate(column) for column in zip(*pieces, strict=True)))


class LayerBlock:
    """Every value of one per-layer metric over one layout in a batch, in file order: the run store's input.

    ``pieces`` follow one another in the file without interleaving; the run store writes each into place, which
    spares a copy of the whole batch. ``steps``, ``values``, ... are the pieces joined (on first use).
    """

    def __init__(self, metric: str, layers: tuple[str, ...], pieces: list[Piece]) -> None:
        self.metric = metric
        self.layers = layers
        self.pieces = pieces

    @cached_property
    def _joined(self) -> Piece:
        return _join(self.pieces)

    @property
    def steps(self) -> np.ndarray:
        return self._joined.steps

    @property
    def wall_times(self) -> np.ndarray:
        return self._joined.wall_times

    @property
    def values(self) -> np.ndarray:
        """float32 [n, layers] for metrics, int64 [n, layers, HIST_BINS] for histograms."""
        return self._joined.values

    @property
    def order(self) -> np.ndarray:
        return self._joined.order

    @property
    def first_order(self) -> int:
        return int(self.pieces[0].order[0])


class ScalarBlock(NamedTuple):
    """Every value of one scalar tag (ours or another tool's) in a batch, in file order."""

    tag: str
    ours: bool
    steps: np.ndarray  # int64 [n]
    wall_times: np.ndarray  # float64 [n]
    values: np.ndarray  # float64 [n]
    order: np.ndarray  # int64 [n], increasing


@dataclass
class Batch:
    """What one :meth:`.reader.EventFileReader.read` decoded: one block per (metric, layout) and per scalar tag."""

    layer_blocks: list[LayerBlock] = field(default_factory=list)
    scalar_blocks: list[ScalarBlock] = field(default_factory=list)
    other_tags: set[str] = field(default_factory=set)  # tags seen that are neither ours nor scalars
    events: int = 0
    #: (step, int64 sample ids) of every logged batch, in file order
    batch_ids: list[tuple[int, np.ndarray]] = field(default_factory=list)
    has_more: bool = False

    @cached_property
    def layer_records(self) -> list[LayerRecord]:
        """The per-layer values one record at a time, in file order (for callers that want objects, not arrays)."""
        keyed = [(o, LayerRecord(s, w, b.metric, b.layers, v)) for b in self.layer_blocks
                 for o, s, w, v in zip(b.order.tolist(), b.steps.tolist(), b.wall_times.tolist(), b.values,
                                       strict=True)]
        keyed.sort(key=lambda kv: kv[0])
        return [rec for _, rec in keyed]

    @cached_property
    def scalars(self) -> list[ScalarRecord]:
        """The scalar values one record at a time, in file order."""
        keyed = [(o, ScalarRecord(s, w, b.tag, v, b.ours)) for b in self.scalar_blocks
                 for o, s, w, v in zip(b.order.tolist(), b.steps.tolist(), b.wall_times.tolist(), b.values.tolist(),
                                       strict=True)]
        keyed.sort(key=lambda kv: kv[0])
        return [rec for _, rec in keyed]

    def first_wall_time(self) -> float | None:
        """Wall time of the first per-layer value and of the first scalar in the file, whichever is smaller."""
        walls = []
        if self.layer_blocks:
            walls.append(min(self.layer_blocks, key=lambda b: b.first_order).pieces[0].wall_times[0])
        if self.scalar_blocks:
            walls.append(min(self.scalar_blocks, key=lambda b: int(b.order[0])).wall_times[0])
        return float(min(walls)) if walls else None

    def last_wall_time(self) -> float | None:
        """The largest wall time of any value in the batch (a file's values need not be in wall-time order)."""
        walls = [float(piece.wall_times.max()) for block in self.layer_blocks for piece in block.pieces
                 if len(piece.wall_times)]
        walls += [float(block.wall_times.max()) for block in self.scalar_blocks if len(block.wall_times)]
        return max(walls) if walls else None


class Parts:
    """Values of one block key as they are decoded: bulk-decoded pieces, and single values of the general path
    gathered into a piece of their own until the next bulk piece arrives (so pieces follow file order)."""

    __slots__ = ("pieces", "stack", "steps", "walls", "values", "order")

    def __init__(self, stack: Callable[[list], np.ndarray]) -> None:
        self.pieces: list[Piece] = []
        self.stack = stack
        self.steps: list[int] = []
        self.walls: list[float] = []
        self.values: list = []
        self.order: list[int] = []

    def add(self, order: int, step: int, wall: float, value) -> None:
        self.order.append(order)
        self.steps.append(step)
        self.walls.append(wall)
        self.values.append(value)

    def add_piece(self, piece: Piece) -> None:
        self._close()
        self.pieces.append(piece)

    def _close(self) -> None:
        if self.order:
            self.pieces.append(Piece(np.asarray(self.steps, dtype=np.int64), np.asarray(self.walls, dtype=np.float64),
                                     self.stack(self.values), np.asarray(self.order, dtype=np.int64)))
            self.steps, self.walls, self.values, self.order = [], [], [], []

    def __bool__(self) -> bool:
        return bool(self.pieces or self.order)

    def merged(self) -> list[Piece]:
        """The pieces in file order. Pieces whose values interleave (a record the bulk decoder left to the general
        path) become one piece sorted value by value."""
        self._close()
        pieces = sorted(self.pieces, key=lambda piece: int(piece.order[0]))
        if all(int(a.order[-1]) < int(b.order[0]) for a, b in itertools.pairwise(pieces)):
            return pieces
        joined = _join(pieces)
        pick = np.argsort(joined.order, kind="stable")
        return [Piece(*(column[pick] for column in joined))]


def _float64(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _objects(values: list[np.ndarray]) -> np.ndarray:
    """Sample ids of several records (of any lengths) as one object array, a piece's values."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _id_records(parts: Parts) -> list[tuple[int, np.ndarray]]:
    """(step, ids) of every batch-ids value, in file order: rows of bulk pieces (int64 ``[n, k]``) and single values
    of the general path alike."""
    parts._close()
    rows = [(o, s, v) for piece in parts.pieces
            for o, s, v in zip(piece.order.tolist(), piece.steps.tolist(), piece.values, strict=True)]
    rows.sort(key=lambda r: r[0])
    return [(s, v) for _, s, v in rows]


class Collector:
    """Accumulates a batch's values by block key, then merges each key into one block in file order."""

    def __init__(self) -> None:
        self.layers: dict[tuple[str, str], tuple[tuple[str, ...], Parts]] = {}
        self.scalars: dict[tuple[str, bool], Parts] = {}
        self.other_tags: set[str] = set()
        self.batch_ids = Parts(_objects)
        self.events = 0

    def layer(self, metric: str, layout: str, layers: tuple[str, ...]) -> Parts:
        entry = self.layers.get((metric, layout))
        if entry is None:
            entry = self.layers[(metric, layout)] = (layers, Parts(np.stack))
        return entry[1]

    def scalar(self, tag: str, ours: bool) -> Parts:
        parts = self.scalars.get((tag, ours))
        if parts is None:
            parts = self.scalars[(tag, ours)] = Parts(_float64)
        return parts

    def batch(self) -> Batch:
        layer_blocks = [LayerBlock(metric, layers, parts.merged())
                        for (metric, _), (layers, parts) in self.layers.items() if parts]
        scalar_blocks = [ScalarBlock(tag, ours, *_join(parts.merged()))
                         for (tag, ours), parts in self.scalars.items() if parts]
        # Blocks in the order their first values were written: the run store takes first-seen layer order from it.
        layer_blocks.sort(key=lambda b: b.first_order)
        scalar_blocks.sort(key=lambda b: int(b.order[0]))
        return Batch(layer_blocks, scalar_blocks, self.other_tags, self.events, batch_ids=_id_records(self.batch_ids))
