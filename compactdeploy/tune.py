"""Tune stage: MetaSchedule searches schedules for the model's kernels, measured on the device.

The records go into one database per (target, device, TVM version) under the cache directory.
Every build applies what that database holds, so a second build of a model tunes nothing and a
pruned variant reuses the record of every kernel shape it shares with models tuned before.

Two things make MetaSchedule usable on a 2-core machine (see docs/benchmarks/tuning-benchmark.md):
its stock builder starts a fresh process pool for every batch and each worker imports
``tvm.s_tir.tensor_intrin`` (about 25 s here) before its first build; ours keeps two warm workers
for the whole run and builds without that import (float32 CPU schedules use no tensor intrinsics).
And the tuner searches one kernel at a time, so each search gets one cost model for the whole run,
trained on the database's records first (``warm_cost_model``): MetaSchedule's own ranks at random
for each search's first 100 candidates. After the search, each kernel's record is picked among its
fastest by a second timing closer to how the model runs it (``pick_records``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import write_json
from .errors import CompactDeployError, first_line
from .resources import cache_dir, directory_bytes
from .targets import TargetSpec

BATCH = 32  # candidates built and measured together: MetaSchedule's unit of progress
MIN_DEFICIT = BATCH // 4
ROUND_TRIALS = 4 * BATCH  # the most one kernel gets before the split by measured time is redone
# the layout every CPU build computes convolutions in (data, weights); see lower_for_tuning
CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "OHWI"]}
_WORKLOADS = "database_workload.json"
_RECORDS = "database_tuning_record.json"
# kernels whose search space ran out before their budget (structural hash -> trials then):
# a rerun with the same or a larger budget would only restart MetaSchedule to find nothing new
_EXHAUSTED = "exhausted.json"
_BEST_VIEW = "best"
# which of its fastest records each kernel applies, chosen by a second timing (``pick_records``)
_PICKS = "picks.json"
PICK_AMONG = 4  # a kernel's fastest records, as tuned, that the second timing chooses among
PICK_ROUNDS = 3  # rounds over a kernel's candidates, interleaved, so a slow moment hits them all
PICK_CALLS = 15  # calls per candidate and round, each after a pause
PICK_PAUSE_MS = 1
_FAILED_SECONDS = 1e9  # MetaSchedule records a candidate that failed to build or run as 1e10 s


@dataclass(frozen=True)
class TuningDatabase:
    """Where the records for one (target, device, TVM version) live."""

    path: Path
    identity: dict[str, Any]

    def read(self) -> Records:
        """The records, read as text: a kernel's count and best time without MetaSchedule's reader."""
        # records first: a tuner publishing meanwhile adds a workload before any record naming it
        record_lines = text_lines(self.path / _RECORDS)
        try:
            return Records.parse(text_lines(self.path / _WORKLOADS), record_lines)
        except (ValueError, IndexError, TypeError) as exc:
            raise CompactDeployError(
                f"the tuning database {self.path} is damaged ({first_line(exc)}): move it away and build "
                "again (its kernels are then tuned afresh with --tune-trials)"
            ) from None

    def resume_hint(self) -> str:
        return f"every finished batch is kept in {self.path}: run the same command again to resume"

    def best_view(self) -> Path | None:
        """A database holding one record per kernel: what builds apply.

        That record is the one the second timing picked (``pick_records``) while the kernel's
        fastest records are still those it chose among, else the fastest as tuned.
        MetaSchedule's JSON reader builds a TVM object (target included) for every record: 27 s
        for 3515 records here, on every build, where one record per kernel (0.5 s) is all a build
        applies. The view is named by the record and pick files' sizes and times, so a change makes
        a new one; it is written in a directory of its own and renamed into place, never seen
        half-written. Returns None where no kernel has a record that ran.
        """
        records_file = self.path / _RECORDS
        if not records_file.exists():
            return None
        stat = records_file.stat()
        picks_file = self.path / _PICKS
        picks_stamp = picks_file.stat().st_mtime_ns if picks_file.exists() else 0
        view = self.path / f"{_BEST_VIEW}-{stat.st_size}-{stat.st_mtime_ns}-{picks_stamp}"
        if view.exists():
            return view
        records = self.read()
        picks = self.picks()
        applied = {index: records.applied(index, picks)[1] for index in records.ranked}
        if not applied:
            return None
        staging = Path(tempfile.mkdtemp(prefix=f".{_BEST_VIEW}-", dir=self.path))
        kept = sorted(applied)
        (staging / _WORKLOADS).write_text("".join(records.workloads[i] + "\n" for i in kept))
        (staging / _RECORDS).write_text("".join(_renumbered(applied[i], n) + "\n" for n, i in enumerate(kept)))
        try:
            os.rename(staging, view)
        except OSError:  # another build made the same view first
            shutil.rmtree(staging, ignore_errors=True)
        return view

    def picks(self) -> dict[str, dict[str, Any]]:
        """Structural hash -> the second timing's pick: ``top`` (the records it chose among),
        ``rank`` (the one chosen, 0 = fastest as tuned), ``us`` (each one's median)."""
        path = self.path / _PICKS
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except ValueError as exc:
            raise CompactDeployError(
                f"the second timing's picks {path} are damaged ({first_line(exc)}): delete that file and build "
                "again (with --tune-trials, its kernels are timed again)"
            ) from None

    def save_pick(self, workload_hash: str, pick: dict[str, Any]) -> None:
        write_json(self.path / _PICKS, {**self.picks(), workload_hash: pick})

    def remove_stale_views(self) -> None:
        """Views of record files since replaced (the tuner calls this, holding the lock)."""
        current = self.best_view()
        for view in self.path.glob(f"{_BEST_VIEW}-*"):
            if view != current:
                shutil.rmtree(view, ignore_errors=True)

    def publish(self, workload_line: str, record_lines: list[str]) -> None:
        """Add one kernel's new records, each file replaced atomically.

        Workloads first: a record names its workload by line number, so the workload file must
        never be older than the record file. ``record_lines`` name their workload as line 0.
        """
        if not record_lines:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        identity_file = self.path / "identity.json"
        if not identity_file.exists():  # says what the records were measured on
            write_json(identity_file, self.identity)
        workloads = text_lines(self.path / _WORKLOADS)
        known = {_workload_hash_of(line): number for number, line in enumerate(workloads)}
        index = known.get(_workload_hash_of(workload_line))
        if index is None:
            index = len(workloads)
            _append_atomically(self.path / _WORKLOADS, [workload_line])
        _append_atomically(self.path / _RECORDS, [_renumbered(line, index) for line in record_lines])

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One tuning run per database at a time: two would overwrite each other's records."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CompactDeployError(
                    f"another build is tuning into {self.path}: wait for it to finish, then build again"
                ) from None
            yield

    def record_count(self) -> int:
        """Measurements held (one line each in MetaSchedule's JSON database)."""
        records = self.path / _RECORDS
        return records.read_text().count("\n") if records.exists() else 0

    def exhausted(self) -> dict[str, int]:
        path = self.path / _EXHAUSTED
        return json.loads(path.read_text()) if path.exists() else {}

    def mark_exhausted(self, workload_hash: str, trials: int) -> None:
        write_json(self.path / _EXHAUSTED, {**self.exhausted(), workload_hash: trials})


