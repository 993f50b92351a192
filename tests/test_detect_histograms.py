"""Histogram advice: did the mass of the offending layer's gradient distribution move, or a thin tail of it?

Synthetic runs with histograms built by the format's reference binning, and real torch training recorded by the
real ``GradientMonitor`` (an LR raise: the mass moves; one corrupted sample with a huge input feature: a tail).
"""

from __future__ import annotations

import numpy as np
import pytest

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.detect import detect, hist_quantile, hist_share_above
from tb_gradient_plugin.runs import load_run
from tests.test_detect import _online, _reacting_loss, _run

MASS = "Most entries grew"
TAIL = "A thin tail grew"


def _with_histograms(run, every: int, entries: int, change: dict[int, np.ndarray] | None = None, seed: int = 0):
    """Give ``run`` a histogram of ``entries`` log-normal gradient entries per layer every ``every`` steps;
    ``change[step]`` multiplies layer 7's entries at that step (the same factors the grad norm got)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, run.steps.size, every, dtype=np.int64)
    hist = np.zeros((steps.size, len(run.layers), fmt.HIST_BINS), dtype=np.int64)
    for k, s in enumerate(steps.tolist()):
        for j in range(len(run.layers)):
            g = rng.lognormal(np.log(1e-3), 1.0, entries)
            if change and j == 7 and s in change:
                g = g * change[s]
            hist[k, j] = fmt.histogram_counts(g)
    run.hist_steps, run.histograms = steps, hist
    return run


def _hist_advice(rep) -> list[str]:
    return [a for e in rep.episodes for a in e.advice if "gradient histogram at step" in a]


def test_quantiles_and_shares_of_a_histogram_match_the_entries_within_a_bin():
    rng = np.random.default_rng(1)
    g = rng.lognormal(np.log(1e-3), 2.0, 100_000)
    g[:10] = 0.0
    g[10:15] = np.nan
    counts = fmt.histogram_counts(g)
    finite = np.abs(g[np.isfinite(g) & (g > 0)])
    for q in (0.1, 0.5, 0.9):
        # zeros rank first: the q quantile of all entries is the (q*n - zeros) / positives quantile of the positives
        qq = (q * g.size - 10) / finite.size
        assert abs(hist_quantile(counts, q) - np.log10(np.quantile(finite, qq))) < 0.5
    assert hist_quantile(counts, 1.0) > 12  # the non-finite entries rank above every magnitude
    assert hist_quantile(counts, 0.0) < -12  # and the zeros below
    assert abs(hist_share_above(counts, -3.0) - (np.sum(finite > 1e-3) + 5) / g.size) < 0.1
    assert np.isnan(hist_quantile(np.zeros(fmt.HIST_BINS), 0.5))


def test_mass_moved_when_every_entry_of_the_offending_layer_grew():
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1000:1003, 7] *= 40
    run = _with_histograms(run, 5, 4096, {1000: np.full(4096, 40.0)})
    (ep,) = detect(run).episodes
    assert ep.layers[0].name == "layer7"
    (adv,) = _hist_advice(detect(run))
    assert MASS in adv and "layer7's gradient histogram at step 1000 vs step 995" in adv
    assert "scale problem" in adv and TAIL not in adv


def test_tail_moved_when_a_few_entries_grew_and_the_median_stayed():
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1000, 7] *= 40
    factors = np.ones(4096)
    factors[:4] = 1e5  # 0.1 % of the entries, from one bad sample
    run = _with_histograms(run, 5, 4096, {1000: factors})
    rep = detect(run)
    (adv,) = _hist_advice(rep)
    assert TAIL in adv and MASS not in adv
    assert "outlier" in adv and "not the fix" in adv


def test_no_histogram_inside_the_episode_or_none_before_gives_no_histogram_advice():
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1003, 7] *= 40  # histograms every 10 steps: none at 1003
    assert _hist_advice(detect(_with_histograms(run, 10, 1024))) == []
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1000, 7] *= 40
    run = _with_histograms(run, 10, 1024, {1000: np.full(1024, 40.0)})
    run.histograms[run.hist_steps < 1000, 7] = 0  # the layer was never histogrammed before the episode
    assert _hist_advice(detect(run)) == []


def test_nonfinite_entries_count_as_the_tail_they_are():
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1000, 7] = np.nan
    run.layer_metrics["nonfinite_count"][1000, 7] = 3
    factors = np.ones(4096)
    factors[:3] = np.nan
    rep = detect(_with_histograms(run, 5, 4096, {1000: factors}))
    (ep,) = rep.episodes
    assert ep.kind == "nonfinite"
    (adv,) = _hist_advice(rep)
    assert TAIL in adv and "3 of 4096 entries are non-finite" in adv


def test_online_with_histograms_equals_offline():
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1000:1003, 7] *= 40
    run = _with_histograms(run, 5, 2048, {1000: np.full(2048, 40.0)})
    off = detect(run)
    assert _hist_advice(off)
    assert _online(run).to_json() == off.to_json()


# --------------------------------------------------------------------------------------------- real torch training


def _train(logdir: str, kind: str) -> None:
    """``lr``: a small linear MLP whose SGD learning rate is raised 50x at step 200 (every gradient entry grows).
    ``sample``: a wide & deep classifier where one sample of the batch at step 200 carries a huge value in one feature
    of the wide part (that layer's gradient grows in one column: a thin tail)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from tb_gradient_plugin.torch import GradientMonitor

    torch.manual_seed(0)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    if kind == "lr":
        model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 1))
        xs = torch.randn(2048, 32, generator=gen)
        ys = torch.sin(xs @ torch.randn(32, 1, generator=gen))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_fn = nn.functional.mse_loss
    else:
        class WideDeep(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.deep = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
                self.wide = nn.Linear(64, 10)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.deep(x[:, :32]) + self.wide(x[:, 32:])

        model = WideDeep()
        xs = torch.randn(2048, 96, generator=gen)
        ys = (xs[:, :10] * 2 + xs[:, 32:42]).argmax(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        loss_fn = nn.functional.cross_entropy
    monitor = GradientMonitor(model, opt, logdir, every=1, histograms_every=1)
    for step in range(240):
        if kind == "lr" and step == 200:
            for g in opt.param_groups:
                g["lr"] *= 50
        i = (step * 32) % 2048
        x, y = xs[i:i + 32].clone(), ys[i:i + 32]
        if kind == "sample" and step == 200:
            x[0, 32 + 5] = 1e4
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        monitor.log_loss(loss)
        loss.backward()
        opt.step()
    monitor.close()


@pytest.mark.slow
def test_real_lr_raise_moves_the_mass(tmp_path):
    _train(str(tmp_path), "lr")
    run = load_run(str(tmp_path))
    assert run.histograms is not None and run.hist_steps.size == 240
    rep = detect(run)
    eps = [e for e in rep.episodes if e.kind in ("explosion", "nonfinite")]
    assert eps and eps[0].start_step == 200
    adv = [a for a in eps[0].advice if "gradient histogram at step" in a]
    assert len(adv) == 1 and MASS in adv[0] and adv[0].startswith(f"{eps[0].layers[0].name}'s gradient histogram")


@pytest.mark.slow
def test_real_corrupted_sample_moves_a_thin_tail_of_the_layer_it_feeds(tmp_path):
    _train(str(tmp_path), "sample")
    rep = detect(load_run(str(tmp_path)))
    (ep,) = [e for e in rep.episodes if e.kind in ("explosion", "nonfinite")]
    assert ep.start_step == 200 and ep.layers[0].name == "wide"
    (adv,) = [a for a in ep.advice if "gradient histogram at step" in a]
    assert TAIL in adv and MASS not in adv
    # the update-ratio advice does not blame the learning rate for a few entries
    assert not any("learning rate is too high" in a for a in ep.advice)


def test_exact_zeros_do_not_pin_the_median():
    # 3/4 of the layer's entries are exactly zero (dead units); the live quarter grew 40x: a scale problem, which
    # a median over all entries (stuck in the zero bin) would call a thin tail
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1000:1003, 7] *= 40
    run = _with_histograms(run, 5, 4096, {1000: np.full(4096, 40.0)})
    run.histograms[:, 7, fmt.HIST_ZERO] += 3 * 4096
    (adv,) = _hist_advice(detect(run))
    assert MASS in adv and TAIL not in adv and "12288 of 16384 entries are exactly zero" in adv


def test_the_histogram_compared_is_the_last_one_up_to_the_peak_with_finite_entries():
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1000:1004, 7] *= 40
    run.layer_metrics["grad_norm"][1006, 7] = np.nan
    run.layer_metrics["nonfinite_count"][1006, 7] = 4096
    run = _with_histograms(run, 5, 4096, {1000: np.full(4096, 40.0), 1005: np.full(4096, np.nan)})
    (ep,) = detect(run).episodes
    assert ep.start_step == 1000 and ep.peak_step >= 1005
    (adv,) = _hist_advice(detect(run))
    assert "at step 1000 vs step 995" in adv and MASS in adv and "non-finite" not in adv.split(":")[1][:60]


def test_a_large_share_beyond_the_old_largest_is_not_a_thin_tail():
    # the median stays, but 10 % of the entries jumped 1e4x: too many for a few outliers
    run = _run(loss=_reacting_loss(2000, 1005))
    run.layer_metrics["grad_norm"][1000, 7] *= 40
    factors = np.ones(4096)
    factors[:410] = 1e4
    (adv,) = _hist_advice(detect(_with_histograms(run, 5, 4096, {1000: factors})))
    assert "A large share of the entries grew" in adv and TAIL not in adv
