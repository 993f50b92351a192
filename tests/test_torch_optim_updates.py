"""Update norms read from the optimizer's state equal those of a weights copy, on real training.

Every run trains a small model with two monitors on the same optimizer (one forced to the weights copy, one to the
state) and compares both with ``||w_after - w_before||`` computed by hand from weight copies saved in the test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_torch_monitor import read_run, weights
from torch import nn

from tb_gradient_plugin.torch import GradientMonitor, optim_updates

torch.set_num_threads(1)

REL = 1e-4


class Branchy(nn.Module):
    """Small model with a root parameter, two parameter groups' worth of layers and a branch used every other step
    (its parameters then have no gradient, so their Adam step counts lag behind the others')."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.LayerNorm(width))
        self.side = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor, use_side: bool) -> torch.Tensor:
        h = self.block(self.embed(x))
        if use_side:
            h = h + torch.tanh(self.side(h))
        return self.head(h) / self.temperature


def batch(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def param_groups(model: Branchy, lr: float, wd: float) -> list[dict]:
    """Two groups with their own learning rate and weight decay (the second without decay, as is common)."""
    decayed = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decayed, "lr": lr, "weight_decay": wd}, {"params": rest, "lr": lr * 0.5, "weight_decay": 0.0}]


def train(tmp_path, make_opt, steps: int = 5, modes=("copy", "state"), hooks=(), width: int = 24):
    """Train ``Branchy`` with one monitor per mode; return (runs by mode, hand-computed updates, paths by mode)."""
    torch.manual_seed(0)
    model = Branchy(width)
    opt = make_opt(model)
    monitors = {m: GradientMonitor(model, opt, str(tmp_path / m), update_norms=m) for m in modes}
    for hook in hooks:
        opt.register_step_pre_hook(hook)
    expected: dict[int, dict[str, float]] = {}
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, use_side=step % 2 == 0), y).backward()
        before = weights(model)
        opt.step()
        after = weights(model)
        expected[step] = {n: float((after[n] - before[n]).norm()) for n in before}
    paths = {m: mon.update_norm_paths for m, mon in monitors.items()}
    for mon in monitors.values():
        mon.close()
    return {m: read_run(str(tmp_path / m)) for m in modes}, expected, paths


def assert_updates(run, expected, steps=None) -> None:
    got = run.layers["update_norm"]
    for step in steps if steps is not None else sorted(expected):
        for layer, value in got[step].items():
            ref = expected[step][layer]
            assert abs(value - ref) <= REL * ref + 1e-12, (step, layer, value, ref)
        # a layer without gradient at this step (the unused branch) is not in the step's layout
        assert ("side" in got[step]) == (step % 2 == 0)


SGD_OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "maximize": True},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
    {"momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True},
    {"momentum": 0.9, "weight_decay": 0.1, "foreach": True},
    {"weight_decay": 0.1, "foreach": True, "maximize": True},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "fused": True},
    {"weight_decay": 0.1, "fused": True},
]
ADAM_OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "amsgrad": True},
    {"weight_decay": 0.1, "maximize": True},
    {"weight_decay": 0.1, "amsgrad": True, "foreach": True},
    {"weight_decay": 0.1, "fused": True},
    {"weight_decay": 0.1, "amsgrad": True, "maximize": True, "fused": True},
]
CASES = (
    [(torch.optim.SGD, 0.05, o) for o in SGD_OPTIONS]
    + [(torch.optim.Adam, 3e-3, o) for o in ADAM_OPTIONS]
    + [(torch.optim.AdamW, 3e-3, o) for o in ADAM_OPTIONS]
    + [(torch.optim.Adam, 3e-3, {"weight_decay": 0.1, "decoupled_weight_decay": True})]
)


