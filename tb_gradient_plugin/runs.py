"""Run store: a logdir becomes runs, and each run becomes dense per-run arrays for the detector, plugin and auditor.

A *run* is a directory holding event files, named by its path relative to the logdir (``"."`` for the logdir
itself), as TensorBoard names runs. One exception: Keras' ``TensorBoard`` callback splits one training run into
``<run>/train`` and ``<run>/validation``; those two directories are read as the single run ``<run>`` (validation tags
become validation series), because a loss spike and the validation loss it degrades belong to one report. Where only
our Keras callback wrote (``<run>/train`` alone, no Keras ``.v2`` file) the run keeps TensorBoard's name
``<run>/train``; :func:`load_run` given ``<run>`` reads it all the same.

Every event file is read once, and afterwards only the bytes appended to it (one :class:`EventFileReader` per file,
one shared ``layouts`` dict per run), so the plugin can poll live runs cheaply. A file replaced or truncated under
its name makes its run be read again from the start (see :meth:`_Run.read`). Runs written by other tools are
mapped onto our series by :func:`tags.map_tag` (the table is documented in ``docs/TAG_MAPPING.md``); tags it does not
recognise are listed in :attr:`RunData.unknown_tags`, never guessed at.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import re
import threading
from collections.abc import Iterable

import numpy as np

from . import format as fmt
from .reader import EventFileReader, LayerBlock, Piece, is_remote
from .tags import ParamTag, SeriesTag, is_bookkeeping, layer_of, map_tag, tool_hint
from .types import RunData, Series

#: Our own tool name, as it appears in ``RunData.source``.
OURS = "tb_gradient_plugin"
#: Event bytes decoded per batch while loading a run: bounds the transient memory of decoded protos.
READ_BATCH_BYTES = 64 * 1024 * 1024

# ------------------------------------------------------------------------------------------------ array helpers


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


class _ScalarAcc:
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


def _buffer(shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A zeroed array whose memory is mapped up front (Linux ``MAP_POPULATE``) when it is large.

    A big run's first read writes hundreds of MB into fresh buffers; taking the page faults one 4 kB page at a time
    as the values arrive costs more than decoding them, while the kernel maps the whole buffer in one call several
    times faster.
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if size < _PREFAULT_BYTES or not populate:
        return np.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)


class _LayerTable:
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
                buf = self.metrics[metric] = _buffer(self.present.shape, np.float32)
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
            new = _buffer((cap_r, cap_c), np.float32)
            if row_map is not None:
                new[:rows, :len(self.layers)] = np.nan
            new[at, :cols] = buf[:self.n, :cols]
            self.metrics[metric] = new
        present = _buffer((cap_r, cap_c), np.bool_)
        present[at, :cols] = self.present[:self.n, :cols]
        self.present = present

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


def _fold(params: list[tuple[str, Series]], fold: str, order: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


# ------------------------------------------------------------------------------------------------------ one run


class _Replaced(Exception):
    """A file of the run was replaced or truncated under its name: what was read from it is no longer its content."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(why)
        self.path = path
        self.why = why


#: Times one read starts a run over because a file was replaced; past it the rest waits for the next read.
MAX_RESTARTS = 3


