#!/usr/bin/env python
"""Tuned kernels timed alone with warm caches (as MetaSchedule measures them), alone with their weights
and outputs flushed from the caches, inside the model's own runs, and inside them right after an extra
run of the same kernel, and alone again, one call after each short pause of this process, against the
whole model end to end: how far the tuner's measurement is from a kernel's time inside the model, and
how much of that gap the caches, the thread split and the machine's other work explain.

Reads the tuned libraries tools/bench_tuning.py built (run it first); host only. Usage:
    .venv/bin/python tools/kernel_cache_effect.py [--models resnet20,mobilenetv2]
Writes docs/benchmarks/kernel-cache-effect.json and prints a line per model and the kernels most affected.
"""

from __future__ import annotations

import argparse
import json
import time

import benchlib
import numpy as np

from compactdeploy.runtime import use_default_threads
from compactdeploy.compile import KERNELS_NAME
from compactdeploy.device.agent import random_kernel_args, time_each_kernel, time_each_kernel_in_model
from compactdeploy.resources import cache_dir

REPEAT = 40  # runs per kernel: warm, 10 repeats of 4 (as bench_tuning); flushed, 40 repeats of 1
PAUSE_S = 0.001  # after a pause: one call per pause, REPEAT of them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,mobilenetv2")
    args = parser.parse_args()
    # as compactdeploy runs models: the user's TVM_NUM_THREADS, else one thread per physical core
    threads = int(use_default_threads())
    start = time.perf_counter()
    rows = [measure(name) for name in args.models.split(",")]
    info = benchlib.meta("kernel_cache_effect.py", time.perf_counter() - start, threads=threads,
                         method=f"compactdeploy.device.agent.time_each_kernel({REPEAT}), medians: warm, "
                                f"10 repeats of {REPEAT // 10} runs; flushed, {REPEAT} runs, each after "
                                "cache_flush_cpu_non_first_arg (every argument but the first, the input, "
                                "evicted); in the model: time_each_kernel_in_model (the Relax VM's instrument "
                                "hook), median per call over 200 runs; after a rerun: the same, each kernel run once more, untimed, "
                                "just before its timed call (rerun_first); after a pause: one call after each of "
                                f"{REPEAT} sleeps of {PAUSE_S * 1e3:.0f} ms, random inputs, median; end to end: the Relax VM, 200 runs, median",
                         figures="all measured on this host; nothing emulated or estimated")
    benchlib.write_json("kernel-cache-effect", info, rows)
    print(f"wrote {benchlib.DOCS}/kernel-cache-effect.json")


def measure(model: str) -> dict:
    import tvm
    from tvm import relax

    built = cache_dir("bench-tuning") / model
    if not (built / "tuned" / "model.so").exists():
        raise SystemExit(f"error: no tuned build of {model} in {built}: run tools/bench_tuning.py --models {model} first")
    library = tvm.runtime.load_module(str(built / "tuned" / "model.so"))
    dev = tvm.cpu()
    listed = json.loads((built / "tuned" / KERNELS_NAME).read_text())
    warm = time_each_kernel(library.imports[0], dev, listed, REPEAT)
    after_pause = time_after_pause(library.imports[0], dev, listed)
    flushed = time_each_kernel(library.imports[0], dev, listed, REPEAT, flush_cache=True)
    # the model's input shape: the first argument of its first kernel in the untuned build
    input_shape = json.loads((built / "untuned" / KERNELS_NAME).read_text())[0]["args"][0]["shape"]
    vm = relax.VirtualMachine(library, dev)
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(input_shape).astype("float32"))
    in_model = time_each_kernel_in_model(vm, x, 200)
    after_rerun = time_each_kernel_in_model(vm, x, 200, rerun_first=True)
    kernels = [
        {"kernel": k["name"], "calls": k["calls"], "warm_us": round(w["median_ms"] * 1e3, 2),
         "flushed_us": round(f["median_ms"] * 1e3, 2), "in_model_us": round(in_model[k["name"]] * 1e3, 2),
         "in_model_after_rerun_us": round(after_rerun[k["name"]] * 1e3, 2),
         "after_pause_us": round(after_pause[k["name"]] * 1e6, 2)}
        for k, w, f in zip(listed, warm, flushed)
    ]
    end_to_end = benchlib.time_interleaved({"model": lambda: vm["main"](x)}, 1, 200, 20)["model"]
    row = {
        "model": model,
        "kernels_warm_sum_us": round(sum(k["warm_us"] * k["calls"] for k in kernels), 1),
        "kernels_flushed_sum_us": round(sum(k["flushed_us"] * k["calls"] for k in kernels), 1),
        "kernels_in_model_sum_us": round(sum(k["in_model_us"] * k["calls"] for k in kernels), 1),
        "kernels_in_model_after_rerun_sum_us": round(sum(k["in_model_after_rerun_us"] * k["calls"] for k in kernels), 1),
        "kernels_after_pause_sum_us": round(sum(k["after_pause_us"] * k["calls"] for k in kernels), 1),
        "end_to_end_us": round(float(np.median(end_to_end)) * 1e6, 1),
        "kernels": kernels,
    }
    print(f"{model}: tuned kernels alone sum to {row['kernels_warm_sum_us']:.0f} us warm, "
          f"{row['kernels_flushed_sum_us']:.0f} us flushed, {row['kernels_in_model_sum_us']:.0f} us inside the "
          f"model ({row['kernels_in_model_after_rerun_sum_us']:.0f} us each right after a rerun of itself), "
          f"{row['kernels_after_pause_sum_us']:.0f} us alone after a {PAUSE_S * 1e3:.0f} ms pause; the model end to end "
          f"{row['end_to_end_us']:.0f} us")
    for k in sorted(kernels, key=lambda k: -(k["in_model_us"] - k["warm_us"]) * k["calls"])[:5]:
        print(f"  {k['kernel']} x{k['calls']}: {k['warm_us']:.1f} us warm, {k['flushed_us']:.1f} us flushed, "
              f"{k['in_model_us']:.1f} us in the model, {k['in_model_after_rerun_us']:.1f} us after a rerun, "
              f"{k['after_pause_us']:.1f} us after a pause")
    return row


def time_after_pause(kernel_module, dev, kernels: list[dict]) -> dict[str, float]:
    """Each kernel alone, one call at a time, each after ``PAUSE_S`` of this process sleeping: median s.

    Nothing else of ours runs in the pause, so what the call finds changed (its caches, TLB and
    predictors, the core's clock) is the machine's doing: other processes, other tenants of a VM.
    """
    rng = np.random.default_rng(0)
    times = {}
    for kernel in kernels:
        args = random_kernel_args(kernel, dev, rng)
        function = kernel_module[kernel["name"]]
        function(*args)
        each = []
        for _ in range(REPEAT):
            time.sleep(PAUSE_S)
            began = time.perf_counter()
            function(*args)
            each.append(time.perf_counter() - began)
        times[kernel["name"]] = float(np.median(each))
    return times


if __name__ == "__main__":
    main()
