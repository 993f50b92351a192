"""The episode card in a real Chromium against a real ``tensorboard``: the batches behind an explosion, and the loss
spike's step in words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tbserver import TensorBoardServer
from test_frontend_browser import Tab

from tb_gradient_plugin import GradientWriter

pytestmark = pytest.mark.slow

LAYERS = ["embed", "mlp", "head"]
PEAK = 152
LOSS_SPIKE = 151  # one step before the peak


def _write(path: Path) -> None:
    rng = np.random.default_rng(0)
    with GradientWriter(path) as writer:
        for step in range(300):
            grad = np.exp(rng.normal(0.0, 0.1, 3))
            if 150 <= step <= PEAK:
                grad[1] *= 1e4 * (step - 149)
            loss = 30.0 if step == LOSS_SPIKE or step > PEAK + 1 else 1.0
            ids = list(range(1000 + 20 * step, 1000 + 20 * step + 20))  # more ids than a card lists
            writer.write(step, LAYERS, grad_norm=grad, loss=loss, total_grad_norm=float(np.linalg.norm(grad)),
                         batch_ids=ids)


def test_episode_card_lists_the_batches_up_to_the_peak(tmp_path: Path, browser) -> None:
    _write(tmp_path / "run")
    with TensorBoardServer(tmp_path) as server:
        tab = Tab(browser, server, "light")
        card = tab.frame.locator(".episode.kind-explosion").first
        card.wait_for()
        items = card.locator(".ep-batches li")
        assert items.all_text_contents() == [
            f"step {s} ({['2 steps before the peak', '1 step before the peak', 'at the peak'][s - 150]}): "
            f"sample ids {', '.join(str(1000 + 20 * s + k) for k in range(16))}, … (+4 more)"
            for s in (150, 151, PEAK)]
        assert card.locator(".ep-batches li.peak").get_attribute("data-step") == str(PEAK)
        loss = card.locator(".ep-loss").text_content()
        assert loss == f"Loss spiked at step {LOSS_SPIKE} (1 step before the peak)"
        assert tab.errors == [] and tab.dialogs == []
        tab.close()


def test_show_earlier_pages_through_every_batch_of_a_long_episode(tmp_path: Path, browser) -> None:
    rng = np.random.default_rng(0)
    with GradientWriter(tmp_path / "run") as writer:  # one explosion from step 1000 to its peak at 1400
        for step in range(1600):
            grad = np.exp(rng.normal(0.0, 0.1, 3))
            if 1000 <= step <= 1400 and (step - 1000) % 8 == 0:
                grad[1] *= 1e3 * 2 ** ((step - 1000) / 40)
            writer.write(step, LAYERS, grad_norm=grad, loss=1.0, batch_ids=[step])
    with TensorBoardServer(tmp_path) as server:
        tab = Tab(browser, server, "light")
        card = tab.frame.locator(".episode.kind-explosion").first
        card.wait_for()
        items, more = card.locator(".ep-batches li"), card.locator(".ep-batches .batches-more")
        assert items.count() == 4 and more.text_content() == "+397 earlier batches: show 50 more"
        while more.is_visible():
            listed = items.count()
            more.click()
            tab.frame.wait_for_function(
                "([n, el]) => el.querySelectorAll('li').length > n || el.querySelector('.batches-more').hidden",
                arg=[listed, card.locator(".ep-batches").element_handle()])
        steps = [int(s) for s in card.locator(".ep-batches li").evaluate_all("els => els.map(e => e.dataset.step)")]
        assert steps == list(range(1000, 1401))
        assert tab.errors == [] and tab.dialogs == []
        tab.close()