def database_for(target: TargetSpec, device: dict[str, Any] | None) -> TuningDatabase:
    """The database for ``target`` measured on ``device`` (an agent fingerprint; None: unknown device)."""
    import tvm

    device = device or {}
    identity = {
        "target": target.tvm_target_dict(),
        # a schedule's speed depends on the chip, not the board's name or its hostname
        "cpu": device.get("cpu"),
        "machine": device.get("machine"),
        "cuda": device.get("cuda"),
        "emulated": bool(device.get("emulated")),
        "tvm_version": tvm.__version__,
        # a schedule's time depends on how many threads share its loop: records measured at
        # another count are not comparable (None: the fingerprint of an older agent)
        "threads": device.get("threads"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return TuningDatabase(cache_dir("tuning") / f"{target.name}-{digest}", identity)


def newest_database(target: TargetSpec) -> TuningDatabase | None:
    """For a build with no device to ask: the database of ``target`` tuned most recently with this TVM."""
    readable = []
    for path in cache_dir("tuning").glob(f"{target.name}-*"):
        identity, stale = _identity_of(path)
        if (path / _RECORDS).exists() and stale is None:
            readable.append(TuningDatabase(path, identity))
    if not readable:
        return None
    return max(readable, key=lambda database: (database.path / _RECORDS).stat().st_mtime)


def _identity_of(path: Path) -> tuple[dict[str, Any], str | None]:
    """A stored database's identity, and why no build with this TVM reads it (None: builds may)."""
    import tvm

    try:
        identity = json.loads((path / "identity.json").read_text())
        version = identity.get("tvm_version")
    except (OSError, ValueError, AttributeError):
        return {}, "no readable identity.json (what it was measured on is unknown)"
    return identity, None if version == tvm.__version__ else f"tuned with TVM {version}, this is {tvm.__version__}"


@dataclass(frozen=True)
class StoredDatabase:
    """One tuning database in the cache, as ``compactdeploy cache`` lists it."""

    path: Path
    identity: dict[str, Any]
    kernels: int
    records: int
    size_bytes: int
    written: float  # when its records last changed (seconds since the epoch)
    stale: str | None  # why no build with this TVM reads it; None: builds may

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "identity": self.identity, "kernels": self.kernels, "records": self.records,
            "size_bytes": self.size_bytes, "written": self.written, "stale": self.stale,
        }


def stored_databases() -> list[StoredDatabase]:
    """Every tuning database under the cache, oldest first."""
    entries = []
    for path in cache_dir("tuning").iterdir():
        if not path.is_dir():
            continue
        identity, stale = _identity_of(path)
        records = path / _RECORDS
        entries.append(StoredDatabase(
            path=path,
            identity=identity,
            kernels=len(text_lines(path / _WORKLOADS)),
            records=TuningDatabase(path, identity).record_count(),
            size_bytes=directory_bytes(path),
            written=(records if records.exists() else path).stat().st_mtime,
            stale=stale,
        ))
    return sorted(entries, key=lambda entry: entry.written)


def remove_database(path: Path) -> None:
    """Delete one database, unless a build is tuning into it now."""
    with TuningDatabase(path, {}).locked():
        # renamed first: a build that opens it meanwhile finds nothing, never half a database
        doomed = path.with_name(f".removing-{path.name}")
        os.rename(path, doomed)
    shutil.rmtree(doomed)


@dataclass(frozen=True)
class Records:
    """MetaSchedule's JSON database as text: a line per workload, ["<structural hash>", "<module>"],
    and a line per record, [<workload line number>, [trace, run_secs, target, args_info]]."""

    workloads: list[str]
    by_hash: dict[str, int]  # structural hash -> workload line number
    by_workload: dict[int, list[str]]  # workload line number -> its record lines
    # workload line number -> its records that ran, with their times, fastest first (ties: older first)
    ranked: dict[int, list[tuple[float, str]]]

    @classmethod
    def parse(cls, workload_lines: list[str], record_lines: list[str]) -> Records:
        by_workload: dict[int, list[str]] = {}
        ranked: dict[int, list[tuple[float, str]]] = {}
        for line in record_lines:
            index = _workload_index_of(line)
            by_workload.setdefault(index, []).append(line)
            seconds = _record_seconds(line)
            if seconds is not None:
                ranked.setdefault(index, []).append((seconds, line))
        for timed in ranked.values():
            timed.sort(key=lambda pair: pair[0])  # stable: equal times keep the file's order
        by_hash = {_workload_hash_of(line): number for number, line in enumerate(workload_lines)}
        return cls(workload_lines, by_hash, by_workload, ranked)

    def of(self, workload_hash: str) -> tuple[str | None, list[str]]:
        """A kernel's workload line (None: never tuned) and record lines."""
        index = self.by_hash.get(workload_hash)
        return (None, []) if index is None else (self.workloads[index], self.by_workload.get(index, []))

    def best_us(self, workload_hash: str) -> float | None:
        index = self.by_hash.get(workload_hash)
        return round(self.ranked[index][0][0] * 1e6, 3) if index in self.ranked else None

    def has_unscheduled(self, workload_hash: str) -> bool:
        """Whether the kernel's unscheduled form was measured (a record with an empty trace, ran or failed)."""
        return any(_is_unscheduled(line) for line in self.of(workload_hash)[1])

    def fastest(self, index: int, count: int) -> list[str]:
        """Workload ``index``'s ``count`` fastest records that ran, fastest first (ties: older first)."""
        return [line for _, line in self.ranked.get(index, [])[:count]]

    def applied(self, index: int, picks: dict[str, dict[str, Any]]) -> tuple[int, str, dict[str, Any] | None]:
        """The record a build applies for workload ``index`` (which has one that ran), its rank among
        the kernel's fastest, and the second timing's pick where it stands (else the fastest, rank 0)."""
        top = self.fastest(index, PICK_AMONG)
        pick = picks.get(_workload_hash_of(self.workloads[index]))
        if _pick_stands(pick, top):
            return pick["rank"], top[pick["rank"]], pick
        return 0, top[0], None

    def applied_summary(self, workload_hash: str, picks: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """For the report: which of a kernel's records a build applies (None: none ran yet)."""
        index = self.by_hash.get(workload_hash)
        if index not in self.ranked:
            return None
        rank, line, pick = self.applied(index, picks)
        return {
            "rank": rank,  # among the kernel's fastest as tuned: 0 = the fastest
            "tuned_us": round(self.ranked[index][rank][0] * 1e6, 3),
            "after_pause_us": pick["us"][rank] if pick else None,  # the second timing's median
            "unscheduled": _is_unscheduled(line),  # compiled with no schedule, measured fastest so
        }


def text_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _workload_hash_of(workload_line: str) -> str:
    """The leading string alone: the module after it is ~100 KB of base64 not worth parsing."""
    return json.loads(workload_line[1:workload_line.index(",")])


def _workload_index_of(record_line: str) -> int:
    return int(record_line[1:record_line.index(",")])


def _renumbered(record_line: str, workload_index: int) -> str:
    """The record line naming workload line ``workload_index`` (the rest of it untouched)."""
    return f"[{workload_index}," + record_line[record_line.index(",") + 1:]


def _record_seconds(record_line: str) -> float | None:
    """The record's time (mean of its repeats), None for a candidate that failed."""
    run_secs = json.loads(record_line)[1][1]
    if not run_secs or max(run_secs) >= _FAILED_SECONDS:
        return None
    return _mean_seconds(run_secs)


def _is_unscheduled(record_line: str) -> bool:
    """An empty trace: [<workload>, [[[], []], ...] as MetaSchedule writes it (no spaces)."""
    return record_line[record_line.index(","):].startswith(",[[[],[]],")


def _top_key(record_lines: list[str]) -> str:
    """Names a kernel's fastest records: a pick stands while they stay the same."""
    return hashlib.sha256("\n".join(record_lines).encode()).hexdigest()[:16]


def _pick_stands(pick: dict[str, Any] | None, top: list[str]) -> bool:
    """Whether the second timing's ``pick`` was made among ``top``, the kernel's fastest records now."""
    return pick is not None and pick["top"] == _top_key(top) and pick["rank"] < len(top)


def _append_atomically(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if path.exists():
        shutil.copyfile(path, tmp)
    with open(tmp, "a") as file:
        file.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def lower_for_tuning(mod, tvm_target, channels_last: bool = True):
    """Legalize and fuse: the kernels tuning searches are the fused ones the build then runs.

    ``channels_last=False`` keeps the model's NCHW convolutions (tools/tune_kernel.py compares them).
    """
    import tvm
    from tvm import relax

    with tvm_target:
        return tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                # folds the weight transposes and reshapes the ONNX importer leaves for run time
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                # lets a schedule choose the weights' memory layout (packed blocks for the vector
                # units); the repacking runs once, at compile time, in ``apply_database``
                relax.transform.AttachAttrLayoutFreeBuffers(),
            ]
        )(to_channels_last(mod) if channels_last else mod)


def to_channels_last(mod):
    """Convolutions in NHWC (``CONV_LAYOUT``), the layout carried through the operators between them.

    Channels innermost: MetaSchedule vectorizes over channels (multiples of 8 or 16) instead of the
    image width (7 or 14 late in a network), which tuned 2-3x faster (docs/tuning.md). Where TVM's
    layout pass cannot handle a model (an operator it has no layout rule for), the model keeps its
    layout, with a warning: correct, slower.
    """
    import warnings

    from tvm import relax

    try:
        return relax.transform.ConvertLayout(CONV_LAYOUT)(mod)
    except Exception as exc:  # TVM raises InternalError and friends from inside the pass
        warnings.warn(f"convolutions stay NCHW (slower kernels): TVM's layout pass failed: {first_line(exc)}",
                      stacklevel=2)
        return mod


def apply_database(lowered, tvm_target, database: TuningDatabase | None) -> tuple[Any, int, int]:
    """Replace every kernel the database has a record for by its best schedule.

    Returns the module, how many of its kernels were scheduled from records, and how many there are.
    """
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tvm import relax

    tasks = extract_kernels(lowered, tvm_target)
    view = database.best_view() if database is not None else None
    if view is None:
        return lowered, 0, len(tasks)
    db = ms.database.JSONDatabase(str(view / _WORKLOADS), str(view / _RECORDS), allow_missing=False)
    scheduled = sum(1 for task in tasks if db.has_workload(task.dispatched[0]))
    if scheduled == 0:
        return lowered, 0, len(tasks)
    with tvm_target, db:
        lowered = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(lowered)
    with tvm_target:
        lowered = tvm.transform.Sequential(
            [
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),  # repacks the weights, which are constants, now
                relax.transform.DeadCodeElimination(),
            ]
        )(lowered)
    return lowered, scheduled, len(tasks)


