"""Measuring on a device over TVM RPC: an emulated Raspberry Pi, this host, a tracker, and faults.

Every server here binds 127.0.0.1, is started by the test and stopped by it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import every_core_spinning, needs_emulator, read_json, run_cli

from compactdeploy.bench import measure
from compactdeploy.device import Agent, DeviceAddress, _free_port, connect, local_agent, parse_device
from compactdeploy.runtime.load import cpu_times, describe_load, is_busy, load_between
from compactdeploy.errors import CompactDeployError
from compactdeploy.export import run_onnxruntime

@needs_emulator
def test_rpi4_build_is_measured_on_the_emulated_pi_and_says_so(emulated_build):
    report = read_json(emulated_build / "report.json")
    device = report["measured_on"]
    assert device["emulated"] is True and device["machine"] == "aarch64"
    assert "cortex-a72 emulated by qemu-user" in device["cpu"]
    assert report["figures"]["latency"].startswith("EMULATED")
    assert "not the real board's speed" in report["figures"]["latency"]
    latency = report["latency_ms"]
    # a second of runs at least (the default --min-time), never fewer than --repeat
    assert latency["runs"] >= 30 and latency["mean"] * latency["runs"] >= 1000 and latency["cut_short"] is None
    assert report["memory"]["peak_rss_bytes"] > 0
    assert report["per_layer"]["kernels"]
    assert "not installed" in report["onnxruntime_on_device"]["not_measured"]
    manifest = read_json(emulated_build / "manifest.json")
    assert manifest["measured"]["where"].startswith("EMULATED")


@needs_emulator
def test_aarch64_code_on_the_emulated_pi_matches_onnxruntime_on_the_host(emulated_build, emulated_pi):
    from tvm import relax, runtime

    assert read_json(emulated_build / "report.json")["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4
    session = connect(emulated_pi.address)
    session.remote.upload(str(emulated_build / "model.so"), "model.so")
    dev = session.remote.cpu()
    vm = relax.VirtualMachine(session.remote.load_module("model.so"), dev)
    rng = np.random.default_rng(3)
    outputs = []
    for _ in range(3):
        x = rng.random((1, 1, 28, 28), dtype=np.float32)
        on_pi = vm["main"](runtime.tensor(x, dev)).numpy()
        assert np.abs(on_pi - run_onnxruntime(emulated_build / "model.onnx", x)).max() <= 1e-4
        outputs.append(on_pi)
    assert np.std(np.concatenate(outputs), axis=0).max() > 1e-3


@needs_emulator
def test_x86_library_is_refused_by_the_aarch64_device_before_upload(host_build, emulated_pi, capsys):
    status = run_cli("bench", host_build, "--device", emulated_pi.address.url())
    err = capsys.readouterr().err
    assert status == 2
    assert "built for x86_64" in err and "is aarch64" in err


def test_unreachable_device_fails_before_any_stage(tmp_path, capsys):
    port = _free_port()  # nothing listens there
    out = tmp_path / "out"
    status = run_cli("build", "--model", "lenet5", "--target", "rpi4", "--device", f"rpc://127.0.0.1:{port}", "--out", out)
    captured = capsys.readouterr()
    assert status == 2
    assert f"cannot reach device 127.0.0.1:{port}" in captured.err
    assert "done" not in captured.err  # no stage ran
    assert not out.exists()


@pytest.mark.unit
@pytest.mark.parametrize("text", ["rpc://pi", "http://pi:9090", "rpc://pi:99999", "pi:9090"])
def test_malformed_device_addresses_are_refused(text):
    with pytest.raises(CompactDeployError, match="rpc://HOST:PORT"):
        parse_device(text)


@pytest.mark.unit
def test_device_addresses_parse():
    assert parse_device("rpc://192.168.1.10:9190/rpi4") == DeviceAddress("192.168.1.10", 9190, "rpi4")
    assert str(parse_device("rpc://pi.local:9090")) == "rpc://pi.local:9090"
    with_token = parse_device("rpc://s3cr-et_1@pi.local:9190/rpi4")
    assert with_token.token == "s3cr-et_1" and str(with_token) == "rpc://pi.local:9190/rpi4"  # never shown
    assert parse_device(with_token.url()).token == "s3cr-et_1"


def test_onnxruntime_beside_tvm_is_timed_as_long_as_asked_and_exactly_repeat_runs_without_a_minimum(host_build):
    import json

    from compactdeploy.device.agent import onnxruntime_times

    model, x = str(host_build / "model.onnx"), str(host_build / "sample_input.npy")
    exact = json.loads(onnxruntime_times(model, x, 5, 0))
    assert len(exact["times_ms"]) == 5
    windowed = json.loads(onnxruntime_times(model, x, 5, 1, json.dumps({"min_timed_ms": 300.0, "max_runs": 10**6})))
    assert len(windowed["times_ms"]) > 5 and sum(windowed["times_ms"]) >= 300.0
    capped = json.loads(onnxruntime_times(model, x, 5, 1, json.dumps({"min_timed_ms": 1e9, "max_runs": 50})))
    assert len(capped["times_ms"]) == 50


def test_a_device_that_drops_mid_benchmark_keeps_the_finished_runs(host_build):
    agent = local_agent()
    try:
        session = connect(agent.address)

        def drop_after_two_chunks(message: str) -> None:
            if message.startswith("timed 40/"):
                agent.stop()

        x = np.load(host_build / "sample_input.npy")
        result = measure(
            session, host_build / "model.so", x, arch=session.fingerprint["machine"], repeat=1000,
            warmup=0, progress=drop_after_two_chunks,
        )
    finally:
        agent.stop()
    assert result.latency_ms["runs"] == 40 and result.runs_requested == 1000
    assert result.cut_short.startswith("stopped after 40 of 1000 runs")
    assert str(agent.address) in result.cut_short


@pytest.fixture
def tracker():
    from tvm.rpc.tracker import Tracker

    port = _free_port()
    server = Tracker("127.0.0.1", port=port, port_end=port + 20, silent=True)
    yield server
    server.terminate()


def _agent_on_tracker(tracker, key: str) -> Agent:
    port = _free_port()
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    command = [sys.executable, "-m", "compactdeploy.device.agent", "--port", str(port), "--port-end", str(port + 20),
               "--tracker", f"127.0.0.1:{tracker.port}", "--key", key]
    return Agent(command, env, "agent", start_timeout_s=120)


def test_tracker_hands_out_a_device_by_key_and_a_busy_key_times_out(tracker, host_build, tmp_path, capsys):
    bundle = tmp_path / "bundle"  # a copy: bench rewrites its report
    shutil.copytree(host_build, bundle)
    with _agent_on_tracker(tracker, "testboard") as board:
        address = DeviceAddress("127.0.0.1", tracker.port, "testboard", token=board.token)
        deadline = time.monotonic() + 30
        while "testboard" not in tracker_keys(tracker) and time.monotonic() < deadline:
            time.sleep(0.2)
        # a measurement through the tracker, as a lab with many boards would use it
        assert run_cli("bench", bundle, "--device", address.url(), "--repeat", "20", "--min-time", "0") == 0
        assert read_json(bundle / "report.json")["latency_ms"]["runs"] == 20

        holder = connect(address, wait_s=10)  # takes the only board
        messages = []
        with pytest.raises(CompactDeployError, match="no free 'testboard' device .*every one registered is busy"):
            connect(address, wait_s=2, progress=messages.append)
        assert messages and "waiting for a free 'testboard' device" in messages[0]
        del holder
    with pytest.raises(CompactDeployError, match="none is registered with that key"):
        connect(DeviceAddress("127.0.0.1", tracker.port, "nosuchboard"), wait_s=1)


def tracker_keys(tracker) -> set[str]:
    from tvm import rpc

    return set(rpc.connect_tracker("127.0.0.1", tracker.port).summary().get("queue_info", {}))


def test_a_stock_tvm_rpc_server_gives_latency_without_the_agents_extras(host_build):
    from tvm import rpc

    port = _free_port()
    server = rpc.Server("127.0.0.1", port=port, port_end=port + 20, silent=True)
    try:
        session = connect(DeviceAddress("127.0.0.1", server.port))
        assert session.fingerprint is None
        x = np.load(host_build / "sample_input.npy")
        import platform

        result = measure(session, host_build / "model.so", x, arch=platform.machine(), repeat=20, warmup=2)
    finally:
        server.terminate()
    assert result.latency_ms["runs"] == 20
    assert result.memory["peak_rss_growth_bytes"] is None and result.per_layer is None
    assert "stock TVM RPC server" in result.onnxruntime["not_measured"]
    assert result.load is None  # nothing on a stock server can read the device's load


def test_bench_updates_the_report_and_keeps_the_manifest_true(host_build, tmp_path, capsys):
    import json

    from compactdeploy.zoo import file_sha256

    bundle = tmp_path / "bundle"  # a copy: the build's own report stays as the build tests expect it
    shutil.copytree(host_build, bundle)
    assert run_cli("bench", bundle, "--repeat", "25", "--min-time", "0", "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    report = read_json(bundle / "report.json")
    assert printed["latency_ms"]["runs"] == report["latency_ms"]["runs"] == 25
    manifest = read_json(bundle / "manifest.json")
    assert manifest["files"]["report.json"] == file_sha256(bundle / "report.json")
    assert manifest["measured"]["latency_ms"]["runs"] == 25


def test_cpu_load_counts_other_processes_and_leaves_out_this_ones():
    with every_core_spinning():
        start = cpu_times()
        time.sleep(1.0)
        others = load_between(start, cpu_times())
    assert others["other_busy"] > 0.5 and is_busy(others)
    assert "timings are slower and noisier" in describe_load(others)

    start = cpu_times()
    deadline = time.process_time() + 1.0
    while time.process_time() < deadline:  # this process's own work: one core for a second
        pass
    end = cpu_times()
    total = end[1] - start[1]
    busy_share = (end[0] - start[0]) / total
    own_seconds = end[3] - start[3]
    tick = 1.0 / os.sysconf("SC_CLK_TCK")  # os.times counts whole clock ticks: a reading can lose one
    assert own_seconds >= 1.0 - 2 * tick  # the loop's second, as this process's own CPU time
    own = load_between(start, end)
    # the machine's busy share holds this process's second; the load left over leaves it out.
    # Other processes (a parallel test worker) may share the cores: compare shares, not a fixed one.
    assert own["other_busy"] == pytest.approx(max(0.0, busy_share - own_seconds / total), abs=0.02)
    assert own["other_busy"] < busy_share - 0.9 / total
    assert load_between(None, end) is None


def test_bench_on_a_busy_device_says_so_in_the_report(host_build, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(host_build, copy)
    with every_core_spinning():
        assert run_cli("bench", copy, "--repeat", "25") == 0
    report = read_json(copy / "report.json")
    assert report["measured_on"]["load"]["other_busy"] > 0.3  # the spinners share the cores with the model
    assert "BUSY while timing: other work used" in report["figures"]["latency"]
    assert "BUSY while timing" in " ".join(capsys.readouterr().out.split())  # rich wraps long lines


@pytest.mark.unit
def test_of_two_windows_the_figures_are_the_first_s_unless_the_second_is_quicker():
    from compactdeploy.bench.session import _kept_window, _Window

    def window(median: float) -> _Window:
        return _Window([median * 0.98, median, median * 1.02], [], (median,), (), None, None)

    slowed, quick = window(10.5), window(4.4)  # a VM's core taken away through one window
    assert _kept_window(slowed, quick) is quick and _kept_window(quick, slowed) is quick
    first, second = window(4.5), window(4.4)  # within 5 %: the first, its runs as many as asked
    assert _kept_window(first, second) is first


def test_a_window_timed_while_the_device_was_slowed_gives_way_to_a_second_quicker_one(host_build, tmp_path,
                                                                                    monkeypatch):
    import dataclasses

    from compactdeploy.bench import session as bench_session
    from compactdeploy.bench.bundle import remeasure

    copy = tmp_path / "bundle"
    shutil.copytree(host_build, copy)
    time_window, windows = bench_session._time_window, []

    def slowed_through_the_first(*args, **kwargs):
        window = time_window(*args, **kwargs)
        windows.append(window)
        if len(windows) > 1:
            return window
        # a VM's second core taken away for seconds: 2.4x (docs/benchmarks/thread-windows.md).
        # Spinning processes cannot stand in: a tiny model's single runs finish inside one time slice.
        return dataclasses.replace(window, times_ms=[ms * 2.4 for ms in window.times_ms],
                                   chunk_ms=tuple(ms * 2.4 for ms in window.chunk_ms))

    monkeypatch.setattr(bench_session, "_time_window", slowed_through_the_first)
    report = remeasure(copy, None, repeat=25)
    assert len(windows) == 2  # timed again, after the per-layer profile and onnxruntime
    first, second = report["latency_ms"]["window_medians"]
    assert first > second * 1.05
    assert report["latency_ms"]["median"] == pytest.approx(second)  # the quicker window's figures
    assert report["latency_ms"]["runs"] == len(windows[1].times_ms)
    assert report["per_layer"]["whole_model_median_ms"] == pytest.approx(second)  # and the ratios to it
    onnxruntime = report["onnxruntime_on_device"]
    assert onnxruntime["tvm_over_onnxruntime"] == pytest.approx(second / onnxruntime["latency_ms"]["median"])
    assert "timed in two windows seconds apart" in report["figures"]["latency"]


def test_bench_refuses_a_tampered_bundle(host_build, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(host_build, copy)
    data = bytearray((copy / "model.so").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.so").write_bytes(bytes(data))
    assert run_cli("bench", copy) == 2
    assert "model.so does not match its sha256" in capsys.readouterr().err


def test_device_serve_command_serves_on_loopback_and_answers():
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "compactdeploy.cli", "device", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "COMPACTDEPLOY_DEVICE_TOKEN": "lab-token"},  # a token of the user's own
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("compactdeploy-agent-port")
        session = connect(DeviceAddress("127.0.0.1", int(line.split()[1]), token="lab-token"))
        assert session.fingerprint["emulated"] is False and session.fingerprint["tvm_version"]
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=10)


def _has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_nvidia_gpu(), reason="no NVIDIA GPU on this machine: the CUDA target cannot run here")
def test_cuda_build_runs_on_this_gpu_and_matches_onnxruntime(tmp_path):
    out = tmp_path / "cuda"
    assert run_cli("build", "--model", "lenet5", "--target", "cuda", "--repeat", "50", "--out", out) == 0
    report = read_json(out / "report.json")
    assert report["latency_ms"]["runs"] >= 50
    assert report["measured_on"]["cuda"]
    assert f"measured on real hardware: {report['measured_on']['cuda']} on " in report["figures"]["latency"]
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4


def test_the_device_agent_keeps_torch_out_of_the_process_it_forks_sessions_from():
    # tvm_ffi imports torch when it is installed; a CUDA torch in the agent left every forked session
    # unable to start the driver (cuInit: CUDA_ERROR_NOT_INITIALIZED), so the H200 measured nothing
    agent = local_agent()
    try:
        session = connect(agent.address)
        assert session.fingerprint["machine"]
        del session
        maps = Path(f"/proc/{agent.process.pid}/maps").read_text()
    finally:
        agent.stop()
    assert "libtvm_runtime" in maps  # the agent has loaded TVM...
    assert "libtorch" not in maps  # ...and not torch


_RUNTIME_ONLY_CUDA = """
import ctypes, sys
from compactdeploy.runtime.run import BundleError, load_cuda_plugin, tvm_device
if sys.argv[1] == "stub":
    from compactdeploy.compile.cuda import _driver_stub
    ctypes.CDLL(str(_driver_stub()), mode=ctypes.RTLD_GLOBAL)  # a driver that finds no GPU
