"""Lightning: real ``Trainer.fit`` runs on the CPU with a tiny model, read back with the run store."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tb_gradient_plugin.guard import GUARD_RAISE, GUARD_SKIP, GradientExplosionError
from tb_gradient_plugin.lightning import GradientMonitorCallback
from tb_gradient_plugin.runs import load_run

LAYERS = ["net.0", "net.2", "net.4"]


class TinyModule(pl.LightningModule):
    """An MLP; at ``spike_step`` the gradient of ``net.2`` is multiplied by ``spike`` (a tensor hook)."""

    def __init__(self, optimizer: str = "sgd", spike_step: int | None = None, spike: float = 1e4,
                 manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        self.optimizer_name, self.spike_step, self.spike = optimizer, spike_step, spike
        self.automatic_optimization = not manual
        self.net[2].weight.register_hook(self._spike)

    def _spike(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.spike if self.trainer.global_step == self.spike_step else grad

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Reference(pl.Callback):
    """Per-layer gradient L2 norms computed independently, where Lightning exposes them (pre-clip, unscaled)."""

    def __init__(self) -> None:
        self.norms: dict[int, list[float]] = {}
        self.weights: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._before: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        norms = []
        for i in (0, 2, 4):
            layer = pl_module.net[i]
            sq = sum(float(p.grad.double().square().sum()) for p in layer.parameters() if p.grad is not None)
            norms.append(sq ** 0.5)
        self.norms[step] = norms

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights[trainer.global_step - 1] = (self._before, [p.detach().clone() for p in pl_module.parameters()])


def _data(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g)), batch_size=4)


def _trainer(tmp_path, callbacks, max_steps: int, **kwargs) -> pl.Trainer:
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      log_every_n_steps=1, **kwargs)


def _run_dir(tmp_path) -> str:
    return os.path.join(str(tmp_path), "run", "version_0")


def test_fit_writes_into_the_loggers_run_with_accumulation_and_clipping(tmp_path):
    ours, ref = GradientMonitorCallback(), Reference()
    clip = 0.05
    trainer = _trainer(tmp_path, [ours, ref], max_steps=12, accumulate_grad_batches=2, gradient_clip_val=clip)
    trainer.fit(TinyModule(), _data())

    run_dir = _run_dir(tmp_path)
    assert len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) == 1  # Lightning's own file, shared
    run = load_run(run_dir)
    assert run.source == "tb_gradient_plugin"
    assert run.layers == LAYERS
    assert run.steps.tolist() == list(range(12))
    expected = np.array([ref.norms[s] for s in range(12)])
    np.testing.assert_allclose(run.layer_metrics["grad_norm"], expected, rtol=1e-5)
    total = run.series["total_grad_norm"].values
    np.testing.assert_allclose(total, np.sqrt((expected ** 2).sum(axis=1)), rtol=1e-5)
    assert (total > clip).all()  # recorded before clipping ...
    # gradient_clip_val (by norm, Lightning's default) is recorded as the clip threshold, with every step
    np.testing.assert_allclose(run.series["clip_threshold"].values, clip, rtol=1e-6)
    assert run.series["clip_threshold"].steps.tolist() == list(range(12))
    # ... while the applied SGD update was clipped: update = lr * grad * clip / total
    later = slice(1, None)  # the first step's weights copy needs gradients at the optimizer's pre-step hook
    np.testing.assert_allclose(run.layer_metrics["update_norm"][later],
                               0.05 * expected[later] * (clip / total[later])[:, None], rtol=1e-3)
    # Lightning's own scalars sit in the same run, on the same step axis (train_loss becomes the loss series)
    assert run.series["loss"].steps.tolist() == list(range(12))
    assert "guard_action" not in run.series


def test_guard_skip_in_fit_leaves_weights_and_adam_state_unchanged(tmp_path):
    ours, ref = GradientMonitorCallback(on_explosion="skip", every=10), Reference()
    adam_steps: list[int] = []

    class AdamState(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            state = trainer.optimizers[0].state[pl_module.net[2].weight]
            adam_steps.append(int(state["step"]))

    trainer = _trainer(tmp_path, [ref, ours, AdamState()], max_steps=40)  # ref sees the gradients before the skip
    trainer.fit(TinyModule("adam", spike_step=33), _data(200))

    before, after = ref.weights[33]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    before, after = ref.weights[32]
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert adam_steps[32] == adam_steps[33] == 33  # Adam did not count the skipped step
    assert [d.step for d in ours.guard.decisions] == [33]
    assert ours.guard.decisions[0].episodes[0].layers[0].name == "net.2"

    run = load_run(_run_dir(tmp_path))
    actions = run.series["guard_action"]
    assert actions.steps.tolist() == [0, 10, 20, 30, 33]
    assert actions.values.tolist() == [0, 0, 0, 0, GUARD_SKIP]
    i, j = run.steps.tolist().index(33), LAYERS.index("net.2")
    assert run.layer_metrics["grad_norm"][i, j] == pytest.approx(ref.norms[33][j], rel=1e-5)


def test_guard_raise_stops_fit_and_records_the_step(tmp_path):
    ours = GradientMonitorCallback(on_explosion="raise", every=5)
    trainer = _trainer(tmp_path, [ours], max_steps=40)
    with pytest.raises(GradientExplosionError) as info:
        trainer.fit(TinyModule(spike_step=31), _data(200))
    assert info.value.step == 31 and info.value.episode.layers[0].name == "net.2"
    assert ours.monitor.closed
    actions = load_run(_run_dir(tmp_path)).series["guard_action"]
    assert actions.steps[-1] == 31 and actions.values[-1] == GUARD_RAISE


def test_16bit_amp_with_a_grad_scaler_records_unscaled_norms_and_overflow_skips(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    # An overflow at step 5 is the scaler's business: the guard must not raise on it.
    ours, ref = GradientMonitorCallback(on_explosion="raise"), Reference()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = _trainer(tmp_path, [ref, ours], max_steps=8, plugins=[plugin])
    trainer.fit(TinyModule(spike_step=5, spike=float("inf")), _data())
    run = load_run(_run_dir(tmp_path))
    assert run.steps.tolist() == list(range(8))
    expected = np.array([ref.norms[s] for s in range(8)])
    np.testing.assert_allclose(run.layer_metrics["grad_norm"], expected, rtol=1e-5)
    assert expected[:5].max() < 100  # unscaled: scaled gradients would be ~4096x larger
    assert run.series["loss_scale"].values[0] == 2.0 ** 12
    assert run.series["loss_scale"].values[6] == 2.0 ** 11  # backed off after the overflow
    assert run.series["step_skipped"].values.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert run.series["guard_action"].values.tolist() == [0] * 8
    assert ours.guard.decisions == []


def test_manual_optimization_and_a_given_logdir(tmp_path):
    logdir = tmp_path / "grads"
    ours, ref = GradientMonitorCallback(logdir, group_depth=1), Reference()
    trainer = _trainer(tmp_path, [ours, ref], max_steps=6, precision="bf16-mixed")
    trainer.fit(TinyModule(manual=True), _data())
    run = load_run(str(logdir))
    assert run.layers == ["net"]  # grouped into one row
    assert run.steps.tolist() == list(range(6))
    expected = np.sqrt((np.array([ref.norms[s] for s in range(6)]) ** 2).sum(axis=1))
    np.testing.assert_allclose(run.layer_metrics["grad_norm"][:, 0], expected, rtol=1e-5)


def test_bad_arguments_fail_when_the_callback_is_built():
    with pytest.raises(ValueError, match="on_explosion"):
        GradientMonitorCallback(on_explosion="explode")
    with pytest.raises(ValueError, match="every"):
        GradientMonitorCallback(every=0)
