"""Real ``model.fit`` runs whose recorded sample ids can be checked, shared by the TensorFlow test
(``test_keras_sample_ids.py``) and the JAX and torch cases (``keras_backend_cases.py``): this module imports Keras on
whatever backend the process runs.

* :func:`train_poisoned`: a small regression whose sample ``POISONED`` is replaced by 1e3x noise, fed in order
  (``fit(x, y, shuffle=False)``) or through a seeded :class:`IndexedBatches`; :func:`check_poisoned` then finds it in
  the batch at the peak of every explosion and in the ``--skip-list`` output.
* :func:`train_identity`: every sample's input and target are its own id and nothing trains, so each step's loss
  (mean absolute error of a zero model) is the mean of the ids it trained on: the recorded ids can be checked against
  what Keras really fed, step by step.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from tb_gradient_plugin.auditor import audit_run
from tb_gradient_plugin.cli import main
from tb_gradient_plugin.keras import GradientMonitorCallback, IndexedBatches
from tb_gradient_plugin.runs import load_run

POISONED = 37
SAMPLES, FEATURES, BATCH, EPOCHS = 512, 8, 8, 4
STEPS = SAMPLES // BATCH  # per epoch


class PoisonedBatches(IndexedBatches):
    """Sample ``POISONED``'s input replaced by ``noise`` from the dataset's second epoch on."""

    def __init__(self, x: np.ndarray, y: np.ndarray, noise: np.ndarray, **kwargs) -> None:
        super().__init__(x, y, batch_size=BATCH, **kwargs)
        self.noise = noise

    def __getitem__(self, index: int) -> tuple:
        x, y = super().__getitem__(index)
        hit = self.batch_ids(index) == POISONED
        if self.epoch >= 1 and hit.any():
            x = x.copy()
            x[hit] = self.noise
        return x, y


def _regression() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.1 * rng.normal(size=(SAMPLES, 1))).astype("float32")
    return x, y, (1e3 * rng.normal(size=FEATURES)).astype("float32")


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.02, global_clipnorm=1.0), loss="mse")
    return model


def train_poisoned(log_dir: Path, source: str) -> PoisonedBatches | None:
    """``source="arrays"``: ``fit(x, y, shuffle=False)``, the sample poisoned from the start (an array cannot change
    between epochs); ``"dataset"``: a seeded ``IndexedBatches`` that poisons it from the second epoch on (returned)."""
    x, y, noise = _regression()
    model = _model()
    callback = GradientMonitorCallback(str(log_dir))
    dataset = None
    if source == "arrays":
        x[POISONED] = noise
        model.fit(x, y, batch_size=BATCH, shuffle=False, epochs=EPOCHS, verbose=0, callbacks=[callback])
    else:
        dataset = PoisonedBatches(x, y, noise, seed=1)
        model.fit(dataset, shuffle=False, epochs=EPOCHS, verbose=0, callbacks=[callback])
    callback.close()
    return dataset


def expected_ids(step: int, dataset: IndexedBatches | None) -> list[int]:
    epoch, index = divmod(step, STEPS)
    if dataset is None:
        return list(range(index * BATCH, (index + 1) * BATCH))
    return dataset.order(epoch)[index * BATCH:(index + 1) * BATCH].tolist()


def check_poisoned(log_dir: Path, dataset: IndexedBatches | None, skip_file: Path) -> None:
    run = load_run(str(log_dir / "train"))
    assert sorted(run.batches) == list(range(EPOCHS * STEPS))  # ids at every step
    assert all(ids.tolist() == expected_ids(s, dataset) for s, ids in run.batches.items())
    with_poison = sorted(s for s, ids in run.batches.items() if POISONED in ids.tolist())
    assert len(with_poison) == EPOCHS  # once per epoch
    if dataset is not None:  # shuffled: the poisoned sample sits in a different batch each epoch
        assert len({s % STEPS for s in with_poison}) > 1

    report = audit_run("run", str(log_dir))["report"]
    explosions = [e for e in report["episodes"] if e["kind"] == "explosion"]
    # every poisoned step once the detector has a baseline (the first epoch's is too early), and nothing else
    assert set(with_poison[1:]) <= {e["peak_step"] for e in explosions} <= set(with_poison)
    for e in explosions:
        at_peak = [b for b in e["batches"] if b["step"] == e["peak_step"]]
        assert len(at_peak) == 1 and POISONED in at_peak[0]["ids"] and len(at_peak[0]["ids"]) == BATCH
        assert at_peak[0]["epoch"] == e["peak_step"] // STEPS and at_peak[0]["batch"] == e["peak_step"] % STEPS
        assert [b["step"] for b in e["batches"]] == list(range(e["start_step"], e["peak_step"] + 1))

    assert main(["audit", str(log_dir), "--fail-on", "never", "--skip-list", str(skip_file)]) == 0
    skip = json.loads(skip_file.read_text())
    assert len(skip["runs"]) == 1 and POISONED in skip["runs"][0]["ids"]
    assert {b["step"] for b in skip["runs"][0]["batches"]} == {e["peak_step"] for e in explosions}


def train_identity(log_dir: Path, source: str, steps_per_execution: int = 1) -> None:
    """45 samples in batches of 8 (the last one short), 3 epochs, each sample's input and target its id."""
    ids = np.arange(45, dtype="float32")[:, None]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mae", steps_per_execution=steps_per_execution)
    callback = GradientMonitorCallback(str(log_dir))
    data = (dict(x=ids, y=ids, shuffle=False, batch_size=8) if source == "arrays"
            else dict(x=IndexedBatches(ids, ids, batch_size=8, seed=3), shuffle=False))
    model.fit(**data, epochs=3, verbose=0, callbacks=[callback])
    callback.close()


