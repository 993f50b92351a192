"""The run overview of the Gradients tab in a real Chromium against a real ``tensorboard`` process.

The logdir is a sweep of small runs written by ``GradientWriter`` (``benchmarks/many_runs.py``): 30 runs, four of
them with a planted finding (three explosions of known size at known steps, one NaN), two runs of plain loss scalars
and one run whose name is an HTML injection attempt. With that many runs the tab opens on the overview.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tbserver import TensorBoardServer

from benchmarks.many_runs import RUN_SPACING_S, T0, Planted, write_many_runs, write_run

pytestmark = pytest.mark.slow

SWEEP = 30
PLANTS = {
    "sweep_004": Planted(step=60, factor=50.0),
    "sweep_011": Planted(step=80, factor=1000.0),
    "sweep_017": Planted(step=70, factor=300.0),
    "sweep_023": Planted(step=90, factor=float("nan")),
}
#: Worst first: the NaN run, then the explosions by size.
BY_SEVERITY = ["sweep_023", "sweep_011", "sweep_017", "sweep_004"]
HOSTILE = "<img src=x onerror=alert(1)>"
TOTAL = SWEEP + 2 + 1


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("overview_logs")
    write_many_runs(root, SWEEP, plants=PLANTS, plain=2)
    # The newest run of all, written last.
    write_run(root / HOSTILE, 100, T0 + 100 * RUN_SPACING_S, None, np.random.default_rng(9))
    return root


@pytest.fixture(scope="module")
def server(logdir: Path):
    with TensorBoardServer(logdir) as tb:
        yield tb



class OverviewTab:
    """One page on the Gradients tab, waiting for the overview's rows; records console errors and dialogs."""

    def __init__(self, browser, server: TensorBoardServer, color_scheme: str) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000}, color_scheme=color_scheme)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(server.url + "#gradients")
        self.page.wait_for_selector("iframe", timeout=60_000)
        self.frame = self._plugin_frame()
        self.frame.wait_for_selector(".overview:not([hidden]) .ov-row", timeout=60_000)

    def _plugin_frame(self):
        for _ in range(600):
            for frame in self.page.frames:
                if "plugin_entry.html" in frame.url and "gradients" in frame.url:
                    return frame
            self.page.wait_for_timeout(100)
        raise AssertionError(f"no Gradients iframe among {[f.url for f in self.page.frames]}")

    def order(self) -> list[str]:
        """Run names of the table's rows, top to bottom."""
        return self.frame.locator(".ov-row").evaluate_all("rows => rows.map(r => r.dataset.run)")

    def sort_by(self, key: str) -> None:
        self.frame.locator(f'.ov-table th[data-key="{key}"] button').click()

    def cell(self, run: str, key: str) -> str:
        return self.row(run).locator(f'td[data-key="{key}"]').inner_text()

    def row(self, run: str):
        return self.frame.locator(".ov-row").filter(has=self.frame.locator(f'.ov-name[title="{run}"]'))


@pytest.fixture()
def tab_factory(browser, server):
    tabs: list[OverviewTab] = []

    def make(color_scheme: str = "light") -> OverviewTab:
        tab = OverviewTab(browser, server, color_scheme)
        tabs.append(tab)
        return tab

    yield make
    for tab in tabs:
        errors, dialogs = tab.errors, tab.dialogs
        tab.context.close()
        assert not dialogs, f"the page opened dialogs: {dialogs}"
        assert not errors, f"console errors: {errors}"


def _sweep(indices) -> list[str]:
    return [f"sweep_{i:03d}" for i in indices]


def test_many_runs_open_on_the_overview_worst_first(tab_factory, server) -> None:
    listed = server.get_json("data/plugin/gradients/runs")["runs"]
    assert {r["run"] for r in listed if r["episodes"]} == set(PLANTS)  # the planted findings, and only those
    tab = tab_factory("light")
    frame = tab.frame
    assert frame.locator(".run-panel").count() == 0 and frame.locator(".panels").is_hidden()
    assert frame.locator("#overview-toggle").get_attribute("aria-pressed") == "true"
    assert frame.locator("#overview-toggle").inner_text() == f"All runs ({TOTAL})"
    assert frame.locator(".ov-count").inner_text() == f"{TOTAL} runs · {len(PLANTS)} with findings"
    # Runs with findings first, the worst severity first (non-finite above any ratio); the rest by name.
    healthy = sorted(set(_sweep(range(SWEEP))) - set(PLANTS)) + ["plain_000", "plain_001"]
    assert tab.order() == BY_SEVERITY + sorted([*healthy, HOSTILE])
    assert frame.locator('th[aria-sort="descending"]').get_attribute("data-key") == "worst_severity"

    assert tab.cell("sweep_011", "episodes") == "1 explosion"
    assert tab.cell("sweep_011", "first_episode_step") == "step 80"
    assert tab.cell("sweep_011", "worst_severity").endswith("× baseline")
    assert tab.cell("sweep_023", "episodes") == "1 non-finite"
    assert tab.cell("sweep_023", "worst_severity") == "∞ non-finite"
    assert tab.cell("sweep_000", "episodes") == "none" and tab.cell("sweep_000", "worst_severity") == "—"
    assert tab.cell("sweep_014", "steps") == "160"  # 120 + 4 * 10 steps
    assert tab.cell("sweep_014", "source") == "tb_gradient_plugin" and tab.cell("plain_000", "source") == "plain"
    # The hostile name is shown as text, never as markup.
    assert tab.cell(HOSTILE, "run") == HOSTILE
    assert frame.locator(".ov-table img").count() == 0


