"""The search: MetaSchedule tunes one kernel at a time into the database, publishing every batch,
with one cost model for the whole run trained first on the records the database holds."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compile.passes import RECORDS_FILE, WORKLOADS_FILE, extract_kernels
from ..errors import CompactDeployError
from ..targets import TargetSpec, VectorUnit
from .adapters import (
    PICK_PAUSE_MS,
    WarmBuilder,
    cpu_tensor_intrinsics,
    device_type,
    kernel_flops,
    kernel_hash,
    metaschedule_logging,
)
from .budget import BATCH, MIN_DEFICIT, TaskState, next_by_measured_time, plan_budgets
from .database import FAILED_SECONDS, PICK_AMONG, Records, TuningDatabase, mean_seconds, renumbered, text_lines, workload_index_of
from .interrupt import Interrupt, KernelSearchStopped, interrupt_between_batches
from .rerank import kernels_to_pick, pick_records


@dataclass(frozen=True)
class TuneResult:
    database: Path
    requested_trials: int
    trials_run: int  # this run's measurements
    trials_reused: int  # records already in the database when this run started
    tune_s: float
    tasks: list[dict[str, Any]] = field(default_factory=list)
    # the second timing in this run: kernels timed again, how many took another record, seconds
    picked: dict[str, Any] = field(default_factory=dict)
    # other work on the measuring machine just before its first measurement (runtime.load.load_between);
    # None where nothing was measured or it is not known
    machine_load: dict[str, Any] | None = None

    def summary(self) -> str:
        from ..runtime.load import describe_load, is_busy

        tuned = sum(1 for task in self.tasks if task["best_us"] is not None)
        second = (f"; second timing: {self.picked['changed']} of {self.picked['kernels']} kernels took "
                  "another of their fastest records" if self.picked.get("kernels") else "")
        busy = (f"; BUSY before tuning: {describe_load(self.machine_load)} (later builds apply "
                "these records: to drop them, delete that database and tune again on an idle machine)"
                if is_busy(self.machine_load) and (self.trials_run or self.picked.get("kernels")) else "")
        return (
            f"{len(self.tasks)} kernels ({tuned} with records); {self.trials_run} trials run, "
            f"{self.trials_reused} reused from {self.database}{second}{busy}"
        )


def tune(
    lowered,
    target: TargetSpec,
    database: TuningDatabase,
    trials: int,
    runner,
    linker_command: str | None,
    progress: Callable[[str], None] | None = None,
    pick_runner: Callable[[], Any] | None = None,
    read_load: Callable[[], dict[str, Any] | None] | None = None,
) -> TuneResult:
    """Spend up to ``trials`` measurements on ``lowered``'s kernels, resuming from the database.

    Half the trials are split by FLOPs before anything is measured (``plan_budgets``), the rest by
    the time each kernel then costs the model (``next_by_measured_time``). Records already in the
    database count toward both, so rerunning an interrupted build continues where it stopped and a
    finished one tunes nothing. Then, where ``pick_runner`` makes a runner that times each call
    after a pause (``local_runner(after_pause=True)``), each kernel's record is chosen among its
    fastest by that second timing (``pick_records``); kernels picked before are not timed again.
    ``read_load`` samples other work on the measuring machine (``runtime.load.load_between``) once,
    before the first measurement; where it is busy, every progress line after says so.
    """
    import tvm.s_tir.meta_schedule as ms
    import tvm_ffi

    # exceptions raised in our callbacks cross MetaSchedule's C++ loop as the RuntimeError TVM's FFI
    # makes of a type it does not know, unless registered: our own stop, and a KeyboardInterrupt
    # (a progress callback's, or Ctrl-C where the application, not tune(), owns SIGINT)
    tvm_ffi.register_error("KeyboardInterrupt", KeyboardInterrupt)
    tvm_ffi.register_error(KernelSearchStopped)
    report = progress or (lambda message: None)
    machine_load: dict[str, Any] | None = None
    busy, load_read = "", read_load is None

    def say(message: str) -> None:
        report(busy + message)  # every line says so: records timed now stay for later builds

    def measuring_starts() -> None:
        nonlocal machine_load, busy, load_read
        if not load_read:
            from ..runtime.load import is_busy, taken_share

            machine_load, load_read = read_load(), True
            busy = f"BUSY ({taken_share(machine_load):.0%} other load) · " if is_busy(machine_load) else ""

    start = time.perf_counter()
    tvm_target = target.tvm_target()
    tasks = extract_kernels(lowered, tvm_target)
    with database.locked(), cpu_tensor_intrinsics():
        records = database.read()
        flops = [kernel_flops(t) for t in tasks]
        # every kernel gets a first measurement, even where half the budget is fewer trials than kernels
        budgets = plan_budgets(flops, [int(t.weight) for t in tasks], max(trials // 2, min(trials, len(tasks))))
        exhausted = database.exhausted()
        states = []
        for t, f, budget in zip(tasks, flops, budgets):
            workload_hash = kernel_hash(t)
            count = len(records.of(workload_hash)[1])
            states.append(TaskState(t.task_name, f, int(t.weight), budget, count, records.best_us(workload_hash),
                                    workload_hash, workload_hash in exhausted))
        reused = sum(s.trials for s in states)
        # a deficit under a quarter batch on a kernel that has records is not worth MetaSchedule's
        # start-up (~30 s): a rerun whose budget split moved by a few trials tunes nothing
        todo = [
            index for index, s in enumerate(states)
            if not s.exhausted and s.budget > s.trials and (s.trials == 0 or s.budget - s.trials >= MIN_DEFICIT)
        ]
        ran = 0
        picked: dict[str, Any] = {"kernels": 0, "changed": 0, "s": 0.0}
        builder = None
        try:
            with interrupt_between_batches(database) as interrupt:
                # kernels tuned before their unscheduled form was measured on this device (databases
                # of older versions): measured once, so that tiny kernels can keep it
                unmeasured = [i for i, s in enumerate(states) if s.trials and not records.has_unscheduled(s.workload_hash)]
                if unmeasured or todo or next_by_measured_time(states, trials) is not None:
                    measuring_starts()
                    say(f"{len(tasks)} kernels, {trials} trials (half split by FLOPs, half by measured time); "
                        "loading MetaSchedule")
                    builder = WarmBuilder(linker_command)
                    run = _Run(ms, database, builder, runner, tasks, states, say, interrupt, target.vector_unit)
                    if unmeasured:
                        ran += _measure_unscheduled(run, unmeasured, records)
                        records = database.read()
                    if todo or next_by_measured_time(states, trials) is not None:
                        searched = _tune_kernels(run, todo, trials, records, reused)
                        ran += searched
                        if searched:
                            records = database.read()  # the second timing chooses among the new records too
                to_pick = kernels_to_pick(tasks, records, database.picks()) if pick_runner is not None else []
                if to_pick:
                    measuring_starts()
                    began = time.perf_counter()
                    say(f"second timing: each kernel's {PICK_AMONG} fastest records, each call after a "
                        f"{PICK_PAUSE_MS} ms pause ({len(to_pick)} kernels)")
                    builder = builder or WarmBuilder(linker_command)
                    picked["changed"] = pick_records(to_pick, database, builder, pick_runner(), say, interrupt)
                    picked.update(kernels=len(to_pick), s=round(time.perf_counter() - began, 1))
        finally:
            if builder is not None:
                builder.shutdown()
        if ran or picked["kernels"]:
            database.remove_stale_views()  # and makes the one the build applies next
        picks = database.picks()
    return TuneResult(
        database=database.path,
        requested_trials=trials,
        trials_run=ran,
        trials_reused=reused,
        tune_s=round(time.perf_counter() - start, 1),
        # the records as they stand after this run (the search and the unscheduled step re-read them)
        tasks=[{**s.as_dict(), "applied": records.applied_summary(s.workload_hash, picks)} for s in states],
        picked=picked,
        machine_load=machine_load,
    )


@dataclass
class _Run:
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


def _tune_kernels(run: _Run, todo: list[int], trials: int, records: Records, reused: int) -> int:
    """The search itself: each kernel of ``todo`` to its budget, then rounds by measured time.
    Returns how many candidates it measured."""
    ran, states = 0, run.states
    with tempfile.TemporaryDirectory(prefix="compactdeploy-tune-") as work:
        # a kernel's scratch lives across its rounds: it holds every record of the kernel
        scratches = [
            KernelScratch(Path(work) / f"kernel{index}", run.database, *records.of(s.workload_hash))
            for index, s in enumerate(states)
        ]
        if reused:
            run.progress(f"training the cost model on the {reused} records the database holds for these kernels")
        cost_model = warm_cost_model(list(zip(run.tasks, scratches)))
        run.interrupt.check()

        def search(index: int, label: str) -> int:
            run.interrupt.check()
            measured = _tune_one(run, index, label, scratches[index], cost_model)
            run.interrupt.check()
            return measured

        for number, index in enumerate(todo, 1):
            ran += search(index, f"kernel {number}/{len(todo)}")
        round_ = 0
        while (chosen := next_by_measured_time(states, trials)) is not None:
            index, extra = chosen
            states[index].budget = states[index].trials + extra
            round_ += 1
            measured = search(index, f"by measured time, round {round_}:")
            ran += measured
            if measured == 0:  # its searches find nothing to measure: give its share to the others
                states[index].exhausted = True
    return ran


def _measure_unscheduled(run: _Run, indices: list[int], records: Records) -> int:
    """Record the unscheduled form of kernels that have records but not that one. Returns how many."""
    run.progress(f"measuring {len(indices)} kernels as they compile unscheduled (their records lack that candidate)")
    with tempfile.TemporaryDirectory(prefix="compactdeploy-unscheduled-") as work:
        for number, index in enumerate(indices):
            run.interrupt.check()
            state = run.states[index]
            # a scratch with the workload alone: MetaSchedule reads every record of a database on open
            scratch = KernelScratch(Path(work) / f"kernel{number}", run.database, records.of(state.workload_hash)[0], [])
            db = run.ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=True)
            unscheduled_us = _record_candidate(run, index, db, scratch, None)
            shown = f"{unscheduled_us:.1f} us" if unscheduled_us is not None else "failed to build or run"
            run.progress(f"unscheduled {number + 1}/{len(indices)} {state.name}: {shown} (best record {state.best_us} us)")
    return len(indices)


def _tune_one(run: _Run, index: int, label: str, scratch: KernelScratch, cost_model) -> int:
    """Tune kernel ``index`` up to its budget in a scratch database holding its records only,
    publishing after every batch. Returns how many it measured.

    Only the kernel's own records matter to its search (its starting population, the candidates
    not to measure again), and MetaSchedule reads a whole database on open, slowly.
    """
    ms, state = run.ms, run.states[index]
    db = ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=True)
    progress = _TuneProgress(run, state, label, scratch)
    if state.trials == 0:
        # the search starts beside the two schedules a build has without it: a kernel is never
        # slower tuned than untuned (and the tiniest keep the unscheduled form: see _record_candidate)
        _record_candidate(run, index, db, scratch, None)
        progress.measured = 1
        rule = _default_rule(run, index)
        if rule is not None:
            _record_candidate(run, index, db, scratch, rule)
            progress.measured = 2
        run.interrupt.check()
    remaining = state.budget - state.trials
    if remaining <= 0:
        return progress.measured
    run.progress(progress.line())
    with metaschedule_logging(), contextlib.suppress(KernelSearchStopped):
        context = ms.relax_integration.extracted_tasks_to_tune_contexts([run.tasks[index]], str(scratch.path))[0][0]
        ms.tune_tasks(
            tasks=[context],
            task_weights=[1.0],
            work_dir=str(scratch.path),
            max_trials_global=remaining,
            max_trials_per_task=remaining,
            num_trials_per_iter=BATCH,
            builder=run.builder,
            runner=run.runner,
            database=db,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress.callback()],
            task_scheduler="round-robin",
            cost_model=cost_model,
        )
    return progress.measured


def warm_cost_model(kernels: list[tuple[Any, KernelScratch]]):
    """One XGBoost cost model for a whole tuning run, first trained on the records the kernels hold.

    MetaSchedule makes a new model for every ``tune_tasks`` call, and that model ranks candidates
    at random until the call has measured 100 of its own (``num_warmup_samples``). The tuner calls
    it once per kernel and round, for at most ``ROUND_TRIALS`` (and a kernel's first round is often
    under 32), so nearly every candidate was chosen at random. This model ranks from the first batch
    on, learns across kernels as MetaSchedule's own multi-task runs do, and retrains after every
    batch (its adaptive mode would wait for 20% more data, hundreds of trials once warm).
    Training costs far less per record than measuring a trial (docs/tuning.md).
    """
    import tvm.s_tir.meta_schedule as ms

    model = ms.cost_model.XGBModel(adaptive_training=False)
    for task, scratch in kernels:
        if not scratch.published:
            continue
        # per kernel: making a tune context sets MetaSchedule's console logging back to DEBUG
        with metaschedule_logging():
            db = ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=False)
            records = db.get_all_tuning_records()
            context = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(scratch.path))[0][0]
            results = [ms.runner.RunnerResult([float(s) for s in r.run_secs] if r.run_secs else None, None)
                       for r in records]
            model.update(context, [r.as_measure_candidate() for r in records], results)
    return model


class _TuneProgress:
    """After each batch: publish the scratch database atomically and report the best so far."""

    def __init__(self, run: _Run, state: TaskState, label: str, scratch: KernelScratch):
        self.state, self.label, self.states = state, label, run.states
        self.database, self.scratch, self.say, self.interrupt = run.database, scratch, run.progress, run.interrupt
        self.measured = 0

    def after_batch(self, builder_results, runner_results) -> bool:
        """Returns whether the search space ran out (a batch far smaller than asked for)."""
        asked = min(BATCH, self.state.budget - self.state.trials)
        for built, run in zip(builder_results, runner_results):
            self.measured += 1
            self.state.trials += 1
            if built.error_msg is None and run.error_msg is None and run.run_secs:
                us = mean_seconds(run.run_secs) * 1e6
                if self.state.best_us is None or us < self.state.best_us:
                    self.state.best_us = round(us, 3)
        self.scratch.publish()
        # MetaSchedule keeps asking its search for a full batch of unmeasured candidates; on a small
        # kernel (a pool, a bias add) it finds a few, then none, and each such round still costs seconds
        exhausted = asked >= MIN_DEFICIT and len(builder_results) < MIN_DEFICIT
        if exhausted:
            self.state.exhausted = True
            self.database.mark_exhausted(self.state.workload_hash, self.state.trials)
        self.say(self.line())
        return exhausted

    def line(self) -> str:
        known = [s for s in self.states if s.best_us is not None]
        model = sum(s.best_us * s.weight for s in known)
        best = f"{self.state.best_us:.1f} us" if self.state.best_us is not None else "none yet"
        done = " (no new candidates: done)" if self.state.exhausted else ""
        return (
            f"{self.label} {self.state.name}: {self.state.trials}/{self.state.budget} trials{done}, "
            f"best {best}; tuned kernels sum to {model / 1000:.3f} ms ({len(known)}/{len(self.states)} kernels)"
        )

    def callback(self):
        """The MetaSchedule measure callback that calls ``after_batch``."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        progress = self

        @derived_object
        class _Callback(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                exhausted = progress.after_batch(builder_results, runner_results)
                if exhausted or progress.interrupt.requested:
                    # not task_scheduler.terminate_task: when this batch is joined from the scheduler's
                    # NextTaskId, it then picks the task it just saw running and fails its own check
                    # "!task->is_terminated" (seen on Ctrl-C); an exception leaves its loop cleanly
                    raise KernelSearchStopped

        return _Callback()


def _default_rule(run: _Run, index: int):
    """Kernel ``index``'s default-rule schedule (what an untuned build compiles), or None where no rule fits."""
    from ..compile.rules import default_schedule

    task = run.tasks[index]
    return default_schedule(task.dispatched[0], task.target, run.vector_unit)


def _record_candidate(run: _Run, index: int, db, scratch: KernelScratch, schedule) -> float | None:
    """Measure kernel ``index`` with ``schedule`` (None: as it compiles with no schedule) and record
    that as a candidate: in ``db`` (the kernel's scratch), published to the persistent database,
    counted in ``state``.

    Tiny kernels (a 30x64 matmul) run faster unscheduled, on one thread, than any parallel
    schedule the search finds; with this record in the database they keep the faster one.
    Returns the time in microseconds, or None where it failed to build or run.
    """
    from tvm.s_tir import Schedule

    ms, task, state = run.ms, run.tasks[index], run.states[index]
    mod = task.dispatched[0]
    schedule = Schedule(mod) if schedule is None else schedule
    target = task.target
    args_info = ms.arg_info.ArgInfo.from_entry_func(schedule.mod, remove_preproc=True)  # repacked weights' shapes
    built = run.builder.build([ms.builder.BuilderInput(schedule.mod, target)])[0]
    result = None
    if built.error_msg is None:
        result = run.runner.run([ms.runner.RunnerInput(built.artifact_path, device_type(target), args_info)])[0].result()
    ran = result is not None and result.error_msg is None and bool(result.run_secs)
    # a failure is recorded as MetaSchedule records one (1e10 s), so no later run measures it again
    seconds = [float(s) for s in result.run_secs] if ran else [FAILED_SECONDS * 10]
    db.commit_tuning_record(ms.database.TuningRecord(schedule.trace, db.commit_workload(mod), seconds, target, args_info))
    scratch.publish()
    state.trials += 1
    if not ran:
        return None
    us = round(mean_seconds(seconds) * 1e6, 3)
    if state.best_us is None or us < state.best_us:
        state.best_us = us
    return us


class KernelScratch:
    """One kernel's scratch database: its records from the persistent one, new ones published back."""

    def __init__(self, path: Path, database: TuningDatabase, workload_line: str | None, record_lines: list[str]):
        self.path, self.database = path, database
        self.workloads, self.records = path / WORKLOADS_FILE, path / RECORDS_FILE
        path.mkdir()
        if workload_line is not None:
            self.workloads.write_text(workload_line + "\n")
            self.records.write_text("".join(renumbered(line, 0) + "\n" for line in record_lines))
        self.published = len(record_lines)

    def publish(self) -> None:
        """Copy the records MetaSchedule added since the last call into the persistent database."""
        lines = text_lines(self.records)
        new = lines[self.published:]
        if not new:
            return
        if any(workload_index_of(line) != 0 for line in new):  # the scratch holds one kernel
            raise RuntimeError(f"a record for another kernel in {self.records}")
        self.database.publish(text_lines(self.workloads)[0], new)
        self.published = len(lines)


def check_tunable(target: TargetSpec, trials: int) -> None:
    from ..compile.backends import backend_of

    if trials < 0:
        raise CompactDeployError(f"--tune-trials must be 0 or more (got {trials})")
    if trials and not backend_of(target).tunable:
        raise CompactDeployError(
            f"target {target.name}: tuning is implemented for CPU targets only; build {target.kind} "
            "targets without --tune-trials (their kernels are scheduled by DLight)"
        )
