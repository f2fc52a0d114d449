"""Default schedules against unscheduled TVM and onnxruntime, every zoo model; with --tune, a pruned
variant built after tuning its full model.

For each model (random weights, seeded; latency does not depend on the values) it compiles TVM
unscheduled and with the default rules (compactdeploy/compile/rules.py), and times them and
onnxruntime interleaved, at one thread count. ``--tune resnet20=300`` also tunes that model into
a fresh database and times: the full model tuned; its ``l1:0.5`` variant built from that database
(records for the shapes it shares, default rules for the rest); and the variant from an empty
database (default rules only). Per-layer times (TVM default rules against onnxruntime's profiler)
say which layers stay far from onnxruntime.

Writes docs/benchmarks/default-schedules.{json,md}. Run on an idle machine.
"""

from __future__ import annotations

import argparse
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

MODELS = ["mlp-tabular", "lenet300", "lenet5", "resnet20", "mobilenetv2"]
ROUNDS = 11  # interleaved rounds; each times every variant RUNS_PER_ROUND times
RUNS_PER_ROUND = 10
WARMUP = 10
LAYERS_SHOWN = 6  # per model in the markdown; the JSON lists every layer
VARIANT = "l1:0.5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tune", default="", metavar="MODEL=TRIALS,...",
                        help="tune these full models, then build their l1:0.5 variants from the database")
    args = parser.parse_args()
    tuning = {name: int(n) for name, n in (item.split("=") for item in args.tune.split(",") if item)}
    threads = int(use_default_threads())
    torch.set_num_threads(threads)
    target = load_target("host")
    linker = resolve_linker(target)
    root = cache_dir("bench-schedules")
    shutil.rmtree(root, ignore_errors=True)  # every figure from this run: no records of an earlier one
    root = cache_dir("bench-schedules")
    log = lambda message: print(message, flush=True)  # noqa: E731
    start = time.perf_counter()
    builds = []
    for name in args.models.split(","):
        model = create_model(name)
        torch.manual_seed(0)
        example = torch.randn(model.input_shape)
        directory = root / name
        directory.mkdir(parents=True)
        exported = export_onnx(model.module.eval(), example, directory / "model.onnx")
        build = {"model": name, "input_shape": list(model.input_shape), "example": example.numpy(),
                 "onnx": exported.path, "compiled": {}, "tuning": None}
        for variant, default in (("unscheduled", False), ("default", True)):
            build["compiled"][variant] = compile_onnx(exported.path, target, _fresh(directory / variant), linker, None,
                                                      default_schedules=default)
        log(f"{name}: compiled in {build['compiled']['unscheduled'].compile_s:.1f} s unscheduled, "
            f"{build['compiled']['default'].compile_s:.1f} s with default rules")
        builds.append(build)
        if name in tuning:
            builds.append(tune_then_prune(build, model, example, target, linker, tuning[name], root, log))
    log("timing every variant, interleaved ...")
    rows = time_builds(builds, threads)
    log("timing each kernel inside the model: default rules vs onnxruntime's profiler ...")
    for build, row in zip(builds, rows):
        if "default" in build["compiled"] and "unscheduled" in build["compiled"]:
            row["per_layer"] = benchlib.compare_layers(build["compiled"]["unscheduled"].lib_path,
                                                       build["compiled"]["default"].lib_path, build["onnx"],
                                                       build["example"], threads)
    seconds = time.perf_counter() - start
    info = benchlib.meta(
        "bench_schedules.py", seconds, threads=threads, target=target.tvm_target_dict(),
        vector_unit={"bits": target.vector_unit.bits, "registers": target.vector_unit.registers},
        rounds=ROUNDS, runs_per_round=RUNS_PER_ROUND, weights="random (seeded); latency does not depend on values",
        figures="all measured on this host (real hardware, a 2-core VM); nothing emulated or estimated",
    )
    benchlib.write_json("default-schedules", info, rows)
    write_markdown(info, rows)
    log(f"wrote {benchlib.DOCS}/default-schedules.md ({seconds / 60:.1f} min)")


