"""A run's values as they accumulate: per-step series without repeated steps, the per-layer table of every metric
(step x layer arrays grown in place, pre-faulted so a large first read does not stall on page faults), and the fold of
other tools' per-parameter tags into layers. The run store (:mod:`tb_gradient_plugin.runs`) owns the reading; this
module owns the arrays it reads into.
"""

from __future__ import annotations

import mmap
import tempfile

import numpy as np

from . import format as fmt
from .reader import LayerBlock, Piece
from .types import BatchIds, Series


class IdTable:
    """A run's sample ids as they are read: appended in place into growing buffers while steps only increase (a
    training run), rebuilt where a step comes again (a later record wins: a resumed run). :meth:`snapshot` hands out
    views of what was read so far, which later appends never change."""

    def __init__(self) -> None:
        self._steps = np.zeros(0, dtype=np.int64)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._ids = np.zeros(0, dtype=np.int64)
        self.n = 0  # steps
        self.m = 0  # ids

    def add(self, records: list[tuple[int, np.ndarray]]) -> None:
        """Append ``(step, ids)`` records in the order they were read."""
        if not records:
            return
        steps = np.fromiter((s for s, _ in records), dtype=np.int64, count=len(records))
        parts = [np.asarray(ids, dtype=np.int64).reshape(-1) for _, ids in records]
        if (self.n and steps[0] <= self._steps[self.n - 1]) or np.any(steps[1:] <= steps[:-1]):
            merged = dict(self.snapshot().items())
            merged.update(zip(steps.tolist(), parts, strict=True))
            packed = BatchIds.from_dict(merged)
            self._steps, self._offsets, self._ids = packed.steps, packed.offsets, packed.ids
            self.n, self.m = len(packed.steps), len(packed.ids)
            return
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        n, m = self.n + len(steps), self.m + int(sizes.sum())
        self._steps = _room(self._steps, n)
        self._offsets = _room(self._offsets, n + 1)
        self._ids = _room(self._ids, m)
        self._steps[self.n:n] = steps
        np.cumsum(sizes, out=self._offsets[self.n + 1:n + 1])
        self._offsets[self.n + 1:n + 1] += self.m
        if parts:
            self._ids[self.m:m] = np.concatenate(parts)
        self.n, self.m = n, m

    def snapshot(self) -> BatchIds:
        return BatchIds(self._steps[:self.n], self._offsets[:self.n + 1], self._ids[:self.m])

    def __getstate__(self) -> tuple:
        return self._steps[:self.n].copy(), self._offsets[:self.n + 1].copy(), self._ids[:self.m].copy()

    def __setstate__(self, state: tuple) -> None:
        self._steps, self._offsets, self._ids = state
        self.n, self.m = len(self._steps), len(self._ids)


def _room(buffer: np.ndarray, size: int) -> np.ndarray:
    """``buffer``, or a copy with room for ``size`` entries (doubling) where it has less."""
    if len(buffer) >= size:
        return buffer
    grown = np.empty(max(size, 2 * len(buffer), 64), dtype=buffer.dtype)
    grown[:len(buffer)] = buffer
    return grown


def dedupe_series(steps: np.ndarray, values: np.ndarray) -> Series:
    """Sort by step and keep one value per step: the last one written, unless a value at that step is non-finite.

    A NaN logged at a step is never hidden behind a finite value logged again at the same step (resumed runs,
    Lightning's double ``epoch`` entries).
    """
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    n = len(steps)
    if n == 0:
        return Series(steps, values)
    order = np.argsort(steps, kind="stable")
    s, v = steps[order], values[order]
    starts = np.r_[True, s[1:] != s[:-1]]
    if starts.all():
        return Series(s, v)
    group = np.cumsum(starts) - 1
    score = np.arange(n) + (~np.isfinite(v)) * n
    best = np.full(int(group[-1]) + 1, -1, dtype=np.int64)
    np.maximum.at(best, group, score)
    pick = np.where(best >= n, best - n, best)
    return Series(s[pick], v[pick])


class ScalarAcc:
    """Raw values of one tag, kept as appended chunks until the run is assembled."""

    __slots__ = ("steps", "values", "cache")

    def __init__(self) -> None:
        self.steps: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.cache: Series | None = None

    def add(self, steps: np.ndarray, values: np.ndarray) -> None:
        self.steps.append(steps)
        self.values.append(values)
        self.cache = None

    def series(self) -> Series:
        if self.cache is None:
            if len(self.steps) > 1:
                self.steps, self.values = [np.concatenate(self.steps)], [np.concatenate(self.values)]
            self.cache = dedupe_series(self.steps[0], self.values[0])
        return self.cache


