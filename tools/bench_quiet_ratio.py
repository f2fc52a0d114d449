#!/usr/bin/env python
"""How far a pruned model's latency relative to the unpruned model moves from one session of the
device to the next, judged three ways: the ratio of the two's medians (timed in turns, one window),
the ratio of their quiet times (``bench.quiet_times``, one window), and the quiet ratio timed again
where the device was busy through the window (``bench.time_quietly``), as the width search and
`build --latency-budget` judge a model against the budget. Each session is a fresh device agent on
this host. Usage:
    .venv/bin/python tools/bench_quiet_ratio.py [--models mobilenetv2:l1:0.6:input_size=32,...] [--sessions 8]
Writes docs/benchmarks/quiet-ratio.{md,json}. Weights are random (seeded): latency does not depend
on their values.
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

WAYS = ("median ratio", "quiet ratio", "quiet ratio, busy windows timed again")


def main() -> None:
    from compactdeploy.bench import QuietTimer, measure, quiet_times
    from compactdeploy.bench.session import BUSY_PAUSE_S, BUSY_WINDOW, QUIET_PERCENTILE, QUIET_TRIES
    from compactdeploy.config import BuildConfig, ModelConfig, PruneConfig
    from compactdeploy.device import connect, local_agent
    from compactdeploy.pipeline import build
    from compactdeploy.stages import Silent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2:l1:0.6:input_size=32,mobilenetv2:l1:0.6,lenet300:l1:0.6",
                        help="MODEL:METHOD:RATIO[:ARG=INT], comma-separated: each pruned model is timed beside its "
                             "unpruned one (ARG: a model argument, e.g. input_size=32)")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compactdeploy-bench-quiet-ratio")
    args = parser.parse_args()
    start = time.perf_counter()
    rows, sessions = [], []
    for spec in args.models.split(","):
        model, method, ratio, *argument = spec.split(":")
        model_args = {name: int(value) for name, value in (a.split("=") for a in argument)}
        name = "-".join([model, *argument]).replace("=", "")
        unpruned, pruned = args.work / name, args.work / f"{name}-{method}-{ratio}"
        print(f"{spec}: build, unpruned and pruned by {method}:{ratio}", flush=True)
        model_config = ModelConfig(model, model_args=model_args)
        build(BuildConfig(model_config, target="host", out=unpruned), Silent())
        build(BuildConfig(model_config, target="host", out=pruned, prune=PruneConfig(prune=f"{method}:{ratio}")), Silent())
        x = np.load(pruned / "sample_input.npy")
        timer = QuietTimer()
        by_way: dict[str, list[float]] = {way: [] for way in WAYS}
        for number in range(args.sessions):
            agent = local_agent()
            try:
                def window():
                    session = connect(agent.address)
                    return measure(session, pruned / "model.so", x, arch=session.fingerprint["machine"], repeat=50,
                                   min_timed_ms=1000.0, reference=unpruned / "model.so")

                windows = timer.time(window)
            finally:
                agent.stop()
            first = windows[0]
            model_ms, reference_ms = quiet_times(windows)
            first_quiet = quiet_times([first])
            values = {
                WAYS[0]: first.latency_ms["median"] / first.reference_latency_ms["median"],
                WAYS[1]: first_quiet[0] / first_quiet[1],
                WAYS[2]: model_ms / reference_ms,
            }
            for way, value in values.items():
                by_way[way].append(value)
            sessions.append({"model": spec, "session": number, "windows": len(windows),
                             "median_ms": first.latency_ms["median"], "reference_median_ms": first.reference_latency_ms["median"],
                             "quiet_ms": model_ms, "reference_quiet_ms": reference_ms,
                             **{way: round(v, 5) for way, v in values.items()}})
            print(f"  session {number + 1}/{args.sessions}: " + ", ".join(f"{w} {v:.4f}" for w, v in values.items())
                  + (f" ({len(windows)} windows)" if len(windows) > 1 else ""), flush=True)
        for way, values in by_way.items():
            values_array = np.array(values)
            rows.append({"model": spec, "way": way, "sessions": len(values), "median": float(np.median(values_array)),
                         "lowest": float(values_array.min()), "highest": float(values_array.max()),
                         "spread": float((values_array.max() - values_array.min()) / np.median(values_array))})
    info = benchlib.meta("bench_quiet_ratio.py", time.perf_counter() - start, sessions=args.sessions,
                         quiet_percentile=QUIET_PERCENTILE, busy_window=BUSY_WINDOW, quiet_tries=QUIET_TRIES,
                         busy_pause_s=BUSY_PAUSE_S,
                         weights="random (seeded); latency does not depend on values",
                         figures="real measurements on this host (each session a fresh device agent); none emulated "
                                 "or estimated")
    benchlib.write_json("quiet-ratio", info, rows, sessions=sessions)
    write_markdown(info, rows)
    print(f"wrote {benchlib.DOCS}/quiet-ratio.md")


def write_markdown(info: dict, rows: list[dict]) -> None:
    lines = [
        "# A pruned model's latency relative to the unpruned model, from one session to the next",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}` ({info['seconds']} s); {info['figures']}. "
        f"Each session: a fresh device agent; the pruned and the unpruned library timed in turns (a chunk of runs "
        f"each, a second of runs each at least). **median ratio**: their medians' ratio; **quiet ratio**: their "
        f"quiet times' ratio (percentile {info['quiet_percentile']} of each library's chunk medians); **busy windows "
        f"timed again**: where the unpruned model's quiet time was {info['busy_window']:.0%} over its quietest in the "
        f"sessions before, the pair timed again ({info['quiet_tries']} windows at most, after pauses of "
        f"{info['busy_pause_s']:.0f} s times the windows so far), as the width search does. "
        "Spread: (highest - lowest) / median.",
        "",
        "| pruned model | judged by | sessions | median | lowest | highest | spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['way']} | {r['sessions']} | {r['median']:.4f} | {r['lowest']:.4f} | "
                     f"{r['highest']:.4f} | {r['spread']:.1%} |")
    (benchlib.DOCS / "quiet-ratio.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
