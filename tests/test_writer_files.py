"""Our event file never shares a file with another writer, and survives threads, forked workers and a full disk."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from tb_gradient_plugin import writer as writer_mod
from tb_gradient_plugin.reader import EventFileReader
from tb_gradient_plugin.writer import GradientWriter, LogdirError

STEPS = 300


def _steps_by_tag(path: str) -> dict[str, list[int]]:
    """Every (tag, step) in one file, read with TensorBoard's own loader."""
    out: dict[str, list[int]] = defaultdict(list)
    for event in EventFileLoader(path).Load():
        for value in event.summary.value:
            out[value.tag].append(event.step)
    return out


def _our_steps(path: str) -> tuple[dict[tuple[str, ...], list[int]], list]:
    """Steps of our per-layer records in one file, by layer list, and the reader's problems."""
    reader = EventFileReader(path)
    batch = reader.read()
    by_layers: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for rec in batch.layer_records:
        if rec.metric == "grad_norm":
            by_layers[rec.layers].append(rec.step)
    return by_layers, reader.problems


@pytest.mark.slow
def test_every_writer_in_one_directory_in_one_second_keeps_every_step(tmp_path):
    """torch (twice), tensorboardX, tf.summary, Keras' callback and two of ours, opened in the same second in one
    process, writing into one directory at the same time: every step of every writer is read back."""
    from tensorboardX import SummaryWriter as XWriter
    from torch.utils.tensorboard import SummaryWriter

    from tests.keras_env import keras, tf

    run = tmp_path / "run"
    logdir = run / "train"  # where Keras' TensorBoard callback writes its training curves
    logdir.mkdir(parents=True)
    for _ in range(5):  # open them all inside one wall-clock second (the case that collided)
        second = int(time.time())
        torch_a, torch_b = SummaryWriter(str(logdir)), SummaryWriter(str(logdir))
        xw = XWriter(str(logdir))
        tfw = tf.summary.create_file_writer(str(logdir))
        ours = [GradientWriter(logdir, flush_secs=0.2), GradientWriter(logdir, flush_secs=0.2)]
        if int(time.time()) == second:
            break
        for w in (torch_a, torch_b, xw, tfw, *ours):
            w.close()
        for f in logdir.iterdir():
            f.unlink()
    else:
        pytest.fail("could not open the writers within one second")

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    model.fit(x, x[:, :1], epochs=3, batch_size=16, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(log_dir=str(run), update_freq=1)])
    for step in range(STEPS):
        torch_a.add_scalar("torch_a", step, step)
        torch_b.add_scalar("torch_b", step, step)
        xw.add_scalar("tbx", step, step)
        with tfw.as_default():
            tf.summary.scalar("tf", float(step), step=step)
        for k, w in enumerate(ours):
            w.write(step, [f"ours{k}.fc"], grad_norm=[float(step)], loss=float(step))
    for w in (torch_a, torch_b, xw, tfw, *ours):
        w.close()

    files = sorted(glob.glob(str(logdir / "events.out.tfevents.*")))
    assert len(files) == 7, files  # one file per writer, Keras' own included
    tags_of_file = {f: _steps_by_tag(f) for f in files}
    owner: dict[str, str] = {}
    for f, tags in tags_of_file.items():
        for tag, steps in tags.items():
            if tag in ("torch_a", "torch_b", "tbx", "tf"):
                assert steps == list(range(STEPS)), (tag, f)
                assert tag not in owner, f"{tag} is spread over two files"
                owner[tag] = f
    assert len(set(owner.values())) == 4, "two writers shared a file"
    assert any("epoch_loss" in tags for tags in tags_of_file.values()), "Keras' epoch losses were lost"
    for k, w in enumerate(ours):
        assert w.path in files and w.path not in owner.values()
        by_layers, problems = _our_steps(w.path)
        assert problems == []
        assert dict(by_layers) == {(f"ours{k}.fc",): list(range(STEPS))}


def test_file_name_keeps_the_prefix_and_avoids_every_counter_name(tmp_path):
    with GradientWriter(tmp_path) as w:
        name = os.path.basename(w.path)
    assert name.startswith("events.out.tfevents.")
    assert name.split(".")[-1].startswith("gradients-")  # never a plain counter (torch, TF) nor "v2" (tf.summary)


def test_an_existing_name_is_never_appended_to(tmp_path, monkeypatch):
    """Exclusive create: if our chosen name exists (another process chose it), a new one is taken."""
    taken, free = "events.out.tfevents.1.host.1.gradients-1-aaaaaa", "events.out.tfevents.1.host.1.gradients-1-bbbbbb"
    names = iter([taken, taken, free])
    monkeypatch.setattr(writer_mod, "_event_file_name", lambda serial, suffix: next(names))
    first = GradientWriter(tmp_path)
    first.write(0, ["fc"], grad_norm=[1.0])
    second = GradientWriter(tmp_path)
    second.write(0, ["head"], grad_norm=[2.0])
    first.close()
    second.close()
    assert first.path != second.path and second.path.endswith("-bbbbbb")
    assert dict(_our_steps(first.path)[0]) == {("fc",): [0]}
    assert dict(_our_steps(second.path)[0]) == {("head",): [0]}


