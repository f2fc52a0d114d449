"""The tuning database: MetaSchedule's records for one (target, device, TVM version), kept as
text, published batch by batch, and the view of one record per kernel that builds apply.

A pruned variant reuses the record of every kernel shape it shares with models tuned before, and
``compactdeploy cache`` lists and removes the databases (``stored_databases``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..resources import write_json
from ..compile.passes import RECORDS_FILE, SOURCES_FILE, WORKLOADS_FILE
from ..errors import CompactDeployError, first_line
from ..resources import cache_dir, directory_bytes
from ..targets import TargetSpec

# identity.json's format: what tells an old database from a current one (for a migration), never a date
IDENTITY_FORMAT = 1
# kernels whose search space ran out before their budget (structural hash -> trials then):
# a rerun with the same or a larger budget would only restart MetaSchedule to find nothing new
_EXHAUSTED = "exhausted.json"
_BEST_VIEW = "best"
# which of its fastest records each kernel applies, chosen by a second timing (``rerank``)
_PICKS = "picks.json"
# record key -> where that record's schedule came from, for records not found by the search
# (``origins``); a view holds the applied records' as ``SOURCES_FILE``
_ORIGINS = "origins.json"
PICK_AMONG = 4  # a kernel's fastest records, as tuned, that the second timing chooses among
FAILED_SECONDS = 1e9  # MetaSchedule records a candidate that failed to build or run as 1e10 s


@dataclass(frozen=True)
class TuningDatabase:
    """Where the records for one (target, device, TVM version) live."""

    path: Path
    identity: dict[str, Any]

    def read(self) -> Records:
        """The records, read as text: a kernel's count and best time without MetaSchedule's reader."""
        # records first: a tuner publishing meanwhile adds a workload before any record naming it
        record_lines = text_lines(self.path / RECORDS_FILE)
        try:
            return Records.parse(text_lines(self.path / WORKLOADS_FILE), record_lines)
        except (ValueError, IndexError, TypeError) as exc:
            raise self.damaged(exc) from None

    def damaged(self, exc: Exception) -> CompactDeployError:
        """The one-line error for records that cannot be read."""
        return CompactDeployError(
            f"the tuning database {self.path} is damaged ({first_line(exc)}): move it away and build "
            "again (its kernels are then tuned afresh with --tune-trials)"
        )

    def resume_hint(self) -> str:
        return f"every finished batch is kept in {self.path}: run the same command again to resume"

    def best_view(self) -> Path | None:
        """A database holding one record per kernel: what builds apply.

        That record is the one the second timing picked (``pick_records``) while the kernel's
        fastest records are still those it chose among, else the fastest as tuned.
        MetaSchedule's JSON reader builds a TVM object (target included) for every record, slow for
        thousands of them, where one record per kernel is all a build applies. The view is named by the record and pick files' sizes and times, so a change makes
        a new one; it is written in a directory of its own and renamed into place, never seen
        half-written. Beside the records, ``SOURCES_FILE`` says where each applied record that the
        search did not find came from (structural hash -> origin, ``origins``). Returns None where
        no kernel has a record that ran.
        """
        records_file = self.path / RECORDS_FILE
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
        (staging / WORKLOADS_FILE).write_text("".join(records.workloads[i] + "\n" for i in kept))
        (staging / RECORDS_FILE).write_text("".join(renumbered(applied[i], n) + "\n" for n, i in enumerate(kept)))
        origins = self.origins()
        sources = {_workload_hash_of(records.workloads[i]): origins[record_key(applied[i])]
                   for i in kept if record_key(applied[i]) in origins}
        write_json(staging / SOURCES_FILE, sources)
        try:
            os.rename(staging, view)
        except OSError:  # another build made the same view first
            shutil.rmtree(staging, ignore_errors=True)
        return view

    def picks(self) -> dict[str, dict[str, Any]]:
        """Structural hash -> the second timing's pick: ``top`` (the records it chose among),
        ``rank`` (the one chosen, 0 = fastest as tuned), ``us`` (each one's median)."""
        return _read_side_file(self.path / _PICKS, "the second timing's picks",
                               "with --tune-trials, its kernels are timed again")

    def origins(self) -> dict[str, dict[str, Any]]:
        """Record key (``record_key``) -> where the record's schedule came from, for the records not
        found by MetaSchedule's search: ``{"source": "default rule", "why": ...}`` or
        ``{"source": "transferred", "from": <the donor kernel, described>, "donor": <its hash>}``."""
        return _read_side_file(self.path / _ORIGINS, "the schedule origins",
                               "the records stay; the report then calls every applied record a tuned one")

    def save_pick(self, workload_hash: str, pick: dict[str, Any]) -> None:
        write_json(self.path / _PICKS, {**self.picks(), workload_hash: pick})

    def remove_stale_views(self) -> None:
        """Views of record files since replaced (the tuner calls this, holding the lock)."""
        current = self.best_view()
        for view in self.path.glob(f"{_BEST_VIEW}-*"):
            if view != current:
                shutil.rmtree(view, ignore_errors=True)

    def publish(self, workload_line: str, record_lines: list[str],
                origins: list[dict[str, Any] | None] | None = None) -> None:
        """Add one kernel's new records, each file replaced atomically; ``origins``: where each
        record's schedule came from (None: the search), saved before the records.

        Workloads first: a record names its workload by line number, so the workload file must
        never be older than the record file. ``record_lines`` name their workload as line 0.
        """
        if not record_lines:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        known_origins = {record_key(line): origin for line, origin in zip(record_lines, origins or []) if origin}
        if known_origins:
            write_json(self.path / _ORIGINS, {**self.origins(), **known_origins})
        identity_file = self.path / "identity.json"
        if not identity_file.exists():  # says what the records were measured on
            write_json(identity_file, self.identity)
        workloads = text_lines(self.path / WORKLOADS_FILE)
        known = {_workload_hash_of(line): number for number, line in enumerate(workloads)}
        index = known.get(_workload_hash_of(workload_line))
        if index is None:
            index = len(workloads)
            _append_atomically(self.path / WORKLOADS_FILE, [workload_line])
        _append_atomically(self.path / RECORDS_FILE, [renumbered(line, index) for line in record_lines])

    @contextlib.contextmanager
    def locked(self, required: bool = True) -> Iterator[bool]:
        """One tuning run per database at a time: two would overwrite each other's records.
        Yields whether this run holds the database; where another does, raises if ``required``."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not required:
                    yield False
                    return
                raise CompactDeployError(
                    f"another build is tuning into {self.path}: wait for it to finish, then build again"
                ) from None
            yield True

    def records_sha256(self, excluding_by: str | None = None) -> str | None:
        """Names the records as they stand (None: none yet): what measured against them is stale after
        a change. ``excluding_by``: leave out the records whose origin was made by that step (the
        width search's candidates add transferred records, which must not invalidate its own table)."""
        records = self.path / RECORDS_FILE
        if not records.exists():
            return None
        if excluding_by is None:
            return hashlib.sha256(records.read_bytes()).hexdigest()
        origins = self.origins()
        kept = [line for line in text_lines(records) if origins.get(record_key(line), {}).get("by") != excluding_by]
        return hashlib.sha256("\n".join(kept).encode()).hexdigest() if kept else None

    def record_count(self) -> int:
        """Measurements held (one line each in MetaSchedule's JSON database)."""
        records = self.path / RECORDS_FILE
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
    # the format is written beside what the records were measured on, not hashed into the name
    return TuningDatabase(cache_dir("tuning") / f"{target.name}-{digest}", {**identity, "format": IDENTITY_FORMAT})


def newest_database(target: TargetSpec) -> TuningDatabase | None:
    """For a build with no device to ask: the database of ``target`` tuned most recently with this TVM."""
    readable = []
    for path in cache_dir("tuning").glob(f"{target.name}-*"):
        identity, stale = _identity_of(path)
        if (path / RECORDS_FILE).exists() and stale is None:
            readable.append(TuningDatabase(path, identity))
    if not readable:
        return None
    return max(readable, key=lambda database: (database.path / RECORDS_FILE).stat().st_mtime)


def _identity_of(path: Path) -> tuple[dict[str, Any], str | None]:
    """A stored database's identity, and why no build with this TVM reads it (None: builds may)."""
    import tvm

    try:
        identity = json.loads((path / "identity.json").read_text())
        version = identity.get("tvm_version")
        written_format = identity.get("format", 1)  # databases from before the field are format 1
    except (OSError, ValueError, AttributeError):
        return {}, "no readable identity.json (what it was measured on is unknown)"
    if written_format != IDENTITY_FORMAT:
        return identity, f"database format {written_format}, this compactdeploy reads {IDENTITY_FORMAT}"
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
        records = path / RECORDS_FILE
        entries.append(StoredDatabase(
            path=path,
            identity=identity,
            kernels=len(text_lines(path / WORKLOADS_FILE)),
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
            index = workload_index_of(line)
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

    def kernels_from(self, origins: dict[str, dict[str, Any]], source: str) -> set[str]:
        """The kernels (structural hashes) with a record whose origin (``TuningDatabase.origins``) is ``source``."""
        return {workload_hash for workload_hash, index in self.by_hash.items()
                if any(origins.get(record_key(line), {}).get("source") == source for line in self.by_workload.get(index, []))}

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
        if pick_stands(pick, top):
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


def _read_side_file(path: Path, what: str, then: str) -> dict[str, Any]:
    """A JSON file kept beside the records ({} where there is none); damaged: one line saying what to do."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError as exc:
        raise CompactDeployError(f"{what} {path} are damaged ({first_line(exc)}): delete that file and build "
                                 f"again ({then})") from None


def text_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _workload_hash_of(workload_line: str) -> str:
    """The leading string alone: the module after it is ~100 KB of base64 not worth parsing."""
    return json.loads(workload_line[1:workload_line.index(",")])


def record_key(record_line: str) -> str:
    """Names a record wherever it is kept: its trace and times, not its workload's line number."""
    return hashlib.sha256(record_line[record_line.index(","):].encode()).hexdigest()[:16]


def workload_index_of(record_line: str) -> int:
    return int(record_line[1:record_line.index(",")])


def renumbered(record_line: str, workload_index: int) -> str:
    """The record line naming workload line ``workload_index`` (the rest of it untouched)."""
    return f"[{workload_index}," + record_line[record_line.index(",") + 1:]


def _record_seconds(record_line: str) -> float | None:
    """The record's time (mean of its repeats), None for a candidate that failed."""
    run_secs = json.loads(record_line)[1][1]
    if not run_secs or max(run_secs) >= FAILED_SECONDS:
        return None
    return mean_seconds(run_secs)


def _is_unscheduled(record_line: str) -> bool:
    """An empty trace: [<workload>, [[[], []], ...] as MetaSchedule writes it (no spaces)."""
    return record_line[record_line.index(","):].startswith(",[[[],[]],")


def top_key(record_lines: list[str]) -> str:
    """Names a kernel's fastest records: a pick stands while they stay the same."""
    return hashlib.sha256("\n".join(record_lines).encode()).hexdigest()[:16]


def pick_stands(pick: dict[str, Any] | None, top: list[str]) -> bool:
    """Whether the second timing's ``pick`` was made among ``top``, the kernel's fastest records now."""
    return pick is not None and pick["top"] == top_key(top) and pick["rank"] < len(top)


def _append_atomically(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if path.exists():
        shutil.copyfile(path, tmp)
    with open(tmp, "a") as file:
        file.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def mean_seconds(run_secs) -> float:
    """A candidate's time: the mean of its repeats (TVM hands them over as FloatImm)."""
    return sum(float(s) for s in run_secs) / len(run_secs)


def remove_stale_databases(databases: list[StoredDatabase]) -> tuple[list[StoredDatabase], list[StoredDatabase]]:
    """Delete those of ``databases`` no build reads; returns (removed, left because a build is tuning into them)."""
    removed, in_use = [], []
    for entry in databases:
        if entry.stale is None:
            continue
        try:
            remove_database(entry.path)
            removed.append(entry)
        except CompactDeployError:  # a build is tuning into it now: left whole
            in_use.append(entry)
    return removed, in_use
