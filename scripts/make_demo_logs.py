"""Regenerate ``demo_logs/`` from real, small training runs on the CPU (deterministic seeds).

    python scripts/make_demo_logs.py [--out demo_logs] [--scale 1.0] [--skip-keras] [--skip-jax]

Runs (each a TensorBoard run directory):
  mlp_healthy        deep ReLU MLP without normalization (He init), SGD at a sane learning rate; validation loss
                     on a held-out set; gradient histograms
  mlp_lr_raised      the same model; the learning rate is raised 100x mid-run -> explosion -> NaN (the validation
                     loss turns NaN too); its histograms go from a steady distribution to all non-finite
  mlp_overfit        a small classifier fit on 256 samples with noisy labels: its training loss keeps falling while
                     its validation loss turns at step 70 (an overfitting finding, no gradient episode)
  rnn_no_clip        vanilla RNN on long sequences without gradient clipping (explodes); gradient histograms
  rnn_clipped        the same with clip_grad_norm_ (stable): the before/after pair; gradient histograms
  amp_overflow       fp16 autocast + GradScaler: overflow skips that are not explosions
  plain_summarywriter  only loss + total grad norm through torch's SummaryWriter (audited without our writer)
  keras_sane/{train,validation}, keras_high_lr/{train,validation}   a Keras model fit at a sane and at a too-high
                     learning rate, with validation_data (Keras' own TensorBoard callback writes validation/);
                     keras_high_lr with gradient histograms every 2 steps (its explosion is a single step)
  flax_healthy       a Flax Linen MLP trained with a jitted step through the wrapped Optax optimizer (SGD with
                     momentum, learning rate from optax.inject_hyperparams, recorded)
  flax_lr_raised     the same; its learning rate is raised 100x mid-run by a schedule -> explosion -> NaN

The data are generated regression/classification/sequence tasks (no downloads); the gradients are real. The
validation sets are separate draws from the same generators, so adding them changes no training step.
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


def he_init(torch, model):
    """He (Kaiming) initialization for ReLU layers, zero biases. PyTorch's default init (weights of variance
    1/(3 fan_in) against He's 2/fan_in) shrinks the signal at every layer: through 12 ReLU layers most units of the
    last layers never activate and the network does not learn (its validation loss stays flat at 0.64)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    return model


def regression_data(torch, n: int = 4096, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)).tanh()
    return x, y


def minibatch(torch, x, y, step: int, size: int = 64):
    """The same 64 samples for a given step in every run, so runs differ only in what they are meant to."""
    idx = torch.randint(0, len(x), (size,), generator=torch.Generator().manual_seed(step))
    return x[idx], y[idx]


