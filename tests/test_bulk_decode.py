"""The reader's bulk decoder (``bulk_decode``) against its general (protobuf) path: the same values, record for
record, on our own files, on files mixed with other writers' events, and on records that look like ours but are not;
and its steps (blocks, templates, block decoding) on hand-made records."""

from __future__ import annotations

import functools
import glob
import math
import os
import random
import struct
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2

from tb_gradient_plugin import bulk_decode, runs
from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.batch import Parts
from tb_gradient_plugin.reader import EventFileReader, RecordReader, masked_crc32c
from tb_gradient_plugin.writer import GradientWriter

LAYERS = ["embed", "block.0.attn", "block.0.mlp", "head"]


def _frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _records(path: str) -> list[bytes]:
    return [bytes(data) for _, data in RecordReader(path).read_records()]


def _write(path, records: list[bytes]) -> str:
    path.write_bytes(b"".join(_frame(r) for r in records))
    return str(path)


def _only_file(logdir) -> str:
    (path,) = glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))
    return path


def _our_run(logdir, steps, *, layers=LAYERS, histograms_every: int = 0, seed: int = 0) -> str:
    """A file from our writer with every metric, odd values and a layer set that changes part way."""
    rng = np.random.default_rng(seed)
    with GradientWriter(logdir) as w:
        for i, step in enumerate(steps):
            names = layers if i % 97 < 80 else layers[:-1]  # a frozen head for a while: a second layout
            g = rng.lognormal(size=len(names)).astype(np.float32)
            if i % 41 == 7:
                g[i % len(names)] = [np.nan, np.inf, -np.inf, -0.0][i % 4]
            w.write(step, names, grad_norm=g, param_norm=g * 3, update_norm=g * 1e-3, grad_max_abs=g / 7,
                    nonfinite_count=np.isnan(g).astype(np.float32), total_grad_norm=float(np.nansum(g)),
                    loss=float(rng.normal()), lr=1e-3, loss_scale=2.0 ** (i % 5), step_skipped=i % 2,
                    guard_action=0, clip_threshold=1.0, exp_avg_norm=g * 0.1, exp_avg_sq_norm=g * g * 0.01,
                    wall_time=1_700_000_000.0 + i if i % 13 else 0.0)
            if histograms_every and i % histograms_every == 0:
                w.write_histograms(step, names, rng.integers(0, 100, size=(len(names), fmt.HIST_BINS)))
    return _only_file(logdir)


def _decoded(path: str, *, bulk: bool, max_bytes: int | None = None) -> tuple:
    """Everything a reader gives, as plain values (NaN-safe), over as many reads as ``max_bytes`` needs."""
    reader = EventFileReader(path, bulk=bulk)
    layer, scalar, other, events = [], [], set(), 0
    while True:
        batch = reader.read(max_bytes)
        layer += [(r.step, r.wall_time, r.metric, r.layers, r.values.dtype.str, r.values.tobytes())
                  for r in batch.layer_records]
        scalar += [(r.step, r.wall_time, r.tag, struct.pack("<d", r.value), r.ours) for r in batch.scalars]
        other |= batch.other_tags
        events += batch.events
        if not batch.has_more:
            break
    reader.finish()
    problems = [(p.offset, p.kind) for p in reader.problems]
    return (layer, scalar, other, events, problems), reader


def _same(path: str, max_bytes: int | None = None) -> EventFileReader:
    """Assert bulk and general decoding agree on ``path``; returns the bulk reader."""
    general, _ = _decoded(path, bulk=False, max_bytes=max_bytes)
    bulk, reader = _decoded(path, bulk=True, max_bytes=max_bytes)
    for name, a, b in zip(("layer records", "scalars", "other tags", "events", "problems"), general, bulk,
                          strict=True):
        assert a == b, name
    return reader


def test_our_files_are_bulk_decoded_exactly(tmp_path):
    # steps cross the 1-, 2- and 3-byte varint lengths, start at 0 (a step field not written at all), and some
    # wall times are 0.0 (not written either)
    steps = [*range(0, 300), *range(16_300, 16_500), 2**40, 2**40 + 1, 2**40 + 2, 2**40 + 3]
    path = _our_run(tmp_path, steps, histograms_every=25)
    reader = _same(path)
    assert reader.bulk_records > 0.6 * len(steps)  # the fast path really ran (blocks break at odd records)
    assert reader.problems == []


