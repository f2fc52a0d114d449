"""Schedule transfer: a pruned variant built after its full model was tuned, against the same
variant tuned in full and onnxruntime.

For each ``--models NAME=TRIALS`` (random weights, seeded; latency does not depend on the values):
the full model is tuned with TRIALS into a database kept in the cache (a rerun with the same
trials reuses it; tuning resumes where it stopped); its ``l1:0.5`` variant is then built

- from an empty database: default rules only;
- by transfer alone: a copy of the full model's database, the variant's kernels given schedules
  transferred from the full model's widths (``tune(..., trials=0)``, what a plain build does);
- by transfer, then a short tuning budget (10 % of TRIALS) on top;
- tuned in full: TRIALS of its own, from an empty database (the reference).

Every build is timed interleaved with onnxruntime at one thread count. Writes
docs/benchmarks/schedule-transfer.{json,md}. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import benchlib
import numpy as np
import torch

from compactdeploy.compile import compile_onnx, import_onnx, lower_for_tuning, resolve_linker
from compactdeploy.export import export_onnx, onnxruntime_session
from compactdeploy.prune import parse_prune_spec, prune
from compactdeploy.report import count_by_source
from compactdeploy.resources import cache_dir
from compactdeploy.runtime import use_default_threads
from compactdeploy.targets import load_target
from compactdeploy.tune import TuningDatabase, local_runner, tune
from compactdeploy.zoo import create_model

VARIANT = "l1:0.5"
SHORT_SHARE = 0.10  # the short budget, as a share of the full tuning's trials (the goal)
ROUNDS = 11
RUNS_PER_ROUND = 10
PASSES = 3  # independent interleaved timings of every build; the table gives their median and range
WARMUP = 10
BUILDS = ["default rules", "transfer", "transfer + short tuning", "tuned in full"]
TUNING_TIME_FILE = "bench_tune_s.json"  # beside a kept database: the seconds its tuning took, over every run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20=300", metavar="MODEL=TRIALS,...")
    args = parser.parse_args()
    threads = int(use_default_threads())
    torch.set_num_threads(threads)
    target = load_target("host")
    linker = resolve_linker(target)
    root = cache_dir("bench-transfer")
    log = lambda message: print(message, flush=True)  # noqa: E731
    start = time.perf_counter()
    rows, timed = [], {}
    for item in args.models.split(","):
        name, trials = item.split("=")
        row, runners = bench_model(name, int(trials), target, linker, root, threads, log)
        rows.append(row)
        timed.update(runners)
    passes = []
    for number in range(PASSES):
        log(f"timing every build, interleaved (pass {number + 1}/{PASSES}) ...")
        passes.append(benchlib.time_interleaved(timed, ROUNDS, RUNS_PER_ROUND, WARMUP))
    for row in rows:
        per_pass = [{build: float(np.median(times[(row["model"], build)])) * 1e3 for build in ["onnxruntime", *BUILDS]}
                    for times in passes]
        row["median_ms_per_pass"] = per_pass
        row["median_ms"] = {build: float(np.median([p[build] for p in per_pass])) for build in per_pass[0]}
        # ratios within each pass, then their median and range: the builds differ by less than the
        # machine moves between passes, so only ratios taken side by side mean anything
        for key, over in (("over_onnxruntime", "onnxruntime"), ("over_tuned_in_full", "tuned in full")):
            ratios = {build: [p[build] / p[over] for p in per_pass] for build in BUILDS}
            row[key] = {build: float(np.median(r)) for build, r in ratios.items()}
            row[f"{key}_range"] = {build: [min(r), max(r)] for build, r in ratios.items()}
    seconds = time.perf_counter() - start
    info = benchlib.meta(
        "bench_transfer.py", seconds, threads=threads, target=target.tvm_target_dict(), variant=VARIANT,
        rounds=ROUNDS, runs_per_round=RUNS_PER_ROUND, passes=PASSES, weights="random (seeded); latency does not depend on values",
        figures="all measured on this host (real hardware, a 2-core VM); nothing emulated or estimated",
    )
    benchlib.write_json("schedule-transfer", info, rows)
    write_markdown(info, rows)
    log(f"wrote {benchlib.DOCS}/schedule-transfer.md ({seconds / 60:.1f} min)")


def bench_model(name: str, trials: int, target, linker, root: Path, threads: int, log) -> tuple[dict, dict]:
    model = create_model(name)
    torch.manual_seed(0)
    example = torch.randn(model.input_shape)
    work = _fresh(root / name)
    full_onnx = export_onnx(model.module.eval(), example, work / "full.onnx").path
    variant_module = model.module.eval()
    pruned = prune(variant_module, example, parse_prune_spec(VARIANT), target.channel_multiple)
    onnx = export_onnx(variant_module, example, work / "variant.onnx").path
    lowered = lower_for_tuning(import_onnx(onnx, target), target.tvm_target())

    def tuned_into(database: TuningDatabase, module, budget: int, what: str):
        began = time.perf_counter()
        result = tune(module, target, database, budget, local_runner(), None, lambda m: log(f"  {name} {what}: {m}"),
                      pick_runner=lambda: local_runner(after_pause=True))
        return result, time.perf_counter() - began

    def kept_tuning_s(database: TuningDatabase, seconds: float) -> float:
        """The tuning time of a database kept across runs: every run's seconds, summed beside it."""
        path = database.path / TUNING_TIME_FILE
        total = (json.loads(path.read_text())["tune_s"] if path.exists() else 0.0) + seconds
        path.write_text(json.dumps({"tune_s": round(total, 1)}) + "\n")
        return round(total, 1)

    # the full model's database: kept across runs (its tuning is the long part), resumed if cut short
    full_db = TuningDatabase(root / f"{name}-full-{trials}", {"benchmark": "bench_transfer", "model": name})
    full_lowered = lower_for_tuning(import_onnx(full_onnx, target), target.tvm_target())
    _, seconds = tuned_into(full_db, full_lowered, trials, "full model")
    full_tune_s = kept_tuning_s(full_db, seconds)
    builds, tuning = {}, {}
    builds["default rules"] = compile_onnx(onnx, target, _fresh(work / "default"), linker, None)

    transfer_db = _copied(full_db, root / f"{name}-transfer")
    result, seconds = tuned_into(transfer_db, lowered, 0, "transfer")
    builds["transfer"] = compile_onnx(onnx, target, _fresh(work / "transfer"), linker, transfer_db)
    tuning["transfer"] = {"transfer_s": round(seconds, 1), "candidates": sum(k["transferred"] for k in result.transferred),
                          "build_schedules_s": round(seconds + builds["transfer"].compile_s, 1),
                          "kernels": result.transferred}

    short = max(1, round(trials * SHORT_SHARE))
    short_db = _copied(transfer_db, root / f"{name}-short")
    result, seconds = tuned_into(short_db, lowered, short, f"short tuning ({short} trials)")
    builds["transfer + short tuning"] = compile_onnx(onnx, target, _fresh(work / "short"), linker, short_db)
    tuning["transfer + short tuning"] = {"trials": result.trials_run, "tune_s": round(seconds, 1)}

    own_db = TuningDatabase(root / f"{name}-{VARIANT}-{trials}", {"benchmark": "bench_transfer", "model": f"{name} {VARIANT}"})
    _, seconds = tuned_into(own_db, lowered, trials, "tuned in full")
    builds["tuned in full"] = compile_onnx(onnx, target, _fresh(work / "own"), linker, own_db)
    tuning["tuned in full"] = {"trials": own_db.record_count(), "tune_s": kept_tuning_s(own_db, seconds)}

    key = f"{name} {VARIANT}"
    runners = {}
    x = example.numpy()
    import tvm
    from tvm import relax

    for build, compiled in builds.items():
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(compiled.lib_path)), tvm.cpu())
        runners[(key, build)] = lambda vm=vm, x=tvm.runtime.tensor(x): vm["main"](x)
    session = onnxruntime_session(onnx, threads)
    feed = {session.get_inputs()[0].name: x}
    runners[(key, "onnxruntime")] = lambda: session.run(None, feed)
    row = {
        "model": key,
        "macs_kept": round(pruned.macs_after / pruned.macs_before, 3),
        "full_model_tuning": {"trials": full_db.record_count(), "tune_s": full_tune_s},
        "tuning": tuning,
        "schedules": {build: count_by_source(c.schedules) for build, c in builds.items()},
        "compile_s": {build: round(c.compile_s, 1) for build, c in builds.items()},
    }
    return row, runners