class _Run:
    """Readers and accumulated values of one run; assembled into a :class:`RunData` on demand (cached)."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.lightning_hparams = False
        self.failure: str | None = None  # why the last read failed, if it did
        self.notices: list[str] = []  # files read again from the start: kept across restarts
        self.version = 0
        self._clear()

    def _clear(self, files: Iterable[tuple[str, str]] = ()) -> None:
        """Forget everything read (fresh readers for ``files``); the version keeps counting up."""
        self.readers: dict[str, tuple[EventFileReader, str]] = {}
        self.finished: set[str] = set()
        self.layouts: dict[str, tuple[str, ...]] = {}
        self.table = _LayerTable()
        self.scalars: dict[tuple[str, str], _ScalarAcc] = {}
        self.other_tags: dict[tuple[str, str], None] = {}
        self.tf2_files = False
        self.events = 0
        self.first_wall_time: float | None = None
        self.problem_count = 0
        self.cache: RunData | None = None
        for path, role in files:
            self.add_file(path, role)

    def add_file(self, path: str, role: str) -> None:
        if path not in self.readers:
            self.readers[path] = (EventFileReader(path, self.layouts), role)
            self.tf2_files |= path.endswith(".v2")

    def fail(self, why: str) -> bool:
        """Record that reading failed (shown as a warning of the run); True if that is news."""
        if why == self.failure:
            return False
        self.failure = why
        self.version += 1
        self.cache = None
        return True

    def read(self, finished: Iterable[str] = ()) -> bool:
        """Read new bytes of every file; ``finished`` files are read to the end and their truncated tail reported.

        A file replaced or truncated under its name makes the whole run be read again from the start, every file in
        the usual order: the values of several files at the same steps are resolved in file order, which only a read
        of all of them in that order gets right, and nothing of the file's old content survives (no double counting,
        no stale value at a step the new content also holds). The run's warnings say which file and why.
        """
        done = set(finished)
        changed = False
        for _ in range(MAX_RESTARTS + 1):
            try:
                changed |= self._read_files(done)
                break
            except _Replaced as exc:
                self._restart(exc)
                changed = True
        if changed:
            self.version += 1
            self.cache = None
        return changed

    def _restart(self, replaced: _Replaced) -> None:
        self.notices.append(f"{self._relative(replaced.path)}: read again from the start, the file was replaced or "
                            f"truncated ({replaced.why})")
        self._clear([(path, role) for path, (_, role) in self.readers.items()])

    def _read_files(self, done: set[str]) -> bool:
        changed = False
        for path in sorted(self.readers):
            reader, role = self.readers[path]
            batch = None
            while batch is None or batch.has_more:
                start = reader.records.offset
                batch = reader.read(max_bytes=READ_BATCH_BYTES)
                if reader.replaced:
                    raise _Replaced(path, reader.replaced)
                if batch.events:
                    changed = True
                    self.events += batch.events
                    wall = batch.first_wall_time()
                    if wall is not None and (self.first_wall_time is None or wall < self.first_wall_time):
                        self.first_wall_time = wall
                    if batch.layer_blocks:
                        if batch.has_more:  # the rest of the file holds about as many steps per byte
                            rows = max(sum(len(p.steps) for p in block.pieces) for block in batch.layer_blocks)
                            per_byte = rows / max(1, reader.records.offset - start)
                            self.table.reserve(self.table.n + rows + int(per_byte * reader.records.pending_bytes
                                                                         * 1.02) + 1)
                        self.table.add(batch.layer_blocks)
                    for block in batch.scalar_blocks:
                        self._acc(("ours" if block.ours else role, block.tag)).add(block.steps, block.values)
                    for tag in batch.other_tags:
                        self.other_tags.setdefault((role, tag))
            if path in done and path not in self.finished:
                self.finished.add(path)
                reader.finish()
        problems = sum(len(r.problems) for r, _ in self.readers.values())
        if problems != self.problem_count:
            self.problem_count = problems
            changed = True
        return changed

    def _acc(self, key: tuple[str, str]) -> _ScalarAcc:
        acc = self.scalars.get(key)
        if acc is None:
            acc = self.scalars[key] = _ScalarAcc()
        return acc

    # ---------------------------------------------------------------------------------------------------- assemble

    def data(self) -> RunData:
        if self.cache is None:
            self.cache = self._assemble()
        return self.cache

    def _assemble(self) -> RunData:
        t = self.table
        run = RunData(name=self.name, source=OURS, events=self.events,
                      bytes_read=sum(r.records.bytes_read for r, _ in self.readers.values()),
                      first_wall_time=self.first_wall_time)
        if t.n:
            run.layers = list(t.layers)
            run.steps = t.steps[:t.n]
            ncols = len(t.layers)
            run.present = t.present[:t.n, :ncols]
            run.layer_metrics = {m: buf[:t.n, :ncols] for m, buf in t.metrics.items()}
        elif t.hist:
            run.layers = list(t.layers)
            run.present = np.zeros((0, len(t.layers)), dtype=bool)
        run.hist_steps, run.histograms = t.histograms()
        ours = bool(t.n or t.hist) or any(role == "ours" for role, _ in self.scalars)

        series_candidates: dict[str, list[tuple[float, tuple[str, str], SeriesTag]]] = {}
        param_tags: list[tuple[ParamTag, Series]] = []
        tools: dict[str, int] = {}
        unknown: list[str] = []
        for key, acc in self.scalars.items():
            role, tag = key
            if role == "ours":
                run.series[tag] = acc.series()
                continue
            meaning = map_tag(tag, role)
            if meaning is None:
                self._hint(tag, tools)
                if not is_bookkeeping(tag):
                    unknown.append(tag if role == "main" else f"{role}/{tag}")
                continue
            if meaning.tool:
                tools[meaning.tool] = tools.get(meaning.tool, 0) + 1
            if isinstance(meaning, ParamTag):
                param_tags.append((meaning, acc.series()))
            else:
                series_candidates.setdefault(meaning.series, []).append((meaning.priority, key, meaning))
        for role, tag in self.other_tags:
            self._hint(tag, tools)
            if not is_bookkeeping(tag):
                unknown.append(tag if role == "main" else f"{role}/{tag}")
        self._choose_series(run, series_candidates)
        if not t.n and param_tags:
            self._fold_layers(run, param_tags)
        run.unknown_tags = sorted(set(unknown))
        run.source = OURS if ours else self._source(tools)
        run.warnings.extend(self.notices)
        for reader, _ in self.readers.values():
            run.warnings.extend(self._warning(p) for p in reader.problems)
        if self.readers and not self.events:
            run.warnings.append("no intact event could be read from this run's files")
        if self.failure:
            run.warnings.append(self.failure)
        return run

    def _warning(self, problem) -> str:
        return f"{self._relative(problem.path)}@{problem.offset}: {problem.message}"

    def _relative(self, path: str) -> str:
        return path[len(self.path):].lstrip("/\\") if path.startswith(self.path) else path

    @staticmethod
    def _hint(tag: str, tools: dict[str, int]) -> None:
        tool = tool_hint(tag)
        if tool is not None:
            tools[tool] = tools.get(tool, 0) + 1

    def _source(self, tools: dict[str, int]) -> str:
        if self.tf2_files:
            tools["keras"] = tools.get("keras", 0) + 1
        if self.lightning_hparams:
            tools["lightning"] = tools.get("lightning", 0) + 1
        if not tools:
            return "plain" if self.events else "unknown"
        return max(tools.items(), key=lambda kv: kv[1])[0]

    def _choose_series(self, run: RunData, candidates: dict[str, list[tuple[float, tuple[str, str], SeriesTag]]]
                       ) -> None:
        loss_tag = None
        for name in sorted(candidates, key=lambda n: n != "loss"):  # loss first: val_loss depends on it
            if name in run.series:
                continue  # our own writer's series win
            options = candidates[name]
            if name == "val_loss" and loss_tag != "epoch_loss":
                # Keras: a per-batch loss (Keras' or ours) is in iterations, so is evaluation_loss_vs_iterations
                options = [(0.0 if k[1] == "evaluation_loss_vs_iterations" else p, k, m) for p, k, m in options]
            best = min(p for p, _, _ in options)
            chosen = [(k, m) for p, k, m in options if p == best]
            if name == "loss":
                loss_tag = chosen[0][0][1]
            if len(chosen) > 1 and chosen[0][1].summed:
                parts = [self.scalars[k].series() for k, _ in chosen]
                steps = np.unique(np.concatenate([s.steps for s in parts]))
                total = np.zeros(len(steps))
                for s in parts:
                    total[np.searchsorted(steps, s.steps)] += s.values
                run.series[name] = Series(steps, total)
            else:
                run.series[name] = self.scalars[chosen[0][0]].series()

    @staticmethod
    def _fold_layers(run: RunData, param_tags: list[tuple[ParamTag, Series]]) -> None:
        by_metric: dict[str, list[tuple[ParamTag, Series]]] = {}
        for tag, series in param_tags:
            by_metric.setdefault(tag.metric, []).append((tag, series))
        order: list[str] = list(dict.fromkeys(layer_of(tag.param) for tag, _ in param_tags))
        folded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for metric, items in by_metric.items():
            level = min(tag.level for tag, _ in items)
            params = [(layer_of(tag.param), s) for tag, s in items if tag.level == level and len(s.steps)]
            if params:
                folded[metric] = _fold(params, items[0][0].fold, order)
        if not folded:
            return
        steps = np.unique(np.concatenate([st for st, _, _ in folded.values()]))
        run.layers = order
        run.steps = steps
        run.present = np.zeros((len(steps), len(order)), dtype=bool)
        # A layer counts as logged where its gradient was (a frozen layer's parameter norm alone is not a gradient
        # that went missing); without gradient norms, wherever anything was logged.
        grad = next((m for m in ("grad_norm", "grad_max_abs") if m in folded), None)
        for metric, (st, values, present) in folded.items():
            rows = np.searchsorted(steps, st)
            full = np.full((len(steps), len(order)), np.nan, dtype=np.float32)
            full[rows] = values
            if grad is None or metric == grad:
                run.present[rows] |= present
            run.layer_metrics[metric] = full


# ------------------------------------------------------------------------------------------------ discovery


def _is_event_file(name: str) -> bool:
    return "tfevents" in name


_KERAS_SPLITS = {"train": "main", "validation": "validation"}


def _list_event_dirs(root: str) -> dict[str, list[str]]:
    """Directory (relative to ``root``, posix, ``"."`` for root) -> full paths of its event files."""
    found: dict[str, list[str]] = {}
    if is_remote(root):
        import fsspec

        fs, base = fsspec.core.url_to_fs(root)
        if not fs.exists(base):
            return found
        base = base.rstrip("/")
        for path in fs.find(base, withdirs=False):
            directory, name = posixpath.split(path)
            if _is_event_file(name):
                rel = posixpath.relpath(directory, base) if directory != base else "."
                found.setdefault(rel, []).append(fs.unstrip_protocol(path))
        return found
    local = root[len("file://"):] if root.startswith("file://") else root
    for directory, _dirs, files in os.walk(local):
        events = [os.path.join(directory, f) for f in files if _is_event_file(f)]
        if events:
            rel = os.path.relpath(directory, local).replace(os.sep, "/")
            found[rel] = events
    return found


def _keras_parents(dirs: dict[str, list[str]]) -> set[str]:
    """Directories whose ``train``/``validation`` children are one Keras run (a TF2 ``.v2`` file in either)."""
    parents = set()
    for rel, files in dirs.items():
        parent, _, base = rel.rpartition("/")
        if rel != "." and base in _KERAS_SPLITS and any(f.endswith(".v2") for f in files):
            parents.add(parent or ".")
    return parents


def _group_runs(dirs: dict[str, list[str]], root: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Run name -> (run directory path, [(event file, role)]), merging Keras ``train``/``validation`` pairs."""
    keras = _keras_parents(dirs)
    runs: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for rel, files in sorted(dirs.items()):
        parent, _, base = rel.rpartition("/")
        parent = parent or "."
        if rel != "." and base in _KERAS_SPLITS and parent in keras:
            name, role = parent, _KERAS_SPLITS[base]
        else:
            name, role = rel, "main"
        entry = runs.setdefault(name, (_join(root, name), []))
        entry[1].extend((f, role) for f in sorted(files))
    return runs