@dataclass
class TaskState:
    """One kernel to tune; ``trials`` counts the records the database holds for it."""

    name: str
    flops: float
    weight: int  # how many times the model calls it
    budget: int
    trials: int
    best_us: float | None
    workload_hash: str
    exhausted: bool = False  # MetaSchedule found no new candidates before the budget was spent

    def as_dict(self) -> dict[str, Any]:
        return {
            "kernel": self.name, "flops": self.flops, "calls": self.weight,
            "budget": self.budget, "trials": self.trials, "best_us": self.best_us, "exhausted": self.exhausted,
        }


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
    # other work on the measuring machine just before its first measurement (device.agent.load_between);
    # None where nothing was measured or it is not known
    machine_load: dict[str, Any] | None = None

    def summary(self) -> str:
        from .device.agent import describe_load, is_busy

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


def plan_budgets(flops: list[float], weights: list[int], trials: int) -> list[int]:
    """Split ``trials`` over kernels by the square root of their weighted FLOPs.

    Square root, not FLOPs: a small kernel's untuned schedule can cost more than its FLOPs say.
    Every kernel first gets a floor (half a batch, where the budget allows), the rest is shared.
    """
    if not flops:
        return []
    floor = min(BATCH // 2, trials // len(flops))
    shares = [math.sqrt(max(f, 1.0) * w) for f, w in zip(flops, weights)]
    spare = trials - floor * len(flops)
    return [floor + int(spare * s / sum(shares)) for s in shares]


def next_by_measured_time(states: list[TaskState], trials: int) -> tuple[int, int] | None:
    """The kernel the next round of tuning goes to and how many trials, or None: the budget is spent.

    After the first half of the budget (``plan_budgets``: a prior from FLOPs), the rest follows the
    time each kernel costs the model now (best time x calls), as Ansor's task scheduler does: FLOPs
    misjudge kernels (MobileNetV2's narrowing 1x1 convolutions ran at a third of the speed of others
    of the same FLOPs) and a slow kernel's time falls fast with more trials (576->96: 194 us after
    40 trials, 66 us after 232, continued from the benchmark's records). Each round gives the kernel furthest below its share of the budget
    at most ``ROUND_TRIALS``, then the shares are worked out again from the new times. A pure
    function of the records' counts and times, so an interrupted run resumes the same plan, and a
    finished one (under ``MIN_DEFICIT`` left, or nothing left to search) tunes nothing.
    """
    left = trials - sum(s.trials for s in states)
    open_ = [i for i, s in enumerate(states) if not s.exhausted and s.best_us is not None]
    if left < MIN_DEFICIT or not open_:
        return None
    cost = {i: states[i].best_us * states[i].weight for i in open_}
    # the trials the open kernels share: those spent on kernels that can take no more are gone
    pool = trials - sum(s.trials for i, s in enumerate(states) if i not in cost)
    deficit = {i: pool * c / sum(cost.values()) - states[i].trials for i, c in cost.items()}
    chosen = max(deficit, key=lambda i: (deficit[i], -i))
    return chosen, min(left, ROUND_TRIALS, max(MIN_DEFICIT, int(deficit[chosen])))


def tune(
    lowered,
    target: TargetSpec,
    database: TuningDatabase,
    trials: int,
    runner,
    linker_command: str | None,
    on_progress: Callable[[str], None] | None = None,
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
    ``read_load`` samples other work on the measuring machine (``device.agent.load_between``) once,
    before the first measurement; where it is busy, every progress line after says so.
    """
    import tvm.s_tir.meta_schedule as ms
    import tvm_ffi

    # exceptions raised in our callbacks cross MetaSchedule's C++ loop as the RuntimeError TVM's FFI
    # makes of a type it does not know, unless registered: our own stop, and a KeyboardInterrupt
    # (a progress callback's, or Ctrl-C where the application, not tune(), owns SIGINT)
    tvm_ffi.register_error("KeyboardInterrupt", KeyboardInterrupt)
    tvm_ffi.register_error(_KernelSearchStopped)
    report = on_progress or (lambda message: None)
    machine_load: dict[str, Any] | None = None
    busy, load_read = "", read_load is None

    def say(message: str) -> None:
        report(busy + message)  # every line says so: records timed now stay for later builds

    def measuring_starts() -> None:
        nonlocal machine_load, busy, load_read
        if not load_read:
            from .device.agent import is_busy, taken_share

            machine_load, load_read = read_load(), True
            busy = f"BUSY ({taken_share(machine_load):.0%} other load) · " if is_busy(machine_load) else ""

    start = time.perf_counter()
    tvm_target = target.tvm_target()
    tasks = extract_kernels(lowered, tvm_target)
    with database.locked():
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
            with _interrupt_between_batches(database) as interrupt:
                # kernels tuned before their unscheduled form was measured on this device (databases
                # of older versions): measured once, so that tiny kernels can keep it
                unmeasured = [i for i, s in enumerate(states) if s.trials and not records.has_unscheduled(s.workload_hash)]
                if unmeasured or todo or next_by_measured_time(states, trials) is not None:
                    measuring_starts()
                    say(f"{len(tasks)} kernels, {trials} trials (half split by FLOPs, half by measured time); "
                        "loading MetaSchedule (30-100 s on a 2-core host)")
                    builder = WarmBuilder(linker_command)
                    if unmeasured:
                        ran += _measure_unscheduled(ms, [(tasks[i], states[i]) for i in unmeasured], records,
                                                    database, builder, runner, say, interrupt)
                        records = database.read()
                    if todo or next_by_measured_time(states, trials) is not None:
                        searched = _tune_kernels(ms, tasks, states, todo, trials, records, reused, database, builder,
                                                 runner, say, interrupt)
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


def _tune_kernels(ms, tasks, states: list[TaskState], todo: list[int], trials: int, records: Records, reused: int,
                  database: TuningDatabase, builder, runner, say, interrupt: _Interrupt) -> int:
    """The search itself: each kernel of ``todo`` to its budget, then rounds by measured time.
    Returns how many candidates it measured."""
    ran = 0
    with tempfile.TemporaryDirectory(prefix="compactdeploy-tune-") as work:
        # a kernel's scratch lives across its rounds: it holds every record of the kernel
        scratches = [
            KernelScratch(Path(work) / f"kernel{index}", database, *records.of(s.workload_hash))
            for index, s in enumerate(states)
        ]
        if reused:
            say(f"training the cost model on the {reused} records the database holds for these kernels")
        cost_model = warm_cost_model(list(zip(tasks, scratches)))
        interrupt.check()

        def run(index: int, label: str) -> int:
            interrupt.check()
            measured = _tune_one(ms, tasks[index], states[index], label, scratches[index], states,
                                 database, builder, runner, cost_model, say, interrupt)
            interrupt.check()
            return measured

        for number, index in enumerate(todo, 1):
            ran += run(index, f"kernel {number}/{len(todo)}")
        round_ = 0
        while (chosen := next_by_measured_time(states, trials)) is not None:
            index, extra = chosen
            states[index].budget = states[index].trials + extra
            round_ += 1
            measured = run(index, f"by measured time, round {round_}:")
            ran += measured
            if measured == 0:  # its searches find nothing to measure: give its share to the others
                states[index].exhausted = True
    return ran


def _measure_unscheduled(ms, kernels: list[tuple[Any, TaskState]], records: Records, database: TuningDatabase,
                         builder, runner, say, interrupt: _Interrupt) -> int:
    """Record the unscheduled form of kernels that have records but not that one. Returns how many."""
    say(f"measuring {len(kernels)} kernels as they compile unscheduled (their records lack that candidate)")
    with tempfile.TemporaryDirectory(prefix="compactdeploy-unscheduled-") as work:
        for number, (task, state) in enumerate(kernels):
            interrupt.check()
            # a scratch with the workload alone: MetaSchedule reads every record of a database on open
            scratch = KernelScratch(Path(work) / f"kernel{number}", database, records.of(state.workload_hash)[0], [])
            db = ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=True)
            unscheduled_us = _record_unscheduled(ms, task, state, db, scratch, builder, runner)
            shown = f"{unscheduled_us:.1f} us" if unscheduled_us is not None else "failed to build or run"
            say(f"unscheduled {number + 1}/{len(kernels)} {state.name}: {shown} (best record {state.best_us} us)")
    return len(kernels)


def _tune_one(ms, task, state: TaskState, label: str, scratch: KernelScratch, states, database, builder, runner,
              cost_model, say, interrupt: _Interrupt) -> int:
    """Tune one kernel up to ``state.budget`` trials in a scratch database holding its records only,
    publishing after every batch. Returns how many it measured.

    Only the kernel's own records matter to its search (its starting population, the candidates
    not to measure again), and MetaSchedule reads a whole database on open, slowly.
    """
    db = ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=True)
    progress = _TuneProgress(state, label, states, database, scratch, say, interrupt)
    if state.trials == 0:
        _record_unscheduled(ms, task, state, db, scratch, builder, runner)
        progress.measured = 1
        interrupt.check()
    remaining = state.budget - state.trials
    if remaining <= 0:
        return progress.measured
    say(progress.line())
    with metaschedule_logging(), contextlib.suppress(_KernelSearchStopped):
        context = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(scratch.path))[0][0]
        ms.tune_tasks(
            tasks=[context],
            task_weights=[1.0],
            work_dir=str(scratch.path),
            max_trials_global=remaining,
            max_trials_per_task=remaining,
            num_trials_per_iter=BATCH,
            builder=builder,
            runner=runner,
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
    Training costs ~50 ms per record on a 2-core host (1200 records: reading 9 s, replaying their
    schedules 20 s, fitting 28 s; one-off measurement), against 1.7-2.2 s per trial measured.
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


class _KernelSearchStopped(Exception):
    """Raised from the measure callback to end one kernel's search (it ran out, or Ctrl-C)."""


class _Interrupt:
    """A Ctrl-C asked for during tuning, acted on where Python alone is on the stack."""

    def __init__(self):
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupt_between_batches(database: TuningDatabase) -> Iterator[_Interrupt]:
    """Make Ctrl-C stop tuning after the batch in flight is published, not in the middle of it.

    A KeyboardInterrupt raised while MetaSchedule's C++ loop is calling into Python (its cost
    model, our callbacks) must unwind C++ frames that cannot carry it: std::terminate, and the
    process died with SIGSEGV (3 of 4 interrupts here, 0.5-2 s after a batch). So the first
    Ctrl-C only sets a flag that the measure callback and the loop between kernels check; a
    second one leaves at once, which loses nothing published (every batch is an atomic copy).

    A Python signal handler runs only when the main thread next runs Python, which can be many
    seconds into a search, and two Ctrl-C before then arrive as one. Signal numbers written to a
    wakeup pipe by the C-level handler, read by a thread, count every press as it happens.
    Only the main thread can own SIGINT, and an application's own handler is left alone.
    SIGTERM (a supervisor, ``kill``) counts as a Ctrl-C here too: raised as an exception mid-search
    it would meet the same C++ frames.
    """
    interrupt = _Interrupt()
    owned = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if not owned:
        yield interrupt
        return

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def watch() -> None:
        while data := os.read(read_end, 64):  # empty once tuning is over and the pipe closed
            for _ in range(data.count(signal.SIGINT) + data.count(signal.SIGTERM)):
                if interrupt.requested:
                    os.write(2, f"\nerror: tuning stopped at once; {database.resume_hint()}\n".encode())
                    os._exit(2)  # nothing published is lost; the kernel releases the database lock
                interrupt.requested = True
                os.write(2, b"\ninterrupted: finishing the batch in flight, then stopping (Ctrl-C again to stop at once)\n")

    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the C-level handler feeds the pipe
    previous_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="compactdeploy-ctrl-c", daemon=True)
    watcher.start()
    try:
        yield interrupt
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous_sigterm)
        os.close(write_end)
        watcher.join()
        os.close(read_end)


