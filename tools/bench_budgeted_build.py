"""A complete budgeted build, timed from the command line, starting from the database a tuning of
the full model left: `build --tune-trials N` of the unpruned model first (once, into this
benchmark's own cache), then `build --latency-budget` as a user runs it. Writes
docs/benchmarks/fit-budgeted-build.{md,json}; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DOCS, meta, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--budget", default="60%")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compactdeploy-bench-budgeted")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COMPACTDEPLOY_CACHE": str(args.work / "cache")}
    command = [str(ROOT / ".venv" / "bin" / "compactdeploy"), "build", "--model", args.model, "--target", "host"]
    tuned = args.work / f"tuned-{args.model}-{args.trials}"
    tuned_now = not (tuned / "report.json").exists()
    if tuned_now:  # the database a user's tuned build leaves behind
        log(f"tuning the unpruned {args.model}: {args.trials} trials")
        started = time.time()
        subprocess.run([*command, "--tune-trials", str(args.trials), "--out", str(tuned)], env=env, check=True)
        tuning_s = round(time.time() - started, 1)
    else:  # tuned by an earlier run: its build's own stage times
        tuning_s = round(sum(json.loads((tuned / "report.json").read_text())["timings_s"].values()), 1)
    out = args.work / f"budgeted-{args.model}"
    log(f"budgeted build: --latency-budget {args.budget}")
    started = time.time()
    subprocess.run([*command, "--latency-budget", args.budget, "--out", str(out)], env=env, check=True)
    wall_s = round(time.time() - started, 1)
    write_results(json.loads((out / "report.json").read_text()), args, wall_s, tuning_s, tuned_now)


def write_results(report: dict, args, wall_s: float, tuning_s: float, tuned_now: bool) -> None:
    fit = report["fit"]
    info = meta("bench_budgeted_build.py", wall_s, model=args.model, trials=args.trials, budget=args.budget,
                weights="random (latency does not depend on weight values)",
                database=f"the records of a {args.trials}-trial tuning of the unpruned model on this host",
                figures="measured on this host (real hardware, a shared 2-core VM); nothing emulated or estimated")
    candidates = [{"widths": c["widths"], "measured_ms": c["measured_ms"], "predicted_ms": c["predicted_ms"],
                   "schedules": c["schedules"], "unscheduled": c["unscheduled"]} for c in fit["verified"]]
    final = fit["final"]
    write_json("fit-budgeted-build", info, candidates, tuning_s=tuning_s, wall_s=wall_s,
               stage_s=report["timings_s"], budget_ms=fit["budget"]["latency_ms"], status=fit["status"],
               predictor_error_pct=fit["predictor_error_pct"], final=final,
               final_builds_over=fit.get("final_builds_over", []), ceiling_ms=fit.get("ceiling_ms"))
    lines = [
        "# A complete budgeted build, from a tuned database",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}`. `build --model {args.model} --target host "
        f"--latency-budget {args.budget}` (random weights), after `build --tune-trials {args.trials}` of the unpruned "
        f"model into the same cache ({tuning_s} s" + ("" if tuned_now else ", an earlier run's, by its stage times") + ").",
        "",
        f"- wall time: {wall_s} s, of it the search {report['timings_s'].get('fit')} s; {len(candidates)} models measured",
        f"- status: {fit['status']}",
        f"- budget {fit['budget']['latency_ms']:.3f} ms; final build judged at {final['judged_ms']:.3f} ms "
        f"({'within' if final['meets_latency_budget'] else 'OVER'}; alone {final['measured_ms']:.3f} ms, the unpruned "
        f"model beside it {final['unpruned_beside_ms'] or float('nan'):.3f} ms)",
        *(f"- not shipped: the model of {', '.join(f'{g}={w}' for g, w in over['widths'].items())}, measured "
          f"{over['searched_ms']:.4f} ms in the search, whose final build measured {over['final_ms']:.4f} ms, over the "
          f"budget; the search, resumed, kept models under {fit['ceiling_ms']:.4f} ms and the next one was built"
          for over in fit.get("final_builds_over", [])),
        "",
        "| model | predicted | measured | schedules | unscheduled conv/matmul |",
        "|---|---|---|---|---|",
    ]
    for index, c in enumerate(candidates):
        predicted = f"{c['predicted_ms']:.3f} ms" if c["predicted_ms"] else "-"
        schedules = ", ".join(f"{k} {v}" for k, v in c["schedules"].items())
        lines.append(f"| {index + 1} | {predicted} | {c['measured_ms']:.3f} ms | {schedules} | {len(c['unscheduled'])} |")
    (DOCS / "fit-budgeted-build.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
