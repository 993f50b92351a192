"""Shared fixtures: the third-party event files beside the repository, and temporary logdirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _realruns_dir() -> Path:
    env = os.environ.get("TB_GRADIENT_REALRUNS")
    if env:
        return Path(env)
    for base in (REPO, REPO.parent):  # shared/ inside the checkout, or beside it
        if (base / "shared" / "realruns" / "README.md").is_file():
            return base / "shared" / "realruns"
    return REPO.parent / "shared" / "realruns"


@pytest.fixture(scope="session")
def realruns() -> Path:
    """Read-only directory of real event files written by other tools (Lightning, Keras, YOLOv5, HF, PPO)."""
    path = _realruns_dir()
    if not (path / "README.md").is_file():
        pytest.fail(f"third-party event files not found at {path}; set TB_GRADIENT_REALRUNS to their directory")
    return path
