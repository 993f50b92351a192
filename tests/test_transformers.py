"""Hugging Face Trainer: real ``Trainer.train`` runs on the CPU with a tiny GPT-2 built from a config (no download)."""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from tb_gradient_plugin.guard import GUARD_SKIP, GradientExplosionError
from tb_gradient_plugin.runs import load_run
from tb_gradient_plugin.transformers import GradientMonitorCallback

EXPLODING = "transformer.h.1.mlp.c_fc"


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 256, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Probe(TrainerCallback):
    """HF's own view of training: its logged pre-clip ``grad_norm`` per step, and the weights around a chosen step.

    With ``spike_step`` set, the gradient of the ``EXPLODING`` layer is multiplied by ``factor`` during that step.
    """

    def __init__(self, model: GPT2LMHeadModel, spike_step: int | None = None, factor: float = 1e4) -> None:
        self.grad_norm: dict[int, float] = {}
        self.loss: dict[int, float] = {}
        self.moved: dict[int, bool] = {}
        self.adam_steps: dict[int, int] = {}
        self._step = -1
        self._before: list[torch.Tensor] = []
        self.spike_step = spike_step
        model.get_submodule(EXPLODING).weight.register_hook(
            lambda g: g * factor if self._step == spike_step else g)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step = state.global_step + 1  # the number this optimizer step is logged under
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        after = list(model.parameters())
        self.moved[state.global_step] = not all(torch.equal(a, b) for a, b in zip(self._before, after, strict=True))
        weight = model.get_submodule(EXPLODING).weight
        self.adam_steps[state.global_step] = int(optimizer.optimizer.state[weight]["step"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.grad_norm[state.global_step] = logs["grad_norm"]
            self.loss[state.global_step] = logs["loss"]


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config)


def _args(tmp_path, max_steps: int, **kwargs) -> TrainingArguments:
    base = {"output_dir": str(tmp_path), "report_to": ["tensorboard"], "use_cpu": True, "logging_steps": 1,
            "max_steps": max_steps, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
            "save_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0}
    base.update(kwargs)
    return TrainingArguments(**base)


def _only_run_dir(tmp_path) -> str:
    dirs = {os.path.dirname(p) for p in glob.glob(os.path.join(str(tmp_path), "runs", "*", "events.out.tfevents.*"))}
    assert len(dirs) == 1, dirs
    return dirs.pop()


def test_train_writes_into_hf_tensorboard_run_with_clipping_and_accumulation(tmp_path):
    model = _model()
    ours, probe = GradientMonitorCallback(), Probe(model)
    args = _args(tmp_path, 10, gradient_accumulation_steps=2, max_grad_norm=0.1)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ours, probe]).train()

    run_dir = _only_run_dir(tmp_path)  # ours and HF's event files share one run directory
    assert len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) == 2
    run = load_run(run_dir)
    assert run.source == "tb_gradient_plugin"
    assert run.steps.tolist() == list(range(1, 11))  # HF's step numbers
    assert run.layers[0] == "transformer.wte" and EXPLODING in run.layers
    assert "lm_head" not in run.layers  # tied to the embedding: recorded once, under its first owner
    # the pre-clip norm of the accumulated gradient is exactly what HF logs as grad_norm
    hf = np.array([probe.grad_norm[s] for s in range(1, 11)])
    np.testing.assert_allclose(run.series["total_grad_norm"].values, hf, rtol=1e-4)
    assert (hf > 0.1).all()  # so every step was clipped: the recorded norms are from before clipping
    # max_grad_norm is recorded as the clip threshold, with every step
    assert run.series["clip_threshold"].steps.tolist() == list(range(1, 11))
    np.testing.assert_allclose(run.series["clip_threshold"].values, 0.1, rtol=1e-6)
    # HF's own scalars are in the same run, on the same steps
    assert run.series["loss"].steps.tolist() == list(range(1, 11))
    np.testing.assert_allclose(run.series["loss"].values, [probe.loss[s] for s in range(1, 11)], rtol=1e-5)
    assert run.series["lr"].steps.tolist() == list(range(1, 11))
    assert "guard_action" not in run.series


