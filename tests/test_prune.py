"""Pruning makes layers physically narrower and keeps coupled layers consistent."""

from __future__ import annotations

import pytest
import torch

from compactdeploy.errors import CompactDeployError
from compactdeploy.prune import PruneSpec, layer_widths, parse_prune_spec, prune, replay
from compactdeploy.prune.core import kept_width
from compactdeploy.zoo import create_model

SMALL_ARGS = {
    "lenet300": {},
    "lenet5": {},
    "resnet20": {},
    "mobilenetv2": {"width_mult": 0.5, "input_size": 32, "num_classes": 10},
    "mlp-tabular": {},
}


pytestmark = pytest.mark.unit  # torch only: no compiler, no device


@pytest.mark.parametrize("name", sorted(SMALL_ARGS))
@pytest.mark.parametrize("method", ["l1", "random"])
def test_every_zoo_model_gets_narrower_runs_and_replays(name, method):
    model = create_model(name, SMALL_ARGS[name])
    x = torch.randn(2, *model.input_shape[1:], generator=torch.Generator().manual_seed(1))
    fresh = create_model(name, SMALL_ARGS[name])
    fresh.module.load_state_dict(model.module.state_dict())

    result = prune(model.module, x[:1], PruneSpec(method, 0.5), channel_multiple=4)

    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    narrower = [n for n, w in result.widths_after.items() if w < result.widths_before[n]]
    assert narrower, "no layer got narrower"
    for layer_name, width in result.widths_after.items():
        assert width == result.widths_before[layer_name] or width % 4 == 0
    # the module itself is narrower, not masked
    assert layer_widths(model.module) == result.widths_after
    with torch.no_grad():
        out = model.module(x)
    assert out.shape == (2, fresh.module(x).shape[1])
    # the recorded plan reproduces the pruned model exactly on a fresh copy
    replay(fresh.module, x[:1], result.plan)
    with torch.no_grad():
        assert torch.equal(fresh.module(x), out)


def test_residual_additions_keep_coupled_widths_equal():
    model = create_model("resnet20")
    prune(model.module, torch.randn(*model.input_shape), PruneSpec("l1", 0.5), channel_multiple=4)
    for block in model.module.layers:
        # conv2's output is added to the shortcut's: the two widths must stay equal
        shortcut_width = block.shortcut[0].out_channels if len(block.shortcut) else block.conv1.in_channels
        assert block.conv2.out_channels == shortcut_width


def test_depthwise_convolutions_follow_their_input_width():
    model = create_model("mobilenetv2", SMALL_ARGS["mobilenetv2"])
    prune(model.module, torch.randn(*model.input_shape), PruneSpec("l1", 0.5), channel_multiple=8)
    depthwise = [m for m in model.module.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise
    for conv in depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels


def test_output_layer_and_excluded_layers_keep_their_width():
    model = create_model("lenet5")
    result = prune(model.module, torch.randn(*model.input_shape), PruneSpec("l1", 0.5), 1, exclude=("7",))
    assert result.widths_after["11"] == 10  # the classes
    assert result.widths_after["7"] == 120  # excluded
    assert result.widths_after["9"] == 42


def test_unknown_excluded_layer_is_refused():
    model = create_model("lenet5")
    with pytest.raises(CompactDeployError, match="no layer named 'fc9'"):
        prune(model.module, torch.randn(*model.input_shape), PruneSpec("l1", 0.5), 1, exclude=("fc9",))


@pytest.mark.parametrize(
    ("width", "ratio", "multiple", "kept"),
    [(16, 0.5, 8, 8), (6, 0.5, 4, 4), (6, 0.5, 8, 6), (120, 0.5, 8, 64), (100, 0.99, 4, 4), (300, 0.5, 1, 150)],
)
def test_kept_width_rounds_to_the_target_multiple(width, ratio, multiple, kept):
    assert kept_width(width, ratio, multiple) == kept


@pytest.mark.parametrize("text", ["l1:0", "l1:1", "l1:-0.2", "l1:1.5", "l1:abc", "l1", "magic:0.5"])
def test_bad_prune_specs_are_refused(text):
    with pytest.raises(CompactDeployError):
        parse_prune_spec(text)


def test_replaying_a_plan_on_the_wrong_model_is_refused():
    model = create_model("lenet5")
    with pytest.raises(CompactDeployError, match="does not have"):
        replay(model.module, torch.randn(*model.input_shape), {"layers.0.conv1": [0, 1]})
