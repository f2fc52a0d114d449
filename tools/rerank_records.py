#!/usr/bin/env python
"""Is each kernel's fastest record, as tuning measured it, the one to apply? Builds that apply each
kernel's k-th fastest record instead, and one that picks among the top records by a second timing.

Tuning times a candidate warm, back to back (MetaSchedule's runner: 3 x 3 runs of at least 50 ms),
and a build applied the record that timed fastest. On a noisy host the fastest of thousands of
noisy timings is partly luck, and a kernel inside the model never runs warm and back to back. For a
model the benchmark tuned (tools/bench_tuning.py: its ONNX file and database), this compiles:

- ``rank{k}``: every kernel with its (k+1)-th fastest record (``rank0`` is what a build applied
  before the second timing, compactdeploy.tune.rerank.pick_records, which builds now run);
- ``remeasured``: every kernel with whichever of its ``--top`` records ran fastest alone, one call
  at a time, each after a 1 ms pause (``kernel_cache_effect.time_after_pause``), timed in the
  ``rank{k}`` builds;
- ``inmodel``: every kernel with whichever of its ``--top`` records ran fastest inside the model:
  the ``rank{k}`` builds run whole, in interleaved rounds, each kernel timed by the Relax VM's hook
  (``agent.time_each_kernel_in_model``), the median per kernel over all rounds.

Compare them end to end with tools/compare_builds.py (the command is printed). Host only. Usage:
    .venv/bin/python tools/rerank_records.py --model mobilenetv2 [--top 4]
Writes docs/benchmarks/rerank-records-MODEL.json (each kernel's times per rank and the rank picked) and the
builds under ~/.cache/compactdeploy/bench-tuning/MODEL/rerank/.
"""

from __future__ import annotations

import argparse
import json
import time

import benchlib
from kernel_cache_effect import REPEAT, time_after_pause

from compactdeploy.runtime import use_default_threads
from compactdeploy.compile import KERNELS_NAME, compile_onnx, import_onnx, resolve_linker
from compactdeploy.device.agent import time_each_kernel, time_each_kernel_in_model
from compactdeploy.resources import cache_dir
from compactdeploy.targets import load_target
from compactdeploy.compile import extract_kernels, lower_for_tuning
from compactdeploy.tune import Records, TuningDatabase
from compactdeploy.tune.adapters import kernel_hash

SUFFIX = "_prepacked"  # a kernel whose schedule repacks its weights is named so in the library
IN_MODEL_ROUNDS = 10  # interleaved rounds over the rank builds, IN_MODEL_RUNS whole-model runs each
IN_MODEL_RUNS = 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--top", type=int, default=4, help="records per kernel to choose among (default 4)")
    args = parser.parse_args()
    if args.top < 2:
        raise SystemExit("error: --top takes 2 or more (one record leaves nothing to choose)")
    bench = cache_dir("bench-tuning")
    onnx_path, database = bench / args.model / "model.onnx", bench / "database"
    if not onnx_path.exists() or not (database / "database_tuning_record.json").exists():
        raise SystemExit(f"error: no benchmark build of {args.model}: run tools/bench_tuning.py --models {args.model} first")
    # as compactdeploy runs models: the user's TVM_NUM_THREADS, else one thread per physical core
    threads = int(use_default_threads())
    start = time.perf_counter()
    target = load_target("host")
    records = TuningDatabase(database, {}).read()
    tasks = extract_kernels(lower_for_tuning(import_onnx(onnx_path, target), target.tvm_target()), target.tvm_target())
    ranked = {}  # kernel name -> its top record lines, fastest first
    for task in tasks:
        index = records.by_hash.get(kernel_hash(task))
        if index is not None and (fastest := records.fastest(index, args.top)):
            ranked[task.task_name] = fastest
    out = bench / args.model / "rerank"
    times = {}  # rank -> kernel name -> {"after_pause_us", "warm_us", "calls"}
    for rank in range(args.top):
        built = build(f"rank{rank}", records, ranked, {name: rank for name in ranked}, onnx_path, target, out)
        times[rank] = kernel_times(built)
        print(f"rank{rank}: kernels sum to {sum(k['warm_us'] * k['calls'] for k in times[rank].values()):.0f} us warm, "
              f"{sum(k['after_pause_us'] * k['calls'] for k in times[rank].values()):.0f} us after a pause", flush=True)
    in_model = in_model_times(out, args.top)
    for rank in range(args.top):
        for name, us in in_model[rank].items():
            times[rank].setdefault(name, {})["in_model_us"] = us

    def lowest(key: str) -> dict[str, int]:
        """Each kernel's rank with the lowest ``key`` time (rank 0 where none was timed)."""
        return {
            name: min(((times[r][name][key], r) for r in range(min(args.top, len(lines)))
                       if key in times[r].get(name, {})), default=(None, 0))[1]
            for name, lines in ranked.items()
        }

    picked, picked_in_model = lowest("after_pause_us"), lowest("in_model_us")
    build("remeasured", records, ranked, picked, onnx_path, target, out)
    build("inmodel", records, ranked, picked_in_model, onnx_path, target, out)
    rows = [
        {"kernel": name, "records": len(ranked[name]), "picked_rank": picked[name],
         "picked_rank_in_model": picked_in_model[name], **{f"rank{r}": times[r].get(name) for r in range(args.top)}}
        for name in ranked
    ]
    info = benchlib.meta("rerank_records.py", time.perf_counter() - start, threads=threads, top=args.top,
                         method=f"rank k: each kernel's (k+1)-th fastest record as tuned; warm: "
                                f"agent.time_each_kernel({REPEAT}); after a pause: "
                                "kernel_cache_effect.time_after_pause; remeasured: the rank with the lowest "
                                "after-pause time per kernel; in the model: agent.time_each_kernel_in_model, "
                                f"{IN_MODEL_ROUNDS} interleaved rounds of {IN_MODEL_RUNS} runs of every rank "
                                "build, median per call; inmodel: the rank with the lowest in-model time per kernel",
                         figures="all measured on this host; nothing emulated or estimated",
                         database=str(database), builds=str(out))
    benchlib.write_json(f"rerank-records-{args.model}", info, rows)
    kept = sum(rank == 0 for rank in picked.values())
    kept_in_model = sum(rank == 0 for rank in picked_in_model.values())
    print(f"remeasured: {kept} of {len(picked)} kernels keep their fastest record; inmodel: {kept_in_model}; wrote "
          f"{benchlib.DOCS}/rerank-records-{args.model}.json\ncompare end to end with:\n"
          f"  .venv/bin/python tools/compare_builds.py --onnx {onnx_path} --builds "
          f"picked={bench / args.model / 'tuned' / 'model.so'},"  # what a build applies: the tune stage's picks
          + ",".join(f"{label}={out / label / 'model.so'}" for label in ("rank0", "inmodel"))
          + f" --name inmodel-{args.model} --runs 8 --pause 15")


