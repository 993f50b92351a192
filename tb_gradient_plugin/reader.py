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
scalar tensors) are passed through for the run store to map other tools' tags. Values are gathered into a
:class:`~tb_gradient_plugin.batch.Batch`. Runs of equal records of our own format skip protobuf: see
:mod:`tb_gradient_plugin.bulk_decode`; every other record takes the *general path* here.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import crc32c as _crc32c
import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2

from . import bulk_decode
from . import format as fmt
from .batch import Batch, Collector, LayerBlock, LayerRecord, Parts, Piece, ScalarBlock, ScalarRecord

# The batch types are part of this module's API (the run store and callers import them from here).
__all__ = ["Batch", "Chunk", "EventFileReader", "LayerBlock", "LayerRecord", "Piece", "Problem", "RecordReader",
           "ScalarBlock", "ScalarRecord", "is_remote", "masked_crc32c"]

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
#: Leading bytes remembered to recognise a file later: the first record's header and the start of its event, whose
#: first field is the wall time at which the file was created (two writers of the same file name differ there).
HEAD_BYTES = 64
#: the block at the end of what was read whose hash must not change while a file only grows
TAIL_BYTES = 4096
#: fsspec ``info`` keys that change when a file is written (the first one a filesystem gives is used; an object
#: store's ETag changes with every upload, its modification time only to the second).
_STAMP_KEYS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created")


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
            from . import remote

            # info comes from the run store's last (fresh) listing where there was one; a read is one ranged request
            fs, fpath = remote.filesystem(self.path)
            info = fs.info(fpath)
            stamp = next((str(info[key]) for key in _STAMP_KEYS if info.get(key) is not None), None)

            def read(offset: int, n: int) -> bytes:
                return remote.read_range(fs, fpath, offset, n)

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

    def changed(self) -> bool:
        """Whether the file's size or modification stamp differs from the last read (a read would find something,
        or find the file replaced): one ``stat``, no read. True for a file never read or gone."""
        try:
            size, stamp, _ = self._size_and_reader()
        except OSError:
            return True
        return self._stamp is None or size != self._seen or stamp != self._stamp

    def release_buffer(self) -> None:
        """Drop the reusable read buffer (it is recreated by the next big read)."""
        self._buffer = None

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


class EventFileReader:
    """Reads one event file incrementally and decodes what it holds.

    ``layouts`` maps layout ids to layer lists; share one dict between the files of a run so a layout defined in
    one file is known in the next (ids are content hashes, so sharing cannot misattribute).
    """

    def __init__(self, path: str, layouts: dict[str, tuple[str, ...]] | None = None, *, bulk: bool = True) -> None:
        self.records = RecordReader(path)
        self.layouts = layouts if layouts is not None else {}
        #: Bulk-decode runs of equal records (see :mod:`.bulk_decode`); False decodes every record with protobuf.
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
        out = Collector()
        known = len(self.problems)
        for chunk in self.records.read_chunks(max_bytes):
            self._decode_chunk(chunk, out)
        if len(self.problems) - known > 1:  # bulk decoding visits a block's odd records last: report in file order
            self.problems[known:] = sorted(self.problems[known:], key=lambda p: p.offset)
        batch = out.batch()
        batch.has_more = self.records.has_more
        return batch

    # ----------------------------------------------------------------------------------------------- bulk decoding

    def _decode_chunk(self, chunk: Chunk, out: Collector) -> None:
        buf, base = chunk.buf, chunk.base
        mv = memoryview(buf)
        starts, lengths = chunk.starts, chunk.lengths
        if not self.bulk or len(starts) <= bulk_decode.MIN_BULK_RECORDS:
            for start, length in zip(starts, lengths, strict=True):
                self._decode_record(base + start, mv[start:start + length], out, False)
            return
        s = np.asarray(starts, dtype=np.int64)
        array = np.frombuffer(buf, dtype=np.uint8)
        for a, b in bulk_decode.equal_blocks(s, lengths):
            i = a
            while i < b:
                start, length = starts[i], lengths[i]
                want = b - i - 1 >= bulk_decode.MIN_BULK_RECORDS and i - a < bulk_decode.MAX_TEMPLATE_TRIES
                template = self._decode_record(base + start, mv[start:start + length], out, want)
                i += 1
                if template is not None:
                    self._decode_block(template, array, base, s[i:b], mv, out)
                    break

    def _decode_block(self, t: bulk_decode.Template, array: np.ndarray, base: int, starts: np.ndarray,
                      mv: memoryview, out: Collector) -> None:
        """The records after a block's first one: in bulk where they match its template, else the general path."""
        count, others = bulk_decode.decode_block(t, array, base, starts)
        out.events += count
        self.bulk_records += count
        for start in others:
            self._decode_record(base + start, mv[start:start + t.length], out, False)

    # ------------------------------------------------------------------------------------------------ general path

    def _decode_record(self, at: int, data: memoryview, out: Collector, want_template: bool
                       ) -> bulk_decode.Template | None:
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
        return bulk_decode.template_of(bytes(data), described)

    def _metadata(self, content: bytes) -> fmt.Metadata:
        meta = self._meta_cache.get(content)
        if meta is None:
            meta = fmt.decode_metadata_content(content)
            if len(self._meta_cache) < 4096:
                self._meta_cache[content] = meta
        return meta

    def _decode_summary(self, offset: int, at: int, event: event_pb2.Event, out: Collector, describe: bool
                        ) -> list[tuple[Parts, bool] | None]:
        """Decode every value; with ``describe``, say per value where it went and whether records like it can be
        bulk-decoded (None where not)."""
        step, wall = int(event.step), float(event.wall_time)
        described: list[tuple[Parts, bool] | None] = []
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
                    bulk = describe and declared and bulk_decode.packed_f32(value.tensor, 0)
                    desc = (parts, bulk_decode.SCALAR) if bulk else None
                else:
                    out.other_tags.add(tag)
            except (ValueError, RecursionError, MemoryError, OverflowError) as exc:  # FormatError is a ValueError
                self.records._problem(offset, "bad_summary", f"tag {tag!r} at step {step}: {exc}")
            described.append(desc)
        return described

    def _decode_ours(self, offset: int, order: int, step: int, wall: float, value, out: Collector, describe: bool
                     ) -> tuple[Parts, bool] | None:
        meta = self._metadata(value.metadata.plugin_data.content)
        if value.tag == fmt.BATCH_IDS_TAG:
            out.batch_ids.add(order, step, wall, fmt.batch_ids(value.tensor))
            return (out.batch_ids, bulk_decode.IDS) if describe and bulk_decode.packed_i64(value.tensor) else None
        metric = fmt.metric_of(value.tag)
        if metric is None:
            raise fmt.FormatError("unknown metric under the gradients plugin")
        if metric in fmt.STEP_METRICS:
            parts = out.scalar(metric, True)
            parts.add(order, step, wall, fmt.tensor_scalar(value.tensor))
            return (parts, bulk_decode.SCALAR) if describe and bulk_decode.packed_f32(value.tensor, 0) else None
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
        return (parts, bulk_decode.VECTOR) if describe and bulk_decode.packed_f32(value.tensor, 1) else None

    def finish(self) -> None:
        self.records.finish()