def test_two_threads_writing_to_one_writer_give_consistent_records(tmp_path):
    """Two threads, each with its own layer list, interleave steps on one writer: every value stays attributed to its
    own layers (the layer-list definitions are per file and shared by both)."""
    n = 2000
    errors: list[BaseException] = []

    def work(w: GradientWriter, parity: int, layers: list[str]) -> None:
        try:
            for step in range(parity, n, 2):
                w.write(step, layers, grad_norm=np.full(len(layers), step + parity / 10, dtype=np.float32),
                        loss=float(step))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    with GradientWriter(tmp_path, flush_secs=0.01) as w:
        threads = [threading.Thread(target=work, args=(w, 0, ["even.a", "even.b"])),
                   threading.Thread(target=work, args=(w, 1, ["odd.a", "odd.b", "odd.c"]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    reader = EventFileReader(w.path)
    batch = reader.read()
    assert reader.problems == []
    seen = {}
    for rec in batch.layer_records:
        parity = rec.step % 2
        assert rec.layers == (("even.a", "even.b") if parity == 0 else ("odd.a", "odd.b", "odd.c"))
        np.testing.assert_allclose(rec.values, rec.step + parity / 10)
        seen[rec.step] = True
    assert sorted(seen) == list(range(n))


#: The fork tests run in a fresh interpreter: forking a test process in which other tests started threads (JAX,
#: TensorFlow, torch's pools) could copy a held lock into the child and hang it.
REPO = Path(__file__).resolve().parents[1]

FORKED_DATALOADER = """
import sys
import torch
from tb_gradient_plugin.writer import GradientWriter

w = GradientWriter(sys.argv[1], flush_secs=3600)  # nothing is flushed before the fork: the buffer is inherited


class Logging(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        w.write(10_000 + i, ["worker"], grad_norm=[float(i)])
        w.flush()
        return torch.tensor(float(i))


for step in range(10):
    w.write(step, ["fc"], grad_norm=[float(step)])
loader = torch.utils.data.DataLoader(Logging(), batch_size=4, num_workers=2, multiprocessing_context="fork")
got = sorted(float(v) for batch in loader for v in batch)
assert got == [float(i) for i in range(16)], got
for step in range(10, 20):
    w.write(step, ["fc"], grad_norm=[float(step)])
w.close()
print(w.path)
"""

FORKED_CHILD = """
import os
import sys
import warnings
from tb_gradient_plugin.writer import GradientWriter

w = GradientWriter(sys.argv[1], flush_secs=3600)
w.write(0, ["fc"], grad_norm=[1.0])
pid = os.fork()
if pid == 0:  # the child: any exception or a second warning is its exit status
    code = 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 5):
                w.write(step, ["fc"], grad_norm=[2.0])
            w.close()
        code = 0 if len(caught) == 1 and "forked" in str(caught[0].message) else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
w.write(1, ["fc"], grad_norm=[3.0])
w.close()
print(w.path)
"""


def _run_fresh(code: str, logdir: Path) -> str:
    """Run ``code`` in a new interpreter with ``logdir`` as its argument; the event file path it prints."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, str(logdir)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_forked_dataloader_workers_never_touch_the_parents_file(tmp_path):
    """A writer used inside forked DataLoader workers: the children write nothing (one warning each), and the
    parent's buffered, not yet flushed records are written once, by the parent."""
    path = _run_fresh(FORKED_DATALOADER, tmp_path)
    by_layers, problems = _our_steps(path)
    assert problems == []
    assert dict(by_layers) == {("fc",): list(range(20))}


def test_a_forked_child_is_warned_once_and_writes_nothing(tmp_path):
    path = _run_fresh(FORKED_CHILD, tmp_path)
    assert dict(_our_steps(path)[0]) == {("fc",): [0, 1]}


@contextlib.contextmanager
def _small_filesystem(size_kb: int):
    """A real tmpfs of ``size_kb``: writes past it fail with ENOSPC, as on a full disk."""
    mnt = tempfile.mkdtemp(prefix="tbgrad-full-")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mnt],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip()}")
    try:
        yield Path(mnt)
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)


def test_a_full_disk_warns_once_training_goes_on_and_the_file_stays_readable():
    layers = [f"layer{i}" for i in range(200)]
    with _small_filesystem(256) as mnt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w = GradientWriter(mnt / "run", flush_secs=0.05)
            for step in range(400):  # ~2 kB a step: the disk fills a bit past step 100
                w.write(step, layers, grad_norm=np.full(200, step, dtype=np.float32), loss=1.0)
                if step % 10 == 0:
                    w.flush()
            w.close()
        full = [c for c in caught if "No space left on device" in str(c.message)]
        assert len(full) == 1, [str(c.message) for c in caught]
        by_layers, problems = _our_steps(w.path)
    assert problems == []
    steps = by_layers[tuple(layers)]
    assert 50 < len(steps) < 400 and steps == list(range(len(steps)))


def test_a_logdir_that_is_a_file_gets_one_clear_error(tmp_path):
    target = tmp_path / "runs"
    target.write_text("not a directory")
    with pytest.raises(LogdirError, match="is a file, not a directory"):
        GradientWriter(target)


def test_a_directory_without_write_permission_gets_one_clear_error(tmp_path):
    """Run without the capability that lets root write anywhere, so the permission bits apply as for a user."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    setpriv = shutil.which("setpriv")
    cmd = [sys.executable, "-c", "import sys\nfrom tb_gradient_plugin.writer import GradientWriter, LogdirError\n"
           "try:\n    GradientWriter(sys.argv[1])\nexcept LogdirError as e:\n    print(e)\n", str(locked)]
    if os.geteuid() == 0:
        if setpriv is None:
            pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
        cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
               "-dac_override,-dac_read_search", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cannot write an event file in {str(locked)!r}: Permission denied"
    assert list(locked.iterdir()) == []
