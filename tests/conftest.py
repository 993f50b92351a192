"""Shared fixtures: the third-party event files beside the repository, and temporary logdirs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from scripts.fetch_realruns import MANIFEST, missing

REPO = Path(__file__).resolve().parents[1]
#: set (as CI does) to make missing third-party files a failure instead of a skip
REQUIRE_REALRUNS = "TB_GRADIENT_REQUIRE_REALRUNS"

# The plugin's persistent run cache (docs/CACHE.md) of the tests, and of the TensorBoard processes they start, goes to
# a fresh directory, never the user's own cache directory.
if "TB_GRADIENT_CACHE_DIR" not in os.environ:
    os.environ["TB_GRADIENT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tb-gradient-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TB_GRADIENT_CACHE_DIR"], True)


def _realruns_dir() -> Path:
    env = os.environ.get("TB_GRADIENT_REALRUNS")
    if env:
        return Path(env)
    candidates = [REPO / "shared" / "realruns", REPO.parent / "shared" / "realruns"]  # in the checkout, or beside it
    return next((c for c in candidates if c.is_dir()), candidates[0])


@pytest.fixture(scope="session")
def realruns() -> Path:
    """Read-only directory of real event files written by other tools (Lightning, Keras, YOLOv5, HF, PPO, TF-NMT)."""
    path = _realruns_dir()
    absent = missing(str(path))
    if absent:
        message = (f"{len(absent)} of {len(MANIFEST)} third-party event files are not in {path} "
                   f"(first: {absent[0].repo}/{absent[0].path}): run `python scripts/fetch_realruns.py` to download "
                   "them, or set TB_GRADIENT_REALRUNS to their directory")
        if os.environ.get(REQUIRE_REALRUNS):
            pytest.fail(message)
        pytest.skip(message)
    return path