def test_bounded_batches_and_growing_files_agree(tmp_path):
    path = _our_run(tmp_path / "src", range(400))
    _same(path, max_bytes=5000)
    data = Path(path).read_bytes()
    grow = tmp_path / "events.out.tfevents.1.grow"
    general, bulk = EventFileReader(str(grow), bulk=False), EventFileReader(str(grow))
    seen: dict[bool, list] = {False: [], True: []}
    with open(grow, "wb") as f:
        for cut in sorted({0, 7, 5000, 5001, 33_333, len(data) // 2, len(data) - 5, len(data)}):
            f.write(data[f.tell():cut])
            f.flush()
            for reader in (general, bulk):
                seen[reader.bulk] += [(r.step, r.metric, r.values.tobytes()) for r in reader.read().layer_records]
    assert seen[True] == seen[False] and len(seen[True]) == 400 * len(fmt.LAYER_METRICS)
    assert bulk.bulk_records > 300


def _other_tool_event(step: int) -> bytes:
    """A scalar from another tool (no metadata after its first event, like Keras' TF2 writer)."""
    value = summary_pb2.Summary.Value(tag="epoch_loss", simple_value=0.5 + step)
    return event_pb2.Event(step=step, wall_time=1.0, summary=summary_pb2.Summary(value=[value])).SerializeToString()


def test_interleaved_writers_agree(tmp_path):
    ours = _records(_our_run(tmp_path / "a", range(200)))
    mixed = []
    for i, rec in enumerate(ours):
        mixed.append(rec)
        if i % 17 == 3:
            mixed.append(_other_tool_event(i))
        if i % 29 == 5:
            mixed.append(b"\x08\x01")  # a valid, empty-ish Event of two bytes
    reader = _same(_write(tmp_path / "events.out.tfevents.mixed", mixed))
    assert reader.bulk_records > 100


def _mutate_value(rec: bytes, change) -> bytes:
    event = event_pb2.Event.FromString(rec)
    change(event)
    return event.SerializeToString()


def test_records_that_look_like_ours_but_are_not_take_the_general_path(tmp_path):
    ours = _records(_our_run(tmp_path / "a", range(120)))
    target = 60  # well inside a block of equal records
    step = event_pb2.Event.FromString(ours[target]).step

    def as_int32(event):  # same bytes, other meaning: the content is now 4-byte integers
        event.summary.value[0].tensor.dtype = types_pb2.DT_INT32

    def other_plugin(event):  # same length, not our plugin: someone else's tensor
        event.summary.value[0].metadata.plugin_data.plugin_name = "gradientz"

    def renamed(event):  # same length, a metric that does not exist
        event.summary.value[1].tag = event.summary.value[1].tag[:-1] + "X"

    for name, change in {"int32": as_int32, "other_plugin": other_plugin, "renamed": renamed}.items():
        records = list(ours)
        event = event_pb2.Event.FromString(records[target])
        change(event)
        records[target] = event.SerializeToString()
        assert len(records[target]) == len(ours[target]), name  # still inside the block of equal lengths
        path = _write(tmp_path / f"events.out.tfevents.{name}", records)
        reader = _same(path)
        assert reader.bulk_records > 80
        batch = EventFileReader(path).read()
        at_step = {r.metric: r for r in batch.layer_records if r.step == step}
        if name == "int32":
            raw = event.summary.value[0].tensor.tensor_content
            np.testing.assert_array_equal(at_step["grad_norm"].values, np.frombuffer(raw, dtype="<i4"))
            assert not np.array_equal(at_step["grad_norm"].values, np.frombuffer(raw, dtype="<f4"))
        elif name == "other_plugin":
            assert "gradients/grad_norm" in batch.other_tags and "grad_norm" not in at_step
            assert "param_norm" in at_step
        else:
            assert [p.kind for p in reader.problems] == ["bad_summary"] and "param_norm" not in at_step
            assert "grad_norm" in at_step


def test_non_canonical_and_negative_steps(tmp_path):
    """Steps written as a padded varint or as negative numbers decode as protobuf decodes them."""
    ours = _records(_our_run(tmp_path / "a", range(100, 140)))
    padded = []
    for rec in ours[10:20]:
        at = 10 if rec[0] == 0x09 else 1  # after the wall time field, when there is one, and the step's key
        step = event_pb2.Event.FromString(rec).step
        padded.append(rec[:at] + _varint(step, pad=1) + rec[at + len(_varint(step)):])
        assert event_pb2.Event.FromString(padded[-1]).step == step
    negative = []
    for rec in ours[20:30]:
        event = event_pb2.Event.FromString(rec)
        event.step = -event.step
        negative.append(event.SerializeToString())
    path = _write(tmp_path / "events.out.tfevents.odd", ours[:10] + padded + negative + ours[30:])
    _same(path)
    steps = {r.step for r in EventFileReader(path).read().layer_records}
    assert set(range(109, 119)) <= steps and -125 in steps


def _varint(value: int, pad: int = 0) -> bytes:
    """A varint, optionally padded with ``pad`` redundant bytes (legal: protobuf reads the same number)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            break
        out.append(byte | 0x80)
    if pad:
        out[-1] |= 0x80
        out += b"\x80" * (pad - 1) + b"\x00"
    return bytes(out)


@functools.cache
def _base_records() -> tuple[bytes, ...]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return tuple(_records(_our_run(tmp, range(60), layers=LAYERS[:3])))


#: 300 examples in CI; a longer run: TB_GRADIENT_FUZZ_EXAMPLES=20000 pytest tests/test_bulk_decode.py -k byte_change
BYTE_CHANGE_EXAMPLES = int(os.environ.get("TB_GRADIENT_FUZZ_EXAMPLES", "300"))


@settings(max_examples=BYTE_CHANGE_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_change_in_any_record_decodes_as_protobuf_does(tmp_path, data):
    """Bytes changed inside records (framing kept valid): bulk decoding still equals protobuf, whatever the bytes
    now mean (a value, a tag, a length, garbage)."""
    records = list(_base_records())
    for _ in range(data.draw(st.integers(1, 4))):
        k = data.draw(st.integers(1, len(records) - 1))
        rec = bytearray(records[k])
        pos = data.draw(st.integers(0, len(rec) - 1))
        rec[pos] = data.draw(st.integers(0, 255))
        records[k] = bytes(rec)
    path = tmp_path / f"events.out.tfevents.{random.getrandbits(32)}"
    _same(_write(path, records))


def _arrays(run) -> dict:
    out = {"layers": run.layers, "steps": run.steps.tolist(), "present": run.present.tolist(),
           "hist_steps": run.hist_steps.tolist()}
    out |= {f"m/{k}": v.tobytes() for k, v in sorted(run.layer_metrics.items())}
    out |= {f"s/{k}": (v.steps.tolist(), v.values.tobytes()) for k, v in sorted(run.series.items())}
    out["hist"] = None if run.histograms is None else run.histograms.tobytes()
    out["first_wall_time"] = run.first_wall_time
    return out


def test_run_store_arrays_are_identical(tmp_path, monkeypatch):
    """Resumed runs (steps written again), two files, histograms: the run store's arrays do not depend on the path."""
    logdir = tmp_path / "run"
    _our_run(logdir / "a", range(0, 500), histograms_every=50, seed=1)
    _our_run(logdir / "b", range(300, 700), histograms_every=50, seed=2)  # steps 300..499 again: last one wins
    for sub in ("a", "b"):
        (path,) = glob.glob(str(logdir / sub / "events.*"))
        os.replace(path, logdir / (sub + os.path.basename(path)))
    bulk = runs.load_run(str(logdir))
    monkeypatch.setattr(runs, "EventFileReader", functools.partial(EventFileReader, bulk=False))
    general = runs.load_run(str(logdir))
    a, b = _arrays(bulk), _arrays(general)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert len(bulk.steps) == 700 and not math.isnan(bulk.layer_metrics["grad_norm"][400, 0])


def test_every_value_of_the_step_bytes_decodes_as_protobuf_does(tmp_path):
    """The step is the one variable-length field the bulk decoder reads: a byte there that ends the varint early or
    runs it on into the next field changes the whole parse, and must take the general path."""
    ours = _records(_our_run(tmp_path / "a", range(200, 230), layers=LAYERS[:2]))
    target = 20  # inside a block (i = 13 has no wall time and starts a new block)
    assert ours[target][0] == 0x09 and ours[target][9] == 0x10  # wall time, then the step's key
    assert _same(_write(tmp_path / "events.out.tfevents.intact", ours)).bulk_records >= len(ours) - 8
    for pos in (10, 11):  # the two bytes of a step between 128 and 16383
        for byte in range(256):
            records = list(ours)
            rec = bytearray(records[target])
            rec[pos] = byte
            records[target] = bytes(rec)
            _same(_write(tmp_path / f"events.out.tfevents.{pos}.{byte}", records))


def test_long_runs_of_equal_records_with_damage_far_in(tmp_path):
    """Thousands of equal records are checked a window at a time: damage deep inside a run (a length header, a
    payload) still costs exactly the damaged record, and is reported at its offset."""
    with GradientWriter(tmp_path / "src") as w:
        for step in range(200, 3200):
            w.write(step, ["a", "b"], grad_norm=np.array([step, -step], dtype=np.float32))
    data = bytearray(Path(_only_file(tmp_path / "src")).read_bytes())
    offsets = [off for off, _ in RecordReader(_only_file(tmp_path / "src")).read_records()]
    header_hit, payload_hit = offsets[1 + 1800], offsets[1 + 2500]  # record 0 is the file_version event
    data[header_hit + 3] ^= 0x40
    data[payload_hit + 20] ^= 0x01
    path = tmp_path / "events.out.tfevents.damaged"
    path.write_bytes(bytes(data))
    reader = EventFileReader(str(path))
    records = reader.read().layer_records
    assert [r.step for r in records] == [s for s in range(200, 3200) if s not in (2000, 2700)]
    assert all(r.values.tolist() == [r.step, -r.step] for r in records)
    assert [(p.offset, p.kind) for p in reader.problems] == [(header_hit, "bad_length_crc"),
                                                             (payload_hit, "bad_data_crc")]
    assert reader.bulk_records > 2900


def test_equal_blocks_break_at_a_length_change_or_a_gap():
    # data offsets of records framed back to back (16 framing bytes each), a longer record from index 3, a gap before 5
    starts = np.array([12, 38, 64, 90, 118, 160])
    assert bulk_decode.equal_blocks(starts, [10, 10, 10, 12, 12, 12]) == [(0, 3), (3, 5), (5, 6)]


def _scalar_event(step: int, value: float) -> bytes:
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=struct.pack("<f", value))
    tensor.tensor_shape.SetInParent()
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="loss", tensor=tensor)])
    return event_pb2.Event(step=step, wall_time=1000.0 + step, summary=summary).SerializeToString()


