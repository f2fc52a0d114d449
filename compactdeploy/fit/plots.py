"""The search drawn: what it explored against the budget, how well the table predicted, the widths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("fit-pareto.png", "fit-predicted-vs-measured.png", "fit-widths.png")


def draw(fit: dict[str, Any], directory: Path) -> list[str]:
    """Write the three PNGs into ``directory``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verified, chosen = fit["verified"], fit["chosen"]
    emulated = any("EMULATED" in c["where"] for c in verified)
    measured_on = "EMULATED device (qemu): not real latency" if emulated else "measured on the device"
    budget_ms = fit["budget"]["latency_ms"]

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if fit.get("grown"):  # growing keeps every channel: what it adds is width, drawn as parameters
        full = verified[0]["params"]
        steps = [p for p in fit["grown"] if p["predicted_ms"] is not None]
        y_of = lambda item: item["params"] / full  # noqa: E731
        label, ylabel = "growth steps (predicted latency)", "parameters (share of the unpruned model)"
    else:
        steps = [p for p in fit["trajectory"] if p["predicted_ms"] is not None]
        y_of = lambda item: item["importance_kept"]  # noqa: E731
        label, ylabel = "allocation steps (predicted latency)", "importance kept (mean share per group)"
    if steps:
        left.plot([p["predicted_ms"] for p in steps], [y_of(p) for p in steps], "-", color="0.6", label=label)
    left.scatter([c["measured_ms"] for c in verified], [y_of(c) for c in verified],
                 color="tab:blue", zorder=3, label="built and measured")
    left.scatter([chosen["measured_ms"]], [y_of(chosen)], color="tab:red", s=80, zorder=4, label="chosen")
    left.set_xlabel("latency, ms")
    left.set_ylabel(ylabel)
    have_accuracy = all(c["accuracy"] is not None for c in verified)
    right.scatter([c["measured_ms"] for c in verified],
                  [c["accuracy"] * 100 if have_accuracy else c["params"] for c in verified], color="tab:blue", zorder=3)
    right.scatter([chosen["measured_ms"]], [chosen["accuracy"] * 100 if have_accuracy else chosen["params"]],
                  color="tab:red", s=80, zorder=4)
    right.set_xlabel(f"latency, ms ({measured_on})")
    right.set_ylabel("test accuracy before fine-tuning, %" if have_accuracy else "parameters")
    for axis in (left, right):
        if budget_ms:
            axis.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1, label="latency budget")
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle(f"width search ({fit['method']}): {fit['status']}")
    figure.tight_layout()
    figure.savefig(directory / PLOTS[0], dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 4.5))
    pairs = [(c["predicted_ms"], c["measured_ms"]) for c in verified if c["predicted_ms"] is not None]
    if pairs:
        axis.scatter([p for p, _ in pairs], [m for _, m in pairs], color="tab:blue")
        top = max(max(p, m) for p, m in pairs) * 1.1
        axis.plot([0, top], [0, top], color="0.5", linewidth=1)
        axis.set_xlim(0, top)
        axis.set_ylim(0, top)
    error = fit["predictor_error_pct"]
    text = f"median {error['median']:.1f} %, worst {error['worst']:.1f} %" if error["count"] else "no predictions verified"
    axis.set_title(f"predicted vs measured latency ({text})", fontsize=9)
    axis.set_xlabel("predicted, ms (table + correction)")
    axis.set_ylabel(f"measured, ms ({'EMULATED' if emulated else 'device'})")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(directory / PLOTS[1], dpi=110)
    plt.close(figure)

    groups = list(fit["widths"])
    figure, axis = plt.subplots(figsize=(max(5, 0.45 * len(groups) + 2), 4))
    positions = range(len(groups))
    axis.bar([i - 0.2 for i in positions], [fit["widths"][g]["before"] for g in groups], width=0.4, label="before", color="0.7")
    axis.bar([i + 0.2 for i in positions], [fit["widths"][g]["after"] for g in groups], width=0.4, label="chosen", color="tab:blue")
    axis.set_xticks(list(positions))
    axis.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("channels / neurons")
    axis.legend()
    axis.set_title("width of each group", fontsize=9)
    figure.tight_layout()
    figure.savefig(directory / PLOTS[2], dpi=110)
    plt.close(figure)
    return list(PLOTS)
