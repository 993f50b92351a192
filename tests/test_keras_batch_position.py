"""What the Keras callback records about a step's batch: its epoch and its index in the epoch, in a real
``model.fit``, and how an episode's ``batches`` show them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from keras_env import keras

from tb_gradient_plugin import GradientWriter
from tb_gradient_plugin.auditor import audit_run
from tb_gradient_plugin.keras import GradientMonitorCallback
from tb_gradient_plugin.runs import load_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("every, steps_per_execution", [(1, 1), (2, 3)])
def test_fit_records_epoch_and_batch_index_of_every_logged_step(tmp_path, every, steps_per_execution) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.normal(size=(40, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=steps_per_execution)
    callback = GradientMonitorCallback(str(tmp_path), every=every)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[callback])  # 5 batches an epoch
    callback.close()
    run = load_run(os.path.join(str(tmp_path), "train"))
    logged = list(range(0, 15, every))
    assert run.series["epoch"].steps.tolist() == logged == run.series["batch_index"].steps.tolist()
    assert run.series["epoch"].values.tolist() == [s // 5 for s in logged]
    assert run.series["batch_index"].values.tolist() == [s % 5 for s in logged]
    assert run.batches == {}  # Keras knows no sample ids


def test_episode_batches_name_epoch_and_batch_where_no_ids_were_logged(tmp_path) -> None:
    rng = np.random.default_rng(0)
    with GradientWriter(tmp_path) as w:
        for s in range(200):
            g = np.exp(rng.normal(0, 0.1, 2))
            if 150 <= s < 153:
                g[1] *= 1e4 * (s - 149)
            w.write(s, ["a", "b"], grad_norm=g, loss=50.0 if s >= 154 else 1.0, epoch=s // 40, batch_index=s % 40)
    ep = next(e for e in audit_run("run", str(tmp_path))["report"]["episodes"] if e["kind"] == "explosion")
    assert ep["batches"] == [{"step": s, "ids": [], "epoch": 3, "batch": s - 120} for s in (150, 151, 152)]