def test_a_template_reads_the_records_equal_to_it_and_leaves_the_others():
    first = _scalar_event(300, 0.5)
    parts = Parts(np.asarray)
    scalar = [(parts, bulk_decode.SCALAR)]
    assert bulk_decode.template_of(first + b"\x10\x05", scalar) is None  # a repeated step: protobuf's
    assert bulk_decode.template_of(first, [None]) is None  # a value the general path could not describe
    template = bulk_decode.template_of(first, scalar)
    assert template is not None and template.length == len(first)
    records = [_scalar_event(301, 1.5), _scalar_event(302, 2.5), _scalar_event(303, 3.5)]
    other = event_pb2.Event.FromString(records[1])
    other.summary.value[0].tag = "lost"  # same length, another tag: not equal outside the variable bytes
    records[1] = other.SerializeToString()
    buf = b"".join(_frame(r) for r in records)
    starts = np.arange(len(records)) * (len(first) + 16) + 12
    count, others = bulk_decode.decode_block(template, np.frombuffer(buf, dtype=np.uint8), 1000, starts)
    assert count == 2 and others == [int(starts[1])]
    (piece,) = parts.merged()
    assert piece.steps.tolist() == [301, 303] and piece.values.tolist() == [1.5, 3.5]
    assert piece.wall_times.tolist() == [1301.0, 1303.0]
    assert piece.order.tolist() == [1000 + starts[0], 1000 + starts[2]]  # file offsets order the values
