#!/usr/bin/env python
"""What other work on this machine does to a compiled model's timing: the same library timed with
0, 1, ... other processes spinning (one per core at most), at the default thread count and at one
thread, interleaved over rounds, with the share of the CPU that other work took
(compactdeploy.device.agent.load_between, as reports give it).

Why it matters: tuning keeps the times it measures and builds apply them later, and the benchmark's
figure is the report's; both are only as good as the machine was idle (README "A busy machine is
named"). Reads the tuned library tools/bench_tuning.py built (run it first); host only. Usage:
    .venv/bin/python tools/load_effect.py [--model mobilenetv2] [--rounds 6]
Writes docs/load-effect.json and prints a line per spinner count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import benchlib
import numpy as np

from compactdeploy.bundle_runner import use_default_threads
from compactdeploy.device.agent import cpu_times, load_between
from compactdeploy.errors import CompactDeployError
from compactdeploy.resources import cache_dir
from compactdeploy.zoo import create_model

RUNS = 40  # timed runs per round, spinner count and thread count, one inference each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    import tvm
    from tvm import relax

    threads = int(use_default_threads())
    library = cache_dir("bench-tuning") / args.model / "tuned" / "model.so"
    if not library.is_file():
        raise SystemExit(f"error: no tuned {args.model} at {library.parent}; run tools/bench_tuning.py first")
    try:
        shape = create_model(args.model).input_shape
    except CompactDeployError as exc:
        raise SystemExit(f"error: {exc}") from None
    start = time.perf_counter()
    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"), device)
    timer = vm.time_evaluator("main", device, number=1, repeat=RUNS)
    timer(x)  # warm: the first runs page the library in
    counts = list(range((os.cpu_count() or 1) + 1))
    thread_counts = sorted({threads, 1}, reverse=True)
    set_threads = tvm.get_global_func("runtime.config_threadpool")  # (affinity mode, threads)
    medians = {(n, t): [] for n in counts for t in thread_counts}
    loads = {(n, t): [] for n in counts for t in thread_counts}
    for round_number in range(args.rounds):
        for n in counts:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
            try:
                time.sleep(0.3)  # running, not starting
                for t in thread_counts:
                    set_threads(0, t)
                    before = cpu_times()
                    result = timer(x)
                    load = load_between(before, cpu_times())
                    medians[n, t].append(float(np.median(result.results)) * 1e3)
                    loads[n, t].append(load["other_busy"] if load else float("nan"))
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
            time.sleep(0.5)  # the machine quiet again before the next count
        print(f"round {round_number + 1}/{args.rounds}", flush=True)
    idle = float(np.median(medians[0, threads]))
    rows = []
    for (n, t), times in medians.items():
        row = {
            "other_processes_spinning": n,
            "threads": t,
            "other_busy_median": round(float(np.median(loads[n, t])), 3),
            "median_ms": round(float(np.median(times)), 3),
            "round_medians_ms": [round(m, 3) for m in times],
            "over_idle": round(float(np.median(times)) / idle, 2),
        }
        rows.append(row)
        print(f"{n} spinning (other work {row['other_busy_median']:.0%} of the CPU), {t} threads: median "
              f"{row['median_ms']:.3f} ms ({row['over_idle']:.2f}x idle at {threads}; rounds "
              f"{min(times):.3f}-{max(times):.3f} ms)")
    info = benchlib.meta("load_effect.py", time.perf_counter() - start, threads=threads, model=args.model,
                         rounds=args.rounds, runs_per_round=RUNS,
                         weights="random (seeded); latency does not depend on values",
                         figures="real measurements on this host; none emulated or estimated")
    info["command"] += " " + " ".join(sys.argv[1:])
    benchlib.write_json("load-effect", info, rows)
    print(f"wrote {benchlib.DOCS}/load-effect.json")


if __name__ == "__main__":
    main()
