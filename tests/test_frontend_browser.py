"""The Gradients tab in a real Chromium against a real ``tensorboard`` process.

The logdir is written by ``GradientWriter``: one run with a gradient explosion in one layer followed by a loss spike
(and a layer whose name is an HTML injection attempt), one healthy run for the side-by-side comparison, and one run
that overfits: its validation loss and accuracy (written by ``torch.utils.tensorboard.SummaryWriter`` next to the
``GradientWriter`` files) turn after step 200 while the training loss keeps falling, and its last evaluation is NaN.
The demo test opens the committed ``demo_logs/`` and saves the screenshots the README shows.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from tbserver import TensorBoardServer

from tb_gradient_plugin import GradientWriter
from tb_gradient_plugin import format as fmt

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: Screenshots land beside the test results (not in docs/, which holds the curated ones the README shows).
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
HOSTILE = "<img src=x onerror=alert(1)>"
LAYERS = ["embed", "encoder.0.attn", "encoder.0.mlp", HOSTILE, "encoder.1.attn", "encoder.1.mlp", "head"]
CULPRIT = "encoder.1.mlp"
STEPS = 400
EXPLOSION = range(250, 256)
LOSS_SPIKE = 259
#: The overfitting run: an evaluation every EVAL_EVERY steps, best at VAL_BEST, NaN at the last one.
EVAL_EVERY = 20
VAL_BEST = 200
VAL_NAN = STEPS - 1
DEMO_LOGS = REPO / "demo_logs"


def _write_run(path: Path, *, explode: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scale = np.array([0.5, 1.0, 2.0, 0.8, 1.2, 3.0, 0.3])
    param = np.array([20.0, 30.0, 40.0, 25.0, 35.0, 45.0, 10.0])
    with GradientWriter(path) as writer:
        for step in range(STEPS):
            grad = scale * np.exp(rng.normal(0.0, 0.1, len(LAYERS)))
            loss = 2.0 * np.exp(-step / 200) + 0.3 + rng.normal(0.0, 0.01)
            if explode and step in EXPLOSION:
                grad[LAYERS.index(CULPRIT)] *= 2000.0
                grad[LAYERS.index("encoder.1.attn")] *= 20.0
            if explode and step == LOSS_SPIKE:
                loss *= 12.0
            update = 1e-3 * grad
            writer.write(step, LAYERS, grad_norm=grad, param_norm=param, update_norm=update,
                         grad_max_abs=grad / 4, nonfinite_count=np.zeros(len(LAYERS)),
                         total_grad_norm=float(np.sqrt((grad**2).sum())), loss=loss, lr=1e-3)
            if step % 50 == 0:
                counts = np.zeros((len(LAYERS), fmt.HIST_BINS), dtype=np.int64)
                counts[:, 20:30] = rng.integers(1, 100, size=(len(LAYERS), 10))
                writer.write_histograms(step, LAYERS, counts)


def _write_live(path: Path, steps: range) -> None:
    rng = np.random.default_rng(steps.start)
    with GradientWriter(path) as writer:
        for step in steps:
            writer.write(step, LAYERS[:3], grad_norm=np.exp(rng.normal(0.0, 0.1, 3)), loss=1.0)


#: The loss-only run's total gradient norm jumps 40x here while its loss stays normal: a transient spike.
TRANSIENT = 150


def _write_loss_only(path: Path) -> None:
    """What a run of another tool often holds: loss and total gradient norm, no per-layer statistics."""
    with GradientWriter(path) as writer:
        for step in range(200):
            writer.write(step, [], loss=1.0 / (1 + step), total_grad_norm=80.0 if step == TRANSIENT else 2.0)


def _write_validation(path: Path) -> None:
    """Validation series as PyTorch users write them: ``val_loss`` / ``val_accuracy`` scalars of a SummaryWriter."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(3)
    writer = SummaryWriter(str(path))
    try:
        for step in range(0, STEPS, EVAL_EVERY):
            turn = ((step - VAL_BEST) / VAL_BEST) ** 2
            writer.add_scalar("val_loss", 0.6 + 0.5 * turn + rng.normal(0.0, 0.003), step)
            writer.add_scalar("val_accuracy", 0.9 - 0.2 * turn + rng.normal(0.0, 0.002), step)
        writer.add_scalar("val_loss", float("nan"), VAL_NAN)
    finally:
        writer.close()


def _write_total_only(path: Path) -> None:
    """A run whose only gradient series is the total norm (HF Trainer-like), with an extreme jump at step 120."""
    rng = np.random.default_rng(7)
    with GradientWriter(path) as writer:
        for step in range(200):
            total = float(np.exp(rng.normal(0.0, 0.05))) * (5000.0 if step == 120 else 1.0)
            writer.write(step, [], loss=1.0, total_grad_norm=total)


