"""Run store: logdirs written by our writer and by other tools' writers become the right per-run arrays."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tb_gradient_plugin import GradientWriter
from tb_gradient_plugin.format import HIST_BINS
from tb_gradient_plugin.run_arrays import dedupe_series
from tb_gradient_plugin.runs import RunStore, find_runs, load_run

LAYERS = ["embed", "block0.attn", "block0.mlp", "head"]


def write_run(path: Path, steps: range, layers=LAYERS, *, spike: tuple[int, int] | None = None,
              nan_at: int | None = None) -> np.ndarray:
    """Write a run with our writer; returns the grad_norm matrix written (steps x layers)."""
    rng = np.random.default_rng(len(str(path)))
    grads = np.exp(rng.normal(0, 0.1, (len(steps), len(layers)))).astype(np.float32)
    if spike:
        grads[spike[0] - steps.start, spike[1]] *= 1000
    if nan_at is not None:
        grads[nan_at - steps.start, 1] = np.nan
    with GradientWriter(path) as w:
        for i, step in enumerate(steps):
            w.write(step, layers, grad_norm=grads[i], param_norm=np.full(len(layers), 10.0),
                    update_norm=grads[i] * 1e-3, loss=1.0 / (1 + step), lr=1e-3, total_grad_norm=1.0)
    return grads


def tfevents(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if "tfevents" in p.name)


# ------------------------------------------------------------------------------------------------------ our runs


def test_our_run_arrays(tmp_path):
    grads = write_run(tmp_path / "a", range(0, 50))
    run = load_run(str(tmp_path / "a"))
    assert run.name == "a" and run.source == "tb_gradient_plugin"
    assert run.layers == LAYERS
    np.testing.assert_array_equal(run.steps, np.arange(50))
    np.testing.assert_array_equal(run.layer_metrics["grad_norm"], grads)
    assert run.layer_metrics["grad_norm"].dtype == np.float32
    assert run.present.all()
    np.testing.assert_allclose(run.update_ratio(), grads * 1e-3 / 10.0, rtol=1e-5)
    assert set(run.series) >= {"loss", "lr", "total_grad_norm"}
    np.testing.assert_allclose(run.series["loss"].values, 1.0 / (1 + np.arange(50)), rtol=1e-6)
    assert run.warnings == [] and run.unknown_tags == []


def test_run_names_like_tensorboard(tmp_path):
    write_run(tmp_path, range(3))
    write_run(tmp_path / "exp1", range(3))
    write_run(tmp_path / "group" / "exp2", range(3))
    (tmp_path / "no_events").mkdir()
    assert [n for n, _ in find_runs(str(tmp_path))] == [".", "exp1", "group/exp2"]
    store = RunStore(str(tmp_path))
    assert store.refresh() is True
    assert store.run_names() == [".", "exp1", "group/exp2"]
    assert store.get("group/exp2").layers == LAYERS
    # names are names, never paths
    for bad in ("../etc", str(tmp_path / "exp1"), "group", "exp1/"):
        with pytest.raises(KeyError):
            store.get(bad)
        with pytest.raises(KeyError):
            store.version(bad)


def test_logdir_spec_prefixes_names(tmp_path):
    write_run(tmp_path / "x", range(3))
    write_run(tmp_path / "y" / "inner", range(3))
    store = RunStore("", spec={"base": str(tmp_path / "x"), "other": str(tmp_path / "y")})
    store.refresh()
    assert store.run_names() == ["base", "other/inner"]


def test_layers_change_and_absent_is_not_nan(tmp_path):
    with GradientWriter(tmp_path) as w:
        w.write(0, ["a", "b"], grad_norm=[1.0, 2.0])
        w.write(1, ["b", "c"], grad_norm=[3.0, np.nan])  # "a" frozen, "c" new and NaN
    run = load_run(str(tmp_path))
    assert run.layers == ["a", "b", "c"]
    np.testing.assert_array_equal(run.present, [[True, True, False], [False, True, True]])
    g = run.layer_metrics["grad_norm"]
    assert g[1, 1] == 3.0 and np.isnan(g[1, 2]) and run.present[1, 2]


def test_histograms_align_with_layers(tmp_path):
    from tb_gradient_plugin.format import HIST_BINS, histogram_counts

    rng = np.random.default_rng(0)
    counts = np.stack([histogram_counts(rng.normal(size=100) * 10.0**k) for k in range(3)])
    with GradientWriter(tmp_path) as w:
        w.write(0, ["a", "b", "c"], grad_norm=[1, 2, 3])
        w.write_histograms(0, ["c", "a", "b"], counts)
        w.write_histograms(10, ["c", "a", "b"], counts * 2)
    run = load_run(str(tmp_path))
    np.testing.assert_array_equal(run.hist_steps, [0, 10])
    assert run.histograms.shape == (2, 3, HIST_BINS)
    np.testing.assert_array_equal(run.histograms[0, 0], counts[1])  # layer "a" was second in the histogram
    np.testing.assert_array_equal(run.histograms[1, 2], counts[0] * 2)


# -------------------------------------------------------------------------------------------- incremental reading


def test_refresh_reads_only_new_bytes_and_bumps_version(tmp_path):
    w = GradientWriter(tmp_path / "live")
    for s in range(100):
        w.write(s, LAYERS, grad_norm=np.ones(4) * s, loss=1.0)
    w.flush()
    store = RunStore(str(tmp_path))
    assert store.refresh()
    first = store.get("live")
    v1 = store.version("live")
    assert len(first.steps) == 100
    assert store.refresh() is False and store.version("live") == v1 and store.get("live") is first
    for s in range(100, 250):
        w.write(s, LAYERS[1:] + ["new_head"], grad_norm=np.ones(4) * s, loss=1.0)
    w.flush()
    assert store.refresh() is True
    assert store.version("live") > v1
    second = store.get("live")
    assert len(second.steps) == 250 and second.layers == LAYERS + ["new_head"]
    assert second.layer_metrics["grad_norm"][249, 4] == 249 and not second.present[249, 0]
    # what was handed out before is unchanged (live readers of the plugin keep a consistent snapshot)
    assert first.layer_metrics["grad_norm"].shape == (100, 4)
    np.testing.assert_array_equal(first.layer_metrics["grad_norm"][:, 0], np.arange(100))
    w.close()
    store.refresh()
    size = sum(p.stat().st_size for p in tfevents(tmp_path))
    assert store.get("live").bytes_read == size  # every byte read exactly once


def test_steps_out_of_order_and_rewritten(tmp_path):
    with GradientWriter(tmp_path) as w:
        for s in (5, 6, 7):
            w.write(s, ["a"], grad_norm=[float(s)])
    store = RunStore(str(tmp_path))
    store.refresh()
    with GradientWriter(tmp_path, filename_suffix=".resumed") as w:  # a resumed run rewrites step 6, adds 1
        w.write(1, ["a"], grad_norm=[1.0])
        w.write(6, ["a"], grad_norm=[60.0])
    store.refresh()
    run = store.get(".")
    np.testing.assert_array_equal(run.steps, [1, 5, 6, 7])
    np.testing.assert_array_equal(run.layer_metrics["grad_norm"][:, 0], [1, 5, 60, 7])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_incremental_reads_match_a_dense_reference(tmp_path, seed):
    """Layers that come and go, a metric that starts late, steps that go back and are rewritten, all read in
    awkward pieces: the store's arrays equal a dense table built naively from what was written (last write wins)."""
    rng = np.random.default_rng(seed)
    pool = [f"layer{i}" for i in range(9)]
    written: list[tuple[int, list[str], dict[str, np.ndarray]]] = []
    hists: list[tuple[int, list[str], np.ndarray]] = []
    step = 0
    with GradientWriter(tmp_path / "src") as w:
        for i in range(400):
            step = step + 1 if rng.random() > 0.05 else max(0, step - int(rng.integers(1, 30)))
            visible = 3 + min(6, i // 60)  # layers are added as the run goes on
            names = [n for n in pool[:visible] if rng.random() > 0.1] or pool[:1]
            metrics = ["grad_norm"] + (["param_norm"] if i > 150 else []) + (["update_norm"] if i % 7 else [])
            values = {m: rng.lognormal(size=len(names)).astype(np.float32) for m in metrics}
            w.write(step, names, **values)
            written.append((step, names, values))
            if i % 2 == 0:
                counts = rng.integers(0, 50, size=(len(names), HIST_BINS))
                w.write_histograms(step, names, counts)
                hists.append((step, names, counts))
    (src,) = tfevents(tmp_path / "src")
    data = src.read_bytes()
    live = tmp_path / "logs" / "run" / src.name
    live.parent.mkdir(parents=True)
    store = RunStore(str(tmp_path / "logs"))
    cuts = sorted({*rng.integers(0, len(data), size=6).tolist(), len(data)})
    with open(live, "wb") as f:
        for cut in cuts:
            f.write(data[f.tell():cut])
            f.flush()
            store.refresh()
    run = store.get("run")

    layers = list(dict.fromkeys(n for _, names, _ in written for n in names))
    steps = sorted({s for s, _, _ in written})
    row = {s: k for k, s in enumerate(steps)}
    col = {n: j for j, n in enumerate(layers)}
    expect = {m: np.full((len(steps), len(layers)), np.nan, dtype=np.float32)
              for m in ("grad_norm", "param_norm", "update_norm")}
    present = np.zeros((len(steps), len(layers)), dtype=bool)
    for s, names, values in written:
        for m, v in values.items():
            for name, x in zip(names, v, strict=True):
                expect[m][row[s], col[name]] = x
                present[row[s], col[name]] = True
    assert run.layers == layers and run.steps.tolist() == steps
    np.testing.assert_array_equal(run.present, present)
    for m, matrix in expect.items():
        np.testing.assert_array_equal(run.layer_metrics[m], matrix, err_msg=m)
    hist_steps = sorted({s for s, _, _ in hists})
    expect_hist = np.zeros((len(hist_steps), len(layers), HIST_BINS), dtype=np.int64)
    for s, names, counts in hists:
        expect_hist[hist_steps.index(s), [col[n] for n in names]] = counts
    assert run.hist_steps.tolist() == hist_steps
    np.testing.assert_array_equal(run.histograms, expect_hist)


WRITER_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from tb_gradient_plugin import GradientWriter
    with GradientWriter(sys.argv[1], flush_secs=0.05) as w:
        for s in range(int(sys.argv[2])):
            w.write(s, ["a", "b", "c"], grad_norm=np.full(3, float(s)), loss=1.0)
            if s % 50 == 0:
                w.flush()
                time.sleep(0.01)
""")


@pytest.mark.slow
def test_file_appended_while_reading(tmp_path):
    """A second process writes while the store polls: every step arrives, each exactly once, in order."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs" / "run"), "3000"])
    store = RunStore(str(tmp_path / "logs"))
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = proc.poll() is not None
        if store.refresh():
            seen.append(len(store.get("run").steps))
        if done:
            break
        time.sleep(0.02)
    assert proc.wait(timeout=30) == 0
    store.refresh()
    run = store.get("run")
    np.testing.assert_array_equal(run.steps, np.arange(3000))
    np.testing.assert_array_equal(run.layer_metrics["grad_norm"][:, 2], np.arange(3000))
    assert run.warnings == []
    assert len(seen) >= 2 and seen == sorted(seen)  # it was read in pieces, growing


