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

import logging
import os
import pickle
import posixpath
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import format as fmt
from . import pyramid
from .batch import LayerBlock, Piece
from .cache import CachedRun, CacheError, cached_run_data, file_identity, still_there
from .reader import EventFileReader, is_remote
from .run_arrays import IdTable, LayerTable, ScalarAcc, fold_params
from .tags import ParamTag, SeriesTag, is_bookkeeping, layer_of, map_tag, tool_hint
from .types import RunData, Series, update_ratio_inputs

logger = logging.getLogger(__name__)

#: Our own tool name, as it appears in ``RunData.source``.
OURS = "tb_gradient_plugin"
#: Event bytes decoded per batch while loading a run: bounds the transient memory of decoded protos.
READ_BATCH_BYTES = 64 * 1024 * 1024

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
        self.spilled = False  # values live in the cache entry, not in memory (see RunStore)
        self.dirty = False  # values in memory newer than the cache entry
        self.entry: Any = None  # the run's cache entry, when there is a cache
        self.resume: dict | None = None  # how the entry's arrays rebuild the values read so far
        self._clear()

    def __getstate__(self) -> dict:
        """What a cache entry keeps of the reading state: readers (offsets, layouts), counts, notices; the values
        themselves are stored as arrays beside it."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("table", "scalars", "cache", "entry", "live_pyramids")}
        for reader, _ in self.readers.values():
            reader.records.release_buffer()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.table = LayerTable()
        self.scalars = {}
        self.cache = None
        self.entry = None
        self.live_pyramids = {}
        self.spilled = True
        self.dirty = False

    def _clear(self, files: Iterable[tuple[str, str]] = ()) -> None:
        """Forget everything read (fresh readers for ``files``); the version keeps counting up."""
        self.readers: dict[str, tuple[EventFileReader, str]] = {}
        self.finished: set[str] = set()
        self.layouts: dict[str, tuple[str, ...]] = {}
        self.table = LayerTable()
        self.scalars: dict[tuple[str, str], ScalarAcc] = {}
        self.other_tags: dict[tuple[str, str], None] = {}
        self.batches = IdTable()  # step -> sample ids; a later record of a step wins
        self.tf2_files = False
        self.events = 0
        self.first_wall_time: float | None = None
        self.last_wall_time: float | None = None
        self.problem_count = 0
        self.cache: RunData | None = None
        # metric -> (the buffers its pyramid was pooled from, the pyramid): see live_data()
        self.live_pyramids: dict[str, tuple[tuple[Any, ...], pyramid.Pyramid]] = {}
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
                    wall = batch.last_wall_time()
                    if wall is not None and (self.last_wall_time is None or wall > self.last_wall_time):
                        self.last_wall_time = wall
                    if batch.layer_blocks:
                        if batch.has_more:  # the rest of the file holds about as many steps per byte
                            rows = max(sum(len(p.steps) for p in block.pieces) for block in batch.layer_blocks)
                            per_byte = rows / max(1, reader.records.offset - start)
                            self.table.reserve(self.table.n + rows + int(per_byte * reader.records.pending_bytes
                                                                         * 1.02) + 1)
                        self.table.add(batch.layer_blocks)
                    for block in batch.scalar_blocks:
                        self._acc(("ours" if block.ours else role, block.tag)).add(block.steps, block.values)
                    self.batches.add(batch.batch_ids)
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

    def has_new_bytes(self, finished: Iterable[str]) -> bool:
        """Whether a read would find anything: a file grew, was written to or is new, or is to be finished."""
        if any(path not in self.finished for path in finished if path in self.readers):
            return True
        return any(reader.records.changed() for reader, _ in self.readers.values())

    # -------------------------------------------------------------------------------------------- cache round trip

    def cache_arrays(self, data: RunData) -> tuple[dict[str, np.ndarray], list[str], list[str], dict]:
        """The arrays of a cache entry: (all arrays by name, the ones kept in memory, the ones mapped on demand,
        what is needed to rebuild the reading state from them)."""
        arrays: dict[str, np.ndarray] = {"steps": np.asarray(data.steps, dtype=np.int64),
                                         "hist_steps": np.asarray(data.hist_steps, dtype=np.int64)}
        for name, series in data.series.items():
            arrays[f"series/{name}/steps"] = series.steps
            arrays[f"series/{name}/values"] = series.values
        resident = list(arrays)
        big = ["present"]
        arrays["present"] = data.present
        for metric, values in data.layer_metrics.items():
            arrays[f"metric/{metric}"] = values
            big.append(f"metric/{metric}")
        if data.histograms is not None:
            arrays["histograms"] = data.histograms
            big.append("histograms")
        keys = list(self.scalars)
        for i, key in enumerate(keys):
            series = self.scalars[key].series()
            arrays[f"raw/{i}/steps"], arrays[f"raw/{i}/values"] = series.steps, series.values
        resume = {"scalars": keys, "table_rows": bool(self.table.n), "table_layers": list(self.table.layers),
                  "table_hist": bool(self.table.hist)}
        return arrays, resident, big, resume

    def spill(self) -> None:
        """Forget the values (they are in the cache entry); the readers stay, to notice appended bytes."""
        self.table = LayerTable()
        self.scalars = {}
        self.cache = None
        self.spilled = True

    def unspill(self, arrays: dict[str, np.ndarray], resume: dict) -> None:
        """Rebuild the values read so far from a cache entry's arrays, so that reading can go on where it stopped."""
        table = LayerTable()
        table.layers = list(resume["table_layers"])
        table.index = {name: j for j, name in enumerate(table.layers)}
        if resume["table_rows"]:
            table.steps = arrays["steps"]
            table.n = len(table.steps)
            table.present = arrays["present"]
            table.metrics = {key.split("/", 1)[1]: value for key, value in arrays.items() if key.startswith("metric/")}
        if resume["table_hist"]:
            hist_steps = arrays["hist_steps"]
            piece = Piece(hist_steps, np.zeros(len(hist_steps)), arrays["histograms"],
                          np.arange(len(hist_steps), dtype=np.int64))
            table.hist = [(0, LayerBlock(fmt.HISTOGRAM_METRIC, tuple(table.layers), [piece]))]
        self.table = table
        self.scalars = {}
        for i, key in enumerate(resume["scalars"]):
            self._acc(tuple(key)).add(arrays[f"raw/{i}/steps"], arrays[f"raw/{i}/values"])
        self.cache = None
        self.spilled = False

    def reset(self) -> None:
        """Start over from the first byte of every file (a cache entry that could not be used)."""
        self._clear([(path, role) for path, (_, role) in self.readers.items()])
        self.spilled = False

    def live_data(self) -> RunData:
        """The run's data with a max pyramid per metric, extended by the steps appended since the last call.

        The run store appends a live run's new steps in place (:class:`LayerTable`): while a metric's values, the
        update ratio's divisor and the logged mask are still views of the same buffers, with as many columns, the
        rows pooled before are unchanged and only the new ones are pooled. A rebuilt buffer (steps out of order, a
        new layer, more capacity) builds the pyramid afresh. The buffers are held with the pyramid, so that their
        identity cannot be taken by a new buffer at the same address.
        """
        data = self.data()
        built: dict[str, tuple[tuple[Any, ...], pyramid.Pyramid]] = {}
        for metric, (values, divide_by) in _pyramid_inputs(data).items():
            buffers = tuple(_buffer_of(a) for a in (values, divide_by, data.present))
            old = self.live_pyramids.get(metric)
            same = old is not None and all(a is b for a, b in zip(old[0], buffers, strict=True))
            built[metric] = (buffers, pyramid.extend(old[1] if same else None, values, data.present, divide_by))
        self.live_pyramids = built
        data.pyramids = {metric: pyr for metric, (_, pyr) in built.items() if pyr.levels}
        return data

    def _acc(self, key: tuple[str, str]) -> ScalarAcc:
        acc = self.scalars.get(key)
        if acc is None:
            acc = self.scalars[key] = ScalarAcc()
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
                      first_wall_time=self.first_wall_time, last_wall_time=self.last_wall_time,
                      batches=self.batches.snapshot())
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
                folded[metric] = fold_params(params, items[0][0].fold, order)
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
        from . import remote

        fs, base, files = remote.list_files(root)
        base = base.rstrip("/")
        for path in files:
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
        from . import remote

        if not remote.exists(logdir):
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