def write_logdir(root: str | Path) -> Path:
    """The test logdir: runs ``total_only`` (no layers, one explosion of the total norm), ``early_stop`` (overfits),
    ``exploding``, ``healthy``, ``live`` (grown by a test) and ``loss_only``. ``total_only`` and ``early_stop`` are
    written first: they tie with ``exploding`` on alarming episodes (one explosion; one non-finite evaluation), so the
    tab must open on ``exploding``, the most recent of them, though ``early_stop`` has more episodes in all."""
    root = Path(root)
    _write_total_only(root / "total_only")  # the oldest: its one explosion ties, and the most recent tie opens
    _write_run(root / "early_stop", explode=False, seed=4)
    _write_validation(root / "early_stop")
    _write_run(root / "exploding", explode=True, seed=1)
    _write_run(root / "healthy", explode=False, seed=2)
    _write_live(root / "live", range(100))
    _write_loss_only(root / "loss_only")
    return root


#: The NaN runs: an evaluation every NAN_EVAL_EVERY steps. ``val_nan`` turns NaN for NAN_RUN (consecutive
#: evaluations; its accuracy too), recovers, and is NaN once more, isolated, at NAN_ALONE. ``nan_every_other``
#: alternates NaN and finite evaluations: NAN_MANY isolated NaN evaluations.
NAN_EVAL_EVERY = 10
NAN_RUN = range(100, 200, NAN_EVAL_EVERY)
NAN_ALONE = 300
NAN_MANY = 20
MANY_LAYERS = 120