# ----------------------------------------------------------------------------------------------------- damage


def test_corrupt_middle_keeps_the_rest(tmp_path):
    write_run(tmp_path, range(200))
    path = tfevents(tmp_path)[0]
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    run = load_run(str(tmp_path))
    assert 150 < len(run.steps) < 200
    assert run.steps[0] == 0 and run.steps[-1] == 199
    assert run.warnings and all(path.name in w for w in run.warnings)


def test_truncated_tail_warned_only_when_finished(tmp_path):
    write_run(tmp_path, range(20))
    path = tfevents(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-7])
    store = RunStore(str(tmp_path))
    store.refresh()
    assert len(store.get(".").steps) == 19 and store.get(".").warnings == []  # maybe still being written
    run = load_run(str(tmp_path))  # the auditor: every file is finished
    assert len(run.steps) == 19
    assert any("ends inside a record" in w for w in run.warnings)


def test_older_file_finished_when_newer_appears(tmp_path):
    write_run(tmp_path, range(20))
    path = tfevents(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-7])
    store = RunStore(str(tmp_path))
    store.refresh()
    assert store.get(".").warnings == []
    time.sleep(1.1)  # file names carry the second they were created
    with GradientWriter(tmp_path) as w:
        w.write(100, LAYERS, grad_norm=np.ones(4))
    assert store.refresh()
    assert any("ends inside a record" in w for w in store.get(".").warnings)