def _fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def tune_then_prune(full: dict, model, example, target, linker, trials: int, root: Path, log) -> dict:
    """The full model tuned (``trials``), then its ``VARIANT`` compiled from that database and from none."""
    name = full["model"]
    database = TuningDatabase(root / f"{name}-database", {"benchmark": "bench_schedules", "model": name})
    lowered = lower_for_tuning(import_onnx(full["onnx"], target), target.tvm_target())
    result = tune(lowered, target, database, trials, local_runner(), None, lambda m: log(f"  {name}: {m}"),
                  pick_runner=lambda: local_runner(after_pause=True))
    full["compiled"]["tuned"] = compile_onnx(full["onnx"], target, _fresh(root / name / "tuned"), linker, database)
    full["tuning"] = {"trials": result.trials_run, "tune_s": result.tune_s}
    variant_module = model.module.eval()
    pruned = prune(variant_module, example, parse_prune_spec(VARIANT), target.channel_multiple)
    directory = root / f"{name}-{VARIANT}"
    directory.mkdir(parents=True)
    exported = export_onnx(variant_module, example, directory / "model.onnx")
    variant = {"model": f"{name} {VARIANT}", "input_shape": full["input_shape"], "example": full["example"],
               "onnx": exported.path, "compiled": {}, "tuning": None,
               "macs_kept": round(pruned.macs_after / pruned.macs_before, 3)}
    variant["compiled"]["unscheduled"] = compile_onnx(exported.path, target, _fresh(directory / "unscheduled"), linker,
                                                      None, default_schedules=False)
    variant["compiled"]["default"] = compile_onnx(exported.path, target, _fresh(directory / "default"), linker, None)
    variant["compiled"]["after full tuning"] = compile_onnx(exported.path, target, _fresh(directory / "after"), linker,
                                                            database)
    after = variant["compiled"]["after full tuning"]
    log(f"  {name} {VARIANT}: {after.kernels_scheduled}/{after.kernels_tunable} kernels have records of the full model")
    return variant


def time_builds(builds: list[dict], threads: int) -> list[dict]:
    import tvm
    from tvm import relax

    runners = {}
    for b in builds:
        x = tvm.runtime.tensor(b["example"])
        for variant, result in b["compiled"].items():
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(result.lib_path)), tvm.cpu())
            runners[(b["model"], f"tvm {variant}")] = lambda vm=vm, x=x: vm["main"](x)
        session = onnxruntime_session(b["onnx"], threads)
        feed = {session.get_inputs()[0].name: b["example"]}
        runners[(b["model"], "onnxruntime")] = lambda s=session, f=feed: s.run(None, f)
    times = benchlib.time_interleaved(runners, ROUNDS, RUNS_PER_ROUND, WARMUP)
    rows = []
    for b in builds:
        variants = ["onnxruntime"] + [f"tvm {v}" for v in b["compiled"]]
        median = {v: float(np.median(times[(b["model"], v)])) * 1e3 for v in variants}
        # the ratio within each round (timed seconds apart): its spread is the machine's noise
        per_round = [
            np.median(times[(b["model"], "tvm default")][i:i + RUNS_PER_ROUND])
            / np.median(times[(b["model"], "onnxruntime")][i:i + RUNS_PER_ROUND])
            for i in range(0, ROUNDS * RUNS_PER_ROUND, RUNS_PER_ROUND)
        ]
        rows.append({
            "model": b["model"],
            "input_shape": b["input_shape"],
            "median_ms": median,
            "over_onnxruntime": {v: median[v] / median["onnxruntime"] for v in variants[1:]},
            "default_over_onnxruntime_per_round_p25_p75": [float(np.percentile(per_round, 25)),
                                                           float(np.percentile(per_round, 75))],
            "compile_s": {v: round(r.compile_s, 2) for v, r in b["compiled"].items()},
            "schedules": {v: count_by_source(r.schedules) for v, r in b["compiled"].items()},
            "tuning": b["tuning"],
            **({"macs_kept": b["macs_kept"]} if "macs_kept" in b else {}),
        })
    return rows


