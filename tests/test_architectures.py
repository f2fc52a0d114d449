"""Constructs users deploy that the zoo does not have: narrowed where compactdeploy can, refused in one
line naming the layer and the way out where it cannot (tests/architectures.py holds the models)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from architectures import (AudioConv1d, DenseBlock, GroupedBottleneck, HandWrittenAttention, InputResidualConv,
                           InputStreamEncoder,
                           MBConvSE, MobileNetV3Block, ShuffleNetV2, ShuffleUnit, TinyEncoder)
from conftest import read_json, run_cli
from torch import nn

from compactdeploy.errors import CompactDeployError
from compactdeploy.prune import METHODS, Calibration, PruneSpec, prune

ACTIVATIONS = [nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, lambda: nn.LeakyReLU(0.1), nn.Sigmoid, nn.Tanh,
               nn.ELU, nn.Mish, nn.Softplus, nn.ReLU6]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: type(a()).__name__)
def test_data_free_merges_planted_duplicates_exactly_through_every_elementwise_activation(activation):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 8), activation(), nn.Linear(8, 4)).eval()
    with torch.no_grad():  # neurons 5 and 7 copy 0 and 2: equal inputs, equal outputs through any of them
        for duplicate, original in [(5, 0), (7, 2)]:
            net[0].weight[duplicate] = net[0].weight[original]
            net[0].bias[duplicate] = net[0].bias[original]
    x = torch.randn(200, 10)
    expected = net(x)
    result = prune(net, x[:1], PruneSpec("data-free", None), widths={"0": 6})
    assert result.groups["0"]["method"] == "data-free"  # not an l1 fallback
    assert net[0].out_features == 6 and net[2].in_features == 6
    assert ((net(x) - expected).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.parametrize("new_first", [False, True])
def test_data_free_merges_planted_duplicates_exactly_behind_dense_concatenations(new_first):
    # conv1 narrows before the stem: with its new channels first, the stem's channels move in both
    # concatenations, and the stem's view must be read again (it indexed past the end before)
    torch.manual_seed(0)
    net = DenseBlock(new_first=new_first).eval()
    with torch.no_grad():  # batch norms at their defaults treat every channel alike
        net.conv1.weight[4], net.conv1.bias[4] = net.conv1.weight[0], net.conv1.bias[0]
        net.stem.weight[6], net.stem.bias[6] = net.stem.weight[2], net.stem.bias[2]
    x = torch.randn(16, 3, 8, 8)
    expected = net(x)
    result = prune(net, x[:1], PruneSpec("data-free", None), widths={"conv1": 5, "stem": 7})
    assert {name: g["method"] for name, g in result.groups.items()} == {"conv1": "data-free", "stem": "data-free"}
    assert net.stem.out_channels == 7 and net.conv1.out_channels == 5 and net.bn2.num_features == 18
    assert ((net(x) - expected).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_narrows_dense_squeeze_excitation_mobilenetv3_and_1d_blocks(method):
    rng = np.random.default_rng(0)
    calibration = Calibration(rng.standard_normal((32, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, 32))
    x = torch.randn(2, 3, 8, 8)
    for net in (DenseBlock(new_first=True).eval(), MBConvSE().eval(), MobileNetV3Block().eval()):
        result = prune(net, x[:1], PruneSpec(method, 0.5), calibration=calibration)
        assert result.params_after < result.params_before and net(x).shape == (2, 10)
    signals = Calibration(rng.standard_normal((32, 1, 40)).astype(np.float32), rng.integers(0, 10, 32))
    net = AudioConv1d().eval()
    result = prune(net, torch.randn(1, 1, 40), PruneSpec(method, 0.5), calibration=signals)
    assert net.conv1.out_channels == 8 and net.conv2.in_channels == 8 and net(torch.randn(2, 1, 40)).shape == (2, 10)


def test_the_random_method_takes_the_seed():
    def plan(seed: int) -> dict:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
        return prune(net, torch.randn(1, 10), PruneSpec("random", 0.5), seed=seed).plan

    assert plan(3) == plan(3)
    assert plan(3) != plan(4)


@pytest.mark.parametrize("widths", [{"reduce": 16, "grouped": 16}, {"reduce": 24}, {"grouped": 8}])
def test_a_grouped_convolution_loses_the_same_positions_in_every_group_exactly(widths):
    # l1 used to move channels between the convolution's groups without a word; data-free crashed
    torch.manual_seed(0)
    net = GroupedBottleneck().eval()
    silenced = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8)
    result = prune(net, x[:1], PruneSpec("l1", None), widths=widths)
    assert net.grouped.groups == 4 and {name: g["after"] for name, g in result.groups.items()} == widths
    for name, removed in result.plan.items():
        positions = [{c % (32 // 4) for c in removed if c // (32 // 4) == block} for block in range(4)]
        assert all(p == positions[0] for p in positions)  # the same positions in every group
        assert "the same positions in every group" in result.groups[name]["grouped"]
        with torch.no_grad():  # what narrowing must equal: the removed channels silenced (ReLU(0) = 0)
            layer = dict(silenced.named_modules())[name]
            layer.weight[removed], layer.bias[removed] = 0.0, 0.0
    assert (net(x) - silenced(x)).abs().max() <= 1e-5


def test_data_free_on_a_grouped_convolution_chooses_by_l1_and_says_why():
    net = GroupedBottleneck().eval()
    result = prune(net, torch.randn(1, 3, 8, 8), PruneSpec("data-free", 0.5))
    assert result.groups["grouped"]["method"] == "l1 (fallback: data-free does not merge across groups)"
    assert net.grouped.in_channels == net.grouped.out_channels == 16 and net.grouped.groups == 4


def test_a_channel_shuffle_keeps_the_widths_it_interleaves_and_the_branch_inside_narrows_exactly():
    # removing pw1's channels equals silencing them (their row, their depthwise filter): the shuffle's
    # own widths (the stem's and pw2's) stay, and the report says why
    torch.manual_seed(0)
    net = ShuffleUnit().eval()
    x = torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(net)
    result = prune(net, x[:1], PruneSpec("l1", 0.5))
    assert net.pw1.out_channels == net.dw.out_channels == net.pw2.in_channels == 4 and net.dw.groups == 4
    assert net.stem.out_channels == 16 and net.pw2.out_channels == 8 and net.head.in_features == 16
    assert set(result.fixed) == {"pw2"} and "channel shuffle" in result.fixed["pw2"]
    with torch.no_grad():
        (removed,) = result.plan.values()  # pw1 -> dw -> pw2's input: one group
        for c in removed:
            reference.pw1.weight[c], reference.pw1.bias[c] = 0.0, 0.0
            reference.dw.weight[c], reference.dw.bias[c] = 0.0, 0.0
    expected = reference(x)
    assert ((net(x) - expected).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.parametrize("method", ["l1", "data-free"])
def test_shufflenetv2_units_narrow_inside_their_branches_and_keep_their_shuffled_widths(method):
    # torch-pruning alone divided by zero while tracing torchvision's shuffle (ZeroDivisionError)
    net = ShuffleNetV2().eval()
    x = torch.randn(2, 3, 16, 16)
    result = prune(net, x[:1], PruneSpec(method, 0.5))
    assert all("channel shuffle" in why for why in result.fixed.values()) and result.fixed
    assert net.conv1[0].out_channels == 8 and net.conv5[0].out_channels == 32
    for unit in net.stage2:
        assert unit.branch2[0][0].out_channels == unit.branch2[1][0].groups == unit.branch2[2][0].in_channels == 8
        assert unit.branch2[2][0].out_channels == 16  # half of the unit's shuffled width
    assert net(x).shape == (2, 10)


def test_data_free_merges_planted_duplicates_exactly_through_a_depthwise_convolution_and_a_gate():
    torch.manual_seed(0)
    net = MBConvSE().eval()
    with torch.no_grad():  # channel 11 copies channel 3 everywhere: expansion, norm, depthwise filter, gate row
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        for tensor in (net.expand.weight, net.expand.bias, net.bn.running_mean, net.bn.running_var, net.bn.weight,
                       net.bn.bias, net.dw.weight, net.dw.bias, net.se_expand.weight, net.se_expand.bias):
            tensor[11] = tensor[3]
    x = torch.randn(8, 3, 8, 8)
    expected = net(x)
    result = prune(net, x[:1], PruneSpec("data-free", None), widths={"se_expand": 31})
    assert result.groups["se_expand"]["method"] == "data-free" and result.plan == {"se_expand": [11]}
    assert net.dw.out_channels == 31 and net.se_expand.out_channels == 31 and net.project.in_channels == 31
    assert ((net(x) - expected).abs().max() / expected.abs().max()) <= 1e-5
    # the residual stream still falls back, and says why
    halved = prune(MBConvSE().eval(), x[:1], PruneSpec("data-free", 0.5))
    assert "residual" in halved.groups["project"]["method"] and halved.groups["se_reduce"]["method"] == "data-free"


def test_data_free_merges_planted_duplicates_exactly_in_a_mobilenetv3_block_and_a_1d_net():
    torch.manual_seed(0)
    net = MobileNetV3Block().eval()
    with torch.no_grad():  # channel 40 copies 7 through Hardswish, the depthwise filter and the hard-sigmoid gate
        for norm in (net.bn1, net.bn2):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
        for tensor in (net.expand.weight, net.expand.bias, net.dw.weight, net.dw.bias, net.se_expand.weight,
                       net.se_expand.bias, *(getattr(n, a) for n in (net.bn1, net.bn2)
                                              for a in ("running_mean", "running_var", "weight", "bias"))):
            tensor[40] = tensor[7]
    x = torch.randn(8, 3, 8, 8)
    expected = net(x)
    result = prune(net, x[:1], PruneSpec("data-free", None), widths={"se_expand": 47})
    assert result.groups["se_expand"]["method"] == "data-free" and result.plan == {"se_expand": [40]}
    assert ((net(x) - expected).abs().max() / expected.abs().max()) <= 1e-5

    signal = AudioConv1d().eval()
    with torch.no_grad():  # filter 9 copies filter 3, batch norm included (at its defaults)
        signal.conv1.weight[9], signal.conv1.bias[9] = signal.conv1.weight[3], signal.conv1.bias[3]
    x = torch.randn(8, 1, 40)
    expected = signal(x)
    result = prune(signal, x[:1], PruneSpec("data-free", None), widths={"conv1": 15})
    assert result.plan == {"conv1": [9]} and ((signal(x) - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_the_cli_refuses_a_width_that_does_not_divide_among_the_groups(tmp_path, capsys):
    status = run_cli("prune", "--model", "tests/architectures.py:GroupedBottleneck", "--input-shape", "3,8,8",
                     "--prune", "l1", "--widths", "reduce=30", "--out", tmp_path / "pruned.pt")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1] == (
        "error: --widths reduce=30: its channels feed 4 groups (groups split channels evenly); give a multiple of 4")
    assert not (tmp_path / "pruned.pt").exists()


@pytest.mark.parametrize("model, args", [
    ("DenseBlock", ["--model-arg", "new_first=true", "--prune", "data-free", "--widths", "stem=5,conv1=4,conv2=3"]),
    ("MBConvSE", ["--prune", "data-free:0.5"]),
    ("GroupedBottleneck", ["--prune", "l1:0.5"]),
    ("TinyEncoder", ["--input-shape", "5,8", "--prune", "l1:0.5"]),
    ("MobileNetV3Block", ["--prune", "data-free:0.5"]),
    ("AudioConv1d", ["--input-shape", "1,40", "--prune", "l1:0.5"]),
    ("InputStreamEncoder", ["--input-shape", "5,16", "--prune", "data-free:0.5"]),
    ("ShuffleNetV2", ["--input-shape", "3,16,16", "--prune", "l1:0.5"]),
    ("HandWrittenAttention", ["--input-shape", "5,8", "--prune", "data-free:0.5"]),
], ids=["dense-block", "mbconv-se", "grouped", "transformer", "mobilenetv3-block", "conv1d", "input-stream",
        "shufflenetv2", "qkv-reshape"])
def test_narrowed_constructs_export_compile_and_match_onnxruntime(model, args, tmp_path):
    out = tmp_path / model
    shape = [] if "--input-shape" in args else ["--input-shape", "3,8,8"]
    assert run_cli("build", "--model", f"tests/architectures.py:{model}", *shape, *args,
                   "--target", "host", "--out", out) == 0
    report = read_json(out / "report.json")
    assert report["model"]["params"] < report["model"]["params_before"]
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4 and report["parity"]["torch_vs_onnx_max_abs"] <= 1e-4


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.project = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.project(x)
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


def test_attention_loses_the_same_channels_in_every_head_and_keeps_its_scale():
    torch.manual_seed(0)
    net = _Attention().eval()
    dead = [3, 6, 9, 14]  # two channels of each 8-channel head write and read nothing
    with torch.no_grad():
        net.project.weight[dead], net.project.bias[dead] = 0.0, 0.0
        for part in range(3):  # their query, key and value rows
            rows = [part * 16 + c for c in dead]
            net.attention.in_proj_weight[rows], net.attention.in_proj_bias[rows] = 0.0, 0.0
        net.attention.out_proj.weight[dead], net.attention.out_proj.bias[dead] = 0.0, 0.0
    x = torch.randn(4, 5, 8)
    expected = net(x)
    result = prune(net, x[:1], PruneSpec("l1", None), widths={"project": 12})
    assert result.plan == {"project": dead} and net.attention.head_dim == 6
    assert "2 channels from each of the 2 heads" in result.groups["project"]["attention"]
    # exact only if the queries were rescaled: the heads are narrower, and q.k is divided by sqrt(head_dim)
    assert ((net(x) - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_a_transformer_is_narrowed_by_whole_heads_and_an_uneven_width_is_refused():
    x = torch.randn(2, 5, 8)
    for method in ("l1", "data-free"):
        net = TinyEncoder().eval()
        result = prune(net, x[:1], PruneSpec(method, 0.5))
        residual = next(name for name, group in result.groups.items() if "attention" in group)
        removed = result.plan[residual]
        assert [sum(1 for c in removed if c // 8 == head) for head in range(4)] == [4, 4, 4, 4]
        assert net.encoder.layers[1].self_attn.head_dim == 4 and net(x).shape == (2, 10)
    with pytest.raises(CompactDeployError, match="feed 4 heads .* give a multiple of 4"):
        prune(TinyEncoder().eval(), x[:1], PruneSpec("l1", None), widths={"encoder.layers.1.linear2": 30})


@pytest.mark.parametrize("method", ["l1", "data-free", "taylor"])
def test_a_residual_stream_that_is_the_model_input_keeps_its_width_and_the_rest_narrows(method):
    # the input's width is the caller's: narrowing the stream crashed the forward pass before
    rng = np.random.default_rng(0)
    for net, x in [(InputStreamEncoder().eval(), torch.randn(2, 5, 16)), (InputResidualConv().eval(), torch.randn(2, 3, 8, 8))]:
        calibration = Calibration(rng.standard_normal((16, *x.shape[1:])).astype(np.float32), rng.integers(0, 10, 16))
        result = prune(net, x[:1], PruneSpec(method, 0.5), calibration=calibration)
        if isinstance(net, InputStreamEncoder):
            assert list(result.fixed) == ["blocks.1.fc2"]  # the stream's group, named by its last layer
            assert net.blocks[1].ln2.normalized_shape == (16,) and net.blocks[0].fc1.out_features == 16
            assert net.blocks[1].fc1.out_features == 16
        else:
            assert list(result.fixed) == ["conv2"] and net.conv2.out_channels == 3 and net.conv1.out_channels == 8
            assert net.stem.out_channels == 8
        assert "model's input" in next(iter(result.fixed.values()))
        assert net(x).shape == (2, 10)


def test_a_width_for_a_layer_on_the_input_stream_is_refused_in_one_line():
    with pytest.raises(CompactDeployError, match=r"layer 'conv2' cannot be given a width: its channels are added "
                                                 r"to the model's input"):
        prune(InputResidualConv().eval(), torch.randn(1, 3, 8, 8), PruneSpec("l1", None), widths={"conv2": 2})


@pytest.mark.parametrize("method", ["l1", "data-free"])
def test_channels_the_models_own_code_reshapes_into_heads_keep_their_width_and_the_mlp_narrows(method):
    # narrowing the stream (named by fc2) or qkv alone breaks qkv.reshape(n, t, 3, heads, c // heads): each is tried on
    # a copy first, kept, and said why; a refusal (and two reruns with --exclude) before
    net = HandWrittenAttention().eval()
    x = torch.randn(2, 5, 8)
    result = prune(net, x[:1], PruneSpec(method, 0.5))
    assert set(result.fixed) == {"fc2", "qkv"} and all("breaks the model's forward" in w for w in result.fixed.values())
    assert net.fc1.out_features == 16 and net.qkv.out_features == 48 and net.embed.out_features == 16
    assert net(x).shape == (2, 10)


class _TextOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return {"logits": self.out(self.hidden(x)), "label": "text"}


def test_a_model_torch_pruning_cannot_trace_is_refused_in_one_line_not_an_internal_error():
    with pytest.raises(CompactDeployError) as refused:
        prune(_TextOutput().eval(), torch.randn(1, 4), PruneSpec("l1", 0.5))
    message = str(refused.value)
    assert message.startswith("prune: torch-pruning cannot trace this model's channels (AttributeError")
    assert "must be tensors" in message and "without --prune" in message and "\n" not in message
