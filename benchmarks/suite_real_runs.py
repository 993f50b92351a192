"""Real small training runs for the labeled detection suite, recorded with the real monitors.

Each recipe trains a tiny model on generated data on the CPU (seconds each; ``lstm_lm`` 1-2 minutes), once healthy
and once with its cause of trouble, and records it with :class:`tb_gradient_plugin.torch.GradientMonitor` or
:class:`tb_gradient_plugin.keras.GradientMonitorCallback` (``every=1``):

- ``mlp``: a 16-layer ReLU MLP (SGD + momentum); the learning rate is raised 100x mid-run;
- ``rnn``: a ReLU RNN with near-identity recurrence (0.9 I) on sequences of 100 steps, no gradient clipping; the
  learning rate is raised 100x mid-run;
- ``transformer``: a 2-layer post-LN transformer encoder (Adam) trained at 1e-4, then switched to a high learning rate
  (0.1) at once, without warm-up;
- ``keras``: a 6-layer Keras MLP (SGD); the learning rate is raised 100x mid-run by a callback;
- ``lstm_lm``: a 2-layer 128-unit LSTM language model trained as the TensorFlow NMT tutorial trains (SGD at learning
  rate 1.0, global-norm clipping at 5, a per-sentence summed loss, length buckets, a fixed batch order) on a generated
  corpus with the flaws real corpora have: its pre-clip gradient norm is heavy-tailed, with bursts and single-step
  spikes at the same place of every epoch, while the loss keeps falling. It is healthy only (no cause of trouble, no
  twin) and belongs to the suite's ``heavytail`` group.

Labels come from the run's own cause, never from a detector: the episode window runs from the step the learning rate
changed to the end of the run (what follows is its consequence), and the offending layer is the one whose gradient
norm or update ratio first reaches 10x its median over the 100 logged steps before the change, an update ratio only
where it also leaves the range that is healthy for most layers (above 1e-2). A learning-rate change reaches every
layer at the same step, by the same factor: layers crossing at that first step are told apart by their ratio, and
those whose ratio is within two standard errors of the largest (the uncertainty of a median of 100 noisy points) are
tied, each one a correct answer. Healthy twins have no label. ``python benchmarks/suite_real_runs.py DIR`` trains what
is missing in ``DIR`` and prints each run's label, to be checked by eye.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tb_gradient_plugin.runs import RunData, load_run  # noqa: E402

LABEL_FILE = "cause.json"
PRE_POINTS = 100  # logged steps before the cause that define each layer's normal level
LABEL_FACTOR = 10.0
#: An update ratio ||dw||/||w|| up to this is healthy for most layers: a layer whose updates stay below it was not hurt
#: by the new learning rate, however many times its own level they grew (e.g. 2e-6 -> 5e-4).
HEALTHY_UPDATE_RATIO = 1e-2
TIE_SE = 2.0  # ratios within this many standard errors of the largest are tied


@dataclass
class Recipe:
    name: str
    train: Callable[[str, int | None, float], None]  # (logdir, step of the LR change or None, LR factor)
    steps: int
    change_step: int | None  # None: the recipe has no cause of trouble, only its healthy run is trained
    factor: float
    group: str = "real"  # the suite's group its cases belong to


# ------------------------------------------------------------------------------------------------------- torch


def _torch_loop(logdir: str, model, opt, batch: Callable[[int], tuple], loss_fn: Callable, steps: int,
                change_step: int | None, factor: float, seed: int, clip: float | None = None) -> None:
    import torch

    from tb_gradient_plugin.torch import GradientMonitor

    torch.manual_seed(seed)
    monitor = GradientMonitor(model, opt, logdir, every=1)
    try:
        for step in range(steps):
            if change_step is not None and step == change_step:
                for g in opt.param_groups:
                    g["lr"] *= factor
            x, y = batch(step)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            monitor.log_loss(loss)
            loss.backward()
            if clip is not None:  # the monitor has read the gradients already: it records pre-clip norms
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    finally:
        monitor.close()


def _train_mlp(logdir: str, change_step: int | None, factor: float) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    layers: list[nn.Module] = []
    for _ in range(15):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 1, generator=gen)
    xs = torch.randn(4096, 32, generator=gen)
    ys = torch.sin(xs @ w)

    def batch(step: int) -> tuple:
        i = (step * 32) % 4096
        return xs[i:i + 32], ys[i:i + 32]

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _torch_loop(logdir, model, opt, batch, nn.functional.mse_loss, 400, change_step, factor, 0)


def _train_rnn(logdir: str, change_step: int | None, factor: float) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)

    class RNNRegressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(4, 64, nonlinearity="relu", batch_first=True)
            self.head = nn.Linear(64, 1)
            with torch.no_grad():  # near-identity recurrence (IRNN-like; Le et al. 2015 train it only with clipping)
                self.rnn.weight_hh_l0.copy_(0.9 * torch.eye(64))
                self.rnn.bias_hh_l0.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    model = RNNRegressor()
    gen = torch.Generator().manual_seed(2)

    def batch(step: int) -> tuple:
        x = torch.randn(16, 100, 4, generator=gen)
        return x, x[:, :10, 0].sum(dim=1, keepdim=True) * 0.3  # remember the start of a long sequence

    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    _torch_loop(logdir, model, opt, batch, nn.functional.mse_loss, 400, change_step, factor, 0)


def _train_transformer(logdir: str, change_step: int | None, factor: float) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    vocab, seq = 32, 24

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, 64)
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(64, vocab)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.head(self.encoder(self.embed(x), mask=mask, is_causal=True))

    model = TinyLM()
    gen = torch.Generator().manual_seed(3)

    def batch(step: int) -> tuple:
        start = torch.randint(0, vocab, (16, 1), generator=gen)
        stride = torch.randint(1, 4, (16, 1), generator=gen)
        toks = (start + stride * torch.arange(seq + 1)) % vocab  # arithmetic sequences: learnable next token
        return toks[:, :-1], toks[:, 1:]

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    _torch_loop(logdir, model, opt, batch, loss_fn, 400, change_step, factor, 0)


LM_VOCAB, LM_HIDDEN, LM_BATCH, LM_WINDOW = 1000, 128, 32, 5  # LM_WINDOW: batches per length-bucketing window
LM_LINES = 500 * LM_BATCH  # 500 batches an epoch


def lm_corpus(seed: int = 5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The ``lstm_lm`` training data: ``(sentences, batches)``, the batches in their fixed order of every epoch.

    Sentences come from a first-order Markov language over a Zipf vocabulary (each token has 4 possible successors,
    the first far likelier), with log-normal lengths (median 12 tokens, at most 40). Two stretches of the corpus are
    garbled, as mis-encoded or misaligned stretches of crawled corpora are: 96 consecutive lines and, elsewhere, 32
    lines of random tokens, 41-50 long. Batching is the NMT tutorial's: windows of 5 batches of consecutive lines are
    sorted by length (buckets) and cut into batches; the windows run in one fixed shuffled order, the same every
    epoch. A garbled stretch is the longest part of its window, so it makes batches of its own: 3 consecutive ones,
    and 1.
    """
    rng = np.random.default_rng(seed)
    content = LM_VOCAB - 2  # 0 is padding, 1 the end of a sentence
    unigram = 1.0 / np.arange(1, content + 1) ** 1.1
    unigram /= unigram.sum()
    succ = np.stack([rng.choice(content, 4, replace=False, p=unigram) for _ in range(content)]) + 2
    succ_cdf = np.cumsum(1.0 / np.arange(1, 5) ** 2)
    succ_cdf /= succ_cdf[-1]
    lengths = np.clip(np.rint(np.exp(rng.normal(np.log(12), 0.5, LM_LINES))), 3, 40).astype(np.int64)
    tok = np.empty((LM_LINES, 50), dtype=np.int64)
    tok[:, 0] = np.minimum(np.searchsorted(np.cumsum(unigram), rng.random(LM_LINES)), content - 1) + 2
    for i in range(1, tok.shape[1]):
        tok[:, i] = succ[tok[:, i - 1] - 2, np.searchsorted(succ_cdf, rng.random(LM_LINES))]
    window = LM_WINDOW * LM_BATCH
    for start, n in ((int(0.37 * LM_LINES) // window * window, 3 * LM_BATCH),
                     (int(0.71 * LM_LINES) // window * window + LM_BATCH, LM_BATCH)):
        tok[start:start + n] = rng.integers(2, LM_VOCAB, (n, tok.shape[1]))
        lengths[start:start + n] = rng.integers(41, 51, n)  # longer than any clean line: batches of their own
    sentences = [np.append(tok[i, :lengths[i]], 1) for i in range(LM_LINES)]
    batches = []
    for w in rng.permutation(LM_LINES // window):
        lines = np.arange(w * window, (w + 1) * window)
        lines = lines[np.argsort(lengths[lines], kind="stable")]
        batches += [lines[k:k + LM_BATCH] for k in range(0, window, LM_BATCH)]
    return sentences, batches


def _train_lstm_lm(logdir: str, change_step: int | None, factor: float) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    sentences, order = lm_corpus()

    def tensors(lines: np.ndarray) -> tuple:
        toks = np.zeros((lines.size, max(sentences[i].size for i in lines) + 1), dtype=np.int64)
        toks[:, 0] = 1  # each sentence is predicted from the end of the previous one
        for r, i in enumerate(lines):
            toks[r, 1:sentences[i].size + 1] = sentences[i]
        t = torch.from_numpy(toks)
        return t[:, :-1], t[:, 1:]

    data = [tensors(lines) for lines in order]

    class LSTMLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(LM_VOCAB, LM_HIDDEN)
            self.lstm = nn.ModuleList(nn.LSTM(LM_HIDDEN, LM_HIDDEN, batch_first=True) for _ in range(2))
            self.drop = nn.Dropout(0.2)
            self.proj = nn.Linear(LM_HIDDEN, LM_VOCAB)
            for p in self.parameters():  # the NMT tutorial's uniform init
                nn.init.uniform_(p, -0.1, 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            for cell in self.lstm:
                h = cell(self.drop(h))[0]
            return self.proj(self.drop(h))

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The tutorial's train_loss: the summed token cross-entropy over the batch size (a per-sentence loss)."""
        return nn.functional.cross_entropy(logits.reshape(-1, LM_VOCAB), y.reshape(-1), ignore_index=0,
                                           reduction="sum") / y.shape[0]

    model = LSTMLM()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _torch_loop(logdir, model, opt, lambda step: data[step % len(data)], loss_fn, 3000, change_step, factor, 0,
                clip=5.0)


# ------------------------------------------------------------------------------------------------------- keras


def _train_keras(logdir: str, change_step: int | None, factor: float) -> None:
    import keras

    from tb_gradient_plugin.keras import GradientMonitorCallback

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32 * 400, 16)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(16, 1))).astype("float32")
    model = keras.Sequential([keras.Input((16,))] + [keras.layers.Dense(32, activation="relu") for _ in range(5)]
                             + [keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")

    class RaiseLR(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            if change_step is not None and batch == change_step:
                self.model.optimizer.learning_rate.assign(float(self.model.optimizer.learning_rate) * factor)

    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
              callbacks=[RaiseLR(), GradientMonitorCallback(logdir, every=1)])


RECIPES = [
    Recipe("mlp", _train_mlp, 400, 250, 100.0),
    Recipe("rnn", _train_rnn, 400, 250, 100.0),
    Recipe("transformer", _train_transformer, 400, 250, 1000.0),
    Recipe("keras", _train_keras, 400, 250, 100.0),
    Recipe("lstm_lm", _train_lstm_lm, 3000, None, 1.0, group="heavytail"),
]


# ------------------------------------------------------------------------------------------------------ labels


def run_dir(root: str, recipe: Recipe, healthy: bool) -> str:
    return os.path.join(root, f"{recipe.name}-{'healthy' if healthy else 'lr_raised'}")


def _variants(recipe: Recipe) -> tuple[bool, ...]:
    """Which runs of a recipe exist (healthy or not): a recipe without a cause of trouble has no twin."""
    return (True,) if recipe.change_step is None else (True, False)


def train(root: str, names: list[str] | None = None, *, log: Callable[[str], None] = print) -> list[str]:
    """Train the runs of the given recipes (all by default) that ``root`` does not hold yet; returns their dirs."""
    out = []
    for recipe in RECIPES:
        if names is not None and recipe.name not in names:
            continue
        for healthy in _variants(recipe):
            d = run_dir(root, recipe, healthy)
            out.append(d)
            if os.path.exists(os.path.join(d, LABEL_FILE)):
                continue
            os.makedirs(d, exist_ok=True)
            t0 = time.perf_counter()
            recipe.train(d, None if healthy else recipe.change_step, recipe.factor)
            cause = None if healthy else {"step": recipe.change_step, "lr_factor": recipe.factor}
            with open(os.path.join(d, LABEL_FILE), "w") as f:
                json.dump({"recipe": recipe.name, "cause": cause}, f)
            log(f"trained {os.path.basename(d)} in {time.perf_counter() - t0:.1f} s")
    return out


def first_crossing_layers(run: RunData, cause_step: int) -> tuple[tuple[str, ...], int | None]:
    """The layers whose grad norm or update ratio first reaches 10x its median over the points before the cause (an
    update ratio also above the healthy range), and that step. The first layer has the largest ratio; the others are
    tied with it: their log ratio is within ``TIE_SE`` standard errors of its own, the standard error of a median of
    ``n`` points with robust log-noise sigma being 1.2533 sigma / sqrt(n). Non-finite values cross, with an infinite
    ratio."""
    steps = np.asarray(run.steps)
    pre = np.nonzero(steps < cause_step)[0][-PRE_POINTS:]
    post = np.nonzero(steps >= cause_step)[0]
    hits: list[tuple[int, float, float, int]] = []  # (post index, log ratio, its standard error, layer)
    metrics = [(run.layer_metrics.get("grad_norm"), 0.0), (run.update_ratio(), HEALTHY_UPDATE_RATIO)]
    for m, floor in metrics:
        if m is None or pre.size == 0:
            continue
        vals = np.where(run.present, np.asarray(m, dtype=np.float64), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = vals[post] / np.nanmedian(vals[pre], axis=0)[None, :]
            hit = ~(ratio < LABEL_FACTOR) & ~(vals[post] <= floor)  # non-finite values count as crossing
            logs = np.log(vals[pre])
            sigma = 1.4826 * np.nanmedian(np.abs(logs - np.nanmedian(logs, axis=0)), axis=0)
            se = 1.2533 * sigma / np.sqrt(np.isfinite(logs).sum(axis=0))
        for j in range(vals.shape[1]):
            rows = np.nonzero(hit[:, j])[0]
            if rows.size:
                r = float(ratio[rows[0], j])
                hits.append((int(rows[0]), math.log(r) if math.isfinite(r) and r > 0 else math.inf,
                             float(se[j]) if math.isfinite(se[j]) else 0.0, j))
    if not hits:
        return (), None
    first = min(h[0] for h in hits)
    at = sorted((h for h in hits if h[0] == first), key=lambda h: (-h[1], h[3]))
    top = at[0]
    tied = [h for h in at if h is top or (math.isinf(top[1]) and math.isinf(h[1]))
            or top[1] - h[1] <= TIE_SE * math.hypot(top[2], h[2])]
    names: list[str] = []
    for h in tied:  # a layer may cross by both metrics
        if run.layers[h[3]] not in names:
            names.append(run.layers[h[3]])
    return tuple(names), int(steps[post[first]])


def load(root: str) -> list[tuple[str, RunData, dict | None, tuple[str, ...], str]]:
    """(name, run, cause, offending layers: the label's first, then those tied with it, the suite's group) for every
    trained run under ``root``, in recipe order."""
    out = []
    for recipe in RECIPES:
        for healthy in _variants(recipe):
            d = run_dir(root, recipe, healthy)
            if not os.path.exists(os.path.join(d, LABEL_FILE)):
                continue
            with open(os.path.join(d, LABEL_FILE)) as f:
                cause = json.load(f)["cause"]
            # the Keras callback writes into train/, as Keras' own TensorBoard callback does
            path = os.path.join(d, "train") if os.path.isdir(os.path.join(d, "train")) else d
            run = load_run(path, name=os.path.basename(d))
            layers = first_crossing_layers(run, cause["step"])[0] if cause else ()
            out.append((os.path.basename(d), run, cause, layers, recipe.group))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="directory holding (or receiving) the trained runs")
    ap.add_argument("--only", nargs="*", default=None, help="recipe names (default: all)")
    args = ap.parse_args(argv)
    train(args.root, args.only)
    for name, run, cause, layers, _group in load(args.root):
        print(f"{name}: {run.steps.size} steps, {len(run.layers)} layers, cause {cause}, offending layer "
              f"{layers[0] if layers else None}" + (f" (tied: {', '.join(layers[1:])})" if len(layers) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
