"""The width search: its model of the widths is exact, and the loop meets budgets measured on devices."""

from __future__ import annotations

import random

import pytest
import torch

from compactdeploy.errors import CompactDeployError
from compactdeploy.fit import parse_latency_budget, parse_memory_budget
from compactdeploy.fit.allocate import width_space
from compactdeploy.fit.costs import candidate_widths, signature_of
from compactdeploy.prune import PruneSpec, prune
from compactdeploy.zoo import create_model

from conftest import needs_emulator, read_json, run_cli


def test_budgets_parse_and_bad_ones_are_refused():
    assert parse_latency_budget("8ms").value == 8.0
    assert parse_latency_budget("800us").value == pytest.approx(0.8)
    assert parse_latency_budget("0.5s").value == 500.0
    assert parse_latency_budget("60%").share == pytest.approx(0.6)
    assert parse_memory_budget("40MB").value == 40e6
    assert parse_memory_budget("512KiB").value == 512 * 1024
    for bad in ("8", "fast", "-1ms", "0ms"):
        with pytest.raises(CompactDeployError, match="latency-budget"):
            parse_latency_budget(bad)
    with pytest.raises(CompactDeployError, match="memory-budget"):
        parse_memory_budget("40 parsecs")


def test_candidate_widths_are_multiples_and_include_the_full_width():
    assert candidate_widths(16, 8, 8) == [8, 16]
    assert candidate_widths(6, 8, 8) == [6]
    widths = candidate_widths(1280, 8, 8)
    assert widths[-1] == 1280 and len(widths) <= 9 and all(w % 8 == 0 for w in widths)


