"""Every threshold of the detector in one place, so the auditor, the plugin, the guard and the labeled suite tune the
same knobs (their defaults are justified in docs/DETECTION.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DetectorConfig:
    """Every threshold of the detector, with defaults that work across the labeled suite (docs/DETECTION.md)."""

    block: int = 8  # points per baseline block
    window_blocks: int = 8  # the baseline is the median of this many recent block medians
    min_history: int = 24  # valid points a series needs before it can cross (warm-up of the detector itself)
    mature_history: int = 64  # until a series has this many valid points (a full window), only max_ratio crosses
    ratio: float = 5.0  # a gradient norm crosses at ratio x its baseline ...
    z: float = 6.0  # ... and this many robust sigmas (log space) above it
    readapt_blocks: int = 6  # blocks above threshold after which the new level becomes the baseline
    update_ratio_ratio: float = 5.0  # update/param ratio crossing: this many times its own baseline ...
    update_ratio_z: float = 6.0
    update_ratio_floor: float = 1e-2  # ... and above the range that is healthy for most layers
    loss_ratio: float = 10.0  # loss spike: ratio x the loss baseline (a noisy loss often makes benign 5x steps) ...
    loss_z: float = 6.0  # ... and this many robust sigmas above it
    loss_min_history: int = 8  # loss series are often short (one point per epoch)
    loss_back_ratio: float = 3.0  # a loss spike ends once a point is back below this many times the loss baseline
    max_ratio: float = 50.0  # however noisy a series, this many times its baseline always crosses
    merge_gap: int = 10  # crossings at most this many logged steps apart form one episode
    # A group of crossings is an explosion only when something broke (docs/DETECTION.md), else a transient spike:
    persist_points: int = 8  # ... crossings at this many logged steps (a level that stayed up for a block) ...
    react_points: int = 10  # ... the loss react_ratio x its baseline within this many logged losses after the
    react_ratio: float = 3.0  # group (after a hard batch that raised both at once: staying there) ...
    update_blowup: float = 10.0  # ... an update ratio this far above its baseline (and grown with its gradient) ...
    extreme_ratio: float = 1000.0  # ... or a crossing this far above its baseline, which needs nothing else ...
    collapse_points: int = 20  # ... or a layer's gradient exactly zero at half of the logged steps this long after it
    dead_points: int = 20  # a layer whose gradient is exactly zero at this many points in a row is dead ...
    dead_ratio: float = 1e4  # ... or this many times below its baseline (vanished)
    chronic_gap: int = 500  # spikes and explosions at most this many logged steps apart recur ...
    chronic_events: int = 8  # ... and this many of them, at least chronic_rate per 1,000 logged steps of their span,
    chronic_rate: float = 5.0  # are one chronic finding when one is an explosion or the loss suffers ...
    chronic_loss_rise: float = 1.25  # ... (the loss at the span's end this many times its level before the span)
    loss_link_points: int = 50  # a loss spike this many logged steps after an episode's end "followed" it
    early_points: int = 10  # non-finite values within the first logged steps point at initialization
    loss_scale_floor: float = 1.0  # an AMP loss scale below this means the overflows are not benign
    loss_scale_drop: float = 2.0**10  # ... so does a scale this many times below its running maximum
    clip_quantile: float = 0.99  # suggested clip threshold: this quantile of the healthy total gradient norm
    depth_growth: float = 10.0  # layer norms growing this much through depth (monotonically) -> advise normalization
    max_layers: int = 20  # findings kept per episode
    hist_mass_shift: float = 0.5  # histograms: the median |g| moved this many decades -> the mass of the distribution
    hist_tail_shift: float = 1.0  # ... else the largest |g| moved this many decades -> a thin tail ...
    hist_tail_share: float = 0.01  # ... unless more than this share of the entries went beyond the old largest (mass)
    val_min_points: int = 8  # finite validation points needed to judge a degradation
    val_patience: int = 3  # ... of which at least this many after the best point
    val_smooth: int = 3  # running median over this many evaluations before the best point is chosen
    val_min_worsening: float = 0.05  # recent validation this much worse (relative) than its best: degraded ...
    val_noise_z: float = 3.0  # ... and this many times the series' own evaluation-to-evaluation noise
    growth_ratio: float = 30.0  # slow growth: a gradient norm's level rose this many times from its low point ...
    growth_block: int = 16  # ... judged on medians of this many points (noise and single spikes do not count) ...
    growth_min_blocks: int = 6  # ... rising over at least this many blocks, the level held at the end ...
    growth_end_blocks: int = 3  # ... (the median of the last this many blocks) ...
    growth_max_jump: float = 0.5  # ... no two blocks in a row carrying more than this share of the rise (a jump) ...
    growth_loss_gain: float = 0.05  # ... while the loss improved by less than this share over the rise
    clip_saturated_share: float = 0.5  # saturated clip: the pre-clip total norm above the threshold at this share

    def __post_init__(self) -> None:
        if self.block < 1 or self.window_blocks < 1:
            raise ValueError("block and window_blocks must be at least 1")
        for name in ("ratio", "update_ratio_ratio", "loss_ratio", "react_ratio"):
            if not getattr(self, name) > 1.0:
                raise ValueError(f"{name} must be above 1, got {getattr(self, name)!r}")
        if not self.loss_back_ratio >= 1.0:
            raise ValueError(f"loss_back_ratio must be at least 1, got {self.loss_back_ratio!r}")
        if self.merge_gap < 0 or self.min_history < 0 or self.mature_history < 0:
            raise ValueError("merge_gap, min_history and mature_history must be non-negative")
        if self.persist_points < 1 or self.react_points < 0 or self.chronic_events < 2 or self.chronic_gap < 1 \
                or self.collapse_points < 1:
            raise ValueError("persist_points, collapse_points and chronic_gap must be at least 1, chronic_events at "
                             "least 2 and react_points non-negative")
        if self.dead_points < 1:
            raise ValueError(f"dead_points must be at least 1, got {self.dead_points!r}")
        if not self.dead_ratio > 1:
            raise ValueError(f"dead_ratio must be above 1, got {self.dead_ratio!r}")
        for name in ("extreme_ratio", "update_blowup"):
            if not getattr(self, name) > 1.0:
                raise ValueError(f"{name} must be above 1, got {getattr(self, name)!r}")
        if not self.growth_ratio > 1.0:
            raise ValueError(f"growth_ratio must be above 1, got {self.growth_ratio!r}")
        if self.growth_block < 1 or self.growth_min_blocks < 2 or self.growth_end_blocks < 1:
            raise ValueError("growth_block and growth_end_blocks must be at least 1, growth_min_blocks at least 2")
        for name in ("growth_max_jump", "growth_loss_gain", "clip_saturated_share"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.hist_tail_share < 1.0:
            raise ValueError(f"hist_tail_share must be between 0 and 1, got {self.hist_tail_share!r}")
