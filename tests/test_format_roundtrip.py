"""Writer -> event file -> reader round trips for every metric, odd values and layer-set changes."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.reader import EventFileReader
from tb_gradient_plugin.writer import GradientWriter


def _event_file(logdir) -> str:
    files = glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))
    assert len(files) == 1, files
    return files[0]


def _by_metric(batch):
    out: dict[str, list] = {}
    for rec in batch.layer_records:
        out.setdefault(rec.metric, []).append(rec)
    return out


def test_every_metric_round_trips(tmp_path):
    layers = ["encoder.fc1", "encoder.fc2", "head"]
    rng = np.random.default_rng(0)
    written = []
    with GradientWriter(tmp_path) as w:
        for step in range(0, 50, 5):
            vals = {m: rng.random(3).astype(np.float32) * 10 for m in fmt.LAYER_METRICS}
            vals["nonfinite_count"] = np.array([0, step, 1], dtype=np.float32)
            w.write(step, layers, **vals, total_grad_norm=step * 1.5, loss=1.0 / (step + 1), lr=1e-3 * step,
                    loss_scale=65536.0, step_skipped=step % 2, guard_action=0)
            written.append((step, vals))
    batch = EventFileReader(_event_file(tmp_path)).read()
    recs = _by_metric(batch)
    assert set(recs) == set(fmt.LAYER_METRICS)
    for metric in fmt.LAYER_METRICS:
        assert [r.step for r in recs[metric]] == [s for s, _ in written]
        for rec, (_, vals) in zip(recs[metric], written, strict=True):
            assert rec.layers == tuple(layers)
            np.testing.assert_array_equal(rec.values, vals[metric])
    scalars: dict[str, list[tuple[int, float]]] = {}
    for s in batch.scalars:
        assert s.ours
        scalars.setdefault(s.tag, []).append((s.step, s.value))
    assert scalars["total_grad_norm"][3] == (15, pytest.approx(22.5))
    assert scalars["loss"][2] == (10, pytest.approx(1 / 11))
    assert scalars["lr"][1] == (5, pytest.approx(5e-3))
    assert [v for _, v in scalars["step_skipped"]] == [s % 2 for s, _ in written]
    assert scalars["loss_scale"][0][1] == 65536.0
    assert scalars["guard_action"][0] == (0, 0.0)


def test_metric_lists_come_from_the_registry():
    names = [m.name for m in fmt.METRIC_REGISTRY]
    assert len(names) == len(set(names))
    stored = {m.name for m in fmt.METRIC_REGISTRY if m.storage != fmt.DERIVED}
    assert set(fmt.LAYER_METRICS) | set(fmt.STEP_METRICS) | set(fmt.SCALAR_METRICS) | {fmt.HISTOGRAM_METRIC} == stored
    assert fmt.LAYER_METRICS == ("grad_norm", "param_norm", "update_norm", "grad_max_abs", "nonfinite_count",
                                 "exp_avg_norm", "exp_avg_sq_norm")
    assert fmt.STEP_METRICS == ("lr", "loss_scale", "step_skipped", "guard_action", "clip_threshold", "epoch",
                                "batch_index")
    assert fmt.SCALAR_METRICS == ("loss", "total_grad_norm") and fmt.HISTOGRAM_METRIC == "grad_hist"
    for m in fmt.METRIC_REGISTRY:
        assert m.scope in ("layer", "step") and m.label
        assert (m.storage == fmt.DERIVED) == bool(m.derived_from)
        assert set(m.derived_from) <= stored
        assert fmt.metric_of(fmt.tag_for(m.name)) == (None if m.storage == fmt.DERIVED else m.name)


def test_nan_inf_and_huge_values_survive(tmp_path):
    vals = np.array([np.nan, np.inf, -np.inf, 1e38, 3.4e38, 0.0, 1e-45], dtype=np.float32)
    names = [f"l{i}" for i in range(len(vals))]
    with GradientWriter(tmp_path) as w:
        w.write(7, names, grad_norm=vals, loss=float("nan"), total_grad_norm=float("inf"))
    batch = EventFileReader(_event_file(tmp_path)).read()
    (rec,) = batch.layer_records
    np.testing.assert_array_equal(rec.values, vals)  # NaN == NaN under assert_array_equal
    loss = {s.tag: s.value for s in batch.scalars}
    assert np.isnan(loss["loss"]) and loss["total_grad_norm"] == np.inf


def test_layer_set_changes_never_misattribute(tmp_path):
    """Layers frozen (left out) or added mid-run: each value stays with its own layer name."""
    plan = {
        0: ["a", "b", "c"],
        1: ["a", "c"],  # b frozen
        2: ["a", "b", "c", "d"],  # b unfrozen, d added
        3: ["d", "a"],  # order changed
        4: ["a", "b", "c"],  # back to the first layout (already defined)
    }
    with GradientWriter(tmp_path) as w:
        for step, names in plan.items():
            # the value encodes (step, layer) so any misattribution shows
            values = [step * 100 + ord(n) for n in names]
            w.write(step, names, grad_norm=values, param_norm=values)
    batch = EventFileReader(_event_file(tmp_path)).read()
    assert len(batch.layer_records) == 2 * len(plan)
    for rec in batch.layer_records:
        assert list(rec.layers) == plan[rec.step]
        for name, value in zip(rec.layers, rec.values, strict=True):
            assert value == rec.step * 100 + ord(name)


def test_layout_list_written_once_then_repeated(tmp_path, monkeypatch):
    from tb_gradient_plugin import writer as writer_mod

    monkeypatch.setattr(writer_mod, "LAYOUT_REPEAT_EVERY", 10)
    names = [f"layer{i}" for i in range(20)]
    with GradientWriter(tmp_path) as w:
        for step in range(25):
            w.write(step, names, grad_norm=np.ones(20))
    path = _event_file(tmp_path)
    defining = []
    for _, data in EventFileReader(path).records.read_records():
        ev = event_pb2.Event.FromString(data)
        for v in ev.summary.value:
            meta = fmt.decode_metadata_content(v.metadata.plugin_data.content)
            if meta.layers is not None:
                defining.append(ev.step)
    assert defining == [0, 10, 20]


def test_histograms_round_trip_on_fixed_bins(tmp_path):
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=1000) * 10.0 ** rng.integers(-8, 3), np.array([0.0, np.nan, np.inf, 1e13, 1e-14])]
    counts = np.stack([fmt.histogram_counts(g) for g in grads])
    with GradientWriter(tmp_path) as w:
        w.write_histograms(3, ["big", "odd"], counts)
    (rec,) = EventFileReader(_event_file(tmp_path)).read().layer_records
    assert rec.metric == fmt.HISTOGRAM_METRIC and rec.values.dtype == np.int64
    np.testing.assert_array_equal(rec.values, counts)
    odd = rec.values[1]
    assert odd[fmt.HIST_ZERO] == 1 and odd[fmt.HIST_NONFINITE] == 2
    assert odd[fmt.HIST_OVERFLOW] == 1 and odd[fmt.HIST_UNDERFLOW] == 1


def test_histogram_counts_match_numpy_histogram():
    rng = np.random.default_rng(2)
    g = rng.standard_cauchy(50_000) * 1e-3
    ours = fmt.histogram_counts(g)
    inner, _ = np.histogram(np.log10(np.abs(g)), bins=fmt.HIST_LOG10_EDGES)
    np.testing.assert_array_equal(ours[2:fmt.HIST_OVERFLOW], inner)
    assert ours.sum() == g.size


def test_bad_arguments_get_clear_errors(tmp_path):
    with GradientWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="2 values for 3 layers"):
            w.write(0, ["a", "b", "c"], grad_norm=[1.0, 2.0])
        with pytest.raises(ValueError, match="unique"):
            w.write(0, ["a", "a"], grad_norm=[1.0, 2.0])
        with pytest.raises(ValueError, match="non-negative integer"):
            w.write(-1, ["a"], grad_norm=[1.0])
        with pytest.raises(ValueError, match="shape"):
            w.write_histograms(0, ["a"], np.zeros((1, 3)))
    with pytest.raises(RuntimeError, match="closed"):
        w.write(0, ["a"], grad_norm=[1.0])
    with pytest.raises(ValueError, match="exactly one"):
        GradientWriter()


def test_loss_and_total_norm_are_stock_scalars(tmp_path):
    with GradientWriter(tmp_path) as w:
        w.write(1, ["a"], grad_norm=[1.0], loss=0.5, total_grad_norm=2.0)
    path = _event_file(tmp_path)
    kinds = {}
    for _, data in EventFileReader(path).records.read_records():
        for v in event_pb2.Event.FromString(data).summary.value:
            kinds[v.tag] = (v.metadata.plugin_data.plugin_name, v.metadata.data_class)
    assert kinds["gradients/loss"] == ("scalars", summary_pb2.DATA_CLASS_SCALAR)
    assert kinds["gradients/total_grad_norm"] == ("scalars", summary_pb2.DATA_CLASS_SCALAR)
    assert kinds["gradients/grad_norm"] == (fmt.PLUGIN_NAME, summary_pb2.DATA_CLASS_TENSOR)


def test_writes_into_an_existing_torch_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(str(tmp_path))
    sw.add_scalar("user/acc", 0.9, 1)
    w = GradientWriter(writer=sw)
    w.write(1, ["fc"], grad_norm=[3.0], loss=0.25)
    w.close()
    sw.add_scalar("user/acc", 0.95, 2)  # the user's writer is still open after ours closes
    sw.close()
    batch = EventFileReader(_event_file(tmp_path)).read()
    assert [r.values.tolist() for r in batch.layer_records] == [[3.0]]
    tags = {(s.tag, s.step) for s in batch.scalars}
    assert {("user/acc", 1), ("user/acc", 2), ("loss", 1)} <= tags
    assert w.logdir == str(tmp_path)


def test_periodic_flush_survives_sigkill(tmp_path):
    """A writer killed with SIGKILL loses at most the last flush interval."""
    script = (
        "import sys, time\n"
        "from tb_gradient_plugin.writer import GradientWriter\n"
        "w = GradientWriter(sys.argv[1], flush_secs=0.2)\n"
        "for s in range(20):\n"
        "    w.write(s, ['a'], grad_norm=[float(s)])\n"
        "print('written', flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "written"
            time.sleep(1.0)  # several flush intervals
        finally:
            proc.kill()
    steps = [r.step for r in EventFileReader(_event_file(tmp_path)).read().layer_records]
    assert steps == list(range(20))


def test_package_import_pulls_no_framework():
    code = (
        "import sys, tb_gradient_plugin, tb_gradient_plugin.writer, tb_gradient_plugin.reader, "
        "tb_gradient_plugin.format\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_bytes_per_value_for_500_layers(tmp_path):
    names = [f"model.blocks.{i // 4}.layer{i % 4}" for i in range(500)]
    rng = np.random.default_rng(3)
    steps = 300
    with GradientWriter(tmp_path) as w:
        for s in range(steps):
            w.write(s, names, **{m: rng.random(500) for m in fmt.LAYER_METRICS})
    size = os.path.getsize(_event_file(tmp_path))
    per_value = size / (steps * 500 * len(fmt.LAYER_METRICS))
    assert per_value <= 4.5, per_value


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histogram_edge_values_split_the_reference_bins_exactly(dtype):
    edges = fmt.histogram_edge_values(dtype)
    assert edges.dtype == dtype and len(edges) == len(fmt.HIST_LOG10_EDGES)
    for k, x in enumerate(edges):
        below = np.nextafter(x, dtype(0))
        assert np.argmax(fmt.histogram_counts(np.asarray([x]))) == k + 2
        assert np.argmax(fmt.histogram_counts(np.asarray([below]))) == k + 1


def test_a_failed_write_leaves_no_half_defined_layout(tmp_path):
    """A write rejected for a bad argument must not mark its layout as written (later steps would lose layers)."""
    names = ["enc.fc1", "head"]
    with GradientWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="single number"):
            w.write(0, names, grad_norm=[1.0, 2.0], loss=[1.0, 2.0])
        for step in range(1, 5):
            w.write(step, names, grad_norm=[step, 2.0 * step], loss=1.0)
    reader = EventFileReader(_event_file(tmp_path))
    batch = reader.read()
    assert reader.problems == []
    assert [r.step for r in batch.layer_records] == [1, 2, 3, 4]


def test_any_unicode_layer_name_round_trips(tmp_path):
    names = ["\ud800lone surrogate", "<img src=x onerror=alert(1)>", "ℓayer/ü/😀", "nul\x00inside"]
    with GradientWriter(tmp_path) as w:
        w.write(0, names, grad_norm=[1.0, 2.0, 3.0, 4.0])
    reader = EventFileReader(_event_file(tmp_path))
    (rec,) = reader.read().layer_records
    assert reader.problems == [] and list(rec.layers) == names
