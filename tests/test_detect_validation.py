"""Validation degradation: overfitting vs instability vs NaN, the early-stopping point, on synthetic and real runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tb_gradient_plugin.detect import VAL_KIND, DetectorConfig, detect
from tb_gradient_plugin.runs import RunData, Series, load_run
from tests.test_detect import _online, _run

EXPLOSION_KINDS = {"explosion", "nonfinite"}  # what the auditor's --fail-on explosion fails on


def _epochs(values, every: int = 100) -> Series:
    v = np.asarray(values, dtype=np.float64)
    return Series(np.arange(1, v.size + 1, dtype=np.int64) * every, v)


def _u_curve(n: int, best: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n)
    return (1.0 + 0.01 * (t - best) ** 2) * np.exp(rng.normal(0, 0.002, n))


def test_overfitting_names_the_best_step_and_is_not_an_explosion():
    rng = np.random.default_rng(0)
    run = _run(loss=np.linspace(3, 0.5, 2000))
    run.series["val_loss"] = _epochs(_u_curve(19, 7, rng))
    rep = detect(run)
    (ep,) = rep.episodes
    assert ep.kind == VAL_KIND and ep.kind not in EXPLOSION_KINDS
    assert ep.validation["cause"] == "overfitting"
    assert ep.validation["early_stopping_step"] == ep.start_step == 800
    assert any("overfitting" in a and "Stop early at step 800" in a for a in ep.advice)
    doc = json.loads(json.dumps(rep.to_json()))
    assert doc["validation"][0]["best_step"] == 800 and doc["validation"][0]["cause"] == "overfitting"


def test_worsening_with_a_gradient_episode_is_instability():
    rng = np.random.default_rng(1)
    loss = np.linspace(3, 0.5, 2000)
    loss[1004] *= 10  # the training loss reacts to the blow-up: an explosion
    run = _run(loss=loss)
    val = np.linspace(2, 1, 19) * np.exp(rng.normal(0, 0.005, 19))
    val[10:] *= 1.6  # jumps after the blow-up at step 1000 and stays up
    run.series["val_loss"] = _epochs(val)
    run.layer_metrics["grad_norm"][1000:1003, 2] *= 300
    rep = detect(run)
    assert [e.kind for e in rep.episodes] == ["explosion", VAL_KIND]  # same start step: gradients first
    val_ep = rep.episodes[1]
    assert val_ep.validation["cause"] == "instability" and val_ep.validation["related_step"] == 1000
    assert val_ep.start_step == 1000  # the best evaluation came right before the blow-up


def test_nan_validation_is_a_nonfinite_finding_and_healthy_validation_is_quiet():
    rng = np.random.default_rng(2)
    run = _run(loss=np.linspace(3, 0.5, 2000))
    val = np.linspace(2, 1, 19) * np.exp(rng.normal(0, 0.01, 19))
    run.series["val_loss"] = _epochs(val)
    rep = detect(run)
    assert rep.episodes == [] and rep.validation[0].cause is None
    assert rep.validation[0].best_step == 100 * (int(np.argmin(val)) + 1)
    val[12] = np.nan
    run.series["val_loss"] = _epochs(val)
    (ep,) = detect(run).episodes
    assert ep.kind == "nonfinite" and ep.validation["cause"] == "nonfinite" and ep.start_step == 1300


def test_metrics_that_should_rise_accuracy_and_prefixed_metrics():
    rng = np.random.default_rng(3)
    acc = 1.0 - 0.4 * _u_curve(19, 6, rng) / 1.2
    run = RunData("m", "plain", series={"loss": _epochs(np.linspace(2, 0.2, 19)), "val_accuracy": _epochs(acc),
                                        "val_metric/f1": _epochs(acc * 0.9), "val_other": _epochs(acc)})
    rep = detect(run)
    assert sorted(e.validation["series"] for e in rep.episodes) == ["val_accuracy", "val_metric/f1"]
    for e in rep.episodes:
        assert e.validation["higher_is_better"] and e.validation["cause"] == "overfitting"
        assert e.start_step == 700


def test_online_report_equals_offline_with_validation():
    rng = np.random.default_rng(4)
    run = _run(loss=np.linspace(3, 0.5, 2000))
    run.series["val_loss"] = _epochs(_u_curve(19, 7, rng))
    run.layer_metrics["grad_norm"][1500, 3] *= 100
    assert _online(run).to_json() == detect(run).to_json()


def test_realruns_keras_overfits_at_epoch_8_and_yolov5_has_a_nan_validation(realruns):
    keras_run = load_run(os.path.join(realruns, "TheCodeheadMT__TensorBoard-Tutorial/archive/logs/"
                                                "mod1-reuters-1690485395"))
    (ep,) = detect(keras_run).episodes
    assert ep.kind == VAL_KIND and ep.validation["cause"] == "overfitting"
    assert abs(ep.validation["best_step"] - 8) <= 1
    yolo = detect(load_run(os.path.join(realruns, "Aydana1__Enhancing_YOLOv5l/runs/train/yolov5m6_34")))
    assert [(e.kind, e.validation["cause"], e.start_step) for e in yolo.episodes] == [("nonfinite", "nonfinite", 10)]
    assert not [e for e in yolo.episodes if e.kind == "explosion"]


@pytest.mark.slow
def test_real_torch_run_trained_to_overfit(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter

    from tb_gradient_plugin.torch import GradientMonitor

    torch.manual_seed(0)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=gen)
    x_train, x_val = torch.randn(24, 8, generator=gen), torch.randn(256, 8, generator=gen)
    y_train = x_train @ w + 1.0 * torch.randn(24, 1, generator=gen)  # tiny noisy data, big model: memorizes
    y_val = x_val @ w + 1.0 * torch.randn(256, 1, generator=gen)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(model, opt, str(tmp_path), every=1)
    val_writer = SummaryWriter(str(tmp_path))
    for step in range(600):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x_train), y_train)
        monitor.log_loss(loss)
        loss.backward()
        opt.step()
        if step % 20 == 19:
            with torch.no_grad():
                val_writer.add_scalar("val_loss", nn.functional.mse_loss(model(x_val), y_val).item(), step + 1)
    monitor.close()
    val_writer.close()
    run = load_run(str(tmp_path))
    val = run.series["val_loss"]
    rep = detect(run)
    eps = [e for e in rep.episodes if e.kind == VAL_KIND]
    assert len(eps) == 1 and eps[0].validation["cause"] == "overfitting"
    true_best = int(np.nonzero(val.steps == val.steps[np.argmin(val.values)])[0][0])
    found = int(np.nonzero(val.steps == eps[0].validation["best_step"])[0][0])
    assert abs(found - true_best) <= 1
    assert not [e for e in rep.episodes if e.kind in EXPLOSION_KINDS]


def test_few_evaluations_or_noise_sized_worsening_is_not_a_degradation():
    run = _run(loss=np.linspace(3, 0.5, 2000))
    # flat validation with 12% evaluation noise: the best point is chance, and so is a 5% "worsening" after it
    noise = np.exp(np.random.default_rng(0).normal(0, 0.12, 19))
    run.series["val_loss"] = _epochs(noise)
    rep = detect(run)
    assert rep.episodes == [] and rep.validation[0].cause is None
    assert detect(run, DetectorConfig(val_noise_z=0)).validation[0].cause == "overfitting"  # the 5% rule alone
    # the same noise on a real U-shaped curve (2x worse at the end) is still overfitting
    run.series["val_loss"] = _epochs(_u_curve(19, 6, np.random.default_rng(1)) * noise)
    assert detect(run).validation[0].cause == "overfitting"
    # the same U-shaped curve as the overfitting test but only 5 evaluations: too few to judge, best still named
    run.series["val_loss"] = _epochs([1.3, 1.0, 1.1, 1.3, 1.4], every=400)
    rep = detect(run)
    assert rep.episodes == [] and rep.validation[0].best_step == 800 and rep.validation[0].cause is None


def test_realruns_dlgn_chance_level_accuracy_is_not_overfitting(realruns):
    """5 evaluations of val_acc between 0.46 and 0.52 (chance level): not an overfitting finding."""
    run = load_run(os.path.join(realruns, "AnAccountWithoutAName__Deep-Lineary-Gated-Networks", "lightning_logs",
                                "version_0"))
    rep = detect(run)
    assert [e for e in rep.episodes if e.kind == VAL_KIND] == []
    assert {v.series for v in rep.validation} == {"val_loss", "val_accuracy"}
    assert all(v.cause is None for v in rep.validation)
