"""A logdir of many small runs, as a hyper-parameter sweep leaves it: the input of the run overview's tests, its
screenshot and ``bench_runs.py``.

Every run is written by ``GradientWriter`` (a few layers, loss and total gradient norm) with fixed wall times, so
runs differ in start, last write and length in a known way. Some runs carry a planted explosion (one layer's gradient
jumps by a known factor for a few steps, then the loss spikes), one turns NaN, and ``plain`` runs hold only a loss
scalar as a plain script writes it (another ``source``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.writer import EventFile, GradientWriter

LAYERS = ["embed", "block.0", "block.1", "head"]
#: Wall time of the first run's first step; run ``i`` starts an hour after run ``i - 1``, one second per step.
T0 = 1_790_000_000.0
RUN_SPACING_S = 3600.0


@dataclass(frozen=True)
class Planted:
    """A planted finding: the gradient of ``LAYERS[layer]`` is multiplied by ``factor`` from ``step`` for ``length``
    steps (``factor`` NaN: the gradient turns NaN there)."""

    step: int
    factor: float
    length: int = 3
    layer: int = 2


def run_name(i: int) -> str:
    return f"sweep_{i:03d}"


def default_plants(n: int) -> dict[str, Planted]:
    """One explosion in every 50 runs (at growing steps and factors), and one NaN run, for ``n`` runs."""
    plants = {run_name(i): Planted(step=60 + (i % 7) * 5, factor=100.0 * (1 + i // 50)) for i in range(7, n, 50)}
    if n > 3:
        plants[run_name(3)] = Planted(step=70, factor=float("nan"))
    return plants


def write_many_runs(root: str | Path, n: int, *, steps: int = 120, plants: dict[str, Planted] | None = None,
                    plain: int = 0, seed: int = 0) -> dict[str, Planted]:
    """Write runs ``sweep_000`` .. into ``root`` (run ``i`` logs ``steps + i % 5 * 10`` steps) and ``plain`` runs
    ``plain_000`` ..; returns the planted findings by run name."""
    root = Path(root)
    plants = default_plants(n) if plants is None else plants
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = run_name(i)
        write_run(root / name, steps + i % 5 * 10, T0 + i * RUN_SPACING_S, plants.get(name), rng)
    for i in range(plain):
        _write_plain(root / f"plain_{i:03d}", steps, T0 + (n + i) * RUN_SPACING_S)
    return plants


def write_run(path: Path, steps: int, start: float, plant: Planted | None, rng: np.random.Generator) -> None:
    """One run of ``steps`` steps starting at wall time ``start``, with ``plant`` planted in it."""
    scale = np.linspace(0.5, 2.0, len(LAYERS))
    with GradientWriter(str(path)) as writer:
        for step in range(steps):
            grad = scale * np.exp(rng.normal(0.0, 0.05, len(LAYERS)))
            loss = 2.0 * np.exp(-step / 100) + 0.3 + rng.normal(0.0, 0.005)
            if plant is not None and plant.step <= step < plant.step + plant.length:
                grad[plant.layer] *= plant.factor
            if plant is not None and step == plant.step + plant.length + 2:
                loss *= 10.0
            finite = grad[np.isfinite(grad)]
            writer.write(step, LAYERS, grad_norm=grad, param_norm=np.full(len(LAYERS), 10.0), update_norm=grad * 1e-3,
                         loss=float(loss), total_grad_norm=float(np.sqrt((finite**2).sum())), wall_time=start + step)


def _write_plain(path: Path, steps: int, start: float) -> None:
    """Only a ``train/loss`` scalar, as a plain training script writes it."""
    from tensorboard.compat.proto import summary_pb2

    path.mkdir(parents=True, exist_ok=True)
    events = EventFile(str(path))
    try:
        for step in range(steps):
            value = summary_pb2.Summary.Value(tag="train/loss", simple_value=1.0 / (step + 1))
            events.add_event(fmt.make_event(step, start + step, [value]))
    finally:
        events.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--plain", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()
    found = write_many_runs(args.logdir, args.runs, plain=args.plain)
    print(f"wrote {args.runs + args.plain} runs ({len(found)} with planted findings) in "
          f"{time.perf_counter() - began:.1f} s")