def _ignore_interrupts() -> None:
    """Worker processes share the terminal's process group: Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def metaschedule_logging() -> Iterator[None]:
    """Keep MetaSchedule's logging configuration from printing or failing.

    Every tuning call reconfigures its loggers: it prints a task table per batch to stdout at its
    logger's level (which it resets to DEBUG each time; progress comes through ``say`` instead),
    and it lists that logger's handlers by name, failing on unnamed ones (pytest's capture
    handlers, an application's own), so those are set aside while it runs.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in unnamed:
            logger.addHandler(handler)


class _TuneProgress:
    """After each batch: publish the scratch database atomically and report the best so far."""

    def __init__(self, state, label, states, database, scratch, say, interrupt: _Interrupt):
        self.state, self.label, self.states = state, label, states
        self.database, self.scratch, self.say, self.interrupt = database, scratch, say, interrupt
        self.measured = 0

    def after_batch(self, builder_results, runner_results) -> bool:
        """Returns whether the search space ran out (a batch far smaller than asked for)."""
        asked = min(BATCH, self.state.budget - self.state.trials)
        for built, run in zip(builder_results, runner_results):
            self.measured += 1
            self.state.trials += 1
            if built.error_msg is None and run.error_msg is None and run.run_secs:
                us = _mean_seconds(run.run_secs) * 1e6
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
                    raise _KernelSearchStopped

        return _Callback()


