"""Learning the architecture while training: gates, Generalized Dropout, sparse weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_json, run_cli

from compactdeploy.data import fit_to_model, load_dataset
from compactdeploy.learn import ArchConfig, ArchLearner
from compactdeploy.train import train
from compactdeploy.zoo import create_model, load_model


def _digits_model(name="lenet300"):
    data = load_dataset("digits")
    model = load_model(name, data)
    x = torch.from_numpy(fit_to_model(data, data.x_test, model.input_shape[1:]))
    return data, model, x


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "mlp-tabular"])
def test_gates_all_forced_to_one_reproduce_the_ungated_network_exactly(name):
    model = create_model(name)
    x = torch.randn(16, *model.input_shape[1:], generator=torch.Generator().manual_seed(0))
    expected = model.module(x)
    learner = ArchLearner(model.module, x[:1], ArchConfig("gates"))
    assert learner.groups, "nothing was gated"
    with torch.no_grad():
        for gated in learner.groups:
            gated.gate.fill_(1.0)
            if gated.depth is not None:
                gated.depth.fill_(0.0)
    model.module.eval()
    assert torch.equal(model.module(x), expected)


@pytest.mark.parametrize(
    ("method", "strength"),
    [("gates", 0.01), ("gdropout", 3.0), ("sparse", 1e-3)],
)
def test_a_trained_gated_model_and_its_physically_pruned_form_agree(method, strength):
    data, model, x = _digits_model()
    learner = ArchLearner(model.module, x[:1], ArchConfig(method, strength=strength))
    result = train(model, data, 6, learner=learner)
    model.module.eval()
    with torch.no_grad():
        gated = model.module(x)
    summary = learner.summary()
    learner.finalize()
    model.module.eval()
    with torch.no_grad():
        assert (model.module(x) - gated).abs().max() <= 1e-5
    assert result.test_accuracy > 0.8
    if method == "sparse":
        assert summary["sparsity"] > 0.5
        zeros = sum(int((m.weight == 0).sum()) for m in model.module.modules() if isinstance(m, torch.nn.Linear))
        assert zeros >= summary["weights"] - summary["weights_kept"]
    else:
        assert any(layer["kept"] < layer["width"] for layer in summary["layers"].values())
        params = sum(p.numel() for p in model.module.parameters())
        assert params < 784 * 300 + 300 * 100 + 100 * 10  # really smaller (narrower, or merged)


def test_layers_learnt_linear_are_merged_into_the_next_exactly():
    data, model, x = _digits_model()
    learner = ArchLearner(model.module, x[:1], ArchConfig("gates", strength=0.01))
    train(model, data, 10, learner=learner)
    model.module.eval()
    with torch.no_grad():
        gated = model.module(x)
    learner.finalize()
    assert learner.linearized and learner.merged
    linears = [m for m in model.module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 - len(learner.merged)
    with torch.no_grad():
        assert (model.module(x) - gated).abs().max() <= 1e-4 * gated.abs().max()


@pytest.mark.parametrize("method", ["gates", "gdropout", "sparse"])
def test_every_learned_model_builds_exports_and_compiles(method, tmp_path):
    checkpoint = tmp_path / f"{method}.pt"
    strength = {"gates": "0.01", "gdropout": "3", "sparse": "0.001"}[method]
    assert run_cli("train", "--model", "lenet300", "--data", "digits", "--epochs", "4", "--learn-arch", method,
                   "--arch-strength", strength, "--out", checkpoint) == 0
    out = tmp_path / "build"
    assert run_cli("build", "--model", "lenet300", "--weights", checkpoint, "--data", "digits", "--target", "host",
                   "--repeat", "5", "--out", out) == 0
    report = read_json(out / "report.json")
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4
    assert report["accuracy"]["before"] > 0.8


def test_shared_relu_modules_get_width_gates_but_no_depth_gate():
    model = create_model("resnet20")  # each block calls one nn.ReLU twice
    learner = ArchLearner(model.module, torch.randn(*model.input_shape), ArchConfig("gates"))
    assert learner.groups and all(g.depth is None for g in learner.groups)
    assert learner.skipped  # the residual streams are not gated, and the summary says why


def test_unknown_learning_method_is_refused(capsys, tmp_path):
    assert run_cli("train", "--model", "lenet300", "--data", "digits", "--learn-arch", "magic", "--out", tmp_path / "x") == 2
    assert "magic" in capsys.readouterr().err


def test_gates_at_their_default_strength_give_lenet5_a_useful_narrower_model(tmp_path, capsys):
    # at the former default (0.01) every layer of LeNet-5 closed to one unit: 7.8 % on digits, no warning
    checkpoint = tmp_path / "gates.pt"
    assert run_cli("train", "--model", "lenet5", "--data", "digits", "--learn-arch", "gates", "--out", checkpoint) == 0
    payload = torch.load(checkpoint, weights_only=True)
    learned = json.loads(payload["prune_summary"])
    assert learned["test_accuracy"] >= 0.9 and learned["strength"] == 0.002 and learned["stopped"] is None
    assert all(layer["kept"] >= 1 for layer in learned["layers"].values())
    assert any(layer["kept"] < layer["width"] for layer in learned["layers"].values())
    out = tmp_path / "build"
    assert run_cli("build", "--model", "lenet5", "--weights", checkpoint, "--target", "host", "--repeat", "5",
                   "--out", out) == 0
    # the build says where its widths came from
    assert read_json(out / "report.json")["model"]["weights"]["narrowed_by"]["layers"] == learned["layers"]
    assert "narrowed by gates in training" in capsys.readouterr().out


def test_gates_that_close_the_network_are_refused_and_write_nothing(tmp_path, capsys):
    checkpoint = tmp_path / "gates.pt"
    assert run_cli("train", "--model", "lenet5", "--data", "digits", "--learn-arch", "gates", "--arch-strength", "0.01",
                   "--out", checkpoint) == 2
    err = capsys.readouterr().err
    assert "left the network at chance" in err and "lower --arch-strength (now 0.01)" in err
    assert not checkpoint.exists()


def test_a_collapse_during_training_stops_and_keeps_the_last_good_epoch():
    data, model, _ = _digits_model("lenet300")
    learner = ArchLearner(model.module, torch.from_numpy(fit_to_model(data, data.x_train[:1], model.input_shape[1:])),
                          ArchConfig("gates", strength=0.002))
    penalty, calls = learner.penalty, []

    def closing_after_two_epochs(size):  # from epoch 3 on, a penalty that shuts every gate it can
        calls.append(1)
        if len(calls) <= 2 * -(-len(data.x_train) // 64):
            return penalty(size)
        return 100.0 * sum(g.gate.sum() for g in learner.groups)

    learner.penalty = closing_after_two_epochs
    result = train(model, data, 6, learner=learner)
    assert result.stopped and "collapsed in epoch 3" in result.stopped and "kept epoch 2" in result.stopped
    assert result.test_accuracy > 0.8  # the restored epoch, not the collapsed one
    assert all(bool((g.gate >= 0.5).any()) for g in learner.groups)  # never every unit of a layer closed
