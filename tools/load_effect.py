#!/usr/bin/env python
"""What other work on this machine does to a compiled model's timing: the same library timed with
0, 1, ... other processes spinning (one per core at most), with TVM's threads pinned one per core
(TVM's default), not pinned (compactdeploy's) and on one thread, interleaved over rounds, with the
share of the CPU that other work took (compactdeploy.runtime.load.load_between, as reports give it).

Why it matters: tuning keeps the times it measures and builds apply them later, and the benchmark's
figure is the report's; a device that shares its cores runs the model the same way (docs/tuning.md, "A
busy machine is named"). Each setting runs in a fresh process, since TVM reads them when its thread pool
starts. Reads the tuned library tools/bench_tuning.py built (run it first); host only. Usage:
    .venv/bin/python tools/load_effect.py [--model mobilenetv2] [--rounds 6]
Writes docs/benchmarks/load-effect.json and prints a line per spinner count and setting.

--idle asks only what not pinning costs when nothing else runs: for each model, processes pinned
and not pinned alternate, one fresh process each per round, each timing about a second of runs;
writes docs/benchmarks/pinning-idle.json:
    .venv/bin/python tools/load_effect.py --idle --models mobilenetv2,lenet5 [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import benchlib
import numpy as np

from compactdeploy.runtime import BIND_ENV, THREADS_ENV, use_default_threads
from compactdeploy.errors import CompactDeployError
from compactdeploy.resources import cache_dir
from compactdeploy.zoo import create_model

RUNS = 40  # timed runs per round, spinner count and setting, one inference each

# run in a fresh process per setting: load, warm, time RUNS runs, print the median and the load
_TIMER = """
import json, sys
import numpy as np, tvm
from tvm import relax
from compactdeploy.runtime.load import cpu_times, load_between
library, shape, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
device = tvm.cpu()
vm = relax.VirtualMachine(tvm.runtime.load_module(library), device)
x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"), device)
if runs == 0:  # about a second of runs: a small model's median needs thousands
    first = np.median(vm.time_evaluator("main", device, number=1, repeat=10)(x).results)
    runs = int(min(5000, max(40, 1.0 / first)))
timer = vm.time_evaluator("main", device, number=1, repeat=runs)
timer(x)
before = cpu_times()
result = timer(x)
load = load_between(before, cpu_times())
print(json.dumps({"median_ms": float(np.median(result.results)) * 1e3, "runs": runs,
                  "other_busy": load and load["other_busy"]}))
"""


def tuned_library(model: str):
    """The tuned library tools/bench_tuning.py built for ``model`` and the model's input shape."""
    library = cache_dir("bench-tuning") / model / "tuned" / "model.so"
    if not library.is_file():
        raise SystemExit(f"error: no tuned {model} at {library.parent}; run tools/bench_tuning.py first")
    try:
        return library, list(create_model(model).input_shape)
    except CompactDeployError as exc:
        raise SystemExit(f"error: {exc}") from None


