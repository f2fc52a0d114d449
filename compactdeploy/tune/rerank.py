"""The second timing: each kernel's fastest records timed again, each call after a pause, as the
model runs it, and the fastest so is the one builds apply."""

from __future__ import annotations

import json
from typing import Any

from .adapters import PICK_CALLS, device_type, kernel_hash
from .database import PICK_AMONG, Records, TuningDatabase, pick_stands, top_key
from .interrupt import Interrupt

PICK_ROUNDS = 3  # rounds over a kernel's candidates, interleaved, so a slow moment hits them all


def kernels_to_pick(tasks, records: Records, picks: dict[str, dict[str, Any]]) -> list[tuple[Any, str, list[str]]]:
    """The kernels whose record the second timing should choose: two or more that ran, and no pick
    made among the fastest they have now. Each as (task, structural hash, its fastest records)."""
    todo = []
    for task in tasks:
        workload_hash = kernel_hash(task)
        index = records.by_hash.get(workload_hash)
        top = records.fastest(index, PICK_AMONG) if index is not None else []
        if len(top) >= 2 and not pick_stands(picks.get(workload_hash), top):
            todo.append((task, workload_hash, top))
    return todo


def pick_records(todo, database: TuningDatabase, builder, runner, say, interrupt: Interrupt) -> int:
    """Time each kernel's fastest records again, each call after a pause, and keep the fastest so.

    Tuning times a candidate warm, back to back, and keeps the fastest of thousands of noisy
    timings; a kernel inside the model runs once, after other kernels, its weights partly out of
    the caches, where another of its fastest records can be faster (docs/tuning.md). Each kernel's
    pick is saved as it is made, so an interrupted build keeps the picks done.
    Returns how many kernels took another record than the fastest as tuned.
    """
    import tvm.s_tir.meta_schedule as ms
    from tvm.s_tir import Schedule

    changed = 0
    for number, (task, workload_hash, top) in enumerate(todo, 1):
        interrupt.check()
        workload = ms.database.Workload(task.dispatched[0])
        inputs = []
        for line in top:
            schedule = Schedule(task.dispatched[0])
            ms.database.TuningRecord.from_json(json.loads(line)[1], workload).trace.apply_to_schedule(
                schedule, remove_postproc=False)
            inputs.append((schedule.mod, ms.arg_info.ArgInfo.from_entry_func(schedule.mod, remove_preproc=True)))
        built = builder.build([ms.builder.BuilderInput(mod, task.target) for mod, _ in inputs])
        runnable = [(rank, ms.runner.RunnerInput(b.artifact_path, device_type(task.target), args_info))
                    for rank, (b, (_, args_info)) in enumerate(zip(built, inputs)) if b.error_msg is None]
        times: dict[int, list[float]] = {rank: [] for rank, _ in runnable}
        for _ in range(PICK_ROUNDS):  # interleaved: a slow stretch of the host hits every candidate
            futures = runner.run([runner_input for _, runner_input in runnable])
            for (rank, _), future in zip(runnable, futures):
                result = future.result()
                if result.error_msg is None and result.run_secs:
                    times[rank].extend(float(s) for s in result.run_secs)
        medians = {rank: sorted(t)[len(t) // 2] * 1e6 for rank, t in times.items() if len(t) == PICK_ROUNDS * PICK_CALLS}
        if not medians:
            continue  # none ran again: the kernel keeps its fastest record, and is tried again next build
        rank = min(medians, key=lambda r: (medians[r], r))
        database.save_pick(workload_hash, {"top": top_key(top), "rank": rank,
                                           "us": [round(medians[r], 2) if r in medians else None for r in range(len(top))]})
        changed += rank != 0
        say(f"second timing {number}/{len(todo)} {task.task_name}: record {rank + 1} of {len(top)} "
            f"({medians[rank]:.1f} us after a pause; the fastest as tuned {medians.get(0, float('nan')):.1f} us)")
    return changed