def test_garbage_file_and_empty_logdir(tmp_path):
    assert find_runs(str(tmp_path)) == []
    store = RunStore(str(tmp_path))
    assert store.refresh() is False and store.run_names() == []
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "events.out.tfevents.1.host").write_bytes(os.urandom(5000))
    run = load_run(str(tmp_path / "junk"))
    assert run.events == 0 and run.warnings
    with pytest.raises(FileNotFoundError):
        find_runs(str(tmp_path / "missing"))
    assert RunStore(str(tmp_path / "missing")).refresh() is False  # a live logdir may not exist yet


# ------------------------------------------------------------------------------------------------- fsspec


def test_memory_filesystem(tmp_path):
    write_run(tmp_path / "r1", range(30))
    write_run(tmp_path / "r2" / "sub", range(10))
    fs = fsspec.filesystem("memory")
    for p in tfevents(tmp_path):
        rel = p.relative_to(tmp_path).as_posix()
        with fs.open(f"/auditlogs/{rel}", "wb") as f:
            f.write(p.read_bytes())
    try:
        url = "memory://auditlogs"
        assert [n for n, _ in find_runs(url)] == ["r1", "r2/sub"]
        store = RunStore(url)
        store.refresh()
        assert store.run_names() == ["r1", "r2/sub"]
        local = load_run(str(tmp_path / "r1"))
        remote = store.get("r1")
        np.testing.assert_array_equal(remote.layer_metrics["grad_norm"], local.layer_metrics["grad_norm"])
        assert load_run(url + "/r2/sub").steps.tolist() == list(range(10))
    finally:
        fs.rm("/auditlogs", recursive=True)


