"""Detection engine: explosion episodes, offending-layer ranking, loss spikes and advice from measured facts.

Every series is judged against its own recent robust baseline, in log space (:mod:`.baseline` says how and why).
Non-finite values always make an episode (kind ``nonfinite``). AMP overflow skips (the optimizer step skipped and the
loss scale backed off) are reported apart as ``overflow_skip``, unless the loss scale collapses, in which case they
are a ``nonfinite`` episode. With gradient histograms, an episode's advice says whether the mass of the offending
layer's distribution moved (a scale problem) or a thin tail of it (a few units, a bad batch).

One module per step of the judgement: :mod:`.config` (thresholds), :mod:`.baseline` (the robust baseline and the
offline solver), :mod:`.rows` (what a step contributes, the same offline and online), :mod:`.episodes` (grouping,
ranking, loss spikes), :mod:`.advice`, :mod:`.histograms`, :mod:`.validation`, and the two entry points
:mod:`.offline` (:func:`detect`) and :mod:`.online` (:class:`OnlineDetector`). The result types live in
:mod:`tb_gradient_plugin.types`, beside the run data they are computed from.
"""

from ..types import TOTAL, VAL_KIND, Episode, LayerFinding, LossSpike, Report, ValidationFinding
from .baseline import baseline_band
from .config import DetectorConfig
from .histograms import hist_quantile, hist_share_above
from .offline import detect
from .online import OnlineDetector
from .validation import VAL_METRIC_PREFIX, VALIDATION_SERIES, validation_series

__all__ = [
    "TOTAL",
    "VALIDATION_SERIES",
    "VAL_KIND",
    "VAL_METRIC_PREFIX",
    "DetectorConfig",
    "Episode",
    "LayerFinding",
    "LossSpike",
    "OnlineDetector",
    "Report",
    "ValidationFinding",
    "baseline_band",
    "detect",
    "hist_quantile",
    "hist_share_above",
    "validation_series",
]
