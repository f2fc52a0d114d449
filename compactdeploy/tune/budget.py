"""How a tuning budget is shared among a model's kernels: half by FLOPs before anything is
measured, the rest by the time each kernel then costs the model. Pure functions of the records'
counts and times, so an interrupted run resumes the same plan."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BATCH = 32  # candidates built and measured together: MetaSchedule's unit of progress
MIN_DEFICIT = BATCH // 4
ROUND_TRIALS = 4 * BATCH  # the most one kernel gets before the split by measured time is redone


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
    misjudge kernels, and a slow kernel's time falls fast with more trials (docs/tuning.md). Each
    round gives the kernel furthest below its share of the budget
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
