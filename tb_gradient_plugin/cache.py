"""Persistent per-run summaries and bounded memory: what reading a run produced is written once to a cache directory,
so a second start lists every run without reading an event file, and a run's full-resolution arrays are mapped from
the cache only while a view needs them, the least recently used ones unmapped past a memory budget.

One entry per run (see ``docs/CACHE.md``): ``arrays.bin`` (every array, raw, 64-byte aligned: numpy memory-maps it
with no parsing), ``state.pkl`` (what the run store needs to go on reading appended bytes: file offsets, layouts),
``report.pkl`` (the detector's report) and ``manifest.json`` (written last: versions, the identity of each event file,
the offset, dtype, shape and CRC32C of each array, the CRC32C of the other files). An entry whose versions differ, or
whose bytes do not match their checksums, is never served: the run is read again from its event files and the entry
rewritten. The cache lives outside the logdir (which may be read-only or remote), under the user's cache directory
unless ``--gradients_cache_dir`` or ``TB_GRADIENT_CACHE_DIR`` say otherwise (``off`` disables it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import crc32c as _crc32c
import numpy as np

from .types import BatchIds, RunData

logger = logging.getLogger(__name__)

#: Layout of an entry; bump on any change to what is written.
CACHE_FORMAT_VERSION = 3
ENV_CACHE_DIR = "TB_GRADIENT_CACHE_DIR"
ENV_MEMORY_MB = "TB_GRADIENT_MEMORY_MB"
#: Memory budget for mapped full-resolution arrays, in MB.
DEFAULT_MEMORY_MB = 400
#: A cache directory value that turns the cache off.
DISABLED = "off"
#: Bytes at the start of an event file whose hash is part of its identity.
HEAD_BLOCK = 4096
_ALIGN = 64
_MANIFEST = "manifest.json"
_ARRAYS = "arrays.bin"
_STATE = "state.pkl"
_REPORT = "report.pkl"

#: Modules whose code decides what a run's arrays hold (reading, tag mapping) or what the report says (detector):
#: an entry written by other code is stale.
_READ_MODULES = ("reader.py", "bulk_decode.py", "batch.py", "format.py", "tags.py", "run_arrays.py", "runs.py",
                 "types.py", "pyramid.py")


class CacheError(Exception):
    """An entry that must not be served: missing, from other versions, truncated or corrupted."""


def _source_hash(paths: list[Path]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


_versions: dict[str, str] = {}


def reader_version() -> str:
    """Hash of the run store's code: any change to how event files become arrays invalidates every entry."""
    if "reader" not in _versions:
        here = Path(__file__).parent
        _versions["reader"] = _source_hash([here / name for name in _READ_MODULES])
    return _versions["reader"]


def detector_version() -> str:
    """Hash of the detector's code: a report cached by another detector is computed again."""
    if "detector" not in _versions:
        _versions["detector"] = _source_hash(list((Path(__file__).parent / "detect").glob("*.py")))
    return _versions["detector"]


def _crc(data: bytes | memoryview | np.ndarray) -> int:
    if isinstance(data, np.ndarray):
        data = memoryview(np.ascontiguousarray(data)).cast("B")
    return _crc32c.crc32c(data)


def file_identity(path: str) -> dict:
    """What says an event file is still the one a cache entry was built from: size, modification stamp (mtime, or
    the etag / modification time fsspec reports for remote files) and a hash of its first block."""
    from .reader import _local, is_remote

    if is_remote(path):
        from .remote import filesystem, read_range

        fs, fpath = filesystem(path)
        info = fs.info(fpath)
        stamp = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "updated") if info.get(k)), "")
        size = int(info["size"])
        head = read_range(fs, fpath, 0, HEAD_BLOCK)
    else:
        local = _local(path)
        stat = os.stat(local)
        size, stamp = stat.st_size, str(stat.st_mtime_ns)
        with open(local, "rb") as handle:
            head = handle.read(HEAD_BLOCK)
    return {"path": path, "size": size, "stamp": stamp, "head": hashlib.blake2b(head, digest_size=16).hexdigest(),
            "head_bytes": len(head)}


