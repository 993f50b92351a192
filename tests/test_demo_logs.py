"""demo_logs/: the committed runs show what the README promises, and the script that made them still runs.

Every feature of the tab has a run that shows it: explosions and NaN (the MLP with its learning rate raised, the
unclipped RNN, the Keras run at a too-high learning rate, the Flax run whose schedule raises its learning rate, a plain
``SummaryWriter`` run), AMP overflow skips that are
not explosions, per-layer gradient histograms (the MLP pair, the RNN pair, the too-high Keras run), validation
series (the MLP pair and the Keras pair on held-out sets) and a validation that degrades while the training loss
keeps falling (``mlp_overfit``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.detect import hist_quantile
from tb_gradient_plugin.runs import RunData, find_runs, load_run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo_logs"
EXPLODING = {"mlp_lr_raised", "rnn_no_clip", "keras_high_lr", "plain_summarywriter", "flax_lr_raised"}
HEALTHY = {"mlp_healthy", "rnn_clipped", "keras_sane", "flax_healthy"}
OVERFITTING = {"mlp_overfit"}
ALL_RUNS = EXPLODING | HEALTHY | OVERFITTING | {"amp_overflow"}
#: Runs with gradient histograms, and the cadence they were recorded at (``histograms_every``).
HISTOGRAMS = {"mlp_healthy": 10, "mlp_lr_raised": 10, "rnn_no_clip": 5, "rnn_clipped": 5, "keras_high_lr": 2}
#: Runs with a held-out validation loss.
VALIDATION = {"mlp_healthy", "mlp_lr_raised", "mlp_overfit", "keras_sane", "keras_high_lr"}
GRADIENT_KINDS = {"explosion", "nonfinite", "overflow_skip"}
#: Where the learning rate of ``mlp_lr_raised`` is raised 100x (half of its 600 steps).
LR_RAISED_AT = 300


@pytest.fixture(scope="module")
def demo_audit() -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "tb_gradient_plugin", "audit", str(DEMO), "--json",
                          "--fail-on", "never"], capture_output=True, text=True, check=True)
    return {r["run"]: r for r in json.loads(out.stdout)["runs"]}


@pytest.fixture(scope="module")
def runs() -> dict[str, RunData]:
    return {name: load_run(path, name) for name, path in find_runs(str(DEMO))}


def _gradient_episodes(report: dict) -> list[dict]:
    """Episodes about gradients (a validation finding carries a ``validation`` object and names no layer)."""
    return [e for e in report["episodes"] if e["kind"] in GRADIENT_KINDS and e["validation"] is None]


def _layer_hist(run: RunData, layer: str) -> tuple[np.ndarray, np.ndarray]:
    assert run.histograms is not None, run.name
    return np.asarray(run.hist_steps), run.histograms[:, run.layers.index(layer)]


def _live_median(counts: np.ndarray) -> float:
    """log10 of the median |g| of the entries that are neither exactly zero nor non-finite (dead ReLU units give
    exact zeros; the entries that learn are the rest)."""
    live = counts.copy()
    live[fmt.HIST_ZERO] = 0
    live[fmt.HIST_NONFINITE] = 0
    return hist_quantile(live, 0.5)


# ----------------------------------------------------------------------------------------------- runs and episodes


def test_demo_logs_are_small_and_complete(demo_audit):
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 5 * 1024 * 1024
    names = {name.split("/")[0] for name in demo_audit}
    assert names == ALL_RUNS


def test_exploding_runs_are_flagged_and_healthy_runs_are_clean(demo_audit):
    by_top = {name.split("/")[0]: rep for name, rep in demo_audit.items()}
    for name in EXPLODING:
        kinds = {e["kind"] for e in _gradient_episodes(by_top[name])}
        assert kinds & {"explosion", "nonfinite"}, (name, kinds)
    for name in HEALTHY:
        assert [e["kind"] for e in by_top[name]["episodes"]] == [], name
    for name in OVERFITTING:  # healthy gradients: its only findings are about validation
        assert _gradient_episodes(by_top[name]) == [], name
        assert {e["kind"] for e in by_top[name]["episodes"]} == {"val_degradation"}, name


def test_keras_high_lr_kills_its_layers_and_says_so(demo_audit):
    """After the 134x spike at step 34, 8 of the 9 layers' gradients are exactly zero to the end: one dead finding,
    after that explosion, which fails ``--fail-on any`` but not ``--fail-on explosion``."""
    rep = next(r for name, r in demo_audit.items() if name.startswith("keras_high_lr"))
    explosion, dead = [e for e in rep["episodes"] if e["kind"] in ("explosion", "dead")]
    assert explosion["start_step"] == 34 and "collapse" in explosion["confirmed_by"]
    assert dead["dead"] == {"layers": 8, "of": 9, "from_step": 45, "vanished": 0, "after_episode": 34,
                            "restart_before": 34}
    assert dead["end_step"] == rep["steps"] - 1 and "out" not in [f["name"] for f in dead["layers"]]
    assert any("restart from a checkpoint from before step 34" in a.lower() for a in dead["advice"])
    # The only other dead finding: the first layer of the Flax run, whose gradients are exactly zero from just after
    # its learning rate was raised (its ReLU units all died) while the later layers' turned non-finite.
    dead = [(name, e["dead"]) for name, r in demo_audit.items() if not name.startswith("keras_high_lr")
            for e in r["episodes"] if e["kind"] == "dead"]
    assert dead == [("flax_lr_raised", {"layers": 1, "of": 7, "from_step": 154, "vanished": 0, "after_episode": 150,
                                        "restart_before": 150})]


def test_flax_run_records_the_schedules_raise_and_the_explosion_it_caused(demo_audit, runs):
    """The Flax pair, trained through the wrapped Optax optimizer: the learning rate the schedule raised 100x at step
    150 is recorded from the optimizer state, the explosion turns non-finite right after it, and the healthy twin
    (the same batches) is clean with finite update ratios throughout."""
    raised = runs["flax_lr_raised"]
    lr = raised.series["lr"]
    assert lr.values[lr.steps == 149][0] == pytest.approx(0.005) and lr.values[lr.steps == 150][0] == pytest.approx(0.5)
    assert raised.layers == [f"Dense_{i}" for i in range(7)]
    [episode] = _gradient_episodes(demo_audit["flax_lr_raised"])
    assert episode["kind"] == "nonfinite" and episode["start_step"] == 150
    assert any("learning rate rose from 0.005 to 0.5 (at step 150" in a for a in
               next(e for e in demo_audit["flax_lr_raised"]["episodes"] if e["kind"] == "dead")["advice"])
    healthy = runs["flax_healthy"]
    assert len(healthy.steps) == 300 and np.isfinite(healthy.update_ratio()).all()


def test_amp_overflow_skips_are_not_explosions(demo_audit):
    rep = demo_audit["amp_overflow"]
    skips = [e for e in rep["episodes"] if e["kind"] == "overflow_skip"]
    assert skips and all(e["layers"] == [] and e["severity"] == 0 for e in skips)  # no offending layer, no alarm
    assert rep["amp"] == {"skipped": 11, "logged_steps": 400, "last_scale": 2.0**19, "collapsed": False,
                          "summary": "AMP skipped 11 of 400 steps; the loss scale settled at 2^19: normal"}
    run = load_run(str(DEMO / "amp_overflow"))
    skipped_steps = run.series["step_skipped"].steps[run.series["step_skipped"].values > 0]
    for e in rep["episodes"]:
        if e["kind"] in ("explosion", "nonfinite"):
            inside = (skipped_steps >= e["start_step"]) & (skipped_steps <= e["end_step"])
            assert not inside.any(), e


def test_plain_summarywriter_run_is_audited_without_our_writer(demo_audit):
    run = load_run(str(DEMO / "plain_summarywriter"))
    assert run.source == "plain" and not run.layers
    assert {"loss", "total_grad_norm"} <= set(run.series)


# ------------------------------------------------------------------------------------------------------ histograms


def test_histograms_are_recorded_where_they_tell_a_story(runs):
    for name, run in runs.items():
        if name not in HISTOGRAMS:
            assert run.histograms is None, name
            continue
        every = HISTOGRAMS[name]
        assert run.histograms is not None and run.histograms.shape[1:] == (len(run.layers), fmt.HIST_BINS), name
        steps = np.asarray(run.hist_steps)
        assert steps[0] == 0 and (np.diff(steps) == every).all(), name
        assert steps[-1] > run.steps[-1] - every, name
        # Every histogram counts every gradient entry of its layer once: the same total at every step.
        totals = run.histograms.sum(axis=2)
        assert (totals == totals[:1]).all() and (totals > 0).all(), name


def test_histograms_count_every_parameter_of_the_layer(runs):
    """The bins hold the layers' real entry counts (weights + biases of the models the script trains)."""
    def per_layer(run: RunData) -> dict[str, int]:
        return dict(zip(run.layers, run.histograms[0].sum(axis=1).tolist(), strict=True))

    mlp = per_layer(runs["mlp_lr_raised"])
    assert mlp["fc0"] == 16 * 64 + 64 and mlp["fc5"] == 64 * 64 + 64 and mlp["head"] == 64 + 1
    rnn = per_layer(runs["rnn_no_clip"])
    assert rnn == {"rnn": 8 * 64 + 64 * 64 + 2 * 64, "head": 64 + 1}
    keras = per_layer(runs["keras_high_lr"])
    assert keras["dense_0"] == 16 * 64 + 64 and keras["out"] == 64 + 1


