"""GradientMonitor on real training of small PyTorch models, read back from the event files it writes.

Every expected value is computed by hand in the test from the model's gradients and saved weight copies.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.reader import EventFileReader
from tb_gradient_plugin.torch import GradientMonitor, discover_layers

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------- helpers


@dataclass
class Run:
    """Everything written into one logdir, keyed by step."""

    files: list[str]
    layers: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # metric -> step -> layer -> value
    hist: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # step -> layer -> counts
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)  # tag -> step -> value
    layouts: dict[int, tuple[str, ...]] = field(default_factory=dict)  # step -> layer list of grad_norm


def read_run(logdir: str) -> Run:
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    run = Run(files)
    layouts: dict = {}
    for path in files:
        reader = EventFileReader(path, layouts)
        batch = reader.read()
        reader.finish()
        assert not reader.problems, reader.problems
        for rec in batch.layer_records:
            if rec.metric == fmt.HISTOGRAM_METRIC:
                run.hist[rec.step] = dict(zip(rec.layers, rec.values, strict=True))
                continue
            run.layers.setdefault(rec.metric, {})[rec.step] = dict(zip(rec.layers, rec.values.tolist(), strict=True))
            if rec.metric == "grad_norm":
                run.layouts[rec.step] = rec.layers
        for s in batch.scalars:
            run.scalars.setdefault(s.tag, {})[s.step] = s.value
    return run


def layer_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Layer name -> direct trainable parameters, computed independently of the monitor."""
    out = {}
    for name, mod in model.named_modules():
        ps = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if ps:
            out[name or "(root)"] = ps
    return out


def grad_stats(model: nn.Module, scale: float = 1.0) -> dict[str, dict[str, float]]:
    """Reference per-layer gradient statistics and current weight norms, by hand, in float64."""
    out: dict[str, dict[str, float]] = {}
    for name, ps in layer_params(model).items():
        gs = [p.grad.detach().double().flatten() / scale for p in ps if p.grad is not None]
        if not gs:
            continue
        g = torch.cat(gs)
        out[name] = {
            "grad_norm": float(g.norm()),
            "grad_max_abs": float(g.abs().max()),
            "nonfinite_count": float((~torch.isfinite(g)).sum()),
            "param_norm": float(torch.cat([p.detach().double().flatten() for p in ps]).norm()),
        }
    return out


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.cat([p.detach().double().flatten() for p in ps]) for n, ps in layer_params(model).items()}


def close(actual: float, expected: float, rel: float = 2e-5) -> bool:
    return abs(actual - expected) <= rel * abs(expected) + 1e-9


def assert_stats(run: Run, step: int, expected: dict[str, dict[str, float]], metrics=None) -> None:
    for metric in metrics or ("grad_norm", "grad_max_abs", "nonfinite_count", "param_norm"):
        got = run.layers[metric][step]
        assert set(got) == set(expected), (metric, step, got.keys(), expected.keys())
        for layer, value in got.items():
            assert close(value, expected[layer][metric]), (metric, step, layer, value, expected[layer][metric])