def test_sorting_by_each_column_and_the_findings_first_switch(tab_factory) -> None:
    tab = tab_factory("light")
    frame = tab.frame
    tab.sort_by("run")
    assert tab.order()[:4] == sorted(PLANTS)  # findings still first, now by name
    frame.locator("#overview-findings-first").uncheck()
    assert tab.order() == sorted(tab.order()) and tab.order()[0] == HOSTILE  # "<" sorts before letters
    tab.sort_by("run")  # a second click reverses
    assert tab.order()[:3] == ["sweep_029", "sweep_028", "sweep_027"]
    assert frame.locator('th[data-key="run"]').get_attribute("aria-sort") == "descending"

    tab.sort_by("last_wall_time")  # the latest first: the runs were written one after another
    assert tab.order()[:4] == [HOSTILE, "plain_001", "plain_000", "sweep_029"]

    tab.sort_by("first_episode_step")  # the earliest first; runs without an episode last, by name
    order = tab.order()
    assert order[:4] == ["sweep_004", "sweep_017", "sweep_011", "sweep_023"]
    assert order[4:] == sorted(order[4:])

    tab.sort_by("steps")  # the longest first (120 + i % 5 * 10 steps), ties by name
    assert tab.order()[:6] == _sweep(range(4, SWEEP, 5))

    tab.sort_by("episodes")
    assert set(tab.order()[:4]) == set(PLANTS)
    tab.sort_by("worst_severity")
    assert tab.order()[:4] == BY_SEVERITY
    frame.locator("#overview-findings-first").check()
    tab.sort_by("worst_severity")  # ascending: the mildest finding first, findings still above the rest
    assert tab.order()[:4] == BY_SEVERITY[::-1]


def test_the_name_filter(tab_factory) -> None:
    tab = tab_factory("dark")
    frame = tab.frame
    search = frame.locator("#overview-filter")
    search.fill("SWEEP_01")
    assert tab.order() == ["sweep_011", "sweep_017"] + [n for n in _sweep(range(10, 20)) if n not in PLANTS]
    assert frame.locator(".ov-count").inner_text() == f"10 of {TOTAL} runs · {len(PLANTS)} with findings"
    search.fill("plain 1")  # every word must be in the name
    assert tab.order() == ["plain_001"]
    search.fill("no such run")
    assert tab.order() == [] and frame.locator(".ov-empty").inner_text() == "No run name matches the filter."
    search.fill("")
    assert len(tab.order()) == TOTAL
    # The table follows the dark theme.
    colors = frame.evaluate("""() => [getComputedStyle(document.body).backgroundColor,
        getComputedStyle(document.querySelector('.ov-table th')).backgroundColor]""")
    assert colors[0] == colors[1] == "rgb(32, 33, 36)"


def test_picking_a_row_opens_the_run_and_the_overview_comes_back(tab_factory) -> None:
    tab = tab_factory("light")
    frame = tab.frame
    tab.row("sweep_017").click()
    panel = frame.locator('.run-panel[data-run="sweep_017"]')
    panel.locator(".heatmap[data-drawn-cells]").wait_for(timeout=60_000)
    assert frame.locator(".overview").is_hidden() and frame.locator("#run-a").input_value() == "sweep_017"
    assert frame.locator("#overview-toggle").get_attribute("aria-pressed") == "false"
    assert panel.locator(".episode").first.get_attribute("data-start") == "70"

    frame.locator("#overview-toggle").click()
    assert frame.locator(".overview").is_visible() and frame.locator(".panels").is_hidden()
    assert "current" in tab.row("sweep_017").get_attribute("class")
    tab.row("sweep_011").focus()
    tab.page.keyboard.press("Enter")
    frame.locator('.run-panel[data-run="sweep_011"] .heatmap[data-drawn-cells]').wait_for(timeout=60_000)
    assert frame.locator('.run-panel[data-run="sweep_017"]').count() == 0

    # Back to the overview and out again without picking a row: the open run stays.
    frame.locator("#overview-toggle").click()
    frame.locator("#overview-toggle").click()
    assert frame.locator(".panels").is_visible() and frame.locator("#run-a").input_value() == "sweep_011"
    # Picking a run in the toolbar's picker leaves the overview too.
    frame.locator("#overview-toggle").click()
    frame.locator("#run-a").select_option("sweep_004")
    frame.locator('.run-panel[data-run="sweep_004"] .heatmap[data-drawn-cells]').wait_for(timeout=60_000)
    assert frame.locator(".overview").is_hidden()
