"""Framework-free writer: numpy statistics in, TensorBoard event files out.

The PyTorch and Keras integrations compute the statistics; this module only validates them and hands them to the
format module. It needs neither TensorFlow nor torch, and can write into a file the user already has open (a
``torch.utils.tensorboard.SummaryWriter`` or a TensorBoard ``EventFileWriter``) so our data lands in the user's run.
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2

from . import format as fmt
from .reader import masked_crc32c

#: The full layer list is repeated in the metadata this often (in events per tag), so that a corrupt record costs at
#: most this many steps of attribution rather than the rest of the file.
LAYOUT_REPEAT_EVERY = 1000


def _as_vector(name: str, value: Any, n: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} values for {n} layers")
    return arr


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _as_float(name: str, value: Any) -> float:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size != 1:
        raise ValueError(f"{name} must be a single number, got shape {arr.shape}")
    return float(arr.reshape(-1)[0])


def _as_ids(value: Any) -> np.ndarray:
    """A step's sample ids as an int64 vector: integers only (a float id is almost always a mix-up with a label)."""
    arr = np.asarray(value)
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"batch ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


class LogdirError(OSError):
    """The logdir cannot hold our event file (it is a file, or not writable): raised at construction, before any
    training step, with one message that says which."""


def _event_file_name(serial: int, suffix: str) -> str:
    """A name no other writer can choose: TensorBoard's prefix (so every loader finds the file), then a component that
    torch, tensorboardX, ``tf.summary`` and Keras never write (they end in a plain counter, or ``.v2``), our
    per-process serial and a random token (two hosts with the same name and pid)."""
    return (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
            f".gradients-{serial}-{secrets.token_hex(3)}{suffix}")


