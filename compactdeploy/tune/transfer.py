"""Schedule transfer: a kernel without a record takes a schedule tuned for the same operator at
another width.

A pruned model's kernels are new shapes, but the database often holds the same operator at other
widths (the full model's layers, another variant's). Their MetaSchedule traces replay on the new
kernel with the inner tile and vector decisions kept and the outer loops split again
(``adapt_factors``); the few nearest are timed on the device beside the kernel's default rule, and
every one becomes a record, so builds apply the fastest and a tuning run starts its search from
them. Transfer-Tuning (Gibson & Cano, PACT 2022) reached up to 88 % of Ansor's full-tuning
speed-up this way, at a fraction of the search time.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compile.passes import TRANSFERRED, TRANSFERRED_ORIGIN
from ..compile.rules import DEFAULT_RULE
from ..errors import first_line
from .adapters import metaschedule_logging
from .candidates import KernelScratch, TuningRun, default_rule, record_candidates
from .database import Records

TRANSFER_CANDIDATES = 6  # transferred schedules timed per kernel, beside its default rule
TRANSFER = "transfer"  # the ``by`` of the origins this step records (not trials of a tuning budget)
_REDUCE = 2  # tirx.IterVar.CommReduce
_SAMPLES = ("SamplePerfectTile", "SampleCategorical", "SampleComputeLocation")


@dataclass(frozen=True)
class KernelShape:
    """A kernel's loop nest as transfer compares them: its blocks in order, each with its iterator
    kinds (spatial or reduction) and extents."""

    names: tuple[str, ...]
    kinds: tuple[tuple[int, ...], ...]
    extents: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, mod) -> KernelShape:
        from tvm.s_tir import Schedule

        schedule = Schedule(mod)
        blocks = [schedule.get(b) for b in schedule.get_child_blocks(schedule.get_sblock("root"))]
        return cls(
            tuple(b.name_hint for b in blocks),
            tuple(tuple(int(v.iter_type) for v in b.iter_vars) for b in blocks),
            tuple(tuple(int(v.dom.extent) for v in b.iter_vars) for b in blocks),
        )

    @property
    def operator(self) -> tuple:
        """What must match for a schedule to transfer: the blocks and their loops, not their sizes.
        Block names lose their numbers (``lv90_red``, ``T_add1``: names the importer made)."""
        return tuple((re.sub(r"\d+", "", name), kinds) for name, kinds in zip(self.names, self.kinds))

    def distance(self, other: KernelShape) -> float:
        """How far apart two shapes of one operator are: summed log-ratios of their loop extents."""
        return sum(abs(math.log(a / b)) for mine, theirs in zip(self.extents, other.extents)
                   for a, b in zip(mine, theirs) if a > 0 and b > 0)

    def describe(self) -> str:
        """``conv2d_nhwc 1x32x32x16 (reducing 3x3x16)``: the main block, its output and reduction."""
        main = next((i for i, kinds in enumerate(self.kinds) if _REDUCE in kinds), len(self.names) - 1)
        kinds, extents = self.kinds[main], self.extents[main]
        spatial = "x".join(str(e) for k, e in zip(kinds, extents) if k != _REDUCE)
        reduced = "x".join(str(e) for k, e in zip(kinds, extents) if k == _REDUCE)
        return f"{self.names[main]} {spatial}" + (f" (reducing {reduced})" if reduced else "")


@dataclass(frozen=True)
class Donor:
    """A kernel of the database whose records can transfer: their traces sample decisions."""

    workload_hash: str
    mod: Any
    shape: KernelShape
    records: list  # MetaSchedule TuningRecords, fastest first


class TransferFailed(Exception):
    """A donor's schedule does not fit the new kernel; ``reason`` says why, in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def find_donors(records: Records, operators: set[tuple], exclude: set[str]) -> dict[tuple, list[Donor]]:
    """The database's kernels of ``operators`` (``KernelShape.operator``) with transferable
    records, by operator; ``exclude``: structural hashes not to offer (the kernels transferred to).
    Only each kernel's fastest ``TRANSFER_CANDIDATES`` such records are read: reading a record
    builds TVM objects, slow over the thousands a tuned model has. Raises ValueError for a
    workload or record TVM cannot read."""
    import tvm.s_tir.meta_schedule as ms

    donors: dict[tuple, list[Donor]] = {}
    for workload_hash, index in records.by_hash.items():
        timed = records.ranked.get(index, [])
        if workload_hash in exclude or not timed:
            continue
        try:
            workload = ms.database.Workload.from_json(json.loads(records.workloads[index]))
        except Exception as exc:  # TVM's reader raises its own errors for a module it cannot decode
            raise ValueError(f"workload {workload_hash}: {first_line(exc)}") from None
        shape = KernelShape.of(workload.mod)
        if shape.operator not in operators:
            continue
        transferable = []
        for _, line in timed:
            try:
                record = ms.database.TuningRecord.from_json(json.loads(line)[1], workload)
            except Exception as exc:
                raise ValueError(f"a record of workload {workload_hash}: {first_line(exc)}") from None
            # the search's schedules: the default rule's and the unscheduled form have no decisions
            # to adapt (the new kernel gets its own default rule anyway)
            if any(inst.kind.name in _SAMPLES for inst in record.trace.insts):
                transferable.append(record)
                if len(transferable) == TRANSFER_CANDIDATES:
                    break
        if transferable:
            donors.setdefault(shape.operator, []).append(Donor(workload_hash, workload.mod, shape, transferable))
    return donors


