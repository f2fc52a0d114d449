"""`compactdeploy build` end to end: what lands in --out, and whether it is true."""

from __future__ import annotations

import os
import platform

import numpy as np
import onnx
import pytest
import torch
from conftest import read_json

from compactdeploy.runtime import default_threads
from compactdeploy.data import fit_to_model, load_dataset
from compactdeploy.export import run_onnxruntime
from compactdeploy.prune import replay
from compactdeploy.zoo import create_model, file_sha256, load_weights

ELF_MACHINE = {62: "x86_64", 183: "aarch64"}


def elf_machine(path) -> str:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return ELF_MACHINE.get(int.from_bytes(header[18:20], "little"), "other")


BUNDLE_FILES = {"model.onnx", "model.so", "report.json", "kernels.json", "sample_input.npy", "run.py"}


def test_bundle_holds_its_files_with_true_hashes(host_build):
    # host_build is pruned: it holds its width plan
    assert {p.name for p in host_build.iterdir()} == BUNDLE_FILES | {"plan.json", "manifest.json", "SHA256SUMS"}
    manifest = read_json(host_build / "manifest.json")
    assert set(manifest["files"]) == BUNDLE_FILES | {"plan.json"}
    for name, digest in manifest["files"].items():
        assert file_sha256(host_build / name) == digest


def test_report_has_the_documented_keys(host_build):
    report = read_json(host_build / "report.json")
    for key in ("model", "prune", "parity", "target", "latency_ms", "memory", "measured_on", "timings_s",
                "per_layer", "onnxruntime_on_device"):
        assert key in report
    assert set(report["timings_s"]) == {"load", "prune", "export", "compile", "benchmark", "bundle"}
    assert report["prune"]["method"] == "l1" and report["prune"]["ratio"] == 0.5
    assert report["target"]["name"] == "host"
    assert report["measured_on"]["emulated"] is False
    memory = report["memory"]
    assert memory["params_bytes"] > 0 and memory["workspace_bytes"] > 0 and memory["peak_rss_bytes"] > 0


def test_latency_is_a_distribution_over_a_second_of_runs_at_least_the_requested_ones(host_build):
    report = read_json(host_build / "report.json")
    latency = report["latency_ms"]
    assert latency["requested_runs"] == 100 and latency["cut_short"] is None
    # the default --min-time: a fast model gets more runs, until they add up to a second
    assert latency["runs"] > 100 and latency["mean"] * latency["runs"] >= 1000
    assert 0 < latency["min"] <= latency["median"] <= latency["p90"] <= latency["p99"]
    assert latency["std"] >= 0 and latency["cold_first_run"] > 0 and latency["module_load"] > 0
    assert report["figures"]["latency"].startswith("measured on real hardware")
    fingerprint = report["measured_on"]
    assert fingerprint["machine"] == platform.machine() and fingerprint["emulated"] is False
    assert fingerprint["tvm_version"] and fingerprint["cores"] >= 1
    load = fingerprint["load"]  # what else ran while timing, the model's own runs left out
    assert 0 <= load["other_busy"] <= 1 and 0 <= load["steal"] <= 1
    assert load["window_s"] >= 0.4  # a small model's runs are short: the agent waits to fill half a second
    # no --threads: TVM (and onnxruntime beside it) on every physical core, not TVM's x86 default of half
    assert fingerprint["threads"] == os.environ.get("TVM_NUM_THREADS", str(default_threads()))
    # and not pinned to cores, unless the user's TVM_BIND_THREADS=1 asks for TVM's default
    assert fingerprint["threads_pinned"] is (os.environ.get("TVM_BIND_THREADS", "0") == "1")


def test_per_layer_profile_covers_every_kernel(host_build):
    report = read_json(host_build / "report.json")
    profile = report["per_layer"]
    kernels = read_json(host_build / "kernels.json")
    assert {k["kernel"] for k in profile["kernels"]} == {k["name"] for k in kernels}
    assert any("conv2d" in k["kernel"] for k in profile["kernels"])  # fused: fused_conv2d_add_relu
    assert abs(sum(k["share"] for k in profile["kernels"]) - 1) < 1e-6
    # each kernel timed alone: their sum lands near the whole model (noise on a shared 2-core host),
    # which also does the VM's own work, about a microsecond a call (more than a small kernel takes)
    whole = profile["whole_model_median_ms"]
    calls = sum(k["calls"] for k in kernels)
    assert 0 < profile["sum_over_whole"] < 2.0
    assert whole < 2.0 * profile["sum_over_whole"] * whole + 0.002 * calls
    # and each timed inside the model's own runs: every kernel, within the whole model's time and
    # the timing hook's own cost, a few microseconds a call (more than a small kernel takes)
    assert all(k["in_model_ms"] > 0 for k in profile["kernels"])
    assert 0 < profile["in_model_sum_ms"] < 2.0 * profile["whole_model_median_ms"] + 0.005 * calls


