"""GradientMonitorCallback on Keras' JAX and torch backends: ``keras_backend_cases.py`` in a fresh process per backend.

Keras fixes its backend when it is first imported, and this test session runs on TensorFlow (``keras_env``), so each
backend's cases run in their own pytest process with ``KERAS_BACKEND`` set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_backend_cases(backend):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         "-rs", str(HERE / "keras_backend_cases.py")],
        capture_output=True, text=True, timeout=900, env=env, cwd=HERE.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # every case ran on the requested backend (none skipped itself)
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]