def time_in_fresh_process(library, shape, runs: int, threads: int, bind: str) -> dict:
    """Median ms, the runs behind it and other work's share of the CPU meanwhile, from a new process."""
    env = dict(os.environ, **{THREADS_ENV: str(threads), BIND_ENV: bind})
    out = subprocess.run([sys.executable, "-c", _TIMER, str(library), json.dumps(shape), str(runs)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def idle_pinning(models: list[str], rounds: int, threads: int) -> None:
    """Pinned vs not pinned on an idle machine: alternating fresh processes, the order swapped each round."""
    start = time.perf_counter()
    rows = []
    libraries = {model: tuned_library(model) for model in models}  # a missing one stops it before any timing
    for model, (library, shape) in libraries.items():
        timed: dict[str, list[dict]] = {"1": [], "0": []}
        for round_number in range(rounds):
            for bind in ("1", "0") if round_number % 2 == 0 else ("0", "1"):
                timed[bind].append(time_in_fresh_process(library, shape, 0, threads, bind))
                time.sleep(0.5)  # the last process's threads gone before the next starts
            print(f"{model}: round {round_number + 1}/{rounds}", flush=True)
        pinned = [t["median_ms"] for t in timed["1"]]
        free = [t["median_ms"] for t in timed["0"]]
        processes = timed["1"] + timed["0"]
        row = {
            "model": model,
            "threads": threads,
            "runs_per_process": int(np.median([t["runs"] for t in processes])),
            "pinned_median_ms": round(float(np.median(pinned)), 4),
            "not_pinned_median_ms": round(float(np.median(free)), 4),
            "not_pinned_faster_in": sum(f < p for p, f in zip(pinned, free)),
            "rounds": rounds,
            "other_busy_max": round(max(t["other_busy"] or 0.0 for t in processes), 3),
            "pinned_round_ms": [round(m, 4) for m in pinned],
            "not_pinned_round_ms": [round(m, 4) for m in free],
        }
        rows.append(row)
        print(f"{model}: pinned {row['pinned_median_ms']} ms, not pinned {row['not_pinned_median_ms']} ms "
              f"(not pinned faster in {row['not_pinned_faster_in']} of {rounds} rounds; "
              f"{row['runs_per_process']} runs per process; other work at most {row['other_busy_max']:.0%})")
    info = benchlib.meta("load_effect.py", time.perf_counter() - start, threads=threads, rounds=rounds,
                         weights="random (seeded); latency does not depend on values",
                         figures="real measurements on this host, nothing else running; none emulated or estimated")
    benchlib.write_json("pinning-idle", info, rows)
    print(f"wrote {benchlib.DOCS}/pinning-idle.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--rounds", type=int, default=None, help="default: 6, with --idle 20")
    parser.add_argument("--idle", action="store_true", help="only pinned vs not pinned, nothing else running")
    parser.add_argument("--models", default="mobilenetv2,resnet20,lenet5", help="with --idle")
    args = parser.parse_args()
    threads = int(use_default_threads())
    if args.idle:
        idle_pinning(args.models.split(","), args.rounds or 20, threads)
        return
    args.rounds = args.rounds or 6
    library, shape = tuned_library(args.model)
    start = time.perf_counter()
    settings = {  # name: (threads, TVM_BIND_THREADS)
        f"{threads} threads pinned": (threads, "1"),
        f"{threads} threads not pinned": (threads, "0"),
        "1 thread": (1, "0"),
    }
    counts = list(range((os.cpu_count() or 1) + 1))
    medians: dict[tuple[int, str], list[float]] = {(n, s): [] for n in counts for s in settings}
    loads: dict[tuple[int, str], list[float]] = {(n, s): [] for n in counts for s in settings}
    for round_number in range(args.rounds):
        for n in counts:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
            try:
                time.sleep(0.3)  # running, not starting
                for name, (count, bind) in settings.items():
                    timed = time_in_fresh_process(library, shape, RUNS, count, bind)
                    medians[n, name].append(timed["median_ms"])
                    loads[n, name].append(timed["other_busy"] if timed["other_busy"] is not None else float("nan"))
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
            time.sleep(0.5)  # the machine quiet again before the next count
        print(f"round {round_number + 1}/{args.rounds}", flush=True)
    idle = float(np.median(medians[0, f"{threads} threads not pinned"]))
    rows = []
    for (n, name), times in medians.items():
        row = {
            "other_processes_spinning": n,
            "setting": name,
            "threads": settings[name][0],
            "pinned": settings[name][1] == "1",
            "other_busy_median": round(float(np.median(loads[n, name])), 3),
            "median_ms": round(float(np.median(times)), 3),
            "round_medians_ms": [round(m, 3) for m in times],
            "over_idle": round(float(np.median(times)) / idle, 2),
        }
        rows.append(row)
        print(f"{n} spinning (other work {row['other_busy_median']:.0%} of the CPU), {name}: median "
              f"{row['median_ms']:.3f} ms ({row['over_idle']:.2f}x idle, not pinned; rounds "
              f"{min(times):.3f}-{max(times):.3f} ms)")
    info = benchlib.meta("load_effect.py", time.perf_counter() - start, threads=threads, model=args.model,
                         rounds=args.rounds, runs_per_round=RUNS,
                         weights="random (seeded); latency does not depend on values",
                         figures="real measurements on this host; none emulated or estimated")
    benchlib.write_json("load-effect", info, rows)
    print(f"wrote {benchlib.DOCS}/load-effect.json")


if __name__ == "__main__":
    main()