class Net(nn.Module):
    """Small model with nesting, a parameter owned by the root and a parameter-free module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.LayerNorm(16))
        self.head = nn.Linear(16, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x))) / self.temperature


def batch(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


# --------------------------------------------------------------------------------------------------------- tests


def test_norms_update_ratio_loss_lr_match_hand_computed(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    monitor = GradientMonitor(model, opt, str(tmp_path), every=2)
    assert monitor.layers == ("(root)", "embed", "block.0", "block.2", "head")  # model order
    expected, updates, losses, lrs = {}, {}, {}, {}
    for step in range(7):
        x, y = batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        monitor.log_loss(loss)
        expected[step], losses[step], lrs[step] = grad_stats(model), loss.item(), opt.param_groups[0]["lr"]
        before = weights(model)
        opt.step()
        after = weights(model)
        updates[step] = {n: float((after[n] - before[n]).norm()) / float(before[n].norm()) for n in before}
        sched.step()
    monitor.close()

    run = read_run(str(tmp_path))
    assert len(run.files) == 1
    assert sorted(run.layouts) == [0, 2, 4, 6]  # every=2: nothing on the other steps
    for step in (0, 2, 4, 6):
        assert_stats(run, step, expected[step])
        for layer, ratio in updates[step].items():
            got = run.layers["update_norm"][step][layer] / run.layers["param_norm"][step][layer]
            assert close(got, ratio, rel=1e-4), (step, layer, got, ratio)
        total = float(np.sqrt(sum(v["grad_norm"] ** 2 for v in expected[step].values())))
        assert close(run.scalars["total_grad_norm"][step], total)
        assert close(run.scalars["loss"][step], losses[step])
        assert close(run.scalars["lr"][step], lrs[step])
    assert "step_skipped" not in run.scalars  # no scaler: no overflow-skip series


def test_clipping_records_pre_clip_norm_and_step_capture_records_post_clip(tmp_path):
    results, pre, post, total = {}, {}, {}, {}
    for grads_at in ("backward", "step"):
        torch.manual_seed(1)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        logdir = str(tmp_path / grads_at)
        with GradientMonitor(model, opt, logdir, grads_at=grads_at) as monitor:
            x, y = batch(0)
            nn.functional.cross_entropy(model(x), y).mul(50).backward()
            pre[grads_at] = grad_stats(model)
            total[grads_at] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1))
            post[grads_at] = grad_stats(model)
            opt.step()
            assert monitor.step == 1
        results[grads_at] = read_run(logdir)
        assert total[grads_at] > 1.0  # clipping really happened
    assert_stats(results["backward"], 0, pre["backward"])
    assert close(results["backward"].scalars["total_grad_norm"][0], total["backward"])
    assert_stats(results["step"], 0, post["step"], metrics=("grad_norm", "grad_max_abs"))
    assert close(results["step"].scalars["total_grad_norm"][0], 0.1, rel=1e-4)


def test_gradient_accumulation_records_the_accumulated_gradient(tmp_path):
    torch.manual_seed(2)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with GradientMonitor(model, opt, str(tmp_path)):
        for step in range(2):
            opt.zero_grad()
            for micro in range(3):
                x, y = batch(10 * step + micro)
                nn.functional.cross_entropy(model(x), y).div(3).backward()
            if step == 1:
                expected = grad_stats(model)
            opt.step()
    run = read_run(str(tmp_path))
    assert sorted(run.layouts) == [0, 1]
    assert_stats(run, 1, expected)


def test_frozen_layer_is_left_out_of_that_steps_layout(tmp_path):
    torch.manual_seed(3)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(model, opt, str(tmp_path)) as monitor:
        for step in range(4):
            for p in model.embed.parameters():
                p.requires_grad_(step not in (1, 2))
            x, y = batch(step)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            expected = grad_stats(model)
            opt.step()
        monitor.flush()
    run = read_run(str(tmp_path))
    all_layers = ("embed", "block.0", "block.2", "head", "(root)")
    assert set(run.layouts[0]) == set(all_layers) and set(run.layouts[3]) == set(all_layers)
    assert "embed" not in run.layouts[1] and "embed" not in run.layouts[2]
    assert set(run.layouts[1]) == set(all_layers) - {"embed"}
    assert_stats(run, 3, expected)


def test_layer_filters_and_grouping(tmp_path):
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    )
    names = [n for n, _ in discover_layers(model)]
    assert names == ["0.0", "0.1", "1.0", "1.1"]
    assert [n for n, _ in discover_layers(model, group_depth=1)] == ["0", "1"]
    assert [n for n, _ in discover_layers(model, include=r"^1\.")] == ["1.0", "1.1"]
    assert [n for n, _ in discover_layers(model, exclude=r"\.1$")] == ["0.0", "1.0"]
    assert [n for n, _ in discover_layers(model, group_by=lambda n: "odd" if n.endswith("1") else "even")] == [
        "even", "odd"]
    # a tied weight (embedding = output projection) goes to its first owner the filters keep
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert [(n, len(ps)) for n, ps in discover_layers(tied)] == [("0", 1)]
    assert [(n, ps[0] is tied[0].weight) for n, ps in discover_layers(tied, include=r"^1$")] == [("1", True)]
    assert [n for n, _ in discover_layers(tied, exclude=r"^0$")] == ["1"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, opt, str(tmp_path), group_depth=1):
        model(torch.randn(5, 4)).sum().backward()
        g0 = torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm().item()
        g1 = torch.cat([p.grad.flatten() for p in model[1].parameters()]).norm().item()
        opt.step()
    run = read_run(str(tmp_path))
    assert run.layouts[0] == ("0", "1")
    assert close(run.layers["grad_norm"][0]["0"], g0) and close(run.layers["grad_norm"][0]["1"], g1)


def test_several_optimizers_make_one_step_record(tmp_path):
    torch.manual_seed(4)
    model = Net()
    opt_a = torch.optim.SGD(list(model.embed.parameters()) + list(model.block.parameters()), lr=0.05)
    opt_b = torch.optim.Adam([
        {"params": model.head.parameters(), "lr": 1e-3},
        {"params": [model.temperature], "lr": 1e-2},
    ])
    with GradientMonitor(model, [opt_a, opt_b], str(tmp_path)) as monitor:
        for step in range(3):
            x, y = batch(step)
            opt_a.zero_grad()
            opt_b.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            expected = grad_stats(model)
            before = weights(model)
            opt_a.step()
            opt_b.step()
            after = weights(model)
        assert monitor.step == 3
    run = read_run(str(tmp_path))
    assert sorted(run.layouts) == [0, 1, 2]
    assert set(run.layouts[2]) == {"embed", "block.0", "block.2", "head", "(root)"}
    assert_stats(run, 2, expected)
    for layer in before:
        assert close(run.layers["update_norm"][2][layer], float((after[layer] - before[layer]).norm()), rel=1e-4)


def test_update_norms_off_and_existing_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(5)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sw = SummaryWriter(str(tmp_path))
    with GradientMonitor(model, opt, writer=sw, update_norms=False):
        for step in range(2):
            x, y = batch(step)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            sw.add_scalar("train/loss", loss.item(), step)
            expected = grad_stats(model)
            opt.step()
    sw.close()
    run = read_run(str(tmp_path))
    assert len(run.files) == 1  # our summaries landed in the user's own file
    assert sorted(run.scalars["train/loss"]) == [0, 1]
    assert "update_norm" not in run.layers
    assert_stats(run, 1, expected)


def test_real_explosion_shows_growing_norms_and_nonfinite_counts(tmp_path):
    torch.manual_seed(6)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 32)
    y = torch.randn(64, 1)
    with GradientMonitor(model, opt, str(tmp_path)):
        for step in range(40):
            if step == 10:
                for group in opt.param_groups:
                    group["lr"] = 5.0  # the mistake: a learning rate far too large
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = read_run(str(tmp_path))
    assert sorted(run.layouts) == list(range(40))
    total = np.array([run.scalars["total_grad_norm"][s] for s in range(40)])
    assert np.all(np.isfinite(total[:10]))
    baseline = np.median(total[:10])
    blown = ~np.isfinite(total) | (total > 1e3 * baseline)
    assert blown[10:].any(), total
    nonfinite = [sum(run.layers["nonfinite_count"][s].values()) for s in range(40)]
    assert sum(nonfinite[:10]) == 0
    first_bad = next(s for s in range(40) if nonfinite[s] > 0)
    assert first_bad > 10
    # before the first non-finite gradient the norms grew by orders of magnitude
    assert np.nanmax(total[10:first_bad + 1]) > 100 * baseline
    assert run.scalars["lr"][39] == pytest.approx(5.0)


def test_histograms_equal_numpy_on_the_format_bins(tmp_path):
    torch.manual_seed(7)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    expected, stats = {}, {}
    with GradientMonitor(model, opt, str(tmp_path), every=3, histograms_every=2):
        for step in range(5):
            x, y = batch(step)
            if step == 4:
                x[0, 0] = float("nan")  # a bad sample: non-finite gradients downstream of it
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            expected[step] = {
                n: fmt.histogram_counts(torch.cat([p.grad.flatten() for p in ps]).numpy())
                for n, ps in layer_params(model).items()
            }
            stats[step] = grad_stats(model)
            opt.step()
    run = read_run(str(tmp_path))
    assert sorted(run.hist) == [0, 2, 4]
    assert sorted(run.layouts) == [0, 3]  # norms on every=3 steps only
    # step 0 takes norms and max |g| from the histogram's pass, step 3 from the norms-only passes
    for step in (0, 3):
        assert_stats(run, step, stats[step], metrics=("grad_norm", "grad_max_abs", "nonfinite_count"))
    for step in (0, 2, 4):
        for layer, counts in run.hist[step].items():
            assert counts.shape == (fmt.HIST_BINS,)
            np.testing.assert_array_equal(counts, expected[step][layer])
            assert counts.sum() == sum(p.numel() for p in layer_params(model)[layer])
    assert run.hist[4]["embed"][fmt.HIST_NONFINITE] > 0
    assert sum(c[fmt.HIST_NONFINITE] for c in run.hist[2].values()) == 0
    # the bulk of a healthy gradient lies in the finite log-magnitude bins
    assert run.hist[0]["head"][fmt.HIST_UNDERFLOW + 1:fmt.HIST_OVERFLOW].sum() > 0.9 * run.hist[0]["head"].sum()


@pytest.mark.parametrize("histograms", [0, 1])
def test_sparse_embedding_gradients(tmp_path, histograms):
    # nn.Embedding(sparse=True) gives sparse gradients whose indices repeat (a token twice in the batch): statistics
    # and histograms must equal those of the dense gradient, and the update norm those of the applied step.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dense, before, after = {}, {}, {}
    with GradientMonitor(model, opt, str(tmp_path), histograms_every=histograms):
        for step in range(3):
            tokens = torch.tensor([[1, 2, 2, 7], [7, 7, 30, 1]]) + step
            opt.zero_grad()
            model(tokens).sum(dim=1).pow(2).mean().backward()
            assert model[0].weight.grad.is_sparse
            dense[step] = {n: torch.cat([p.grad.to_dense().double().flatten() for p in ps])
                           for n, ps in layer_params(model).items()}
            before[step] = weights(model)
            opt.step()
            after[step] = weights(model)
    run = read_run(str(tmp_path))
    for step in range(3):
        for layer, g in dense[step].items():
            assert close(run.layers["grad_norm"][step][layer], float(g.norm()))
            assert close(run.layers["grad_max_abs"][step][layer], float(g.abs().max()))
            assert run.layers["nonfinite_count"][step][layer] == 0
            update = float((after[step][layer] - before[step][layer]).norm())
            assert close(run.layers["update_norm"][step][layer], update, rel=1e-4)
            if histograms:
                np.testing.assert_array_equal(run.hist[step][layer], fmt.histogram_counts(g.float().numpy()))
    assert bool(run.hist) == bool(histograms)


def test_bad_use_gets_clear_errors(tmp_path):
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradientMonitor(frozen, opt, str(tmp_path))
    other = torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not own"):
        GradientMonitor(model, other, str(tmp_path))
    with pytest.raises(ValueError, match="every"):
        GradientMonitor(model, opt, str(tmp_path), every=0)
    with pytest.raises(TypeError, match="Optimizer"):
        GradientMonitor(model, "adam", str(tmp_path))
    with pytest.raises(ValueError, match="logdir or writer"):
        GradientMonitor(model, opt)
    assert not glob.glob(str(tmp_path / "events*"))  # failed construction wrote nothing
    monitor = GradientMonitor(model, opt, str(tmp_path))
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"):
        monitor.log_loss(1.0)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()  # hooks are gone: training after close still works and records nothing
    assert monitor.step == 0
    assert read_run(str(tmp_path)).layouts == {}


def test_global_step_and_float_loss(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, opt, str(tmp_path), every=5) as monitor:
        monitor.set_global_step(1000)
        for _ in range(6):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            monitor.log_loss(loss.item())
            opt.step()
        assert monitor.step == 1006
    run = read_run(str(tmp_path))
    assert sorted(run.layouts) == [1000, 1005]
    assert sorted(run.scalars["loss"]) == [1000, 1005]


@pytest.mark.slow
def test_torch_compiled_model(tmp_path):
    torch.manual_seed(8)
    model = Net()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(compiled, opt, str(tmp_path)) as monitor:
        assert set(monitor.layers) == {"embed", "block.0", "block.2", "head", "(root)"}
        for step in range(2):
            x, y = batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(compiled(x), y).backward()
            expected = grad_stats(model)
            opt.step()
    assert_stats(read_run(str(tmp_path)), 1, expected)
