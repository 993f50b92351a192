"""Sample ids recorded by the Lightning and Hugging Face callbacks: found in the batch on their own, or where
``batch_ids=`` says, in real ``fit`` / ``train`` runs on the CPU."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from tb_gradient_plugin.lightning import GradientMonitorCallback as LightningCallback
from tb_gradient_plugin.runs import load_run
from tb_gradient_plugin.torch import GradientMonitor
from tb_gradient_plugin.torch.callback import find_batch_ids
from tb_gradient_plugin.transformers import GradientMonitorCallback as HFCallback
from tb_gradient_plugin.transformers import _named_parameters


class Rows(Dataset):
    """Regression rows as dicts carrying their index (``as_tuple``: ``(x, y, index)``)."""

    def __init__(self, n: int = 32, as_tuple: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g)
        self.as_tuple = as_tuple

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return (self.x[i], self.y[i], i) if self.as_tuple else {"x": self.x[i], "y": self.y[i], "idx": i}


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[:2]
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, callback, data: Rows, **kwargs) -> dict[int, list[int]]:
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=[callback],
                         logger=TensorBoardLogger(str(tmp_path), name="run", version=0), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **kwargs)
    trainer.fit(Module(), DataLoader(data, batch_size=4))
    run = load_run(os.path.join(str(tmp_path), "run", "version_0"))
    return {s: ids.tolist() for s, ids in run.batches.items()}


def test_lightning_finds_the_idx_field_of_dict_batches_with_accumulation(tmp_path) -> None:
    batches = _fit(tmp_path, LightningCallback(), Rows(), accumulate_grad_batches=2)
    # step s trained on micro-batches 2s and 2s + 1 (no shuffle): both are recorded
    assert batches == {s: list(range(8 * s, 8 * s + 8)) for s in range(4)}


def test_lightning_takes_ids_where_batch_ids_says(tmp_path) -> None:
    assert _fit(tmp_path / "none", LightningCallback(), Rows(as_tuple=True)) == {}  # a tuple names no field
    batches = _fit(tmp_path / "given", LightningCallback(batch_ids=lambda batch: batch[2]), Rows(as_tuple=True))
    assert batches == {s: list(range(4 * s, 4 * s + 4)) for s in range(4)}


def test_a_field_that_does_not_hold_integers_is_not_taken_for_ids() -> None:
    assert find_batch_ids({"index": torch.tensor([0.5, 1.5]), "idx": [3, 4]}, None) == ("idx", [3, 4])
    assert find_batch_ids({"index": torch.tensor([0.5])}, None) == (None, None)
    assert find_batch_ids({"idx": [1]}, False) == (None, None)
    with pytest.raises(TypeError, match="batch_ids"):
        LightningCallback(batch_ids=3)


class Tokens(Dataset):
    def __init__(self, n: int = 32) -> None:
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "idx": i}


class StrictGPT2(GPT2LMHeadModel):
    """A model whose ``forward`` takes no ``**kwargs``: an ``idx`` input reaching it is a TypeError."""

    def forward(self, input_ids=None, labels=None):
        return super().forward(input_ids=input_ids, labels=labels)


def test_hf_trainer_records_the_idx_field_and_keeps_it_from_the_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = StrictGPT2(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=16,
                             per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, remove_unused_columns=False,
                             eval_strategy="steps", eval_steps=8, per_device_eval_batch_size=4)
    Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(8),
            callbacks=[HFCallback(logdir=str(tmp_path / "logs"))]).train()
    batches = load_run(str(tmp_path / "logs")).batches
    assert sorted(batches) == list(range(1, 17))  # HF numbers step k as k + 1
    for epoch in range(2):  # 8 steps an epoch, shuffled: every sample once, evaluation batches never
        seen = sorted(i for s in range(1 + 8 * epoch, 9 + 8 * epoch) for i in batches[s].tolist())
        assert seen == list(range(32))


def test_hf_never_takes_a_declared_model_input_for_ids(tmp_path) -> None:
    """``index`` is an input of this model's ``forward``: it stays, and the ids come from ``idx``, which is removed."""

    class Indexed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(10, 1)

        def forward(self, x, index):
            return (self.table(index) * x).sum()

    model = Indexed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = HFCallback(logdir=str(tmp_path))
    callback.monitor = GradientMonitor(model, opt, tmp_path)
    callback._takes = _named_parameters(model)
    callback._hook = model.register_forward_pre_hook(callback._forward_pre, with_kwargs=True)
    model(x=torch.ones(2, 1), index=torch.tensor([3, 4]), idx=torch.tensor([70, 71])).backward()  # no TypeError
    opt.step()
    model.eval()
    model(x=torch.ones(1, 1), index=torch.tensor([1]), idx=torch.tensor([99]))  # evaluation: not recorded
    callback._close()
    assert {s: v.tolist() for s, v in load_run(str(tmp_path)).batches.items()} == {0: [70, 71]}
