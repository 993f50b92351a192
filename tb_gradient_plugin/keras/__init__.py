"""Keras 3 integration: per-layer gradient health of ``model.fit``, recorded from inside the compiled train step.

``from tb_gradient_plugin.keras import GradientMonitorCallback``. The modules: :mod:`.callback`
(``GradientMonitorCallback``: the hooks in the optimizer, the traced step's ring buffers, the explosion guard's
in-graph check and the host side that judges and writes), :mod:`.layers` (which layers are monitored, and their
names), :mod:`.batches` (which samples a step trained on: ``IndexedBatches``) and :mod:`.stats` (the in-graph
gradient reductions and histogram counts); on Keras' JAX and torch backends
:mod:`.backends` drives :mod:`.capture_jax` or :mod:`.capture_torch`, with the shared host side in :mod:`.host`.

Inside this package ``import keras`` is Keras itself (imports are absolute); nothing here may import it relatively.
"""

from .batches import IndexedBatches
from .callback import GradientMonitorCallback

__all__ = ["GradientMonitorCallback", "IndexedBatches"]
