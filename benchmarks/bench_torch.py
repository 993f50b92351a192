"""Cost of GradientMonitor against the bare training loop and against the memory-traffic floor.

    python benchmarks/bench_torch.py [--model mlp|transformer|all] [--device cpu|cuda] [--repeats 5] [--steps 10]
                                     [--optimizer adamw|adam|sgd]

Whole-loop ratios (median step time of each variant / the bare loop's), variants interleaved within each repeat:
(a) ours every step; (b) ours every 10 steps; (c) ours every step without update norms; (d) per-parameter
``p.grad.norm().item()`` (Lightning ``grad_norm`` style); (e) per-parameter 64-bin histograms (W&B ``watch`` style);
(h) ours every step with histograms every step (a histogram step vs a norms-only step); (g) ours every step with
update norms through a weights copy ((a) reads them from the optimizer's state where it can).

The floor: the memory traffic no per-layer update-ratio monitor can avoid (one fused norm pass over the gradients,
one weights copy, one pass over the difference, one transfer), timed on the same tensors both inside the training loop
(variant (f): same cache and allocator state as the monitor) and alone. The monitor's own time per logged step is
timed inside its hooks, so the ratio to the floor does not carry the rest of the loop's noise.

Update norms, state vs copy: the work each path adds to a logged step, (1) inside the loop (monitor's own time minus
that of (c), which has no update norms) and (2) alone on the same tensors, interleaved; and the extra memory each
takes during ``optimizer.step()`` on a logged step (how far the peak resident set size rises, minus that of a monitor
without update norms), against the parameters' size.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tb_gradient_plugin.torch import GradientMonitor, weights_copy
from tb_gradient_plugin.torch.optim_updates import StateUpdate

FLOOR = "(f) floor work in the loop"
TIMED_METHODS = ("_capture_grads", "_pre_step", "_post_step", "_finish_step", "_skipped_step")


def mlp(device: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(1024, 1024), nn.GELU()]
    model = nn.Sequential(*layers).to(device)
    x = torch.randn(512, 1024, device=device)
    y = torch.randn(512, 1024, device=device)
    return model, lambda: nn.functional.mse_loss(model(x), y)


def transformer(device: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.Embedding(1000, 256), nn.TransformerEncoder(layer, 6, enable_nested_tensor=False),
                          nn.Linear(256, 1000)).to(device)
    tokens = torch.randint(0, 1000, (32, 128), device=device)
    return model, lambda: nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Variant:
    """One way of running the loop: optional setup/teardown around the timed steps and work after backward."""

    def __init__(self, name: str, monitor_kwargs: dict | None = None, after_backward: Callable | None = None):
        self.name = name
        self.monitor_kwargs = monitor_kwargs
        self.after_backward = after_backward
        self.own: list[float] = []  # seconds spent inside the monitor, per logged step
        self.own_per_step: list[float] = []  # seconds spent inside the monitor, per training step (logged or not)


def per_param_norm_item(model: nn.Module) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.norm().item()


def per_param_histograms(model: nn.Module) -> None:
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.detach().flatten()
            lo, hi = g.min().item(), g.max().item()
            torch.histc(g, bins=64, min=lo, max=hi).cpu()


def timed_monitor(monitor: GradientMonitor, sink: list[float]) -> None:
    """Accumulate the wall time spent inside the monitor's own methods (the instance attributes shadow the class)."""
    depth = [0]
    for name in TIMED_METHODS:
        original = getattr(monitor, name)

        def wrapper(*args, _original=original, **kwargs):
            depth[0] += 1  # only the outermost call is timed: these methods call each other
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    sink[0] += time.perf_counter() - t

        setattr(monitor, name, wrapper)


def run_variant(variant: Variant, model: nn.Module, loss_fn: Callable, opt: torch.optim.Optimizer, steps: int,
                device: str, logdir: str) -> float:
    if variant.name == FLOOR:
        return run_floor(variant, model, loss_fn, opt, steps, device)
    monitor = None
    inside = [0.0]
    if variant.monitor_kwargs is not None:
        monitor = GradientMonitor(model, opt, logdir, **variant.monitor_kwargs)
        timed_monitor(monitor, inside)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        if monitor is not None:
            monitor.log_loss(loss)
        if variant.after_backward is not None:
            variant.after_backward(model)
        opt.step()
    sync(device)
    elapsed = time.perf_counter() - start
    if monitor is not None:
        every = variant.monitor_kwargs.get("every", 1)
        logged = len(range(0, steps, every))
        if every == 1:
            variant.own.append(inside[0] / logged)
        variant.own_per_step.append(inside[0] / steps)
        monitor.close()
    return elapsed / steps


