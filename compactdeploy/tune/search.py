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

from ..compile.passes import TRANSFERRED, extract_kernels
from ..compile.rules import DEFAULT_RULE
from ..errors import CompactDeployError
from ..targets import TargetSpec
from .adapters import (
    PICK_PAUSE_MS,
    WarmBuilder,
    cpu_tensor_intrinsics,
    kernel_flops,
    kernel_hash,
    metaschedule_logging,
)
from .budget import BATCH, MIN_DEFICIT, TaskState, next_by_measured_time, plan_budgets
from .database import PICK_AMONG, Records, TuningDatabase, mean_seconds, record_key
from .interrupt import KernelSearchStopped, interrupt_between_batches
from .candidates import KernelScratch, TuningRun, default_rule, record_candidate
from .rerank import kernels_to_pick, pick_records
from .transfer import TRANSFER, KernelShape, find_donors, transfer_schedules


@dataclass(frozen=True)
class TuneResult:
    database: Path
    requested_trials: int
    trials_run: int  # this run's measurements
    trials_reused: int  # records already in the database when this run started (transferred ones aside)
    tune_s: float
    tasks: list[dict[str, Any]] = field(default_factory=list)
    # the second timing in this run: kernels timed again, how many took another record, seconds
    picked: dict[str, Any] = field(default_factory=dict)
    # other work on the measuring machine just before its first measurement (runtime.load.load_between);
    # None where nothing was measured or it is not known
    machine_load: dict[str, Any] | None = None
    # per kernel that had no record: the schedules transferred from other widths (transfer.transfer_schedules)
    transferred: list[dict[str, Any]] = field(default_factory=list)
    transfer_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        from ..runtime.load import describe_load, is_busy

        tuned = sum(1 for task in self.tasks if task["best_us"] is not None)
        second = (f"; second timing: {self.picked['changed']} of {self.picked['kernels']} kernels took "
                  "another of their fastest records" if self.picked.get("kernels") else "")
        busy = (f"; BUSY before tuning: {describe_load(self.machine_load)} (later builds apply "
                "these records: to drop them, delete that database and tune again on an idle machine)"
                if is_busy(self.machine_load) and (self.trials_run or self.picked.get("kernels")) else "")
        notes = "".join(f"; {note}" for note in self.notes)
        if not self.requested_trials:  # a build that transfers schedules and tunes nothing
            return (self.transfer_summary() or f"{len(self.tasks)} kernels, nothing to transfer") + second + busy + notes
        transfer = f"; {self.transfer_summary()}" if self.transferred else ""
        return (
            f"{len(self.tasks)} kernels ({tuned} with records); {self.trials_run} trials run, "
            f"{self.trials_reused} reused from {self.database}{transfer}{second}{busy}{notes}"
        )

    def transfer_summary(self) -> str:
        """"transfer: 12 of 14 kernels took schedules tuned at other widths, ...": empty where none was tried."""
        if not self.transferred:
            return ""
        kinds = [k["source"] for k in self.transferred]
        moved = sum(1 for source in kinds if source and source.startswith(TRANSFERRED))
        rule = sum(1 for source in kinds if source == DEFAULT_RULE)
        return (f"transfer: {moved} of {len(kinds)} kernels took schedules tuned at other widths"
                + (f", {rule} kept the default rule (faster, or nothing transferred applied)" if rule else "")
                + f" ({sum(k['transferred'] for k in self.transferred)} candidates timed, {self.transfer_s:.0f} s)")


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
    transfer: bool = True,
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

    First, with ``transfer``, every kernel without a record whose operator the database holds at
    other widths gets those schedules adapted and timed (``transfer.transfer_schedules``): with
    ``trials`` 0 that, and the second timing among the records it made, is all this does.
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
    # a build that only transfers (no trials) does not wait for another build tuning into the database
    with database.locked(required=bool(trials)) as held, cpu_tensor_intrinsics():
        if not held:
            return TuneResult(database.path, trials, 0, 0, round(time.perf_counter() - start, 1), notes=[
                f"no schedules transferred: another build is tuning into {database.path}"])
        records = database.read()
        flops = [kernel_flops(t) for t in tasks]
        # every kernel gets a first measurement, even where half the budget is fewer trials than kernels
        budgets = plan_budgets(flops, [int(t.weight) for t in tasks], max(trials // 2, min(trials, len(tasks))))
        exhausted = database.exhausted()
        # schedules transferred from other widths (and the default rule timed beside them) are
        # records, but not trials of the budget: a short budget after a transfer still searches
        transferred_keys = {key for key, origin in database.origins().items() if origin.get("by") == TRANSFER}
        states = []
        for t, f, budget in zip(tasks, flops, budgets):
            workload_hash = kernel_hash(t)
            count = sum(record_key(line) not in transferred_keys for line in records.of(workload_hash)[1])
            states.append(TaskState(t.task_name, f, int(t.weight), budget, count, records.best_us(workload_hash),
                                    workload_hash, workload_hash in exhausted))
        reused = sum(s.trials for s in states)
        ran = 0
        transferred: list[dict[str, Any]] = []
        transfer_s = 0.0
        picked: dict[str, Any] = {"kernels": 0, "changed": 0, "s": 0.0}
        run: TuningRun | None = None
        try:
            with interrupt_between_batches(database) as interrupt:

                def measuring_run(message: str) -> TuningRun:
                    nonlocal run
                    measuring_starts()
                    say(message)
                    if run is None:
                        run = TuningRun(ms, database, WarmBuilder(linker_command), runner, tasks, states, say,
                                        interrupt, target.vector_unit)
                    return run

                # kernels without records whose operator the database holds at other widths start
                # from those schedules (``transfer``), before any search
                fresh = [i for i, s in enumerate(states) if not records.of(s.workload_hash)[1]] if transfer else []
                shapes = {i: KernelShape.of(tasks[i].dispatched[0]) for i in fresh}
                try:
                    donors = find_donors(records, {shape.operator for shape in shapes.values()},
                                         {states[i].workload_hash for i in fresh}) if fresh else {}
                except ValueError as exc:
                    raise database.damaged(exc) from None
                shapes = {i: shape for i, shape in shapes.items() if donors.get(shape.operator)}
                fresh = list(shapes)
                if fresh:
                    began = time.perf_counter()
                    transferred = transfer_schedules(measuring_run(
                        f"transfer: {len(fresh)} kernels without records; the database holds their operators at "
                        "other widths"), shapes, donors)
                    for index in fresh:
                        states[index].trials = 0  # not trials of the budget (above)
                    transfer_s = round(time.perf_counter() - began, 1)
                    records = database.read()
                if trials:
                    ruled = records.kernels_from(database.origins(), DEFAULT_RULE)
                    ran += _search(measuring_run, states, records, trials, ruled)
                    records = database.read()  # the second timing chooses among the new records too
                # the second timing, after a search, or among the candidates transfer just recorded
                picking = tasks if trials else [tasks[i] for i in fresh]
                to_pick = kernels_to_pick(picking, records, database.picks()) if pick_runner is not None else []
                if to_pick:
                    began = time.perf_counter()
                    measuring = measuring_run(f"second timing: each kernel's {PICK_AMONG} fastest records, each call "
                                              f"after a {PICK_PAUSE_MS} ms pause ({len(to_pick)} kernels)")
                    picked["changed"] = pick_records(to_pick, database, measuring.builder, pick_runner(), say, interrupt)
                    picked.update(kernels=len(to_pick), s=round(time.perf_counter() - began, 1))
                if transferred:
                    _name_applied(transferred, [states[i].workload_hash for i in fresh], database)
        finally:
            if run is not None:
                run.builder.shutdown()
        if ran or transferred or picked["kernels"]:
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
        transferred=transferred,
        transfer_s=transfer_s,
    )


def _search(measuring_run: Callable[[str], TuningRun], states: list[TaskState], records: Records, trials: int,
            ruled: set[str]) -> int:
    """MetaSchedule's search over the kernels still short of their budget; returns the trials it
    measured. ``ruled``: the kernels that have a record of their default rule."""
    # a deficit under a quarter batch on a kernel that has records (its own, or transferred) is not
    # worth MetaSchedule's start-up (~30 s): a rerun whose budget split moved by a few trials tunes
    # nothing, and a short budget after a transfer goes by measured time
    todo = [
        index for index, s in enumerate(states)
        if not s.exhausted and s.budget > s.trials
        and (not records.of(s.workload_hash)[1] or s.budget - s.trials >= MIN_DEFICIT)
    ]
    # kernels tuned before their unscheduled form was measured on this device (databases of older
    # versions): measured once, so that tiny kernels can keep it. Where the default rule was timed
    # (transfer does), it stands in: its tiny kernels run on one thread, as unscheduled ones do.
    unmeasured = [i for i, s in enumerate(states)
                  if records.of(s.workload_hash)[1] and not records.has_unscheduled(s.workload_hash)
                  and s.workload_hash not in ruled]
    if not (unmeasured or todo or next_by_measured_time(states, trials) is not None):
        return 0
    run = measuring_run(f"{len(states)} kernels, {trials} trials (half split by FLOPs, half by measured time); "
                        "loading MetaSchedule")
    ran = 0
    if unmeasured:
        ran += _measure_unscheduled(run, unmeasured, records)
        records = run.database.read()
    if todo or next_by_measured_time(states, trials) is not None:
        ran += _tune_kernels(run, todo, trials, records)
    return ran


def _tune_kernels(run: TuningRun, todo: list[int], trials: int, records: Records) -> int:
    """The search itself: each kernel of ``todo`` to its budget, then rounds by measured time.
    Returns how many candidates it measured."""
    ran, states = 0, run.states
    with tempfile.TemporaryDirectory(prefix="compactdeploy-tune-") as work:
        # a kernel's scratch lives across its rounds: it holds every record of the kernel
        scratches = [
            KernelScratch(Path(work) / f"kernel{index}", run.database, *records.of(s.workload_hash))
            for index, s in enumerate(states)
        ]
        held = sum(scratch.published for scratch in scratches)
        if held:
            run.progress(f"training the cost model on the {held} records the database holds for these kernels")
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


def _measure_unscheduled(run: TuningRun, indices: list[int], records: Records) -> int:
    """Record the unscheduled form of kernels that have records but not that one. Returns how many."""
    run.progress(f"measuring {len(indices)} kernels as they compile unscheduled (their records lack that candidate)")
    with tempfile.TemporaryDirectory(prefix="compactdeploy-unscheduled-") as work:
        for number, index in enumerate(indices):
            run.interrupt.check()
            state = run.states[index]
            # a scratch with the workload alone: MetaSchedule reads every record of a database on open
            scratch = KernelScratch(Path(work) / f"kernel{number}", run.database, records.of(state.workload_hash)[0], [])
            db = run.ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=True)
            unscheduled_us = record_candidate(run, index, db, scratch, None)
            shown = f"{unscheduled_us:.1f} us" if unscheduled_us is not None else "failed to build or run"
            run.progress(f"unscheduled {number + 1}/{len(indices)} {state.name}: {shown} (best record {state.best_us} us)")
    return len(indices)


