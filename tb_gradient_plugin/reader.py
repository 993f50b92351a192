"""Fast, incremental, fault-tolerant reader of TensorBoard event files (local paths and fsspec URLs).

A TFRecord is ``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``. This reader

* verifies both CRCs with a C CRC32C (the ``crc32c`` package: hardware-accelerated where the CPU has it);
* remembers how far it got and on the next call reads only the bytes appended since (a growing file);
* treats an incomplete record at the end of the file as "not yet written" (it is retried, and reported only when the
  caller says the file is finished);
* notices when a file it has read from was replaced or truncated under the same name (a job restarted into the same
  directory, a copy tool rewriting it): the file is smaller than what was seen, or its first bytes (which hold the
  wall time at which the file was created) or a hash of the last block read differ, checked whenever it grew or its
  inode or modification time changed, and at every read where the filesystem keeps no modification time (a same-size
  rewrite there changes nothing else). It then reads nothing and says so in :attr:`RecordReader.replaced`; the caller
  decides how to start over;
* on a corrupt record reports the offset and the kind of damage, skips it (a record whose length checks out is skipped
  whole; a damaged length header is resynchronised by scanning forward for the next valid header), and keeps every
  intact record. It never allocates more than the bytes the file actually holds, and always makes progress.

Decoding of our own summaries goes through :mod:`tb_gradient_plugin.format`; ordinary scalars (``simple_value`` and
scalar tensors) are passed through for the run store to map other tools' tags.

Bulk decoding
-------------
A training run writes the same event over and over: the same tags, metadata and tensor shapes, only the step, the
wall time and the numbers change. Decoding each of 100,000 such events into protobuf objects and then one numpy array
per value costs seconds of Python. So consecutive records of equal length are decoded as a block: the first one is
decoded by protobuf as usual (the *general path*, which also settles what every value means), and a byte-level walk of
its wire format marks where its step, wall time and tensor payloads lie. Every further record of the block whose
other bytes are identical to the first one's parses, by construction of the wire format, into the same fields with
only those payloads changed, so its numbers are read straight out of the bytes with a few numpy operations per block.
A record that differs anywhere else, and any event the walk does not fully understand, takes the general path, so
the result is the same, value for value, as decoding every record with protobuf.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import crc32c as _crc32c
import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2, types_pb2

from . import format as fmt

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
#: Records longer than this are treated as damage (TensorBoard never writes one; a hostile length field might ask).
MAX_RECORD_BYTES = 256 * 1024 * 1024
#: How much is read from the file per call to ``read``: bounds memory on huge files.
CHUNK_BYTES = 32 * 1024 * 1024
#: Records of equal length checked at once when the reader finds a run of them.
RUN_AHEAD_WINDOW = 1024
#: Local reads at least this large go into a buffer reused from chunk to chunk.
REUSE_BUFFER_BYTES = 1024 * 1024
#: A block of equal records is bulk-decoded only when this many records follow its first one (below, the general
#: path is as quick).
MIN_BULK_RECORDS = 2
#: Records of one block tried as its first record before the rest of the block takes the general path.
MAX_TEMPLATE_TRIES = 3
#: Leading bytes remembered to recognise a file later: the first record's header and the start of its event, whose
#: first field is the wall time at which the file was created (two writers of the same file name differ there).
HEAD_BYTES = 64
#: the block at the end of what was read whose hash must not change while a file only grows
TAIL_BYTES = 4096
#: fsspec ``info`` keys that change when a file is written (the first one a filesystem gives is used).
_STAMP_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")


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


class Chunk(NamedTuple):
    """Intact records found in one read: ``buf[starts[i]:starts[i] + lengths[i]]`` is a record's data."""

    buf: bytes | memoryview
    base: int  # file offset of buf[0]
    starts: list[int]
    lengths: list[int]


