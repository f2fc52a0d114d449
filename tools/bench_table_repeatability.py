#!/usr/bin/env python
"""How far the latency table's entries move from one timing to the next: a model's layers, compiled
once as the width search compiles its probes, timed again and again through a fresh device agent,
in one pass (each probe's median of 7 repeats, as the table was timed before) and in quiet passes
(``costs.time_in_quiet_passes``: a probe's fastest timing between quiet timings of the anchor, timed
again after a pause where a busy spell fell on it). Usage:
    .venv/bin/python tools/bench_table_repeatability.py [--models lenet300,mobilenetv2:input_size=32] [--runs 6]
Writes docs/benchmarks/table-repeatability.{md,json}. Weights are random: a probe's time does not
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

WAYS = ("one pass", "quiet passes")


def layers_of(model: str, model_args: dict, multiple: int) -> list:
    """The layer signatures of the unpruned, the half-width and the smallest model: a table batch's worth."""
    import torch

    from compactdeploy.fit.allocate import width_space
    from compactdeploy.fit.costs import PROBE_BATCH
    from compactdeploy.zoo import create_model

    created = create_model(model, model_args)
    space = width_space(created.module, torch.randn(*created.input_shape), (), multiple, 8)
    half = {group: max(multiple, width // 2 // multiple * multiple) for group, width in space.full.items()}
    signatures = {s.key: s for widths in (space.full, half, space.smallest()) for s in space.signatures(widths)}
    return list(signatures.values())[:PROBE_BATCH]


def main() -> None:
    from compactdeploy.bench.session import BUSY_PAUSE_S
    from compactdeploy.compile import resolve_linker
    from compactdeploy.device import connect, local_agent
    from compactdeploy.fit import costs
    from compactdeploy.targets import load_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet300,mobilenetv2:input_size=32",
                        help="MODEL[:ARG=INT], comma-separated (ARG: a model argument, e.g. input_size=32)")
    parser.add_argument("--runs", type=int, default=6, help="timings of each model's layers, each way")
    args = parser.parse_args()
    target = load_target("host")
    linker = resolve_linker(target)
    passes, quiet_timings = costs.PROBE_PASSES, costs.QUIET_TIMINGS
    start = time.perf_counter()
    rows, runs = [], []
    for spec in args.models.split(","):
        model, *argument = spec.split(":")
        model_args = {name: int(value) for name, value in (a.split("=") for a in argument)}
        batch = layers_of(model, model_args, target.channel_multiple)
        print(f"{spec}: compiling {len(batch)} layers", flush=True)
        with tempfile.TemporaryDirectory(prefix="compactdeploy-bench-table-") as tmp:
            lib = costs._compile_probes(batch, target, Path(tmp), linker, None)
            timed: dict[str, list[np.ndarray]] = {way: [] for way in WAYS}
            for number in range(args.runs):
                for way in WAYS:
                    # one pass: what the table did before quiet passes; the same code, one timing each
                    costs.PROBE_PASSES, costs.QUIET_TIMINGS = (1, 1) if way == WAYS[0] else (passes, quiet_timings)
                    agent = local_agent()
                    began = time.perf_counter()
                    try:
                        ms, anchor_ms = costs._time_probes(lambda: connect(agent.address), lib, batch, target)
                    finally:
                        agent.stop()
                    seconds = time.perf_counter() - began
                    # on one scale, as the table keeps every batch: the anchor's time in the first run
                    scale = (timed[way][0][-1] if timed[way] else anchor_ms) / anchor_ms
                    timed[way].append(np.array([*ms, anchor_ms]) * scale)
                    runs.append({"model": spec, "run": number, "way": way, "seconds": round(seconds, 1),
                                 "anchor_ms": anchor_ms, "ms": [round(m, 6) for m in ms]})
                    print(f"  run {number + 1}/{args.runs}, {way}: {seconds:.1f} s, anchor {anchor_ms:.4f} ms", flush=True)
        costs.PROBE_PASSES, costs.QUIET_TIMINGS = passes, quiet_timings
        for way, values in timed.items():
            entries = np.array(values)[:, :-1]  # runs x layers, on the first run's anchor scale
            spread = entries.max(axis=0) / entries.min(axis=0) - 1
            raw = np.array([r["ms"] for r in runs if r["model"] == spec and r["way"] == way])
            raw_spread = raw.max(axis=0) / raw.min(axis=0) - 1
            rows.append({"model": spec, "way": way, "layers": len(batch), "runs": len(values),
                         "spread_median": float(np.median(spread)), "spread_p90": float(np.percentile(spread, 90)),
                         "spread_worst": float(spread.max()), "raw_spread_median": float(np.median(raw_spread)),
                         "raw_spread_worst": float(raw_spread.max()),
                         "seconds_per_batch": float(np.mean([r["seconds"] for r in runs if r["model"] == spec and r["way"] == way]))})
    info = benchlib.meta("bench_table_repeatability.py", time.perf_counter() - start, runs=args.runs,
                         probe_passes=passes, quiet_timings=quiet_timings, quiet_anchor=costs.QUIET_ANCHOR,
                         busy_pause_s=BUSY_PAUSE_S, weights="random (seeded); a probe's time does not depend on values",
                         figures="real measurements on this host (each run a fresh device agent); none emulated or estimated")
    benchlib.write_json("table-repeatability", info, rows, runs=runs)
    write_markdown(info, rows)
    print(f"wrote {benchlib.DOCS}/table-repeatability.md")


def write_markdown(info: dict, rows: list[dict]) -> None:
    lines = [
        "# The latency table's entries, from one timing to the next",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}` ({info['seconds']} s); {info['figures']}. "
        "Each model's layers (those of its unpruned, half-width and smallest models, one table batch at most) "
        "compiled once as the width search compiles its probes, then timed in turns each way, each run through a "
        f"fresh device agent, every run scaled by the anchor layer as the table scales its batches. **one pass**: "
        f"each probe's median of 7 repeats, once; **quiet passes**: its fastest timing between two timings of the "
        f"anchor within {info['quiet_anchor']:.0%} of the anchor's fastest, once it has {info['quiet_timings']} such, "
        f"the rest timed again after pauses of {info['busy_pause_s']:.0f} s times the passes so far, "
        f"{info['probe_passes']} passes at most; the batch scaled by the anchor's median quiet timing. "
        "Spread of a layer: (highest - lowest) / lowest over the runs; **raw**: before the anchor's scaling.",
        "",
        "| model | timed in | layers | runs | spread, median layer | 90th percentile | worst layer | raw: median, worst | s per batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['way']} | {r['layers']} | {r['runs']} | {r['spread_median']:.1%} | "
                     f"{r['spread_p90']:.1%} | {r['spread_worst']:.1%} | {r['raw_spread_median']:.1%}, "
                     f"{r['raw_spread_worst']:.1%} | {r['seconds_per_batch']:.1f} |")
    (benchlib.DOCS / "table-repeatability.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
