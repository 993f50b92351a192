"""JAX integration: per-layer gradient health of a JAX training loop, recorded by wrapping its Optax optimizer.

``from tb_gradient_plugin.jax import GradientMonitor``. The modules: :mod:`.monitor` (``GradientMonitor`` and the
wrapped transformation traced into the user's step), :mod:`.layers` (which tree leaves are layers, and their names),
:mod:`.stats` (the device reductions) and :mod:`.host` (what the step's one callback does on the host: judge and
write).

Inside this package ``import jax`` is JAX itself (imports are absolute); nothing here may import it relatively.
"""

try:
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"tb_gradient_plugin.jax needs JAX and Optax ({err.name or err} is missing): "
        "pip install 'tb_gradient_plugin[jax]'"
    ) from err

from .layers import discover_layers
from .monitor import GradientMonitor, MonitorState

__all__ = ["GradientMonitor", "MonitorState", "discover_layers"]
