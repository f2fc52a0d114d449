#!/usr/bin/env python3
"""What MetaSchedule's start-up costs a tuning run: mlp-tabular tuned with --trials from an empty
database, in a fresh process each, with TVM's full tensor-intrinsic import (what a stock tune
context does) and with compactdeploy's CPU-only one. Alternates the two, --rounds times.

Writes docs/benchmarks/tuning-startup.{json,md}. Run on an idle machine: `python tools/tuning_startup.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import benchlib

# one tuning run in a fresh process; argv: work directory, trials, "full" or "cpu"
_RUN = """
import sys, time
start = time.perf_counter()
import torch
from pathlib import Path
if sys.argv[3] == "full":
    import tvm.s_tir.tensor_intrin  # what every stock MetaSchedule tune context imports first
from compactdeploy.compile import import_onnx, lower_for_tuning
from compactdeploy.export import export_onnx
from compactdeploy.targets import load_target
from compactdeploy.tune import TuningDatabase, local_runner, tune
from compactdeploy.zoo import create_model
work = Path(sys.argv[1])
target, model = load_target("host"), create_model("mlp-tabular")
exported = export_onnx(model.module, torch.randn(model.input_shape), work / "m.onnx")
lowered = lower_for_tuning(import_onnx(exported.path, target), target.tvm_target())
result = tune(lowered, target, TuningDatabase(work / "db", {"startup": sys.argv[3]}), int(sys.argv[2]),
              local_runner(), None, pick_runner=lambda: local_runner(after_pause=True))
print(round(time.perf_counter() - start, 1), result.trials_run)
"""


def main(started: float) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    runs = []
    for round_ in range(args.rounds):
        for mode in ("full", "cpu") if round_ % 2 == 0 else ("cpu", "full"):
            with tempfile.TemporaryDirectory(prefix="compactdeploy-startup-") as work:
                done = subprocess.run([sys.executable, "-c", _RUN, work, str(args.trials), mode],
                                      capture_output=True, text=True, check=True)
            seconds, trials = done.stdout.split()[-2:]
            runs.append({"mode": mode, "round": round_, "seconds": float(seconds), "trials_run": int(trials)})
            print(f"{mode}: {seconds} s, {trials} trials", file=sys.stderr)
    info = benchlib.meta(f"tuning_startup.py --trials {args.trials} --rounds {args.rounds}",
                         time.perf_counter() - started, model="mlp-tabular", trials=args.trials,
                         method="one fresh process per run: export, lower, tune() from an empty database with the "
                                "second timing; 'full' imports tvm.s_tir.tensor_intrin first (a stock tune "
                                "context's import), 'cpu' leaves it to compactdeploy (x86 and Arm intrinsics only)")
    benchlib.write_json("tuning-startup", info, runs)
    lines = [
        "# Tuning start-up: every backend's tensor intrinsics, or the CPU's only",
        "",
        f"mlp-tabular, {args.trials} trials from an empty database, one fresh process per run; measured on "
        f"{info['measured_on']}. Command: `{info['command']}`.",
        "",
        "| run | intrinsics | seconds | trials |",
        "|---|---|---|---|",
        *[f"| {r['round'] + 1} | {'all backends' if r['mode'] == 'full' else 'CPU only'} | {r['seconds']} | {r['trials_run']} |"
          for r in runs],
    ]
    (benchlib.DOCS / "tuning-startup.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(runs))


if __name__ == "__main__":
    main(time.perf_counter())
