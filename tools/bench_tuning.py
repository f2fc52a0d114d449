#!/usr/bin/env python
"""TVM untuned vs TVM tuned vs onnxruntime vs PyTorch eager, every zoo model, batch 1, this host.

For each model at the zoo's input size: export to ONNX, compile with no tuning records, tune with
MetaSchedule (compactdeploy.tune: warm builder workers, local runner) into a database of this
benchmark's own, compile with the records. Then, on a quiet machine, every variant of every model
is timed in one process, interleaved round by round, all with the same thread count. Weights are
random (seeded): latency does not depend on their values. Also: compile and tuning time per model,
and what a warm database saves when a pruned variant of LeNet-5 is tuned (when lenet5 is among --models).

Writes docs/benchmarks/tuning-benchmark.md, .json and .png. Usage:
    .venv/bin/python tools/bench_tuning.py [--trials-per-kernel 32] [--models lenet5,resnet20]
        [--trials resnet20=2000,mobilenetv2=2000]
The database lives under the cache (bench-tuning/): a rerun resumes the tuning, and reports the
tuning time of the run that did it. --fresh starts from an empty database.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import benchlib
import numpy as np
import torch

from compactdeploy.resources import write_json
from compactdeploy.runtime import use_default_threads
from compactdeploy.compile import compile_onnx, import_onnx, resolve_linker
from compactdeploy.export import export_onnx, onnxruntime_session
from compactdeploy.resources import cache_dir
from compactdeploy.targets import load_target
from compactdeploy.compile import lower_for_tuning
from compactdeploy.tune import TuningDatabase, local_runner, tune
from compactdeploy.zoo import create_model

MODELS = ["mlp-tabular", "lenet300", "lenet5", "resnet20", "mobilenetv2"]
ROUNDS = 15  # interleaved rounds; each times every variant RUNS_PER_ROUND times
RUNS_PER_ROUND = 20
WARMUP = 20
LAYERS_SHOWN = 8  # per model in the markdown; the JSON lists every layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--trials-per-kernel", type=int, default=32,
                        help="tuning budget: this many trials times the model's kernel count")
    parser.add_argument("--max-trials", type=int, default=640, help="cap on one model's tuning budget")
    parser.add_argument("--trials", default="", metavar="MODEL=N,...",
                        help="a model's own tuning budget, instead of the per-kernel rule")
    parser.add_argument("--fresh", action="store_true", help="forget earlier tuning records")
    args = parser.parse_args()
    args.trials = {name: int(n) for name, n in (item.split("=") for item in args.trials.split(",") if item)}
    # as compactdeploy runs models: the user's TVM_NUM_THREADS, else one thread per physical core
    threads = int(use_default_threads())
    torch.set_num_threads(threads)
    target = load_target("host")
    linker = resolve_linker(target)
    root = cache_dir("bench-tuning")
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
        root = cache_dir("bench-tuning")
    history_path = root / "tuning-history.json"  # tuning time of the run that tuned, across resumes
    history = json.loads(history_path.read_text()) if history_path.exists() else {}
    log = lambda message: print(message, flush=True)  # noqa: E731
    start = time.perf_counter()
    builds = []
    database = TuningDatabase(root / "database", {"benchmark": "bench_tuning", "target": target.tvm_target_dict()})
    models = args.models.split(",")
    for name in models:
        builds.append(build_variants(name, target, linker, database, args, history, history_path, root, log))
    # the variant's records are warm only where the full LeNet-5 was tuned into the database; a rerun
    # would find them warm already
    if "lenet5" in models and "warm_database" not in history:
        history["warm_database"] = warm_database_saving(target, linker, database, args, root, log)
        write_json(history_path, history)
    warm = history.get("warm_database") if "lenet5" in models else None
    log("timing every variant, interleaved ...")
    rows = time_interleaved(builds, threads)
    log("timing each kernel inside the model and alone: TVM tuned vs onnxruntime's profiler ...")
    for build, row in zip(builds, rows):
        row["per_layer"] = benchlib.compare_layers(build["untuned"].lib_path, build["tuned"].lib_path, build["onnx"],
                                                   build["example"], threads)
    seconds = time.perf_counter() - start
    info = benchlib.meta(
        "bench_tuning.py", seconds, threads=threads, target=target.tvm_target_dict(),
        trials_per_kernel=args.trials_per_kernel, max_trials=args.max_trials, model_trials=args.trials,
        rounds=ROUNDS, runs_per_round=RUNS_PER_ROUND, weights="random (seeded); latency does not depend on values",
        figures="all measured on this host (real hardware, a 2-core VM); nothing emulated or estimated",
    )
    benchlib.write_json("tuning-benchmark", {**info, "warm_database": warm}, rows)
    write_markdown(info, rows, warm)
    plot(rows)
    log(f"wrote {benchlib.DOCS}/tuning-benchmark.md ({seconds / 60:.1f} min)")


def build_variants(name, target, linker, database, args, history, history_path, root, log) -> dict:
    model = create_model(name)
    directory = root / name
    untuned_dir, tuned_dir = directory / "untuned", directory / "tuned"
    for d in (untuned_dir, tuned_dir):
        d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    example = torch.randn(model.input_shape)
    exported = export_onnx(model.module, example, directory / "model.onnx")
    # unscheduled, as this benchmark's history measured it (tools/bench_schedules.py times the default rules)
    untuned = compile_onnx(exported.path, target, untuned_dir, linker, None, default_schedules=False)
    lowered = lower_for_tuning(import_onnx(exported.path, target), target.tvm_target())
    kernels = untuned.kernels_tunable
    trials = args.trials.get(name, min(args.trials_per_kernel * kernels, args.max_trials))
    log(f"{name}: {kernels} kernels, tuning budget {trials} trials")
    records_before, started = database.record_count(), time.perf_counter()
    try:
        result = tune(lowered, target, database, trials, local_runner(), None, lambda m: log(f"  {name}: {m}"),
                      pick_runner=lambda: local_runner(after_pause=True))
    finally:  # an interrupted run's batches are kept, and so is the time it spent on them
        ran = database.record_count() - records_before
        if ran:
            previous = history.get(name, {"tune_s": 0.0, "trials": 0})
            history[name] = {"tune_s": round(previous["tune_s"] + time.perf_counter() - started, 1),
                             "trials": previous["trials"] + ran}
            write_json(history_path, history)
    tuned = compile_onnx(exported.path, target, tuned_dir, linker, database)
    return {
        "model": name,
        "input_shape": list(model.input_shape),
        "module": model.module.eval(),
        "example": example.numpy(),
        "onnx": exported.path,
        "untuned": untuned,
        "tuned": tuned,
        "tuning": result,
        "tuning_history": history.get(name),
        "trials": trials,
    }


def warm_database_saving(target, linker, database, args, root, log) -> dict:
    """LeNet-5 with its fc1 layer halved: tuned from an empty database, then from the warm one."""
    model = create_model("lenet5", {"fc1": 60})
    torch.manual_seed(0)
    exported = export_onnx(model.module, torch.randn(model.input_shape), root / "lenet5-fc1-60.onnx")
    lowered = lower_for_tuning(import_onnx(exported.path, target), target.tvm_target())
    trials = args.trials_per_kernel * compile_onnx(exported.path, target, root, linker, None, default_schedules=False).kernels_tunable
    outcome = {"variant": "lenet5 with fc1 120 -> 60", "trials_budget": trials}
    for label, db in (
        ("cold", TuningDatabase(root / "cold-variant", {"benchmark": "cold"})),
        ("warm", database),
    ):
        if label == "cold":
            shutil.rmtree(db.path, ignore_errors=True)
        result = tune(lowered, target, db, trials, local_runner(), None, lambda m: log(f"  variant ({label}): {m}"),
                      pick_runner=lambda: local_runner(after_pause=True))
        outcome[label] = {"trials_run": result.trials_run, "trials_reused": result.trials_reused, "tune_s": result.tune_s}
    return outcome


def time_interleaved(builds: list[dict], threads: int) -> list[dict]:
    import tvm
    from tvm import relax

    runners = {}
    for b in builds:
        x = b["example"]
        for variant in ("untuned", "tuned"):
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(b[variant].lib_path)), tvm.cpu())
            tx = tvm.runtime.tensor(x)
            runners[(b["model"], f"tvm-{variant}")] = lambda vm=vm, tx=tx: vm["main"](tx)
        session = onnxruntime_session(b["onnx"], threads)
        feed = {session.get_inputs()[0].name: x}
        runners[(b["model"], "onnxruntime")] = lambda s=session, f=feed: s.run(None, f)
        tx = torch.from_numpy(x)
        module = b["module"]

        def eager(module=module, tx=tx):
            with torch.inference_mode():
                module(tx)

        runners[(b["model"], "torch-eager")] = eager
    times = benchlib.time_interleaved(runners, ROUNDS, RUNS_PER_ROUND, WARMUP)
    rows = []
    for b in builds:
        median = {v: float(np.median(times[(b["model"], v)])) * 1e3 for v in ("tvm-untuned", "tvm-tuned", "onnxruntime", "torch-eager")}
        # the ratio within each round (both timed seconds apart): its spread shows how far the
        # machine's noise moves the headline ratio, which is a median over all rounds
        per_round = [
            np.median(times[(b["model"], "tvm-tuned")][i : i + RUNS_PER_ROUND])
            / np.median(times[(b["model"], "onnxruntime")][i : i + RUNS_PER_ROUND])
            for i in range(0, ROUNDS * RUNS_PER_ROUND, RUNS_PER_ROUND)
        ]
        result = b["tuning"]
        slowest = sorted((k for k in result.tasks if k["best_us"] is not None),
                         key=lambda k: -k["best_us"] * k["calls"])[:4]
        rows.append({
            "model": b["model"],
            "input_shape": b["input_shape"],
            "median_ms": median,
            "tuned_over_onnxruntime": median["tvm-tuned"] / median["onnxruntime"],
            "tuned_over_onnxruntime_per_round_p25_p75": [float(np.percentile(per_round, 25)), float(np.percentile(per_round, 75))],
            "untuned_over_onnxruntime": median["tvm-untuned"] / median["onnxruntime"],
            "kernels": b["tuned"].kernels_tunable,
            "kernels_scheduled": b["tuned"].kernels_scheduled,
            "trial_budget": b["trials"],
            "tuning_s": (b["tuning_history"] or {}).get("tune_s"),
            "trials_run": (b["tuning_history"] or {}).get("trials"),
            # this run's second timing (compactdeploy.tune.rerank.pick_records): kernels timed, records changed, s
            "second_timing": result.picked,
            "compile_s_untuned": round(b["untuned"].compile_s, 2),
            "compile_s_tuned": round(b["tuned"].compile_s, 2),
            "slowest_tuned_kernels": [
                {"kernel": k["kernel"], "calls": k["calls"], "best_us": k["best_us"],
                 "gflops": round(k["flops"] / (k["best_us"] * 1e3), 1) if k["best_us"] else None}
                for k in slowest
            ],
        })
    return rows


def write_markdown(info: dict, rows: list[dict], warm: dict | None) -> None:
    lines = [
        "# TVM tuned vs onnxruntime vs PyTorch, every zoo model (batch 1, this host)",
        "",
        f"Measured on {info['measured_on']}, {info['threads']} threads for every runtime; "
        f"{info['rounds']} interleaved rounds x {info['runs_per_round']} runs per variant, medians; "
        "'per round': tuned / ORT within each round, its quartiles over the rounds (the machine's noise). "
        f"Random weights (latency does not depend on them). All figures real measurements on this host; "
        "none emulated or estimated. Command: `" + info["command"] + "`.",
        "",
        f"Tuning budget: {info['trials_per_kernel']} MetaSchedule trials per kernel, at most "
        f"{info['max_trials']} per model, unless the budget column says otherwise. Trials are those "
        "measured (fewer than the budget where a kernel's search space ran out); tuning time is the wall "
        "time of the runs that tuned (warm builder workers, local runner). The tuned builds apply each "
        "kernel's record as a build does: picked among its fastest by the second timing "
        "(compactdeploy.tune.rerank.pick_records; this run: "
        + ", ".join(f"{r['model']} {r['second_timing'].get('changed', 0)} of {r['second_timing'].get('kernels', 0)} "
                    f"kernels changed in {r['second_timing'].get('s', 0):.0f} s" for r in rows)
        + "; kernels picked in an earlier run keep their pick and are not timed again).",
        "",
        "| model | input | TVM untuned ms | TVM tuned ms | onnxruntime ms | PyTorch eager ms | tuned / ORT | per round (p25-p75) | budget | trials | tuning s | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["median_ms"]
        low, high = r["tuned_over_onnxruntime_per_round_p25_p75"]
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input_shape'][1:]))} | {m['tvm-untuned']:.3f} | {m['tvm-tuned']:.3f} | "
            f"{m['onnxruntime']:.3f} | {m['torch-eager']:.3f} | **{r['tuned_over_onnxruntime']:.2f}** | "
            f"{low:.2f}-{high:.2f} | "
            f"{r['trial_budget']} | {r['trials_run'] or 0} | {r['tuning_s'] or 0:.0f} | {r['compile_s_tuned']:.1f} |"
        )
    lines += ["", "Slowest tuned kernels (MetaSchedule's own measurement, per call):", ""]
    for r in rows:
        parts = [f"{k['kernel']} x{k['calls']}: {k['best_us']:.2f} us ({k['gflops']} GFLOP/s)" for k in r["slowest_tuned_kernels"]]
        lines.append(f"- {r['model']}: " + "; ".join(parts))
    lines += [
        "",
        "### Where the time goes: each convolution shape, TVM tuned vs onnxruntime",
        "",
        "Both runtimes timed inside the model, per kernel: TVM through the Relax VM's instrument hook "
        "(median per call over 200 runs, times its calls), onnxruntime by its own profiler (median of 200 "
        "runs); same thread count; each hook adds a little per kernel. 'TVM alone': the same kernel timed "
        "by itself with warm caches (time_evaluator), as MetaSchedule measures while tuning: the gap "
        "between the two is what the data's place in the caches costs inside the model (written by the "
        "kernel before, partly on the other core). A layer is matched by its input and output shapes (channels "
        "up to onnxruntime's padding) and kernel size; both "
        "runtimes fuse bias, residual add and activation into the convolution. The layers costing most "
        "in either runtime; the JSON has them all.",
    ]
    for r in rows:
        per_layer = r["per_layer"]
        m = r["median_ms"]
        lines += [
            "",
            f"**{r['model']}**: TVM's kernels sum to {per_layer['tvm_sum_us']:.1f} us inside the model "
            f"({per_layer['tvm_alone_sum_us']:.1f} us timed alone) of its {m['tvm-tuned'] * 1e3:.1f} us end to end; "
            f"onnxruntime's nodes sum to {per_layer['onnxruntime_sum_us']:.1f} us, end to end "
            f"{m['onnxruntime'] * 1e3:.1f} us.",
            "",
            "| layer | calls | TVM us | TVM alone us | TVM GFLOP/s | onnxruntime us | onnxruntime GFLOP/s | TVM / ORT |",
            "|---|---|---|---|---|---|---|---|",
        ]
        convs = [x for x in per_layer["layers"] if x["layer"] != "other"]
        for x in convs[:LAYERS_SHOWN] + [x for x in per_layer["layers"] if x["layer"] == "other"]:
            ratio = f"{x['tvm_us'] / x['onnxruntime_us']:.2f}" if x["onnxruntime_us"] else "-"
            lines.append(
                f"| {x['layer']} | {x['tvm_calls']} | {x['tvm_us']:.1f} | {x['tvm_alone_us']:.1f} | {x['tvm_gflops'] or '-'} | "
                f"{x['onnxruntime_us']:.1f} | {x['onnxruntime_gflops'] or '-'} | {ratio} |"
            )
        if len(convs) > LAYERS_SHOWN:
            lines.append(f"| ({len(convs) - LAYERS_SHOWN} more convolution shapes) | | | | | | | |")
    if warm is not None:
        lines += [
            "",
            f"Warm database on a pruned variant ({warm['variant']}, budget {warm['trials_budget']} trials): "
            f"from an empty database {warm['cold']['trials_run']} trials in {warm['cold']['tune_s']:.0f} s; "
            f"from the database the full LeNet-5 was tuned into {warm['warm']['trials_run']} trials in "
            f"{warm['warm']['tune_s']:.0f} s ({warm['warm']['trials_reused']} records of shared kernels reused).",
        ]
    lines += [
        "",
        "![latency](tuning-benchmark.png)",
        "",
    ]
    (benchlib.DOCS / "tuning-benchmark.md").write_text("\n".join(lines))


def plot(rows: list[dict]) -> None:
    plt = benchlib.pyplot()
    variants = ["tvm-untuned", "tvm-tuned", "onnxruntime", "torch-eager"]
    figure, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    for i, variant in enumerate(variants):
        ax.bar([j + i * width for j in range(len(rows))], [r["median_ms"][variant] for r in rows], width, label=variant)
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))], [r["model"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("median latency, ms (log)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(benchlib.DOCS / "tuning-benchmark.png", dpi=110)


if __name__ == "__main__":
    main()
