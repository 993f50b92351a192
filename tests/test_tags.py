"""Other tools' tags -> our series and per-layer metrics (the table of docs/TAG_MAPPING.md), tag by tag."""

from __future__ import annotations

import pytest

from tb_gradient_plugin.tags import ParamTag, SeriesTag, is_bookkeeping, layer_of, map_tag, tool_hint


@pytest.mark.parametrize(("tag", "expected"), [
    ("train/loss", SeriesTag("loss", 1, None)),
    ("train/grad_norm", SeriesTag("total_grad_norm", 1, "hf_trainer")),
    ("train_loss_step", SeriesTag("loss", 1.5, "lightning")),
    ("train_loss_epoch", SeriesTag("loss_epoch", 2, "lightning")),
    ("grad_2.0_norm/layer1.weight_step", ParamTag("grad_norm", "layer1.weight", "l2", 0, "lightning")),
    ("grad_2.0_norm/layer1.weight", ParamTag("grad_norm", "layer1.weight", "l2", 1, "lightning")),
    ("grad_2.0_norm_total_step", SeriesTag("total_grad_norm", 0.5, "lightning")),
    ("grad_2.0_norm_total_epoch", SeriesTag("total_grad_norm_epoch", 1, "lightning")),
    ("grad_inf_norm/fc.bias", ParamTag("grad_max_abs", "fc.bias", "max", 1, "lightning")),
    ("grads_norm/fc1/weight", ParamTag("grad_norm", "fc1.weight", "l2", 1, "ignite")),
    ("training/grads_norm/fc1/weight", ParamTag("grad_norm", "fc1.weight", "l2", 1, "ignite")),
    ("l2_norm/grad/model.fc.weight", ParamTag("grad_norm", "model.fc.weight", "l2", 1, "composer")),
    ("l2_norm/grad/global", SeriesTag("total_grad_norm", 1, "composer")),
    ("l2_norm_ratio/update_param/fc.weight", ParamTag("update_ratio", "fc.weight", "max", 1, "composer")),
    ("lr-AdamW", SeriesTag("lr", 3, None)),
    ("val/obj_loss", SeriesTag("val_loss", 1, "yolov5", summed=True)),
    ("accuracy", None),
    ("grad_1.0_norm/fc.weight", None),
])
def test_map_tag(tag, expected):
    assert map_tag(tag) == expected


def test_validation_role_and_layer_of():
    assert map_tag("epoch_loss", "validation").series == "val_loss"
    assert map_tag("epoch_loss").series == "loss"
    assert layer_of("layer1.weight") == "layer1"
    assert layer_of("encoder.layers.3.mlp.fc1.bias") == "encoder.layers.3.mlp.fc1"
    assert layer_of("cls_token") == "cls_token"
    assert layer_of("encoder.layers.3") == "encoder.layers.3"


@pytest.mark.parametrize(("tag", "bookkeeping"), [
    ("epoch", True), ("trainer/global_step", True), ("_hparams_/session_start_info", True),
    ("notes/text_summary", True), ("keras", True), ("accuracy", False), ("train/epoch_time", False),
])
def test_bookkeeping_tags_are_recognised_not_unknown(tag, bookkeeping):
    assert is_bookkeeping(tag) is bookkeeping


@pytest.mark.parametrize(("tag", "tool"), [
    ("hp_metric", "lightning"),
    ("metrics/mAP_0.5_custom", "yolov5"),
    ("train/total_flos", "hf_trainer"),
    ("evaluation_auc_vs_iterations", "keras"),
    ("epoch_auc", "keras"),
    ("accuracy", None),
])
def test_tool_hints_of_tags_that_are_not_mapped(tag, tool):
    assert map_tag(tag) is None and tool_hint(tag) == tool