def candidates_for(shape: KernelShape, donors: list[Donor], count: int = TRANSFER_CANDIDATES) -> list[tuple[Donor, Any]]:
    """The records to try on a kernel of ``shape``: each donor's fastest, nearest donor first, then
    each donor's second fastest, and so on, ``count`` at most."""
    nearest = sorted(donors, key=lambda donor: shape.distance(donor.shape))
    depth = max((len(d.records) for d in nearest), default=0)
    ordered = [(donor, donor.records[rank]) for rank in range(depth) for donor in nearest if rank < len(donor.records)]
    return ordered[:count]


def adapt_factors(factors: list[int], extent: int) -> list[int]:
    """A tile split of a loop of ``extent``, keeping the inner factors where they still divide it
    (the largest divisor under each where not) and giving the rest to the outermost loop."""
    new = [1] * len(factors)
    rest = extent
    for position in range(len(factors) - 1, 0, -1):
        factor = _divisor_at_most(rest, max(1, factors[position]))
        new[position] = factor
        rest //= factor
    new[0] = rest
    return new


def replay(mod, shape: KernelShape, donor: Donor, record, postprocs) -> Any:
    """The donor record's schedule, adapted to ``mod`` (a kernel of ``shape``), post-processed as
    MetaSchedule's search post-processes its candidates. Raises ``TransferFailed`` with the reason."""
    from tvm.s_tir import Schedule
    from tvm.s_tir.schedule import Instruction, Trace

    # a trace finds its blocks by name: the donor's, position by position, become this kernel's
    renamed = dict(zip(donor.shape.names, shape.names))
    instructions, decisions = [], {}
    for inst in record.trace.insts:
        new = inst
        if inst.kind.name == "GetSBlock" and str(inst.attrs[0]) in renamed:
            new = Instruction(inst.kind, inst.inputs, [renamed[str(inst.attrs[0])], *inst.attrs[1:]], inst.outputs)
        if inst in record.trace.decisions:
            decisions[new] = record.trace.decisions[inst]
        instructions.append(new)
    schedule = Schedule(mod)

    def adapt(inst, inputs, attrs, decision):
        if inst.kind.name == "SamplePerfectTile":
            return adapt_factors([int(f) for f in decision], int(schedule.get(inputs[0]).extent))
        return decision  # unroll depth, vector choices, compute locations: as tuned

    try:
        Trace(instructions, decisions).apply_to_schedule(schedule, remove_postproc=True, decision_provider=adapt)
        schedule.enter_postproc()
        for postproc in postprocs:
            if not postproc.apply(schedule):
                raise TransferFailed(f"{type(postproc).__name__} rejected the replayed schedule")
    except TransferFailed:
        raise
    except Exception as exc:  # TVM raises ScheduleError and friends for a step that does not fit
        raise TransferFailed(f"its trace does not replay here: {first_line(exc)}") from None
    return schedule


