"""Cost of the JAX/Optax GradientMonitor against the bare jitted training loop.

    python benchmarks/bench_jax.py [--device cpu|gpu] [--repeats 3] [--steps 10] [--donate]

An MLP of 8 x (1024 -> 1024, GELU) layers, batch 512, MSE loss, AdamW, one jitted step. Variants, interleaved within
each repeat: the bare loop, the monitor every step, every 10 steps, every step with histograms every step, and every
10 steps with the explosion guard (``on_explosion="skip"``: every step measured and judged). Each variant is compiled
and warmed up (one untimed round of every variant); then every repeat runs ``--steps`` steps of each variant in turn,
and the figure per repeat is the process CPU time per step (on a GPU: wall time, the device's clock). Ratios are
medians over repeats of variant / bare, so both come from the same run of this script. The monitor's own time per
logged step is (every-step time - bare time) per step, and, free of the loop's noise, the time of its reductions alone
(gradient, parameter and update statistics of the same arrays in one jitted function, without the host callback).

On the CPU each variant's minor page faults per step and its ratio in user CPU time alone are printed too: a step that
touches fresh memory (glibc hands large freed buffers back to the kernel) pays for zeroing pages in system time, and
that, not the arithmetic, is what differs most between two compilations of nearly the same step.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--donate", action="store_true",
                        help="donate the parameters and optimizer state to the step (jit's donate_argnums), as "
                             "training loops that update in place do")
    args = parser.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"

    import jax
    import jax.numpy as jnp
    import optax

    from tb_gradient_plugin.jax import GradientMonitor
    from tb_gradient_plugin.jax.stats import grad_leaf, layer_grad_stats, layer_norms

    gpu = args.device == "gpu"
    clock = time.perf_counter if gpu else time.process_time
    key = jax.random.key(0)
    params = {}
    for i in range(8):
        key, sub = jax.random.split(key)
        params[f"fc{i}"] = {"kernel": jax.random.normal(sub, (1024, 1024)) / 32.0, "bias": jnp.zeros(1024)}
    x = jax.random.normal(jax.random.key(1), (512, 1024))
    y = jax.random.normal(jax.random.key(2), (512, 1024))

    def loss_fn(p):
        h = x
        for i in range(8):
            h = jax.nn.gelu(h @ p[f"fc{i}"]["kernel"] + p[f"fc{i}"]["bias"])
        return jnp.mean((h - y) ** 2)

    variants = {
        "bare": None,
        "every step": {"every": 1},
        "every 10 steps": {"every": 10},
        "every step + histograms": {"every": 1, "histograms_every": 1},
        "every 10 + guard (skip)": {"every": 10, "on_explosion": "skip"},
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    user: dict[str, list[float]] = {name: [] for name in variants}
    faults: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        loops = {}
        for name, kwargs in variants.items():  # each variant compiled once and warmed up before any timing
            monitor = None
            tx = optax.adamw(1e-4)
            if kwargs is not None:
                monitor = GradientMonitor(os.path.join(tmp, name), **kwargs)
                tx = monitor.wrap(tx)

            def train_step(p, s, tx=tx):
                loss, grads = jax.value_and_grad(loss_fn)(p)
                updates, s = tx.update(grads, s, p, loss=loss)
                return optax.apply_updates(p, updates), s, loss

            step = jax.jit(train_step, donate_argnums=(0, 1) if args.donate else ())
            p, state, loss = step(jax.tree_util.tree_map(jnp.copy, params), tx.init(params))
            jax.block_until_ready(loss)
            loops[name] = [monitor, step, p, state]
        for loop in loops.values():  # a round of every variant untimed: allocator and page faults settle first
            monitor, step, p, state = loop
            for _ in range(args.steps):
                p, state, loss = step(p, state)
            jax.block_until_ready((p, loss))
            loop[2:] = [p, state]
        for repeat in range(args.repeats):
            for name, loop in loops.items():
                monitor, step, p, state = loop
                before = resource.getrusage(resource.RUSAGE_SELF)
                start = clock()
                for _ in range(args.steps):
                    p, state, loss = step(p, state)
                jax.block_until_ready((p, loss))
                if monitor is not None:
                    jax.effects_barrier()
                elapsed = clock() - start
                after = resource.getrusage(resource.RUSAGE_SELF)
                loop[2:] = [p, state]
                times[name].append(elapsed / args.steps)
                user[name].append((after.ru_utime - before.ru_utime) / args.steps)
                faults[name].append((after.ru_minflt - before.ru_minflt) / args.steps)
                print(f"  repeat {repeat} {name}: {1e3 * elapsed / args.steps:.1f} ms/step", file=sys.stderr)
        for monitor, *_ in loops.values():
            if monitor is not None:
                monitor.close()

    layer_of = [i // 2 for i in range(16)]

    @jax.jit
    def reductions(g, p, u):
        rows = jnp.stack([grad_leaf(x) for x in jax.tree_util.tree_leaves(g)])
        leaves = jax.tree_util.tree_leaves
        return (layer_grad_stats(rows, layer_of, 8).norm, layer_norms(lambda: leaves(p), layer_of, 8),
                layer_norms(lambda: leaves(u), layer_of, 8))

    grads = jax.grad(loss_fn)(params)
    updates = jax.tree_util.tree_map(lambda a: 1e-3 * a, grads)
    jax.block_until_ready(reductions(grads, params, updates))
    alone = []
    for _ in range(args.repeats):
        start = clock()
        for _ in range(args.steps):
            out = reductions(grads, params, updates)
        jax.block_until_ready(out)
        alone.append((clock() - start) / args.steps)

    what = "wall time" if gpu else "process CPU time"
    device = jax.devices()[0].device_kind
    print(f"MLP 8 x 1024, batch 512, AdamW on {device} ({what} per step, median of {args.repeats} repeats of "
          f"{args.steps} steps)")
    bare = times["bare"]
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, bare, strict=True)]
        line = (f"  {name:<26} {1e3 * statistics.median(values):8.1f} ms/step   {statistics.median(ratios):.3f}x "
                f"(repeats {', '.join(f'{r:.3f}' for r in ratios)})")
        if not gpu:
            user_ratios = [v / b for v, b in zip(user[name], user["bare"], strict=True)]
            line += (f"   user time {statistics.median(user_ratios):.3f}x, "
                     f"{statistics.median(faults[name]):.0f} page faults/step")
        print(line)
    own = [v - b for v, b in zip(times["every step"], bare, strict=True)]
    print(f"  monitor's own time per logged step: {1e3 * statistics.median(own):.2f} ms "
          f"(every-step loop minus bare loop; repeats {', '.join(f'{1e3 * o:.2f}' for o in own)})")
    print(f"  its reductions alone: {1e3 * statistics.median(alone):.2f} ms "
          f"(repeats {', '.join(f'{1e3 * a:.2f}' for a in alone)})")


if __name__ == "__main__":
    main()
