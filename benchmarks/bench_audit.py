"""Benchmark: ``tb-gradient audit`` end to end against tbparse and TensorBoard's EventAccumulator, per logged value.

Our run holds ``--layers`` x ``--steps`` per-layer gradient norms written with :class:`GradientWriter` (one packed
tensor per step). The baselines read the same kind of values logged the way most users log them today: one scalar
tag per layer (``grad_norm/<layer>``), one event per value, as ``SummaryWriter.add_scalar`` writes them. Every time is
the wall time of a whole process (start-up, imports, reading; for the auditor also detection and output), divided by
the number of values it read. The baselines are linear in the values they read, so they may run at a smaller size
(``--baseline-steps``) and still give their time per value; the ratio compares times per value.

Full size (the goal: >= 50x faster per value than both)::

    python benchmarks/bench_audit.py --layers 500 --steps 100000 --baseline-steps 2000

A quick run (a few minutes on a small machine)::

    python benchmarks/bench_audit.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2

from tb_gradient_plugin import GradientWriter
from tb_gradient_plugin.writer import EventFile

TBPARSE = """
import sys
from tbparse import SummaryReader
df = SummaryReader(sys.argv[1]).scalars
print(len(df))
"""

ACCUMULATOR = """
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
print(sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"]))
"""


def write_ours(path: Path, layers: int, steps: int) -> float:
    names = [f"model.layers.{i}.mlp" for i in range(layers)]
    rng = np.random.default_rng(0)
    block = np.exp(rng.normal(0, 0.2, (1000, layers))).astype(np.float32)
    t = time.perf_counter()
    with GradientWriter(path) as w:
        for s in range(steps):
            w.write(s, names, grad_norm=block[s % 1000], loss=1.0 + 1e-3 * (s % 7))
    return time.perf_counter() - t


def write_per_layer_scalars(path: Path, layers: int, steps: int) -> float:
    """One event per value, as ``SummaryWriter.add_scalar`` writes them (without torch's per-call overhead)."""
    path.mkdir(parents=True, exist_ok=True)
    tags = [f"grad_norm/model.layers.{i}.mlp" for i in range(layers)]
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    out = EventFile(str(path))
    try:
        for s in range(steps):
            values = np.exp(rng.normal(0, 0.2, layers)).tolist()
            for tag, v in zip(tags, values, strict=True):
                out.add_event(event_pb2.Event(step=s, wall_time=time.time(), summary=summary_pb2.Summary(
                    value=[summary_pb2.Summary.Value(tag=tag, simple_value=v)])))
    finally:
        out.close()
    return time.perf_counter() - t


def timed(cmd: list[str]) -> tuple[float, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20000, help="steps of our run (full size: 100000)")
    parser.add_argument("--baseline-steps", type=int, default=2000, help="steps of the per-layer-scalar run")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many timings each")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temp dir)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_audit_"))
    ours, theirs = work / "ours", work / "per_layer_scalars"
    try:
        for p in (ours, theirs):
            shutil.rmtree(p, ignore_errors=True)
        t_write = write_ours(ours / "run", args.layers, args.steps)
        t_write_b = write_per_layer_scalars(theirs / "run", args.layers, args.baseline_steps)
        n_ours = args.layers * args.steps
        n_base = args.layers * args.baseline_steps
        size_ours, size_base = dir_bytes(ours), dir_bytes(theirs)
        exe = Path(sys.executable).with_name("tb-gradient")
        audit_cmd = [str(exe), "audit", str(ours), "--json", "--fail-on", "never"]
        t_audit = min(timed(audit_cmd)[0] for _ in range(args.repeat))
        t_tbparse, out_tbparse = min((timed([sys.executable, "-c", TBPARSE, str(theirs)]) for _ in range(args.repeat)),
                                     key=lambda r: r[0])
        acc_cmd = [sys.executable, "-c", ACCUMULATOR, str(theirs / "run")]
        t_acc, out_acc = min((timed(acc_cmd) for _ in range(args.repeat)),
                             key=lambda r: r[0])
        if int(out_acc) != n_base or int(out_tbparse) != n_base:
            raise RuntimeError(f"baselines read {out_acc.strip()} / {out_tbparse.strip()} values, expected {n_base}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    per_ours = t_audit / n_ours
    rows = [
        ("tb-gradient audit (ours)", n_ours, size_ours, t_audit),
        ("tbparse (per-layer scalars)", n_base, size_base, t_tbparse),
        ("EventAccumulator (per-layer scalars)", n_base, size_base, t_acc),
    ]
    print(f"layers={args.layers} steps={args.steps} (ours), baseline steps={args.baseline_steps}; "
          f"writing took {t_write:.1f} s (ours) / {t_write_b:.1f} s (scalars)")
    print(f"{'reader':40s} {'values':>12s} {'MB':>9s} {'B/value':>8s} {'wall s':>8s} {'us/value':>9s} "
          f"{'MB/s':>8s} {'ours faster':>11s}")
    for name, n, size, t in rows:
        print(f"{name:40s} {n:12,d} {size / 1e6:9.1f} {size / n:8.1f} {t:8.2f} {t / n * 1e6:9.3f} "
              f"{size / 1e6 / t:8.1f} {t / n / per_ours:10.1f}x")


if __name__ == "__main__":
    main()
