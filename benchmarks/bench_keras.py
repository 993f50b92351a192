"""Overhead of GradientMonitorCallback on ``model.fit`` (Keras 3 on its TensorFlow, JAX or torch backend, CPU).

Two models: a small conv net on 32x32x3 inputs and a 10-layer dense model, batch 128. For each, copies with the same
weights are fitted: plain, with the callback logging every step, every 10 steps, and every 10 steps with the explosion
guard (``on_explosion="skip"``: every step judged); the dense model also with a histogram on every step
(``every=1, histograms_every=1``). Fits are interleaved (the order rotates each repeat) after a warm-up fit that
traces and compiles; each timed fit runs ``--steps`` steps. Prints the median milliseconds per step of each variant
and its ratio to plain fit, both as a ratio of medians and as the median (and range) of the per-repeat (paired)
ratios, on two clocks: wall time, and the process's CPU time (with the backend on one thread, the CPU clock is what to
compare on a machine shared with other work, where wall time is mostly noise). For the dense model it also prints a
histogram step against a norms-only logged step (``hist 1`` / ``every 1``), and for both models the guard against the
same logging without it (``guard 10`` / ``every 10``).

Goals (conv net, every backend): every 10 steps <= 1.03x, every step <= 1.10x. Dense model: a histogram step < 2x a
norms-only logged step. The dense model's other ratios are reported as measured.

    python benchmarks/bench_keras.py [--backend tensorflow|jax|torch] [--repeats 7] [--threads 1] [--no-jit]

``--backend`` sets ``KERAS_BACKEND`` before Keras is imported (the backend is fixed per process). ``jit_compile``
means XLA on TensorFlow, ``jax.jit`` on JAX; on torch the step runs eagerly (``torch.compile`` is not measured).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

BACKENDS = ("tensorflow", "jax", "torch")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--conv-steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="backend threads (0: the backend's default)")
    parser.add_argument("--no-jit", action="store_true", help="compile with jit_compile=False (default: XLA / jax.jit)")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["KERAS_BACKEND"] = ARGS.backend
    if ARGS.backend == "jax" and ARGS.threads == 1:  # one XLA CPU thread, as TensorFlow's intra-op setting below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tb_gradient_plugin.keras import GradientMonitorCallback  # noqa: E402

BATCH = 128


def conv_net() -> keras.Model:
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])


def dense_net() -> keras.Model:
    return keras.Sequential([keras.Input((256,))]
                            + [keras.layers.Dense(256, activation="relu") for _ in range(9)]
                            + [keras.layers.Dense(10)])


#: Variant name -> callback arguments (None: plain fit).
VARIANTS: dict[str, dict | None] = {"plain": None, "every 1": {"every": 1}, "every 10": {"every": 10},
                                     "guard 10": {"every": 10, "on_explosion": "skip"}}
HIST_VARIANT = {"hist 1": {"every": 1, "histograms_every": 1}}
MODELS = {
    "conv net 32x32": (conv_net, (32, 32, 3), VARIANTS),
    "dense x10": (dense_net, (256,), VARIANTS | HIST_VARIANT),
}


def bench(name: str, build, shape: tuple[int, ...], variant_args: dict[str, dict | None], steps: int, repeats: int,
          jit: bool, logdir: str) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * BATCH, *shape)).astype("float32")
    y = rng.integers(0, 10, size=(steps * BATCH,))
    keras.utils.set_random_seed(0)
    weights = build().get_weights()
    variants = {}
    for variant, kwargs in variant_args.items():
        model = build()
        model.set_weights(weights)
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
        callbacks = [] if kwargs is None else [GradientMonitorCallback(os.path.join(logdir, name, variant), **kwargs)]
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)  # warm-up
        variants[variant] = (model, callbacks)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(repeats):
        for variant in order[r % len(order):] + order[:r % len(order)]:
            model, callbacks = variants[variant]
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
            wall[variant].append((time.perf_counter() - start) / steps)
            cpu[variant].append((time.process_time() - start_cpu) / steps)
    for _, callbacks in variants.values():
        for cb in callbacks:
            cb.close()
    return {"wall": wall, "cpu": cpu}


def report(times: dict[str, list[float]], clock: str) -> None:
    plain = statistics.median(times["plain"])
    for variant, ts in times.items():
        med = statistics.median(ts)
        ratios = [t / p for t, p in zip(ts, times["plain"], strict=True)]
        paired = statistics.median(ratios)
        print(f"  {clock:4s} {variant:9s} {med * 1e3:8.2f} ms/step   ratio {med / plain:5.3f}x   paired {paired:5.3f}x"
              f"   (paired range {min(ratios):5.3f}-{max(ratios):5.3f})")
    if "hist 1" in times:
        hist, norms = times["hist 1"], times["every 1"]
        paired = statistics.median(h / n for h, n in zip(hist, norms, strict=True))
        print(f"  {clock:4s} histogram step / norms-only logged step: ratio "
              f"{statistics.median(hist) / statistics.median(norms):5.3f}x   paired {paired:5.3f}x")
    guard, unguarded = times["guard 10"], times["every 10"]
    paired = statistics.median(g / u for g, u in zip(guard, unguarded, strict=True))
    print(f"  {clock:4s} explosion guard / same logging without it: ratio "
          f"{statistics.median(guard) / statistics.median(unguarded):5.3f}x   paired {paired:5.3f}x")


def _set_threads(backend: str, threads: int) -> str:
    """One thread each way (``threads=1``) so the CPU clock measures the work, not the waiting; returns a version."""
    if backend == "tensorflow":
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        return f"TensorFlow {tf.__version__}"
    if backend == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        return f"torch {torch.__version__}"
    import jax

    return f"JAX {jax.__version__}"


def main() -> None:
    args = ARGS
    version = _set_threads(args.backend, args.threads)
    jit = not args.no_jit and args.backend != "torch"
    threads = args.threads or "default"
    print(f"{version}, Keras {keras.__version__} ({keras.backend.backend()} backend), jit_compile={jit}, "
          f"threads={threads}, batch {BATCH}, {args.repeats} interleaved repeats")
    with tempfile.TemporaryDirectory() as logdir:
        for name, (build, shape, variant_args) in MODELS.items():
            steps = args.conv_steps if name.startswith("conv") else args.dense_steps
            clocks = bench(name, build, shape, variant_args, steps, args.repeats, jit, logdir)
            print(f"\n{name}: {steps} steps per fit")
            for clock, times in clocks.items():
                report(times, clock)


if __name__ == "__main__":
    main()