def _tune_one(run: TuningRun, index: int, label: str, scratch: KernelScratch, cost_model) -> int:
    """Tune kernel ``index`` up to its budget in a scratch database holding its records only,
    publishing after every batch. Returns how many it measured.

    Only the kernel's own records matter to its search (its starting population, the candidates
    not to measure again), and MetaSchedule reads a whole database on open, slowly.
    """
    ms, state = run.ms, run.states[index]
    db = ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=True)
    progress = _TuneProgress(run, state, label, scratch)
    if scratch.published == 0:
        # the search starts beside the two schedules a build has without it: a kernel is never
        # slower tuned than untuned (and the tiniest keep the unscheduled form: see record_candidate)
        record_candidate(run, index, db, scratch, None)
        progress.measured = 1
        rule = default_rule(run, index)
        if rule is not None:
            record_candidate(run, index, db, scratch, rule)
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

    def __init__(self, run: TuningRun, state: TaskState, label: str, scratch: KernelScratch):
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


def check_tunable(target: TargetSpec, trials: int) -> None:
    from ..compile.backends import backend_of

    if trials < 0:
        raise CompactDeployError(f"--tune-trials must be 0 or more (got {trials})")
    if trials and not backend_of(target).tunable:
        raise CompactDeployError(
            f"target {target.name}: tuning is implemented for CPU targets only; build {target.kind} "
            "targets without --tune-trials (their kernels are scheduled by DLight)"
        )