def load_run(path: str, name: str | None = None, *, cache: Any = None) -> RunData:
    """Read one run directory once, to the end (its files are complete: a truncated tail is reported).

    A Keras run's ``train/`` and ``validation/`` subdirectories are part of the run: always when Keras' own
    ``TensorBoard`` callback wrote there (its ``.v2`` files), and also when ``path`` holds no event file of its own,
    so that the ``log_dir`` given to our Keras callback (which writes into ``log_dir/train``) reads as its run.

    With a :class:`cache.RunCache`, the run comes from its entry when its files are unchanged (a file that grew is
    read on from where the entry stopped) and is written to it otherwise, as the plugin's run store does: a second
    audit of a remote logdir downloads only what is new.
    """
    _check_exists(path)
    dirs = _list_event_dirs(path)
    files: list[tuple[str, str]] = [(f, "main") for f in sorted(dirs.get(".", []))]
    if "." in _keras_parents(dirs) or (not files and any(sub in dirs for sub in _KERAS_SPLITS)):
        for sub, role in _KERAS_SPLITS.items():
            files.extend((f, role) for f in sorted(dirs.get(sub, [])))
    if name is None:
        name = posixpath.basename(path.rstrip("/\\").replace(os.sep, "/")) or "."
    finished = [f for f, _ in files]
    restored = None if cache is None else _restore_entry(cache, cache.entry(path, "."), path, name)
    if restored is not None:
        run, data, _ = restored
        for f, role in files:
            run.add_file(f, role)
        if not run.has_new_bytes(finished):
            data.name = name
            return data
        _unspill(run)
    else:
        run = _Run(name, path)
        run.lightning_hparams = _has_lightning_hparams(path)
        for f, role in files:
            run.add_file(f, role)
    run.name = name
    run.read(finished=finished)
    if cache is None or run.failure:
        return run.data()
    if run.entry is None:
        run.entry = cache.entry(path, ".")
    try:
        return _write_entry(cache, run, run.data())
    except OSError as exc:
        logger.warning("writing the cache failed (%s); reading without it", exc)
        return run.data()