def test_kernels_timed_inside_the_model_are_the_model_calls_and_leave_the_vm_as_it_was(host_build):
    import numpy as np
    import tvm
    from tvm import relax

    from compactdeploy.device.agent import time_each_kernel_in_model

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(host_build / "model.so")), tvm.cpu())
    kernels = read_json(host_build / "kernels.json")
    x = tvm.runtime.tensor(np.load(host_build / "sample_input.npy"))
    hooks = []
    set_instrument = vm.set_instrument
    vm.set_instrument = lambda hook: hooks.append(hook) or set_instrument(hook)
    timed = time_each_kernel_in_model(vm, x, 3)
    assert set(timed) == {k["name"] for k in kernels}  # the kernels, not the VM's builtins
    assert all(t > 0 for t in timed.values())
    assert len(hooks) == 2 and hooks[-1] is None  # the hook is taken off again: later runs are not slowed


def test_kernels_can_be_timed_inside_the_model_right_after_a_rerun_of_themselves(host_build):
    """tools/kernel_cache_effect.py's diagnosis: every kernel call (not the VM's builtins) runs once more first."""
    import numpy as np
    import tvm
    from tvm import relax

    from compactdeploy.device.agent import time_each_kernel_in_model

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(host_build / "model.so")), tvm.cpu())
    kernels = read_json(host_build / "kernels.json")
    x = tvm.runtime.tensor(np.load(host_build / "sample_input.npy"))
    expected = vm["main"](x).numpy()
    reruns: dict[str, int] = {}

    def counting(func, symbol):
        def rerun(*args):
            reruns[symbol] = reruns.get(symbol, 0) + 1
            return func(*args)
        return rerun

    set_instrument = vm.set_instrument
    vm.set_instrument = lambda hook: set_instrument(
        hook and (lambda func, symbol, *rest: hook(counting(func, symbol), symbol, *rest)))
    time_each_kernel_in_model(vm, x, 3)
    assert reruns == {}
    timed = time_each_kernel_in_model(vm, x, 3, rerun_first=True)
    assert set(timed) == {k["name"] for k in kernels}
    assert reruns == {k["name"]: 3 * k["calls"] for k in kernels}
    np.testing.assert_array_equal(vm["main"](x).numpy(), expected)  # results as before, the hook gone


def test_each_kernel_can_be_timed_with_its_weights_flushed_from_the_caches(host_build):
    """As tools/kernel_cache_effect.py times them: TVM's cache flush before every run."""
    import tvm

    from compactdeploy.device.agent import time_each_kernel

    library = tvm.runtime.load_module(str(host_build / "model.so"))
    kernels = read_json(host_build / "kernels.json")
    flushed = time_each_kernel(library.imports[0], tvm.cpu(), kernels, 5, flush_cache=True)
    assert [t["name"] for t in flushed] == [k["name"] for k in kernels]
    assert all(t["median_ms"] > 0 for t in flushed)


def test_onnxruntime_baseline_runs_on_the_same_device(host_build):
    baseline = read_json(host_build / "report.json")["onnxruntime_on_device"]
    # onnxruntime is timed as long as TVM was: a ratio of windows of different lengths carries the short one's luck
    assert baseline["latency_ms"]["runs"] >= 100 and baseline["latency_ms"]["mean"] * baseline["latency_ms"]["runs"] >= 1000
    assert baseline["tvm_over_onnxruntime"] > 0


def test_build_slower_than_onnxruntime_says_what_to_do(host_build):
    from compactdeploy.report import slower_than_onnxruntime_advice

    report = read_json(host_build / "report.json")
    report["onnxruntime_on_device"]["tvm_over_onnxruntime"] = 0.9
    assert slower_than_onnxruntime_advice(report) is None
    report["onnxruntime_on_device"]["tvm_over_onnxruntime"] = 1.3
    report["tuning"] = {"kernels_scheduled": 2, "kernels_tunable": 9}
    advice = slower_than_onnxruntime_advice(report)
    assert "1.30x" in advice and "7 of 9 kernels are not tuned" in advice and "--tune-trials" in advice
    report["tuning"] = {"kernels_scheduled": 9, "kernels_tunable": 9}
    assert "model.onnx with onnxruntime" in slower_than_onnxruntime_advice(report)
    report["tuning"] = None  # a CUDA build: DLight schedules every kernel
    assert "DLight" in slower_than_onnxruntime_advice(report)


