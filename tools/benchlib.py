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


def pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, axes, name: str) -> None:
    """Label every panel's accuracy axis, put the legend on the first, write docs/NAME.png."""
    for ax in axes.flat:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(DOCS / f"{name}.png", dpi=110)