def _open_exclusive(logdir: str, serial: int, suffix: str) -> tuple[str, int]:
    """Create our file with O_EXCL (never append to a file another writer opened), under a new name if one exists."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise LogdirError(f"logdir {logdir!r} is a file, not a directory: pass a directory for the event files")
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as e:
        raise LogdirError(f"cannot create logdir {logdir!r}: {e.strerror}") from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = os.path.join(logdir, _event_file_name(serial, suffix))
        try:
            return path, os.open(path, flags, 0o644)
        except FileExistsError:
            continue
        except OSError as e:
            raise LogdirError(f"cannot write an event file in {logdir!r}: {e.strerror}") from None
    raise LogdirError(f"cannot find a free event file name in {logdir!r}")


class EventFile:
    """A minimal event-file writer: TFRecord framing into a buffer, written out every ``flush_secs``.

    TensorBoard's own ``EventFileWriter`` imports TensorFlow when it is installed (for ``tf.io.gfile``), which costs
    seconds and hundreds of MB in a PyTorch job; this one needs only the protos. Training never sees an I/O error
    from it: the first failed write (a full disk) truncates the file back to its last whole record, warns once and
    stops writing, so what was written stays readable. A forked child (a DataLoader worker) writes nothing: its copy
    of the buffer belongs to the parent.
    """

    _counter = 0
    _counter_lock = threading.Lock()

    #: a buffer this large is written out at once rather than at the next flush
    FLUSH_BYTES = 1 << 20

    def __init__(self, logdir: str, flush_secs: float = 2.0, filename_suffix: str = "") -> None:
        with EventFile._counter_lock:
            EventFile._counter += 1
            serial = EventFile._counter
        self.path, self._fd = _open_exclusive(logdir, serial, filename_suffix)
        self._pid = os.getpid()
        self._buffer = bytearray()
        self._written = 0  # bytes of whole records on disk
        self._failed = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()
        self._thread = threading.Thread(target=self._flush_loop, args=(flush_secs,), daemon=True,
                                        name="tb-gradient-flush")
        self._thread.start()

    @property
    def failed(self) -> bool:
        """True once a write failed: later records are dropped."""
        return self._failed

    def add_event(self, event: event_pb2.Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        record = b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                           struct.pack("<I", masked_crc32c(data))))
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._fd < 0:
                raise RuntimeError("event file is closed")
            if self._failed:
                return
            self._buffer += record
            if len(self._buffer) >= self.FLUSH_BYTES:
                self._write_out()

    def _flush_loop(self, flush_secs: float) -> None:
        while not self._closed.wait(flush_secs):
            self.flush()

    def _write_out(self) -> None:
        """Write the buffer (lock held). On an error, cut the file back to its last whole record and stop."""
        if not self._buffer or self._failed or self._fd < 0:
            return
        view = memoryview(self._buffer)
        try:
            done = 0
            while done < len(view):
                done += os.write(self._fd, view[done:])
            self._written += done
        except OSError as e:
            self._failed = True
            try:
                os.ftruncate(self._fd, self._written)
            except OSError:
                pass
            warnings.warn(f"tb_gradient_plugin: writing {self.path} failed ({e.strerror or e}); gradient logging "
                          f"stops for this file and training goes on. The {self._written} bytes written before stay "
                          "readable.", RuntimeWarning, stacklevel=2)
        finally:
            view.release()
            self._buffer.clear()

    def flush(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._write_out()

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        self._closed.set()
        with self._lock:
            if self._fd >= 0:
                self._write_out()
                os.close(self._fd)
                self._fd = -1


class GradientWriter:
    """Writes per-layer gradient statistics as our TensorBoard summaries.

    ``GradientWriter(logdir)`` opens its own event file (flushed every ``flush_secs``, on close and at exit), or
    ``GradientWriter(writer=summary_writer)`` appends to an existing writer's file.
    """

    def __init__(
        self,
        logdir: str | os.PathLike | None = None,
        *,
        writer: Any = None,
        flush_secs: float = 2.0,
        filename_suffix: str = "",
    ) -> None:
        if (logdir is None) == (writer is None):
            raise ValueError("pass exactly one of logdir or writer")
        self._owns_target = writer is None
        if writer is None:
            self._target = EventFile(os.fspath(logdir), flush_secs=flush_secs, filename_suffix=filename_suffix)
            self.logdir = os.fspath(logdir)
        else:
            self._target = self._event_target(writer)
            get_logdir = getattr(writer, "get_logdir", None)
            self.logdir = get_logdir() if callable(get_logdir) else getattr(writer, "_logdir", None)
        self._flush_secs = flush_secs
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._layouts: dict[tuple[str, ...], str] = {}  # validated layer lists -> layout id
        self._defined: dict[str, tuple[str, int]] = {}  # tag -> (layout id, events since the list was written)
        self._closed = False
        self._pid = os.getpid()
        self._warned_fork = False
        self._finalizer = weakref.finalize(self, GradientWriter._flush_target, self._target, self._owns_target)
        atexit.register(self._finalizer)

    @staticmethod
    def _event_target(writer: Any) -> Any:
        """The object whose ``add_event`` appends to the user's file (SummaryWriter, FileWriter or EventFileWriter)."""
        get_fw = getattr(writer, "_get_file_writer", None)
        if callable(get_fw):
            writer = get_fw()
        if hasattr(writer, "add_event"):
            return writer
        raise TypeError(
            f"cannot write into {type(writer).__name__}: expected a torch SummaryWriter, FileWriter or EventFileWriter"
        )

    @staticmethod
    def _flush_target(target: Any, owns: bool) -> None:
        try:
            if owns:
                target.close()
            else:
                target.flush()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass

    # ------------------------------------------------------------------------------------------------------- writing

    def write(
        self,
        step: int,
        layers: Sequence[str],
        *,
        grad_norm: Any = None,
        param_norm: Any = None,
        update_norm: Any = None,
        grad_max_abs: Any = None,
        nonfinite_count: Any = None,
        total_grad_norm: Any = None,
        loss: Any = None,
        lr: Any = None,
        loss_scale: Any = None,
        step_skipped: Any = None,
        guard_action: Any = None,
        clip_threshold: Any = None,
        exp_avg_norm: Any = None,
        exp_avg_sq_norm: Any = None,
        batch_ids: Any = None,
        epoch: Any = None,
        batch_index: Any = None,
        wall_time: float | None = None,
    ) -> None:
        """Record one logged step. Every metric is optional; per-layer ones hold one value per entry of ``layers``.

        ``batch_ids``: the integer ids of the step's samples (dataset indices), so a finding can name its batch;
        where those are unknown, ``epoch`` and ``batch_index`` (within the epoch) say which batch it was.

        ``layers`` may differ from step to step (a layer frozen at this step is simply left out): values are always
        attributed through the layer list given with them.
        """
        per_layer = {
            "grad_norm": grad_norm,
            "param_norm": param_norm,
            "update_norm": update_norm,
            "grad_max_abs": grad_max_abs,
            "nonfinite_count": nonfinite_count,
            "exp_avg_norm": exp_avg_norm,
            "exp_avg_sq_norm": exp_avg_sq_norm,
        }
        step = _check_step(step)
        names = self._check_layers(layers)
        arrays = [(m, _as_vector(m, data, len(names))) for m, data in per_layer.items() if data is not None]
        scalars = [fmt.scalar_value(m, _as_float(m, data))
                   for m, data in (("loss", loss), ("total_grad_norm", total_grad_norm)) if data is not None]
        extras = {"lr": lr, "loss_scale": loss_scale, "step_skipped": step_skipped, "guard_action": guard_action,
                  "clip_threshold": clip_threshold, "epoch": epoch, "batch_index": batch_index}
        scalars += [fmt.step_value(m, _as_float(m, data)) for m, data in extras.items() if data is not None]
        if batch_ids is not None:
            scalars.append(fmt.batch_ids_value(_as_ids(batch_ids)))
        self._emit(step, wall_time, names, arrays, scalars)

    def write_histograms(
        self, step: int, layers: Sequence[str], counts: Any, *, wall_time: float | None = None
    ) -> None:
        """Record per-layer gradient histograms on the format's fixed bins (``counts``: ``[layers, HIST_BINS]``)."""
        step = _check_step(step)
        names = self._check_layers(layers)
        arr = np.asarray(counts)
        if arr.shape != (len(names), fmt.HIST_BINS):
            raise ValueError(f"histogram counts must have shape ({len(names)}, {fmt.HIST_BINS}), got {arr.shape}")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError("histogram counts must be finite and non-negative")
        self._emit(step, wall_time, names, [(fmt.HISTOGRAM_METRIC, arr.astype(np.int64))], [])

    def _check_layers(self, layers: Sequence[str]) -> tuple[str, ...]:
        if self._closed:
            raise RuntimeError("GradientWriter is closed")
        names = tuple(layers)
        if not all(isinstance(n, str) for n in names):
            raise TypeError("layer names must be strings")
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique within a step")
        return names

    def _emit(self, step: int, wall_time: float | None, names: tuple[str, ...], arrays: list, scalars: list) -> None:
        """Write one event. Which tags get the full layer list is decided under the lock and remembered only once
        the event is written, so a failed write can never leave a layout marked as defined when it is not."""
        if not arrays and not scalars:
            return
        if os.getpid() != self._pid:
            self._forked_write()
            return
        with self._lock:
            layout = self._layouts.get(names)
            if layout is None:
                if len(self._layouts) >= 64:
                    self._layouts.clear()
                layout = self._layouts[names] = fmt.layout_id(names)
            defined = {}
            values = []
            for metric, array in arrays:
                tag = fmt.tag_for(metric)
                known, count = self._defined.get(tag, (None, 0))
                define = known != layout or count >= LAYOUT_REPEAT_EVERY
                defined[tag] = (layout, 1 if define else count + 1)
                values.append(fmt.layer_value(metric, array, layout, names if define else None))
            event = fmt.make_event(step, time.time() if wall_time is None else wall_time, values + scalars)
            self._target.add_event(event)
            self._defined.update(defined)
            if not self._owns_target and time.monotonic() - self._last_flush >= self._flush_secs:
                self._target.flush()
                self._last_flush = time.monotonic()

    def _forked_write(self) -> None:
        """A forked child (a DataLoader worker) shares the parent's file and buffers: it writes nothing, and says so
        once, since logging from a worker is almost always a monitor that was meant for the main process."""
        if not self._warned_fork:
            self._warned_fork = True
            warnings.warn(f"tb_gradient_plugin: a GradientWriter opened in process {self._pid} is used from forked "
                          f"process {os.getpid()}; records from the child are dropped (the parent's file is left "
                          "intact). Log from the main process.", RuntimeWarning, stacklevel=4)

    # ----------------------------------------------------------------------------------------------------- lifecycle

    def flush(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._target.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush; close the event file if this writer opened it (a borrowed writer stays open for its owner)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        atexit.unregister(self._finalizer)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def path(self) -> str | None:
        """Our own event file, or None when writing into another writer's file."""
        return self._target.path if self._owns_target else None

    def __enter__(self) -> GradientWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
