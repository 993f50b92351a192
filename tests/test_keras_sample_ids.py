"""Sample ids from a real ``model.fit`` on the TensorFlow backend (``keras_sample_ids.py`` holds the runs; the JAX
and torch backends run the same checks in ``keras_backend_cases.py``), and ``IndexedBatches`` itself."""

from __future__ import annotations

import numpy as np
import pytest
from keras_env import keras
from keras_sample_ids import check_identity, check_poisoned, check_two_fits, train_identity, train_poisoned

from tb_gradient_plugin.keras import GradientMonitorCallback, IndexedBatches
from tb_gradient_plugin.runs import load_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("source", ["arrays", "dataset"])
def test_poisoned_sample_named_at_the_peak_and_skip_listed(tmp_path, source) -> None:
    dataset = train_poisoned(tmp_path / "run", source)
    check_poisoned(tmp_path / "run", dataset, tmp_path / "skip.json")


@pytest.mark.parametrize("source, steps_per_execution", [("arrays", 1), ("dataset", 1), ("dataset", 4)])
def test_recorded_ids_are_the_samples_each_step_trained_on(tmp_path, source, steps_per_execution) -> None:
    train_identity(tmp_path, source, steps_per_execution)
    check_identity(tmp_path, shuffled=source == "dataset")


def test_one_callback_over_two_fits_from_initial_epoch(tmp_path) -> None:
    check_two_fits(tmp_path)


@pytest.mark.parametrize("fit_kwargs", [dict(shuffle=True), dict(shuffle="batch"),
                                        dict(shuffle=False, steps_per_epoch=2)])
def test_no_ids_where_the_batch_index_does_not_name_the_samples(tmp_path, fit_kwargs) -> None:
    ids = np.arange(40, dtype="float32")[:, None]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    callback = GradientMonitorCallback(str(tmp_path))
    model.fit(ids, ids, batch_size=8, epochs=2, verbose=0, callbacks=[callback], **fit_kwargs)
    callback.close()
    run = load_run(str(tmp_path / "train"))
    assert run.batches == {} and len(run.series["batch_index"].steps) == len(run.steps) > 0


def test_an_indexed_batches_fit_shuffles_is_warned_and_records_no_ids(tmp_path) -> None:
    ids = np.arange(24, dtype="float32")[:, None]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    callback = GradientMonitorCallback(str(tmp_path))
    with pytest.warns(UserWarning, match="shuffle=False"):
        model.fit(IndexedBatches(ids, ids, batch_size=8), epochs=2, verbose=0, callbacks=[callback])
    callback.close()
    run = load_run(str(tmp_path / "train"))
    assert run.batches == {} and run.series["batch_index"].values.tolist() == [0, 1, 2] * 2


def test_indexed_batches_order_is_a_function_of_seed_and_epoch() -> None:
    x, y = np.arange(10)[:, None], np.arange(10)
    a, b = IndexedBatches(x, y, batch_size=4, seed=5), IndexedBatches(x, y, batch_size=4, seed=5)
    assert len(a) == 3 and a.batch_ids(2).tolist() == a.order(0)[8:].tolist()
    first = [a[i][1].tolist() for i in range(3)]
    assert sum(first, []) == a.order(0).tolist() and sorted(sum(first, [])) == list(range(10))
    a.on_epoch_end()
    assert a.epoch == 1 and a.order(1).tolist() != a.order(0).tolist()
    assert a.batch_ids(0).tolist() == b.batch_ids(0, epoch=1).tolist()  # any run with the seed replays it
    assert IndexedBatches(x, batch_size=3, shuffle=False).order(7).tolist() == list(range(10))
    assert IndexedBatches({"a": x, "b": x}, y, batch_size=4, seed=0)[0][0]["a"].shape == (4, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=np.zeros((3, 1)), y=np.zeros(4)), "same number of samples"),
    (dict(x=np.zeros((3, 1)), batch_size=0), "batch_size"),
    (dict(x=np.zeros((3, 1)), seed=-1), "seed"),
    (dict(x=np.float32(1.0)), "sample axis"),
])
def test_indexed_batches_refuses_bad_input_clearly(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        IndexedBatches(**kwargs)
    with pytest.raises(IndexError, match="out of range"):
        IndexedBatches(np.zeros((3, 1)), batch_size=2).batch_ids(2)
