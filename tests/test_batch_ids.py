"""The batch behind an episode: ``GradientMonitor.log_batch``, the ``batches`` of the audit JSON and the
``--skip-list`` of the auditor, on real PyTorch training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler
from torch.utils.tensorboard import SummaryWriter

from tb_gradient_plugin import GradientWriter
from tb_gradient_plugin.auditor import audit_run
from tb_gradient_plugin.cli import main
from tb_gradient_plugin.reader import EventFileReader
from tb_gradient_plugin.runs import load_run
from tb_gradient_plugin.torch import GradientMonitor

POISONED = 37


class Regression(Dataset):
    """A small linear regression whose sample ``POISONED`` is replaced by 1e3x noise from the second epoch on."""

    def __init__(self, n: int = 512, d: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
        self.noise = 1e3 * torch.randn(d, generator=g)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.noise if i == POISONED and self.epoch >= 1 else self.x[i]
        return x, self.y[i], i


def train(logdir: Path, skip: set[int] = frozenset(), epochs: int = 4) -> None:
    torch.manual_seed(0)
    data = Regression()
    keep = [i for i in range(len(data)) if i not in skip]
    sampler = SubsetRandomSampler(keep, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    with GradientMonitor(model, opt, logdir) as monitor:
        for epoch in range(epochs):
            data.epoch = epoch
            for x, y, idx in loader:
                monitor.log_batch(idx)
                loss = nn.functional.mse_loss(model(x), y)
                monitor.log_loss(loss)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("poisoned")
    train(logdir / "run")
    return logdir


def test_poisoned_sample_named_on_the_peak_step_and_skip_listed(poisoned: Path, tmp_path: Path, capsys) -> None:
    run = load_run(str(poisoned / "run"))
    assert len(run.batches) == len(run.steps) == 4 * 64  # every step's ids came back
    with_poison = sorted(s for s, ids in run.batches.items() if POISONED in ids.tolist())
    assert len(with_poison) == 4  # once per epoch

    skip_file, html_file = tmp_path / "skip.json", tmp_path / "report.html"
    code = main(["audit", str(poisoned), "--json", "--fail-on", "never", "--skip-list", str(skip_file),
                 "--html", str(html_file)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)["runs"][0]
    explosions = [e for e in report["episodes"] if e["kind"] == "explosion"]
    assert explosions
    # every epoch after the first: its poisoned step is an explosion whose peak batch holds the sample
    assert sorted(e["peak_step"] for e in explosions) == with_poison[1:]
    for e in explosions:
        at_peak = [b for b in e["batches"] if b["step"] == e["peak_step"]]
        assert len(at_peak) == 1 and POISONED in at_peak[0]["ids"] and len(at_peak[0]["ids"]) == 8
        assert all(e["start_step"] <= b["step"] <= e["peak_step"] for b in e["batches"])

    skip = json.loads(skip_file.read_text())
    assert skip["version"] == 1 and [r["run"] for r in skip["runs"]] == ["run"]
    entry = skip["runs"][0]
    assert POISONED in entry["ids"] and entry["ids"] == sorted(set(entry["ids"]))
    assert sorted(b["step"] for b in entry["batches"]) == with_poison[1:]

    # the table and the HTML report name the batch at each peak
    first = min(explosions, key=lambda e: e["peak_step"])
    at_peak = next(b for b in first["batches"] if b["step"] == first["peak_step"])
    line = f"Batch at the peak (step {first['peak_step']}): sample ids {', '.join(map(str, at_peak['ids']))}."
    assert main(["audit", str(poisoned), "--fail-on", "never"]) == 0
    assert line in " ".join(capsys.readouterr().out.split())
    assert line in html_file.read_text(encoding="utf-8")

    # the documented use: a next run that leaves those samples out trains without an explosion (and skips nothing)
    train(tmp_path / "next" / "run", skip=set(entry["ids"]))
    again = audit_run("next", str(tmp_path / "next" / "run"))["report"]
    assert not [e for e in again["episodes"] if e["kind"] in ("explosion", "nonfinite")]
    assert main(["audit", str(tmp_path / "next"), "--json", "--skip-list", str(skip_file)]) == 0
    assert json.loads(skip_file.read_text()) == {"version": 1, "runs": []}


def test_batches_field_from_start_to_peak_and_empty_without_ids(tmp_path: Path) -> None:
    layers = ["a", "b"]
    for name, with_ids in (("ids", True), ("no_ids", False)):
        rng = np.random.default_rng(0)
        with GradientWriter(tmp_path / name) as w:
            for s in range(200):
                g = np.exp(rng.normal(0, 0.1, 2))
                loss = 1.0
                if 150 <= s < 153:
                    g[1] *= 1e4 * (s - 149)  # peak at 152
                if s >= 154:
                    loss = 50.0
                ids = [10 * s, 10 * s + 1] if with_ids and s % 2 == 0 else None
                w.write(s, layers, grad_norm=g, loss=loss, total_grad_norm=float(np.linalg.norm(g)), batch_ids=ids)
    ep = next(e for e in audit_run("ids", str(tmp_path / "ids"))["report"]["episodes"] if e["kind"] == "explosion")
    assert (ep["start_step"], ep["peak_step"]) == (150, 152)
    assert ep["batches"] == [{"step": 150, "ids": [1500, 1501]}, {"step": 152, "ids": [1520, 1521]}]
    bare = audit_run("no_ids", str(tmp_path / "no_ids"))["report"]["episodes"]
    assert [e["batches"] for e in bare if e["kind"] == "explosion"] == [[]]


def test_other_writers_files_have_no_batches(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path)) as w:
        for s in range(5):
            w.add_scalar("loss", 1.0 / (s + 1), s)
    run = load_run(str(tmp_path))
    assert run.batches == {} and len(run.series["loss"].steps) == 5


def test_log_batch_accumulates_micro_batches_and_checks_types(tmp_path: Path) -> None:
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, opt, tmp_path, every=2) as monitor:
        for s in range(4):
            for micro in range(2):
                monitor.log_batch(torch.tensor([s * 10 + micro]) if micro else [s * 10 + 5, s * 10 + 6])
                model(torch.randn(2, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
        with pytest.raises(TypeError, match="integer"):
            monitor.log_batch(torch.tensor([0.5]))
        with pytest.raises(TypeError, match="integers"):
            monitor.log_batch([1.5])
    batches = load_run(str(tmp_path)).batches
    # only logged steps (every=2) carry ids; every micro-batch of a step is recorded
    assert {s: v.tolist() for s, v in batches.items()} == {0: [5, 6, 1], 2: [25, 26, 21]}


def test_ids_are_bulk_decoded_as_protobuf_decodes_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with GradientWriter(tmp_path) as w:
        for s in range(60):
            ids = rng.integers(-2**62, 2**62, size=3 if s == 30 else 4)  # a short batch breaks the block
            w.write(s, ["a", "b"], grad_norm=np.ones(2), loss=1.0, batch_ids=ids)
        w.write(10, ["a", "b"], grad_norm=np.ones(2), batch_ids=[7, 8, 9, 10])  # a step written again: later wins
    (path,) = tmp_path.iterdir()
    decoded = {}
    for bulk in (True, False):
        reader = EventFileReader(str(path), bulk=bulk)
        batch = reader.read()
        assert reader.problems == [] and (reader.bulk_records > 50) == bulk
        decoded[bulk] = [(s, ids.tolist()) for s, ids in batch.batch_ids]
    assert decoded[True] == decoded[False] and len(decoded[True]) == 61
    assert load_run(str(tmp_path)).batches[10].tolist() == [7, 8, 9, 10]


def test_ids_are_held_packed_as_they_are_read_and_snapshots_never_change() -> None:
    """The run store's ids: a dict-like mapping of three arrays, appended in place while steps increase, rebuilt where
    a step comes again (the later record wins); a snapshot handed out before is never changed by what is read after."""
    import pickle

    from tb_gradient_plugin.run_arrays import IdTable
    from tb_gradient_plugin.types import BatchIds

    rng = np.random.default_rng(1)
    table, expected = IdTable(), {}
    snapshots = []
    for chunk in range(40):
        records = [(s, rng.integers(0, 10**6, size=int(rng.integers(0, 9))))
                   for s in range(chunk * 25, chunk * 25 + 25)]
        if chunk % 10 == 9:  # a resumed run writes earlier steps again, out of order
            records += [(chunk * 25 - 30, np.array([1, 2, 3])), (5, np.array([], dtype=np.int64))]
        table.add(records)
        expected.update(records)
        snapshots.append((table.snapshot(), {s: ids.tolist() for s, ids in expected.items()}))
    for snapshot, then in snapshots:
        assert {s: ids.tolist() for s, ids in snapshot.items()} == then
    final = table.snapshot()
    assert list(final) == sorted(expected) and len(final) == 1000 and 5 in final and 1000 not in final
    assert final[5].tolist() == [] and final[195].tolist() == [1, 2, 3]
    with pytest.raises(KeyError):
        final[-1]
    assert final.get(10**9) is None and BatchIds() == {}
    again = pickle.loads(pickle.dumps(table))
    assert {s: v.tolist() for s, v in again.snapshot().items()} == {s: v.tolist() for s, v in final.items()}
    # memory: 1M steps of 8 ids held packed, against a dict of arrays
    steps = np.arange(1_000_000)
    packed = BatchIds(steps, np.arange(0, 8_000_001, 8), np.arange(8_000_000))
    nbytes = packed.steps.nbytes + packed.offsets.nbytes + packed.ids.nbytes
    assert nbytes / len(packed) < 81 and packed[999_999].tolist() == list(range(7_999_992, 8_000_000))
