"""Regenerate the README's screenshots of the Gradients tab from ``demo_logs/`` (a real TensorBoard, headless Chromium).

    python scripts/make_screenshots.py [--logdir demo_logs] [--out docs/screenshots] [--chromium /usr/bin/chromium]

Writes, into ``--out``:
  gradients_light.png  mlp_lr_raised: its episode, the layer x step heatmap with the offending layers, the loss spike,
                       and the drill-down of the top layer down to its gradient histograms over time
  gradients_dark.png   rnn_no_clip beside rnn_clipped in dark mode (the before/after pair), drill-down on ``rnn``
                       with both runs' gradient histograms
  overview.png         the run overview ("All runs"): every run in one table, runs with findings first, the worst first
  report.png           ``tb-gradient audit --html`` of keras_high_lr: the episode table, the loss chart with its axes
                       and legend, the layer x step heatmap

Needs playwright (Python) and a Chromium binary; nothing is downloaded. Each shot waits for the drawn state the tab
marks in its DOM (``data-drawn-cells``, ``data-drawn-columns``), so it never captures a half-drawn chart.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tbserver import TensorBoardServer  # noqa: E402 - the test helper that starts a real tensorboard on a free port

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WIDTH = 1400
TIMEOUT_MS = 60_000


class Tab:
    """One page on the Gradients tab of ``url``; raises if the page logs an error (a screenshot of a broken tab is
    worse than none)."""

    def __init__(self, browser, url: str, color_scheme: str) -> None:
        self.context = browser.new_context(viewport={"width": WIDTH, "height": 1400}, color_scheme=color_scheme)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url + "#gradients")
        self.page.wait_for_selector("iframe", timeout=TIMEOUT_MS)
        self.frame = self._plugin_frame()
        self.frame.wait_for_selector(".run-panel .heatmap[data-drawn-cells]", timeout=TIMEOUT_MS)

    def _plugin_frame(self):
        for _ in range(TIMEOUT_MS // 100):
            for frame in self.page.frames:
                if "plugin_entry.html" in frame.url and "gradients" in frame.url:
                    return frame
            self.page.wait_for_timeout(100)
        raise RuntimeError("the Gradients tab did not load its frame")

    def panel(self, run: str):
        return self.frame.locator(f'.run-panel[data-run="{run}"]')

    def open_run(self, select: str, run: str) -> None:
        self.frame.locator(select).select_option(run)
        self.panel(run).locator(".heatmap[data-drawn-cells]").wait_for(timeout=TIMEOUT_MS)

    def drill_top_layer(self, run: str) -> str:
        """Open the drill-down of the run's top offending layer and wait for its histograms to be drawn."""
        label = self.panel(run).locator(".row-label[data-rank='1']")
        layer = label.get_attribute("data-layer")
        label.click()
        self.wait_drill(run)
        return layer

    def wait_drill(self, run: str) -> None:
        drill = self.panel(run).locator(".drill")
        drill.locator(".layer-chart canvas").first.wait_for(timeout=TIMEOUT_MS)
        drill.locator(".hist-view[data-drawn-columns]").wait_for(timeout=TIMEOUT_MS)

    def shot(self, path: Path) -> None:
        """Grow the viewport to the tab's content (the iframe scrolls inside the page), then capture the page."""
        content = self.frame.evaluate("document.documentElement.scrollHeight")
        top = self.page.locator("iframe").bounding_box()["y"]
        self.page.set_viewport_size({"width": WIDTH, "height": int(top + content + 8)})
        self.page.mouse.move(0, 0)
        self.page.wait_for_timeout(500)  # let the resize, hover states and chart animations settle
        if self.errors:
            raise RuntimeError(f"the page logged errors: {self.errors}")
        self.page.screenshot(path=str(path))
        print(f"wrote {path}")

    def close(self) -> None:
        self.context.close()


def make_screenshots(logdir: Path, out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with TensorBoardServer(logdir) as tb, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            light = Tab(browser, tb.url, "light")
            light.open_run("#run-a", "mlp_lr_raised")
            light.drill_top_layer("mlp_lr_raised")
            light.shot(out / "gradients_light.png")
            light.close()

            dark = Tab(browser, tb.url, "dark")
            dark.open_run("#run-a", "rnn_no_clip")
            dark.open_run("#run-b", "rnn_clipped")
            dark.drill_top_layer("rnn_no_clip")  # the comparison opens the same layer in the other run
            dark.wait_drill("rnn_clipped")
            dark.shot(out / "gradients_dark.png")
            dark.close()

            overview = Tab(browser, tb.url, "light")
            overview.page.set_viewport_size({"width": WIDTH, "height": 640})  # room for the table, no blank page below
            overview.frame.locator("#overview-toggle").click()
            overview.frame.locator(".overview .ov-row").first.wait_for(timeout=TIMEOUT_MS)
            overview.shot(out / "overview.png")
            overview.close()

            report = out / "report.html"
            subprocess.run([sys.executable, "-m", "tb_gradient_plugin", "audit", str(logdir), "--run",
                            "keras_high_lr", "--html", str(report), "--fail-on", "never"], check=True,
                           capture_output=True)
            page = browser.new_page(viewport={"width": 1250, "height": 1000})
            page.goto(report.as_uri())
            page.screenshot(path=str(out / "report.png"), full_page=True)
            page.close()
            report.unlink()
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=REPO / "demo_logs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary playwright drives")
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        parser.error(f"no such logdir: {args.logdir}")
    if not Path(args.chromium).exists():
        parser.error(f"Chromium not found at {args.chromium} (install the Debian package 'chromium')")
    make_screenshots(args.logdir, args.out, args.chromium)


if __name__ == "__main__":
    main()
