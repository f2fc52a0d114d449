#!/usr/bin/env python
"""Whether this host's slow spells starve one core: one library timed in windows that alternate
between all its TVM threads and one thread, a pause apart, each window in a fresh device agent.

A busy machine slows both kinds of window and shows as other work (``other_busy``). A core the
hypervisor takes away shows only in the many-thread windows, which then run slower than one thread
(every parallel kernel waits for its slowest thread), with no other work and no steal time seen.
Usage:
    .venv/bin/python tools/bench_thread_windows.py [--model mobilenetv2] [--pairs 12] [--pause 3] [--pin]
Writes docs/benchmarks/thread-windows.{md,json} (with --pin: thread-windows-pinned.*). Weights are random (seeded): latency does not
depend on their values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import numpy as np  # noqa: E402

SLOW = 1.5  # a window this many times its thread count's quickest is a slow one


def main() -> None:
    from compactdeploy.bench import measure, quiet_time
    from compactdeploy.config import BuildConfig, ModelConfig
    from compactdeploy.device import connect, local_agent
    from compactdeploy.pipeline import build
    from compactdeploy.runtime.run import BIND_ENV
    from compactdeploy.stages import Silent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between windows (the width search's pause)")
    parser.add_argument("--pin", action="store_true",
                        help="TVM pins each pool thread to a core (TVM_BIND_THREADS=1); builds leave them unpinned")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compactdeploy-bench-thread-windows")
    args = parser.parse_args()
    if args.pin:
        os.environ[BIND_ENV] = "1"  # the agents inherit it
    name = "thread-windows-pinned" if args.pin else "thread-windows"
    many = os.cpu_count() or 1
    start = time.perf_counter()
    bundle = args.work / args.model
    print(f"{args.model}: build for this host", flush=True)
    build(BuildConfig(ModelConfig(args.model), target="host", out=bundle), Silent())
    x = np.load(bundle / "sample_input.npy")
    windows = []
    for pair in range(args.pairs):
        for threads in (many, 1):
            agent = local_agent(threads=threads)
            try:
                session = connect(agent.address)
                m = measure(session, bundle / "model.so", x, arch=session.fingerprint["machine"], repeat=50,
                            min_timed_ms=1000.0)
            finally:
                agent.stop()
            load = m.load or {}
            windows.append({"pair": pair, "threads": threads, "median_ms": m.latency_ms["median"],
                            "quiet_ms": quiet_time([m]),
                            "chunk_ms": [round(float(c), 4) for c in m.chunk_ms],
                            "other_busy": load.get("other_busy"), "steal": load.get("steal")})
            print(f"  pair {pair + 1}/{args.pairs}, {threads} threads: {m.latency_ms['median']:.3f} ms "
                  f"(other work {load.get('other_busy')}, steal {load.get('steal')})", flush=True)
            time.sleep(args.pause)
    rows = []
    for threads in (many, 1):
        own = [w for w in windows if w["threads"] == threads]
        quickest = min(w["median_ms"] for w in own)
        slow = [w for w in own if w["median_ms"] > SLOW * quickest]
        rows.append({"threads": threads, "windows": len(own), "quickest_ms": quickest,
                     "median_ms": float(np.median([w["median_ms"] for w in own])),
                     "slowest_ms": max(w["median_ms"] for w in own), "slow_windows": len(slow),
                     "most_other_busy": max((w["other_busy"] or 0.0) for w in own),
                     "most_steal": max((w["steal"] or 0.0) for w in own)})
    info = benchlib.meta("bench_thread_windows.py", time.perf_counter() - start, model=args.model, pairs=args.pairs,
                         pause_s=args.pause, slow_factor=SLOW, threads_pinned=args.pin,
                         weights="random (seeded); latency does not depend on values",
                         figures="real measurements on this host (each window a fresh device agent); none emulated "
                                 "or estimated")
    benchlib.write_json(name, info, rows, windows=windows)
    write_markdown(name, info, rows, windows)
    print(f"wrote {benchlib.DOCS}/{name}.md")


def write_markdown(name: str, info: dict, rows: list[dict], windows: list[dict]) -> None:
    pinned = "pinned to cores" if info["threads_pinned"] else "not pinned, as builds run them"
    lines = [
        f"# {info['model']} timed in windows alternating {rows[0]['threads']} TVM threads and 1 ({pinned})",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}` ({info['seconds']} s); {info['figures']}. "
        f"Each window: a fresh device agent, a second of runs at least, {info['pause_s']:.0f} s apart. "
        f"A slow window: its median over {info['slow_factor']}x the quickest of its thread count. Other work and "
        "steal: the largest share of the cores seen in any window.",
        "",
        "| threads | windows | quickest ms | median ms | slowest ms | slow windows | most other work | most steal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['windows']} | {r['quickest_ms']:.3f} | {r['median_ms']:.3f} | "
                     f"{r['slowest_ms']:.3f} | {r['slow_windows']} | {r['most_other_busy']:.1%} | {r['most_steal']:.1%} |")
    lines += ["", "Every window, in order:", "", "| pair | threads | median ms | other work | steal |", "|---|---|---|---|---|"]
    for w in windows:
        lines.append(f"| {w['pair'] + 1} | {w['threads']} | {w['median_ms']:.3f} | {w['other_busy']} | {w['steal']} |")
    (benchlib.DOCS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