def _record_unscheduled(ms, task, state: TaskState, db, scratch: KernelScratch, builder, runner) -> float | None:
    """Measure the kernel as it compiles with no schedule and record that as a candidate: in ``db``
    (the kernel's scratch), published to the persistent database, counted in ``state``.

    Tiny kernels (a 30x64 matmul) run faster unscheduled, on one thread, than any parallel
    schedule the search finds; with this record in the database they keep the faster one.
    Returns the time in microseconds, or None where it failed to build or run.
    """
    from tvm.s_tir import Schedule

    mod = task.dispatched[0]
    schedule = Schedule(mod)
    target = task.target
    args_info = ms.arg_info.ArgInfo.from_entry_func(schedule.mod, remove_preproc=True)
    built = builder.build([ms.builder.BuilderInput(schedule.mod, target)])[0]
    run = None
    if built.error_msg is None:
        run = runner.run([ms.runner.RunnerInput(built.artifact_path, _device_type(target), args_info)])[0].result()
    ran = run is not None and run.error_msg is None and bool(run.run_secs)
    # a failure is recorded as MetaSchedule records one (1e10 s), so no later run measures it again
    seconds = [float(s) for s in run.run_secs] if ran else [_FAILED_SECONDS * 10]
    db.commit_tuning_record(ms.database.TuningRecord(schedule.trace, db.commit_workload(mod), seconds, target, args_info))
    scratch.publish()
    state.trials += 1
    if not ran:
        return None
    us = round(_mean_seconds(seconds) * 1e6, 3)
    if state.best_us is None or us < state.best_us:
        state.best_us = us
    return us