def still_there(identity: dict) -> bool:
    """Whether an event file still starts with the bytes it had when its identity was taken (it may have grown)."""
    from .reader import _local, is_remote

    path, n = identity["path"], int(identity["head_bytes"])
    try:
        if is_remote(path):
            from .remote import filesystem, read_range

            fs, fpath = filesystem(path)
            size = int(fs.info(fpath)["size"])
            head = read_range(fs, fpath, 0, n)
        else:
            size = os.path.getsize(_local(path))
            with open(_local(path), "rb") as handle:
                head = handle.read(n)
    except FileNotFoundError:
        return False
    return size >= int(identity["size"]) and hashlib.blake2b(head, digest_size=16).hexdigest() == identity["head"]


def default_cache_dir() -> str:
    """The user's cache directory for this package (``~/.cache/tb_gradient_plugin`` on Linux)."""
    import platformdirs

    return platformdirs.user_cache_dir("tb_gradient_plugin", appauthor=False)


def memory_budget(flag_mb: float | None = None) -> int:
    """The memory budget in bytes: the flag, else ``TB_GRADIENT_MEMORY_MB``, else :data:`DEFAULT_MEMORY_MB`."""
    value: Any = flag_mb if flag_mb is not None else os.environ.get(ENV_MEMORY_MB) or DEFAULT_MEMORY_MB
    try:
        mb = float(value)
    except ValueError:
        logger.warning("gradients plugin: %s=%r is not a number of MB; using %d", ENV_MEMORY_MB, value,
                       DEFAULT_MEMORY_MB)
        mb = DEFAULT_MEMORY_MB
    return max(0, int(mb * 1024 * 1024))


# ------------------------------------------------------------------------------------------------------ one entry