# -------------------------------------------------------------------------------------------------- the store


def _natural_key(path: str) -> list:
    """Sort key that compares digit runs as numbers: ``events....1700000000.host.42.10`` comes after ``....42.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


#: A cache write waits at most this long for the detections and responses being computed (see RunStore.hold_writes).
WRITE_HOLD_SECONDS = 10.0


class RunStore:
    """All runs under a logdir (or a TensorBoard ``logdir_spec``), kept up to date by :meth:`refresh`.

    Thread-safe, and readers never wait for a read: :meth:`refresh` reads outside the lock that :meth:`get` and
    :meth:`snapshot` take, and publishes each run's new :class:`RunData` (assembled, complete) in one swap once that
    run's read is done. So a request is answered from the last complete state of every run while a large read is in
    progress, and never sees a run half updated. One refresh reads at a time (a second one waits for it, then reads
    only what is still new), so no byte is read twice.
    """

    def __init__(self, logdir: str, *, spec: dict[str, str] | None = None, cache: Any = None) -> None:
        self.logdir = logdir
        self._roots: list[tuple[str, str]] = list(spec.items()) if spec else [("", logdir)]
        self._runs: dict[str, _Run] = {}  # reading state: only touched while holding _read_lock
        self._published: dict[str, tuple[RunData, int]] = {}
        self._read_lock = threading.Lock()
        self._lock = threading.Lock()
        #: a :class:`cache.RunCache`: runs are published from their cache entries and kept out of memory
        self.cache = cache
        self._reports: dict[str, tuple[int, Any]] = {}  # run -> (version, report): cached, or judged since
        self._writer: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future, int]] = deque()  # cache writes queued or running, with their runs' bytes
        self._holds = 0  # detections and responses being computed (see hold_writes)
        #: called with a run's name before the run is written to the cache: on the writer thread, or for the last run
        #: a refresh reads, on the reading thread (the plugin judges the run, so that its report goes into the entry
        #: and no write competes with that detection for the CPU)
        self.before_write: Callable[[str], Any] | None = None
        self._quiet = threading.Condition()

    def refresh(self, listed: Callable[[], None] | None = None) -> bool:
        """Find new runs and files, read only new bytes; True if anything changed.

        ``listed`` is called once every run has been published, before the last cache write has finished (the
        caller can start serving: the runs are published from memory until their entries are written)."""
        with self._read_lock:
            try:
                changed = self._refresh()
                if listed is not None:
                    listed()
                return changed
            finally:
                self._wait_written()

    def _refresh(self) -> bool:
        changed = False
        found = [(prefix, root, name, run_dir, files) for prefix, root in self._roots
                 for name, (run_dir, files) in _group_runs(_list_event_dirs(root), root).items()]
        for k, (prefix, root, name, run_dir, files) in enumerate(found):
            full = name if not prefix else (prefix if name == "." else f"{prefix}/{name}")
            run = self._runs.get(full)
            if run is None:
                run = self._runs[full] = self._restore(full, root, run_dir) or _Run(full, run_dir)
                run.lightning_hparams = _has_lightning_hparams(run_dir)
            for f, role in files:
                run.add_file(f, role)
            finished = self._finished(files)
            try:
                if run.spilled and not run.has_new_bytes(finished):
                    run_changed = False
                else:
                    if run.spilled:
                        self._unspill(run)
                    run_changed = run.read(finished=finished)
            except Exception as exc:  # noqa: BLE001 - one run's failure must not hide the other runs
                if run.spilled:
                    run.reset()
                run_changed = run.fail(f"reading this run failed: {type(exc).__name__}: {exc}")
            # With a cache, a run read for the first time is written to it at once, while the next run is
            # read (see _write_later); one that grows is read on in place while it keeps growing (see
            # _bound_live), and is written once a refresh finds it idle (a live run is not rewritten every second).
            first = full not in self._published
            growing = run_changed and not first and self.cache is not None
            idle = not run_changed and run.dirty and not run.spilled
            if run_changed or idle or first:
                if growing or self.cache is None:
                    if growing:
                        self._bound_live(run)
                    self._publish(full, run.live_data() if growing else run.data(), run.version)
                    if growing:
                        run.table.release_pages()
                    run.dirty = growing
                else:
                    if not idle:  # served while it is written to the cache (detection need not wait)
                        self._publish(full, run.data(), run.version)
                        if k == len(found) - 1:
                            # the last run read: nothing left to read while the writer judges it, and a
                            # detection in the thread that read the run runs faster than in the writer's
                            self._before_write(full)
                    run.dirty = False
                    self._write_later(full, run, root)
                changed |= run_changed or first
        return changed

    def _bound_live(self, run: _Run) -> None:
        """A growing run larger than a quarter of the memory budget for arrays moves its values into file-backed
        buffers in the cache directory, whose pages are handed back after every refresh: a live run then holds in
        memory about what each refresh touches (the appended rows, what the views read), not all it has read."""
        if run.table.backing is None and run.table.nbytes() > self.cache.budget.max_bytes // 4:
            try:
                run.table.back_with_files(str(self.cache.root))
            except OSError as exc:
                run.table.backing = None
                logger.warning("gradients plugin: cannot back run %r with files (%s); it stays in memory", run.name,
                               exc)

    def _write_later(self, name: str, run: _Run, root: str) -> None:
        """Write a run to the cache on the store's writer thread, then publish it from its entry. Reading goes on
        meanwhile (a write is mostly disk and checksums, outside the GIL): runs waiting for their write stay in
        memory, at most the cache's memory budget of them (always one), so a first read of a large logdir lists every
        run about as soon as without the cache while holding a bounded amount of it."""
        nbytes = _run_bytes(run.data())
        limit = self.cache.budget.max_bytes if self.cache is not None else 0
        while self._pending and sum(b for _, b in self._pending) + nbytes > limit:
            self._wait_oldest()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tb-gradient-cache")
        version = run.version

        def write() -> None:
            self._before_write(name)
            with self._quiet:
                self._quiet.wait_for(lambda: not self._holds, timeout=WRITE_HOLD_SECONDS)
            data = self._publishable(run, root)
            self._publish(name, data, version)

        self._pending.append((self._writer.submit(write), nbytes))

    def _before_write(self, name: str) -> None:
        if self.before_write is not None:
            try:
                self.before_write(name)
            except Exception:  # noqa: BLE001 - the run is written without it
                logger.warning("gradients plugin: preparing run %r for the cache failed", name, exc_info=True)

    @contextmanager
    def hold_writes(self) -> Iterator[None]:
        """Cache writes wait while the caller computes what a user waits for (a detection, a response): on a machine
        with few cores a write would slow it down, and it can as well be done once the tab has its answer. A write
        waits at most ``WRITE_HOLD_SECONDS``, so that a busy tab cannot keep runs in memory for ever."""
        with self._quiet:
            self._holds += 1
        try:
            yield
        finally:
            with self._quiet:
                self._holds -= 1
                if not self._holds:
                    self._quiet.notify_all()

    def _wait_oldest(self) -> None:
        future, _ = self._pending.popleft()
        try:
            future.result()
        except Exception:  # noqa: BLE001 - the run stays served from memory
            logger.warning("gradients plugin: writing a run to the cache failed", exc_info=True)

    def _wait_written(self) -> None:
        """Wait for every cache write queued (a failed write leaves its run published from memory)."""
        while self._pending:
            self._wait_oldest()

    def _publish(self, name: str, data: RunData, version: int) -> None:
        with self._lock:
            old = self._published.get(name)
            self._published[name] = (data, version)
        if old is not None and old[0] is not data:
            _close(old)

    # ---------------------------------------------------------------------------------------------------- the cache

    def _restore(self, name: str, root: str, run_dir: str) -> _Run | None:
        """A run as its cache entry left it (published from the entry, values not in memory), or None when there is
        no usable entry (see :func:`_restore_entry`)."""
        if self.cache is None:
            return None
        restored = _restore_entry(self.cache, self.cache.entry(root, name), run_dir, name)
        if restored is None:
            return None
        run, data, report = restored
        with self._lock:
            self._published[name] = (data, run.version)
            if report is not None:
                self._reports[name] = (run.version, report)
        return run

    def _unspill(self, run: _Run) -> None:
        _unspill(run)

    def _publishable(self, run: _Run, root: str) -> RunData:
        """The run's data to publish; with a cache, written to the run's entry and published from it."""
        data = run.data()
        if self.cache is None or run.failure:
            return data
        try:
            if run.entry is None:
                run.entry = self.cache.entry(root, run.name)
            with self._lock:
                judged = self._reports.get(run.name)
            # a report judged while the run was in memory (a live run) goes into the entry with it
            report = judged[1] if judged is not None and judged[0] == run.version else None
            return _write_entry(self.cache, run, data, report)
        except OSError as exc:
            logger.warning("gradients plugin: writing the cache failed (%s); working without the cache from now on",
                           exc)
            self.cache = None
            return data

    def rebuild(self, run: str) -> None:
        """Read a run again from its event files (its cache entry failed a check when its arrays were mapped)."""
        with self._read_lock:
            state = self._runs.get(run)
            if state is None:
                return
            if state.entry is not None:
                state.entry.remove()
            state.reset()
            with self._lock:
                self._reports.pop(run, None)
        self.refresh()

    def cached_report(self, run: str, version: int) -> Any:
        """The detector's report found in the run's cache entry, if it describes data ``version``; else None."""
        with self._lock:
            found = self._reports.get(run)
        return found[1] if found is not None and found[0] == version else None

    def save_report(self, run: str, version: int, report: Any) -> None:
        """Keep the detector's report on data ``version`` in the run's cache entry (no-op without a cache). A run whose
        first cache write is still queued takes the report along when it is written (see :meth:`_publishable`)."""
        if self.cache is None:
            return
        state = self._runs.get(run)
        entry = None if state is None else state.entry
        with self._lock:
            self._reports[run] = (version, report)
        if entry is None:
            return
        try:
            entry.write_report(report, version)
        except CacheError:  # the entry is being written: it takes the report along, or the next start judges again
            pass
        except Exception:  # noqa: BLE001 - the report is served from memory all the same
            logger.warning("gradients plugin: could not cache the report of run %r", run, exc_info=True)

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


def _run_bytes(data: RunData) -> int:
    """Bytes of a run's per-layer arrays in memory (what waits in memory for its cache write)."""
    return sum(a.nbytes for a in data.layer_metrics.values()) + data.present.nbytes


