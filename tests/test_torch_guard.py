"""The explosion guard acting in real PyTorch training: the monitor refuses, raises, warns and records, and DDP ranks
agree without talking."""

from __future__ import annotations

import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tb_gradient_plugin.detect import DetectorConfig
from tb_gradient_plugin.guard import (
    GUARD_NONE,
    GUARD_RAISE,
    GUARD_SKIP,
    GUARD_WARN,
    ExplosionGuard,
    GradientExplosionError,
    GradientExplosionWarning,
)
from tb_gradient_plugin.runs import load_run
from tb_gradient_plugin.torch import GradientMonitor


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _train(model, opt, monitor, steps: int, spike_at: int, factor: float = 1e4, record=None):
    """Plain loop; at ``spike_at`` the middle layer's gradient is multiplied (a hook, so backward sees it)."""
    torch.manual_seed(1)
    data = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(steps)]
    for step, (x, y) in enumerate(data):
        handle = model[2].weight.register_hook(lambda g: g * factor) if step == spike_at else None
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if handle is not None:
            handle.remove()
        monitor.log_loss(loss)
        before = [p.detach().clone() for p in model.parameters()]
        state_before = {k: v.clone() for k, v in opt.state[model[2].weight].items()} if opt.state else {}
        opt.step()
        if record is not None:
            record.append((before, [p.detach().clone() for p in model.parameters()], state_before,
                           {k: v.clone() for k, v in opt.state[model[2].weight].items()}))


@pytest.mark.parametrize("grads_at", ["backward", "step"])
def test_monitor_skip_leaves_weights_and_optimizer_state_unchanged(tmp_path, grads_at):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    record: list = []
    with GradientMonitor(model, opt, tmp_path, on_explosion="skip", every=5, grads_at=grads_at) as monitor:
        _train(model, opt, monitor, 50, spike_at=40, record=record)
    before, after, state_before, state_after = record[40]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # weights untouched
    assert torch.equal(state_before["step"], state_after["step"])  # Adam did not count the step
    assert torch.equal(state_before["exp_avg"], state_after["exp_avg"])
    b39, a39, _, _ = record[39]
    assert not all(torch.equal(a, b) for a, b in zip(b39, a39, strict=True))  # ordinary steps do move
    assert [d.step for d in monitor.guard.decisions] == [40]
    assert monitor.guard.decisions[0].episodes[0].layers[0].name == "2"

    run = load_run(str(tmp_path))
    actions = run.series["guard_action"]
    # logged steps (every 5) say "nothing done"; the skipped step 40 is written although it is a logged step anyway,
    # and its gradient statistics show the exploded layer
    assert dict(zip(actions.steps.tolist(), actions.values.tolist(), strict=True))[40] == GUARD_SKIP
    assert set(actions.values[actions.steps != 40].tolist()) == {GUARD_NONE}
    assert actions.steps.tolist() == list(range(0, 50, 5))
    i = run.steps.tolist().index(40)
    j = run.layers.index("2")
    assert run.layer_metrics["grad_norm"][i, j] > 100 * np.median(run.layer_metrics["grad_norm"][:i, j])
    np.testing.assert_array_equal(run.layer_metrics["update_norm"][i], 0)  # the weights did not move
    assert (run.layer_metrics["update_norm"][i - 1] > 0).all()


def test_monitor_writes_guard_steps_that_are_not_logged(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    with GradientMonitor(model, opt, tmp_path, on_explosion="skip", every=10) as monitor:
        _train(model, opt, monitor, 45, spike_at=37)
    run = load_run(str(tmp_path))
    assert run.steps.tolist() == [0, 10, 20, 30, 37, 40]
    actions = run.series["guard_action"]
    assert actions.steps.tolist() == [0, 10, 20, 30, 37, 40]
    assert actions.values.tolist() == [0, 0, 0, 0, GUARD_SKIP, 0]


def test_monitor_raise_records_the_step_then_stops(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = GradientMonitor(model, opt, tmp_path, on_explosion="raise", every=3)
    record: list = []
    with pytest.raises(GradientExplosionError) as info:
        _train(model, opt, monitor, 50, spike_at=40, record=record)
    assert info.value.step == 40 and info.value.episode.layers[0].name == "2"
    assert len(record) == 40  # optimizer.step() raised before applying step 40
    assert monitor.step == 41
    monitor.close()
    run = load_run(str(tmp_path))
    actions = run.series["guard_action"]
    assert actions.steps[-1] == 40 and actions.values[-1] == GUARD_RAISE
    assert run.steps[-1] == 40


def test_monitor_warn_and_nonfinite_gradients(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, opt, tmp_path,
                                                                         on_explosion="warn") as monitor:
        warnings.simplefilter("always")
        _train(model, opt, monitor, 6, spike_at=3, factor=math.nan)
    found = [str(w.message) for w in caught if issubclass(w.category, GradientExplosionWarning)]
    assert len(found) == 1 and "non-finite gradients at step 3" in found[0] and "2 (nonfinite_count" in found[0]
    run = load_run(str(tmp_path))
    assert run.series["guard_action"].values.tolist() == [0, 0, 0, GUARD_WARN, 0, 0]


def test_guard_off_by_default_writes_no_guard_action(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with GradientMonitor(model, opt, tmp_path) as monitor:
        _train(model, opt, monitor, 45, spike_at=40)
        assert monitor.guard is None
    run = load_run(str(tmp_path))
    assert "guard_action" not in run.series
    with pytest.raises(ValueError, match="on_explosion"):
        GradientMonitor(model, opt, tmp_path, on_explosion="explode")


# ------------------------------------------------------------------------------------------- DDP: all ranks agree

SMALL = DetectorConfig(block=4, window_blocks=4, min_history=8)


def _ddp_worker(rank: int, world: int, port: int, logdir: str, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        moved = []
        with GradientMonitor(model, opt, logdir, on_explosion=ExplosionGuard("skip", SMALL)) as monitor:
            for step in range(20):
                torch.manual_seed(100 * step + rank)
                x, y = torch.randn(16, 8), torch.randn(16, 1)
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                (loss * (1e4 if step == 15 and rank == 1 else 1.0)).backward()  # only rank 1's batch is bad
                before = [p.detach().clone() for p in model.parameters()]
                opt.step()
                moved.append(not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)))
            skipped = [d.step for d in monitor.guard.decisions if d.skip]
        weights = [p.detach() for p in model.parameters()]
        torch.save({"moved": moved, "skipped": skipped, "weights": weights}, os.path.join(outdir, f"{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (that aborts the process)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_ranks_skip_the_same_step_without_talking(tmp_path):
    logdir, outdir = str(tmp_path / "logs"), str(tmp_path / "out")
    os.makedirs(outdir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, logdir, outdir), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(outdir, f"{r}.pt")) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == [15]
    assert r0["moved"] == r1["moved"] == [True] * 15 + [False] + [True] * 4
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"], strict=True))
    run = load_run(logdir)  # rank 0 alone wrote
    assert run.series["guard_action"].values.tolist() == [0] * 15 + [GUARD_SKIP] + [0] * 4