#: Buffers at least this large are allocated with their pages already mapped (see :func:`_buffer`).
_PREFAULT_BYTES = 8 * 1024 * 1024


def _buffer(shape: tuple[int, int], dtype: type, backing: str | None = None) -> np.ndarray:
    """A zeroed array whose memory is mapped up front (Linux ``MAP_POPULATE``) when it is large.

    A big run's first read writes hundreds of MB into fresh buffers; taking the page faults one 4 kB page at a time
    as the values arrive costs more than decoding them, while the kernel maps the whole buffer in one call several
    times faster. With ``backing`` (a directory), the array is a shared mapping of a file there that has no name (it
    disappears with its last mapping): its pages can be handed back to the system and read again from the file (see
    :meth:`LayerTable.release_pages`).
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if backing is not None and size:
        with tempfile.TemporaryFile(dir=backing) as handle:
            handle.truncate(size)
            memory = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_SHARED)
        return np.frombuffer(memory, dtype=dtype).reshape(shape)
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if size < _PREFAULT_BYTES or not populate:
        return np.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The ``mmap`` an array is a view of, if it is one."""
    root = array
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    if isinstance(root, memoryview):
        root = root.obj
    return root if isinstance(root, mmap.mmap) else None


class LayerTable:
    """Our per-layer metrics as growing dense buffers.

    New steps after the last one (a live run) are appended in place into spare capacity, so arrays handed out
    earlier (views of the first rows) never change; anything else (steps out of order, a resumed run rewriting
    steps) rebuilds fresh buffers. Only the cells ``[:n, :len(layers)]`` of a metric buffer hold data (NaN where
    nothing was logged); spare capacity is left unwritten until rows or layers are added, so that a large first
    read writes each value once instead of first filling hundreds of MB with NaN.
    """

    def __init__(self) -> None:
        self.n = 0
        self.steps = np.zeros(0, dtype=np.int64)
        self.layers: list[str] = []
        self.index: dict[str, int] = {}
        self.metrics: dict[str, np.ndarray] = {}
        self.present = np.zeros((0, 0), dtype=bool)  # False outside [:n, :len(layers)]
        self.hist: list[tuple[int, LayerBlock]] = []  # (batch number, block)
        self.batches = 0
        self.min_rows = 0  # rows announced by reserve()
        #: a directory: the buffers are file-backed mappings there (see back_with_files)
        self.backing: str | None = None
        self._mapped: dict[int, mmap.mmap] = {}  # the file mappings made for the buffers, by id

    def _layer(self, name: str) -> int:
        j = self.index.get(name)
        if j is None:
            j = self.index[name] = len(self.layers)
            self.layers.append(name)
        return j

    def add(self, blocks: list[LayerBlock]) -> None:
        """Fold one batch's blocks (one per metric and layout, in file order) into the buffers."""
        self.batches += 1
        cols_before = len(self.layers)
        arrays: dict[tuple[str, tuple[str, ...]], tuple[np.ndarray, list[Piece]]] = {}
        for block in blocks:
            for name in block.layers:
                self._layer(name)
            if block.metric == fmt.HISTOGRAM_METRIC:
                self.hist.append((self.batches, block))
            else:
                steps = np.concatenate([piece.steps for piece in block.pieces])
                arrays[(block.metric, block.layers)] = (steps, block.pieces)
        if not arrays:
            return
        if self._adopt(arrays):
            return
        if len(self.layers) > cols_before:
            self._add_columns(cols_before)
        new_steps = np.unique(np.concatenate([st for st, _ in arrays.values()]))
        first_new = self.n
        if self.n and new_steps[0] <= self.steps[self.n - 1]:
            self._rebuild(new_steps)
            first_new = self.n  # every row is initialised
        else:
            self._append(new_steps)
        rows_of = self.steps[:self.n]
        ncols = len(self.layers)
        every = tuple(self.layers)
        per_metric = [metric for metric, _ in arrays]
        for metric in set(self.metrics) | set(per_metric):
            buf = self.metrics.get(metric)
            if buf is None:
                buf = self.metrics[metric] = self._new(self.present.shape, np.float32)
                buf[:first_new, :ncols] = np.nan
            # new rows stay unwritten only where this batch writes all of them for every layer
            whole = per_metric.count(metric) == 1 and any(
                m == metric and layers == every and np.array_equal(st, new_steps) for (m, layers), (st, _) in
                arrays.items())
            if not whole:
                buf[first_new:self.n, :ncols] = np.nan
        placed: dict[str, list[tuple[np.ndarray, list[Piece]]]] = {}
        for (metric, layers), (_, pieces) in arrays.items():
            buf = self.metrics[metric]
            cols = np.fromiter((self.index[name] for name in layers), dtype=np.int64, count=len(layers))
            placed.setdefault(metric, []).append((cols, pieces))
            contiguous_cols = len(cols) and cols[-1] - cols[0] == len(cols) - 1 and bool(np.all(np.diff(cols) == 1))
            for piece in pieces:
                rows = np.searchsorted(rows_of, piece.steps)
                contiguous_rows = rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1))
                if contiguous_rows and contiguous_cols:
                    r, c = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
                    buf[r, c] = piece.values
                    self.present[r, c] = True
                else:
                    buf[rows[:, None], cols[None, :]] = piece.values
                    self.present[rows[:, None], cols[None, :]] = True
        for metric, keyed in placed.items():
            self._rewrite_repeated(self.metrics[metric], rows_of, keyed)

    @staticmethod
    def _rewrite_repeated(buf: np.ndarray, rows_of: np.ndarray, keyed: list[tuple[np.ndarray, list[Piece]]]) -> None:
        """A step written more than once in the batch (a resumed run, layouts that change): its records are written
        again one by one in file order, so the last one written wins cell by cell whatever the layouts."""
        steps = np.concatenate([piece.steps for _, pieces in keyed for piece in pieces])
        if len(steps) < 2 or bool(np.all(steps[1:] > steps[:-1])):
            return
        uniq, counts = np.unique(steps, return_counts=True)
        repeated = uniq[counts > 1]
        if not len(repeated):
            return
        records = []
        for cols, pieces in keyed:
            for piece in pieces:
                for k in np.flatnonzero(np.isin(piece.steps, repeated)).tolist():
                    records.append((int(piece.order[k]), int(piece.steps[k]), cols, piece.values[k]))
        records.sort(key=lambda rec: rec[0])
        for _, step, cols, values in records:
            buf[int(np.searchsorted(rows_of, step)), cols] = values

    def _adopt(self, arrays: dict[tuple[str, tuple[str, ...]], tuple[np.ndarray, list[Piece]]]) -> bool:
        """A first read that is all there is (one layout, every metric at the same increasing steps, no more rows
        announced): the arrays become the buffers as they are, with no second copy. Later appends grow them."""
        if self.n or any(len(pieces) != 1 for _, pieces in arrays.values()):
            return False
        layers = tuple(self.layers)
        steps = next(iter(arrays.values()))[0]
        if self.min_rows > len(steps):
            return False
        if any(key[1] != layers or not np.array_equal(st, steps) for key, (st, _) in arrays.items()):
            return False
        if len(steps) > 1 and not np.all(np.diff(steps) > 0):
            return False
        self.steps = steps
        self.metrics = {metric: pieces[0].values.astype(np.float32, copy=False)
                        for (metric, _), (_, pieces) in arrays.items()}
        self.present = np.ones((len(steps), len(layers)), dtype=bool)
        self.n = len(steps)
        return True

    def _capacity(self, rows: int, cols: int) -> tuple[int, int]:
        cap_r, cap_c = self.present.shape
        return (max(rows, cap_r * 2, 64, self.min_rows) if rows > cap_r else cap_r,
                max(cols, cap_c * 2, 8) if cols > cap_c else cap_c)

    def _add_columns(self, cols_before: int) -> None:
        """Layers registered since the last batch: their cells of the rows already held become NaN."""
        ncols = len(self.layers)
        if ncols > self.present.shape[1]:
            self._resize(self.present.shape[0], self._capacity(self.n, ncols)[1], cols_before)
        for buf in self.metrics.values():
            buf[:self.n, cols_before:ncols] = np.nan

    def _resize(self, cap_r: int, cap_c: int, cols: int, row_map: np.ndarray | None = None, rows: int = 0) -> None:
        """Fresh buffers of the given capacity holding the first ``cols`` columns of the rows held, at ``row_map``
        (default: the same rows); with a ``row_map``, the first ``rows`` rows are initialised (NaN) first."""
        at = slice(0, self.n) if row_map is None else row_map
        for metric, buf in list(self.metrics.items()):
            new = self._new((cap_r, cap_c), np.float32)
            if row_map is not None:
                new[:rows, :len(self.layers)] = np.nan
            new[at, :cols] = buf[:self.n, :cols]
            self.metrics[metric] = new
        present = self._new((cap_r, cap_c), np.bool_)
        present[at, :cols] = self.present[:self.n, :cols]
        self.present = present
        self._prune()

    def _append(self, new_steps: np.ndarray) -> None:
        """Room for rows after the last one (left unwritten: the caller writes or initialises them)."""
        total = self.n + len(new_steps)
        cap_r, cap_c = self._capacity(total, len(self.layers))
        if (cap_r, cap_c) != self.present.shape:
            self._grow(cap_r, cap_c)
        self.steps[self.n:total] = new_steps
        self.n = total

    def _grow(self, cap_r: int, cap_c: int) -> None:
        self._resize(cap_r, cap_c, len(self.layers))
        steps = np.zeros(cap_r, dtype=np.int64)
        steps[:self.n] = self.steps[:self.n]
        self.steps = steps

    def nbytes(self) -> int:
        """Bytes of the values held (rows read so far, every metric and the logged mask)."""
        return sum(buf[:self.n].nbytes for buf in self.metrics.values()) + self.present[:self.n].nbytes

    def back_with_files(self, directory: str) -> None:
        """Move the buffers into file-backed mappings under ``directory`` (with room for more rows), and make every
        later buffer one: a run that keeps growing then holds in memory only the pages touched since
        :meth:`release_pages`, not all it has read."""
        self.backing = directory
        if self.n:
            self._grow(*self._capacity(self.n + 1, len(self.layers)))

    def _new(self, shape: tuple[int, int], dtype: type) -> np.ndarray:
        buf = _buffer(shape, dtype, self.backing)
        if self.backing is not None:
            memory = _mapping_of(buf)
            if memory is not None:
                self._mapped[id(memory)] = memory
        return buf

    def _prune(self) -> None:
        """Forget the mappings of replaced buffers (views handed out keep them alive; they are no longer ours)."""
        self._mapped = {id(m): m for m in map(_mapping_of, (*self.metrics.values(), self.present))
                        if m is not None and id(m) in self._mapped}

    def release_pages(self) -> None:
        """Hand the pages of file-backed buffers back to the system (their values stay in the file and are read back
        on the next access). Buffers in ordinary memory are left alone (dropping their pages would zero them)."""
        self._prune()
        for memory in self._mapped.values():
            if not memory.closed and hasattr(mmap, "MADV_DONTNEED"):
                memory.madvise(mmap.MADV_DONTNEED)

    def reserve(self, rows: int) -> None:
        """Announce about ``rows`` steps (a file read in batches whose size is known): the next growth makes room for
        all of them at once instead of doubling (and copying) as they come."""
        self.min_rows = rows

    def _rebuild(self, new_steps: np.ndarray) -> None:
        old = self.steps[:self.n]
        union = np.union1d(old, new_steps)
        cap_r, cap_c = self._capacity(len(union), len(self.layers))
        self._resize(max(cap_r, len(union)), cap_c, len(self.layers), row_map=np.searchsorted(union, old),
                     rows=len(union))
        self.steps = np.zeros(self.present.shape[0], dtype=np.int64)
        self.steps[:len(union)] = union
        self.n = len(union)

    def histograms(self) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.hist:
            return np.zeros(0, dtype=np.int64), None
        hist_steps = np.unique(np.concatenate([block.steps for _, block in self.hist]))
        out = np.zeros((len(hist_steps), len(self.layers), fmt.HIST_BINS), dtype=np.int64)
        # Low cadence: a loop over logged steps, not values, in the order written (a step logged twice keeps the last).
        rows = sorted(((batch, order, k, block) for batch, block in self.hist
                       for k, order in enumerate(block.order.tolist())), key=lambda row: row[:2])
        cols = {id(block): [self.index[name] for name in block.layers] for _, block in self.hist}
        for _, _, k, block in rows:
            out[int(np.searchsorted(hist_steps, block.steps[k])), cols[id(block)]] = block.values[k]
        return hist_steps, out


def fold_params(params: list[tuple[str, Series]], fold: str, order: list[str]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-parameter series -> per-layer dense arrays: (steps, values [S, L] float32, present [S, L])."""
    steps = np.unique(np.concatenate([s.steps for _, s in params]))
    index = {name: j for j, name in enumerate(order)}
    shape = (len(steps), len(order))
    present = np.zeros(shape, dtype=bool)
    if fold == "l2":
        acc = np.zeros(shape, dtype=np.float64)
        for layer, s in params:
            rows, j = np.searchsorted(steps, s.steps), index[layer]
            acc[rows, j] += s.values * s.values
            present[rows, j] = True
        acc = np.sqrt(acc)
    else:
        acc = np.full(shape, -np.inf, dtype=np.float64)
        for layer, s in params:
            rows, j = np.searchsorted(steps, s.steps), index[layer]
            acc[rows, j] = np.fmax(acc[rows, j], np.abs(s.values))
            nan = np.isnan(s.values)
            acc[rows[nan], j] = np.nan
            present[rows, j] = True
    acc[~present] = np.nan
    return steps, acc.astype(np.float32), present