def test_raised_learning_rate_blows_up_every_entry_and_the_healthy_twin_stays(runs):
    """``mlp_lr_raised``: every entry of every layer is finite at step 290 and non-finite at step 310, ten steps
    after the 100x learning rate. ``mlp_healthy`` (the same model and batches): over the same steps and after the
    first 100, the median |g| of every layer stays within a decade of its typical value."""
    raised = runs["mlp_lr_raised"]
    for layer in raised.layers:
        steps, counts = _layer_hist(raised, layer)
        before, after = counts[steps == LR_RAISED_AT - 10][0], counts[steps == LR_RAISED_AT + 10][0]
        assert before[fmt.HIST_NONFINITE] == 0 and after[fmt.HIST_NONFINITE] == after.sum(), layer
    healthy = runs["mlp_healthy"]
    for layer in healthy.layers:
        steps, counts = _layer_hist(healthy, layer)
        medians = np.array([_live_median(c) for c in counts[steps >= 100]])
        assert np.abs(medians - np.median(medians)).max() < 1.0, (layer, medians)


def test_unclipped_rnn_histograms_blow_up_and_clipped_ones_stay(runs):
    steps, no_clip = _layer_hist(runs["rnn_no_clip"], "rnn")
    _, clipped = _layer_hist(runs["rnn_clipped"], "rnn")
    top = np.array([hist_quantile(c, 1.0) for c in no_clip])
    assert top.max() - top[0] >= 5  # the largest |g| grows by 5 decades and more before the NaN
    assert no_clip[-1][fmt.HIST_NONFINITE] == no_clip[-1].sum()  # then every entry is non-finite
    assert (clipped[:, fmt.HIST_NONFINITE] == 0).all()
    medians = np.array([hist_quantile(c, 0.5) for c in clipped])
    assert np.ptp(medians) < 2  # the clipped twin's distribution stays put within two decades


