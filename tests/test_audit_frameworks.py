"""Logdirs written by real training (PyTorch with our monitor, Keras with both callbacks, Lightning's own grad_norm)
audited end to end: the run store maps them and the auditor finds the explosion where training produced one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tb_gradient_plugin.runs import find_runs, load_run

pytestmark = pytest.mark.slow


def run_script(code: str, *args: str, timeout: float = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def audit(*args: str) -> tuple[int, dict]:
    exe = Path(sys.executable).with_name("tb-gradient")
    proc = subprocess.run([str(exe), "audit", "--json", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    assert proc.stdout.lstrip().startswith("{"), f"stdout: {proc.stdout[:3000]!r}\nstderr: {proc.stderr[-3000:]}"
    return proc.returncode, json.loads(proc.stdout)


TORCH_TRAINING = """
    import sys, torch
    from torch import nn
    from tb_gradient_plugin.torch import GradientMonitor
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = GradientMonitor(model, opt, sys.argv[1])
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    explode_at = int(sys.argv[2])
    for step in range(300):
        i = torch.randint(0, 256, (32,))
        yb = y[i] * (1e4 if step == explode_at else 1.0)  # one corrupted batch: labels off by 10^4
        loss = nn.functional.mse_loss(model(x[i]), yb)
        opt.zero_grad()
        loss.backward()
        monitor.log_loss(loss)
        opt.step()
    monitor.close()
"""


def test_torch_monitor_runs(tmp_path):
    run_script(TORCH_TRAINING, str(tmp_path / "clean"), "-1")
    run_script(TORCH_TRAINING, str(tmp_path / "exploded"), "200")
    run = load_run(str(tmp_path / "exploded"))
    assert run.source == "tb_gradient_plugin" and len(run.layers) == 3 and len(run.steps) == 300
    assert {"grad_norm", "param_norm", "update_norm"} <= set(run.layer_metrics)
    code, doc = audit(str(tmp_path))
    runs = {r["run"]: r for r in doc["runs"]}
    assert code == 1
    assert not [e for e in runs["clean"]["episodes"] if e["kind"] in ("explosion", "nonfinite")]
    bad = [e for e in runs["exploded"]["episodes"] if e["kind"] in ("explosion", "nonfinite")]
    assert bad and bad[0]["start_step"] <= 200 <= bad[0]["end_step"]
    assert bad[0]["layers"][0]["name"] in run.layers
    assert runs["exploded"]["loss_spikes"] and runs["exploded"]["loss_spikes"][0]["step"] == 200


KERAS_TRAINING = """
    import sys, numpy as np, keras
    from tb_gradient_plugin.keras import GradientMonitorCallback
    keras.utils.set_random_seed(0)
    logdir = sys.argv[1]
    x = np.random.normal(size=(512, 8)).astype("float32")
    y = (x @ np.random.normal(size=(8, 1))).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, epochs=4, batch_size=32, validation_split=0.25, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(logdir, update_freq="batch"), GradientMonitorCallback(logdir)])
"""


def test_keras_callbacks_make_one_run(tmp_path):
    run_script(KERAS_TRAINING, str(tmp_path / "keras_run"))
    assert [name for name, _ in find_runs(str(tmp_path))] == ["keras_run"]  # train/ + validation/ = one run
    run = load_run(str(tmp_path / "keras_run"))
    assert run.source == "tb_gradient_plugin"
    assert run.layers == ["hidden", "out"]
    assert len(run.steps) == 4 * 12
    assert "val_loss" in run.series and "loss" in run.series
    assert run.series["val_loss"].values.min() < run.series["val_loss"].values[0]
    code, doc = audit(str(tmp_path))
    assert code == 0 and doc["runs"][0]["run"] == "keras_run" and doc["runs"][0]["layers"] == 2


LIGHTNING_TRAINING = """
    import sys, torch, lightning as L
    from torch import nn
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import grad_norm
    torch.manual_seed(0)
    torch.set_num_threads(1)

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 16)
            self.head = nn.Linear(16, 1)
        def training_step(self, batch, i):
            x, y = batch
            loss = nn.functional.mse_loss(self.head(torch.tanh(self.enc(x))), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss
        def on_before_optimizer_step(self, optimizer):
            self.log_dict(grad_norm(self, norm_type=2), on_step=True, on_epoch=True)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = torch.utils.data.TensorDataset(torch.randn(320, 8), torch.randn(320, 1))
    trainer = L.Trainer(max_epochs=3, logger=TensorBoardLogger(sys.argv[1], name="lit"), log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        accelerator="cpu")
    trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=32))
"""


def test_lightning_grad_norm_logging(tmp_path):
    run_script(LIGHTNING_TRAINING, str(tmp_path))
    ((name, path),) = find_runs(str(tmp_path))
    assert name == "lit/version_0"
    run = load_run(path)
    assert run.source == "lightning"
    assert run.layers == ["enc", "head"]  # enc.weight + enc.bias folded into enc
    assert len(run.steps) == 30 and run.present.all()
    assert set(run.series) >= {"loss", "total_grad_norm"}
    # per-layer norms folded from per-parameter ones: the layers together give the logged total norm
    total = run.series["total_grad_norm"]
    folded = np.sqrt(np.sum(run.layer_metrics["grad_norm"].astype(np.float64) ** 2, axis=1))
    rows = np.searchsorted(run.steps, total.steps)
    np.testing.assert_allclose(folded[rows], total.values, rtol=1e-4)
    code, doc = audit(str(tmp_path))
    assert code == 0 and doc["runs"][0]["source"] == "lightning" and doc["runs"][0]["layers"] == 2