def classification_data(torch, n: int, seed: int, label_noise: float = 0.2):
    """4 classes split by a fixed random linear map of 16 features; a share of the labels is redrawn at random, so
    that a small training set can be memorised but not generalised beyond the noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, 16, generator=g)
    y = (x @ w).argmax(1)
    noisy = torch.rand(n, generator=g) < label_noise
    return x, torch.where(noisy, torch.randint(0, 4, (n,), generator=g), y)


def log_validation(torch, writer, model, step: int, x, y, classify: bool = False) -> None:
    """What a PyTorch user writes next to the monitor: ``val_loss`` (and ``val_accuracy``) scalars of the same
    ``SummaryWriter``, evaluated on a held-out set without gradients (no training step is changed)."""
    with torch.no_grad():
        out = model(x)
        if classify:
            writer.add_scalar("val_loss", torch.nn.functional.cross_entropy(out, y).item(), step)
            writer.add_scalar("val_accuracy", (out.argmax(1) == y).float().mean().item(), step)
        else:
            writer.add_scalar("val_loss", torch.nn.functional.mse_loss(out, y).item(), step)


def supervised_loop(torch, model, opt, monitor, writer, train, val, steps: int, val_every: int, *,
                    classify: bool = False, size: int = 64, raise_at: int | None = None) -> None:
    """The plain training loop of the supervised demo runs, with the learning rate raised 100x at ``raise_at`` and a
    validation pass every ``val_every`` steps (and at the last one)."""
    loss_fn = torch.nn.functional.cross_entropy if classify else torch.nn.functional.mse_loss
    for step in range(steps):
        if raise_at is not None and step == raise_at:
            for group in opt.param_groups:
                group["lr"] *= 100
        xb, yb = minibatch(torch, *train, step, size=size)
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        monitor.log_loss(loss)
        opt.step()
        if step % val_every == 0 or step == steps - 1:
            log_validation(torch, writer, model, step, *val, classify=classify)


def train_mlp(out: str, steps: int, raise_at: int | None, val_every: int = 20, histograms_every: int = 10) -> None:
    torch = _torch()
    from torch.utils.tensorboard import SummaryWriter

    from tb_gradient_plugin.torch import GradientMonitor

    torch.manual_seed(0)
    model = he_init(torch, deep_mlp(torch))
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    x, y = regression_data(torch)
    x_val, y_val = regression_data(torch, n=512, seed=5)
    writer = SummaryWriter(out)
    with GradientMonitor(model, opt, writer=writer, every=1, histograms_every=histograms_every) as monitor:
        supervised_loop(torch, model, opt, monitor, writer, (x, y), (x_val, y_val), steps, val_every,
                        raise_at=raise_at)
    writer.close()


def train_overfit(out: str, steps: int, val_every: int = 10) -> None:
    """Validation that degrades while the training loss keeps falling: 256 noisy samples, a 256-wide MLP."""
    torch = _torch()
    from collections import OrderedDict

    from torch.utils.tensorboard import SummaryWriter

    from tb_gradient_plugin.torch import GradientMonitor

    x, y = classification_data(torch, 256, seed=11)
    x_val, y_val = classification_data(torch, 1024, seed=12)
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict([
        ("fc0", torch.nn.Linear(16, 256)), ("relu0", torch.nn.ReLU()),
        ("fc1", torch.nn.Linear(256, 256)), ("relu1", torch.nn.ReLU()),
        ("head", torch.nn.Linear(256, 4)),
    ]))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    writer = SummaryWriter(out)
    with GradientMonitor(model, opt, writer=writer, every=1) as monitor:
        supervised_loop(torch, model, opt, monitor, writer, (x, y), (x_val, y_val), steps, val_every, classify=True,
                        size=32)
    writer.close()


def train_rnn(out: str, steps: int, clip: float | None, histograms_every: int = 5) -> None:
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
    with GradientMonitor(model, opt, out, every=1, histograms_every=histograms_every) as monitor:
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


def train_keras(out: str, steps: int, lr: float, histograms_every: int = 0) -> None:
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
    x_val = np.random.default_rng(4).normal(size=(512, 16)).astype("float32")
    y_val = np.tanh(x_val[:, :4].sum(1, keepdims=True)).astype("float32")
    model = keras.Sequential(
        [keras.Input((16,))] + [keras.layers.Dense(64, activation="relu", name=f"dense_{i}") for i in range(8)]
        + [keras.layers.Dense(1, name="out")]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=0.9), loss="mse")
    batches = max(1, steps)
    epochs = max(1, batches // 32)
    model.fit(x[: 64 * 32], y[: 64 * 32], batch_size=64, epochs=epochs, verbose=0, validation_data=(x_val, y_val),
              callbacks=[GradientMonitorCallback(out, every=1, histograms_every=histograms_every),
                         keras.callbacks.TensorBoard(out)])


def train_flax(out: str, steps: int, raise_at: int | None) -> None:
    """A Flax Linen MLP, its jitted step through ``GradientMonitor.wrap`` of an Optax SGD whose learning rate a
    schedule raises 100x at ``raise_at``."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from tb_gradient_plugin.jax import GradientMonitor

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(6):
                x = nn.relu(nn.Dense(32, kernel_init=nn.initializers.he_normal())(x))
            return nn.Dense(1)(x)

    rng = np.random.default_rng(1)
    x = rng.normal(size=(4096, 16)).astype("float32")
    y = np.tanh(x[:, :4].sum(1, keepdims=True) + 0.1 * rng.normal(size=(4096, 1))).astype("float32")
    model = MLP()
    params = model.init(jax.random.key(0), x[:1])["params"]
    boundaries = {} if raise_at is None else {raise_at: 100.0}
    schedule = optax.piecewise_constant_schedule(0.005, boundaries)
    with GradientMonitor(out, every=1) as monitor:
        tx = monitor.wrap(optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9))
        state = tx.init(params)

        def loss_fn(p, xb, yb):
            return jnp.mean((model.apply({"params": p}, xb) - yb) ** 2)

        @jax.jit
        def train_step(p, s, xb, yb):
            loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
            updates, s = tx.update(grads, s, p, loss=loss)
            return optax.apply_updates(p, updates), s

        for step in range(steps):
            idx = np.random.default_rng(step).integers(0, len(x), 64)
            params, state = train_step(params, state, x[idx], y[idx])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_logs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default number of steps")
    parser.add_argument("--skip-keras", action="store_true")
    parser.add_argument("--skip-jax", action="store_true")
    args = parser.parse_args(argv)

    def n(steps: int) -> int:
        return max(20, int(steps * args.scale))

    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    jobs = [
        ("mlp_healthy", lambda d: train_mlp(d, n(600), None)),
        ("mlp_lr_raised", lambda d: train_mlp(d, n(600), n(600) // 2)),
        ("mlp_overfit", lambda d: train_overfit(d, n(400))),
        ("rnn_no_clip", lambda d: train_rnn(d, n(300), None)),
        ("rnn_clipped", lambda d: train_rnn(d, n(300), 1.0)),
        ("amp_overflow", lambda d: train_amp(d, n(400))),
        ("plain_summarywriter", lambda d: train_plain(d, n(600))),
    ]
    if not args.skip_keras:
        jobs += [
            ("keras_sane", lambda d: train_keras(d, n(320), 0.003)),
            ("keras_high_lr", lambda d: train_keras(d, n(320), 0.5, histograms_every=2)),
        ]
    if not args.skip_jax:
        jobs += [
            ("flax_healthy", lambda d: train_flax(d, n(300), None)),
            ("flax_lr_raised", lambda d: train_flax(d, n(300), n(300) // 2)),
        ]
    for name, job in jobs:
        print(f"training {name} ...", flush=True)
        job(os.path.join(args.out, name))


if __name__ == "__main__":
    main()