class RecordReader:
    """Incremental TFRecord reader over one (possibly growing) file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0  # end of the last complete record consumed (or skipped)
        self.pending_bytes = 0  # bytes after ``offset`` that do not yet form a complete record
        self.problems: list[Problem] = []
        self.bytes_read = 0
        self.has_more = False  # the last read stopped at its byte limit, not at the end of the file
        #: Why the file is no longer the one read so far (replaced or truncated), or None.
        self.replaced: str | None = None
        self._buffer: memoryview | None = None  # reused for big reads while a file is read in several calls
        self._seen = 0  # the file's size at the last read
        self._head = b""  # its first HEAD_BYTES bytes (fewer while it is shorter)
        self._tail = b""  # a hash of the last TAIL_BYTES bytes before ``_seen``
        self._stamp: object = None  # what says the file was written to: (device, inode, mtime) or fsspec's mtime

    # ------------------------------------------------------------------------------------------------------- file io

    def _size_and_reader(self):
        if is_remote(self.path):
            import fsspec

            fs, fpath = fsspec.core.url_to_fs(self.path)
            info = fs.info(fpath)
            stamp = next((str(info[key]) for key in _STAMP_KEYS if info.get(key) is not None), None)

            def read(offset: int, n: int) -> bytes:
                with fs.open(fpath, "rb") as f:
                    f.seek(offset)
                    return f.read(n)

            return int(info["size"]), stamp, read
        local = _local(self.path)
        stat = os.stat(local)
        size = stat.st_size

        def read(offset: int, n: int) -> bytes | memoryview:
            with open(local, "rb") as f:
                f.seek(offset)
                if n < REUSE_BUFFER_BYTES or n > CHUNK_BYTES:
                    return f.read(n)
                # Big reads go into one buffer reused chunk after chunk: a fresh 32 MB object per chunk costs more
                # in page faults than the copy from the page cache itself.
                if self._buffer is None:
                    self._buffer = memoryview(bytearray(CHUNK_BYTES))
                return self._buffer[:f.readinto(self._buffer[:n])]

        return size, (stat.st_dev, stat.st_ino, stat.st_mtime_ns), read

    def _check_same_file(self, size: int, stamp: object, read) -> str | None:
        """Why the file at ``path`` is not the one read so far, or None.

        The first bytes decide, not the inode or modification time: a tool that syncs a growing file by writing a
        copy and renaming it over the old one (rsync) gives a new inode to the same content, which must go on from
        where it was. Costs a small read only when the file grew or its stamp changed.
        """
        if size < self._seen:
            return f"it shrank from {self._seen} to {size} bytes"
        if not self._head or (size == self._seen and stamp == self._stamp and stamp is not None):
            return None
        if bytes(read(0, len(self._head))) != self._head:
            return "its first bytes changed: it holds another file's content"
        if self._tail and self._tail_hash(read, self._seen) != self._tail:
            return "the bytes it had at the end of the last read changed: it was rewritten"
        return None

    @staticmethod
    def _tail_hash(read, end: int) -> bytes:
        start = max(0, end - TAIL_BYTES)
        return hashlib.blake2b(bytes(read(start, end - start)), digest_size=16).digest()

    def read_chunks(self, max_bytes: int | None = None) -> Iterator[Chunk]:
        """Yield the complete, intact records appended since the last call, a chunk of the file at a time.

        A chunk's buffer may be reused for the next chunk: take what is needed from it before asking for the next.

        With ``max_bytes`` the call stops after about that many bytes (at a chunk boundary) and sets ``has_more``;
        call again to go on.
        """
        self.has_more = False
        if self.replaced:
            return
        try:
            size, stamp, read = self._size_and_reader()
            if self._seen:
                self.replaced = self._check_same_file(size, stamp, read)
                if self.replaced:
                    return
            if len(self._head) < min(size, HEAD_BYTES):
                self._head = bytes(read(0, min(size, HEAD_BYTES)))
            if size != self._seen:
                self._tail = self._tail_hash(read, size)
        except FileNotFoundError:
            return
        self._stamp = stamp
        self._seen = size
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
            found, consumed, need = self._scan(buf, self.offset, size)
            if found.starts:
                yield found
            self.offset += consumed
            if consumed == 0:
                if need is None or self.offset + need > size:
                    break  # an incomplete record at the end: not yet written
                # one record is larger than a chunk: read exactly it (bounded by the file's real size)
                buf = read(self.offset, need)
                self.bytes_read += len(buf)
                found, consumed, _ = self._scan(buf, self.offset, size)
                if found.starts:
                    yield found
                if consumed == 0:
                    break
                self.offset += consumed
        self.pending_bytes = max(0, size - self.offset)
        if not self.has_more:
            self._buffer = None  # caught up: a growing file's later reads are small

    def read_records(self, max_bytes: int | None = None) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(offset, data)`` for each complete, intact record appended since the last call.

        ``data`` is a view into the read buffer: copy it to keep it past the next record.
        """
        for chunk in self.read_chunks(max_bytes):
            mv = memoryview(chunk.buf)
            for start, length in zip(chunk.starts, chunk.lengths, strict=True):
                yield chunk.base + start - 12, mv[start:start + length]

    def _scan(self, buf: bytes | memoryview, base: int, file_size: int) -> tuple[Chunk, int, int | None]:
        """Find the intact records in ``buf`` (which starts at file offset ``base``).

        Returns the chunk, the bytes consumed and, when nothing could be consumed, the bytes needed to go on.
        """
        mv = memoryview(buf)
        n = len(buf)
        pos = 0
        starts: list[int] = []
        lengths: list[int] = []
        unpack = _HEADER.unpack_from
        footer = _FOOTER.unpack_from
        crc = _crc32c.crc32c
        previous = -1
        while True:
            if n - pos < 12:
                need = 12 if pos == 0 and base + 12 <= file_size else None
                return Chunk(buf, base, starts, lengths), pos, need
            length, len_crc = unpack(buf, pos)
            c = crc(mv[pos:pos + 8])
            if (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF != len_crc:
                self._problem(base + pos, "bad_length_crc", "record length header fails its CRC; resynchronising")
                pos = self._resync(buf, mv, pos + 1, n)
                continue
            if length > MAX_RECORD_BYTES:
                self._problem(base + pos, "oversized_record", f"record claims {length} bytes; skipped as damage")
                pos = self._resync(buf, mv, pos + 1, n)
                continue
            end = pos + 16 + length
            if end > n:
                return Chunk(buf, base, starts, lengths), pos, (16 + length if pos == 0 else None)
            c = crc(mv[pos + 12:end - 4])
            if (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF != footer(buf, end - 4)[0]:
                self._problem(base + pos, "bad_data_crc", f"record of {length} bytes fails its data CRC; skipped")
            else:
                starts.append(pos + 12)
                lengths.append(length)
            if length == previous:
                end = self._run_ahead(np.frombuffer(buf, dtype=np.uint8), mv, base, pos, length, starts, lengths)
            previous = length
            pos = end

    def _run_ahead(self, arr: np.ndarray, mv: memoryview, base: int, pos: int, length: int, starts: list[int],
                   lengths: list[int]) -> int:
        """The records after the one at ``pos`` whose 12 header bytes are the very same (so the same length and a
        valid length CRC), a window at a time: the headers are compared as arrays and only the data CRCs are
        computed one by one. Returns where the records that are not alike begin."""
        stride = 16 + length
        head = arr[pos:pos + 12]
        p = pos + stride
        crc = _crc32c.crc32c
        while True:
            count = min(RUN_AHEAD_WINDOW, (len(arr) - p) // stride)
            if count < 1:
                return p
            same = (np.lib.stride_tricks.as_strided(arr[p:], (count, 12), (stride, 1)) == head).all(axis=1)
            k = count if same.all() else int(np.argmin(same))
            if k == 0:
                return p
            at = range(p + 12, p + 12 + k * stride, stride)
            crcs = np.fromiter((crc(mv[a:a + length]) for a in at), dtype=np.uint64, count=k)
            masked = (((crcs >> 15) | (crcs << 17)) + _MASK_DELTA) & 0xFFFFFFFF
            stored = np.lib.stride_tricks.as_strided(arr[p + 12 + length:], (k, 4), (stride, 1)).copy()
            good = masked == stored.view("<u4").reshape(k)
            if good.all():
                starts.extend(at)
                lengths.extend([length] * k)
            else:
                for a, ok in zip(at, good.tolist(), strict=True):
                    if ok:
                        starts.append(a)
                        lengths.append(length)
                    else:
                        self._problem(base + a - 12, "bad_data_crc",
                                      f"record of {length} bytes fails its data CRC; skipped")
            p += k * stride
            if k < count:
                return p

    @staticmethod
    def _resync(buf: bytes | memoryview, mv: memoryview, start: int, n: int) -> int:
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
    """What one :meth:`EventFileReader.read` decoded: one block per (metric, layout) and per scalar tag."""

    layer_blocks: list[LayerBlock] = field(default_factory=list)
    scalar_blocks: list[ScalarBlock] = field(default_factory=list)
    other_tags: set[str] = field(default_factory=set)  # tags seen that are neither ours nor scalars
    events: int = 0
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


class _Parts:
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


class _Collector:
    """Accumulates a batch's values by block key, then merges each key into one block in file order."""

    def __init__(self) -> None:
        self.layers: dict[tuple[str, str], tuple[tuple[str, ...], _Parts]] = {}
        self.scalars: dict[tuple[str, bool], _Parts] = {}
        self.other_tags: set[str] = set()
        self.events = 0

    def layer(self, metric: str, layout: str, layers: tuple[str, ...]) -> _Parts:
        entry = self.layers.get((metric, layout))
        if entry is None:
            entry = self.layers[(metric, layout)] = (layers, _Parts(np.stack))
        return entry[1]

    def scalar(self, tag: str, ours: bool) -> _Parts:
        parts = self.scalars.get((tag, ours))
        if parts is None:
            parts = self.scalars[(tag, ours)] = _Parts(_float64)
        return parts

    def batch(self) -> Batch:
        layer_blocks = [LayerBlock(metric, layers, parts.merged())
                        for (metric, _), (layers, parts) in self.layers.items() if parts]
        scalar_blocks = [ScalarBlock(tag, ours, *_join(parts.merged()))
                         for (tag, ours), parts in self.scalars.items() if parts]
        # Blocks in the order their first values were written: the run store takes first-seen layer order from it.
        layer_blocks.sort(key=lambda b: b.first_order)
        scalar_blocks.sort(key=lambda b: int(b.order[0]))
        return Batch(layer_blocks, scalar_blocks, self.other_tags, self.events)


class _NotBulk(Exception):
    """The first record of a block is not an event the bulk decoder fully understands."""


def _varint(b: bytes, p: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while p < end and shift < 64:
        byte = b[p]
        p += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, p
        shift += 7
    raise _NotBulk("bad varint")


def _fields(b: bytes, start: int, end: int, allowed: dict[int, int]) -> dict[int, list[tuple[int, int]]]:
    """Wire-format fields of one message: field number -> [(payload start, payload end)].

    Only the ``allowed`` fields (number -> wire type) may occur; anything else makes the event one for protobuf.
    """
    found: dict[int, list[tuple[int, int]]] = {}
    p = start
    while p < end:
        key, p = _varint(b, p, end)
        number, wire = key >> 3, key & 7
        if allowed.get(number) != wire:
            raise _NotBulk(f"field {number} of wire type {wire}")
        if wire == 0:
            q = _varint(b, p, end)[1]
        elif wire == 1:
            q = p + 8
        else:  # 2: length-delimited
            size, p = _varint(b, p, end)
            q = p + size
        if q > end:
            raise _NotBulk("field runs past its message")
        found.setdefault(number, []).append((p, q))
        p = q
    return found


def _once(found: dict[int, list[tuple[int, int]]], number: int, required: bool = False) -> tuple[int, int] | None:
    spans = found.get(number)
    if spans is None:
        if required:
            raise _NotBulk(f"field {number} missing")
        return None
    if len(spans) != 1:
        raise _NotBulk(f"field {number} repeated")  # protobuf would merge or take the last: leave that to it
    return spans[0]


# Wire layout of the messages the bulk decoder walks (field number -> wire type).
_EVENT_FIELDS = {1: 1, 2: 0, 5: 2}  # wall_time (double), step (int64), summary
_SUMMARY_FIELDS = {1: 2}  # value (repeated)
_VALUE_FIELDS = {1: 2, 8: 2, 9: 2}  # tag, tensor, metadata
_TENSOR_FIELDS = {1: 0, 2: 2, 4: 2}  # dtype, tensor_shape, tensor_content


class _Bulk(NamedTuple):
    """How a value of the block's events decodes: its payload's place in the record and where its values go."""

    start: int  # byte offset of the tensor_content payload in the record
    count: int  # float32 values in it
    parts: _Parts
    scalar: bool  # one number (a series point) rather than a per-layer vector


class _Template(NamedTuple):
    """What bulk decoding of records equal to a block's first one needs: the bytes that must match, where the step,
    wall time and payloads are, and what each value means."""

    length: int
    fixed: tuple[tuple[int, int, np.ndarray], ...]  # (start, end, bytes): spans every record must share with the first
    wall: int | None  # offset of the wall_time double (None: not written, 0.0)
    step: tuple[int, int] | None  # (offset, length) of the step varint (None: not written, 0)
    values: tuple[_Bulk, ...]


def _template(data: bytes, described: list[tuple[_Parts, bool] | None]) -> _Template:
    """Walk one event's wire format and mark its variable bytes; raise :class:`_NotBulk` for anything unexpected.

    ``described`` says, per summary value, where the general path put that value (and whether it is one number).
    """
    n = len(data)
    event = _fields(data, 0, n, _EVENT_FIELDS)
    wall, step = _once(event, 1), _once(event, 2)
    summary = _once(event, 5, required=True)
    if step is not None and step[1] - step[0] > 9:
        raise _NotBulk("negative or overlong step")  # a 10-byte varint: leave its edge cases to protobuf
    value_spans = _fields(data, *summary, _SUMMARY_FIELDS).get(1, [])
    if len(value_spans) != len(described):
        raise _NotBulk("summary values do not match the decoded ones")
    variable = np.zeros(n, dtype=bool)
    if wall is not None:
        variable[wall[0]:wall[1]] = True
    if step is not None:
        variable[step[0]:step[1]] = True
    values = []
    for span, desc in zip(value_spans, described, strict=True):
        if desc is None:
            raise _NotBulk("a value the bulk decoder cannot take")
        tensor = _once(_fields(data, *span, _VALUE_FIELDS), 8, required=True)
        content = _once(_fields(data, *tensor, _TENSOR_FIELDS), 4, required=True)
        parts, scalar = desc
        size = content[1] - content[0]
        if size % 4 or (scalar and size != 4):
            raise _NotBulk("payload size")
        variable[content[0]:content[1]] = True
        values.append(_Bulk(content[0], size // 4, parts, scalar))
    edges = np.flatnonzero(np.diff(np.concatenate(([True], variable, [True])).astype(np.int8)))
    whole = np.frombuffer(data, dtype=np.uint8)
    fixed = tuple((a, b, whole[a:b].copy()) for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))
    return _Template(n, fixed, None if wall is None else wall[0],
                     None if step is None else (step[0], step[1] - step[0]), tuple(values))


class EventFileReader:
    """Reads one event file incrementally and decodes what it holds.

    ``layouts`` maps layout ids to layer lists; share one dict between the files of a run so a layout defined in
    one file is known in the next (ids are content hashes, so sharing cannot misattribute).
    """

    def __init__(self, path: str, layouts: dict[str, tuple[str, ...]] | None = None, *, bulk: bool = True) -> None:
        self.records = RecordReader(path)
        self.layouts = layouts if layouts is not None else {}
        #: Bulk-decode runs of equal records (see the module doc); False decodes every record with protobuf.
        self.bulk = bulk
        self.bulk_records = 0  # records decoded in bulk so far (the rest took the general path)
        self._meta_cache: dict[bytes, fmt.Metadata] = {}
        self._scalar_tags: set[str] = set()  # tags whose first event declared the scalars plugin
        self._lost_layouts: set[str] = set()

    @property
    def path(self) -> str:
        return self.records.path

    @property
    def problems(self) -> list[Problem]:
        return self.records.problems

    @property
    def replaced(self) -> str | None:
        """Why the file is no longer the one read so far (see :attr:`RecordReader.replaced`), or None."""
        return self.records.replaced

    def read(self, max_bytes: int | None = None) -> Batch:
        """Decode the complete records appended since the last call (about ``max_bytes`` of them at most).

        With a limit, ``batch.has_more`` says whether to call again: bounded batches keep a large file's decoded
        values from piling up in memory before the caller has folded them into its arrays.
        """
        out = _Collector()
        known = len(self.problems)
        for chunk in self.records.read_chunks(max_bytes):
            self._decode_chunk(chunk, out)
        if len(self.problems) - known > 1:  # bulk decoding visits a block's odd records last: report in file order
            self.problems[known:] = sorted(self.problems[known:], key=lambda p: p.offset)
        batch = out.batch()
        batch.has_more = self.records.has_more
        return batch

    # ----------------------------------------------------------------------------------------------- bulk decoding

    def _decode_chunk(self, chunk: Chunk, out: _Collector) -> None:
        buf, base = chunk.buf, chunk.base
        mv = memoryview(buf)
        starts, lengths = chunk.starts, chunk.lengths
        if not self.bulk or len(starts) <= MIN_BULK_RECORDS:
            for start, length in zip(starts, lengths, strict=True):
                self._decode_record(base + start, mv[start:start + length], out, False)
            return
        s = np.asarray(starts, dtype=np.int64)
        n = np.asarray(lengths, dtype=np.int64)
        # blocks: consecutive records of equal length, adjacent in the buffer (no damaged record between them)
        cuts = np.flatnonzero((n[1:] != n[:-1]) | (s[1:] != s[:-1] + n[:-1] + 16)) + 1
        array = np.frombuffer(buf, dtype=np.uint8)
        for a, b in itertools.pairwise([0, *cuts.tolist(), len(starts)]):
            i = a
            while i < b:
                start, length = starts[i], lengths[i]
                want = b - i - 1 >= MIN_BULK_RECORDS and i - a < MAX_TEMPLATE_TRIES
                template = self._decode_record(base + start, mv[start:start + length], out, want)
                i += 1
                if template is not None:
                    self._decode_block(template, array, base, s[i:b], mv, out)
                    break

    def _decode_block(self, t: _Template, array: np.ndarray, base: int, starts: np.ndarray, mv: memoryview,
                      out: _Collector) -> None:
        """Records equal to the template's first one outside its variable bytes: their values in a few array
        operations. The others take the general path."""
        rows = np.lib.stride_tricks.as_strided(array[int(starts[0]):], shape=(len(starts), t.length),
                                               strides=(t.length + 16, 1), writeable=False)
        ok = np.ones(len(starts), dtype=bool)
        for a, b, expect in t.fixed:
            ok &= (rows[:, a:b] == expect).all(axis=1)
        if t.step is not None:
            at, size = t.step
            varint = rows[:, at:at + size].astype(np.uint64)
            more = (varint & 0x80) != 0
            ok &= more[:, :-1].all(axis=1) & ~more[:, -1]  # exactly one varint of this length
            steps = np.zeros(len(starts), dtype=np.uint64)
            for k in range(size):
                steps |= (varint[:, k] & np.uint64(0x7F)) << np.uint64(7 * k)
            steps = steps.view(np.int64)
        else:
            steps = np.zeros(len(starts), dtype=np.int64)
        take = slice(None) if ok.all() else np.flatnonzero(ok)
        steps = steps[take]
        count = len(steps)
        if count:
            out.events += count
            self.bulk_records += count
            if t.wall is not None:
                walls = rows[take, t.wall:t.wall + 8].copy().view("<f8").reshape(count)
            else:
                walls = np.zeros(count, dtype=np.float64)
            offsets = base + starts[take]
            for j, value in enumerate(t.values):
                # a copy (never a view of the read buffer, which it would keep alive)
                numbers = rows[take, value.start:value.start + 4 * value.count].copy().view("<f4")
                if value.scalar:
                    numbers = numbers[:, 0].astype(np.float64)
                value.parts.add_piece(Piece(steps, walls, numbers, offsets + j))
        for k in np.flatnonzero(~ok).tolist():
            start = int(starts[k])
            self._decode_record(base + start, mv[start:start + t.length], out, False)

    # ------------------------------------------------------------------------------------------------ general path

    def _decode_record(self, at: int, data: memoryview, out: _Collector, want_template: bool) -> _Template | None:
        """Decode one record with protobuf; with ``want_template``, also return its bulk template if it has one.

        ``at`` is the file offset of the record's data; a value's position in the file orders it (``at + index``
        stays inside the record, since every summary value takes at least two bytes).
        """
        offset = at - 12
        try:
            event = event_pb2.Event.FromString(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            self.records._problem(offset, "bad_event", f"record is not a valid Event proto ({exc})")
            return None
        out.events += 1
        if event.WhichOneof("what") != "summary":
            return None
        known = len(self.problems)
        described = self._decode_summary(offset, at, event, out, want_template)
        if not want_template or len(self.problems) != known or not described or None in described:
            return None
        try:
            return _template(bytes(data), described)
        except _NotBulk:
            return None

    def _metadata(self, content: bytes) -> fmt.Metadata:
        meta = self._meta_cache.get(content)
        if meta is None:
            meta = fmt.decode_metadata_content(content)
            if len(self._meta_cache) < 4096:
                self._meta_cache[content] = meta
        return meta

    def _decode_summary(self, offset: int, at: int, event: event_pb2.Event, out: _Collector, describe: bool
                        ) -> list[tuple[_Parts, bool] | None]:
        """Decode every value; with ``describe``, say per value where it went and whether records like it can be
        bulk-decoded (None where not)."""
        step, wall = int(event.step), float(event.wall_time)
        described: list[tuple[_Parts, bool] | None] = []
        for index, value in enumerate(event.summary.value):
            tag = value.tag
            desc = None
            try:
                if fmt.is_ours(value):
                    desc = self._decode_ours(offset, at + index, step, wall, value, out, describe)
                elif fmt.is_scalar(value) or tag in self._scalar_tags:
                    declared = value.HasField("metadata") and value.metadata.plugin_data.plugin_name == "scalars"
                    if declared:
                        self._scalar_tags.add(tag)
                    metric = fmt.metric_of(tag)
                    ours = metric in fmt.SCALAR_METRICS
                    parts = out.scalar(metric if ours else tag, ours)
                    parts.add(at + index, step, wall, fmt.scalar_of(value))
                    # Declared in the value itself, it is a scalar whatever came before: a state-free decode.
                    desc = (parts, True) if describe and declared and _packed_f32(value.tensor, 0) else None
                else:
                    out.other_tags.add(tag)
            except (ValueError, RecursionError, MemoryError, OverflowError) as exc:  # FormatError is a ValueError
                self.records._problem(offset, "bad_summary", f"tag {tag!r} at step {step}: {exc}")
            described.append(desc)
        return described

    def _decode_ours(self, offset: int, order: int, step: int, wall: float, value, out: _Collector, describe: bool
                     ) -> tuple[_Parts, bool] | None:
        meta = self._metadata(value.metadata.plugin_data.content)
        metric = fmt.metric_of(value.tag)
        if metric is None:
            raise fmt.FormatError("unknown metric under the gradients plugin")
        if metric in fmt.STEP_METRICS:
            parts = out.scalar(metric, True)
            parts.add(order, step, wall, fmt.tensor_scalar(value.tensor))
            return (parts, True) if describe and _packed_f32(value.tensor, 0) else None
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
            return None
        if metric == fmt.HISTOGRAM_METRIC:
            arr = fmt.tensor_to_numpy(value.tensor)
            if arr.shape != (len(layers), fmt.HIST_BINS):
                raise fmt.FormatError(f"histogram shape {arr.shape} does not match a layout of {len(layers)} layers")
            out.layer(metric, meta.layout, layers).add(order, step, wall, arr)
            return None
        arr = fmt.layer_vector(value.tensor, len(layers))
        parts = out.layer(metric, meta.layout, layers)
        parts.add(order, step, wall, arr)
        return (parts, False) if describe and _packed_f32(value.tensor, 1) else None

    def finish(self) -> None:
        self.records.finish()


def _packed_f32(tensor, rank: int) -> bool:
    """Whether the tensor's values are exactly its ``tensor_content`` read as little-endian float32 (what our writer
    emits): then records that differ from it only in those bytes decode to those bytes, the bulk decoder's premise."""
    dims = tensor.tensor_shape.dim
    if tensor.dtype != types_pb2.DT_FLOAT or len(dims) != rank:
        return False
    count = dims[0].size if rank else 1
    return len(tensor.tensor_content) == 4 * count