def kernels_to_pick(tasks, records: Records, picks: dict[str, dict[str, Any]]) -> list[tuple[Any, str, list[str]]]:
    """The kernels whose record the second timing should choose: two or more that ran, and no pick
    made among the fastest they have now. Each as (task, structural hash, its fastest records)."""
    todo = []
    for task in tasks:
        workload_hash = kernel_hash(task)
        index = records.by_hash.get(workload_hash)
        top = records.fastest(index, PICK_AMONG) if index is not None else []
        if len(top) >= 2 and not _pick_stands(picks.get(workload_hash), top):
            todo.append((task, workload_hash, top))
    return todo


def pick_records(todo, database: TuningDatabase, builder, runner, say, interrupt: _Interrupt) -> int:
    """Time each kernel's fastest records again, each call after a pause, and keep the fastest so.

    Tuning times a candidate warm, back to back, and keeps the fastest of thousands of noisy
    timings; a kernel inside the model runs once, after other kernels, its weights partly out of
    the caches. MobileNetV2 on the 2-core AMD host (tools/rerank_records.py, docs/tuning.md): each
    kernel's second-fastest record made a faster model than the fastest (8 of 8 runs), and picking
    among the four fastest by time after a pause took it from 1.11 to 1.03x onnxruntime. Each
    kernel's pick is saved as it is made, so an interrupted build keeps the picks done.
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
        runnable = [(rank, ms.runner.RunnerInput(b.artifact_path, _device_type(task.target), args_info))
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
        database.save_pick(workload_hash, {"top": _top_key(top), "rank": rank,
                                           "us": [round(medians[r], 2) if r in medians else None for r in range(len(top))]})
        changed += rank != 0
        say(f"second timing {number}/{len(todo)} {task.task_name}: record {rank + 1} of {len(top)} "
            f"({medians[rank]:.1f} us after a pause; the fastest as tuned {medians.get(0, float('nan')):.1f} us)")
    return changed


def pause_evaluator(rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """The second timing's evaluator: one call per repeat, each after ``PICK_PAUSE_MS`` of sleep
    (a LocalRunner's ``f_run_evaluator``; it runs in the runner's worker on the device)."""
    costs = []
    for args in repeated_args:
        timer = rt_mod.time_evaluator(rt_mod.entry_name, device, number=1, repeat=PICK_CALLS, min_repeat_ms=0,
                                      cooldown_interval_ms=PICK_PAUSE_MS, repeats_to_cooldown=1)
        device.sync()
        costs.extend(float(c) for c in timer(*args).results)
    return costs


def _remote_pause_evaluator(session, rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """``pause_evaluator`` over RPC (an RPCRunner's evaluator also takes the session)."""
    return pause_evaluator(rt_mod, device, evaluator_config, repeated_args)


def _device_type(target) -> str:
    """The device a candidate of ``target`` runs on, by the name TVM's runtime knows."""
    return _device_name(target.kind.name)


def _device_name(device_type: str) -> str:
    """"cpu" for the target kind "llvm": TVM 0.27's runtime and RPC sessions know device names only
    ("Unknown device: llvm")."""
    return "cpu" if device_type == "llvm" else device_type


class KernelScratch:
    """One kernel's scratch database: its records from the persistent one, new ones published back."""

    def __init__(self, path: Path, database: TuningDatabase, workload_line: str | None, record_lines: list[str]):
        self.path, self.database = path, database
        self.workloads, self.records = path / _WORKLOADS, path / _RECORDS
        path.mkdir()
        if workload_line is not None:
            self.workloads.write_text(workload_line + "\n")
            self.records.write_text("".join(_renumbered(line, 0) + "\n" for line in record_lines))
        self.published = len(record_lines)

    def publish(self) -> None:
        """Copy the records MetaSchedule added since the last call into the persistent database."""
        lines = text_lines(self.records)
        new = lines[self.published:]
        if not new:
            return
        if any(_workload_index_of(line) != 0 for line in new):  # the scratch holds one kernel
            raise RuntimeError(f"a record for another kernel in {self.records}")
        self.database.publish(text_lines(self.workloads)[0], new)
        self.published = len(lines)


def extract_kernels(lowered, tvm_target) -> list:
    import tvm.s_tir.meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(lowered, tvm_target))