def check_identity(log_dir: Path, shuffled: bool) -> None:
    run = load_run(str(log_dir / "train"))
    loss = dict(zip(run.series["loss"].steps.tolist(), run.series["loss"].values.tolist(), strict=True))
    assert sorted(run.batches) == sorted(loss) == list(range(18))  # 6 batches an epoch
    for step, ids in run.batches.items():
        assert len(ids) == (5 if step % 6 == 5 else 8)
        assert abs(loss[step] - ids.mean()) < 1e-4 * max(1.0, ids.mean()), (step, loss[step], ids.tolist())
    epochs = [sorted(np.concatenate([run.batches[e * 6 + b] for b in range(6)]).tolist()) for e in range(3)]
    assert epochs == [list(range(45))] * 3  # each epoch took every sample once
    orders = [tuple(np.concatenate([run.batches[e * 6 + b] for b in range(6)]).tolist()) for e in range(3)]
    assert (len(set(orders)) == 3) if shuffled else (orders == [tuple(range(45))] * 3)


def check_two_fits(log_dir: Path) -> None:
    """One callback over two fits (the second from ``initial_epoch=2``), every second step logged: the ids of each
    logged step are those it trained on, and a recorded batch's epoch is the one ``order`` takes."""
    ids = np.arange(40, dtype="float32")[:, None]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mae")
    callback = GradientMonitorCallback(str(log_dir), every=2)
    data = IndexedBatches(ids, ids, batch_size=8, seed=2)
    model.fit(data, shuffle=False, epochs=2, verbose=0, callbacks=[callback])
    model.fit(data, shuffle=False, epochs=4, initial_epoch=2, verbose=0, callbacks=[callback])
    callback.close()
    run = load_run(str(log_dir / "train"))
    loss = dict(zip(run.series["loss"].steps.tolist(), run.series["loss"].values.tolist(), strict=True))
    assert sorted(run.batches) == sorted(loss) == run.series["epoch"].steps.tolist() == list(range(0, 20, 2))
    epochs = dict(zip(run.series["epoch"].steps.tolist(), run.series["epoch"].values.tolist(), strict=True))
    for step, batch in run.batches.items():
        assert epochs[step] == step // 5 and abs(loss[step] - batch.mean()) < 1e-4 * max(1.0, batch.mean())
        assert batch.tolist() == data.batch_ids(step % 5, epoch=step // 5).tolist()
