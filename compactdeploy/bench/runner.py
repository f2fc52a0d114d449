"""Load a compiled model, run it, time it and measure its memory: the device side of a benchmark.

This file must stay self-contained: it runs on the device with only numpy and the TVM runtime
(``TVM_USE_RUNTIME_LIB=1`` works), started as ``python runner.py --lib model.so --input x.npy``.
It prints one JSON object on stdout. It runs in its own process so the memory it reports is the
model's, not that of the torch/ONNX process that built it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak is measured from here on.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def fingerprint() -> dict:
    """What machine this is: enough to tell a Pi 4 from an emulated one or from the build host."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key = line.split(":")[0].strip().lower()
                if key in ("model name", "hardware", "cpu model"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    governor = None
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") as handle:
            governor = handle.read().strip()
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "governor": governor,
        "kernel": platform.release(),
        "python": platform.python_version(),
        # qemu-user reports the guest architecture but runs on another; the caller says so explicitly
        "emulated": os.environ.get("COMPACTDEPLOY_EMULATED") == "1",
    }


def run(lib_path: str, input_path: str, output_path: str | None, repeat: int, warmup: int, device: str) -> dict:
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    x_host = np.load(input_path)
    rss_before_kb = _proc_status_kb("VmRSS")
    peak_reset = _reset_peak_rss()

    start = time.perf_counter()
    vm = VirtualMachine(tvm.runtime.load_module(lib_path), dev)
    load_s = time.perf_counter() - start

    x = tvm.runtime.tensor(x_host, dev)
    start = time.perf_counter()
    out = vm["main"](x)
    dev.sync()
    cold_s = time.perf_counter() - start

    for _ in range(warmup):
        vm["main"](x)
    dev.sync()
    # number=1: every repeat is one inference, so the list is the latency distribution itself
    timer = vm.time_evaluator("main", dev, number=1, repeat=repeat)
    times_s = list(timer(x).results)

    rss_peak_kb = _proc_status_kb("VmHWM")
    result = out.numpy()
    if output_path:
        np.save(output_path, result)
    return {
        "times_ms": [t * 1e3 for t in times_s],
        "cold_ms": cold_s * 1e3,
        "load_ms": load_s * 1e3,
        "warmup": warmup,
        "rss_before_bytes": None if rss_before_kb is None else rss_before_kb * 1024,
        "peak_rss_bytes": None if rss_peak_kb is None else rss_peak_kb * 1024,
        "peak_rss_growth_bytes": (
            None if rss_before_kb is None or rss_peak_kb is None or not peak_reset
            else max(0, rss_peak_kb - rss_before_kb) * 1024
        ),
        "output_shape": list(result.shape),
        "threads": os.environ.get("TVM_NUM_THREADS"),
        "tvm_version": tvm.__version__,
        "device": fingerprint(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, help="the compiled model (model.so)")
    parser.add_argument("--input", required=True, help="an .npy file with the input tensor")
    parser.add_argument("--output", help="write the model's output here (.npy)")
    parser.add_argument("--repeat", type=int, default=100, help="timed runs")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before timing")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    try:
        report = run(args.lib, args.input, args.output, args.repeat, args.warmup, args.device)
    except Exception as exc:  # the caller needs one parseable line whatever went wrong
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}))
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
