"""PyTorch integration: per-layer gradient health recorded from the optimizer's own step hooks.

``from tb_gradient_plugin.torch import GradientMonitor``. The modules: :mod:`.monitor` (``GradientMonitor``: hooks,
schedule, the one host transfer per step), :mod:`.layers` (which modules are layers, and their names), :mod:`.stats`
(the device reductions), :mod:`.optim_updates` (update norms from the optimizer's state), :mod:`.weights_copy` (the
weights copy otherwise) and :mod:`.callback` (what the Lightning and Hugging Face callbacks share).

Inside this package ``import torch`` is PyTorch itself (imports are absolute); nothing here may import it relatively.
"""

from .layers import discover_layers
from .monitor import GradientMonitor

__all__ = ["GradientMonitor", "discover_layers"]