# --------------------------------------------------------------------------------------------------- array helpers


def test_dedupe_keeps_last_but_never_hides_nan():
    s = dedupe_series(np.array([3, 1, 2, 2, 3, 3]), np.array([30.0, 10.0, np.nan, 20.0, 31.0, 32.0]))
    np.testing.assert_array_equal(s.steps, [1, 2, 3])
    assert s.values[0] == 10 and np.isnan(s.values[1]) and s.values[2] == 32


def _summary_writer(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def test_lightning_style_param_norms_fold_per_layer(tmp_path):
    """Per-parameter L2 norms fold into per-layer norms (root of the sum of squares), _step preferred to _epoch."""
    rng = np.random.default_rng(1)
    params = {"l1.weight": 3.0, "l1.bias": 4.0, "l2.weight": 1.0, "l2.bias": 0.5}
    expected = {"l1": [], "l2": []}
    with _summary_writer(tmp_path) as sw:
        for step in range(20):
            scale = rng.uniform(0.5, 2)
            for name, base in params.items():
                sw.add_scalar(f"grad_2.0_norm/{name}_step", base * scale, step)
                sw.add_scalar(f"grad_2.0_norm/{name}_epoch", 999.0, step)
            sw.add_scalar("grad_2.0_norm_total_step", 5.0 * scale, step)
            sw.add_scalar("train_loss_step", 1.0 / (step + 1), step)
            sw.add_scalar("train_loss_epoch", 7.0, step)
            sw.add_scalar("train_acc", 0.5, step)
            sw.add_scalar("epoch", 0, step)
            expected["l1"].append(np.hypot(3.0, 4.0) * scale)
            expected["l2"].append(np.hypot(1.0, 0.5) * scale)
    (tmp_path / "hparams.yaml").write_text("lr: 0.1\n")
    run = load_run(str(tmp_path))
    assert run.source == "lightning"
    assert run.layers == ["l1", "l2"]
    np.testing.assert_allclose(run.layer_metrics["grad_norm"][:, 0], expected["l1"], rtol=1e-5)
    np.testing.assert_allclose(run.layer_metrics["grad_norm"][:, 1], expected["l2"], rtol=1e-5)
    np.testing.assert_allclose(run.series["loss"].values, 1.0 / (np.arange(20) + 1), rtol=1e-6)
    assert set(run.series) == {"loss", "loss_epoch", "total_grad_norm"}
    assert run.unknown_tags == ["train_acc"]


@pytest.mark.parametrize(("tags", "source", "series", "layers"), [
    ({"train/loss": 1, "train/grad_norm": 2, "train/learning_rate": 3, "train/epoch": 0.1, "eval/loss": 4},
     "hf_trainer", {"loss": 1, "total_grad_norm": 2, "lr": 3, "val_loss": 4}, {}),
    ({"training/loss": 1, "grads_norm/fc1/weight": 3, "grads_norm/fc1/bias": 4, "weights_norm/fc1/weight": 6},
     "ignite", {"loss": 1}, {"grad_norm": {"fc1": 5.0}, "param_norm": {"fc1": 6.0}}),
    ({"loss/train/total": 1, "l2_norm/grad/global": 2, "l2_norm/grad/enc.fc.weight": 2, "lr-DecoupledAdamW/group0": 3,
      "l2_norm/param/enc.fc.weight": 8, "l2_norm/update/enc.fc.weight": 0.08},
     "composer", {"loss": 1, "total_grad_norm": 2, "lr": 3},
     {"grad_norm": {"enc.fc": 2.0}, "param_norm": {"enc.fc": 8.0}, "update_norm": {"enc.fc": 0.08}}),
    ({"train/box_loss": 1, "train/obj_loss": 2, "train/cls_loss": 3, "val/box_loss": 1, "val/obj_loss": np.nan,
      "x/lr0": 0.01, "metrics/mAP_0.5": 0.5}, "yolov5", {"loss": 6, "val_loss": np.nan, "lr": 0.01, "val_map": 0.5},
     {}),
    ({"Loss/train": 1, "total_norm": 2, "lr": 3, "Loss/val": 4, "gibberish": 5},
     "plain", {"loss": 1, "total_grad_norm": 2, "lr": 3, "val_loss": 4}, {}),
])
def test_other_tools_tags(tmp_path, tags, source, series, layers):
    with _summary_writer(tmp_path) as sw:
        for step in range(5):
            for tag, value in tags.items():
                sw.add_scalar(tag, value, step)
    run = load_run(str(tmp_path))
    assert run.source == source
    assert set(run.series) == set(series)
    for name, value in series.items():
        np.testing.assert_allclose(run.series[name].values, np.full(5, value), rtol=1e-6)
        np.testing.assert_array_equal(run.series[name].steps, np.arange(5))
    for metric, per_layer in layers.items():
        for layer, value in per_layer.items():
            np.testing.assert_allclose(run.layer_metrics[metric][:, run.layers.index(layer)], value, rtol=1e-6)
    if source == "plain":
        assert run.unknown_tags == ["gibberish"]


# ------------------------------------------------------------------------------------------------ real runs


REALRUNS = {
    # run directory: (source, series it must have)
    "dparra2399__LearnedCoWSiP/experiments/illum_models/n1024_k8_sigma10_photonstarved": ("lightning",
                                                                                         {"loss", "val_loss"}),
    "dparra2399__LearnedCoWSiP/experiments/illum_models/n2400_k8_sigma80": ("lightning", {"loss", "val_loss"}),
    "dparra2399__LearnedCoWSiP/experiments/illum_peak_models/n1024_k8_sigma10_peak030_counts1000":
        ("lightning", {"loss", "val_loss"}),
    "dparra2399__LearnedCoWSiP/experiments/illum_peak_models/n1024_k8_sigma10_peak030_counts1000_fourier":
        ("lightning", {"loss", "val_loss"}),
    "ZakSingh__omelette/ppo_logs/egraph-v0__PropLang_3__1__1655386763": ("plain", {"lr"}),
    "Aydana1__Enhancing_YOLOv5l/runs/train/yolov5m6_34": ("yolov5", {"loss", "val_loss", "lr", "val_map"}),
    "Aydana1__Enhancing_YOLOv5l/runs/train/exp31": ("yolov5", {"loss", "val_loss", "lr", "val_map"}),
    "TheCodeheadMT__TensorBoard-Tutorial/archive/logs/mod1-reuters-1690485395": ("keras",
                                                                                {"loss", "val_loss", "val_accuracy"}),
    "aarugunj27__EnzymeKcatAnaylsis/logs": ("hf_trainer", {"loss", "total_grad_norm", "lr"}),
    "ZakSingh__omelette/lightning_logs/math": ("lightning", {"loss"}),
    "inwaves__prob-models/lightning_logs/version_82": ("lightning", {"loss"}),
    "AnAccountWithoutAName__Deep-Lineary-Gated-Networks/lightning_logs/version_0": (
        "lightning", {"loss", "val_loss", "val_accuracy"}),
    # TF-NMT tutorial runs: the pre-clip global norm every step (heavy-tailed)
    "iamlockelightning__NMT/nmt/nmt_model/train_log": ("plain", {"loss", "total_grad_norm"}),
    "pishoyg__english-to-arabic-machine-translation/eng-40000_ara-40000_2x128-lstm_sgd-1.0-10000000_EN-bi_DO-0.2_"
    "beam_search-10_AT-normed_bahdanau_SW-bpe/train_log": ("plain", {"loss", "lr", "total_grad_norm"}),
    "trungnh30__tmp/nmt_model/train_log": ("plain", {"loss", "lr", "total_grad_norm"}),
    "zhangpengGenedock__Translator/model/train_log": ("plain", {"loss", "total_grad_norm"}),
}


def test_realruns_discovered_as_their_runs(realruns):
    assert [name for name, _ in find_runs(str(realruns))] == sorted(REALRUNS)


@pytest.mark.parametrize("rel", sorted(REALRUNS))
def test_realrun_mapping(realruns, rel):
    source, series = REALRUNS[rel]
    run = load_run(str(realruns / rel))
    assert run.source == source
    assert set(run.series) == series
    for s in run.series.values():
        assert len(s.steps) and np.all(np.diff(s.steps) > 0)
    assert "epoch" not in run.unknown_tags and "hp_metric" not in run.unknown_tags


def test_realrun_values(realruns):
    """Spot checks against the values the third-party files are documented to hold."""
    yolo = load_run(str(realruns / "Aydana1__Enhancing_YOLOv5l/runs/train/yolov5m6_34"))
    val = yolo.series["val_loss"]
    assert np.isnan(val.values[val.steps == 10][0])  # val/obj_loss and val/cls_loss are NaN at epoch 10
    assert np.isfinite(yolo.series["loss"].values).all()
    keras = load_run(str(realruns / "TheCodeheadMT__TensorBoard-Tutorial/archive/logs/mod1-reuters-1690485395"))
    assert keras.series["loss"].values[0] == pytest.approx(2.387, abs=1e-3)
    assert keras.series["val_loss"].values.min() == pytest.approx(0.814, abs=1e-3)
    assert int(np.argmin(keras.series["val_loss"].values)) == 8
    assert any("dense_3/kernel_0/histogram" in t for t in keras.unknown_tags)
    hf = load_run(str(realruns / "aarugunj27__EnzymeKcatAnaylsis/logs"))
    np.testing.assert_array_equal(hf.series["total_grad_norm"].steps, np.arange(10, 101, 10))
    assert hf.series["total_grad_norm"].values[-1] == pytest.approx(55.32, abs=0.01)
    ppo = load_run(str(realruns / "ZakSingh__omelette/ppo_logs/egraph-v0__PropLang_3__1__1655386763"))
    assert any("ends inside a record" in w for w in ppo.warnings)  # the committed file is cut 21 bytes short
    assert "losses/value_loss" in ppo.unknown_tags


def test_realruns_copied_and_grown_live(realruns, tmp_path):
    """A third-party file delivered in pieces (as a live job writes it) ends with the same arrays."""
    src = realruns / "dparra2399__LearnedCoWSiP/experiments/illum_models/n2400_k8_sigma80"
    event = tfevents(src)[0]
    whole = load_run(str(src))
    dst = tmp_path / "run"
    dst.mkdir()
    shutil.copy(src / "hparams.yaml", dst / "hparams.yaml")
    data = event.read_bytes()
    store = RunStore(str(tmp_path))
    versions = []
    with open(dst / event.name, "wb") as f:
        for cut in np.linspace(0, len(data), 7).astype(int)[1:]:
            f.write(data[f.tell():cut])
            f.flush()
            store.refresh()
            versions.append(store.version("run"))
    run = store.get("run")
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    for name in ("loss", "val_loss"):
        np.testing.assert_array_equal(run.series[name].steps, whole.series[name].steps)
        np.testing.assert_array_equal(run.series[name].values, whole.series[name].values)
    assert run.source == "lightning"


def test_two_hundred_small_runs(tmp_path):
    for i in range(200):
        with GradientWriter(tmp_path / f"sweep/trial_{i:03d}") as w:
            for s in range(5):
                w.write(s, ["a", "b"], grad_norm=[1.0 + i, 2.0], loss=1.0)
    store = RunStore(str(tmp_path))
    store.refresh()
    names = store.run_names()
    assert len(names) == 200 and names[0] == "sweep/trial_000"
    assert store.get("sweep/trial_137").layer_metrics["grad_norm"][0, 0] == 138.0
    assert store.refresh() is False


def test_newest_file_is_chosen_by_number_not_by_text():
    """``....10`` is newer than ``....9``: only the older file counts as finished (a truncated tail is reported)."""
    older, newer = "d/events.out.tfevents.1700000000.h.42.9", "d/events.out.tfevents.1700000000.h.42.10"
    assert RunStore._finished([(newer, "main"), (older, "main")]) == [older]


# ------------------------------------------------------------------------------------------------ Keras layouts


KERAS_MONITOR_ONLY = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    from tb_gradient_plugin.keras import GradientMonitorCallback
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(128, 4)).astype("float32")
    y = (x @ np.random.normal(size=(4, 1))).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, epochs=2, batch_size=32, validation_split=0.25, verbose=0,
              callbacks=[GradientMonitorCallback(sys.argv[1])])
