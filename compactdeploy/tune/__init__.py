"""Tune stage: MetaSchedule searches schedules for the model's kernels, measured on the device.

The records go into one database per (target, device, TVM version) under the cache directory
(``database``). Every build applies what that database holds, so a second build of a model tunes
nothing and a pruned variant reuses the record of every kernel shape it shares with models tuned
before. ``budget`` shares the trials among kernels, ``search`` runs MetaSchedule one kernel at a
time with one warm cost model, ``rerank`` times each kernel's fastest records again as the model
runs them, and ``adapters`` holds MetaSchedule's builder and runners (warm workers: its stock
builder starts a process pool per batch, each worker importing tensor intrinsics first).
Why each choice, with figures: docs/tuning.md.
"""

from .adapters import local_runner, rpc_runner
from .budget import BATCH, TaskState, next_by_measured_time, plan_budgets
from .database import (
    remove_stale_databases,
    PICK_AMONG,
    Records,
    StoredDatabase,
    TuningDatabase,
    database_for,
    newest_database,
    remove_database,
    stored_databases,
)
from .search import TuneResult, check_tunable, transfers_schedules, tune, tune_model

__all__ = [
    "BATCH", "PICK_AMONG", "Records", "StoredDatabase", "TaskState", "TuneResult", "TuningDatabase", "check_tunable",
    "database_for", "local_runner", "newest_database", "next_by_measured_time", "plan_budgets", "remove_database",
    "remove_stale_databases", "rpc_runner", "stored_databases", "transfers_schedules", "tune", "tune_model",
]