def _write_val_nan(path: Path, nan_steps: set[int], accuracy_nan_steps: set[int]) -> None:
    """A healthy training run whose validation loss (and accuracy) is NaN at ``nan_steps`` (``accuracy_nan_steps``):
    an evaluation that overflowed, logged by ``torch.utils.tensorboard`` as PyTorch users do."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(5)
    with GradientWriter(path) as gradients:
        for step in range(STEPS):
            grad = np.exp(rng.normal(0.0, 0.1, 3))
            gradients.write(step, LAYERS[:3], grad_norm=grad, total_grad_norm=float(np.sqrt((grad**2).sum())),
                            loss=2.0 * np.exp(-step / 200) + 0.3 + rng.normal(0.0, 0.01))
    writer = SummaryWriter(str(path))
    try:
        for step in range(0, STEPS, NAN_EVAL_EVERY):
            loss = 1.5 * np.exp(-step / 200) + 0.4 + rng.normal(0.0, 0.003)
            writer.add_scalar("val_loss", float("nan") if step in nan_steps else loss, step)
            writer.add_scalar("val_accuracy", float("nan") if step in accuracy_nan_steps else 0.9 - 0.3 * loss, step)
    finally:
        writer.close()


def _write_many_layers(path: Path) -> None:
    """A deep model whose gradients grow layer by layer, then turn NaN everywhere: more offending layers than the
    heatmap has room to name."""
    rng = np.random.default_rng(6)
    names = [f"blocks.{i // 4}.{('attn', 'mlp', 'norm1', 'norm2')[i % 4]}" for i in range(MANY_LAYERS)]
    with GradientWriter(path) as writer:
        for step in range(200):
            grad = np.exp(rng.normal(0.0, 0.1, MANY_LAYERS))
            bad = np.zeros(MANY_LAYERS)
            if step >= 150:
                grad[:], bad[:] = np.nan, 10
            elif step >= 140:
                grad *= np.linspace(1.0, 1e4, MANY_LAYERS)
            writer.write(step, names, grad_norm=grad, nonfinite_count=bad, loss=1.0 if step < 150 else float("nan"))


def write_crowded_logdir(root: str | Path) -> Path:
    """Runs that crowd the tab's markers: ``val_nan`` (one run of NaN evaluations and one isolated NaN),
    ``nan_every_other`` and ``many_layers``."""
    root = Path(root)
    _write_many_layers(root / "many_layers")
    _write_val_nan(root / "val_nan", {*NAN_RUN, NAN_ALONE}, set(NAN_RUN))
    every_other = set(range(NAN_EVAL_EVERY, 2 * NAN_MANY * NAN_EVAL_EVERY, 2 * NAN_EVAL_EVERY))
    assert len(every_other) == NAN_MANY
    _write_val_nan(root / "nan_every_other", every_other, set())
    return root


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_logdir(tmp_path_factory.mktemp("frontend_logs"))


@pytest.fixture(scope="module")
def server(logdir: Path):
    with TensorBoardServer(logdir) as tb:
        yield tb



class Tab:
    """One browser page on the Gradients tab, recording console errors, page errors and dialogs."""

    def __init__(self, browser, server: TensorBoardServer, color_scheme: str, route=None) -> None:
        """``route`` = (URL glob, handler): requests the page makes there go to the handler (Playwright's routing)."""
        self.context = browser.new_context(viewport={"width": 1400, "height": 1400}, color_scheme=color_scheme)
        self.page = self.context.new_page()
        if route is not None:
            self.page.route(*route)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("dialog", self._on_dialog)
        self.page.goto(server.url + "#gradients")
        self.page.wait_for_selector("iframe", timeout=60_000)
        self.frame = self._plugin_frame()
        self.frame.wait_for_selector(".run-panel .heatmap[data-drawn-cells]", timeout=60_000)

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _plugin_frame(self):
        deadline = 600
        for _ in range(deadline):
            for frame in self.page.frames:
                if "plugin_entry.html" in frame.url and "gradients" in frame.url:
                    return frame
            self.page.wait_for_timeout(100)
        raise AssertionError(f"no Gradients iframe among {[f.url for f in self.page.frames]}")

    def panel(self, run: str):
        return self.frame.locator(f".run-panel[data-run={json.dumps(run)}]")

    def open_loss_chart(self, run: str, marked: str):
        """Select ``run`` and wait until its loss chart is drawn with its ``marked`` data attribute set; returns the
        run's panel and that chart."""
        self.frame.locator("#run-a").select_option(run)
        panel = self.panel(run)
        chart = panel.locator(f".loss-chart[{marked}]")
        chart.wait_for()
        chart.locator("canvas").first.wait_for()
        return panel, chart

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def demo_server():
    with TensorBoardServer(DEMO_LOGS) as tb:
        yield tb


@pytest.fixture(scope="module")
def crowded_server(tmp_path_factory: pytest.TempPathFactory):
    with TensorBoardServer(write_crowded_logdir(tmp_path_factory.mktemp("crowded_logs"))) as tb:
        yield tb


@pytest.fixture()
def tab_factory(browser, request: pytest.FixtureRequest):
    tabs: list[Tab] = []

    def make(color_scheme: str = "light", tb: TensorBoardServer | None = None, route=None) -> Tab:
        # The shared logdir's server starts only for the tests that open it.
        tab = Tab(browser, tb or request.getfixturevalue("server"), color_scheme, route)
        tabs.append(tab)
        return tab

    yield make
    for tab in tabs:
        errors, dialogs = tab.errors, tab.dialogs
        tab.close()
        assert not dialogs, f"the page opened dialogs: {dialogs}"
        assert not errors, f"console errors: {errors}"


def _auditor_report(logdir: Path, run: str = "exploding") -> dict:
    """The offline auditor's JSON for a run (the same detector the plugin serves)."""
    from tb_gradient_plugin.detect import detect
    from tb_gradient_plugin.runs import load_run

    return detect(load_run(str(logdir / run), run)).to_json()


def _brightest_pixel_y(frame, run: str) -> float:
    """CSS y (relative to the heatmap canvas) of the brightest cell: where the explosion is drawn."""
    return frame.evaluate(
        """(run) => {
            const canvas = document.querySelector(`.run-panel[data-run="${CSS.escape(run)}"] .hm-canvas`);
            const ctx = canvas.getContext("2d");
            const img = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            let best = -1, bestY = -1;
            for (let i = 0; i < img.length; i += 4) {
                // Viridis' top end is yellow: high red and green, low blue.
                const score = img[i] + img[i + 1] - 2 * img[i + 2];
                if (score > best) { best = score; bestY = Math.floor(i / 4 / canvas.width); }
            }
            return bestY / (canvas.height / canvas.getBoundingClientRect().height);
        }""",
        run,
    )


# ---------------------------------------------------------------------------------------------------------- tests


def test_tab_flags_episode_offending_layer_and_loss_spike(tab_factory, server, logdir: Path) -> None:
    tab = tab_factory("light")
    page, frame = tab.page, tab.frame
    assert page.locator("plugin-selector .plugin-name", has_text="Gradients").count() >= 1
    # The tab opens on the run with the most explosion / non-finite episodes, the most recent of those that tie.
    assert frame.locator("#run-a").input_value() == "exploding"

    report = server.get_json("data/plugin/gradients/episodes?run=exploding")
    auditor = _auditor_report(logdir)
    assert report["episodes"] and auditor["episodes"]
    top = report["episodes"][0]["layers"][0]["name"]
    assert top == auditor["episodes"][0]["layers"][0]["name"] == CULPRIT

    panel = tab.panel("exploding")
    episodes = panel.locator(".episode")
    assert episodes.count() == len(report["episodes"]) >= 1
    assert episodes.first.get_attribute("data-kind") == "explosion"
    assert panel.locator(".episode .layer-chip.top").first.get_attribute("data-layer") == top

    heatmap = panel.locator(".heatmap")
    assert int(heatmap.get_attribute("data-drawn-cells")) >= len(LAYERS) * 100
    highlighted = panel.locator(".row-label.offending[data-rank='1']")
    assert highlighted.count() == 1
    assert highlighted.get_attribute("data-layer") == top
    assert highlighted.locator(".name").text_content() == top
    # The brightest cell of the canvas lies in the top offending layer's row.
    canvas_box = panel.locator(".hm-canvas").bounding_box()
    label_box = highlighted.bounding_box()
    y = _brightest_pixel_y(frame, "exploding")
    assert label_box["y"] - canvas_box["y"] - 2 <= y <= label_box["y"] - canvas_box["y"] + label_box["height"] + 2

    loss = server.get_json("data/plugin/gradients/loss?run=exploding")
    spike_steps = [s["step"] for s in loss["spikes"]]
    assert LOSS_SPIKE in spike_steps
    chart = panel.locator(".loss-chart")
    assert chart.get_attribute("data-spike-steps") == ",".join(map(str, spike_steps))
    assert chart.locator("canvas").count() >= 1
    assert panel.locator(".spike-chip").count() == len(spike_steps)
    assert panel.locator(".spike-chip").first.get_attribute("data-step") == str(spike_steps[0])

    # The hostile layer name is shown as text, and nothing it says ran.
    hostile = panel.locator(".row-label").filter(has_text="onerror")
    assert hostile.count() == 1
    assert hostile.get_attribute("data-layer") == HOSTILE
    assert hostile.locator(".name").text_content() == HOSTILE
    heat_box = panel.locator(".hm-canvas").bounding_box()
    hostile_box = hostile.bounding_box()
    tab.page.mouse.move(heat_box["x"] + heat_box["width"] / 2, hostile_box["y"] + hostile_box["height"] / 2)
    tooltip = panel.locator(".hm-tooltip .tt-title")
    tooltip.wait_for()
    assert tooltip.text_content() == HOSTILE
    # Metrics are named by the registry the plugin serves: in the tooltip, the heatmap's title and its metric picker.
    labels = {m["name"]: m["label"] for m in server.get_json("data/plugin/gradients/metrics")["metrics"]}
    assert f"{labels['grad_norm']}: " in panel.locator(".hm-tooltip").text_content()
    title = panel.locator(".heatmap-block .block-title").text_content()
    assert title == f"Layers × steps — log10 {labels['grad_norm']}"
    offered = frame.locator("#metric option").all_text_contents()
    assert offered == [f"log10 {labels[m]}" for m in ("grad_norm", "update_ratio", "grad_max_abs", "param_norm")]
    assert offered == ["log10 grad norm", "log10 update ratio", "log10 max |grad|", "log10 param norm"]
    assert frame.locator("img").count() == 0
    tab.page.mouse.move(0, 0)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "gradients_light.png"))


