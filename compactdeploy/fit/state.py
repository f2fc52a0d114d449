"""The models a width search measured, kept on disk after each one: what --resume reads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CompactDeployError


def widths_key(widths: dict[str, int]) -> str:
    """Names a model (its widths) in the search's state and report."""
    return hashlib.sha256(json.dumps(widths, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Candidate:
    """A model the search pruned and measured whole on the device, compiled as it would ship."""

    widths: dict[str, int]
    table_ms: float  # sum of its layers in the latency table
    predicted_ms: float | None  # the corrected prediction when it was picked (None: the unpruned model)
    measured_ms: float
    memory_bytes: int  # weights + planned workspace, from the compiled model
    params: int
    macs: int
    accuracy: float | None  # after pruning, before fine-tuning
    importance_kept: float
    where: str
    key: str  # names the candidate (its widths) in the search's state and report
    removed: dict[str, list[int]] = field(default_factory=dict)  # group -> channels the method removed
    grown: dict[str, list[int]] = field(default_factory=dict)  # group -> channels copied to widen it
    schedules: dict[str, int] = field(default_factory=dict)  # schedule source -> kernels compiled with it
    unscheduled: list[str] = field(default_factory=list)  # conv/matmul kernels compiled without a schedule
    # timed in turns with the unpruned model: measured_ms is its quiet time (alone_ms) scaled by the
    # unpruned model's first measurement over its quiet time beside this one (bench.quiet_times)
    alone_ms: float | None = None
    reference_ms: float | None = None
    timings: int = 1  # windows it was timed in: more where the device was busy through the first
    # kept near the budget: timed again in a session of its own, the mean of the two (kept only where
    # the second is within too; measured_ms stays the first, which later predictions were fitted to)
    confirmed_ms: float | None = None

    def meets(self, latency_ms: float | None, memory_bytes: float | None) -> bool:
        return (latency_ms is None or self.measured_ms <= latency_ms) and (memory_bytes is None or self.memory_bytes <= memory_bytes)

    def second_timing_ms(self) -> float | None:
        """Its second timing, where it was timed again (``confirmed_ms`` is the two's mean)."""
        return None if self.confirmed_ms is None else 2 * self.confirmed_ms - self.measured_ms

    def confirmed_within(self, latency_ms: float | None) -> bool:
        """Timed again near the budget: its second timing within it too; True for a model not timed again."""
        second = self.second_timing_ms()
        return latency_ms is None or second is None or second <= latency_ms

    def on_search_scale_ms(self) -> float:
        """The most the search knew of its latency, on the search's scale: its timing, its second
        timing where timed again, and the latency predicted for it from the models measured before
        it. A final build over it by what one lucky timing explains says nothing of the others'."""
        return max(self.measured_ms, self.second_timing_ms() or 0.0, self.predicted_ms or 0.0)


@dataclass
class SearchState:
    """Verified candidates, on disk after each one: what --resume starts from.

    A resumed search replays the run it resumes: its decisions (predictions, "measured before")
    use only the models this run has met so far (``walked``), in the order met, so the same budget
    walks to the same models and measures nothing again. Predicting from every stored model instead
    would let a finished run's last measurement move the first pick of its rerun. Every stored
    model is still a candidate for the final choice.
    """

    path: Path
    key: dict[str, Any]
    candidates: list[Candidate] = field(default_factory=list)
    trials: dict[str, float] = field(default_factory=dict)  # widths key -> held-out accuracy (fit.judge)
    # widths key -> the judged latency of a chosen model's final build that measured over the budget
    final_over: dict[str, float] = field(default_factory=dict)
    walked: list[Candidate] = field(default_factory=list)  # met by this run, stored or new; not saved

    def find(self, widths: dict[str, int]) -> Candidate | None:
        return next((c for c in self.candidates if c.widths == widths), None)

    def met(self, widths: dict[str, int]) -> bool:
        return self.walked_at(widths) is not None

    def walked_at(self, widths: dict[str, int]) -> Candidate | None:
        """The model of these widths as this run met it, if it has."""
        return next((c for c in self.walked if c.widths == widths), None)

    def meet(self, candidate: Candidate) -> Candidate:
        if not self.met(candidate.widths):
            self.walked.append(candidate)
        return candidate

    def save(self) -> None:
        from ..resources import write_json

        write_json(self.path, {"key": self.key, "candidates": [asdict(c) for c in self.candidates],
                                "trials": self.trials, "final_over": self.final_over})

    def over_in_final_build(self, latency_ms: float | None) -> list[Candidate]:
        """The models measured within ``latency_ms`` whose final builds measured over it (the searches
        of one model share a state: a build at another budget is not this one's)."""
        if latency_ms is None:
            return []
        return [c for c in self.candidates
                if c.key in self.final_over and c.measured_ms <= latency_ms < self.final_over[c.key]]

    def ceiling_ms(self, latency_ms: float | None) -> float | None:
        """What the search's timings must meet: the budget, lowered where a chosen model's final build
        measured over it by the ratio of that build's latency to the search's (``on_search_scale_ms``),
        which ran low by as much for the models timed beside it."""
        if latency_ms is None:
            return None
        return min([latency_ms] + [latency_ms * c.on_search_scale_ms() / self.final_over[c.key]
                                   for c in self.over_in_final_build(latency_ms)])

    @classmethod
    def load(cls, path: Path, key: dict[str, Any], resume: bool) -> SearchState:
        """This run's state: the one stored at ``path`` where resuming, else an empty one."""
        return cls.open(path, key) if resume and path.exists() else cls(path, key)

    @classmethod
    def open(cls, path: Path, key: dict[str, Any] | None = None) -> SearchState:
        """The state stored at ``path``, under ``key`` (None: the run key it was stored with)."""
        try:
            stored = json.loads(path.read_text())
            return cls(
                path, stored["key"] if key is None else key,
                candidates=[Candidate(**c) for c in stored["candidates"]],
                trials={str(k): float(v) for k, v in stored.get("trials", {}).items()},
                final_over={str(k): float(v) for k, v in stored.get("final_over", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError):
            raise CompactDeployError(f"the search state {path} is damaged; run without --resume to start over") from None
