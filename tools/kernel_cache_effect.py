#!/usr/bin/env python
"""Tuned kernels timed alone with warm caches (as MetaSchedule measures them) and with their weights
and outputs flushed from the caches, against the whole model end to end: how far the tuner's
measurement is from a kernel's time inside the model.

Reads the tuned libraries tools/bench_tuning.py built (run it first); host only. Usage:
    .venv/bin/python tools/kernel_cache_effect.py [--models resnet20,mobilenetv2]
Writes docs/kernel-cache-effect.json and prints a line per model and the kernels most affected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import benchlib
import numpy as np

from compactdeploy.compile import KERNELS_NAME
from compactdeploy.resources import cache_dir

REPEAT = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,mobilenetv2")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    os.environ["TVM_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    rows = [measure(name) for name in args.models.split(",")]
    info = benchlib.meta("kernel_cache_effect.py", time.perf_counter() - start, threads=threads,
                         method=f"time_evaluator, number=1, repeat={REPEAT}, medians; flushed: "
                                "cache_flush_cpu_non_first_arg (every argument but the first, the input, "
                                "evicted before each run); end to end: the Relax VM, 200 runs, median",
                         figures="all measured on this host; nothing emulated or estimated")
    info["command"] += " " + " ".join(sys.argv[1:])
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
    rng = np.random.default_rng(0)
    kernels = []
    for kernel in json.loads((built / "tuned" / KERNELS_NAME).read_text()):
        args = [tvm.runtime.tensor(rng.standard_normal(a["shape"]).astype(a["dtype"]), dev) for a in kernel["args"]]
        times = {}
        for label, preproc in (("warm_us", ""), ("flushed_us", "cache_flush_cpu_non_first_arg")):
            timer = library.imports[0].time_evaluator(kernel["name"], dev, number=1, repeat=REPEAT, f_preproc=preproc)
            times[label] = round(float(np.median(timer(*args).results)) * 1e6, 2)
        kernels.append({"kernel": kernel["name"], "calls": kernel["calls"], **times})
    # the model's input shape: the first argument of its first kernel in the untuned build
    input_shape = json.loads((built / "untuned" / KERNELS_NAME).read_text())[0]["args"][0]["shape"]
    vm = relax.VirtualMachine(library, dev)
    x = tvm.runtime.tensor(rng.standard_normal(input_shape).astype("float32"))
    end_to_end = []
    for run in range(220):
        begin = time.perf_counter()
        vm["main"](x)
        if run >= 20:  # warm-up
            end_to_end.append(time.perf_counter() - begin)
    row = {
        "model": model,
        "kernels_warm_sum_us": round(sum(k["warm_us"] * k["calls"] for k in kernels), 1),
        "kernels_flushed_sum_us": round(sum(k["flushed_us"] * k["calls"] for k in kernels), 1),
        "end_to_end_us": round(float(np.median(end_to_end)) * 1e6, 1),
        "kernels": kernels,
    }
    print(f"{model}: tuned kernels alone sum to {row['kernels_warm_sum_us']:.0f} us warm, "
          f"{row['kernels_flushed_sum_us']:.0f} us flushed; the model end to end {row['end_to_end_us']:.0f} us")
    for k in sorted(kernels, key=lambda k: -(k["flushed_us"] - k["warm_us"]) * k["calls"])[:5]:
        print(f"  {k['kernel']} x{k['calls']}: {k['warm_us']:.1f} us warm, {k['flushed_us']:.1f} us flushed")
    return row


if __name__ == "__main__":
    main()