def test_clicking_an_episode_zooms_every_chart(tab_factory) -> None:
    tab = tab_factory("light")
    panel = tab.panel("exploding")
    heatmap = panel.locator(".heatmap")
    full_start, full_end = int(heatmap.get_attribute("data-view-start")), int(heatmap.get_attribute("data-view-end"))
    assert (full_start, full_end) == (0, STEPS - 1)

    def windowed(route: str):
        def match(request) -> bool:
            query = urllib.parse.parse_qs(urllib.parse.urlparse(request.url).query)
            return f"/data/plugin/gradients/{route}" in request.url and "start" in query and "end" in query
        return match

    episode = panel.locator(".episode").first
    start, end = int(episode.get_attribute("data-start")), int(episode.get_attribute("data-end"))
    with tab.page.expect_request(windowed("heatmap")) as heat_req, tab.page.expect_request(windowed("loss")):
        episode.click()
    query = urllib.parse.parse_qs(urllib.parse.urlparse(heat_req.value.url).query)
    zoom_start, zoom_end = int(query["start"][0]), int(query["end"][0])
    assert zoom_start <= start and end <= zoom_end
    assert zoom_end - zoom_start < (full_end - full_start) / 4
    tab.frame.wait_for_function(
        "([a, b]) => { const h = document.querySelector('.run-panel .heatmap');"
        " return h.dataset.viewStart === String(a) && h.dataset.viewEnd === String(b); }",
        arg=[zoom_start, zoom_end])
    # The zoomed heatmap is re-binned by the backend: one bin per step in this short window.
    tab.frame.wait_for_function(
        "(n) => Number(document.querySelector('.run-panel .heatmap').dataset.drawnCells) <= n", arg=len(LAYERS) * 80)
    # The drill-down opens on the episode's top layer, on the same step window.
    drill = panel.locator(".drill")
    drill.wait_for(state="visible")
    assert drill.get_attribute("data-layer") == CULPRIT
    assert panel.locator(".drill .layer-chart canvas").count() >= 3
    # Its gradient histograms are drawn on the same step axis as the heatmap: same plot edges, same window.
    hist = panel.locator(".drill .hist-view[data-drawn-columns]")
    hist.wait_for()
    assert int(hist.get_attribute("data-steps")) == len(range(0, STEPS, 50))
    for attr in ("data-view-start", "data-view-end", "data-plot-left", "data-plot-width"):
        assert hist.get_attribute(attr) == heatmap.get_attribute(attr), attr
    assert int(hist.get_attribute("data-drawn-columns")) >= 1
    tab.frame.locator("#reset-zoom").click()
    tab.frame.wait_for_function(
        "(b) => document.querySelector('.run-panel .heatmap').dataset.viewEnd === String(b)", arg=full_end)


