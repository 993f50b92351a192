"""Regenerate ``demo_logs/`` from real, small training runs on the CPU (deterministic seeds).

    python scripts/make_demo_logs.py [--out demo_logs] [--scale 1.0] [--skip-keras]

Runs (each a TensorBoard run directory):
  mlp_healthy        deep ReLU MLP without normalization, SGD at a sane learning rate
  mlp_lr_raised      the same model; the learning rate is raised 100x mid-run -> explosion -> NaN
  rnn_no_clip        vanilla RNN on long sequences without gradient clipping (explodes)
  rnn_clipped        the same with clip_grad_norm_ (stable): the before/after pair
  amp_overflow       fp16 autocast + GradScaler: overflow skips that are not explosions
  plain_summarywriter  only loss + total grad norm through torch's SummaryWriter (audited without our writer)
  keras_sane/train, keras_high_lr/train   a Keras model fit at a sane and at a too-high learning rate

The data are generated regression/sequence tasks (no downloads); the gradients are real.
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    return torch


def deep_mlp(torch, depth: int = 12, width: int = 64):
    from collections import OrderedDict

    layers: OrderedDict = OrderedDict()
    for i in range(depth):
        layers[f"fc{i}"] = torch.nn.Linear(16 if i == 0 else width, width)
        layers[f"relu{i}"] = torch.nn.ReLU()
    layers["head"] = torch.nn.Linear(width, 1)
    return torch.nn.Sequential(layers)


def regression_data(torch, n: int = 4096):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)).tanh()
    return x, y


def minibatch(torch, x, y, step: int, size: int = 64):
    """The same 64 samples for a given step in every run, so runs differ only in what they are meant to."""
    idx = torch.randint(0, len(x), (size,), generator=torch.Generator().manual_seed(step))
    return x[idx], y[idx]


def train_mlp(out: str, steps: int, raise_at: int | None) -> None:
    torch = _torch()
    from tb_gradient_plugin.torch import GradientMonitor

    torch.manual_seed(0)
    model = deep_mlp(torch)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x, y = regression_data(torch)
    with GradientMonitor(model, opt, out, every=1) as monitor:
        for step in range(steps):
            if raise_at is not None and step == raise_at:
                for group in opt.param_groups:
                    group["lr"] *= 100
            xb, yb = minibatch(torch, x, y, step)
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            monitor.log_loss(loss)
            opt.step()


def train_rnn(out: str, steps: int, clip: float | None) -> None:
    torch = _torch()
    from tb_gradient_plugin.torch import GradientMonitor

    class SeqModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.RNN(8, 64, batch_first=True)
            self.head = torch.nn.Linear(64, 1)
            with torch.no_grad():  # an orthogonal recurrent matrix: gradients through 120 steps neither vanish nor damp
                self.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(64, 64))[0])

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = SeqModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    with GradientMonitor(model, opt, out, every=1) as monitor:
        for _ in range(steps):
            x = torch.randn(32, 120, 8, generator=g)
            y = x[:, :10, 0].sum(1, keepdim=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            monitor.log_loss(loss)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()


def train_amp(out: str, steps: int) -> None:
    torch = _torch()
    from tb_gradient_plugin.torch import GradientMonitor

    torch.manual_seed(0)
    model = deep_mlp(torch, depth=6, width=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=50)
    x, y = regression_data(torch)
    with GradientMonitor(model, opt, out, every=1, scaler=scaler) as monitor:
        for step in range(steps):
            xb, yb = minibatch(torch, x, y, step)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(xb).float(), yb)
            opt.zero_grad()
            scaler.scale(loss).backward()
            monitor.log_loss(loss)
            scaler.step(opt)
            scaler.update()


def train_plain(out: str, steps: int) -> None:
    torch = _torch()
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = deep_mlp(torch, depth=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x, y = regression_data(torch)
    writer = SummaryWriter(out)
    for step in range(steps):
        if step == steps // 2:
            for group in opt.param_groups:
                group["lr"] *= 30
        xb, yb = minibatch(torch, x, y, step)
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        writer.add_scalar("train/loss", loss.item(), step)
        writer.add_scalar("grad_norm", total.item(), step)
        opt.step()
    writer.close()


def train_keras(out: str, steps: int, lr: float) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from tb_gradient_plugin.keras import GradientMonitorCallback

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2048, 16)).astype("float32")
    y = np.tanh(x[:, :4].sum(1, keepdims=True)).astype("float32")
    model = keras.Sequential(
        [keras.Input((16,))] + [keras.layers.Dense(64, activation="relu", name=f"dense_{i}") for i in range(8)]
        + [keras.layers.Dense(1, name="out")]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=0.9), loss="mse")
    batches = max(1, steps)
    epochs = max(1, batches // 32)
    model.fit(x[: 64 * 32], y[: 64 * 32], batch_size=64, epochs=epochs, verbose=0,
              callbacks=[GradientMonitorCallback(out, every=1), keras.callbacks.TensorBoard(out)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_logs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default number of steps")
    parser.add_argument("--skip-keras", action="store_true")
    args = parser.parse_args(argv)

    def n(steps: int) -> int:
        return max(20, int(steps * args.scale))

    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    jobs = [
        ("mlp_healthy", lambda d: train_mlp(d, n(600), None)),
        ("mlp_lr_raised", lambda d: train_mlp(d, n(600), n(600) // 2)),
        ("rnn_no_clip", lambda d: train_rnn(d, n(300), None)),
        ("rnn_clipped", lambda d: train_rnn(d, n(300), 1.0)),
        ("amp_overflow", lambda d: train_amp(d, n(400))),
        ("plain_summarywriter", lambda d: train_plain(d, n(600))),
    ]
    if not args.skip_keras:
        jobs += [
            ("keras_sane", lambda d: train_keras(d, n(320), 0.003)),
            ("keras_high_lr", lambda d: train_keras(d, n(320), 0.5)),
        ]
    for name, job in jobs:
        print(f"training {name} ...", flush=True)
        job(os.path.join(args.out, name))


if __name__ == "__main__":
    main()
