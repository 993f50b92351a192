"""The plugin's data layer: the run store read in the background and refreshed incrementally, detector reports kept
up to date per run, and a byte-bounded cache of finished responses.

The routes in ``plugin.py`` ask this layer for a run's data and report and never wait for a read of the logdir in
progress (see :class:`Backend`). Like ``plugin.py`` (TensorBoard's entry point imports both), this module imports
only what TensorBoard itself has already loaded; the run store and detector are imported on first use.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Any

logger = logging.getLogger(__name__)

#: A burst of requests triggers at most one incremental read of the logdir per this many seconds.
REFRESH_SECONDS = 1.0
#: A request for one run waits at most this long for the first read to reach that run.
FIRST_LOAD_SECONDS = 120.0
CACHE_BYTES = 256 * 1024 * 1024
#: A live run whose full detection takes at least this much CPU time gets an online detector (docs/CACHE.md): caught
#: up once in the background, it then judges only the steps appended. Below it a full detection per change is cheap.
LIVE_DETECT_SECONDS = 0.25


class UnknownRunError(LookupError):
    """No run of that name (the routes answer 404 with this message)."""


class _LRU:
    """A byte-bounded LRU cache (entries carry their own size estimate)."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self._max = max_bytes
            while self._bytes > self._max:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def put(self, key: Any, value: Any, size: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self._max:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self._max:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


def parse_logdir_spec(spec: str) -> dict[str, str]:
    """TensorBoard's ``--logdir_spec`` (``name:path,path2,...``) as name -> path for the run store.

    Mirrors TensorBoard's own parser: ``scheme://`` URLs, paths starting with ``/`` and Windows drives are paths. An
    unnamed group gets the empty name (its runs are named as under ``--logdir``, as TensorBoard names them); a second
    unnamed group is named by its path, so that no group is lost.
    """
    result: dict[str, str] = {}
    for item in spec.split(","):
        if not item:
            continue
        if _URI.match(item) is None and ":" in item and item[0] != "/" and not os.path.splitdrive(item)[0]:
            name, _, path = item.partition(":")
        else:
            name, path = "", item
        if _URI.match(path) is None:
            path = os.path.realpath(os.path.expanduser(path))
        result[name if name or "" not in result else path] = path
    return result


_URI = re.compile(r"[a-zA-Z][0-9a-zA-Z.]*://.*")


class Backend:
    """The plugin's view of the logdir: a run store refreshed incrementally and a cache of finished responses.

    TensorBoard serves requests on many threads. A burst of requests causes at most one incremental read per
    ``REFRESH_SECONDS``, done by the request that finds it due; while it reads, the other requests do not wait for
    it: they are answered from the last complete state of each run, which the run store swaps in run by run as each
    read finishes. The very first read starts in the background when TensorBoard loads the plugin, so a large logdir
    is being read before the tab is opened; while it runs, the run list answers with the runs read so far (marked
    ``loading``) and a request for one run waits only until that run is read.
    """

    def __init__(self, logdir: str | None, spec: dict[str, str] | None = None, *, reload: bool = True,
                 cache_dir: str | None = None, memory_mb: float | None = None) -> None:
        self._logdir = logdir or ""
        self._spec = spec or None
        self._reload = reload
        self._cache_dir = cache_dir  # None: TB_GRADIENT_CACHE_DIR, else the user's cache directory ("off": none)
        self._memory_mb = memory_mb
        self._lock = threading.Lock()  # guards the reports and the warm-up thread; never held during a read
        self._refresh_lock = threading.Lock()  # held by the one thread reading the logdir
        self._store: Any = None
        self._refreshed_at = -math.inf
        self._loaded = threading.Event()
        self._warmup: threading.Thread | None = None
        self._error: str | None = None
        self._active = False
        self.cache = _LRU(CACHE_BYTES)
        self._reports: dict[str, tuple[int, Any]] = {}  # run -> (data version it was computed on, Report)
        self._report_locks: dict[str, threading.Lock] = {}
        self._revalidating: set[str] = set()
        self._live: dict[str, Any] = {}  # run -> LiveDetector caught up with it (used by _recompute only)
        self._catching_up: set[str] = set()
        self._offline_only: set[str] = set()  # runs the online detector cannot judge as the offline one does
        #: how live runs' reports were made: incremental (online detector), offline (full detection), catch_up
        #: (online detectors caught up), fallback (data that did not only append: judged offline, detector dropped)
        self.live_stats = {"incremental": 0, "offline": 0, "catch_up": 0, "fallback": 0}

    @property
    def configured(self) -> bool:
        return bool(self._logdir or self._spec)

    def start(self) -> None:
        """Begin the first read of the logdir in the background (idempotent)."""
        with self._lock:
            if self._warmup is not None or not self.configured:
                return
            self._warmup = threading.Thread(target=self._warm, name="tb-gradient-warmup", daemon=True)
        self._warmup.start()

    def _warm(self) -> None:
        """First read, then the detector on every run, so that the tab opens on finished work."""
        self.refresh()
        for name, data, version in self.runs():
            try:
                self.report(name, data, version)
            except Exception:  # noqa: BLE001 - the request that needs it will report the error
                logger.exception("gradients plugin: detection failed for run %r", name)

    def _due(self) -> bool:
        return not self._loaded.is_set() or (self._reload and time.monotonic() - self._refreshed_at >= REFRESH_SECONDS)

    def refresh(self) -> None:
        """Read what is new in the logdir unless that was done less than ``REFRESH_SECONDS`` ago, or another thread is
        reading it right now (then the caller goes on with the last complete state instead of waiting)."""
        if not self.configured:
            self._loaded.set()
            return
        if not self._due() or not self._refresh_lock.acquire(blocking=not self._loaded.is_set()):
            return
        try:
            if not self._due():  # the first read, done by another thread while this one waited for it
                return
            try:
                if self._store is None:
                    from .cache import RunCache, memory_budget
                    from .runs import RunStore

                    # One budget: a quarter (at most CACHE_BYTES) for finished responses, the rest for mapped arrays.
                    budget = memory_budget(self._memory_mb)
                    responses = min(CACHE_BYTES, budget // 4)
                    self.cache.resize(responses)
                    cache = RunCache.open(self._cache_dir, budget - responses)
                    self._store = RunStore(self._logdir, spec=self._spec, cache=cache)
                    self._store.before_write = self._judge_before_write
                self._store.refresh(listed=self._listed)
            except Exception as exc:  # noqa: BLE001 - a bad file must not take TensorBoard down
                self._failed(exc)
            self._refreshed_at = time.monotonic()
            self._loaded.set()
        finally:
            self._refresh_lock.release()

    def _listed(self) -> None:
        """Every run is published: requests need not wait for the cache writes still in progress."""
        self._active = any(_has_data(data) for _, data, _ in self._store.snapshots())
        self._error = None
        self._loaded.set()

    def _judge_before_write(self, run: str) -> None:
        """A run about to be written to the cache is judged first (see ``RunStore.before_write``): its report goes
        into its entry, and the tab, which needs the report, does not wait for a detection slowed down by a write.
        Where another thread is judging it, the write does not wait (that thread may be waiting for the read the write
        is part of); its report reaches the entry when it is saved."""
        found = self._published(run)
        if found is not None:
            self.report(run, *found, wait=False)

    def _failed(self, exc: Exception) -> None:
        """Keep the reason the logdir cannot be read for the run list, and log it once, not at every refresh: a
        missing bucket or directory (an ``OSError`` whose message names it) as one line, anything else with its
        traceback."""
        message = f"reading the logdir failed: {exc}"
        if message != self._error:
            if isinstance(exc, OSError):
                logger.warning("gradients plugin: %s", message)
            else:
                logger.exception("gradients plugin: reading the logdir failed")
        self._error = message

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the read of the logdir in progress is done, the cache writes it started included (requests are
        answered before those: see :meth:`_listed`). False on timeout."""
        if not self._refresh_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._refresh_lock.release()
        return True

    def wait_loaded(self, timeout: float | None) -> bool:
        self.start()
        return self._loaded.wait(timeout)

    def is_active(self, timeout: float) -> bool:
        """Whether a run has data; during a first read longer than ``timeout``, whether a run read so far has."""
        if not self.wait_loaded(timeout):
            return any(_has_data(data) for _, data, _ in self.runs())
        self.refresh()
        return self._active

    @property
    def error(self) -> str | None:
        return self._error

    def runs(self) -> list[tuple[str, Any, int]]:
        """(name, RunData snapshot, version) of every run, in TensorBoard's order."""
        store = self._store
        if store is None:
            return []
        return [(name, _snapshot(data), version) for name, data, version in store.snapshots()]

    def run(self, name: str) -> tuple[Any, int]:
        """A run's data and version, or :class:`UnknownRunError`. The name is only ever compared with known run names.
        During the first read of the logdir, a run not read yet is waited for."""
        found = self._published(name)
        if found is None and not self._loaded.is_set():
            self.wait_loaded(FIRST_LOAD_SECONDS)
            found = self._published(name)
        if found is None:
            raise UnknownRunError(f"no run named {name[:200]!r}")
        data, version = self._checked(name, *found)
        return _snapshot(data), version

    def _checked(self, name: str, data: Any, version: int) -> tuple[Any, int]:
        """A run served from the cache, its arrays mapped and checked (on first use) before anything reads them; a
        damaged entry makes the run be read again from its event files, and that is what is served."""
        cached = data.__dict__.get("cached")
        if cached is None:
            return data, version
        from .cache import CacheError

        try:
            cached.arrays()
            return data, version
        except CacheError as exc:
            logger.warning("gradients plugin: cache entry of run %r is damaged (%s); reading the run again", name, exc)
        self._store.rebuild(name)
        found = self._published(name)
        if found is None:
            raise UnknownRunError(f"no run named {name[:200]!r}")
        return found

    def _published(self, name: str) -> tuple[Any, int] | None:
        store = self._store
        try:
            return None if store is None else store.snapshot(name)
        except KeyError:
            return None

    # ------------------------------------------------------------------------------------------------ detector reports

    def report(self, run: str, data: Any, version: int, *, wait: bool = True) -> tuple[Any, int] | None:
        """The detector's report on a run and the data version it describes.

        The detector reads the whole run (seconds on a 500-layer x 100k-step run), so while training appends steps
        the last report is served and a fresh one is computed in the background (one at a time per run); only a
        run's first report is computed while the request waits. A live run whose full detection is slow is judged
        incrementally once an online detector has caught up with it (:mod:`.live_report`). With ``wait=False``,
        None instead of waiting for another thread that is judging the run.
        """
        with self._lock:
            done = self._reports.get(run)
            run_lock = self._report_locks.setdefault(run, threading.Lock())
        if done is not None and done[0] >= version:
            return done[1], done[0]
        if done is not None:
            self._revalidate(run)
            return done[1], done[0]
        if not run_lock.acquire(blocking=wait):
            return None
        try:
            done = self._reports.get(run)
            if done is None or done[0] < version:
                stored = self._store.cached_report(run, version) if self._store is not None else None
                if stored is None:
                    data, version = self._checked(run, data, version)
                    with self.computing():
                        stored = _judge(data)
                    if self._store is not None:
                        self._store.save_report(run, version, stored)
                done = (version, stored)
                with self._lock:
                    self._reports[run] = max(done, self._reports.get(run, done), key=lambda d: d[0])
        finally:
            run_lock.release()
        return done[1], done[0]

    def computing(self) -> contextlib.AbstractContextManager:
        """Around work a user waits for (a detection, a response): cache writes wait until it is done (see
        :meth:`RunStore.hold_writes`)."""
        store = self._store
        return store.hold_writes() if store is not None else contextlib.nullcontext()

    def _revalidate(self, run: str) -> None:
        with self._lock:
            if run in self._revalidating:
                return
            self._revalidating.add(run)
        threading.Thread(target=self._recompute, args=(run,), name="tb-gradient-detect", daemon=True).start()

    def _recompute(self, run: str) -> None:
        try:
            while True:
                try:
                    data, version = self.run(run)
                except UnknownRunError:
                    return
                with self._lock:
                    done = self._reports.get(run)
                    if done is not None and done[0] >= version:
                        return
                report = self._incremental(run, data)
                if report is None:
                    started = time.thread_time()
                    with self.computing():
                        report = _judge(data)
                    with self._lock:
                        self.live_stats["offline"] += 1
                    if time.thread_time() - started >= LIVE_DETECT_SECONDS:
                        self._catch_up(run, data)
                self._store.save_report(run, version, report)
                with self._lock:
                    if version > self._reports.get(run, (-1, None))[0]:
                        self._reports[run] = (version, report)
        except Exception:  # noqa: BLE001 - keep serving the last good report
            logger.exception("gradients plugin: detection failed for run %r", run)
        finally:
            with self._lock:
                self._revalidating.discard(run)

    def _incremental(self, run: str, data: Any) -> Any:
        """The report from the run's online detector fed only what was appended, or None (then the caller judges the
        run offline): none caught up yet, or the data did not only append to what it was fed (it is dropped)."""
        with self._lock:
            live = self._live.get(run)
        if live is None:
            return None
        try:
            report = live.advance(data)
        except Exception:  # noqa: BLE001 - the offline detector judges it instead
            logger.exception("gradients plugin: online detection failed for run %r", run)
            live.broken = True
            report = None
        with self._lock:
            if report is not None:
                self.live_stats["incremental"] += 1
            elif live.broken:
                self._live.pop(run, None)
                self.live_stats["fallback"] += 1
        return report

    def _catch_up(self, run: str, data: Any) -> None:
        """Feed the run's history into a fresh online detector, in its own thread: until it is done, every change is
        judged offline as before."""
        with self._lock:
            if run in self._live or run in self._catching_up or run in self._offline_only:
                return
            self._catching_up.add(run)
        threading.Thread(target=self._feed_history, args=(run, data), name="tb-gradient-catch-up", daemon=True).start()

    def _feed_history(self, run: str, data: Any) -> None:
        from .live_report import LiveDetector

        try:
            live = LiveDetector(data.name, data.source)
            live.advance(data)
            with self._lock:
                if not live.broken:
                    self._live[run] = live
                    self.live_stats["catch_up"] += 1
                else:
                    self._offline_only.add(run)
        except Exception:  # noqa: BLE001 - the run stays judged offline
            logger.exception("gradients plugin: online detection failed for run %r", run)
            with self._lock:
                self._offline_only.add(run)
        finally:
            with self._lock:
                self._catching_up.discard(run)


def _snapshot(data: Any) -> Any:
    """A shallow copy: later refreshes may rebind the store's fields, the request keeps a consistent set of arrays
    (a cached run's arrays stay unmapped until the request reads them)."""
    return copy.copy(data)


def _has_data(data: Any) -> bool:
    return bool(data.layers) or any(name in data.series for name in ("loss", "total_grad_norm"))


def _judge(data: Any) -> Any:
    """The detector's report, or an empty one that says why: one run the detector chokes on must not take the run
    list (or the server) down with it."""
    from . import detect
    from .run_report import failed_report

    try:
        return detect.detect(data)
    except Exception as exc:  # noqa: BLE001
        logger.exception("detection failed on run %r", data.name)
        return failed_report(data.name, data.source, f"detection failed: {type(exc).__name__}: {exc}")
