#!/usr/bin/env python
"""Builds of one model set side by side on this host: interleaved end-to-end timing against onnxruntime,
and each build's kernels summed as timed inside the model.

For A/B questions the benchmark's single "tuned" build cannot answer (two tuning methods, two layouts,
two budgets). Each build is a compiled model.so of the same ONNX model. Usage:

    .venv/bin/python tools/compare_builds.py --onnx ~/.cache/compactdeploy/bench-tuning/mobilenetv2/model.onnx \\
        --builds warm=PATH/model.so,flushed=PATH/model.so --name tuning-measurement

Writes docs/compare-builds-NAME.json and prints a line per build.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import benchlib
import numpy as np

from compactdeploy.compile import KERNELS_NAME

ROUNDS = 15  # as tools/bench_tuning.py: interleaved rounds of RUNS_PER_ROUND runs of every variant
RUNS_PER_ROUND = 20
WARMUP = 20
IN_MODEL_RUNS = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="the model, for onnxruntime and its input shape")
    parser.add_argument("--builds", required=True, metavar="LABEL=MODEL.so,...")
    parser.add_argument("--name", required=True, help="results go to docs/compare-builds-NAME.json")
    args = parser.parse_args()
    if not all("=" in item for item in args.builds.split(",")):
        raise SystemExit(f"error: --builds takes LABEL=MODEL.so pairs, comma-separated (got {args.builds!r})")
    builds = dict(item.split("=", 1) for item in args.builds.split(","))
    # each library with the kernels.json its build wrote beside it (the kernels' call counts)
    needed = [args.onnx, *(p for path in builds.values() for p in (Path(path), Path(path).parent / KERNELS_NAME))]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise SystemExit(f"error: not found: {', '.join(missing)} (build each with compactdeploy first)")
    threads = os.cpu_count() or 1
    os.environ["TVM_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    rows = compare(args.onnx, builds, threads)
    info = benchlib.meta("compare_builds.py", time.perf_counter() - start, threads=threads, rounds=ROUNDS,
                         runs_per_round=RUNS_PER_ROUND,
                         method="every build and onnxruntime timed in turn, RUNS_PER_ROUND runs each per round, "
                                "medians; per round: build / onnxruntime within each round, quartiles over "
                                "rounds; in the model: compactdeploy.device.agent.time_each_kernel_in_model, "
                                f"{IN_MODEL_RUNS} runs, each kernel's median per call x its calls, summed",
                         figures="all measured on this host; nothing emulated or estimated",
                         builds=builds, onnx=str(args.onnx))
    info["command"] += " " + " ".join(sys.argv[1:])
    benchlib.write_json(f"compare-builds-{args.name}", info, rows)
    for row in rows:
        print(f"{row['build']}: {row['median_ms']:.3f} ms, / onnxruntime {row['over_onnxruntime']:.2f} "
              f"(per round {row['per_round_p25_p75'][0]:.2f}-{row['per_round_p25_p75'][1]:.2f}); "
              f"kernels in the model {row['kernels_in_model_ms']:.3f} ms")
    print(f"wrote {benchlib.DOCS}/compare-builds-{args.name}.json")


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
