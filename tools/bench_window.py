#!/usr/bin/env python
"""How long a benchmark must time a model before its median stops depending on the moment: the same
bundle measured by `compactdeploy bench` in fresh processes, alternately with a short window
(exactly --repeat 100 runs, `--min-time 0`, what builds did before) and with the default minimum
time (`--min-time 1`), on this host. Each process reports TVM's median and onnxruntime's beside it.

A budgeted build compares one such median (its final benchmark) with another (the search's
measurement of the same widths); when the two are taken over windows that sample different moments
of the device, the build can miss a budget it met. Usage:
    .venv/bin/python tools/bench_window.py [--models resnet20,mobilenetv2,lenet300] [--rounds 8]
Writes docs/benchmarks/measurement-window.{md,json}. Weights are random (seeded): latency does not
depend on their values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import numpy as np  # noqa: E402

WINDOWS = {"short (100 runs, --min-time 0)": 0.0, "default (--min-time 1)": 1.0}


def main() -> None:
    from compactdeploy.bench import remeasure
    from compactdeploy.config import BuildConfig, ModelConfig
    from compactdeploy.pipeline import build
    from compactdeploy.stages import Silent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,mobilenetv2,lenet300")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compactdeploy-bench-window")
    args = parser.parse_args()
    start = time.perf_counter()
    rows, processes = [], []
    for model in args.models.split(","):
        bundle = args.work / model
        print(f"{model}: build", flush=True)
        build(BuildConfig(ModelConfig(model), target="host", out=bundle), Silent())
        timed: dict[str, list[dict]] = {name: [] for name in WINDOWS}
        for round_number in range(args.rounds):
            order = list(WINDOWS) if round_number % 2 == 0 else list(reversed(WINDOWS))
            for name in order:
                report = remeasure(bundle, None, repeat=100, warmup=10, observer=Silent(), min_time_s=WINDOWS[name])
                ort = report["onnxruntime_on_device"].get("latency_ms") or {}
                entry = {"model": model, "window": name, "round": round_number, "median_ms": report["latency_ms"]["median"],
                         "runs": report["latency_ms"]["runs"], "onnxruntime_median_ms": ort.get("median"),
                         "load": (report["measured_on"].get("load") or {}).get("other_busy")}
                timed[name].append(entry)
                processes.append(entry)
            print(f"{model}: round {round_number + 1}/{args.rounds}", flush=True)
        for name, entries in timed.items():
            medians = np.array([e["median_ms"] for e in entries])
            ratios = np.array([e["median_ms"] / e["onnxruntime_median_ms"] for e in entries if e["onnxruntime_median_ms"]])
            rows.append({
                "model": model, "window": name, "processes": len(entries),
                "runs_per_process": int(np.median([e["runs"] for e in entries])),
                "median_of_medians_ms": float(np.median(medians)), "lowest_ms": float(medians.min()),
                "highest_ms": float(medians.max()), "spread": float(medians.max() / medians.min()),
                "over_lowest_by_10pct": int((medians > 1.1 * medians.min()).sum()),
                "tvm_over_onnxruntime": [round(float(r), 3) for r in ratios],
            })
            print(f"  {name}: medians {medians.min():.4f}-{medians.max():.4f} ms (x{medians.max() / medians.min():.2f})",
                  flush=True)
    info = benchlib.meta("bench_window.py", time.perf_counter() - start, rounds=args.rounds,
                         weights="random (seeded); latency does not depend on values",
                         figures="real measurements on this host (each a fresh `compactdeploy bench` process); "
                                 "none emulated or estimated")
    benchlib.write_json("measurement-window", info, rows, processes=processes)
    write_markdown(info, rows)
    print(f"wrote {benchlib.DOCS}/measurement-window.md")


def write_markdown(info: dict, rows: list[dict]) -> None:
    lines = [
        "# How long to time a model: a short window against the default minimum time",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}` ({info['seconds']} s). Each row: "
        f"{rows[0]['processes']} fresh `compactdeploy bench` processes on this host, the two windows alternating; "
        "weights random (latency does not depend on them). Real measurements, none emulated or estimated.",
        "",
        "| model | window | runs per process | median of medians | lowest - highest process median | spread | processes >10 % over the lowest | TVM / onnxruntime per process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = ", ".join(f"{x:.2f}" for x in r["tvm_over_onnxruntime"])
        lines.append(f"| {r['model']} | {r['window']} | {r['runs_per_process']} | {r['median_of_medians_ms']:.4f} ms | "
                     f"{r['lowest_ms']:.4f} - {r['highest_ms']:.4f} ms | {r['spread']:.2f}x | "
                     f"{r['over_lowest_by_10pct']} of {r['processes']} | {ratios} |")
    lines += [
        "",
        "A window of 100 runs of a sub-millisecond model is a few dozen milliseconds of the device; on this VM such a",
        "moment is either fast or much slower (the host takes a vCPU away for a while). Builds and `bench` time one",
        "second at least (`--min-time`, default 1; `--min-time 0` gives exactly `--repeat` runs), and onnxruntime",
        "beside them as long. The longer window narrows the spread only where 100 runs were short; the host's slow",
        "spells last longer than a second, and no window length removes them. A budgeted build therefore times its",
        "candidates and its final build in turns with the unpruned model and judges their ratio (docs/fit.md).",
        "",
    ]
    (benchlib.DOCS / "measurement-window.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