def _real_signatures(module, example):
    shapes = {}

    def record(layer, args):
        shapes.setdefault(layer, tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        module(example)
    for hook in hooks:
        hook.remove()
    names = {m: n for n, m in module.named_modules()}
    return {names[m]: signature_of(m, s) for m, s in shapes.items()}


@pytest.mark.parametrize(
    "name,args", [("lenet5", {}), ("resnet20", {}), ("mobilenetv2", {"width_mult": 0.35, "input_size": 32})]
)
def test_width_space_predicts_the_pruned_layers_and_parameters(name, args):
    """The search's model of the widths (residual sums, depthwise convs, flattens) is what pruning makes."""
    model = create_model(name, args)
    example = torch.randn(*model.input_shape)
    space = width_space(model.module, example, (), 4, 4)
    assert _real_signatures(model.module, example) == {layer.name: sig for layer, sig in zip(space.layers, space.signatures(space.full))}
    rng = random.Random(0)
    widths = {g: rng.choice(c) for g, c in space.candidates.items()}
    changed = {g: w for g, w in widths.items() if w != space.full[g]}
    assert changed, "the draw should narrow some group"
    prune(model.module, example, PruneSpec("l1", None), 4, widths=changed)
    pruned = _real_signatures(model.module, example)
    assert pruned == {layer.name: sig for layer, sig in zip(space.layers, space.signatures(widths))}
    assert space.params(widths) == sum(p.numel() for p in model.module.parameters())


def test_search_meets_a_latency_budget_on_this_host(tmp_path, lenet5_checkpoint):
    """The loop against this machine as the device: real measurements, a small model, 60 % of its latency."""
    out = tmp_path / "fit"
    assert run_cli(
        "build", "--model", "lenet5", "--weights", lenet5_checkpoint, "--data", "digits", "--target", "host",
        "--latency-budget", "60%", "--finetune-epochs", "1", "--repeat", "50", "--out", out,
    ) == 0
    report = read_json(out / "report.json")
    fit = report["fit"]
    budget = fit["budget"]["latency_ms"]
    unpruned = fit["verified"][0]
    assert budget == pytest.approx(0.6 * unpruned["measured_ms"])
    assert fit["chosen"]["measured_ms"] <= budget
    assert "measured on real hardware" in fit["chosen"]["where"]
    # the build is the chosen model: narrower where the search said, and fine-tuned
    for group, width in fit["widths"].items():
        assert report["model"]["widths"][group]["after"] == width["after"] <= width["before"]
    assert any(w["after"] < w["before"] for w in fit["widths"].values())
    assert report["accuracy"]["finetune_epochs"] == 1
    assert fit["latency_table"]["entries"] > 0 and fit["predictor_error_pct"]["count"] >= 1
    manifest = read_json(out / "manifest.json")
    for plot in fit["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot in manifest["files"]

    # a second search on the same device measures nothing new: the table and, resumed, the models are reused
    again = tmp_path / "again"
    assert run_cli(
        "build", "--model", "lenet5", "--weights", lenet5_checkpoint, "--data", "digits", "--target", "host",
        "--latency-budget", "60%", "--repeat", "50", "--resume", "--out", again,
    ) == 0
    second = read_json(again / "report.json")["fit"]
    assert second["latency_table"]["measured_this_run"] == 0
    assert [c["build"] for c in second["verified"][: len(fit["verified"])]] == [c["build"] for c in fit["verified"]]


def test_impossible_and_memory_budgets_fail_in_one_line(tmp_path, lenet5_checkpoint, capsys):
    common = ("--model", "lenet5", "--weights", lenet5_checkpoint, "--data", "digits", "--target", "host", "--repeat", "20")
    out = tmp_path / "never"
    assert run_cli("build", *common, "--memory-budget", "1KB", "--out", out) == 2
    error = capsys.readouterr().err.strip()
    assert "smaller than the weights of the smallest model" in error and len(error.splitlines()) == 1
    assert run_cli("build", *common, "--latency-budget", "1us", "--out", out) == 2
    error = capsys.readouterr().err.strip()
    assert "no model in the search space meets latency 1us" in error and "measured" in error
    assert len(error.splitlines()) == 1
    assert not out.exists()
    assert run_cli("build", *common, "--latency-budget", "1ms", "--prune", "l1:0.5", "--out", out) == 2
    assert "names only the method" in capsys.readouterr().err
    assert run_cli("build", "--model", "lenet5", "--target", "rpi4", "--latency-budget", "1ms", "--out", out) == 2
    assert "pass --device" in capsys.readouterr().err


def test_a_device_lost_mid_search_keeps_the_measurements_and_resumes(tmp_path, lenet5_checkpoint):
    from compactdeploy.device import local_agent
    from compactdeploy.pipeline import BuildConfig, build

    class KillOnSecondModel:
        def __init__(self, agent):
            self.agent = agent

        def started(self, stage):
            pass

        def progress(self, stage, message):
            if message.startswith("model 2 "):
                self.agent.stop()

        def finished(self, stage, seconds, summary):
            pass

    def config(device, resume):
        return BuildConfig(
            model="lenet5", weights=lenet5_checkpoint, data="digits", target="host", out=tmp_path / "fit",
            latency_budget="75%", repeat=20, device=str(device), resume=resume, seed=1,
        )

    with local_agent() as agent:
        with pytest.raises(CompactDeployError, match="--resume") as lost:
            build(config(agent.address, False), KillOnSecondModel(agent))
    assert f"127.0.0.1:{agent.port}" in str(lost.value) and not (tmp_path / "fit").exists()
    with local_agent() as second:  # the same machine on another port: the same device
        messages = []

        class Record(KillOnSecondModel):
            def progress(self, stage, message):
                messages.append(message)

        result = build(config(second.address, True), Record(second))
    fit = result.report["fit"]
    assert fit["chosen"]["measured_ms"] <= fit["budget"]["latency_ms"]
    assert not any(m.startswith("model 1 ") for m in messages), "the unpruned model measured before was rebuilt"
    assert fit["latency_table"]["measured_this_run"] < fit["latency_table"]["entries"]


@needs_emulator
def test_search_runs_against_the_emulated_pi(tmp_path, emulated_pi, lenet5_checkpoint):
    out = tmp_path / "fit-pi"
    assert run_cli(
        "build", "--model", "lenet5", "--weights", lenet5_checkpoint, "--target", "rpi4",
        "--device", str(emulated_pi.address), "--latency-budget", "70%", "--fit-rounds", "3", "--fit-points", "4",
        "--repeat", "20", "--out", out,
    ) == 0
    fit = read_json(out / "report.json")["fit"]
    assert all("EMULATED" in c["where"] for c in fit["verified"])
    assert fit["chosen"]["measured_ms"] <= fit["budget"]["latency_ms"]
    assert fit["latency_table"]["path"].split("/")[-1].startswith("rpi4-")