def test_comparison_side_by_side_in_dark_mode(tab_factory) -> None:
    tab = tab_factory("dark")
    assert tab.frame.evaluate("document.documentElement.classList.contains('dark')")
    tab.frame.locator("#run-a").select_option("exploding")
    tab.frame.locator("#run-b").select_option("healthy")
    healthy = tab.panel("healthy")
    healthy.locator(".heatmap[data-drawn-cells]").wait_for()
    assert tab.frame.locator(".run-panel").count() == 2
    assert healthy.locator(".episode").count() == 0
    assert healthy.locator(".row-label.offending").count() == 0
    both = [tab.panel(r).locator(".heatmap") for r in ("exploding", "healthy")]
    assert both[0].get_attribute("data-view-end") == both[1].get_attribute("data-view-end")
    tab.panel("exploding").locator(".row-label[data-rank='1']").click()
    tab.panel("healthy").locator(".drill .layer-chart canvas").first.wait_for()
    assert tab.panel("healthy").locator(".drill").get_attribute("data-layer") == CULPRIT
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(SCREENSHOTS / "gradients_dark.png"))


def test_run_without_layers_and_live_reload(tab_factory, logdir: Path) -> None:
    tab = tab_factory("light")
    frame = tab.frame
    frame.locator("#run-a").select_option("loss_only")
    panel = tab.panel("loss_only")
    note = panel.locator(".heatmap-block .message-empty")
    note.wait_for()
    assert "no per-layer data" in note.text_content()
    assert "GradientMonitor" in note.text_content()
    panel.locator(".loss-chart canvas").first.wait_for()

    frame.locator("#run-a").select_option("live")
    heatmap = tab.panel("live").locator(".heatmap[data-drawn-cells]")
    heatmap.wait_for()
    assert heatmap.get_attribute("data-view-end") == "99"
    _write_live(logdir / "live", range(100, 200))
    # TensorBoard's reload button makes the tab look for new data at once (it also looks every 30 s).
    tab.page.locator(".reload-button").click()
    frame.wait_for_function(
        "() => document.querySelector('.run-panel .heatmap').dataset.viewEnd === '199'", timeout=30_000)


def test_validation_best_step_and_overfitting(tab_factory, logdir: Path) -> None:
    auditor = _auditor_report(logdir, "early_stop")
    found = {v["series"]: v for v in auditor["validation"] if v["cause"] != "nonfinite"}
    val = found["val_loss"]
    assert val["cause"] == "overfitting"
    assert abs(val["best_step"] - VAL_BEST) <= EVAL_EVERY

    tab = tab_factory("light")
    frame = tab.frame
    panel, chart = tab.open_loss_chart("early_stop", "data-best-steps")
    assert f"val_loss:{val['best_step']}" in chart.get_attribute("data-best-steps").split(",")
    best = panel.locator(".best-chip[data-series='val_loss']")
    assert best.get_attribute("data-step") == str(val["best_step"])
    assert "early stop" in best.text_content()
    # The NaN evaluation is marked too, and is a non-finite finding of its own.
    assert chart.get_attribute("data-nan-steps") == str(VAL_NAN)
    assert panel.locator(".nan-chip").get_attribute("data-step") == str(VAL_NAN)
    # The second axis offers the validation accuracy beside the total gradient norm.
    options = panel.locator("select.right-axis option")
    assert sorted(options.evaluate_all("els => els.map(e => e.value)")) == ["total_grad_norm", "val_accuracy"]

    kinds = [e["kind"] for e in auditor["episodes"]]
    episodes = panel.locator(".episode")
    assert episodes.count() == len(kinds)
    degraded = panel.locator(".episode[data-kind='val_degradation'][data-best-step]").filter(has_text="val loss")
    assert degraded.count() == 1
    assert degraded.get_attribute("data-cause") == "overfitting"
    assert degraded.locator(".cause").text_content() == "overfitting"
    assert degraded.locator(".best-step").get_attribute("data-step") == str(val["best_step"])
    nan = panel.locator(".episode.validation[data-kind='nonfinite']")
    assert nan.count() == 1
    # Validation findings name no layer: no empty "offending layers" row.
    assert panel.locator(".episode.validation .ep-layers").count() == 0
    assert panel.locator(".episode.validation .ep-advice li").count() >= 2

    degraded.click()
    heatmap = panel.locator(".heatmap")
    frame.wait_for_function(
        "(b) => { const h = document.querySelector('.run-panel .heatmap');"
        " return Number(h.dataset.viewStart) > 0 && Number(h.dataset.viewStart) <= b; }", arg=val["best_step"])
    assert int(heatmap.get_attribute("data-view-end")) == STEPS - 1
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(SCREENSHOTS / "validation_light.png"))