def run_floor(variant: Variant, model: nn.Module, loss_fn: Callable, opt: torch.optim.Optimizer, steps: int,
              device: str) -> float:
    """The floor's work done inside the loop (so caches and allocator are in the same state as for the monitor)."""
    params = list(model.parameters())
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        sync(device)
        t = time.perf_counter()
        gn = torch._foreach_norm([p.grad for p in params])
        snap = [p.detach().clone() for p in params]
        sync(device)
        own = time.perf_counter() - t
        opt.step()
        sync(device)
        t = time.perf_counter()
        torch._foreach_sub_(snap, params)
        un = torch._foreach_norm(snap)
        torch.stack(gn + un).cpu()
        del snap
        variant.own.append(own + time.perf_counter() - t)
    sync(device)
    return (time.perf_counter() - start) / steps


def floor_time(model: nn.Module, loss_fn: Callable, device: str, repeats: int) -> float:
    """One fused norm over the gradients + weights copy + fused norm of the difference, with one host transfer."""
    loss_fn().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    times = []
    for _ in range(repeats * 3):
        sync(device)
        t = time.perf_counter()
        gn = torch._foreach_norm(grads)
        snap = [p.detach().clone() for p in params]
        torch._foreach_sub_(snap, params)
        un = torch._foreach_norm(snap)
        torch.stack(gn + un).cpu()
        del snap
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def update_norm_alone(model: nn.Module, loss_fn: Callable, opt: torch.optim.Optimizer, device: str,
                      repeats: int) -> dict[str, float]:
    """Median seconds of each path's update-norm work alone, interleaved: the copy (the monitor's weights copy before
    the step, difference and norm after it) and the state (see ``optim_updates``), each with its transfer to the
    host."""
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()  # the optimizer's state exists; gradients stay (the state path reads their presence)
    params = [p for p in model.parameters() if p.grad is not None]
    times: dict[str, list[float]] = {"copy": [], "state": []}
    for _ in range(repeats * 3):
        sync(device)
        t = time.perf_counter()
        snap = weights_copy.copies([p.detach() for p in params])
        torch._foreach_sub_(snap, params)
        torch.stack(torch._foreach_norm(snap)).cpu()
        del snap
        sync(device)
        times["copy"].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.cat(StateUpdate(opt, [params]).finish([torch.float64])).cpu()
        sync(device)
        times["state"].append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def step_peak_bytes(model: nn.Module, loss_fn: Callable, opt: torch.optim.Optimizer, logdir: str,
                    update_norms: str | bool) -> int | None:
    """How far the resident set size rises during ``optimizer.step()`` of a logged step (the monitor's pre- and
    post-step work included): its peak (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its size before.
    Free heap memory is handed back first, so that a copy cannot hide in pages the process already holds. None where
    Linux's counters are not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        with GradientMonitor(model, opt, logdir, update_norms=update_norms):
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            libc.malloc_trim(0)
            before = _status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            opt.step()
            return _status_bytes("VmHWM") - before
    except OSError:
        return None


def update_norm_report(model: nn.Module, loss_fn: Callable, opt: torch.optim.Optimizer, device: str, repeats: int,
                       own: dict[str, float], logdir: str) -> None:
    copy_in_loop = own["(g) ours every step, update norms via copy"] - own["(c) ours every step, no update norms"]
    state_in_loop = own["(a) ours every step"] - own["(c) ours every step, no update norms"]
    alone = update_norm_alone(model, loss_fn, opt, device, repeats)
    print(f"update norms per logged step, in the loop (own time minus (c)'s): copy {copy_in_loop * 1e3:.2f} ms, "
          f"state {state_in_loop * 1e3:.2f} ms, state/copy {state_in_loop / copy_in_loop:.2f}x")
    print(f"update norms per logged step, alone: copy {alone['copy'] * 1e3:.2f} ms, state {alone['state'] * 1e3:.2f} "
          f"ms, state/copy {alone['state'] / alone['copy']:.2f}x")
    if device == "cpu":
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # Each variant's least rise over 5 logged steps: what else the process allocates meanwhile only adds to it.
        peaks = {mode: [step_peak_bytes(model, loss_fn, opt, logdir, mode) for _ in range(5)]
                 for mode in (False, "copy", "state")}
        if any(None in v for v in peaks.values()):
            print("peak RSS: not measurable on this system")
            return
        base = min(peaks[False])
        for mode in ("copy", "state"):
            extra = min(peaks[mode]) - base
            print(f"extra peak RSS during a logged step, {mode}: {extra / 2**20:.2f} MiB "
                  f"= {extra / param_bytes:.3f}x the parameters ({param_bytes / 2**20:.1f} MiB)")


OPTIMIZERS: dict[str, Callable] = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-5),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-5, weight_decay=1e-4),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4),
}


def bench(name: str, factory: Callable, device: str, repeats: int, steps: int,
          optimizer: str = "adamw") -> dict[str, float]:
    torch.manual_seed(0)
    model, loss_fn = factory(device)
    opt = OPTIMIZERS[optimizer](model.parameters())
    variants = [
        Variant("bare"),
        Variant("(a) ours every step", {"every": 1}),
        Variant("(b) ours every 10 steps", {"every": 10}),
        Variant("(c) ours every step, no update norms", {"every": 1, "update_norms": False}),
        Variant("(g) ours every step, update norms via copy", {"every": 1, "update_norms": "copy"}),
        Variant("(d) per-parameter grad.norm().item()", after_backward=per_param_norm_item),
        Variant("(e) per-parameter 64-bin histograms", after_backward=per_param_histograms),
        Variant("(h) ours every step + histograms", {"every": 1, "histograms_every": 1}),
        Variant(FLOOR),
    ]
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    with tempfile.TemporaryDirectory() as logdir:
        for v in variants:  # warm-up: allocator, caches, optimizer state
            run_variant(v, model, loss_fn, opt, 1, device, logdir)
            v.own.clear()
        for _ in range(repeats):
            for v in variants:
                times[v.name].append(run_variant(v, model, loss_fn, opt, steps, device, logdir))
    floor = floor_time(model, loss_fn, device, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    bare = med["bare"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {name} on {device}, {type(opt).__name__}: {n_params / 1e6:.1f}M parameters, {repeats} repeats x "
          f"{steps} steps, bare step {bare * 1e3:.1f} ms")
    print(f"{'variant':44s} {'ms/step':>9s} {'x bare':>8s} {'overhead':>9s}")
    for k, t in med.items():
        print(f"{k:44s} {t * 1e3:9.2f} {t / bare:8.3f} {(t - bare) / bare:+9.3f}")
    out = {k: t / bare for k, t in med.items()}
    own = {v.name: statistics.median(v.own) for v in variants if v.own and v.name != FLOOR}
    in_loop = statistics.median(variants[-1].own)
    print(f"floor (fused grad norm + weights copy + diff norm + one transfer): {in_loop * 1e3:.2f} ms in the loop, "
          f"{floor * 1e3:.2f} ms alone (warm caches)")
    for k, t in own.items():
        print(f"monitor's own time per logged step, {k}: {t * 1e3:.2f} ms = {t / in_loop:.2f}x floor in the loop, "
              f"{t / floor:.2f}x floor alone")
    over_a = med["(a) ours every step"] - bare
    over_b = med["(b) ours every 10 steps"] - bare
    over_d = med["(d) per-parameter grad.norm().item()"] - bare
    print(f"(b) overhead / (a) overhead: {over_b / over_a:.3f}" if over_a > 0 else "(a) overhead not measurable")
    # the same question without the loop's noise: time spent inside the monitor per training step
    per_step = {v.name: statistics.median(v.own_per_step) for v in variants if v.own_per_step}
    own_a, own_b = per_step.get("(a) ours every step"), per_step.get("(b) ours every 10 steps")
    if own_a and own_b:
        print(f"(b) / (a), the monitor's own time per training step: {own_b * 1e3:.3f} ms / {own_a * 1e3:.3f} ms "
              f"= {own_b / own_a:.3f}")
    print(f"(d) overhead / (a) overhead: {over_d / over_a:.2f}" if over_a > 0 else "")
    hist = own.get("(h) ours every step + histograms")
    norms = own.get("(a) ours every step")
    if hist and norms:
        print(f"histogram step / norms-only logged step (monitor's own time): {hist / norms:.2f}x")
    with tempfile.TemporaryDirectory() as logdir:
        update_norm_report(model, loss_fn, opt, device, repeats, own, logdir)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "transformer", "all"), default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"mlp": mlp, "transformer": transformer}
    for name in models if args.model == "all" else [args.model]:
        bench(name, models[name], args.device, args.repeats, args.steps, args.optimizer)


if __name__ == "__main__":
    main()