def test_torch_onnx_and_tvm_agree_on_real_samples(host_build, lenet5_checkpoint):
    """Rebuild the pruned model independently (weights + replayed plan) and compare all three."""
    import tvm
    from tvm import relax

    report = read_json(host_build / "report.json")
    assert report["parity"]["torch_vs_onnx_max_abs"] <= 1e-4
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4

    model = create_model("lenet5")
    load_weights(model, lenet5_checkpoint)
    data = load_dataset("digits")
    samples = fit_to_model(data, data.x_test[:8], model.input_shape[1:])
    replay(model.module, torch.from_numpy(samples[:1]), report["prune"]["plan"])

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(host_build / "model.so")), tvm.cpu())
    outputs = []
    for sample in samples:
        x = sample[None]
        with torch.no_grad():
            expected = model.module(torch.from_numpy(x)).numpy()
        from_onnx = run_onnxruntime(host_build / "model.onnx", x)
        from_tvm = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert np.abs(expected - from_onnx).max() <= 1e-4
        assert np.abs(expected - from_tvm).max() <= 1e-4
        outputs.append(expected)
    # the comparison means something only if the outputs depend on the input
    assert np.std(np.concatenate(outputs), axis=0).max() > 1e-3


def test_pruned_model_is_physically_as_narrow_as_reported(host_build):
    report = read_json(host_build / "report.json")
    widths = report["model"]["widths"]
    assert widths["3"] == {"before": 16, "after": 8}  # conv2, rounded to the host's multiple of 8
    assert widths["7"] == {"before": 120, "after": 64} and widths["9"] == {"before": 84, "after": 40}
    assert widths["11"] == {"before": 10, "after": 10}  # the output layer keeps its classes
    assert all(w["after"] % 8 == 0 or w["after"] == w["before"] for w in widths.values())

    # the widths are in the exported weights themselves, not only in the report
    graph = onnx.load(str(host_build / "model.onnx")).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    layers = [node for node in graph.node if node.op_type in ("Conv", "Gemm")]
    assert [shapes[node.input[1]][0] for node in layers] == [w["after"] for w in widths.values()]
    weight_count = sum(int(np.prod(shapes[name])) for node in layers for name in node.input[1:])
    assert weight_count == report["model"]["params"] < report["model"]["params_before"]


def test_accuracy_before_and_after_pruning_is_reported(host_build):
    accuracy = read_json(host_build / "report.json")["accuracy"]
    assert accuracy["dataset"] == "digits"
    assert accuracy["before"] > 0.8  # 4 epochs on digits
    assert 0.0 <= accuracy["after"] <= 1.0


def test_rpi4_library_is_an_aarch64_elf_and_is_not_measured_here(rpi4_build):
    assert elf_machine(rpi4_build / "model.so") == "aarch64"
    report = read_json(rpi4_build / "report.json")
    assert report["latency_ms"] is None and report["measured_on"] is None
    assert report["figures"]["latency"].startswith("not measured: no device")
    assert "--device rpc://" in report["figures"]["latency"]
    assert report["parity"]["onnx_vs_tvm_max_abs"] is None
    assert report["target"]["tvm_target"]["mcpu"] == "cortex-a72"
    # rpi4 rounds to multiples of 4 where the host rounds to 8
    assert read_json(rpi4_build / "report.json")["model"]["widths"]["0"]["after"] == 4
    manifest = read_json(rpi4_build / "manifest.json")
    assert manifest["target"]["arch"] == "aarch64"


def test_jetson_build_holds_a_cuda_module_for_an_aarch64_host(jetson_build):
    library = (jetson_build / "model.so").read_bytes()
    assert elf_machine(jetson_build / "model.so") == "aarch64"
    manifest = read_json(jetson_build / "manifest.json")
    host = manifest["target"]["tvm_target"]["host"]
    assert host["mcpu"] == "cortex-a78ae"  # not the tag's Xavier "carmel"
    device_code = manifest["target"]["device_code"]
    if device_code == "cuda-sm_87-fatbin":
        offset = library.find(bytes.fromhex("50ed55ba"))  # NVIDIA fatbin magic
        assert offset >= 0
        entry = offset + 16  # first entry: kind u16, version u16, header size u32, size u64, ..., arch u32 @ 28
        assert int.from_bytes(library[entry + 28 : entry + 32], "little") == 87
    else:
        assert device_code == "cuda-source"
        assert b"__global__" in library
        assert any("will not run on the device" in note for note in manifest["notes"])