def _join(root: str, rel: str) -> str:
    if rel == ".":
        return root
    if is_remote(root):
        return root.rstrip("/") + "/" + rel
    return os.path.join(root, *rel.split("/"))


def _check_exists(logdir: str) -> None:
    if is_remote(logdir):
        import fsspec

        fs, base = fsspec.core.url_to_fs(logdir)
        if not fs.exists(base):
            raise FileNotFoundError(f"no such logdir: {logdir}")
    elif not os.path.isdir(logdir[len("file://"):] if logdir.startswith("file://") else logdir):
        raise FileNotFoundError(f"no such logdir (or not a directory): {logdir}")


def find_runs(logdir: str) -> list[tuple[str, str]]:
    """(run name, run directory) of every run under ``logdir``, sorted by name. Raises if ``logdir`` is missing."""
    _check_exists(logdir)
    return [(name, entry[0]) for name, entry in sorted(_group_runs(_list_event_dirs(logdir), logdir).items())]


def _has_lightning_hparams(run_dir: str) -> bool:
    if is_remote(run_dir):
        import fsspec

        fs, base = fsspec.core.url_to_fs(run_dir)
        return fs.exists(base.rstrip("/") + "/hparams.yaml")
    return os.path.isfile(os.path.join(run_dir, "hparams.yaml"))