@pytest.fixture
def small_chunks(monkeypatch):
    """Every tensor from the state (none copied, however small), in chunks of 100 elements: the layers of these
    small models are then split into pieces across several chunks."""
    monkeypatch.setattr(optim_updates, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(optim_updates, "CHUNK_ELEMENTS", 100)


@pytest.mark.parametrize(("cls", "lr", "options"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_state_update_norms_equal_copy_and_hand_computed(tmp_path, small_chunks, cls, lr, options):
    wd = options.get("weight_decay", 0.0)
    rest = {k: v for k, v in options.items() if k != "weight_decay"}
    runs, expected, paths = train(tmp_path, lambda m: cls(param_groups(m, lr, wd), lr=lr, **rest))
    assert paths == {"copy": ("copy",), "state": ("state",)}
    assert_updates(runs["copy"], expected)
    assert_updates(runs["state"], expected)
    for step, layers in runs["copy"].layers["update_norm"].items():  # and state vs copy directly
        for layer, value in layers.items():
            assert runs["state"].layers["update_norm"][step][layer] == pytest.approx(value, rel=REL)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_step_counts_kept_on_the_device_give_the_same_norms(tmp_path, monkeypatch, small_chunks, cls):
    # Fused optimizers on an accelerator keep step counts on the device; reading them would sync, so the bias
    # corrections are then computed there. Take that path here (on the CPU) by refusing the host read.
    monkeypatch.setattr(optim_updates, "_host_steps", lambda steps: None)
    runs, expected, paths = train(
        tmp_path, lambda m: cls(param_groups(m, 3e-3, 0.1), lr=3e-3, amsgrad=True), modes=("state",)
    )
    assert paths == {"state": ("state",)}
    assert_updates(runs["state"], expected)


def test_default_sizes_and_auto_mode(tmp_path):
    # width 96: the weight matrices come from the state, the small biases and norms from a copy
    assert 96 * 96 > optim_updates.SMALL_ELEMENTS >= 96
    runs, expected, paths = train(tmp_path, lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3), modes=("auto",),
                                  width=96)
    assert paths == {"auto": ("state",)}
    assert_updates(runs["auto"], expected)


class SignSGD(torch.optim.SGD):
    """A subclass with its own step (sign of the gradient): the SGD state says nothing about what it did."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


FALLBACKS = {
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3),
    "tensor_lr": lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(3e-3)),
    "subclass_step": lambda m: SignSGD(m.parameters(), lr=1e-3),
    "nesterov_foreach": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                                  foreach=True),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_what_the_state_cannot_say_falls_back_to_the_copy(tmp_path, name):
    runs, expected, paths = train(tmp_path, FALLBACKS[name], modes=("auto",))
    assert paths == {"auto": ("copy",)}
    assert_updates(runs["auto"], expected)
    model = Branchy()
    with pytest.raises(ValueError, match="update_norms='state' is not possible"):
        GradientMonitor(model, FALLBACKS[name](model), str(tmp_path / "x"), update_norms="state")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_sparse_gradients_are_not_modelled():
    model = nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert optim_updates.unsupported_reason(opt) is None
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert optim_updates.unsupported_reason(opt) == "sparse gradients"


def test_several_optimizers_each_take_their_own_path(tmp_path):
    def make(model):
        return [torch.optim.AdamW([model.embed.weight, model.head.weight], lr=3e-3),
                torch.optim.RMSprop([p for n, p in model.named_parameters()
                                     if n not in ("embed.weight", "head.weight")], lr=1e-3)]

    torch.manual_seed(0)
    model = Branchy()
    opts = make(model)
    with GradientMonitor(model, opts, str(tmp_path)) as monitor:
        for step in range(3):
            x, y = batch(step)
            for o in opts:
                o.zero_grad()
            nn.functional.cross_entropy(model(x, use_side=True), y).backward()
            before = weights(model)
            for o in opts:
                o.step()
            after = weights(model)
        assert monitor.update_norm_paths == ("state", "copy")
    got = read_run(str(tmp_path)).layers["update_norm"][2]
    for layer, value in got.items():
        assert value == pytest.approx(float((after[layer] - before[layer]).norm()), rel=REL)


def test_learning_rate_changed_while_the_step_runs_is_not_guessed(tmp_path):
    def halve_lr(optimizer, _args, _kwargs):  # a schedule run from a hook after the monitor's, inside step()
        for group in optimizer.param_groups:
            group["lr"] *= 0.5

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs, expected, paths = train(tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                                      modes=("auto",), hooks=(halve_lr,))
    assert any("changed while the step ran" in str(w.message) for w in caught)
    assert paths == {"auto": ("copy",)}  # from then on
    run = runs["auto"]
    assert 0 not in run.layers["update_norm"]  # unknown at step 0: nothing recorded rather than a wrong value
    assert 0 in run.layers["grad_norm"]
    assert_updates(run, expected, steps=range(1, 5))


def test_gradients_removed_before_the_step_mean_no_update(tmp_path):
    def drop_grads(optimizer, _args, _kwargs):  # what the explosion guard does to skip a step
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    runs, expected, paths = train(tmp_path, lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
                                  modes=("state",), hooks=(drop_grads,), steps=2)
    assert paths == {"state": ("state",)}
    for step in (0, 1):
        assert all(v == 0 for v in expected[step].values())
        assert set(runs["state"].layers["update_norm"][step].values()) == {0.0}


def test_update_norms_option_values(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="update_norms must be"):
        GradientMonitor(model, opt, str(tmp_path), update_norms="fast")
    with GradientMonitor(model, opt, str(tmp_path / "a"), update_norms=True) as monitor:
        assert monitor.update_norms == "auto"
        assert monitor.update_norm_paths == ("state",)
    with GradientMonitor(model, opt, str(tmp_path / "b"), update_norms=False) as monitor:
        assert monitor.update_norm_paths == (None,)


def test_sixteen_bit_weights_take_the_copy():
    # bf16 weights round every update visibly: the copy sees what was applied, the state only what was intended
    model = nn.Linear(4, 4).to(torch.bfloat16)
    assert "16-bit" in optim_updates.unsupported_reason(torch.optim.AdamW(model.parameters()))
    assert optim_updates.unsupported_reason(torch.optim.AdamW(nn.Linear(4, 4).parameters())) is None
