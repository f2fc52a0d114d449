"""Measuring one kernel's candidates outside MetaSchedule's search: what a tuning run shares, the
kernel's scratch database, and recording a schedule (or none) as a measured record.

The search (``search``) and schedule transfer (``transfer``) both record candidates this way: the
unscheduled form, the default rule's schedule, schedules transferred from other widths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compile.passes import RECORDS_FILE, WORKLOADS_FILE
from ..targets import VectorUnit
from .adapters import device_type
from .budget import TaskState
from .database import FAILED_SECONDS, TuningDatabase, mean_seconds, renumbered, text_lines, workload_index_of
from .interrupt import Interrupt


@dataclass
class TuningRun:
    """What every step of one tuning run shares: MetaSchedule, the database, the builder and runner
    that measure candidates, the kernels and their states, where progress goes, and Ctrl-C."""

    ms: Any  # tvm.s_tir.meta_schedule
    database: TuningDatabase
    builder: Any
    runner: Any
    tasks: list
    states: list[TaskState]
    progress: Callable[[str], None]
    interrupt: Interrupt
    vector_unit: VectorUnit  # sizes the default-rule candidate (compile.rules)


def default_rule(run: TuningRun, index: int):
    """Kernel ``index``'s default-rule schedule (what an untuned build compiles), or None where no rule fits."""
    from ..compile.rules import default_schedule

    task = run.tasks[index]
    return default_schedule(task.dispatched[0], task.target, run.vector_unit)


@dataclass(frozen=True)
class Measured:
    """One recorded candidate: its time, or why it has none."""

    us: float | None  # None: it failed to build or run
    error: str | None = None


def record_candidates(run: TuningRun, index: int, db, scratch: KernelScratch,
                      candidates: list[tuple[Any, dict[str, Any] | None]]) -> list[Measured]:
    """Measure kernel ``index`` with each ``(schedule, origin)`` of ``candidates`` (schedule None:
    as it compiles with no schedule; origin: where the schedule came from, kept beside its record,
    ``TuningDatabase.origins``) and record each as a candidate: in ``db`` (the kernel's scratch),
    published to the persistent database, counted in the kernel's state.

    The candidates build together (the builder's workers in parallel) and run one after another.
    A failure is recorded as MetaSchedule records one (1e10 s), so no later run measures it again.
    """
    from tvm.s_tir import Schedule

    ms, task, state = run.ms, run.tasks[index], run.states[index]
    mod = task.dispatched[0]
    schedules = [Schedule(mod) if schedule is None else schedule for schedule, _ in candidates]
    # the repacked weights' shapes, as the kernel is called once its repacking runs at compile time
    args_infos = [ms.arg_info.ArgInfo.from_entry_func(s.mod, remove_preproc=True) for s in schedules]
    built = run.builder.build([ms.builder.BuilderInput(s.mod, task.target) for s in schedules])
    runnable = [i for i, b in enumerate(built) if b.error_msg is None]
    futures = run.runner.run([ms.runner.RunnerInput(built[i].artifact_path, device_type(task.target), args_infos[i])
                              for i in runnable])
    results: dict[int, Any] = {i: future.result() for i, future in zip(runnable, futures)}
    workload = db.commit_workload(mod)
    measured = []
    for i, schedule in enumerate(schedules):
        result = results.get(i)
        ran = result is not None and result.error_msg is None and bool(result.run_secs)
        seconds = [float(s) for s in result.run_secs] if ran else [FAILED_SECONDS * 10]
        db.commit_tuning_record(ms.database.TuningRecord(schedule.trace, workload, seconds, task.target, args_infos[i]))
        state.trials += 1
        if not ran:
            error = built[i].error_msg or (result.error_msg if result is not None else None) or "no time"
            measured.append(Measured(None, error))
            continue
        us = round(mean_seconds(seconds) * 1e6, 3)
        if state.best_us is None or us < state.best_us:
            state.best_us = us
        measured.append(Measured(us))
    scratch.publish([origin for _, origin in candidates])
    return measured


def record_candidate(run: TuningRun, index: int, db, scratch: KernelScratch, schedule,
                     origin: dict[str, Any] | None = None) -> float | None:
    """``record_candidates`` for one schedule; returns its time in microseconds (None: it failed).

    Tiny kernels (a 30x64 matmul) run faster unscheduled, on one thread, than any parallel
    schedule the search finds; with that record in the database they keep the faster one.
    """
    return record_candidates(run, index, db, scratch, [(schedule, origin)])[0].us


class KernelScratch:
    """One kernel's scratch database: its records from the persistent one, new ones published back."""

    def __init__(self, path: Path, database: TuningDatabase | None, workload_line: str | None, record_lines: list[str]):
        self.path, self.database = path, database
        self.workloads, self.records = path / WORKLOADS_FILE, path / RECORDS_FILE
        path.mkdir()
        if workload_line is not None:
            self.workloads.write_text(workload_line + "\n")
            self.records.write_text("".join(renumbered(line, 0) + "\n" for line in record_lines))
        self.published = len(record_lines)

    def publish(self, origins: list[dict[str, Any] | None] | None = None) -> None:
        """Copy the records MetaSchedule added since the last call into the persistent database;
        ``origins``: where each new record's schedule came from, in order (None: the search)."""
        lines = text_lines(self.records)
        new = lines[self.published:]
        if not new:
            return
        if any(workload_index_of(line) != 0 for line in new):  # the scratch holds one kernel
            raise RuntimeError(f"a record for another kernel in {self.records}")
        if origins is not None and len(origins) != len(new):
            raise RuntimeError(f"{len(origins)} origins for {len(new)} new records in {self.records}")
        self.database.publish(text_lines(self.workloads)[0], new, origins)
        self.published = len(lines)
