#!/usr/bin/env python
"""Where a budgeted build's search spends its wall time, read off tools/bench_fit.py's progress log:
timing candidates (each compiled on the build host, then timed on the device), the trial
fine-tunes that judge them (on the build host), and the rest (the latency table, the unpruned and
smallest models, choosing). What a second board can shorten is the device's part of the first and
of the table; the compiles and the trials stay on the build host. Usage:
    .venv/bin/python tools/loop_time_shares.py LOG [--name NAME]
where LOG is bench_fit's stderr. The log's timestamps have 1 s resolution. Writes
docs/benchmarks/NAME.{md,json} (loop-time-shares by default).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from bench_fit import MEASURING  # noqa: E402  (the lines bench_fit logs when a candidate's timing starts)

STAMP = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\] ")
BUDGET = re.compile(r"\] (\S+): budget (\d+)% = ")
CANDIDATE = re.compile(r"^\[[\d:]+\]\s+model \d+ \(")
SUMMARY = re.compile(r"^\[[\d:]+\]\s+fit: .*models measured")


def shares(lines: list[str]) -> list[dict]:
    """One row per search: its seconds in each part, from one progress line to the next."""
    def seconds(line: str) -> int | None:
        m = STAMP.match(line)
        return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) if m else None

    lines = [line for line in lines if seconds(line) is not None]
    rows, row = [], None
    for line, following in zip(lines, lines[1:] + [""]):
        budget = BUDGET.search(line)
        if budget:
            row = {"model": budget[1], "budget_pct": int(budget[2]), "start": seconds(line),
                   "candidates_s": 0, "device_s": None, "trials_s": 0, "rest_s": 0, "candidates": 0}
        if row is None:
            continue
        if SUMMARY.match(line):
            total = seconds(line) - row.pop("start")
            rows.append({**row, "search_s": total})
            row = None
            continue
        spent = (seconds(following) or seconds(line)) - seconds(line)
        if "judging" in line:
            row["trials_s"] += spent
        elif MEASURING.search(following):  # pruning, export and compile, on the build host
            row["candidates_s"] += spent
        elif MEASURING.search(line):
            row["device_s"] = (row["device_s"] or 0) + spent
            row["candidates_s"] += spent
            row["candidates"] += 1
        elif CANDIDATE.match(following) or "timing it again" in line:
            row["candidates_s"] += spent
            row["candidates"] += 1
        else:
            row["rest_s"] += spent
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--name", default="loop-time-shares", help="docs/benchmarks/NAME.{md,json}")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = shares(args.log.read_text().splitlines())
    if not rows:
        sys.exit(f"{args.log} holds no search (no 'budget N% =' line followed by a 'fit: ...' summary): give bench_fit's stderr")
    info = benchlib.meta("loop_time_shares.py", time.perf_counter() - start, log=str(args.log),
                         figures="Wall times of real searches on this host, read off tools/bench_fit.py's progress log")
    benchlib.write_json(args.name, info, rows)
    lines = [
        "# Where a budgeted build's search spends its time",
        "",
        f"{info['figures']} (`{args.log.name}`, timestamps to the second); `{info['command']}`. Candidates: from "
        "the line before a model's measurement to it (its pruning, export, compile on the build host and timing on "
        "the device; where the log says when the timing starts, the device's part apart), and a kept model timed again; trials: the trial fine-tunes judging models, on the build host; "
        "rest: the latency table, the unpruned and smallest models, choosing. The log's lines bound the parts: a model "
        "measured right after a trial, with no line between, counts with the trial.",
        "",
        "| model | budget | search | timing candidates | of which on the device | trial fine-tunes | rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = r["search_s"] or 1
        lines.append(f"| {r['model']} | {r['budget_pct']} % | {r['search_s']} s | {r['candidates_s']} s "
                     f"({r['candidates_s'] / total:.0%}, {r['candidates']} timings) | "
                     + (f"{r['device_s']} s ({r['device_s'] / total:.0%})" if r["device_s"] is not None else "not in the log")
                     + f" | {r['trials_s']} s "
                     f"({r['trials_s'] / total:.0%}) | {r['rest_s']} s ({r['rest_s'] / total:.0%}) |")
    (benchlib.DOCS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))


if __name__ == "__main__":
    main()