def transfer_schedules(run: TuningRun, shapes: dict[int, KernelShape],
                       donors: dict[tuple, list[Donor]]) -> list[dict[str, Any]]:
    """For each kernel of ``shapes`` (index -> its shape; none has a record, and ``donors``
    (``find_donors``) hold its operator at other widths): the nearest donors' schedules adapted,
    timed beside its default rule, all recorded. Returns what happened per kernel."""
    import tvm_ffi

    tasks = run.tasks
    todo = list(shapes.items())
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="compactdeploy-transfer-") as work:
        for number, (index, shape) in enumerate(todo, 1):
            run.interrupt.check()
            task = tasks[index]
            with metaschedule_logging():  # the post-processors come with a tune context, which logs
                context = run.ms.relax_integration.extracted_tasks_to_tune_contexts(
                    [task], str(Path(work) / f"c{number}"))[0][0]
            postprocs = context.space_generator.postprocs
            candidates, failures, seen = [], [], set()
            for donor, record in candidates_for(shape, donors[shape.operator]):
                source = donor.shape.describe()
                try:
                    schedule = replay(task.dispatched[0], shape, donor, record, postprocs)
                except TransferFailed as failed:
                    failures.append(f"from {source}: {failed.reason}")
                    continue
                key = tvm_ffi.structural_hash(schedule.mod)
                if key not in seen:  # two records can adapt to one schedule
                    seen.add(key)
                    candidates.append((schedule, {"source": TRANSFERRED_ORIGIN, "from": source,
                                                  "donor": donor.workload_hash, "by": TRANSFER}))
            transferred = len(candidates)
            rule = default_rule(run, index)
            if rule is not None:
                why = (f"measured faster than {transferred} schedules transferred from other widths" if transferred else
                       f"no schedule transferred from other widths applied ({failures[0]})")
                candidates.append((rule, {"source": DEFAULT_RULE, "why": why, "by": TRANSFER}))
            if not candidates:  # nothing replayed and no rule fits: the kernel stays as it was
                outcomes.append({"kernel": task.task_name, "transferred": 0, "best_us": None, "source": None,
                                 "default_rule_us": None, "failed": failures})
                continue
            scratch = KernelScratch(Path(work) / f"kernel{number}", run.database, None, [])
            db = run.ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=True)
            measured = record_candidates(run, index, db, scratch, candidates)
            failures += [f"from {origin['from']}: {m.error}" for (_, origin), m in zip(candidates, measured)
                         if m.us is None and origin["source"] == TRANSFERRED_ORIGIN]
            timed = [(m.us, origin) for (_, origin), m in zip(candidates, measured) if m.us is not None]
            best_us, best = min(timed, key=lambda pair: pair[0]) if timed else (None, None)
            rule_us = measured[-1].us if rule is not None else None
            outcome = {
                "kernel": task.task_name,
                "transferred": transferred,  # candidates from other widths that replayed here
                "best_us": best_us,
                "source": None if best is None else
                          f"{TRANSFERRED} {best['from']}" if best["source"] == TRANSFERRED_ORIGIN else DEFAULT_RULE,
                "default_rule_us": rule_us,
                "failed": failures,
            }
            outcomes.append(outcome)
            shown = "nothing ran" if best is None else f"{best_us:.1f} us, {outcome['source']}"
            rule_shown = (f" (default rule {rule_us:.1f} us)"
                          if rule_us is not None and best is not None and best["source"] != DEFAULT_RULE else "")
            run.progress(f"transfer {number}/{len(todo)} {task.task_name}: {transferred} schedules from other widths "
                         f"timed; best {shown}{rule_shown}")
    return outcomes


def _divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


__all__ = ["TRANSFER", "TRANSFER_CANDIDATES", "Donor", "KernelShape", "TransferFailed", "adapt_factors", "candidates_for",
           "find_donors", "replay", "transfer_schedules"]
