"""What the benchmark scripts share: where results go and the record of where they were measured."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from compactdeploy.resources import write_json as write_json_atomically

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def meta(script: str, seconds: float, **settings) -> dict:
    """Where, when and how a benchmark ran: every results file starts with this."""
    return {
        "measured_on": f"{platform.node()} ({cpu_description()}), CPU, {time.strftime('%Y-%m-%d')}",
        **settings,
        "seconds": round(seconds),
        "command": f".venv/bin/python tools/{script}",
    }


def cpu_description() -> str:
    """``x86_64, AMD EPYC, AVX2, 2 cores``: which CPU a figure came from (machines of one name differ)."""
    from compactdeploy.device.agent import fingerprint

    flags: set[str] = set()
    try:
        flags = next((set(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo")
                      if line.startswith(("flags", "Features"))), set())  # x86 says flags, aarch64 Features
    except OSError:
        pass
    vectors = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON")) if flag in flags), "")
    return ", ".join(part for part in (platform.machine(), fingerprint()["cpu"], vectors, f"{os.cpu_count()} cores") if part)


def write_json(name: str, info: dict, rows: list[dict], **extra) -> None:
    """``docs/benchmarks/NAME.json``: ``meta``, ``rows`` and any ``extra`` sections (e.g. every run behind the rows)."""
    DOCS.mkdir(exist_ok=True)
    # atomic: an interrupted write leaves the previous results whole
    write_json_atomically(DOCS / f"{name}.json", {"meta": info, "rows": rows, **extra})


# After a run, a runtime's worker threads spin before they sleep: measured on this 2-core host,
# TVM's pool burns ~75 ms of CPU, onnxruntime's ~40 ms. Timed inside that window, the next runtime
# shares its cores with them, so each batch starts after this pause and a few untimed runs.
QUIET_S = 0.2
BATCH_WARMUP = 3


def time_interleaved(runners: dict, rounds: int, runs_per_round: int, warmup: int) -> dict:
    """Each runner's run times (s): every runner in turn, ``runs_per_round`` runs each, ``rounds`` times,
    so a slow minute on a shared machine falls on all of them alike. Each batch starts once the
    runner before it has gone quiet (``QUIET_S``), after ``BATCH_WARMUP`` untimed runs."""
    times = {key: [] for key in runners}
    for run in runners.values():
        for _ in range(warmup):
            run()
    for _ in range(rounds):
        for key, run in runners.items():
            time.sleep(QUIET_S)
            for _ in range(BATCH_WARMUP):
                run()
            for _ in range(runs_per_round):
                begin = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - begin)
    return times


def pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, axes, name: str) -> None:
    """Label every panel's accuracy axis, put the legend on the first, write docs/benchmarks/NAME.png."""
    for ax in axes.flat:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(DOCS / f"{name}.png", dpi=110)


def plot_accuracy_at_latency(rows: list[dict], markers: dict[str, str], ylabel: str, name: str) -> None:
    """One panel per model: each strategy's accuracy against its measured latency, the budgets dashed;
    writes docs/benchmarks/NAME.png. Rows carry model, strategy, measured_ms, accuracy (0-1) and budget_ms."""
    plt = pyplot()
    models = sorted({r["model"] for r in rows})
    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes.flat, models):
        for strategy, marker in markers.items():
            points = [(r["measured_ms"], r["accuracy"] * 100) for r in rows
                      if r["model"] == model and r["strategy"] == strategy and r["accuracy"] is not None]
            axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=strategy, s=50)
        for budget in sorted({r["budget_ms"] for r in rows if r["model"] == model}):
            axis.axvline(budget, color="0.6", linestyle="--", linewidth=1)
        axis.set_title(f"{model} (dashed: budgets)", fontsize=9)
        axis.set_xlabel("latency measured on this host, ms")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(DOCS / f"{name}.png", dpi=110)
