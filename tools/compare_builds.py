#!/usr/bin/env python
"""Builds of one model set side by side on this host: interleaved end-to-end timing against onnxruntime,
and each build's kernels summed as timed inside the model.

For A/B questions the benchmark's single "tuned" build cannot answer (two tuning methods, two layouts,
two budgets). Each build is a compiled model.so of the same ONNX model. Usage:

    .venv/bin/python tools/compare_builds.py --onnx ~/.cache/compactdeploy/bench-tuning/mobilenetv2/model.onnx \\
        --builds warm=PATH/model.so,flushed=PATH/model.so --name tuning-measurement [--runs 8 --pause 60]

On a shared machine one run is one sample of its noise (onnxruntime alone moved 8-11 ms between
runs minutes apart on a 2-core VM), so ``--runs N`` repeats the whole comparison with a pause between,
in one process, and the rows summarise the runs: each build's ratio to onnxruntime per run, their
median and range, and in how many runs its kernels inside the model summed lowest.

Writes docs/benchmarks/compare-builds-NAME.json (``rows``: the summary, ``runs``: every run's rows) after every
run, atomically, so an interrupted comparison keeps the runs it finished; prints a line per build and run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import benchlib
import numpy as np

from compactdeploy.runtime import use_default_threads
from compactdeploy.compile import KERNELS_NAME

ROUNDS = 15  # as tools/bench_tuning.py: interleaved rounds of RUNS_PER_ROUND runs of every variant
RUNS_PER_ROUND = 20
WARMUP = 20
IN_MODEL_RUNS = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="the model, for onnxruntime and its input shape")
    parser.add_argument("--builds", required=True, metavar="LABEL=MODEL.so,...")
    parser.add_argument("--name", required=True, help="results go to docs/benchmarks/compare-builds-NAME.json")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole comparison this many times (default 1)")
    parser.add_argument("--pause", type=float, default=60.0, help="seconds between runs (default 60)")
    args = parser.parse_args()
    if args.runs < 1 or args.pause < 0:
        raise SystemExit("error: --runs takes a count of 1 or more and --pause seconds of 0 or more")
    if not all("=" in item for item in args.builds.split(",")):
        raise SystemExit(f"error: --builds takes LABEL=MODEL.so pairs, comma-separated (got {args.builds!r})")
    builds = dict(item.split("=", 1) for item in args.builds.split(","))
    # each library with the kernels.json its build wrote beside it (the kernels' call counts)
    needed = [args.onnx, *(p for path in builds.values() for p in (Path(path), Path(path).parent / KERNELS_NAME))]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise SystemExit(f"error: not found: {', '.join(missing)} (build each with compactdeploy first)")
    # as compactdeploy runs models: the user's TVM_NUM_THREADS, else one thread per physical core
    threads = int(use_default_threads())
    start = time.perf_counter()
    runs, seconds = [], []
    for index in range(args.runs):
        if index:
            time.sleep(args.pause)
        began = time.perf_counter()
        runs.append(compare(args.onnx, builds, threads))
        seconds.append(round(time.perf_counter() - began))
        for row in runs[-1]:
            print(f"run {index + 1}/{args.runs} {row['build']}: {row['median_ms']:.3f} ms, onnxruntime "
                  f"{row['onnxruntime_ms']:.3f} ms, / onnxruntime {row['over_onnxruntime']:.2f} (per round "
                  f"{row['per_round_p25_p75'][0]:.2f}-{row['per_round_p25_p75'][1]:.2f}); kernels in the model "
                  f"{row['kernels_in_model_ms']:.3f} ms", flush=True)
        # after every run, so an interrupted comparison keeps the runs it finished
        rows = summarise(runs)
        info = benchlib.meta("compare_builds.py", time.perf_counter() - start, threads=threads, rounds=ROUNDS,
                             runs_per_round=RUNS_PER_ROUND, runs=len(runs), runs_asked=args.runs, pause_s=args.pause,
                             run_seconds=seconds,
                             method="every build and onnxruntime timed in turn, RUNS_PER_ROUND runs each per round, "
                                    "medians; per round: build / onnxruntime within each round, quartiles over "
                                    "rounds; in the model: compactdeploy.device.agent.time_each_kernel_in_model, "
                                    f"{IN_MODEL_RUNS} runs, each kernel's median per call x its calls, summed",
                             figures="all measured on this host; nothing emulated or estimated",
                             builds=builds, onnx=str(args.onnx))
        benchlib.write_json(f"compare-builds-{args.name}", info, rows, runs=runs)
    for row in rows:
        low, high = row["over_onnxruntime_range"]
        lowest = row["runs_lowest_kernels_in_model"]
        print(f"{row['build']}: / onnxruntime median {row['over_onnxruntime_median']:.2f} over {args.runs} runs "
              f"({low:.2f}-{high:.2f}, at or under 1.0 in {row['runs_at_or_under_onnxruntime']})"
              + (f"; kernels in the model summed lowest in {lowest}" if lowest is not None else ""))
    print(f"wrote {benchlib.DOCS}/compare-builds-{args.name}.json")


def summarise(runs: list[list[dict]]) -> list[dict]:
    """Per build, over the runs: its ratio to onnxruntime (each run's own onnxruntime), and (of two
    builds or more) how often its kernels inside the model summed lowest."""
    several = len(runs[0]) > 1
    lowest = [min(run, key=lambda row: row["kernels_in_model_ms"])["build"] for run in runs]
    rows = []
    for mine in zip(*runs):  # every run lists the builds in the same order
        label = mine[0]["build"]
        ratios = [row["over_onnxruntime"] for row in mine]
        rows.append({
            "build": label,
            "over_onnxruntime_per_run": ratios,
            "over_onnxruntime_median": float(np.median(ratios)),
            "over_onnxruntime_range": [min(ratios), max(ratios)],
            "runs_at_or_under_onnxruntime": sum(ratio <= 1.0 for ratio in ratios),
            "median_ms_per_run": [row["median_ms"] for row in mine],
            "onnxruntime_ms_per_run": [row["onnxruntime_ms"] for row in mine],
            "kernels_in_model_ms_per_run": [row["kernels_in_model_ms"] for row in mine],
            "runs_lowest_kernels_in_model": lowest.count(label) if several else None,
        })
    return rows


def compare(onnx_path: Path, builds: dict[str, str], threads: int) -> list[dict]:
    import tvm
    from tvm import relax

    from compactdeploy.device.agent import time_each_kernel_in_model
    from compactdeploy.export import onnxruntime_session

    session = onnxruntime_session(onnx_path, threads)
    graph_input = session.get_inputs()[0]  # the zoo's models have fixed shapes, batch 1
    x = np.random.default_rng(0).standard_normal(graph_input.shape).astype("float32")
    feed = {graph_input.name: x}
    runners = {"onnxruntime": lambda: session.run(None, feed)}
    machines = {}
    tx = tvm.runtime.tensor(x)
    for label, path in builds.items():
        vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
        machines[label] = vm
        runners[label] = lambda vm=vm: vm["main"](tx)
    times = benchlib.time_interleaved(runners, ROUNDS, RUNS_PER_ROUND, WARMUP)
    ort_ms = float(np.median(times["onnxruntime"])) * 1e3
    rows = []
    for label, path in builds.items():
        calls = {k["name"]: k["calls"] for k in json.loads((Path(path).parent / KERNELS_NAME).read_text())}
        in_model = time_each_kernel_in_model(machines[label], tx, IN_MODEL_RUNS)
        per_round = [
            np.median(times[label][i : i + RUNS_PER_ROUND]) / np.median(times["onnxruntime"][i : i + RUNS_PER_ROUND])
            for i in range(0, ROUNDS * RUNS_PER_ROUND, RUNS_PER_ROUND)
        ]
        median = float(np.median(times[label])) * 1e3
        rows.append({
            "build": label,
            "library": path,
            "median_ms": median,
            "onnxruntime_ms": ort_ms,
            "over_onnxruntime": median / ort_ms,
            "per_round_p25_p75": [float(np.percentile(per_round, 25)), float(np.percentile(per_round, 75))],
            "kernels_in_model_ms": sum(ms * calls[name] for name, ms in in_model.items()),
            "kernels_in_model": {name: round(ms * 1e3, 2) for name, ms in sorted(in_model.items(), key=lambda kv: -kv[1])},
        })
    return rows


if __name__ == "__main__":
    main()
