"""The tab shows slow growth and a saturated clip as warning cards (real TensorBoard, real Chromium)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tbserver import TensorBoardServer
from test_frontend_browser import Tab

from tb_gradient_plugin import GradientWriter

pytestmark = pytest.mark.slow

LAYERS = ["embed", "mlp", "head"]


def _write_growing(path: Path) -> None:
    """600 steps whose gradient norms rise 70x, clipped at 0.3 all along, with a flat loss."""
    rng = np.random.default_rng(3)
    with GradientWriter(path) as writer:
        for step in range(600):
            g = np.exp(rng.normal(0, 0.3, 3)) * np.array([1.0, 0.5, 0.2]) * 70.0 ** (step / 599)
            writer.write(step, LAYERS, grad_norm=g, total_grad_norm=float(np.sqrt((g ** 2).sum())),
                         loss=2.0 + float(rng.normal(0, 0.02)), clip_threshold=0.3)


@pytest.fixture(scope="module")
def growth_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("growth_logs")
    _write_growing(root / "growing")
    with TensorBoardServer(root) as tb:
        yield tb


def test_slow_growth_and_a_saturated_clip_are_warning_cards(browser, growth_server) -> None:
    tab = Tab(browser, growth_server, "light")
    try:
        panel = tab.panel("growing")
        cards = panel.locator(".episode.kind-growth")
        cards.first.wait_for()
        assert cards.count() == 2
        growth = panel.locator(".growth-summary[data-signal='slow_growth']")
        assert growth.inner_text().startswith("The total gradient norm grew ")
        assert "while the loss did not improve" in growth.inner_text()
        assert "A warning: nothing broke yet." in growth.inner_text()
        clip = panel.locator(".growth-summary[data-signal='saturated_clip']")
        assert clip.inner_text().startswith("The clip binds on 100 % of steps: the learning rate is effectively set "
                                            "by the clip")
        texts = [cards.nth(i).inner_text() for i in range(2)]
        assert any("Slow growth" in t and "Grown series:" in t for t in texts)
        assert any("Saturated clip" in t and "clip binds on 100 % of steps" in t for t in texts)
        assert not tab.errors and not tab.dialogs
    finally:
        tab.close()
