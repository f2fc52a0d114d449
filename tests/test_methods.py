"""The research pruning methods: exact where the papers say so, narrower everywhere, and deployable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_json, run_cli
from torch import nn

from compactdeploy.errors import CompactDeployError
from compactdeploy.prune import METHODS, Calibration, PruneSpec, layer_widths, parse_prune_spec, prune
from compactdeploy.prune.methods import knee
from compactdeploy.zoo import create_model


def _calibration(shape, n=64, classes=10, seed=0) -> Calibration:
    rng = np.random.default_rng(seed)
    return Calibration(rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, classes, n))


def test_data_free_removes_planted_duplicate_neurons_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():  # neurons 5, 6, 7 are positive multiples of 0, 1, 2 (ReLU is homogeneous)
        for copy, original, scale in [(5, 0, 1.0), (6, 1, 2.5), (7, 2, 0.3)]:
            net[0].weight[copy] = scale * net[0].weight[original]
            net[0].bias[copy] = scale * net[0].bias[original]
    x = torch.randn(200, 10)
    expected = net(x)
    result = prune(net, x[:1], PruneSpec("data-free", None), widths={"0": 5})
    assert net[0].out_features == 5 and net[2].in_features == 5
    assert result.groups["0"]["method"] == "data-free"
    assert (net(x) - expected).abs().max() <= 1e-5


def test_data_free_removes_planted_duplicate_filters_through_batchnorm_pool_and_flatten():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 3 * 3, 5)
    ).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
        for name in ("weight", "bias"):  # filter 4 duplicates filter 1, batch-norm included
            getattr(net[0], name)[4] = getattr(net[0], name)[1]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(net[1], name)[4] = getattr(net[1], name)[1]
    x = torch.randn(32, 3, 8, 8)
    expected = net(x)
    prune(net, x[:1], PruneSpec("data-free", None), widths={"0": 5})
    assert net[0].out_channels == 5 and net[5].in_features == 5 * 9
    assert (net(x) - expected).abs().max() <= 1e-5


def test_data_free_removes_planted_duplicate_conv_filters_feeding_a_conv():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        net[0].weight[6] = 3.0 * net[0].weight[2]
        net[0].bias[6] = 3.0 * net[0].bias[2]
    x = torch.randn(16, 2, 6, 6)
    expected = net(x)
    prune(net, x[:1], PruneSpec("data-free", None), widths={"0": 7})
    assert net[2].in_channels == 7
    assert (net(x) - expected).abs().max() <= 1e-5


def test_noiseout_removes_planted_affine_dependent_neurons_exactly():
    torch.manual_seed(3)
    relu_net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        relu_net[0].weight[5] = 2 * relu_net[0].weight[0]  # h5 = 2 h0 after ReLU
        relu_net[0].bias[5] = 2 * relu_net[0].bias[0]
        relu_net[0].weight[6] = 0  # h6 = 1.3 always: predicted by its mean
        relu_net[0].bias[6] = 1.3
    linear_net = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 4)).eval()  # a linear bottleneck
    with torch.no_grad():
        linear_net[0].weight[5] = -1.5 * linear_net[0].weight[2]  # h5 = -1.5 h2 + 0.4
        linear_net[0].bias[5] = -1.5 * linear_net[0].bias[2] + 0.4
    x = torch.randn(256, 10)
    data = Calibration(x.numpy(), np.zeros(256, dtype=np.int64))
    for net, kept in ((relu_net, 6), (linear_net, 7)):
        expected = net(x)
        result = prune(net, x[:1], PruneSpec("noiseout", None), widths={"0": kept}, calibration=data)
        assert result.groups["0"]["method"] == "noiseout"
        assert net[0].out_features == kept
        assert (net(x) - expected).abs().max() <= 1e-5


SMALL = {"resnet20": {}, "mobilenetv2": {"width_mult": 0.5, "input_size": 32, "num_classes": 10}}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_method_narrows_resnet20_and_mobilenetv2_which_export_and_compile(name, method, tmp_path):
    from compactdeploy.compile import compile_onnx, resolve_linker
    from compactdeploy.export import export_onnx
    from compactdeploy.targets import load_target

    model = create_model(name, SMALL[name])
    x = torch.randn(*model.input_shape, generator=torch.Generator().manual_seed(0))
    data = _calibration(model.input_shape[1:], n=32)
    result = prune(model.module, x, PruneSpec(method, 0.5), channel_multiple=4, calibration=data)
    narrower = [n for n, w in result.widths_after.items() if w < result.widths_before[n]]
    assert len(narrower) >= len(result.widths_before) // 2
    assert layer_widths(model.module) == result.widths_after
    if method in ("data-free", "noiseout"):  # coupled groups fall back to l1, and say so
        assert any(g["method"] == method for g in result.groups.values())
        assert any(g["method"].startswith("l1 (fallback") for g in result.groups.values())
    exported = export_onnx(model.module, x, tmp_path / "model.onnx")
    assert exported.torch_vs_onnx_max_abs <= 1e-4
    target = load_target("host")
    compiled = compile_onnx(exported.path, target, tmp_path, resolve_linker(target))
    assert compiled.lib_path.stat().st_size > 0


def test_data_free_auto_stops_at_the_knee():
    assert knee([1e-4, 1.1e-4, 1.2e-4, 1.3e-4, 1.4e-4, 1e-1, 1.0]) == 4
    assert knee([1.0, 1.0]) == 0
    model = create_model("lenet300")
    x = torch.randn(*model.input_shape)
    result = prune(model.module, x, parse_prune_spec("data-free:auto"), channel_multiple=4)
    for group in result.groups.values():
        assert 0 < group["after"] <= group["before"] and group["after"] % 4 == 0


def test_data_driven_methods_refuse_to_run_without_data():
    model = create_model("lenet5")
    for method in ("noiseout", "apoz", "obd", "taylor"):
        with pytest.raises(CompactDeployError, match="needs data"):
            prune(model.module, torch.randn(*model.input_shape), PruneSpec(method, 0.5))


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ({"7": 0}, "would remove every channel of 7"),
        ({"fc7": 10}, "does not have"),
        ({"7": 500}, "wider than 7"),
        ({"11": 5}, "cannot be given a width"),
    ],
)
def test_bad_per_layer_widths_are_refused(widths, message):
    model = create_model("lenet5")
    with pytest.raises(CompactDeployError, match=message):
        prune(model.module, torch.randn(*model.input_shape), PruneSpec("l1", None), widths=widths)


def test_cli_refuses_bad_pruning_requests_without_writing(capsys, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--prune", "l1", "--widths", "7=0"], "would remove every channel"),
        (["--prune", "l1", "--widths", "nolayer=3"], "does not have"),
        (["--prune", "taylor:0.5"], "needs data"),
        (["--prune", "l1:auto"], "only data-free"),
        (["--widths", "7=10"], "--widths needs --prune"),
        (["--prune", "l1:0.5", "--noise-outputs", "4", "--data", "digits"], "--noise-outputs belongs to NoiseOut"),
    ]
    for args, message in cases:
        status = run_cli("build", "--model", "lenet5", "--target", "host", *args, "--out", out)
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and message in err[-1], (args, err)
        assert not out.exists()


def test_prune_command_writes_a_checkpoint_that_build_replays(tmp_path, lenet5_checkpoint):
    checkpoint = tmp_path / "pruned.pt"
    assert run_cli(
        "prune", "--model", "lenet5", "--weights", lenet5_checkpoint, "--data", "digits",
        "--prune", "data-free", "--widths", "7=48,9=32", "--out", checkpoint,
    ) == 0
    out = tmp_path / "build"
    assert run_cli("build", "--model", "lenet5", "--weights", checkpoint, "--data", "digits", "--target", "host",
                   "--repeat", "5", "--out", out) == 0
    report = read_json(out / "report.json")
    assert report["model"]["widths"]["7"]["after"] == 48 and report["model"]["widths"]["9"]["after"] == 32
    assert report["accuracy"]["before"] > 0.6  # the merged model, as pruned, without fine-tuning
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4


def test_data_free_beats_l1_at_equal_width_without_finetuning(tmp_path, lenet5_checkpoint, capsys):
    """The papers' point, on the trained LeNet-5: merging keeps more accuracy than dropping."""
    accuracies = {}
    for method in ("data-free", "l1"):
        out = tmp_path / method
        assert run_cli("build", "--model", "lenet5", "--weights", lenet5_checkpoint, "--data", "digits",
                       "--target", "host", "--prune", method, "--widths", "7=32", "--repeat", "5", "--out", out) == 0
        accuracies[method] = read_json(out / "report.json")["accuracy"]["after"]
    assert accuracies["data-free"] > accuracies["l1"]


def test_finetuning_with_distillation_and_noise_outputs_runs_and_keeps_the_classes(tmp_path):
    out = tmp_path / "noise"
    assert run_cli(
        "build", "--model", "lenet300", "--data", "digits", "--target", "host", "--prune", "noiseout:0.5",
        "--noise-outputs", "8", "--noise-epochs", "1", "--finetune-epochs", "1", "--distill", "--repeat", "5",
        "--out", out,
    ) == 0
    report = read_json(out / "report.json")
    assert report["model"]["widths"]["4"] == {"before": 10, "after": 10}  # noise outputs removed again
    assert report["prune"]["noise_outputs"] == 8 and report["prune"]["distill"] is True
    assert report["accuracy"]["after"] > 0.5