def _demo_default_run(server: TensorBoardServer) -> str:
    """The run the tab should open on for demo_logs, from the auditor's episodes and TensorBoard's run order."""
    from tb_gradient_plugin.detect import detect
    from tb_gradient_plugin.runs import find_runs, load_run
    from tb_gradient_plugin.types import FAILING_KINDS

    order = server.get_json("data/runs")  # by start time, oldest first
    best: tuple[int, int] | None = None
    pick = ""
    for name, path in find_runs(str(DEMO_LOGS)):
        episodes = detect(load_run(path, name)).to_json()["episodes"]
        alarming = sum(e["kind"] in FAILING_KINDS for e in episodes)
        recency = max((i for i, r in enumerate(order) if r == name or r.startswith(name + "/")), default=-1)
        if best is None or (alarming, recency) > best:
            best, pick = (alarming, recency), name
    return pick


class _FirstRead:
    """The ``runs`` route as it answers while the first read of a large logdir is still running: the real answer with
    only the runs in ``so_far`` and ``loading`` set, until ``done()``; the real answer after that. (A read that slow
    needs gigabytes of logs; the answers' shape is the route's own.)"""

    def __init__(self, so_far: set[str]) -> None:
        self.so_far = so_far
        self.reading = True

    def done(self) -> None:
        self.reading = False

    def __call__(self, route) -> None:
        response = route.fetch()
        body = response.json()
        if self.reading:
            body["runs"] = [r for r in body["runs"] if r["run"] in self.so_far]
            body["loading"] = True
        route.fulfill(response=response, json=body)


def test_during_the_first_read_the_tab_moves_to_a_worse_run_until_one_is_picked(tab_factory) -> None:
    routes = "**/data/plugin/gradients/runs"
    first_read = _FirstRead({"healthy", "live"})
    tab = tab_factory(route=(routes, first_read))
    assert tab.frame.locator("#run-a").input_value() == "live"  # no episode in either: the more recent
    first_read.done()  # the rest is read: "exploding" is worse
    tab.frame.wait_for_function("() => document.querySelector('#run-a').value === 'exploding'")
    tab.panel("exploding").locator(".heatmap[data-drawn-cells]").wait_for()

    first_read = _FirstRead({"healthy", "live"})
    picked = tab_factory(route=(routes, first_read))
    picked.frame.locator("#run-a").select_option("healthy")  # the user's choice ends the following
    picked.panel("healthy").locator(".heatmap[data-drawn-cells]").wait_for()
    first_read.done()
    picked.frame.wait_for_function("() => document.querySelector('#run-a').options.length === 6")
    picked.page.wait_for_timeout(1500)  # more than one poll of the first read
    assert picked.frame.locator("#run-a").input_value() == "healthy"
    assert picked.panel("healthy").count() == 1 and picked.panel("exploding").count() == 0


def test_transient_spikes_are_one_line_and_marks_not_episodes(tab_factory) -> None:
    tab = tab_factory()
    panel, chart = tab.open_loss_chart("loss_only", "data-transients='1'")
    summary = panel.locator(".transient-summary")
    assert summary.get_attribute("data-count") == "1"
    assert summary.inner_text().startswith("1 transient spike in 200 steps (5 per 1k), up to ")
    assert "all followed by a normal loss" in summary.inner_text()
    assert panel.locator(".episode").count() == 0


def test_a_run_level_series_is_not_called_a_layer(tab_factory) -> None:
    tab = tab_factory()
    tab.frame.locator("#run-a").select_option("total_only")
    card = tab.panel("total_only").locator(".episode.kind-explosion")
    card.wait_for()
    assert "Run-level series:" in card.inner_text() and "Offending layer" not in card.inner_text()
    assert card.locator(".layer-chip .name").inner_text() == "total grad norm"


def test_dead_layers_are_their_own_card(tab_factory, demo_server) -> None:
    tab = tab_factory("light", demo_server)
    tab.frame.locator("#run-a").select_option("keras_high_lr")
    card = tab.panel("keras_high_lr").locator(".episode.kind-dead")
    card.wait_for()
    assert "8 of 9 layers at zero" in card.inner_text() and "Dead layers:" in card.inner_text()
    assert card.locator(".layer-chip .ratio").first.inner_text().strip() == "zero from 45"
    assert "stopped learning" in card.locator(".ep-advice").inner_text()


def test_amp_overflow_skips_are_one_line_not_alarms(tab_factory, demo_server) -> None:
    """The healthy fp16 run: no warning sign in the picker, no episode card, no offending layer: one line."""
    tab = tab_factory("light", demo_server)
    frame = tab.frame
    option = frame.locator("#run-a option[value='amp_overflow']")
    assert option.inner_text() == "amp_overflow"
    frame.locator("#run-a").select_option("amp_overflow")
    panel = tab.panel("amp_overflow")
    line = panel.locator(".amp-summary")
    line.wait_for()
    assert line.inner_text() == "AMP skipped 11 of 400 steps; the loss scale settled at 2^19: normal."
    assert panel.locator(".episode").count() == 0 and panel.locator(".layer-chip").count() == 0
    heatmap = panel.locator(".heatmap[data-drawn-cells]")
    heatmap.wait_for()
    assert panel.locator(".row-label.offending").count() == 0


