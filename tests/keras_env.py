"""TensorFlow set-up shared by the Keras tests: quiet start-up, and one thread each way on a small shared machine."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

try:  # only possible before TensorFlow's first op
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:
    pass

__all__ = ["keras", "tf"]
