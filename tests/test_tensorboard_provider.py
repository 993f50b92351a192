"""TensorBoard's own data providers (Python loader and Rust data server) see our summaries under plugin "gradients"."""

from __future__ import annotations

import time

import numpy as np
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.data import server_ingester
from tensorboard.util import grpc_util

from tb_gradient_plugin import format as fmt
from tb_gradient_plugin.writer import GradientWriter

LAYERS = ["block0.fc", "block1.fc"]


def _write(logdir) -> None:
    with GradientWriter(logdir / "run_a") as w:
        for s in range(5):
            w.write(s, LAYERS, grad_norm=[s, 2 * s], update_norm=[0.1, 0.2], loss=1.0 / (s + 1))


def _check(tensors, scalars) -> None:
    assert set(tensors) == {"run_a"}
    assert {fmt.tag_for("grad_norm"), fmt.tag_for("update_norm")} <= set(tensors["run_a"])
    assert fmt.tag_for("loss") in scalars["run_a"]


def test_python_loader_lists_our_tensors(tmp_path):
    _write(tmp_path)
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    ctx = context.RequestContext()
    tensors = provider.list_tensors(ctx, experiment_id="", plugin_name=fmt.PLUGIN_NAME)
    scalars = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")
    _check(tensors, scalars)
    read = provider.read_tensors(ctx, experiment_id="", plugin_name=fmt.PLUGIN_NAME, downsample=100,
                                 run_tag_filter=None)
    datum = read["run_a"][fmt.tag_for("grad_norm")][-1]
    assert datum.step == 4
    np.testing.assert_array_equal(datum.numpy, [4.0, 8.0])


def test_rust_data_server_lists_our_tensors(tmp_path):
    _write(tmp_path)
    ingester = server_ingester.SubprocessServerDataIngester(
        server_binary=server_ingester.get_server_binary(),
        logdir=str(tmp_path),
        reload_interval=1,
        channel_creds_type=grpc_util.ChannelCredsType.LOCAL,
    )
    ingester.start()
    try:
        provider = ingester.data_provider
        ctx = context.RequestContext()
        deadline = time.monotonic() + 60
        tensors: dict = {}
        while time.monotonic() < deadline:
            tensors = provider.list_tensors(ctx, experiment_id="", plugin_name=fmt.PLUGIN_NAME)
            scalars = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")
            if tensors.get("run_a") and scalars.get("run_a"):
                break
            time.sleep(0.5)
        _check(tensors, scalars)
    finally:
        # The server runs with --die-after-stdin: closing the pipe TensorBoard keeps open for it stops it.
        ingester._stdin_handle.close()
