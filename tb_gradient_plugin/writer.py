"""Framework-free writer: numpy statistics in, TensorBoard event files out.

The PyTorch and Keras integrations compute the statistics; this module only validates them and hands them to the
format module. It needs neither TensorFlow nor torch, and can write into a file the user already has open (a
``torch.utils.tensorboard.SummaryWriter`` or a TensorBoard ``EventFileWriter``) so our data lands in the user's run.
"""

from __future__ import annotations

import atexit
import os
import socket
import struct
import threading
import time
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


class EventFile:
    """A minimal event-file writer: TFRecord framing, a background flush every ``flush_secs``.

    TensorBoard's own ``EventFileWriter`` imports TensorFlow when it is installed (for ``tf.io.gfile``), which costs
    seconds and hundreds of MB in a PyTorch job; this one needs only the protos.
    """

    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self, logdir: str, flush_secs: float = 2.0, filename_suffix: str = "") -> None:
        with EventFile._counter_lock:
            EventFile._counter += 1
            serial = EventFile._counter
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{serial}"
        self.path = os.path.join(logdir, name + filename_suffix)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()
        self._thread = threading.Thread(target=self._flush_loop, args=(flush_secs,), daemon=True,
                                        name="tb-gradient-flush")
        self._thread.start()

    def add_event(self, event: event_pb2.Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        record = b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                           struct.pack("<I", masked_crc32c(data))))
        with self._lock:
            if self._file.closed:
                raise RuntimeError("event file is closed")
            self._file.write(record)

    def _flush_loop(self, flush_secs: float) -> None:
        while not self._closed.wait(flush_secs):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                self._file.close()


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
            os.makedirs(os.fspath(logdir), exist_ok=True)
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
        wall_time: float | None = None,
    ) -> None:
        """Record one logged step. Every metric is optional; per-layer ones hold one value per entry of ``layers``.

        ``layers`` may differ from step to step (a layer frozen at this step is simply left out): values are always
        attributed through the layer list given with them.
        """
        per_layer = {
            "grad_norm": grad_norm,
            "param_norm": param_norm,
            "update_norm": update_norm,
            "grad_max_abs": grad_max_abs,
            "nonfinite_count": nonfinite_count,
        }
        step = _check_step(step)
        names = self._check_layers(layers)
        arrays = [(m, _as_vector(m, data, len(names))) for m, data in per_layer.items() if data is not None]
        scalars = [fmt.scalar_value(m, _as_float(m, data))
                   for m, data in (("loss", loss), ("total_grad_norm", total_grad_norm)) if data is not None]
        extras = {"lr": lr, "loss_scale": loss_scale, "step_skipped": step_skipped, "guard_action": guard_action}
        scalars += [fmt.step_value(m, _as_float(m, data)) for m, data in extras.items() if data is not None]
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

    # ----------------------------------------------------------------------------------------------------- lifecycle

    def flush(self) -> None:
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

    def __enter__(self) -> GradientWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
