"""What the benchmark scripts share: where results go and the record of where they were measured."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def meta(script: str, seconds: float, **settings) -> dict:
    """Where, when and how a benchmark ran: every results file starts with this."""
    return {
        "measured_on": f"{platform.node()} ({platform.processor() or platform.machine()}), CPU, {time.strftime('%Y-%m-%d')}",
        **settings,
        "seconds": round(seconds),
        "command": f".venv/bin/python tools/{script}",
    }


def write_json(name: str, info: dict, rows: list[dict]) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / f"{name}.json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1) + "\n")