def test_html_report_reads_like_the_tab(browser, tmp_path) -> None:
    """``tb-gradient audit --html`` in Chromium: headers on one line, charts with step and value axes and a legend."""
    import subprocess
    import sys

    report = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "tb_gradient_plugin", "audit", str(DEMO_LOGS), "--run", "*_lr*",
                    "--html", str(report), "--fail-on", "never"], check=True, capture_output=True, timeout=300)
    page = browser.new_page(viewport={"width": 1250, "height": 1000})
    try:
        page.goto(report.as_uri())
        heights = page.eval_on_selector_all("table.eps th", "hs => hs.map((h) => h.getBoundingClientRect().height)")
        line = page.eval_on_selector("table.eps th", "h => parseFloat(getComputedStyle(h).lineHeight)")
        assert heights and max(heights) < 1.9 * line + 12, heights  # one line each, padding included
        for chart in page.query_selector_all("svg.chart"):
            assert len(chart.query_selector_all(".x-axis text")) >= 2
            assert len(chart.query_selector_all(".y-axis text")) >= 2
            assert "loss" in chart.query_selector(".legend").text_content()
        assert page.query_selector_all("svg.chart")
        assert len(page.query_selector_all(".hmimg .x-axis text")) >= 2
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "report.png"), full_page=True)
    finally:
        page.close()


def test_demo_logs_open_on_the_most_interesting_run(tab_factory, demo_server) -> None:
    """``make demo`` opens TensorBoard on demo_logs/ at #gradients; these are also the README's screenshots."""
    expected = _demo_default_run(demo_server)
    tab = tab_factory("light", demo_server)
    frame = tab.frame
    assert frame.locator("#run-a").input_value() == expected
    assert tab.panel(expected).locator(".episode").count() >= 1
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(SCREENSHOTS / "demo_default.png"))

    frame.locator("#run-a").select_option("mlp_lr_raised")
    panel = tab.panel("mlp_lr_raised")
    panel.locator(".heatmap[data-drawn-cells]").wait_for()
    panel.locator(".row-label[data-rank='1']").click()
    panel.locator(".drill .layer-chart canvas").first.wait_for()
    tab.page.mouse.move(0, 0)
    tab.page.screenshot(path=str(SCREENSHOTS / "demo_light.png"))

    dark = tab_factory("dark", demo_server)
    dark.frame.locator("#run-a").select_option("rnn_no_clip")
    dark.frame.locator("#run-b").select_option("rnn_clipped")
    for run in ("rnn_no_clip", "rnn_clipped"):
        dark.panel(run).locator(".heatmap[data-drawn-cells]").wait_for()
        dark.panel(run).locator(".loss-chart canvas").first.wait_for()
    dark.page.screenshot(path=str(SCREENSHOTS / "demo_dark.png"))


def _label_boxes(chart) -> list[dict]:
    """The marker labels the loss chart shows ({row, text, left, right} in plot pixels), as it records them."""
    return json.loads(chart.get_attribute("data-labels"))


def _wait_labels_for_view(frame) -> None:
    """Wait until the loss chart's labels were chosen for the zoomed window (after its data came back)."""
    frame.wait_for_function(
        "() => { const v = document.documentElement.dataset.view;"
        " return v && document.querySelector('.loss-chart').dataset.labelView === v; }")


def _assert_no_overlap(labels: list[dict]) -> None:
    for row in {label["row"] for label in labels}:
        boxes = sorted((label["left"], label["right"], label["text"]) for label in labels if label["row"] == row)
        for a, b in zip(boxes, boxes[1:], strict=False):
            assert a[1] <= b[0], f"labels overlap on row {row}: {a} and {b}"


