"""The reader on growing, truncated, corrupt and hostile files, local and through fsspec."""

from __future__ import annotations

import glob
import itertools
import os
import struct
from pathlib import Path

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_gradient_plugin.reader import EventFileReader, RecordReader, masked_crc32c
from tb_gradient_plugin.writer import GradientWriter

LAYERS = ["conv1", "conv2", "fc"]


def _write_run(logdir, steps: int = 40) -> str:
    with GradientWriter(logdir) as w:
        for s in range(steps):
            w.write(s, LAYERS, grad_norm=np.array([s, s + 0.5, s + 0.25]), loss=1.0 / (1 + s))
    (path,) = glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))
    return path


def _steps(batch) -> list[int]:
    return [r.step for r in batch.layer_records]


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> bytes:
    path = _write_run(tmp_path_factory.mktemp("valid"), steps=12)
    with open(path, "rb") as f:
        return f.read()


def test_growing_file_is_read_incrementally(tmp_path):
    full = Path(_write_run(tmp_path / "src")).read_bytes()
    grow = tmp_path / "events.out.tfevents.1.growing"
    reader = EventFileReader(str(grow))
    seen: list[int] = []
    # append in awkward slices: mid-header, mid-payload, mid-footer
    cuts = sorted({0, 5, 11, 13, 100, 333, 334, 1000, len(full) // 2, len(full) - 3, len(full)})
    with open(grow, "wb") as f:
        for a, b in itertools.pairwise(cuts):
            f.write(full[a:b])
            f.flush()
            before = reader.records.bytes_read
            seen += _steps(reader.read())
            assert reader.problems == []
            assert reader.records.bytes_read - before <= (b - a) + reader.records.pending_bytes + 64 * 1024
    assert seen == list(range(40))
    assert reader.records.pending_bytes == 0
    assert _steps(reader.read()) == []  # nothing new, nothing re-yielded


def test_truncated_tail_is_pending_until_finished(tmp_path):
    path = _write_run(tmp_path)
    data = Path(path).read_bytes()
    with open(path, "wb") as f:
        f.write(data[:-7])
    reader = EventFileReader(path)
    assert _steps(reader.read()) == list(range(39))
    assert reader.problems == [] and reader.records.pending_bytes > 0
    reader.finish()
    assert [p.kind for p in reader.problems] == ["truncated"]


@pytest.mark.parametrize("where", ["length", "length_crc", "payload", "footer"])
def test_bit_flip_loses_only_the_damaged_record(tmp_path, where):
    path = _write_run(tmp_path)
    data = bytearray(Path(path).read_bytes())
    # locate record 10 (file_version event is record 0, step s is record s + 1)
    offsets = [off for off, _ in RecordReader(path).read_records()]
    start = offsets[11]
    length = struct.unpack_from("<Q", data, start)[0]
    pos = {"length": start + 2, "length_crc": start + 9, "payload": start + 12 + length // 2,
           "footer": start + 12 + length + 1}[where]
    data[pos] ^= 0x10
    Path(path).write_bytes(bytes(data))
    reader = EventFileReader(path)
    steps = _steps(reader.read())
    assert steps == [s for s in range(40) if s != 10]
    assert len(reader.problems) >= 1
    assert reader.problems[0].offset == start
    assert reader.problems[0].kind in {"bad_length_crc", "bad_data_crc", "oversized_record"}


def test_hostile_length_field_allocates_nothing(tmp_path):
    path = tmp_path / "events.out.tfevents.hostile"
    header = struct.pack("<Q", 2**62)
    blob = header + struct.pack("<I", masked_crc32c(header)) + b"x" * 64
    path.write_bytes(blob + Path(_write_run(tmp_path / "ok", steps=3)).read_bytes())
    reader = EventFileReader(str(path))
    assert _steps(reader.read()) == [0, 1, 2]
    assert reader.problems[0].kind == "oversized_record"
    assert reader.records.bytes_read < 10_000


def test_garbage_between_records_is_skipped(tmp_path):
    good = Path(_write_run(tmp_path / "a", steps=5)).read_bytes()
    path = tmp_path / "events.out.tfevents.mixed"
    path.write_bytes(good + os.urandom(5000) + good)
    reader = EventFileReader(str(path))
    assert _steps(reader.read()) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert reader.problems


def test_unparseable_event_and_lost_layout_are_reported(tmp_path):
    """A record with valid CRCs but a bad proto is reported; values whose layer list was lost are dropped."""
    path = _write_run(tmp_path, steps=5)
    data = bytearray(Path(path).read_bytes())
    offsets = [off for off, _ in RecordReader(path).read_records()]
    # replace record 1 (step 0, which defines the layout) with garbage that passes both CRCs
    start, end = offsets[1], offsets[2]
    payload = b"\xff" * (end - start - 16)
    header = struct.pack("<Q", len(payload))
    rec = header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))
    data[start:end] = rec
    Path(path).write_bytes(bytes(data))
    reader = EventFileReader(path)
    batch = reader.read()
    kinds = [p.kind for p in reader.problems]
    assert "bad_event" in kinds and "unknown_layout" in kinds
    assert batch.layer_records == []  # never attributed to guessed layers
    assert [s.step for s in batch.scalars] == [1, 2, 3, 4]  # the rest of the file is intact