def _buffer_of(array: np.ndarray | None) -> Any:
    """The object that owns an array's memory (the root of its chain of views)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


def _restore_entry(cache: Any, entry: Any, run_dir: str, name: str) -> tuple[_Run, RunData, Any] | None:
    """(reading state, data served from the entry, cached report or None) of a run's cache entry, or None when it is
    not usable: none, another version, a checksum mismatch, or an event file that is no longer the one read (shorter,
    or other first bytes). An unusable entry is removed; the run is then read from its event files."""
    try:
        manifest, state, resident, report = entry.load()
        if not all(still_there(identity) for identity in manifest["files"]):
            raise CacheError("an event file changed")
    except CacheError:
        entry.remove()
        return None
    except Exception:  # noqa: BLE001 - a cache entry must never stop a run from being read
        logger.warning("gradients plugin: cache entry of run %r unusable; reading it again", name, exc_info=True)
        entry.remove()
        return None
    run: _Run = state["run"]
    run.path = run_dir
    run.entry = entry
    run.resume = state["resume"]
    cached = CachedRun(entry, cache.budget, state["big"])
    data = cached_run_data(state["facts"], resident, cached, _pyramids(state["pyramids"], resident),
                           run.batches.snapshot())
    return run, data, report


def _unspill(run: _Run) -> None:
    """Bring a restored run's values back into memory to read on; a damaged entry makes it start from scratch."""
    try:
        names = [n for n in run.entry.names() if not n.startswith(("pyr/", "series/"))]
        run.unspill(run.entry.read(names), run.resume)
    except (CacheError, OSError):
        run.entry.remove()
        run.reset()