def test_consecutive_nan_evaluations_are_one_marked_span(tab_factory, crowded_server) -> None:
    """Ten NaN evaluations in a row are one span, one label and one chip; the isolated one later keeps its own."""
    tab = tab_factory("light", crowded_server)
    frame = tab.frame
    panel, chart = tab.open_loss_chart("val_nan", "data-nan-steps")
    first, last = NAN_RUN[0], NAN_RUN[-1]
    chips = panel.locator(".nan-chip")
    assert chips.count() == 2
    assert chart.get_attribute("data-nan-steps") == ",".join(map(str, [*NAN_RUN, NAN_ALONE]))
    assert chart.get_attribute("data-nan-groups") == f"{first}-{last},{NAN_ALONE}"
    # On the chart: one dashed span for the run, one line for the isolated evaluation.
    assert (chart.get_attribute("data-nan-spans"), chart.get_attribute("data-nan-lines")) == ("1", "1")
    labels = _label_boxes(chart)
    nan_labels = sorted(label["text"] for label in labels if "NaN" in label["text"])
    assert nan_labels == sorted(["✕ val loss NaN", f"✕ val accuracy, val loss NaN ({len(NAN_RUN)} evaluations)"])
    _assert_no_overlap(labels)

    run_chip, alone_chip = chips.nth(0), chips.nth(1)
    assert (run_chip.get_attribute("data-step"), run_chip.get_attribute("data-end")) == (str(first), str(last))
    assert run_chip.get_attribute("data-count") == str(len(NAN_RUN))
    assert run_chip.get_attribute("data-series") == "val_accuracy,val_loss"
    assert run_chip.text_content() == f"✕ val accuracy, val loss NaN from {first} ({len(NAN_RUN)} evaluations)"
    assert alone_chip.text_content() == f"✕ val loss NaN @ {NAN_ALONE}"
    assert alone_chip.get_attribute("data-count") == "1"
    entry = panel.locator(".episode.validation[data-kind='nonfinite']").filter(has_text="val loss").first
    assert entry.locator(".ep-steps").text_content() == f"{len(NAN_RUN)} evaluations in a row, steps {first}–{last}"

    # The run's chip zooms every chart onto the whole run of NaN evaluations.
    run_chip.click()
    tab.frame.wait_for_function(
        "([a, b, full]) => { const h = document.querySelector('.run-panel .heatmap');"
        " const s = Number(h.dataset.viewStart), e = Number(h.dataset.viewEnd);"
        " return s > 0 && s <= a && e >= b && e < full; }", arg=[first, last, STEPS - 1])
    # Zoomed in (its labels chosen again for the window), the chart keeps one span and one label for the run.
    _wait_labels_for_view(frame)
    assert chart.get_attribute("data-nan-spans") == "1"
    assert [label["text"] for label in _label_boxes(chart) if "NaN" in label["text"]] == [
        f"✕ val accuracy, val loss NaN ({len(NAN_RUN)} evaluations)"]


def test_many_isolated_nan_evaluations_do_not_stack(tab_factory, crowded_server) -> None:
    """NaN at every other evaluation: each keeps its marker, but labels never overlap and the chips stay a few."""
    tab = tab_factory("light", crowded_server)
    panel, chart = tab.open_loss_chart("nan_every_other", "data-nan-steps")
    assert len(chart.get_attribute("data-nan-groups").split(",")) == NAN_MANY
    assert (chart.get_attribute("data-nan-spans"), chart.get_attribute("data-nan-lines")) == ("0", str(NAN_MANY))
    labels = _label_boxes(chart)
    _assert_no_overlap(labels)
    shown = sum("NaN" in label["text"] for label in labels)
    assert 1 <= shown < NAN_MANY
    assert int(chart.get_attribute("data-hidden-labels")) >= NAN_MANY - shown
    chips = panel.locator(".nan-chip")
    assert 1 <= chips.count() < NAN_MANY
    assert panel.locator(".loss-head .nan-more").text_content() == f"+{NAN_MANY - chips.count()} more NaN"
    # Zoomed in, the evaluations lie wider apart: every NaN evaluation in the window is labelled.
    chips.nth(1).click()
    _wait_labels_for_view(tab.frame)
    start, end = (int(v) for v in tab.frame.evaluate("document.documentElement.dataset.view").split("-"))
    steps = [int(s) for s in chart.get_attribute("data-nan-groups").split(",")]
    inside = [s for s in steps if start <= s <= end]
    assert 1 <= len(inside) < NAN_MANY
    labels = _label_boxes(chart)
    _assert_no_overlap(labels)
    assert sum("NaN" in label["text"] for label in labels) == len(inside)


def test_thin_heatmap_rows_name_only_what_fits(tab_factory, crowded_server) -> None:
    """Too many offending layers for their thin rows: the top one is named, and no two names overlap."""
    report = crowded_server.get_json("data/plugin/gradients/episodes?run=many_layers")
    offending = {layer["name"] for ep in report["episodes"] for layer in ep["layers"]}
    tab = tab_factory("light", crowded_server)
    tab.frame.locator("#run-a").select_option("many_layers")
    panel = tab.panel("many_layers")
    panel.locator(".heatmap[data-drawn-cells]").wait_for()
    labels = panel.locator(".row-label")
    assert panel.locator(".row-label[data-rank='1']").count() == 1
    named = labels.evaluate_all("els => els.map(e => e.dataset.layer)")
    assert set(named) <= offending
    boxes = sorted(box["y"] for box in labels.evaluate_all(
        "els => els.map(e => { const r = e.getBoundingClientRect(); return { y: r.top, h: r.height }; })"))
    height = labels.first.bounding_box()["height"]
    assert all(b - a >= height - 3 for a, b in zip(boxes, boxes[1:], strict=False)), boxes
    hidden = int(panel.locator(".hm-labels").get_attribute("data-hidden-labels"))
    assert hidden > 0 and len(named) + hidden == len(offending) > len(named)