def test_reads_fsspec_urls(tmp_path):
    data = Path(_write_run(tmp_path, steps=6)).read_bytes()
    fs = fsspec.filesystem("memory")
    fs.pipe("/run1/events.out.tfevents.1.host", data[:300])
    reader = EventFileReader("memory://run1/events.out.tfevents.1.host")
    first = _steps(reader.read())
    fs.pipe("/run1/events.out.tfevents.1.host", data)  # the object grew
    assert first + _steps(reader.read()) == list(range(6))


def test_missing_file_yields_nothing(tmp_path):
    reader = EventFileReader(str(tmp_path / "nope"))
    assert reader.read().events == 0 and reader.problems == []


#: 2,000 examples in CI; a longer run: TB_GRADIENT_FUZZ_EXAMPLES=200000 pytest tests/test_reader_robustness.py -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("TB_GRADIENT_FUZZ_EXAMPLES", "2000"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_files_never_crash(valid_file, tmp_path_factory, data):
    """Any mutation of a valid file: no exception, every intact record before the damage survives."""
    buf = bytearray(valid_file)
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
    pos = data.draw(st.integers(0, len(buf) - 1))
    if op == "flip":
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        del buf[pos:]
    elif op == "insert":
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    elif op == "delete":
        del buf[pos:pos + data.draw(st.integers(1, 64))]
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=32))
        buf[pos:pos + len(chunk)] = chunk
    path = tmp_path_factory.mktemp("fuzz") / "events.out.tfevents.fuzz"
    path.write_bytes(bytes(buf))
    reader = EventFileReader(str(path))
    batch = reader.read()
    reader.finish()
    assert reader.records.offset + reader.records.pending_bytes == len(buf)
    # records that lie wholly before the mutation are intact and must all be read
    intact = [off for off, _ in _record_spans(valid_file) if off + _rec_len(valid_file, off) <= pos]
    steps = _steps(batch)
    n_layer_records_before = max(0, len(intact) - 1)  # minus the file_version record
    assert steps[:n_layer_records_before] == list(range(n_layer_records_before))
    for rec in batch.layer_records:
        assert rec.layers == tuple(LAYERS)
        np.testing.assert_array_equal(rec.values, [rec.step, rec.step + 0.5, rec.step + 0.25])


def _rec_len(buf: bytes, off: int) -> int:
    return 16 + struct.unpack_from("<Q", buf, off)[0]


def _record_spans(buf: bytes):
    """(offset, payload length) of each record of a valid buffer."""
    off = 0
    while off + 12 <= len(buf):
        n = struct.unpack_from("<Q", buf, off)[0]
        yield off, n
        off += 16 + n


def _hostile_event_file(path, values) -> None:
    """An event file holding one event with the given summary values (framed with valid CRCs)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    event = event_pb2.Event(step=1, wall_time=1.0, summary=summary_pb2.Summary(value=values))
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    path.write_bytes(header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))


def _hostile_values():
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    def meta(content: bytes):
        return summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="gradients", content=content),
            data_class=summary_pb2.DATA_CLASS_TENSOR)

    def shorthand(*dims):  # one value claiming to fill an enormous shape
        shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
        return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=[1.0])

    return [
        summary_pb2.Summary.Value(tag="gradients/grad_norm", metadata=meta(b"[" * 100_000), tensor=shorthand(1)),
        summary_pb2.Summary.Value(tag="gradients/lr", metadata=meta(b'{"v":1}'), tensor=shorthand(2**28)),
        summary_pb2.Summary.Value(tag="gradients/grad_norm", metadata=meta(b'{"v":1,"layout":"00","layers":[]}'),
                                  tensor=shorthand(2**62, 2**62)),
    ]


def test_hostile_summaries_are_reported_not_raised_nor_allocated(tmp_path):
    import resource

    path = tmp_path / "events.out.tfevents.hostile"
    _hostile_event_file(path, _hostile_values())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader = EventFileReader(str(path))
    batch = reader.read()
    assert batch.events == 1 and batch.layer_records == [] and batch.scalars == []
    assert [p.kind for p in reader.problems] == ["bad_summary"] * 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: no 1 GB expansion


def test_one_hostile_run_does_not_hide_the_others(tmp_path):
    from tb_gradient_plugin.runs import RunStore

    (tmp_path / "a_bad").mkdir()
    _hostile_event_file(tmp_path / "a_bad" / "events.out.tfevents.1.x", _hostile_values())
    _write_run(tmp_path / "b_good", steps=5)
    store = RunStore(str(tmp_path))
    store.refresh()
    assert store.run_names() == ["a_bad", "b_good"]
    assert list(store.get("b_good").steps) == list(range(5))
    assert any("bad_summary" in w or "gradients/" in w for w in store.get("a_bad").warnings)