def _fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _copied(database: TuningDatabase, path: Path) -> TuningDatabase:
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(database.path, path, ignore=shutil.ignore_patterns("best-*", ".lock"))
    return TuningDatabase(path, database.identity)


def write_markdown(info: dict, rows: list[dict]) -> None:
    lines = [
        "# Schedule transfer: a pruned variant after its full model was tuned (batch 1, this host)",
        "",
        f"Measured on {info['measured_on']}, {info['threads']} threads for every runtime; {info['passes']} passes, "
        f"each {info['rounds']} interleaved rounds x {info['runs_per_round']} runs per build; ratios are taken "
        "within a pass, the table gives their median over the passes and [range]. Random weights (latency does not "
        "depend on them). All figures are real measurements on this host; none emulated or estimated. "
        "Command: `" + info["command"] + "`.",
        "",
        "| variant | onnxruntime ms | default rules x ORT | transfer x ORT; x full tuning | "
        "transfer + short tuning x ORT; x full | tuned in full x ORT |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        x, f = r["over_onnxruntime"], r["over_tuned_in_full"]
        xr, fr = r["over_onnxruntime_range"], r["over_tuned_in_full_range"]

        def cell(build: str, full: bool = True) -> str:
            text = f"{x[build]:.2f}x [{xr[build][0]:.2f}-{xr[build][1]:.2f}]"
            return text + (f"; {f[build]:.2f}x [{fr[build][0]:.2f}-{fr[build][1]:.2f}]" if full else "")

        lines.append(
            f"| {r['model']} | {r['median_ms']['onnxruntime']:.3f} | {cell('default rules')} | **{cell('transfer')}** | "
            f"{cell('transfer + short tuning')} | {cell('tuned in full', full=False)} |"
        )
    for r in rows:
        t = r["tuning"]
        lines += [
            "",
            f"**{r['model']}** (keeps {r['macs_kept']:.0%} of the MACs). The full model was tuned with "
            f"{r['full_model_tuning']['trials']} trials ({r['full_model_tuning']['tune_s'] / 60:.1f} min). Transfer timed {t['transfer']['candidates']} candidates in "
            f"{t['transfer']['transfer_s']:.0f} s, with the second timing of each kernel's fastest (schedules and compile: {t['transfer']['build_schedules_s']:.0f} s); "
            f"the short tuning ran {t['transfer + short tuning']['trials']} trials in "
            f"{t['transfer + short tuning']['tune_s']:.0f} s; the full tuning of the variant holds "
            f"{t['tuned in full']['trials']} records ({t['tuned in full']['tune_s'] / 60:.1f} min). Kernels by source: "
            + "; ".join(f"{build}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                        for build, counts in r["schedules"].items()) + ".",
            "",
            "| kernel | transferred candidates | best us | its source | default rule us |",
            "|---|---|---|---|---|",
        ]
        for k in t["transfer"]["kernels"]:
            best = f"{k['best_us']:.1f}" if k["best_us"] is not None else "-"
            rule = f"{k['default_rule_us']:.1f}" if k["default_rule_us"] is not None else "-"
            lines.append(f"| {k['kernel']} | {k['transferred']} | {best} | {k['source']} | {rule} |")
    (benchlib.DOCS / "schedule-transfer.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
