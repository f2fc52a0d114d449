#!/usr/bin/env python
"""How one kernel's time falls with more trials, and in which convolution layout: per kernel, per batch.

For a zoo model (random weights, seeded, as tools/bench_tuning.py exports it), lists its kernels with
what a tuning database holds for each (default: the benchmark's own), or tunes the chosen ones
further in a scratch copy of their records (the database is only read), printing after every batch
of 32 the trials so far and the best time. ``--layout NCHW`` lowers the model with its convolutions
left NCHW, to set a kernel's NCHW schedule against its NHWC one (``--fresh`` for both sides: no
records). ``--cost-model fresh`` ranks candidates as MetaSchedule does on its own (a new model per
search, random until it has 100 measurements), to set against the tuner's model trained on the
database's records of all the model's kernels. Host only; the figures are this machine's. Usage:

    .venv/bin/python tools/tune_kernel.py --model mobilenetv2                 # the kernels, records, best
    .venv/bin/python tools/tune_kernel.py --model mobilenetv2 --kernels 14 --trials 192
    .venv/bin/python tools/tune_kernel.py --model resnet20 --kernels 0 --fresh --layout NCHW --trials 64
    .venv/bin/python tools/tune_kernel.py --model mobilenetv2 --kernels 5 --trials 64 --cost-model fresh

Writes docs/benchmarks/kernel-tuning.json (every batch of every kernel tuned, and the command).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchlib
import torch

from compactdeploy.runtime import use_default_threads
from compactdeploy.compile import import_onnx
from compactdeploy.errors import CompactDeployError
from compactdeploy.export import export_onnx
from compactdeploy.resources import cache_dir
from compactdeploy.targets import load_target
from compactdeploy.compile import extract_kernels, lower_for_tuning
from compactdeploy.tune import Records, TuningDatabase, local_runner
from compactdeploy.tune.adapters import WarmBuilder, kernel_flops, kernel_hash, metaschedule_logging
from compactdeploy.tune.budget import BATCH
from compactdeploy.tune.database import text_lines
from compactdeploy.tune.candidates import KernelScratch
from compactdeploy.tune.search import warm_cost_model
from compactdeploy.zoo import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kernels", default="", help="kernel numbers from the listing, comma-separated")
    parser.add_argument("--trials", type=int, default=2 * BATCH, help="trials to add to each chosen kernel")
    parser.add_argument("--layout", choices=["NHWC", "NCHW"], default="NHWC", help="convolution layout")
    parser.add_argument("--fresh", action="store_true", help="search from no records")
    parser.add_argument("--flush-cache", action="store_true",
                        help="measure candidates with their weights and outputs evicted from the caches, as "
                             "inside a model (MetaSchedule's enable_cpu_cache_flush); implies --fresh")
    parser.add_argument("--cost-model", choices=["records", "fresh"], default="records",
                        help="records: trained on the database's records of the model's kernels, as the tuner "
                             "does; fresh: MetaSchedule's own (random until 100 measurements in the search)")
    parser.add_argument("--database", type=Path, default=cache_dir("bench-tuning") / "database")
    args = parser.parse_args()
    args.fresh = args.fresh or args.flush_cache  # warm-cache records are not comparable
    # as compactdeploy runs models: the user's TVM_NUM_THREADS, else one thread per physical core
    threads = int(use_default_threads())
    target = load_target("host")
    try:
        model = create_model(args.model)
    except CompactDeployError as exc:
        raise SystemExit(f"error: {exc}") from None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tune-kernel-") as work:
        torch.manual_seed(0)
        exported = export_onnx(model.module, torch.randn(model.input_shape), Path(work) / "model.onnx")
        tvm_target = target.tvm_target()
        lowered = lower_for_tuning(import_onnx(exported.path, target), tvm_target, args.layout == "NHWC")
        tasks = extract_kernels(lowered, tvm_target)
        records = TuningDatabase(args.database, {}).read()
        for number, task in enumerate(tasks):
            best = records.best_us(kernel_hash(task))
            speed = f", {kernel_flops(task) / (best * 1e3):.0f} GFLOP/s" if best else ""
            print(f"{number:3d} {task.task_name} x{int(task.weight)}: {kernel_flops(task) / 1e6:.2f} MFLOP, "
                  f"{len(records.of(kernel_hash(task))[1])} records, best {best} us{speed}")
        numbers = [n for n in args.kernels.split(",") if n]
        if any(not n.isdigit() or int(n) >= len(tasks) for n in numbers):
            raise SystemExit(f"error: --kernels takes numbers from 0 to {len(tasks) - 1} (the listing above)")
        chosen = [tasks[int(n)] for n in numbers]
        if not chosen:
            return
        rows = []
        builder = WarmBuilder(None)
        try:
            for task in chosen:
                workload, lines = (None, []) if args.fresh else records.of(kernel_hash(task))
                cost_model = "xgb"
                if args.cost_model == "records":
                    # trained anew for each chosen kernel, so each starts from the same model (one shared
                    # across them would carry the first kernel's search into the next); every kernel's
                    # records but the chosen one's where it starts --fresh
                    known = [(t, KernelScratch(Path(tempfile.mkdtemp(dir=work)) / "kernel", None,
                                                *records.of(kernel_hash(t))))
                             for t in tasks if not (args.fresh and t is task)]
                    cost_model = warm_cost_model(known)
                rows.append(tune_further(task, workload, lines, args.trials, builder, Path(tempfile.mkdtemp(dir=work)),
                                         flushed_runner() if args.flush_cache else local_runner(), cost_model))
        finally:
            builder.shutdown()
    info = benchlib.meta("tune_kernel.py", time.perf_counter() - start, threads=threads, model=args.model,
                         layout=args.layout, fresh=args.fresh, flush_cache=args.flush_cache, database=str(args.database),
                         cost_model=args.cost_model,
                         weights="random (seeded); latency does not depend on values",
                         figures="MetaSchedule's own measurement of each candidate on this host; nothing emulated")
    benchlib.write_json("kernel-tuning", info, rows)
    print(f"wrote {benchlib.DOCS}/kernel-tuning.json")


def flushed_runner():
    """A local runner that evicts every argument but the input from the caches before each run."""
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner

    # a flush per run needs one run per repeat (number=1); 20 repeats instead of ~50 ms of runs
    return LocalRunner(timeout_sec=60, evaluator_config=EvaluatorConfig(
        number=1, repeat=20, min_repeat_ms=0, enable_cpu_cache_flush=True))


def tune_further(task, workload: str | None, lines: list[str], trials: int, builder, scratch: Path, runner,
                 cost_model) -> dict:
    """Tune ``task`` ``trials`` more from ``lines`` (its records) in ``scratch``; the best after each batch."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object

    # the tuner's own scratch (never published here: no database to publish to) and record reader
    kernel = KernelScratch(scratch / "kernel", None, workload, lines)
    db = ms.database.JSONDatabase(str(kernel.workloads), str(kernel.records), allow_missing=True)
    flops, start, batches = kernel_flops(task), time.perf_counter(), []

    def best_us() -> float | None:
        # its one workload
        timed = Records.parse(text_lines(kernel.workloads), text_lines(kernel.records)).ranked.get(0)
        return timed[0][0] * 1e6 if timed else None

    row = {"kernel": task.task_name, "calls": int(task.weight), "flops": flops,
           "records_before": len(lines), "best_us_before": best_us(), "batches": batches}

    @derived_object
    class _AfterBatch(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            best = best_us()
            batches.append({"trials": len(db.get_all_tuning_records()), "best_us": best,
                            "gflops": round(flops / (best * 1e3), 1) if best else None,
                            "seconds": round(time.perf_counter() - start, 1)})
            print(f"  {task.task_name}: {batches[-1]['trials']} trials, best {best:.1f} us "
                  f"({batches[-1]['gflops']} GFLOP/s), {batches[-1]['seconds']:.0f} s", flush=True)

    with metaschedule_logging():
        context = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(kernel.path))[0][0]
        ms.tune_tasks(
            tasks=[context], task_weights=[1.0], work_dir=str(kernel.path), max_trials_global=trials,
            max_trials_per_task=trials, num_trials_per_iter=BATCH, builder=builder, runner=runner,
            database=db, measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), _AfterBatch()],
            task_scheduler="round-robin", cost_model=cost_model,
        )
    return row


if __name__ == "__main__":
    main()
