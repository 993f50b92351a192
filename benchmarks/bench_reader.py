"""Reader throughput (MB/s, CRC32C verified) against TensorBoard's own loaders, and bytes per value on disk.

Our reader is timed twice: as it runs (bulk decoding of equal records, see ``bulk_decode.py``) and with every record
decoded by protobuf (``bulk=False``), which is what files of other writers get.

    python benchmarks/bench_reader.py [--layers 500] [--steps 10000]

Each reader runs in a fresh subprocess on the same file (so imports and caches do not leak between them); the file
is read once to warm the OS page cache first, so the numbers compare decoding, not disk.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.writer import GradientWriter

OURS = """
import json, sys, time
from tb_gradient_plugin.reader import EventFileReader
t = time.perf_counter()
batch = EventFileReader(sys.argv[1], bulk=sys.argv[2] == "bulk").read()
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "events": batch.events,
                  "values": sum(p.values.size for b in batch.layer_blocks for p in b.pieces)}))
"""

TENSORBOARD = """
import json, sys, time, types
if sys.argv[2] == "notf":
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util
loader = EventFileLoader(sys.argv[1])
t = time.perf_counter()
events = values = 0
for event in loader.Load():
    events += 1
    for v in event.summary.value:
        values += tensor_util.make_ndarray(v.tensor).size
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "events": events, "values": values}))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--notf-steps", type=int, default=1_000, help="smaller file for the slow TF-free loader")
    args = parser.parse_args()

    names = [f"model.blocks.{i // 6}.sub{i % 6}.weight_owner" for i in range(args.layers)]
    rng = np.random.default_rng(0)
    block = rng.lognormal(size=(64, len(fmt.LAYER_METRICS), args.layers)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for label, steps in (("big", args.steps), ("small", args.notf_steps)):
            d = os.path.join(tmp, label)
            t = time.perf_counter()
            with GradientWriter(d) as w:
                for s in range(steps):
                    vals = block[s % 64]
                    w.write(s, names, **{m: vals[k] for k, m in enumerate(fmt.LAYER_METRICS)},
                            loss=1.0, total_grad_norm=1.0)
            write_s = time.perf_counter() - t
            (paths[label],) = glob.glob(os.path.join(d, "events.out.tfevents.*"))
            size = os.path.getsize(paths[label])
            n_values = steps * args.layers * len(fmt.LAYER_METRICS)
            print(f"{label}: {steps} steps x {args.layers} layers x {len(fmt.LAYER_METRICS)} metrics: "
                  f"{size / 1e6:.1f} MB, {size / n_values:.3f} bytes/value, written at {size / write_s / 1e6:.0f} MB/s")
            with open(paths[label], "rb") as f:
                while f.read(1 << 24):
                    pass

        rows = []
        for label, code, path, extra in (
            ("tb_gradient_plugin reader", OURS, paths["big"], ("bulk",)),
            ("tb_gradient_plugin reader, general path only (bulk=False)", OURS, paths["big"], ("general",)),
            ("TensorBoard EventFileLoader (TensorFlow record reader)", TENSORBOARD, paths["big"], ("tf",)),
            ("tb_gradient_plugin reader (small file)", OURS, paths["small"], ("bulk",)),
            ("TensorBoard EventFileLoader, TF-free (pure-Python CRC)", TENSORBOARD, paths["small"], ("notf",)),
        ):
            res = _run(code, path, *extra)
            mb = os.path.getsize(path) / 1e6
            rows.append((label, mb, res["seconds"], mb / res["seconds"], res["values"]))
        print(f"\n{'reader':58s} {'MB':>8s} {'s':>8s} {'MB/s':>8s} {'values':>12s}")
        for label, mb, sec, rate, vals in rows:
            print(f"{label:58s} {mb:8.1f} {sec:8.2f} {rate:8.1f} {vals:12d}")


if __name__ == "__main__":
    main()