class Entry:
    """The cache entry of one run (a directory named by a hash of the logdir and run name)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._index: dict[str, dict] = {}
        self._verified: set[tuple[int, str]] = set()  # (arrays file inode, array) checked in this process
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer at a time: the run store and the report thread

    # ------------------------------------------------------------------------------------------------------ write

    def write(self, *, state: bytes, arrays: Mapping[str, np.ndarray], files: list[dict], data_version: int) -> None:
        """Write the whole entry; the manifest last, so a crash in between leaves an entry that fails its checks."""
        with self._write_lock:
            self._write(state, arrays, files, data_version)

    def _write(self, state: bytes, arrays: Mapping[str, np.ndarray], files: list[dict], data_version: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.path / _MANIFEST).unlink(missing_ok=True)
        (self.path / _REPORT).unlink(missing_ok=True)
        index: dict[str, dict] = {}
        tmp = self.path / (_ARRAYS + ".tmp")
        with open(tmp, "wb") as handle:
            offset = 0
            for name, array in arrays.items():
                array = np.ascontiguousarray(array)
                value = _constant(array)
                if value is not None:  # e.g. a healthy run's non-finite counts, a mask of every step logged
                    index[name] = {"const": value.hex(), "dtype": array.dtype.str, "shape": list(array.shape),
                                   "crc": _crc(value)}
                    continue
                pad = -offset % _ALIGN
                handle.write(b"\0" * pad)
                offset += pad
                view = memoryview(array).cast("B") if array.size else b""
                handle.write(view)
                index[name] = {"offset": offset, "dtype": array.dtype.str, "shape": list(array.shape),
                               "crc": _crc(view)}
                offset += array.nbytes
        os.replace(tmp, self.path / _ARRAYS)
        self._write_file(_STATE, state)
        with self._lock:
            self._index = index
        self._write_manifest({"arrays": index, "arrays_bytes": offset, "state_crc": _crc(state), "files": files,
                              "data_version": data_version})

    def write_report(self, report: Any, data_version: int) -> None:
        """Add the detector's report on the entry's data (written once per data version)."""
        with self._write_lock:
            self._write_report(report, data_version)

    def _write_report(self, report: Any, data_version: int) -> None:
        manifest = self._read_manifest()
        if manifest["data_version"] != data_version:
            return  # the entry holds newer data than the report describes
        body = pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)
        self._write_file(_REPORT, body)
        manifest["report"] = {"crc": _crc(body), "detector": detector_version()}
        self._write_manifest(manifest)

    def _write_file(self, name: str, body: bytes) -> None:
        tmp = self.path / (name + ".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, self.path / name)

    def _write_manifest(self, body: dict) -> None:
        body = {**body, "format": CACHE_FORMAT_VERSION, "reader": reader_version()}
        text = json.dumps(body, sort_keys=True)
        self._write_file(_MANIFEST, json.dumps({"body": body, "crc": _crc(text.encode())}).encode())

    # ------------------------------------------------------------------------------------------------------- read

    def _read_manifest(self) -> dict:
        try:
            doc = json.loads((self.path / _MANIFEST).read_bytes())
            body = doc["body"]
            if _crc(json.dumps(body, sort_keys=True).encode()) != doc["crc"]:
                raise CacheError("manifest checksum mismatch")
        except FileNotFoundError:
            raise CacheError("no entry") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"unreadable manifest: {exc}") from None
        if body.get("format") != CACHE_FORMAT_VERSION or body.get("reader") != reader_version():
            raise CacheError("written by another version")
        return body

    def load(self, resident: Iterator[str] | None = None) -> tuple[dict, Any, dict[str, np.ndarray], Any]:
        """(manifest, unpickled state, the named small arrays read into memory, report or None); CacheError if the
        entry must not be served. The big arrays are only checked for size here (see :meth:`mapped`)."""
        manifest = self._read_manifest()
        path = self.path / _ARRAYS
        try:
            if path.stat().st_size != manifest["arrays_bytes"]:
                raise CacheError("arrays file truncated")
            state_bytes = (self.path / _STATE).read_bytes()
        except FileNotFoundError:
            raise CacheError("entry incomplete") from None
        if _crc(state_bytes) != manifest["state_crc"]:
            raise CacheError("state checksum mismatch")
        with self._lock:
            self._index = manifest["arrays"]
        state = pickle.loads(state_bytes)
        names = list(resident) if resident is not None else state.get("resident", [])
        arrays = self.read(names)
        report = None
        meta = manifest.get("report")
        if meta is not None and meta.get("detector") == detector_version():
            try:
                body = (self.path / _REPORT).read_bytes()
            except FileNotFoundError:
                body = b""
            if _crc(body) == meta["crc"]:
                report = pickle.loads(body)
        return manifest, state, arrays, report

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        """Arrays read into memory (checked against their checksums)."""
        out = {}
        with open(self.path / _ARRAYS, "rb") as handle:
            for name in names:
                meta = self._meta(name)
                if "const" in meta:
                    out[name] = np.array(_constant_view(meta))
                    continue
                handle.seek(meta["offset"])
                count = int(np.prod(meta["shape"], dtype=np.int64))
                array = np.fromfile(handle, dtype=np.dtype(meta["dtype"]), count=count).reshape(meta["shape"])
                if array.size != count or _crc(array) != meta["crc"]:
                    raise CacheError(f"array {name!r} is corrupted")
                out[name] = array
        return out

    def mapped(self, names: list[str], index: dict[str, dict], inode: int) -> dict[str, np.ndarray]:
        """Read-only memory maps of the named arrays, as described by ``index`` for the arrays file ``inode`` (an
        entry rewritten since is refused). Each array is checked against its checksum on its first use in this
        process, by a read of the file rather than through the map, so that the check keeps no page resident."""
        out = {}
        path = self.path / _ARRAYS
        try:
            if path.stat().st_ino != inode:
                raise CacheError("the entry was rewritten")
        except FileNotFoundError:
            raise CacheError("the entry was removed") from None
        for name in names:
            meta = index.get(name)
            if meta is None:
                raise CacheError(f"no array {name!r} in the entry")
            if "const" in meta:
                out[name] = _constant_view(meta)
                continue
            dtype = np.dtype(meta["dtype"])
            shape = tuple(meta["shape"])
            key = (inode, name)
            if key not in self._verified:
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if _file_crc(path, meta["offset"], nbytes) != meta["crc"]:
                    raise CacheError(f"array {name!r} is corrupted")
                with self._lock:
                    self._verified.add(key)
            if int(np.prod(shape, dtype=np.int64)) == 0:
                out[name] = np.zeros(shape, dtype=dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=meta["offset"], shape=shape)
        return out

    def snapshot(self) -> tuple[dict[str, dict], int]:
        """The array index and the arrays file's inode as last written or loaded (see :meth:`mapped`)."""
        with self._lock:
            index = dict(self._index)
        try:
            return index, (self.path / _ARRAYS).stat().st_ino
        except FileNotFoundError:
            return index, -1

    def names(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def _meta(self, name: str) -> dict:
        meta = self._index.get(name)
        if meta is None:
            raise CacheError(f"no array {name!r} in the entry")
        return meta

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


#: Arrays at least this large are stored as one value when every entry holds it (bit for bit).
CONSTANT_MIN_ELEMENTS = 4096


def _constant(array: np.ndarray) -> bytes | None:
    """The bytes of the one value every entry of a large array holds, or None. A sample of the entries rules out
    almost every array that is not constant before the full comparison, which is then of raw bytes (so NaN
    payloads and signed zeros count as different values)."""
    if array.size < CONSTANT_MIN_ELEMENTS or array.dtype.hasobject:
        return None
    raw = array.reshape(-1).view(np.dtype(f"V{array.dtype.itemsize}"))
    first = raw[:1]
    if not (raw[::997] == first).all() or not (raw == first).all():
        return None
    return first.tobytes()


def _constant_view(meta: dict) -> np.ndarray:
    """A read-only array of the entry's shape that repeats its one value (no memory per entry)."""
    value = bytes.fromhex(meta["const"])
    if _crc(value) != meta["crc"]:
        raise CacheError("a constant array's value is corrupted")
    one = np.frombuffer(value, dtype=np.dtype(meta["dtype"]))
    return np.broadcast_to(one.reshape((1,) * len(meta["shape"])), tuple(meta["shape"]))


def _file_crc(path: Path, offset: int, nbytes: int) -> int:
    crc = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        left = nbytes
        while left > 0:
            block = handle.read(min(left, 16 << 20))
            if not block:
                return -1
            crc = _crc32c.crc32c(block, crc)
            left -= len(block)
    return crc


# ------------------------------------------------------------------------------------------------ the whole cache


class RunCache:
    """A cache directory of entries, and the memory budget for the arrays mapped from them."""

    def __init__(self, root: str, memory_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.budget = _Budget(memory_budget() if memory_bytes is None else memory_bytes)

    @classmethod
    def open(cls, directory: str | None = None, memory_bytes: int | None = None) -> RunCache | None:
        """The cache at ``directory`` (else ``TB_GRADIENT_CACHE_DIR``, else the user's cache directory), or None when
        it is turned off or cannot be written: then the plugin keeps every run in memory, after one warning."""
        chosen = directory or os.environ.get(ENV_CACHE_DIR) or default_cache_dir()
        if chosen.strip().lower() == DISABLED:
            return None
        root = Path(os.path.expanduser(chosen)) / f"v{CACHE_FORMAT_VERSION}"
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            logger.warning("gradients plugin: the cache directory %s cannot be written (%s); working without the "
                           "cache, every run is read from its event files and kept in memory", chosen, exc)
            return None
        return cls(str(root), memory_bytes)

    def entry(self, logdir: str, run: str) -> Entry:
        key = hashlib.sha256(f"{logdir}\0{run}".encode()).hexdigest()[:32]
        return Entry(self.root / key[:2] / key)


class _Budget:
    """Least-recently-used set of mapped runs whose arrays together stay within ``max_bytes`` (one always fits)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._open: OrderedDict[int, tuple[CachedRun, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def touch(self, run: CachedRun, nbytes: int) -> None:
        evicted = []
        with self._lock:
            old = self._open.pop(id(run), None)
            if old is not None:
                self._bytes -= old[1]
            self._open[id(run)] = (run, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and len(self._open) > 1:
                _, (dropped, size) = self._open.popitem(last=False)
                self._bytes -= size
                evicted.append(dropped)
        for dropped in evicted:
            dropped.unmap()

    def forget(self, run: CachedRun) -> None:
        with self._lock:
            old = self._open.pop(id(run), None)
            if old is not None:
                self._bytes -= old[1]

    @property
    def mapped_bytes(self) -> int:
        return self._bytes


class CachedRun:
    """A run published from its cache entry: small facts in memory, full-resolution arrays mapped on first use."""

    def __init__(self, entry: Entry, budget: _Budget, big: list[str]) -> None:
        self.entry = entry
        self.budget = budget
        self.big = big
        self.index, self.inode = entry.snapshot()
        self._arrays: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def array(self, name: str) -> np.ndarray:
        """One mapped array (CacheError if the entry no longer holds it intact: the run must be read again)."""
        return self.arrays([name])[name]

    def arrays(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The named mapped arrays (all by default), each checked against its checksum when first mapped."""
        wanted = self.big if names is None else names
        with self._lock:
            missing = [name for name in wanted if name not in self._arrays]
            if missing:
                self._arrays.update(self.entry.mapped(missing, self.index, self.inode))
            found = {name: self._arrays[name] for name in wanted}
            nbytes = sum(a.nbytes for a in self._arrays.values())
        self.budget.touch(self, nbytes)
        return found

    def unmap(self) -> None:
        """Drop the maps (views handed to requests in progress keep theirs until they finish)."""
        with self._lock:
            self._arrays = {}

    def close(self) -> None:
        """No longer published: out of the budget; the maps go when the last request holding them ends."""
        self.budget.forget(self)


class _LazyMetrics(Mapping):
    """``RunData.layer_metrics`` of a cached run: names known up front, arrays mapped on first access."""

    def __init__(self, run: CachedRun, names: list[str]) -> None:
        self._run = run
        self._names = names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._run.array(f"metric/{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class CachedRunData(RunData):
    """A :class:`RunData` whose full-resolution arrays (``present``, ``layer_metrics``, ``histograms``) are memory maps
    of the cache entry, opened on first access and unmapped past the memory budget; everything else is in memory.

    Request handlers take a shallow copy (``copy.copy``) and read it like any RunData; only touched pages of the
    maps become resident, and only while the run is among the most recently used.
    """

    cached: CachedRun
    pyramids: dict[str, Any]

    @property  # type: ignore[override]
    def present(self) -> np.ndarray:
        cached = self.__dict__.get("cached")
        if cached is None:
            return self.__dict__["_present"]
        return cached.array("present")

    @present.setter
    def present(self, value: np.ndarray) -> None:
        self.__dict__["_present"] = value

    def update_ratio_available(self) -> bool:
        """Decided on the metric names alone: listing runs never maps their arrays."""
        names = set(self.layer_metrics)
        return "update_ratio" in names or {"update_norm", "param_norm"} <= names

    @property  # type: ignore[override]
    def histograms(self) -> np.ndarray | None:
        cached = self.__dict__.get("cached")
        if cached is None:
            return self.__dict__["_histograms"]
        return cached.array("histograms") if "histograms" in cached.big else None

    @histograms.setter
    def histograms(self, value: np.ndarray | None) -> None:
        self.__dict__["_histograms"] = value


def cached_run_data(facts: dict, resident: dict[str, np.ndarray], cached: CachedRun, pyramids: dict[str, Any],
                    batches: BatchIds) -> CachedRunData:
    """Build the published RunData of a cached run from its facts, in-memory arrays and the batch ids its reading
    state keeps."""
    from .types import Series

    series = {name: Series(resident[f"series/{name}/steps"], resident[f"series/{name}/values"])
              for name in facts["series"]}
    data = CachedRunData(name=facts["name"], source=facts["source"], layers=list(facts["layers"]),
                         steps=resident["steps"], series=series, hist_steps=resident["hist_steps"],
                         warnings=list(facts["warnings"]), unknown_tags=list(facts["unknown_tags"]),
                         events=facts["events"], bytes_read=facts["bytes_read"],
                         first_wall_time=facts["first_wall_time"], last_wall_time=facts["last_wall_time"],
                         batches=batches)
    data.layer_metrics = _LazyMetrics(cached, list(facts["metrics"]))  # type: ignore[assignment]
    data.cached = cached
    data.pyramids = pyramids
    return data