def transfers_schedules(deployment, enabled: bool = True) -> bool:
    """Whether a build without trials still runs the tune stage to transfer schedules to kernels
    without records: the database holds records to transfer, and a device times the candidates."""
    database = deployment.database
    return enabled and database is not None and deployment.measurable and database.record_count() > 0


def tune_model(onnx_path, target: TargetSpec, deployment, trials: int, linker, progress=None,
               transfer: bool = True) -> TuneResult:
    """The tune stage: ``onnx_path`` imported and lowered as the compile stage will, tuned (or, with
    no trials, only given transferred schedules) on ``deployment``'s device, into its database."""
    from ..compile import import_onnx, lower_for_tuning

    database = deployment.database
    lowered = lower_for_tuning(import_onnx(onnx_path, target), target.tvm_target())
    runner, pick_runner = deployment.tuning_runners()
    try:
        return tune(lowered, target, database, trials, runner, linker.command, progress, pick_runner,
                    read_load=deployment.machine_load, transfer=transfer)
    except KeyboardInterrupt:
        raise CompactDeployError(f"tuning interrupted; {database.resume_hint()}") from None


def _name_applied(outcomes: list[dict[str, Any]], workload_hashes: list[str], database: TuningDatabase) -> None:
    """Transfer's outcome names the schedule its own timing found fastest; the build applies the
    database's choice (its ranking of the recorded times, or the second timing's pick), which can be
    another. Each outcome then names the one the build applies, as the compile report does.
    ``workload_hashes``: each outcome's kernel (the database numbers workloads in its own order)."""
    from ..compile.passes import TRANSFERRED_ORIGIN

    records, picks, origins = database.read(), database.picks(), database.origins()
    for outcome, workload_hash in zip(outcomes, workload_hashes):
        index = records.by_hash.get(workload_hash)
        if index not in records.ranked or outcome["source"] is None:
            continue
        origin = origins.get(record_key(records.applied(index, picks)[1]))
        if origin is None:
            continue
        applied = f"{TRANSFERRED} {origin['from']}" if origin["source"] == TRANSFERRED_ORIGIN else origin["source"]
        if applied != outcome["source"]:
            outcome.update(source=applied, first_timing=outcome["source"])