def kernel_hash(task) -> str:
    """The kernel's identity across processes (what MetaSchedule's JSON database keys workloads by)."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def kernel_flops(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # loops with data-dependent bounds have no static count
        return 1.0


def _mean_seconds(run_secs) -> float:
    """A candidate's time: the mean of its repeats (TVM hands them over as FloatImm)."""
    return sum(float(s) for s in run_secs) / len(run_secs)


# --- building and measuring candidates --------------------------------------------------------


def build_candidate(mod, target, linker_command: str | None) -> str:
    """Compile one scheduled kernel and export it as a shared library (runs in a warm worker)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    library = tvm.compile(mod, target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="compactdeploy-candidate-"), "candidate.so")
    if linker_command is None:
        library.export_library(path)
    else:
        from tvm.support import cc

        library.export_library(path, fcompile=cc.cross_compiler(linker_command))
    return path


def WarmBuilder(linker_command: str | None, workers: int | None = None, timeout_s: float = 300.0):
    """A MetaSchedule builder whose worker processes live for the whole tuning run."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _WarmBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=workers or os.cpu_count() or 1, timeout=timeout_s,
                                          initializer=_ignore_interrupts)

        def build(self, build_inputs):
            jobs = [(i.mod, i.target, linker_command) for i in build_inputs]
            results = []
            for done in self.pool.map_with_error_catching(lambda job: build_candidate(*job), jobs):
                if done.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(done.value, None))
                else:
                    results.append(BuilderResult(None, f"build {done.status}: {first_line(done.value)}"))
            return results

        def shutdown(self):
            self.pool.shutdown()

    return _WarmBuilder()


