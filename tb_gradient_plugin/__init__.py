"""tb_gradient_plugin: per-layer gradient health in TensorBoard, and an offline auditor for exploding gradients.

Importing the package imports neither torch nor TensorFlow; the framework integrations live in
``tb_gradient_plugin.torch`` and ``tb_gradient_plugin.keras``. :func:`audit` is the offline auditor for notebooks.
"""

from typing import Any

from .writer import GradientWriter

__all__ = ["GradientWriter", "__version__", "audit"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # TensorBoard imports this package at start-up: the auditor (run store, detector) loads on first use of audit
    if name == "audit":
        from .notebook import audit

        return audit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
