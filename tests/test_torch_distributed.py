"""GradientMonitor in real multi-process training (gloo backend, 2 CPU processes).

DDP: only rank 0 writes, and what it writes are the norms of the averaged gradients. FSDP2: parameters are sharded
DTensors; the recorded norms equal those of the full, unsharded tensors.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_torch_monitor import Net, batch, close, grad_stats, read_run, weights
from torch import nn

from tb_gradient_plugin.torch import GradientMonitor

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, mode: str, logdir: str, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Net()
        if mode == "fsdp":  # FSDP2 shards along dim 0: no scalar parameters
            model.temperature = nn.Parameter(torch.full((1,), 1.5))
        reference = copy.deepcopy(model)  # unsharded, undistributed twin: gradients averaged by hand
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model.block)
            wrapped = fully_shard(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
        records = []
        with GradientMonitor(wrapped, opt, logdir) as monitor:
            for step in range(STEPS):
                x, y = batch(100 * step + rank)
                opt.zero_grad()
                nn.functional.cross_entropy(wrapped(x), y).backward()
                opt.step()
                # the same step on the twin with the gradient averaged over ranks by hand
                ref_opt.zero_grad()
                nn.functional.cross_entropy(reference(x), y).backward()
                local = grad_stats(reference)
                for p in reference.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
                avg = grad_stats(reference)
                before = weights(reference)
                ref_opt.step()
                after = weights(reference)
                upd = {n: float((after[n] - before[n]).norm()) for n in before}
                records.append({"avg": avg, "local": local, "update": upd})
            layers = monitor.layers
        if rank == 0:
            torch.save({"records": records, "layers": layers}, os.path.join(outdir, "ref.pt"))
        dist.barrier()  # both ranks are done with every collective and every file
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without running the C++ teardown of gloo and FSDP2's threads: under load it sometimes ends in
    # std::terminate (SIGABRT) after all the work is done and checked, which says nothing about the monitor.
    os._exit(0)


def _run(tmp_path, mode: str):
    logdir, outdir = str(tmp_path / "logs"), str(tmp_path / "out")
    os.makedirs(logdir)
    os.makedirs(outdir)
    mp.spawn(_worker, args=(2, _free_port(), mode, logdir, outdir), nprocs=2, join=True)
    return read_run(logdir), torch.load(os.path.join(outdir, "ref.pt"))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_two_processes_rank0_writes_averaged_norms(tmp_path):
    run, ref = _run(tmp_path, "ddp")
    assert len(run.files) == 1  # rank 1 wrote nothing
    assert ref["layers"] == ("(root)", "embed", "block.0", "block.2", "head")  # no "module." prefix
    assert sorted(run.layouts) == list(range(STEPS))
    for step, rec in enumerate(ref["records"]):
        for layer, stats in rec["avg"].items():
            got = run.layers["grad_norm"][step][layer]
            assert close(got, stats["grad_norm"], rel=1e-4), (step, layer, got, stats)
            assert close(run.layers["update_norm"][step][layer], rec["update"][layer], rel=1e-3)
        # the averaged gradient is not rank 0's own: the test can tell them apart
        assert not close(run.layers["grad_norm"][step]["head"], rec["local"]["head"]["grad_norm"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fsdp2_sharded_parameters_report_unsharded_norms(tmp_path):
    run, ref = _run(tmp_path, "fsdp")
    assert len(run.files) == 1
    assert sorted(run.layouts) == list(range(STEPS))
    for step, rec in enumerate(ref["records"]):
        for layer, stats in rec["avg"].items():
            for metric in ("grad_norm", "grad_max_abs", "param_norm"):
                got = run.layers[metric][step][layer]
                assert close(got, stats[metric], rel=1e-4), (metric, step, layer, got, stats)
            assert close(run.layers["update_norm"][step][layer], rec["update"][layer], rel=1e-3)