def _evaluator():
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    # ~50 ms of runs per candidate: enough to rank kernels of a few microseconds, short enough
    # that measuring a batch costs less than building it
    return EvaluatorConfig(number=3, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False)


def local_runner(after_pause: bool = False):
    """Measure candidates on this machine, in one worker process kept for the whole run.

    ``after_pause``: each call after a pause, as ``pick_records`` times them; else back to back.
    """
    from tvm.s_tir.meta_schedule.runner import LocalRunner

    from .bundle_runner import use_default_threads

    use_default_threads()  # the worker inherits it: kernels tuned at the thread count the build runs them with
    return LocalRunner(timeout_sec=60, evaluator_config=_evaluator(), initializer=_ignore_interrupts,
                       f_run_evaluator=pause_evaluator if after_pause else None)


def rpc_runner(address, after_pause: bool = False):
    """Measure candidates on a device over TVM RPC (a server, or a tracker and a key).

    ``after_pause``: each call after a pause, as ``pick_records`` times them; else back to back.
    """
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    evaluator = _remote_pause_evaluator if after_pause else None

    def connect_server(_config):  # runs in MetaSchedule's worker process: an absolute import
        from compactdeploy.device import open_remote

        return open_remote(address, session_timeout=120)  # through the tracker when it has a key

    # the tracker fields are unused: connect_server opens every session, presenting the token
    config = RPCConfig(tracker_host="unused", tracker_port=1, tracker_key="unused", session_timeout_sec=120)
    runner = RPCRunner(rpc_config=config, evaluator_config=_evaluator(), f_create_session=connect_server,
                       f_run_evaluator=evaluator)
    return _named_device_runner(runner)


def _named_device_runner(inner):
    """``inner`` with each candidate's device named "cpu" rather than "llvm".

    MetaSchedule passes the target kind as the device type; TVM 0.27's RPC session accepts device
    names only ("Unknown device: llvm"), so every remote measurement failed without this.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerInput

    @derived_object
    class _Runner(PyRunner):
        def run(self, runner_inputs):
            renamed = [
                RunnerInput(i.artifact_path, _device_name(i.device_type), i.args_info)
                for i in runner_inputs
            ]
            return inner.run(renamed)

    return _Runner()


def check_tunable(target: TargetSpec, trials: int) -> None:
    if trials < 0:
        raise CompactDeployError(f"--tune-trials must be 0 or more (got {trials})")
    if trials and target.kind != "llvm":
        raise CompactDeployError(
            f"target {target.name}: tuning is implemented for CPU targets only; build {target.kind} "
            "targets without --tune-trials (their kernels are scheduled by DLight)"
        )
