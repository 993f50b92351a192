"""tb_gradient_plugin: per-layer gradient health in TensorBoard, and an offline auditor for exploding gradients.

Importing the package imports neither torch nor TensorFlow; the framework integrations live in
``tb_gradient_plugin.torch`` and ``tb_gradient_plugin.keras``.
"""

from .writer import GradientWriter

__all__ = ["GradientWriter", "__version__"]
__version__ = "0.1.0"
