"""Shared fixtures: the third-party event files beside the repository, temporary logdirs, and headless Chromium."""

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
#: The distribution's Chromium (Playwright cannot download browsers offline), started without network chatter.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

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


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Playwright, for the tab's browser tests."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM} (install the Debian package 'chromium')")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
