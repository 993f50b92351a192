"""Fast, incremental, fault-tolerant reader of TensorBoard event files (local paths and fsspec URLs).

A TFRecord is ``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``. This reader

* verifies both CRCs with a C CRC32C (the ``crc32c`` package: hardware-accelerated where the CPU has it);
* remembers how far it got and on the next call reads only the bytes appended since (a growing file);
* treats an incomplete record at the end of the file as "not yet written" (it is retried, and reported only when the
  caller says the file is finished);
* on a corrupt record reports the offset and the kind of damage, skips it (a record whose length checks out is skipped
  whole; a damaged length header is resynchronised by scanning forward for the next valid header), and keeps every
  intact record. It never allocates more than the bytes the file actually holds, and always makes progress.

Decoding of our own summaries goes through :mod:`tb_gradient_plugin.format`; ordinary scalars (``simple_value`` and
scalar tensors) are passed through for the run store to map other tools' tags.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import crc32c as _crc32c
import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2

from . import format as fmt

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
#: Records longer than this are treated as damage (TensorBoard never writes one; a hostile length field might ask).
MAX_RECORD_BYTES = 256 * 1024 * 1024
#: How much is read from the file per call to ``read``: bounds memory on huge files.
CHUNK_BYTES = 32 * 1024 * 1024


def masked_crc32c(data: bytes | memoryview) -> int:
    crc = _crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


@dataclass(frozen=True)
class Problem:
    """Damage found in a file: where, what kind, and a message a user can act on."""

    path: str
    offset: int
    #: one of bad_length_crc, bad_data_crc, oversized_record, bad_event, bad_summary, unknown_layout, truncated
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}@{self.offset}: {self.message}"


class RecordReader:
    """Incremental TFRecord reader over one (possibly growing) file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0  # end of the last complete record consumed (or skipped)
        self.pending_bytes = 0  # bytes after ``offset`` that do not yet form a complete record
        self.problems: list[Problem] = []
        self.bytes_read = 0
        self.has_more = False  # the last read stopped at its byte limit, not at the end of the file

    # ------------------------------------------------------------------------------------------------------- file io

    def _size_and_reader(self):
        if is_remote(self.path):
            import fsspec

            fs, fpath = fsspec.core.url_to_fs(self.path)
            size = fs.size(fpath)

            def read(offset: int, n: int) -> bytes:
                with fs.open(fpath, "rb") as f:
                    f.seek(offset)
                    return f.read(n)

            return size, read
        local = _local(self.path)
        size = os.stat(local).st_size

        def read(offset: int, n: int) -> bytes:
            with open(local, "rb") as f:
                f.seek(offset)
                return f.read(n)

        return size, read

    def read_records(self, max_bytes: int | None = None) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(offset, data)`` for each complete, intact record appended since the last call.

        ``data`` is a view into the read buffer: copy it to keep it past the next record. With ``max_bytes`` the
        call stops after about that many bytes (at a chunk boundary) and sets ``has_more``; call again to go on.
        """
        self.has_more = False
        try:
            size, read = self._size_and_reader()
        except FileNotFoundError:
            return
        start = self.offset
        chunk = CHUNK_BYTES if max_bytes is None else max(1, min(CHUNK_BYTES, max_bytes))
        while self.offset < size:
            if max_bytes is not None and self.offset - start >= max_bytes:
                self.has_more = True
                break
            buf = read(self.offset, min(size - self.offset, chunk))
            if not buf:
                break
            self.bytes_read += len(buf)
            consumed, need = yield from self._parse(buf, self.offset, size)
            self.offset += consumed
            if consumed == 0:
                if need is None or self.offset + need > size:
                    break  # an incomplete record at the end: not yet written
                # one record is larger than a chunk: read exactly it (bounded by the file's real size)
                buf = read(self.offset, need)
                self.bytes_read += len(buf)
                consumed, _ = yield from self._parse(buf, self.offset, size)
                if consumed == 0:
                    break
                self.offset += consumed
        self.pending_bytes = max(0, size - self.offset)

    def _parse(self, buf: bytes, base: int, file_size: int):
        """Parse records in ``buf`` (which starts at file offset ``base``); return (bytes consumed, bytes needed)."""
        mv = memoryview(buf)
        n = len(buf)
        pos = 0
        while True:
            if n - pos < 12:
                return pos, (12 if pos == 0 and base + 12 <= file_size else None)
            length, len_crc = _HEADER.unpack_from(buf, pos)
            if masked_crc32c(mv[pos:pos + 8]) != len_crc:
                self._problem(base + pos, "bad_length_crc", "record length header fails its CRC; resynchronising")
                pos = self._resync(buf, mv, pos + 1, n)
                continue
            if length > MAX_RECORD_BYTES:
                self._problem(base + pos, "oversized_record", f"record claims {length} bytes; skipped as damage")
                pos = self._resync(buf, mv, pos + 1, n)
                continue
            end = pos + 12 + length + 4
            if end > n:
                if pos == 0:
                    return 0, 12 + length + 4
                return pos, None
            data = mv[pos + 12:pos + 12 + length]
            (data_crc,) = _FOOTER.unpack_from(buf, pos + 12 + length)
            if masked_crc32c(data) != data_crc:
                self._problem(base + pos, "bad_data_crc", f"record of {length} bytes fails its data CRC; skipped")
            else:
                yield base + pos, data
            pos = end

    @staticmethod
    def _resync(buf: bytes, mv: memoryview, start: int, n: int) -> int:
        """First offset >= start whose 12 bytes form a valid length header (or the end of what is buffered)."""
        unpack = _HEADER.unpack_from
        for p in range(start, n - 11):
            length, len_crc = unpack(buf, p)
            if length <= MAX_RECORD_BYTES and masked_crc32c(mv[p:p + 8]) == len_crc:
                return p
        return max(start, n - 11)

    def _problem(self, offset: int, kind: str, message: str) -> None:
        self.problems.append(Problem(self.path, offset, kind, message))

    def finish(self) -> None:
        """Declare the file complete: an incomplete tail is now reported as truncation."""
        if self.pending_bytes:
            self._problem(self.offset, "truncated", f"file ends inside a record ({self.pending_bytes} bytes unread)")


# ---------------------------------------------------------------------------------------------------------- decoding


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


@dataclass
class Batch:
    layer_records: list[LayerRecord] = field(default_factory=list)
    scalars: list[ScalarRecord] = field(default_factory=list)
    other_tags: set[str] = field(default_factory=set)  # tags seen that are neither ours nor scalars
    events: int = 0
    has_more: bool = False


class EventFileReader:
    """Reads one event file incrementally and decodes what it holds.

    ``layouts`` maps layout ids to layer lists; share one dict between the files of a run so a layout defined in
    one file is known in the next (ids are content hashes, so sharing cannot misattribute).
    """

    def __init__(self, path: str, layouts: dict[str, tuple[str, ...]] | None = None) -> None:
        self.records = RecordReader(path)
        self.layouts = layouts if layouts is not None else {}
        self._meta_cache: dict[bytes, fmt.Metadata] = {}
        self._scalar_tags: set[str] = set()  # tags whose first event declared the scalars plugin
        self._lost_layouts: set[str] = set()

    @property
    def path(self) -> str:
        return self.records.path

    @property
    def problems(self) -> list[Problem]:
        return self.records.problems

    def read(self, max_bytes: int | None = None) -> Batch:
        """Decode the complete records appended since the last call (about ``max_bytes`` of them at most).

        With a limit, ``batch.has_more`` says whether to call again: bounded batches keep a large file's decoded
        protos from piling up in memory before the caller has folded them into its arrays.
        """
        batch = Batch()
        for offset, data in self.records.read_records(max_bytes):
            try:
                event = event_pb2.Event.FromString(data)
            except (DecodeError, RecursionError, ValueError) as exc:
                self.records._problem(offset, "bad_event", f"record is not a valid Event proto ({exc})")
                continue
            batch.events += 1
            if event.WhichOneof("what") == "summary":
                self._decode_summary(offset, event, batch)
        batch.has_more = self.records.has_more
        return batch

    def _metadata(self, content: bytes) -> fmt.Metadata:
        meta = self._meta_cache.get(content)
        if meta is None:
            meta = fmt.decode_metadata_content(content)
            if len(self._meta_cache) < 4096:
                self._meta_cache[content] = meta
        return meta

    def _decode_summary(self, offset: int, event: event_pb2.Event, batch: Batch) -> None:
        step, wall = int(event.step), float(event.wall_time)
        for value in event.summary.value:
            tag = value.tag
            try:
                if fmt.is_ours(value):
                    self._decode_ours(offset, step, wall, value, batch)
                elif fmt.is_scalar(value) or tag in self._scalar_tags:
                    if value.HasField("metadata") and value.metadata.plugin_data.plugin_name == "scalars":
                        self._scalar_tags.add(tag)
                    metric = fmt.metric_of(tag)
                    ours = metric in fmt.SCALAR_METRICS
                    batch.scalars.append(ScalarRecord(step, wall, metric if ours else tag, fmt.scalar_of(value), ours))
                else:
                    batch.other_tags.add(tag)
            except (ValueError, RecursionError, MemoryError, OverflowError) as exc:  # FormatError is a ValueError
                self.records._problem(offset, "bad_summary", f"tag {tag!r} at step {step}: {exc}")

    def _decode_ours(self, offset: int, step: int, wall: float, value, batch: Batch) -> None:
        meta = self._metadata(value.metadata.plugin_data.content)
        metric = fmt.metric_of(value.tag)
        if metric is None:
            raise fmt.FormatError("unknown metric under the gradients plugin")
        if metric in fmt.STEP_METRICS:
            batch.scalars.append(ScalarRecord(step, wall, metric, fmt.tensor_scalar(value.tensor), True))
            return
        if meta.layout is None:
            raise fmt.FormatError("per-layer summary without a layout id")
        if meta.layers is not None:
            self.layouts[meta.layout] = meta.layers
        layers = self.layouts.get(meta.layout)
        if layers is None:
            if meta.layout not in self._lost_layouts:
                self._lost_layouts.add(meta.layout)
                self.records._problem(
                    offset, "unknown_layout",
                    f"{value.tag} at step {step} refers to layout {meta.layout} whose layer list was lost "
                    "(damaged record); its values are dropped until the list is repeated",
                )
            return
        if metric == fmt.HISTOGRAM_METRIC:
            arr = fmt.tensor_to_numpy(value.tensor)
            if arr.shape != (len(layers), fmt.HIST_BINS):
                raise fmt.FormatError(f"histogram shape {arr.shape} does not match a layout of {len(layers)} layers")
        else:
            arr = fmt.layer_vector(value.tensor, len(layers))
        batch.layer_records.append(LayerRecord(step, wall, metric, layers, arr))

    def finish(self) -> None:
        self.records.finish()
