"""Package definition for tb_gradient_plugin."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

TORCH = ["torch>=2.1"]
KERAS = ["tensorflow>=2.16", "keras>=3.0"]
JAX = ["jax>=0.4.30", "optax>=0.2.2"]

setup(
    name="tb_gradient_plugin",
    version="0.1.0",
    description="TensorBoard plugin and offline auditor for exploding gradients",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # static/ holds the built frontend bundle (data, not code): listed as a package so its files are installed
    packages=find_packages(include=["tb_gradient_plugin", "tb_gradient_plugin.*"]) + ["tb_gradient_plugin.static"],
    package_data={"tb_gradient_plugin.static": ["*"]},
    install_requires=[
        "tensorboard>=2.16",
        "protobuf>=4.21",
        "numpy>=1.23",
        "werkzeug>=2.2",
        "crc32c>=2.3",
        "fsspec>=2023.1",
        "rich>=13",
        "platformdirs>=3",  # the default cache directory of the plugin's persistent run cache
    ],
    extras_require={
        "torch": TORCH,
        "keras": KERAS,
        "jax": JAX,  # the Optax monitor, and Keras' JAX backend (KERAS_BACKEND=jax)
        "lightning": TORCH + ["lightning>=2.1"],
        "transformers": TORCH + ["transformers>=4.40", "accelerate>=0.26"],
        # s3:// and gs:// logdirs (fsspec is a core dependency; these are its protocols)
        "remote": ["s3fs>=2023.1", "gcsfs>=2023.1"],
        # tb-gradient audit --scheduler: the per-run audit on a Dask cluster
        "dask": ["dask[distributed]>=2023.1"],
        # RunAudit.to_pandas() in notebooks
        "pandas": ["pandas>=1.5"],
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6.80",
            "ruff>=0.4",
            "playwright>=1.40",
            "tbparse>=0.0.9",
            "tensorboardX>=2.6",
            "moto[server]>=5.0",  # a real S3-compatible server for the s3:// tests
            "s3fs>=2023.1",
            "gcsfs>=2023.1",
            "gcp-storage-emulator>=2024.1",  # a real GCS JSON API server for the gs:// tests
            "pandas>=1.5",
            "flax>=0.12",  # the JAX tests train Flax Linen and NNX models
        ],
    },
    entry_points={
        "console_scripts": ["tb-gradient = tb_gradient_plugin.cli:main"],
        "tensorboard_plugins": ["gradients = tb_gradient_plugin.plugin:GradientsLoader"],
    },
    classifiers=[
        "Framework :: TensorFlow",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
