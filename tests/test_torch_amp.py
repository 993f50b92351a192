"""GradientMonitor under mixed precision: unscaled norms, the loss scale, and overflow skips recorded as such."""

from __future__ import annotations

import pytest
import torch
from test_torch_monitor import Net, batch, close, grad_stats, read_run
from torch import nn

from tb_gradient_plugin.torch import GradientMonitor

torch.set_num_threads(1)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adam"])
@pytest.mark.parametrize("unscale", [False, True], ids=["implicit_unscale", "explicit_unscale_and_clip"])
def test_grad_scaler_unscaled_norms_loss_scale_and_overflow_skips(tmp_path, fused, unscale):
    torch.manual_seed(0)
    model = Net()
    if fused:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    # A scale so large that the first backward passes overflow float32: the scaler skips them and backs off.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, growth_interval=3)
    steps = 10
    scales, skipped, expected, pre_weights, post_weights = [], [], {}, {}, {}
    with GradientMonitor(model, opt, str(tmp_path), scaler=scaler) as monitor:
        for step in range(steps):
            x, y = batch(step)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y) * 20
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            expected[step] = grad_stats(model, scale=scale)
            if unscale:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            pre_weights[step] = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            post_weights[step] = [p.detach().clone() for p in model.parameters()]
            scaler.update()
            scales.append(scale)
            skipped.append(scaler.get_scale() < scale)
        assert monitor.step == steps  # skipped steps are counted too
    assert any(skipped) and not all(skipped), skipped

    run = read_run(str(tmp_path))
    assert sorted(run.layouts) == list(range(steps))
    for step in range(steps):
        assert run.scalars["step_skipped"][step] == float(skipped[step]), step
        assert run.scalars["loss_scale"][step] == pytest.approx(scales[step], rel=1e-6)
        moved = any(not torch.equal(a, b) for a, b in zip(pre_weights[step], post_weights[step], strict=True))
        assert moved != skipped[step]
        nonfinite = sum(run.layers["nonfinite_count"][step].values())
        assert (nonfinite > 0) == skipped[step]
        if skipped[step]:
            assert all(v == 0 for v in run.layers["update_norm"][step].values())
            continue
        for layer, value in run.layers["grad_norm"][step].items():  # unscaled, before clipping
            assert close(value, expected[step][layer]["grad_norm"], rel=1e-4), (step, layer)
        assert run.layers["grad_norm"][step]["head"] < 1e3  # not scaled by the loss scale
