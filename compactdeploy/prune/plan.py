"""A width plan: the widths a model was given and the channels that went (or were copied), as data.

The width search and ``build --prune`` write one (``plan.json`` in the bundle); ``build --plan FILE``
replays it: the plan's method prunes the same model to the plan's widths, and the channels it
removes must be the plan's, so a build from a plan computes what the searched or pruned model did
(merging methods compensate the kept channels; replaying their choice is what makes that exact).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CompactDeployError

PLAN_FORMAT = 1
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class WidthPlan:
    model: str  # the zoo name or file:Class it applies to
    model_args: dict[str, Any]
    weights_sha256: str | None  # the weights it was made on (None: the model's own initialisation)
    method: str  # the pruning method that chose the channels
    seed: int
    exclude: tuple[str, ...]
    widths: dict[str, int]  # every changed group (root layer) -> its width
    removed: dict[str, list[int]]  # group -> channel indices removed, as the method chose them
    grown: dict[str, list[int]] = field(default_factory=dict)  # group -> channels copied to widen it
    made_by: str = "prune"  # "prune" (build --prune) or "fit" (a budgeted search)

    def as_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **asdict(self), "exclude": list(self.exclude)}

    def save(self, path: Path) -> None:
        from ..resources import write_json

        write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | Path) -> WidthPlan:
        path = Path(path)
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            raise CompactDeployError(f"plan {path} does not exist: give the plan.json of a bundle or a search") from None
        except (OSError, ValueError) as exc:
            raise CompactDeployError(f"plan {path} is not readable JSON ({exc}): give the plan.json a build wrote") from None
        if not isinstance(stored, dict) or stored.get("format") != PLAN_FORMAT:
            raise CompactDeployError(f"plan {path} is not a compactdeploy width plan (format {PLAN_FORMAT}): give the "
                                     "plan.json a build wrote")
        try:
            return cls(
                model=str(stored["model"]), model_args=dict(stored["model_args"]),
                weights_sha256=stored["weights_sha256"], method=str(stored["method"]), seed=int(stored["seed"]),
                exclude=tuple(stored["exclude"]),
                widths={str(k): int(v) for k, v in stored["widths"].items()},
                removed={str(k): [int(i) for i in v] for k, v in stored["removed"].items()},
                grown={str(k): [int(i) for i in v] for k, v in stored.get("grown", {}).items()},
                made_by=str(stored.get("made_by", "prune")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CompactDeployError(f"plan {path} is damaged ({type(exc).__name__}: {exc}): give the plan.json a "
                                     "build wrote") from None

    def check_replayed(self, removed: dict[str, list[int]], grown: dict[str, list[int]]) -> None:
        """Refuse a replay whose method chose other channels than the plan's (other weights or data)."""
        for name in sorted(set(self.removed) | set(removed)):
            if sorted(self.removed.get(name, [])) != sorted(removed.get(name, [])):
                raise CompactDeployError(
                    f"replaying the plan, {self.method} removed other channels of {name} than the plan's: it was made "
                    "with other weights, data or seed; build with the --weights, --data and --seed it was made with"
                )
        if {k: sorted(v) for k, v in self.grown.items()} != {k: sorted(v) for k, v in grown.items()}:
            raise CompactDeployError("replaying the plan widened other channels than the plan's: build with the --seed it "
                                     "was made with")