def write_markdown(info: dict, rows: list[dict]) -> None:
    lines = [
        "# Default schedules: TVM without tuning against onnxruntime (batch 1, this host)",
        "",
        f"Measured on {info['measured_on']}, {info['threads']} threads for every runtime; "
        f"{info['rounds']} interleaved rounds x {info['runs_per_round']} runs per variant, medians; "
        "'per round': default / onnxruntime within each round, its quartiles over the rounds (the "
        "machine's noise). Random weights (latency does not depend on them). All figures are real "
        "measurements on this host; none emulated or estimated. Command: `" + info["command"] + "`.",
        "",
        "| model | onnxruntime ms | TVM unscheduled ms (x ORT) | TVM default rules ms (x ORT, per round) | "
        "other TVM builds ms (x ORT) | compile s unscheduled / default |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, x = r["median_ms"], r["over_onnxruntime"]
        p25, p75 = r["default_over_onnxruntime_per_round_p25_p75"]
        others = "; ".join(f"{v.removeprefix('tvm ')} {m[v]:.3f} ({x[v]:.2f}x)" for v in m
                           if v not in ("onnxruntime", "tvm unscheduled", "tvm default")) or "-"
        lines.append(
            f"| {r['model']} | {m['onnxruntime']:.3f} | {m['tvm unscheduled']:.3f} ({x['tvm unscheduled']:.1f}x) | "
            f"**{m['tvm default']:.3f} ({x['tvm default']:.2f}x**, {p25:.2f}-{p75:.2f}) | {others} | "
            f"{r['compile_s']['unscheduled']:.1f} / {r['compile_s']['default']:.1f} |"
        )
    tuned = [r for r in rows if r["tuning"]]
    for r in tuned:
        lines += ["", f"{r['model']}: tuned with {r['tuning']['trials']} trials in {r['tuning']['tune_s'] / 60:.1f} min "
                  "(the 'tuned' column)."]
    for r in rows:
        if "macs_kept" in r:
            counts = r["schedules"].get("after full tuning", {})
            lines += ["", f"{r['model']} keeps {r['macs_kept']:.0%} of the MACs; built from the full model's "
                      f"database its kernels are {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))} "
                      "('after full tuning'); 'default' is the same variant from an empty database."]
    lines += ["", "## Per layer: where the default rules stay far from onnxruntime", "",
              "Convolutions by shape; TVM kernel times inside the model, onnxruntime's from its profiler; "
              f"the {LAYERS_SHOWN} layers with the most TVM time per model, then the rest together "
              "('other': everything but convolutions)."]
    for r in rows:
        per_layer = r.get("per_layer")
        if not per_layer:
            continue
        lines += ["", f"### {r['model']}", "", "| layer | TVM us (GFLOP/s) | onnxruntime us (GFLOP/s) | TVM / ORT |",
                  "|---|---|---|---|"]
        convolutions = [layer for layer in per_layer["layers"] if layer["layer"] != "other"]
        for layer in convolutions[:LAYERS_SHOWN] + [layer for layer in per_layer["layers"] if layer["layer"] == "other"]:
            ratio = layer["tvm_us"] / layer["onnxruntime_us"] if layer["onnxruntime_us"] else None
            lines.append(
                f"| {layer['layer']} | {layer['tvm_us']:.1f} ({layer['tvm_gflops'] or '-'}) | "
                f"{layer['onnxruntime_us']:.1f} ({layer['onnxruntime_gflops'] or '-'}) | "
                f"{f'{ratio:.2f}x' if ratio else '-'} |"
            )
        lines.append(f"| all | {per_layer['tvm_sum_us']:.1f} | {per_layer['onnxruntime_sum_us']:.1f} | "
                     f"{per_layer['tvm_sum_us'] / per_layer['onnxruntime_sum_us']:.2f}x |")
    (benchlib.DOCS / "default-schedules.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