def _write_entry(cache: Any, run: _Run, data: RunData, report: Any = None) -> RunData:
    """Write a run read into memory to its cache entry (``run.entry``), drop its values from memory and return its
    data served from the entry. ``OSError`` when the cache cannot be written."""
    arrays, resident, big, resume = run.cache_arrays(data)
    pyramids = getattr(data, "pyramids", None) or _build_pyramids(data)  # a live run's are up to date
    for metric, pyr in pyramids.items():
        for k, level in enumerate(pyr.levels):
            arrays[f"pyr/{metric}/{k}/max"] = level.max
            arrays[f"pyr/{metric}/{k}/bad"] = level.bad
            resident += [f"pyr/{metric}/{k}/max", f"pyr/{metric}/{k}/bad"]
    facts = {"name": data.name, "source": data.source, "layers": list(data.layers),
             "warnings": list(data.warnings), "unknown_tags": list(data.unknown_tags), "events": data.events,
             "bytes_read": data.bytes_read, "first_wall_time": data.first_wall_time,
             "last_wall_time": data.last_wall_time,
             "series": list(data.series), "metrics": list(data.layer_metrics)}
    shape = {metric: (pyr.rows, [level.block for level in pyr.levels]) for metric, pyr in pyramids.items()}
    run.resume = resume
    state = pickle.dumps({"run": run, "facts": facts, "big": big, "resident": resident, "resume": resume,
                          "pyramids": shape}, protocol=pickle.HIGHEST_PROTOCOL)
    files = [file_identity(path) for path in sorted(run.readers)]
    run.entry.write(state=state, arrays=arrays, files=files, data_version=run.version)
    if report is not None:
        run.entry.write_report(report, run.version)
    resident_arrays = {name: arrays[name] for name in resident}
    cached = CachedRun(run.entry, cache.budget, big)
    run.spill()
    _release_memory()
    return cached_run_data(facts, resident_arrays, cached, _pyramids(shape, resident_arrays), run.batches.snapshot())


