"""Bulk decoding of runs of equal event records: the reader's fast path for our own files.

A training run writes the same event over and over: the same tags, metadata and tensor shapes, only the step, the
wall time and the numbers change. Decoding each of 100,000 such events into protobuf objects and then one numpy array
per value costs seconds of Python. So consecutive records of equal length are decoded as a block: the first one is
decoded by protobuf as usual (the *general path*, which also settles what every value means), and a byte-level walk of
its wire format marks where its step, wall time and tensor payloads lie. Every further record of the block whose
other bytes are identical to the first one's parses, by construction of the wire format, into the same fields with
only those payloads changed, so its numbers are read straight out of the bytes with a few numpy operations per block.
A record that differs anywhere else, and any event the walk does not fully understand, takes the general path, so
the result is the same, value for value, as decoding every record with protobuf.

:class:`tb_gradient_plugin.reader.EventFileReader` drives it: :func:`equal_blocks` finds the blocks of a chunk,
:func:`template_of` walks a block's first record once the general path has decoded it, and :func:`decode_block`
reads the rest of the block.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
from tensorboard.compat.proto import types_pb2

from .batch import Parts, Piece

#: A block of equal records is bulk-decoded only when this many records follow its first one (below, the general
#: path is as quick).
MIN_BULK_RECORDS = 2
#: Records of one block tried as its first record before the rest of the block takes the general path.
MAX_TEMPLATE_TRIES = 3


#: What a value of a bulk-decoded record is: one float32 (a series point), a float32 vector (one value per layer) or an
#: int64 vector (a batch's sample ids).
SCALAR, VECTOR, IDS = "scalar", "vector", "ids"
_DTYPES = {SCALAR: np.dtype("<f4"), VECTOR: np.dtype("<f4"), IDS: np.dtype("<i8")}


def packed_i64(tensor) -> bool:
    """Whether a rank-1 tensor's values are exactly its ``tensor_content`` read as little-endian int64 (how our writer
    stores sample ids), the premise of bulk-decoding it like :func:`packed_f32`."""
    dims = tensor.tensor_shape.dim
    return (tensor.dtype == types_pb2.DT_INT64 and len(dims) == 1
            and len(tensor.tensor_content) == 8 * dims[0].size)


def packed_f32(tensor, rank: int) -> bool:
    """Whether the tensor's values are exactly its ``tensor_content`` read as little-endian float32 (what our writer
    emits): then records that differ from it only in those bytes decode to those bytes, the bulk decoder's premise."""
    dims = tensor.tensor_shape.dim
    if tensor.dtype != types_pb2.DT_FLOAT or len(dims) != rank:
        return False
    count = dims[0].size if rank else 1
    return len(tensor.tensor_content) == 4 * count


def equal_blocks(starts: np.ndarray, lengths: list[int]) -> list[tuple[int, int]]:
    """``[a, b)`` index ranges of consecutive records of equal length, adjacent in the buffer (no damaged record
    between them), given each record's data offset in the buffer and its length."""
    n = np.asarray(lengths, dtype=np.int64)
    cuts = np.flatnonzero((n[1:] != n[:-1]) | (starts[1:] != starts[:-1] + n[:-1] + 16)) + 1
    return list(itertools.pairwise([0, *cuts.tolist(), len(lengths)]))


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
    count: int  # values in it
    parts: Parts
    kind: str  # SCALAR, VECTOR or IDS


class Template(NamedTuple):
    """What bulk decoding of records equal to a block's first one needs: the bytes that must match, where the step,
    wall time and payloads are, and what each value means."""

    length: int
    fixed: tuple[tuple[int, int, np.ndarray], ...]  # (start, end, bytes): spans every record must share with the first
    wall: int | None  # offset of the wall_time double (None: not written, 0.0)
    step: tuple[int, int] | None  # (offset, length) of the step varint (None: not written, 0)
    values: tuple[_Bulk, ...]


def _walk(data: bytes, described: list[tuple[Parts, str] | None]) -> Template:
    """Walk one event's wire format and mark its variable bytes; raise :class:`_NotBulk` for anything unexpected."""
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
        parts, kind = desc
        size, itemsize = content[1] - content[0], _DTYPES[kind].itemsize
        if size % itemsize or (kind == SCALAR and size != 4):
            raise _NotBulk("payload size")
        variable[content[0]:content[1]] = True
        values.append(_Bulk(content[0], size // itemsize, parts, kind))
    edges = np.flatnonzero(np.diff(np.concatenate(([True], variable, [True])).astype(np.int8)))
    whole = np.frombuffer(data, dtype=np.uint8)
    fixed = tuple((a, b, whole[a:b].copy()) for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))
    return Template(n, fixed, None if wall is None else wall[0],
                    None if step is None else (step[0], step[1] - step[0]), tuple(values))


def template_of(data: bytes, described: list[tuple[Parts, str] | None]) -> Template | None:
    """The bulk template of one record the general path has decoded, or None when records like it must take the
    general path too.

    ``described`` says, per summary value, where the general path put that value and what it is (:data:`SCALAR`,
    :data:`VECTOR` or :data:`IDS`).
    """
    try:
        return _walk(data, described)
    except _NotBulk:
        return None


def decode_block(t: Template, array: np.ndarray, base: int, starts: np.ndarray) -> tuple[int, list[int]]:
    """Records equal to the template's first one outside its variable bytes: their values in a few array operations,
    added to where the template's values go.

    ``array`` is the read buffer (file offset ``base``), ``starts`` the data offsets of the block's records after
    its first one. Returns how many records were decoded, and the starts of the others (for the general path).
    """
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
        if t.wall is not None:
            walls = rows[take, t.wall:t.wall + 8].copy().view("<f8").reshape(count)
        else:
            walls = np.zeros(count, dtype=np.float64)
        offsets = base + starts[take]
        for j, value in enumerate(t.values):
            # a copy (never a view of the read buffer, which it would keep alive)
            dtype = _DTYPES[value.kind]
            numbers = rows[take, value.start:value.start + dtype.itemsize * value.count].copy().view(dtype)
            if value.kind == SCALAR:
                numbers = numbers[:, 0].astype(np.float64)
            value.parts.add_piece(Piece(steps, walls, numbers, offsets + j))
    return count, starts[~ok].tolist()