def test_auditor_compares_histograms_in_the_episode_advice(demo_audit):
    """The auditor's advice reads the histograms: a too-high learning rate moves most entries (a scale problem), in
    the Keras run at its one-step explosion (34 vs 32) and in the unclipped RNN (over its few non-zero entries). The
    raised MLP gets none: its histogram at the raise (300) holds gradients taken before the new rate acted, and the
    next one (310) is all NaN, which says nothing about magnitudes."""
    for name, where in (("keras_high_lr", "at step 34 vs step 32"), ("rnn_no_clip", "vs step 20")):
        [episode] = _gradient_episodes(demo_audit[name])
        hist = [a for a in episode["advice"] if "gradient histogram" in a]
        assert len(hist) == 1, (name, episode["advice"])
        assert f"{where} (before the episode)" in hist[0] and "Most entries grew" in hist[0], hist[0]
    [episode] = _gradient_episodes(demo_audit["mlp_lr_raised"])
    assert not [a for a in episode["advice"] if "gradient histogram" in a], episode["advice"]


# ------------------------------------------------------------------------------------------------------ validation


def test_validation_series_where_there_is_a_held_out_set(runs, demo_audit):
    for name, run in runs.items():
        if name not in VALIDATION:
            assert "val_loss" not in run.series, name
            continue
        val = run.series["val_loss"]
        assert len(val.steps) >= 10, name
        # evaluations are on the training step axis (Keras' iterations, not epochs)
        assert val.steps[-1] >= run.steps[-1] - 1 and val.steps[-1] > len(val.steps), name
    for name in ("mlp_healthy", "keras_sane"):
        [finding] = demo_audit[name]["validation"]
        assert finding["series"] == "val_loss" and finding["cause"] is None, name
        assert finding["best_value"] < np.nanmax(runs[name].series["val_loss"].values) / 2, name