def _close(published: tuple[RunData, int] | None) -> None:
    """Unmap the arrays of data no longer published (requests in progress keep their own views)."""
    cached = getattr(published[0], "__dict__", {}).get("cached") if published is not None else None
    if cached is not None:
        cached.close()


def _pyramid_inputs(data: RunData) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per metric the heatmap shows, the values its pyramid pools and what they are divided by (``update_ratio``,
    when derivable from update and parameter norms)."""
    inputs: dict[str, tuple[np.ndarray, np.ndarray | None]] = {m: (v, None) for m, v in data.layer_metrics.items()}
    ratio = update_ratio_inputs(data.layer_metrics)
    if ratio is not None and ratio[1] is not None:
        inputs["update_ratio"] = (ratio[0], ratio[1])
    return inputs


def _build_pyramids(data: RunData) -> dict[str, Any]:
    """Max pyramids of every per-layer metric the heatmap shows (``update_ratio`` included, when derivable)."""
    out = {metric: pyramid.build(values, data.present, divide_by)
           for metric, (values, divide_by) in _pyramid_inputs(data).items()}
    return {metric: pyr for metric, pyr in out.items() if pyr.levels}


def _pyramids(shape: dict[str, tuple[int, list[int]]], resident: dict[str, np.ndarray]) -> dict[str, Any]:
    """The pyramids of a cache entry, from its in-memory arrays."""
    def levels(metric: str, blocks: list[int]) -> list[pyramid.Level]:
        return [pyramid.Level(block, resident[f"pyr/{metric}/{k}/max"], resident[f"pyr/{metric}/{k}/bad"])
                for k, block in enumerate(blocks)]

    return {metric: pyramid.Pyramid(rows, levels(metric, blocks)) for metric, (rows, blocks) in shape.items()}


def _release_memory() -> None:
    """Hand the heap freed by a spilled run back to the system (glibc keeps freed blocks of this size otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