def build(label: str, records: Records, ranked: dict, choice: dict, onnx_path, target, out):
    """Compile the model applying, for every kernel, its record of rank ``choice[kernel]``."""
    scratch = out / label / "records"
    scratch.mkdir(parents=True, exist_ok=True)
    # workload lines whole, so the records' workload numbers stay valid; the build's view keeps
    # one record per kernel, so each kernel gets exactly the record chosen here
    (scratch / "database_workload.json").write_text("\n".join(records.workloads) + "\n")
    (scratch / "database_tuning_record.json").write_text(
        "".join(lines[min(choice[name], len(lines) - 1)] + "\n" for name, lines in ranked.items()))
    compiled = compile_onnx(onnx_path, target, out / label, resolve_linker(target), TuningDatabase(scratch, {}))
    print(f"{label}: {compiled.kernels_scheduled}/{compiled.kernels_tunable} kernels scheduled, "
          f"compiled in {compiled.compile_s:.0f} s", flush=True)
    return out / label


def in_model_times(out, top: int) -> dict[int, dict[str, float]]:
    """Each rank build's kernels timed inside the model (us per call, by kernel name): the builds in
    turn, ``IN_MODEL_ROUNDS`` times, so a slow stretch of the host falls on all of them alike."""
    import numpy as np
    import tvm
    from tvm import relax

    shape = json.loads((out / "rank0" / KERNELS_NAME).read_text())[0]["args"][0]["shape"]
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"))
    machines = {rank: relax.VirtualMachine(tvm.runtime.load_module(str(out / f"rank{rank}" / "model.so")), tvm.cpu())
                for rank in range(top)}
    rounds: dict[int, dict[str, list[float]]] = {rank: {} for rank in range(top)}
    for number in range(IN_MODEL_ROUNDS):
        for rank, vm in machines.items():
            time.sleep(0.2)  # the build before it gone quiet
            for name, ms in time_each_kernel_in_model(vm, x, IN_MODEL_RUNS).items():
                rounds[rank].setdefault(name.removesuffix(SUFFIX), []).append(ms * 1e3)
        print(f"in the model: round {number + 1}/{IN_MODEL_ROUNDS}", flush=True)
    return {rank: {name: round(float(np.median(us)), 2) for name, us in kernels.items()}
            for rank, kernels in rounds.items()}


def kernel_times(built) -> dict[str, dict]:
    import tvm

    library = tvm.runtime.load_module(str(built / "model.so"))
    listed = json.loads((built / KERNELS_NAME).read_text())
    after_pause = time_after_pause(library.imports[0], tvm.cpu(), listed)
    warm = time_each_kernel(library.imports[0], tvm.cpu(), listed, REPEAT)
    return {
        kernel["name"].removesuffix(SUFFIX): {"after_pause_us": round(after_pause[kernel["name"]] * 1e6, 2),
                                              "warm_us": round(w["median_ms"] * 1e3, 2), "calls": kernel["calls"]}
        for kernel, w in zip(listed, warm)
    }


if __name__ == "__main__":
    main()
