"""The width search's section of the report: the budget, the trajectory, every model measured, how
well the table predicted them, and each group's latency steps."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .allocate import Point
from .judge import HELD_OUT, trial_scores

# sessions the final build of a budgeted search is timed in, beside the unpruned model: one session's
# ratio to it moves by a few percent from another's (docs/fit.md), the median of three less
FINAL_SESSIONS = 3
# builds of a budgeted search's choice at most: one whose final timing lands over the budget gives way
# to the next model down, measured by the search, and the last is shipped whatever it measures
FINAL_BUILDS = 3
STEP_DROP = 0.01  # a width is a latency step when it saves this share of the full model below every wider one


def search_report(config, method, latency_budget, memory_budget, latency_ms, memory_bytes, space, trajectory, state,
            chosen, table, rounds, status, run_dir, predict, grown, judge=None) -> dict[str, Any]:
    def point_entry(p: Point) -> dict[str, Any]:
        return {"widths": p.widths, "table_ms": p.cost, "predicted_ms": predict(p) if latency_ms else None,
                "importance_kept": p.importance_kept, "changed": p.changed, "params": space.params(p.widths),
                "macs": space.macs(p.widths)}

    verified = [c for c in state.candidates if c.predicted_ms is not None]
    errors = [abs(c.predicted_ms - c.measured_ms) / c.measured_ms * 100 for c in verified]
    return {
        "status": status,
        "budget": {
            "latency": config.latency_budget, "latency_ms": latency_ms,
            "memory": config.memory_budget, "memory_bytes": memory_bytes,
            "memory_means": "weights (ONNX initializers) + TVM's planned workspace for intermediates",
        },
        "method": method,
        "importance": f"{method}: per group, the share of its channel importance that stays, weighted by the share of "
                      "the model's multiply-accumulates the group's channels shape",
        "judged_by": (
            f"held-out accuracy (trial_accuracy): each model weighed was pruned and fine-tuned {judge.epochs} epochs on "
            f"the first {1 - HELD_OUT:.0%} of the training split and scored on the rest (not the test split); the "
            "measured-cost pick and the MACs-paced and uniform ones predicted within the budget are weighed, and of "
            "the models measured within it the best is kept; where the best first trials are within a few points, "
            "those models are fine-tuned with more seeds (trial_accuracies) and kept by the mean, and weighed by it "
            "from then on"
            if judge is not None else "importance kept: no data to fine-tune on, or --fit-trial-epochs 0"
        ),
        "allocation": (
            "NetAdapt-style greedy on the measured latency table: from the full model, each step shrinks the group "
            "whose smallest cut saving a step of predicted latency loses the least importance per ms; "
            "the first step under the corrected budget is built and measured whole"
        ),
        "rounds": rounds,
        "channel_multiple_grid": {g: c for g, c in space.candidates.items()},
        "latency_table": {
            "path": str(table.path), "entries": len(table.entries), "measured_this_run": table.measured_now,
            "method": "each conv/linear layer (+ bias, ReLU) compiled alone at the candidate widths, timed on the device "
                      "(median of 7 repeats of at least 2 ms)",
        },
        "trajectory": [point_entry(p) for p in trajectory.points],
        "grown": [point_entry(p) for p in grown],
        "growth": (
            "--allow-grow: from the full model, each step widened the group gaining the most width (log ratio) per ms of "
            "predicted latency, by copying its strongest channels (Net2WiderNet: function-preserving, the copies' "
            "outgoing weights split at random so fine-tuning can tell them apart); up to 2x each group's width"
            if space.wider else None
        ),
        "latency_steps": latency_steps(space, table),
        "verified": [{**asdict(c), **_trials(state, c)} for c in state.candidates],
        "predictor_error_pct": {
            "median": float(np.median(errors)) if errors else None,
            "worst": float(max(errors)) if errors else None,
            "count": len(errors),
            "means": "|predicted - measured| / measured of every model built after a prediction",
        },
        "chosen": {**asdict(chosen), **_trials(state, chosen)},
        # chosen before, by this search or one it resumed, and not kept: their final builds measured over the budget
        "final_builds_over": [{"key": c.key, "widths": space.narrowed(c.widths), "searched_ms": c.measured_ms,
                               "predicted_ms": c.predicted_ms, "final_ms": state.final_over[c.key]}
                              for c in state.over_in_final_build(latency_ms)],
        "ceiling_ms": state.ceiling_ms(latency_ms),
        "widths": {g: {"before": space.full[g], "after": chosen.widths[g]} for g in space.full},
        "search_dir": str(run_dir),
        "figures": "latencies are whole-model medians measured on the device named in 'where'; "
                   "accuracies are after pruning, before fine-tuning",
    }


def _trials(state, candidate) -> dict[str, Any]:
    """A model's first trial score, and all of them where it was judged again with more seeds."""
    scores = trial_scores(state.trials, candidate.key)
    return {"trial_accuracy": scores[0] if scores else None, "trial_accuracies": scores if len(scores) > 1 else None}


