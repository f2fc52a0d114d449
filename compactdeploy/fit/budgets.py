"""A user's latency and memory budgets: absolute, or a share of the unpruned model's measured figure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import CompactDeployError

_LATENCY = re.compile(r"^\s*(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|us|µs|s|%)\s*$", re.IGNORECASE)
_MEMORY = re.compile(r"^\s*(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>b|kb|mb|gb|kib|mib|gib|%)?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """A limit, absolute or as a share of the unpruned model's measured figure."""

    value: float | None = None  # milliseconds or bytes
    share: float | None = None  # "60%": of the unpruned model, measured on the device

    def resolve(self, unpruned: float) -> float:
        return self.value if self.value is not None else self.share * unpruned

    def __str__(self) -> str:
        return f"{self.share:.0%} of the unpruned model" if self.share is not None else f"{self.value:g}"


def parse_latency_budget(text: str) -> Budget:
    """``"8ms"``, ``"800us"``, ``"0.5s"`` or ``"60%"`` (of the unpruned model's measured latency)."""
    match = _LATENCY.match(text or "")
    if not match or float(match["value"]) <= 0:
        raise CompactDeployError(f"--latency-budget {text!r} is not a time: give e.g. 8ms, 800us or 60% (of the unpruned model)")
    value, unit = float(match["value"]), match["unit"].lower()
    if unit == "%":
        return Budget(share=value / 100)
    return Budget(value=value * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[unit])


def parse_memory_budget(text: str) -> Budget:
    """``"40MB"``, ``"512KiB"``, bytes, or ``"50%"``: weights plus TVM's planned workspace."""
    match = _MEMORY.match(text or "")
    if not match or float(match["value"]) <= 0:
        raise CompactDeployError(f"--memory-budget {text!r} is not a size: give e.g. 40MB, 512KiB or 50% (of the unpruned model)")
    unit = (match["unit"] or "b").lower()
    if unit == "%":
        return Budget(share=float(match["value"]) / 100)
    return Budget(value=float(match["value"]) * _MEMORY_UNITS[unit])