def load_run(path: str, name: str | None = None) -> RunData:
    """Read one run directory once, to the end (its files are complete: a truncated tail is reported).

    A Keras run's ``train/`` and ``validation/`` subdirectories are part of the run: always when Keras' own
    ``TensorBoard`` callback wrote there (its ``.v2`` files), and also when ``path`` holds no event file of its own,
    so that the ``log_dir`` given to our Keras callback (which writes into ``log_dir/train``) reads as its run.
    """
    _check_exists(path)
    dirs = _list_event_dirs(path)
    files: list[tuple[str, str]] = [(f, "main") for f in sorted(dirs.get(".", []))]
    if "." in _keras_parents(dirs) or (not files and any(sub in dirs for sub in _KERAS_SPLITS)):
        for sub, role in _KERAS_SPLITS.items():
            files.extend((f, role) for f in sorted(dirs.get(sub, [])))
    if name is None:
        name = posixpath.basename(path.rstrip("/\\").replace(os.sep, "/")) or "."
    run = _Run(name, path)
    run.lightning_hparams = _has_lightning_hparams(path)
    for f, role in files:
        run.add_file(f, role)
    run.read(finished=[f for f, _ in files])
    return run.data()


# -------------------------------------------------------------------------------------------------- the store


def _natural_key(path: str) -> list:
    """Sort key that compares digit runs as numbers: ``events....1700000000.host.42.10`` comes after ``....42.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


class RunStore:
    """All runs under a logdir (or a TensorBoard ``logdir_spec``), kept up to date by :meth:`refresh`.

    Thread-safe, and readers never wait for a read: :meth:`refresh` reads outside the lock that :meth:`get` and
    :meth:`snapshot` take, and publishes each run's new :class:`RunData` (assembled, complete) in one swap once that
    run's read is done. So a request is answered from the last complete state of every run while a large read is in
    progress, and never sees a run half updated. One refresh reads at a time (a second one waits for it, then reads
    only what is still new), so no byte is read twice.
    """

    def __init__(self, logdir: str, *, spec: dict[str, str] | None = None) -> None:
        self.logdir = logdir
        self._roots: list[tuple[str, str]] = list(spec.items()) if spec else [("", logdir)]
        self._runs: dict[str, _Run] = {}  # reading state: only touched while holding _read_lock
        self._published: dict[str, tuple[RunData, int]] = {}
        self._read_lock = threading.Lock()
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Find new runs and files, read only new bytes; True if anything changed."""
        with self._read_lock:
            changed = False
            for prefix, root in self._roots:
                for name, (run_dir, files) in _group_runs(_list_event_dirs(root), root).items():
                    full = name if not prefix else (prefix if name == "." else f"{prefix}/{name}")
                    run = self._runs.get(full)
                    if run is None:
                        run = self._runs[full] = _Run(full, run_dir)
                        run.lightning_hparams = _has_lightning_hparams(run_dir)
                    for f, role in files:
                        run.add_file(f, role)
                    try:
                        run_changed = run.read(finished=self._finished(files))
                    except Exception as exc:  # noqa: BLE001 - one run's failure must not hide the other runs
                        run_changed = run.fail(f"reading this run failed: {type(exc).__name__}: {exc}")
                    if run_changed or full not in self._published:
                        data = run.data()
                        with self._lock:
                            self._published[full] = (data, run.version)
                        changed = True
            return changed

    @staticmethod
    def _finished(files: list[tuple[str, str]]) -> list[str]:
        """Files that a newer file in the same directory has replaced: their writer is done with them."""
        by_dir: dict[str, list[str]] = {}
        for f, _ in files:
            by_dir.setdefault(posixpath.dirname(f.replace(os.sep, "/")), []).append(f)
        return [f for group in by_dir.values() for f in sorted(group, key=_natural_key)[:-1]]

    def run_names(self) -> list[str]:
        with self._lock:
            return sorted(self._published)

    def snapshot(self, run: str) -> tuple[RunData, int]:
        """The run's arrays and their version, taken together (so a cache keyed on the version never holds older
        data). KeyError for an unknown run name."""
        with self._lock:
            return self._published[run]

    def snapshots(self) -> list[tuple[str, RunData, int]]:
        """(name, arrays, version) of every run, sorted by name, all from one moment."""
        with self._lock:
            return [(name, *self._published[name]) for name in sorted(self._published)]

    def get(self, run: str) -> RunData:
        """The run's arrays as last published. KeyError for an unknown run name."""
        return self.snapshot(run)[0]

    def version(self, run: str) -> int:
        """Increases whenever the run's data changes: a cache key for anything derived from it."""
        return self.snapshot(run)[1]