def latency_steps(space, table) -> dict[str, Any]:
    """Per group, the table's latency of the full model with only that group at each candidate width,
    and the steps: the widths where it drops (by STEP_DROP of the full model's) below every wider
    candidate. Between two steps a narrower width loses channels and saves nothing."""
    full_signatures = space.signatures(space.full)
    if not all(s in table for s in full_signatures):
        return {}
    threshold = STEP_DROP * sum(table.ms(s) for s in full_signatures)
    result = {}
    for group, widths in space.candidates.items():
        curve = []
        for width in widths + space.wider.get(group, []):
            signatures = space.signatures({**space.full, group: width})
            if all(s in table for s in signatures):  # what the search measured; nothing is measured here
                curve.append((width, sum(table.ms(s) for s in signatures)))
        steps = [w for i, (w, ms) in enumerate(curve) if i + 1 < len(curve) and ms <= min(m for _, m in curve[i + 1:]) - threshold]
        result[group] = {"table_ms": {str(w): ms for w, ms in curve}, "steps": steps}
    return result


def widths_text(widths: dict[str, int]) -> str:
    return ", ".join(f"{g}={w}" for g, w in widths.items())


def budget_text(config) -> str:
    parts = [f"latency {config.latency_budget}" if config.latency_budget else "", f"memory {config.memory_budget}" if config.memory_budget else ""]
    return " and ".join(p for p in parts if p)


def fit_section(fitted, report: dict[str, Any], staging: Path, sessions=()) -> dict[str, Any]:
    """The search's report (``fit.FitResult``), with this final build's own measurement, and its plots.
    ``sessions``: the final build's measurements (``bench.Measurement``), each in a session of its own."""
    from ..bench.session import QUIET_PERCENTILE, quiet_times
    from .plots import draw

    section = dict(fitted.report)
    latency, budget = report["latency_ms"], section["budget"]["latency_ms"]
    reference = (latency or {}).get("reference")
    # as the search measured its candidates: beside the unpruned model, the ratio of the two's quiet
    # times times the unpruned model's latency as the search measured it first; the median of the sessions'
    quiet = [quiet_times([m]) for m in sessions if m.reference_chunk_ms and fitted.unpruned_ms]
    relative = [model_ms * fitted.unpruned_ms / reference_ms for model_ms, reference_ms in quiet]
    relative_ms = float(np.median(relative)) if relative else None
    judged = relative_ms if relative_ms is not None else (latency["median"] if latency else None)
    section["final"] = {
        "measured_ms": latency["median"] if latency else None,
        "unpruned_beside_ms": reference["median"] if reference else None,
        "relative_ms": relative_ms,
        "relative_ms_sessions": relative,
        "quiet_ms_sessions": [list(pair) for pair in quiet],  # each session's (model, unpruned model) quiet times
        "judged_ms": judged,  # relative_ms where the build was timed beside the unpruned model, else measured_ms
        "meets_latency_budget": None if judged is None or not budget else judged <= budget,
        "note": "the chosen widths built again (fine-tuned where --finetune-epochs is given) and measured again, in "
                f"turns with the unpruned model, in {FINAL_SESSIONS} sessions of the device: relative_ms is the median "
                f"over the sessions of its quiet time (percentile {QUIET_PERCENTILE} of its chunks' medians) times the unpruned "
                "model's latency as the search measured it, over the unpruned model's quiet time beside it (what the "
                "budget is judged by: another tenant's busy spells do not slow two models alike); "
                "measured_ms is its median alone in the first session, which moves with the device's slow and fast "
                "minutes",
    }
    section["plots"] = draw(section, staging)
    return section