""")


@pytest.mark.slow
def test_keras_log_dir_written_by_our_callback_alone(tmp_path):
    """Only our Keras callback ran (no Keras ``TensorBoard``): it wrote ``log_dir/train``. ``load_run(log_dir)`` is
    that run; the logdir's run list, the plugin and the auditor name it ``train``, as TensorBoard does."""
    log_dir = tmp_path / "exp"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KERAS_MONITOR_ONLY, str(log_dir)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.parent.name for p in tfevents(log_dir)] == ["train"]

    run = load_run(str(log_dir))
    assert run.name == "exp" and run.source == "tb_gradient_plugin"
    assert run.layers == ["hidden", "out"] and len(run.steps) == 2 * 3  # 96 training samples, batches of 32
    assert "loss" in run.series and not run.warnings
    inner = load_run(str(log_dir / "train"))
    np.testing.assert_array_equal(run.layer_metrics["grad_norm"], inner.layer_metrics["grad_norm"])

    assert find_runs(str(log_dir)) == [("train", str(log_dir / "train"))]
    assert [name for name, _ in find_runs(str(tmp_path))] == ["exp/train"]
    store = RunStore(str(log_dir))
    store.refresh()
    assert store.run_names() == ["train"]
    np.testing.assert_array_equal(store.get("train").layer_metrics["grad_norm"], run.layer_metrics["grad_norm"])

    exe = Path(sys.executable).with_name("tb-gradient")
    proc = subprocess.run([str(exe), "audit", "--json", str(log_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)
    assert [(r["run"], r["steps"]) for r in doc["runs"]] == [("train", 6)]


def test_keras_layouts_load_run_reads_the_log_dir_it_was_given(tmp_path):
    """The directories our Keras callback and Keras' own callback write, without training (see the slow test)."""
    ours = tmp_path / "ours"
    write_run(ours / "train", range(20))
    run = load_run(str(ours))
    assert run.steps.tolist() == list(range(20)) and run.layers == LAYERS
    assert find_runs(str(ours)) == [("train", str(ours / "train"))]  # TensorBoard's name for it

    # A directory with event files of its own is a run by itself: a train/ beside them (not Keras') is another run.
    mixed = tmp_path / "mixed"
    write_run(mixed, range(5))
    write_run(mixed / "train", range(100, 130))
    assert load_run(str(mixed)).steps.tolist() == list(range(5))
    assert [name for name, _ in find_runs(str(mixed))] == [".", "train"]

    # Keras' TensorBoard callback also ran (its .v2 files): train/ and validation/ are one run under the parent.
    both = tmp_path / "both"
    write_run(both / "train", range(10))
    (both / "validation").mkdir()
    shutil.copy(tfevents(both / "train")[0], both / "validation" / "events.out.tfevents.1.host.1.v2")
    assert find_runs(str(both)) == [(".", str(both))]
    assert load_run(str(both)).steps.tolist() == list(range(10))