def test_validation_of_the_exploding_mlp_turns_non_finite_after_the_raise(demo_audit):
    findings = [v for v in demo_audit["mlp_lr_raised"]["validation"] if v["cause"] == "nonfinite"]
    assert len(findings) == 1
    nan = findings[0]
    assert nan["series"] == "val_loss" and nan["best_step"] < LR_RAISED_AT
    assert LR_RAISED_AT < nan["nonfinite_steps"][0] <= LR_RAISED_AT + 20
    [gradient] = _gradient_episodes(demo_audit["mlp_lr_raised"])
    assert gradient["start_step"] <= nan["nonfinite_steps"][0]  # the gradients went first


def test_overfitting_run_is_a_validation_finding(demo_audit, runs):
    rep = demo_audit["mlp_overfit"]
    by_series = {v["series"]: v for v in rep["validation"]}
    val = by_series["val_loss"]
    assert val["cause"] == "overfitting"
    assert 20 <= val["best_step"] <= 200  # it turns early ...
    assert val["last_value"] > 1.5 * val["best_value"]  # ... and ends far worse ...
    assert val["train_loss_now"] < val["train_loss_before"] / 10  # ... while the training loss kept falling
    assert "val_accuracy" in by_series and "val_accuracy" in runs["mlp_overfit"].series
    episode = next(e for e in rep["episodes"] if (e["validation"] or {}).get("series") == "val_loss")
    assert episode["kind"] == "val_degradation" and episode["start_step"] == val["best_step"]
    assert any(f"Stop early at step {val['best_step']}" in a for a in episode["advice"])


# ----------------------------------------------------------------------------------------------------- the script


@pytest.mark.slow
def test_demo_script_runs_on_a_reduced_size(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_logs.py"), "--out", str(out), "--scale", "0.05"],
                   check=True, capture_output=True, text=True, timeout=600)
    runs = dict(find_runs(str(out)))
    assert {name.split("/")[0] for name in runs} == ALL_RUNS
    for name, path in runs.items():
        data = load_run(path, name)
        assert data.series.get("loss") is not None and len(data.series["loss"].steps) >= 20, name
        if not name.startswith("plain"):
            assert data.layers and "grad_norm" in data.layer_metrics, name
        assert (data.histograms is not None) == (name in HISTOGRAMS), name
        assert ("val_loss" in data.series) == (name in VALIDATION), name