def test_guard_skip_leaves_weights_and_adamw_state_unchanged(tmp_path):
    model = _model()
    ours, probe = GradientMonitorCallback(on_explosion="skip", every=10), Probe(model, spike_step=33)
    Trainer(model=model, args=_args(tmp_path, 40, max_grad_norm=1.0), train_dataset=Tokens(),
            callbacks=[ours, probe]).train()

    assert probe.moved[32] and probe.moved[34]
    assert not probe.moved[33]  # the skipped step left every weight as it was ...
    assert probe.adam_steps[33] == probe.adam_steps[32] == 32  # ... and AdamW's state too
    assert [d.step for d in ours.guard.decisions] == [33]
    assert ours.guard.decisions[0].episodes[0].layers[0].name == EXPLODING

    run = load_run(_only_run_dir(tmp_path))
    actions = run.series["guard_action"]
    assert actions.steps.tolist() == [10, 20, 30, 33, 40]
    assert actions.values.tolist() == [0, 0, 0, GUARD_SKIP, 0]
    assert probe.grad_norm[33] > 100 * np.median([probe.grad_norm[s] for s in range(20, 33)])


def test_guard_raise_stops_training(tmp_path):
    model = _model()
    ours = GradientMonitorCallback(tmp_path / "grads", on_explosion="raise", every=100)
    probe = Probe(model, spike_step=30, factor=float("nan"))
    trainer = Trainer(model=model, args=_args(tmp_path, 40), train_dataset=Tokens(), callbacks=[ours, probe])
    with pytest.raises(GradientExplosionError) as info:
        trainer.train()
    assert info.value.step == 30 and info.value.episode.kind == "nonfinite"
    assert info.value.episode.layers[0].name == EXPLODING
    run = load_run(str(tmp_path / "grads"))
    assert run.steps.tolist() == [30]  # every=100 logs nothing else, but a step the guard acted on is written
    assert run.series["guard_action"].values.tolist()[-1] == 2


class _Pause(TrainerCallback):
    """Sleeps at train begin: between HF's TensorBoardCallback and ours, a new wall-clock second starts."""

    def on_train_begin(self, args, state, control, **kwargs):
        time.sleep(1.1)


def _steps_of_our_run(run_dir: str) -> list[int]:
    run = load_run(run_dir)
    assert run.source == "tb_gradient_plugin"
    return run.steps.tolist()


def test_default_directory_is_hfs_even_when_the_second_changes(tmp_path):
    """No explicit directory and no environment: ours finds the run HF's writer chose, not a name of its own that
    would only match within the same second."""
    Trainer(model=_model(), args=_args(tmp_path, 4), train_dataset=Tokens(),
            callbacks=[_Pause(), GradientMonitorCallback()]).train()
    run_dir = _only_run_dir(tmp_path)
    assert len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) == 2
    assert _steps_of_our_run(run_dir) == [1, 2, 3, 4]


def test_tensorboard_logging_dir_of_transformers_5(tmp_path, monkeypatch):
    target = tmp_path / "tb here"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(target))
    Trainer(model=_model(), args=_args(tmp_path / "out", 3), train_dataset=Tokens(),
            callbacks=[_Pause(), GradientMonitorCallback()]).train()
    assert len(glob.glob(str(target / "events.out.tfevents.*"))) == 2  # HF's file and ours
    assert _steps_of_our_run(str(target)) == [1, 2, 3]


def test_logging_dir_of_transformers_4(tmp_path):
    """transformers 4.x writes its TensorBoard run to ``args.logging_dir`` (the field 5.x removed): ours follows it.
    The installed 5.x has no such field, so it is set on the arguments as 4.x would have it."""
    args = _args(tmp_path / "out", 3, report_to=[])
    args.logging_dir = str(tmp_path / "logs 4x")
    Trainer(model=_model(), args=args, train_dataset=Tokens(), callbacks=[GradientMonitorCallback()]).train()
    assert _steps_of_our_run(args.logging_dir) == [1, 2, 3]


def test_lightning_fit_then_hf_fit_in_one_process_keep_every_step(tmp_path):
    """The case that once lost the Trainer run's per-layer data: a Lightning fit, then an HF fit, in one process."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from tb_gradient_plugin.lightning import GradientMonitorCallback as LightningCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1)),
                                       batch_size=4)
    pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp_path / "pl"), name="run"),
               callbacks=[LightningCallback()], enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, log_every_n_steps=1).fit(Tiny(), data)
    Trainer(model=_model(), args=_args(tmp_path / "hf", 5), train_dataset=Tokens(),
            callbacks=[GradientMonitorCallback()]).train()
    assert _steps_of_our_run(str(tmp_path / "pl" / "run" / "version_0")) == list(range(6))
    assert _steps_of_our_run(_only_run_dir(tmp_path / "hf")) == [1, 2, 3, 4, 5]