print("reason:", load_cuda_plugin())
from tvm.base import _LOADED_LIBS
print("plugin loaded:", "tvm_runtime_cuda" in _LOADED_LIBS)
try:
    tvm_device("cuda")
except BundleError as exc:
    print("error:", exc)
"""


def _cuda_runtime_installed() -> bool:
    try:
        ctypes.CDLL("libcudart.so.13")
    except OSError:
        return False
    return shutil.which("cc") is not None


@pytest.mark.skipif(not _cuda_runtime_installed(), reason="CUDA 13's runtime (libcudart.so.13) is not installed")
def test_a_runtime_only_tvm_loads_its_cuda_plugin_and_says_why_there_is_no_gpu(tmp_path):
    # TVM_USE_RUNTIME_LIB=1 (the device agent, a bundle's run.py) autoloads no backend: on an H200
    # the build's agent found no GPU until the runtime loaded the plugin itself
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", COMPACTDEPLOY_CACHE=str(tmp_path))

    def run(driver: str) -> str:
        done = subprocess.run([sys.executable, "-c", _RUNTIME_ONLY_CUDA, driver], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    with_driver = run("stub")
    assert "reason: None" in with_driver and "plugin loaded: True" in with_driver
    # the stand-in's cuInit answers as a driver on a machine without a GPU does
    assert "error: TVM finds no CUDA GPU on this machine (the NVIDIA driver does not start (cuInit: " \
        "CUDA_ERROR_NO_DEVICE))\n" in with_driver
    if not _has_nvidia_gpu():
        without = run("none")
        assert "plugin loaded: False" in without
        assert "error: TVM finds no CUDA GPU on this machine (TVM's CUDA plugin does not load" in without
        assert "libcuda.so.1" in without


def test_cuda_build_without_a_gpu_is_compiled_and_says_not_measured(tmp_path):
    if _has_nvidia_gpu():
        pytest.skip("this machine has a GPU: the test above measures it")
    out = tmp_path / "cuda"
    assert run_cli("build", "--model", "lenet300", "--target", "cuda", "--out", out) == 0
    report = read_json(out / "report.json")
    assert report["latency_ms"] is None
    assert report["figures"]["latency"].startswith("not measured: TVM finds no CUDA GPU on this machine")
    assert report["target"]["device_code"].startswith("cuda")
