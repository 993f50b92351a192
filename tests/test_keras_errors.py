"""GradientMonitorCallback's boundaries: backends, bad use, and what importing the package pulls in."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from keras_env import keras, tf

from tb_gradient_plugin.keras import GradientMonitorCallback


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})


def test_importing_the_package_imports_no_framework():
    code = ("import sys, tb_gradient_plugin, tb_gradient_plugin.writer, tb_gradient_plugin.reader, "
            "tb_gradient_plugin.format\n"
            "print(sorted(m for m in ('keras', 'tensorflow', 'torch') if m in sys.modules))")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_unsupported_backend_fails_clearly_at_construction(tmp_path):
    """Keras really runs on its numpy backend (inference only, no ``fit``) in a fresh process; the constructor names
    it and the supported ones, and writes nothing. JAX and torch are covered in ``test_keras_backends.py``."""
    backend = "numpy"
    code = ("import keras\n"
            f"assert keras.backend.backend() == {backend!r}, keras.backend.backend()\n"
            "from tb_gradient_plugin.keras import GradientMonitorCallback\n"
            "try:\n"
            f"    GradientMonitorCallback({str(tmp_path)!r})\n"
            "except RuntimeError as exc:\n"
            "    print('ERROR', exc)\n")
    result = _python(code, KERAS_BACKEND=backend)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ERROR")
    assert f"'{backend}' backend" in result.stdout and "tensorflow, jax, torch" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "10"])
def test_bad_every_is_rejected(tmp_path, every):
    with pytest.raises(ValueError, match="every must be a positive integer"):
        GradientMonitorCallback(tmp_path, every=every)


def _model() -> keras.Model:
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


def test_non_keras_model_is_rejected(tmp_path):
    monitor = GradientMonitorCallback(tmp_path)
    with pytest.raises(TypeError, match="needs a Keras 3 model"):
        monitor.set_model(tf.Module())
    with pytest.raises(TypeError, match="needs a Keras 3 model"):
        keras.callbacks.CallbackList([monitor], model=object())


def test_uncompiled_model_is_rejected_in_a_custom_loop(tmp_path):
    """Custom training loops drive callbacks through CallbackList: the monitor refuses before anything is hooked."""
    model = _model()
    callbacks = keras.callbacks.CallbackList([GradientMonitorCallback(tmp_path)], model=model)
    with pytest.raises(RuntimeError, match="not compiled"):
        callbacks.on_train_begin()
    assert not (tmp_path / "train").exists()


def test_model_without_optimizer_is_rejected_by_fit(tmp_path):
    model = _model()
    model.compile(optimizer=None, loss="mse")
    with pytest.raises(RuntimeError, match="without an optimizer"):
        model.fit(np.zeros((4, 3), "float32"), np.zeros((4, 1), "float32"), verbose=0,
                  callbacks=[GradientMonitorCallback(tmp_path)])
    assert not (tmp_path / "train").exists()