@pytest.mark.parametrize("target", ["rpi5", "jetson-agx-orin"])
def test_other_targets_resolve_to_their_tvm_targets(target):
    from compactdeploy.targets import load_target

    spec = load_target(target)
    tvm_target = spec.tvm_target()
    assert spec.arch == "aarch64"
    assert str(tvm_target.kind.name) == spec.kind


def test_finetuning_after_pruning_recovers_accuracy(tmp_path):
    from conftest import run_cli

    out = tmp_path / "tuned"
    assert run_cli(
        "build", "--model", "lenet300", "--data", "digits", "--target", "host", "--prune", "l1:0.7",
        "--finetune-epochs", "3", "--repeat", "5", "--out", out,
    ) == 0
    report = read_json(out / "report.json")
    accuracy = report["accuracy"]
    assert accuracy["finetune_epochs"] == 3
    assert accuracy["after"] > max(accuracy["after_pruning"], 0.8)  # random init, then 3 epochs on digits
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4


def test_threads_reach_the_device_and_the_database_not_this_process(tmp_path):
    """--threads is resolved once (the deployment) and given to the processes that run models: the
    agent measures with it and the tuning database is the one for that count, while the build's
    own environment is left as it was."""
    from compactdeploy.config import BuildConfig, MeasureConfig, ModelConfig
    from compactdeploy.pipeline import build

    before = {key: os.environ.get(key) for key in ("TVM_NUM_THREADS", "TVM_BIND_THREADS")}
    config = BuildConfig(ModelConfig("mlp-tabular"), "host", tmp_path / "out", measure=MeasureConfig(repeat=5, threads=1))
    report = build(config).report
    assert {key: os.environ.get(key) for key in before} == before
    assert report["measured_on"]["threads"] == "1"
    assert report["tuning"]["device"]["threads"] == "1"


def test_the_report_says_where_each_kernels_schedule_came_from(host_build):
    report = read_json(host_build / "report.json")
    schedules = report["compile"]["schedules"]
    assert schedules and all(s in ("tuned record", "default rule") or s.startswith("transferred from ")
                             for s in schedules.values())
    assert len(schedules) == report["tuning"]["kernels_tunable"]
    assert sum(s == "tuned record" for s in schedules.values()) == report["tuning"]["kernels_scheduled"]


@pytest.mark.unit
def test_schedule_sources_are_counted_for_the_summary():
    from compactdeploy.render import schedule_sources

    text = schedule_sources({"a": "tuned record", "b": "unscheduled", "c": "unscheduled"})
    assert text.startswith("3 kernels: 1 tuned record, 2 unscheduled") and "--tune-trials" in text
    assert "--tune-trials" not in schedule_sources({"a": "tuned record"})
    assert "--tune-trials" not in schedule_sources({"a": "tuned record", "b": "default rule"})
    transferred = {"a": "transferred from conv2d_nhwc 1x8x8x64 (reducing 3x3x32)", "b": "transferred from matmul 1x10"}
    assert schedule_sources(transferred) == "2 kernels: 2 transferred from other widths"


@pytest.mark.unit
def test_the_tuning_note_says_which_kernels_a_short_run_would_search_and_their_share_of_the_time():
    from compactdeploy.report import tuning_note

    report = {
        "tuning": {"kernels_scheduled": 1, "kernels_tunable": 3},
        "compile": {"schedules": {"k1": "tuned record", "k2": "default rule", "k3": "transferred from matmul 1x10"}},
        "per_layer": {"kernels": [{"kernel": "k1_prepacked", "share": 0.5}, {"kernel": "k2_prepacked", "share": 0.3},
                                  {"kernel": "k3", "share": 0.2}]},
    }
    note = tuning_note(report)
    assert note.startswith("2 of 3 kernels are not tuned (1 default rule, 1 transferred from other widths, 50% of the "
                           "kernel time measured here)") and "--tune-trials" in note
    report["compile"]["schedules"] = {"k1": "tuned record"}
    assert tuning_note(report) is None  # every kernel tuned
    report["compile"]["schedules"], report["tuning"] = {"k2": "default rule"}, None
    assert tuning_note(report) is None  # no tuning database applies (a GPU build)
