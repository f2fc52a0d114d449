"""The width search: allocate on the measured table, prune the pick, measure it whole on the
device as it would ship, correct the prediction with what was measured, and go again until a
model meets the budget. The unpruned and the smallest model are measured before anything is
predicted: every prediction is then fitted to models on both sides of it.

The search takes the loaded model, the target, a ``Measurer`` (``measure``: the device, or a
stand-in) and the budget, and returns a width plan; it calls the stages itself (prune here, export,
compile and benchmark in the measurer), so no candidate becomes a bundle. Every measured candidate
is kept with the search's state, so ``--resume`` after an interruption or a lost device measures
nothing it already has.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BuildConfig, check_finetune_options
from ..errors import CompactDeployError
from ..prepare import width_plan
from ..resources import cache_dir
from ..units import format_size
from .allocate import GROW_LIMIT, Point, Trajectory, importance_curves, width_space
from .budgets import parse_latency_budget, parse_memory_budget
from .costs import measure_missing
from .judge import TrialJudge, trial_epochs, trial_judge, trial_scores
from .measure import Measurer
from .report import budget_text, search_report, widths_text
from .state import Candidate, SearchState, widths_key

MARGIN = 0.03  # aim this far under the budget: whole-model medians move a little between builds
CLOSE_ENOUGH = 0.10  # a feasible model within this share of the budget ends the search
NEAR_PER_TRAJECTORY = 3  # models of each trajectory weighed near the budget once it is met
GUESSED_STEPS = 2  # steps of the MACs-paced trajectory measured where the predictor says, before midpoints
# one seed's trial, scored on a few hundred held-out samples, orders models this close at random: the
# best few within it are judged again with more seeds, and kept by the mean
TRIAL_NOISE = 0.03
TRIAL_REPEATS = 3
JUDGED_AGAIN = 3  # at most this many of the best models measured within
# one session's ratio to the unpruned model moves by a few percent from another's: a model kept within
# this share under the budget is timed again first, and kept only if both timings are within
REPEATABILITY = 0.03
CONFIRMED_AT_MOST = 3  # models timed again before the search settles
STEPS_BELOW_MEASURED = 4  # steps of a trajectory measured for the widest within below a model over the budget
# the prediction's fit weighs a measured model exp(-distance / this) against the nearest one, by how
# differently the two are cut (mean |log width ratio|: 0.1 is every group about 10 % apart); chosen by
# replaying the benchmark's stored searches (tools/replay_predictor.py, docs/benchmarks/predictor-replay.md)
NEIGHBOUR_SCALE = 0.1
# the fit credits weights streamed beyond the cache once this many measured models stream, beside one
# more model (1 credited the unpruned model's whole difference to the smallest; replayed the same way)
STREAMING_MODELS = 2
# the unpruned model alone this far over its quiet time beside the smallest model was timed in a
# slow spell (``_rescale_on_reference``): beside another model it runs about as fast or slower
SLOW_SCALE = 1.2
# what a stored search holds and how it walked (8: table times on the anchor layer's scale, the smallest
# model measured first, picks from the MACs-paced and uniform trajectories too, judged by trial
# fine-tunes, models worth more near the budget measured last, within the predictor's median error;
# 9: beside the unpruned model, judged by the two's quiet times; 10: the table timed in quiet passes,
# the unpruned model alone in windows until two agree; 11: the unpruned model's scale is its quiet
# time over those windows, not its quietest window's median); another format is not resumed
STATE_FORMAT = 11


@dataclass(frozen=True)
class FitResult:
    method: str
    widths: dict[str, int]  # the chosen model's width of every group
    changed: dict[str, int]  # the groups whose width differs from the unpruned model's: build --widths
    widened: dict[str, int]  # those of them grown wider (--allow-grow)
    report: dict[str, Any]
    plan: Any  # prune.WidthPlan of the chosen model; None when it is the unpruned one
    unpruned_ms: float | None = None  # the unpruned model's latency as the search measured it first
    reference_library: Any = None  # Path: the unpruned model compiled as it ships, to time the final build beside


def record_final_over(fitted: FitResult, judged_ms: float) -> None:
    """The final build of ``fitted``'s choice measured ``judged_ms``, over the budget: kept in the
    search's state, so the search resumed keeps another model (``SearchState.ceiling_ms``)."""
    state = SearchState.open(Path(fitted.report["search_dir"]) / "state.json")
    state.final_over[fitted.report["chosen"]["key"]] = judged_ms
    state.save()


def default_method(config: BuildConfig) -> str:
    """The method given with --prune, else data-free without data and taylor with it."""
    if config.prune.prune:
        method, sep, _ = config.prune.prune.partition(":")
        if sep:
            raise CompactDeployError(
                f"with a budget, --prune names only the method ({method}); the search chooses the widths"
            )
        return method
    return "taylor" if config.model.data else "data-free"


def check_fit_options(config: BuildConfig, target) -> None:
    """What can be refused before any work."""
    from ..prune import METHODS

    fit, prune, data = config.fit, config.prune, config.model.data
    if fit.latency_budget:
        parse_latency_budget(fit.latency_budget)
    if fit.memory_budget:
        parse_memory_budget(fit.memory_budget)
    if prune.widths:
        raise CompactDeployError("--widths and a budget exclude each other: the search chooses the widths")
    check_finetune_options(prune, data)
    if prune.noise_outputs:
        raise CompactDeployError("--noise-outputs is not supported with a budget yet: build with --prune noiseout:RATIO")
    method = default_method(config)
    if method not in METHODS:
        raise CompactDeployError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    if METHODS[method].needs_data and data is None:
        raise CompactDeployError(f"pruning method {method} needs data: pass --data (a dataset name or a .npz)")
    if prune.allow_grow and not (data and prune.finetune_epochs):
        raise CompactDeployError(
            "--allow-grow needs --data and --finetune-epochs N: a widened model computes exactly what the original "
            "did until it is trained"
        )
    if fit.fit_rounds < 1:
        raise CompactDeployError(f"--fit-rounds must be at least 1 (got {fit.fit_rounds})")
    if fit.fit_trial_epochs < 0:
        raise CompactDeployError(f"--fit-trial-epochs must be 0 or more (got {fit.fit_trial_epochs}; 0 judges the "
                                 "models by channel importance)")


def _run_key(config: BuildConfig, target, method: str, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    from ..zoo import file_sha256

    model = config.model
    return {
        "format": STATE_FORMAT,
        "model": model.model,
        "model_args": model.model_args,
        "weights_sha256": file_sha256(model.weights) if model.weights else None,
        "data": model.data,
        "input_shape": model.input_shape,
        "exclude": list(config.prune.exclude),
        "method": method,
        "calibration_samples": config.prune.calibration_samples,
        "seed": model.seed,
        "points": config.fit.fit_points,
        "trial_epochs": trial_epochs(config.fit, config.prune.finetune_epochs),
        "target": target.name,
        "device": {k: (fingerprint or {}).get(k) for k in ("cpu", "machine", "cuda", "emulated", "hostname")},
    }


def search(config: BuildConfig, target, loaded, measurer: Measurer, progress: Callable[[str], None]) -> FitResult:
    """Find the widths of the most accurate model whose measured latency and memory meet the budgets.

    ``loaded``: the model as the load stage gives it (``prepare.Loaded``; candidates are pruned
    copies of it); ``measurer`` times layers and whole candidates on the device, compiled as they
    would ship (``measure.DeviceMeasurer``), or stands in for one.
    """
    fit, prune, say = config.fit, config.prune, progress
    method = default_method(config)
    latency_budget = parse_latency_budget(fit.latency_budget) if fit.latency_budget else None
    memory_budget = parse_memory_budget(fit.memory_budget) if fit.memory_budget else None
    space = width_space(loaded.model.module, loaded.example, prune.exclude, target.channel_multiple, fit.fit_points,
                        grow=prune.allow_grow)
    if not space.full:
        raise CompactDeployError(f"{loaded.model.name} has no layer the search can narrow (all excluded, or only the output layer)")
    curves = importance_curves(loaded.model.module, loaded.example, method, loaded.calibration, prune.exclude)
    if memory_budget is not None and memory_budget.value is not None:
        floor = space.params_bytes(space.smallest())
        if floor > memory_budget.value:
            raise CompactDeployError(
                f"--memory-budget {fit.memory_budget} is smaller than the weights of the smallest model the search "
                f"can make ({format_size(floor)} at {target.channel_multiple} channels per group): raise the budget"
            )

    table = measurer.table()
    key = _run_key(config, target, method, measurer.fingerprint)
    run_dir = cache_dir("fit", hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16])
    state = SearchState.load(run_dir / "state.json", key, fit.resume)
    judge = trial_judge(config, loaded, method, target.channel_multiple, state.trials)
    context = _Search(config, target, loaded, measurer, say, method, space, table, state, run_dir, judge)
    try:
        return _search(context, latency_budget, memory_budget, curves)
    except (_Impossible, _RoundsSpent):
        raise
    except (CompactDeployError, KeyboardInterrupt) as exc:
        stopped = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        raise CompactDeployError(
            f"{stopped}; the search keeps what it measured ({len(table.entries)} table entries, "
            f"{len(state.candidates)} models) in {run_dir}: run the same command with --resume"
        ) from None


class NoModelWithin(CompactDeployError):
    """The search has no model measured within the budget to offer."""


class _Impossible(NoModelWithin):
    """No model of the search space meets the budget (not a failure to resume from)."""


class _RoundsSpent(NoModelWithin):
    """--fit-rounds ran out before a model met the budget; the message says how to resume with more."""


@dataclass(frozen=True)
class _Search:
    """What every step of one search shares."""

    config: BuildConfig
    target: Any  # TargetSpec
    loaded: Any  # prepare.Loaded: the unpruned model, its data and example input
    measurer: Measurer
    say: Callable[[str], None]
    method: str
    space: Any  # allocate.WidthSpace
    table: Any  # costs.LatencyTable
    state: SearchState
    run_dir: Any  # Path
    judge: TrialJudge | None = None  # with data: models are worth their held-out accuracy after a trial fine-tune


def _search(context: _Search, latency_budget, memory_budget, curves) -> FitResult:
    config, measurer, say, method = context.config, context.measurer, context.say, context.method
    space, table, state, run_dir = context.space, context.table, context.state, context.run_dir

    def table_ms(widths_list):
        signatures = [s for w in widths_list for s in space.signatures(w)]
        measure_missing(table, signatures, measurer.time_layers, say)
        return [sum(table.ms(s) for s in space.signatures(w)) for w in widths_list]

    trajectory = Trajectory(space, curves, table_ms)
    if latency_budget is None:  # memory only: the same steps, paid in parameters
        trajectory = Trajectory(space, curves, lambda ws: [float(space.params_bytes(w)) for w in ws])

    reference: dict[str, Any] = {"ms": None, "library": None}  # the unpruned model, once measured

    def verify(point: Point, predicted_ms: float | None) -> Candidate:
        known = state.find(point.widths)
        if known is not None:
            return state.meet(known)
        changed = space.narrowed(point.widths)
        label = f"model {len(state.candidates) + 1} ({widths_text(changed) or 'unpruned'})"
        candidate = _measure_candidate(context, point, changed, label, predicted_ms, trajectory.kept(point.widths),
                                       reference["ms"])
        state.candidates.append(candidate)
        state.meet(candidate)
        state.save()
        say(f"{label}: measured {candidate.measured_ms:.3f} ms" + (f", predicted {predicted_ms:.3f} ms" if predicted_ms else ""))
        return candidate

    trajectory.start()
    unpruned = verify(trajectory.points[0], None)
    if latency_budget is not None:  # every later model is timed in turns with the unpruned one
        reference["library"] = measurer.set_reference(context.loaded.model.module, context.loaded.example,
                                                      run_dir / "reference")
        reference["ms"] = unpruned.measured_ms if reference["library"] is not None else None
    latency_ms = latency_budget.resolve(unpruned.measured_ms) if latency_budget else None
    memory_bytes = memory_budget.resolve(unpruned.memory_bytes) if memory_budget else None
    workspace_bound = unpruned.memory_bytes - space.params_bytes(space.full)  # narrower models plan less

    smallest_widths = space.smallest()
    if latency_ms is not None and not unpruned.meets(latency_ms, None) and smallest_widths != space.full:
        # the smallest model is measured before anything is predicted: with the unpruned one it
        # brackets every model of the trajectory (in cache and streaming, on most models), so the
        # prediction is fitted to measurements on both sides, and a budget below it is known impossible at once
        smallest = verify(Point(smallest_widths, table_ms([smallest_widths])[0], trajectory.kept(smallest_widths)), None)
        if _rescale_on_reference(unpruned, smallest, state, say):
            reference["ms"] = unpruned.measured_ms
            latency_ms = latency_budget.resolve(unpruned.measured_ms)

    cache_bytes = (measurer.fingerprint or {}).get("l2_cache_bytes")

    def streamed(widths: dict[str, int]) -> float:
        return _streamed_bytes(space.params_bytes(widths), cache_bytes)

    def predict(point: Point) -> float:
        if not latency_ms:
            return point.cost
        known = state.walked_at(point.widths)
        if known is not None:  # exact where measured: a model measured over the budget is not picked again
            return known.measured_ms
        measured = [(c.table_ms, streamed(c.widths), c.measured_ms, c.widths) for c in state.walked]
        return _corrected(point.cost, streamed(point.widths), point.widths, measured)

    def fits(point: Point, target_ms: float | None) -> bool:
        # intermediates grow with the widest group (a bound for grown models, not a measurement)
        growth = max(1.0, max(w / space.full[g] for g, w in point.widths.items()))
        if memory_bytes is not None and space.params_bytes(point.widths) + max(0, workspace_bound) * growth > memory_bytes:
            return False
        return target_ms is None or predict(point) <= target_ms

    def worth(widths: dict[str, int], kept: float) -> tuple[float, ...]:
        """What ranks two models: the held-out accuracy of a trial fine-tune where the build has data
        (the mean of its trials, where it was judged again; then the importance kept, for a tie),
        else the importance kept."""
        if context.judge is None:
            return (kept,)
        if widths_key(widths) not in state.trials:  # the judge keeps its scores in the state
            say(f"judging {widths_text(space.narrowed(widths)) or 'the unpruned model'}: "
                f"fine-tuning {context.judge.epochs} epochs, scored on held-out training data")
            context.judge.accuracy(widths, space.full)
            state.save()
        return (_trial_mean(state, widths_key(widths)), kept)

    rounds, status, grown = 0, None, []
    proposals = None  # the MACs-paced and uniform trajectories' points, priced on the table

    def every_point() -> list[Point]:
        return trajectory.points + [q for points in (proposals or {}).values() for q in points]

    # nothing narrower than the smallest model: a budget it misses ends here
    walk_ended = latency_ms is not None and any(c.widths == smallest_widths and not c.meets(latency_ms, None)
                                                for c in state.walked)
    if unpruned.meets(latency_ms, memory_bytes):
        status = "the unpruned model already meets the budget"
        if space.wider and unpruned.meets(*_close(latency_ms, memory_bytes)):  # room to grow into
            rounds, status, grown = _grow(config, trajectory, state, verify, predict, fits, latency_ms, memory_bytes, say)
    while status is None and not walk_ended and rounds < config.fit.fit_rounds:
        rounds += 1
        target_ms = latency_ms * (1 - MARGIN) if latency_ms else None
        if latency_ms is not None and proposals is None:
            proposals = {"MACs-paced": _macs_trajectory(trajectory, curves, table_ms, say),
                         "uniform": _uniform_trajectory(trajectory, table_ms, say)}
        pick, smallest = _pick(trajectory, proposals or {}, lambda p: fits(p, target_ms),
                               lambda p: worth(p.widths, p.importance_kept), say)
        seen_before = state.met(pick.widths)
        candidate = verify(pick, predict(pick) if latency_ms else None)
        if candidate.meets(latency_ms, memory_bytes):
            if latency_ms is None or candidate.measured_ms >= latency_ms * (1 - CLOSE_ENOUGH):
                status = "met the budget"
            elif seen_before or smallest:
                # the prediction is exact at measured models, so the next round would pick this one
                # again: measure the nearest wider model predicted near the budget instead
                wider = sorted(
                    (p for p in every_point()
                     if p.cost > pick.cost and not state.met(p.widths)
                     and predict(p) <= latency_ms * (1 + CLOSE_ENOUGH)),
                    key=lambda p: p.cost,
                )
                if not wider:
                    status = "met the budget (every wider model is predicted or measured over it)"
                else:
                    rounds += 1
                    verify(wider[0], predict(wider[0]))
        elif smallest or seen_before:  # nothing narrower to try, or the walk picks a model measured over
            walk_ended = True
            break
    if status is not None and status.startswith("met") and latency_ms is not None and proposals:
        rounds = _bisect_by_measurement(context, proposals["MACs-paced"], predict, verify, latency_ms, memory_bytes,
                                        rounds)
        rounds = _measure_worth_more(context, trajectory, proposals, worth, fits, predict, verify, latency_ms,
                                     memory_bytes, rounds)
    # the budget the search's timings must meet: lower where a chosen model's final build measured over it
    ceiling_ms = state.ceiling_ms(latency_ms)

    over_in_final = state.over_in_final_build(latency_ms)

    def within(candidate: Candidate) -> bool:
        return (candidate not in over_in_final and candidate.meets(ceiling_ms, memory_bytes)
                and candidate.confirmed_within(ceiling_ms))

    def step_below(over: Candidate) -> Candidate | None:
        # where a trajectory holds the model over the budget (the MACs-paced one first: the
        # bisection's), the widest of its steps below it within, as the bisection would find it: a
        # model of another trajectory a little narrower in the table may be slower in the model
        for points in [*(proposals or {}).values(), trajectory.points]:
            index = next((i for i, p in enumerate(points) if p.widths == over.widths), None)
            if index is not None:
                return _widest_within_below(context, points, index, within, predict, verify, ceiling_ms)
        # else the widest model of the trajectories narrower than it in the table, not measured yet,
        # predicted at least REPEATABILITY under the budget
        below = [p for p in every_point() if p.cost < over.table_ms and not state.met(p.widths)
                 and fits(p, ceiling_ms * (1 - REPEATABILITY))]
        if not below:
            return None
        step = max(below, key=lambda p: p.cost)
        say(f"measuring a step below it: {widths_text(space.narrowed(step.widths))}")
        return verify(step, predict(step))

    # a model timed again near the budget counts only if both its timings are within; one whose
    # final build measured over it does not count, and the next model down is measured in its stead
    feasible = [c for c in state.candidates if within(c)]
    for over in over_in_final:
        say(f"the final build of {widths_text(space.narrowed(over.widths))} measured {state.final_over[over.key]:.3f} ms, "
            f"over the budget: the models measured above {ceiling_ms:.3f} ms are not kept")
        below = step_below(over)
        if below is not None and below not in feasible and within(below):
            feasible.append(below)
    if not feasible:
        closest = min(state.candidates, key=lambda c: c.measured_ms if latency_ms else c.memory_bytes)
        where = "measured" if "EMULATED" not in closest.where else "measured (EMULATED)"
        smallest = min(c.measured_ms for c in state.candidates)
        closest_text = (
            f"the smallest latency reached is {smallest:.3f} ms ({where}); the closest model, "
            f"{widths_text(space.narrowed(closest.widths)) or 'unpruned'}, {closest.measured_ms:.3f} ms and "
            f"{format_size(closest.memory_bytes)}"
        )
        if over_in_final:
            raise _RoundsSpent(
                f"no model of the {len(state.candidates)} built is within {ceiling_ms:.3f} ms, the budget lowered by "
                f"the {len(over_in_final)} final builds that measured over it: {closest_text}; run the same command "
                f"with --resume --fit-rounds {rounds + 3} (the models measured are kept in {run_dir}) or raise the budget"
            )
        if walk_ended:
            raise _Impossible(f"no model in the search space meets {budget_text(config.fit)}: {closest_text}; raise the budget")
        # the rounds ran out with narrower models left: a noisy or mispredicted round is not an impossible budget
        raise _RoundsSpent(
            f"no model of the {len(state.candidates)} built in {rounds} rounds meets {budget_text(config.fit)}, and narrower "
            f"ones are left: {closest_text}; run the same command with --resume --fit-rounds {rounds + 3} "
            f"(the models measured are kept in {run_dir}) or raise the budget"
        )
    if status is None:
        status = (f"met the budget within {config.fit.fit_rounds} rounds, not within {CLOSE_ENOUGH:.0%} of it: "
                  f"run the same command with --resume --fit-rounds {rounds + 3} to search on")
    chosen = _choose(context, feasible, worth)
    if latency_ms is not None:
        chosen = _confirm(context, chosen, feasible, worth, ceiling_ms, reference["ms"], step_below)
    changed = space.narrowed(chosen.widths)
    report = search_report(config.fit, method, latency_budget, memory_budget, latency_ms, memory_bytes, space, trajectory,
                           state, chosen, table, rounds, status, run_dir, predict, grown, context.judge)
    plan = width_plan(config, method, changed, chosen.removed, chosen.grown, made_by="fit") if changed else None
    return FitResult(method, chosen.widths, changed, space.widened(chosen.widths), report, plan,
                     unpruned_ms=unpruned.measured_ms, reference_library=reference["library"])


def _choose(context: _Search, feasible: list[Candidate], worth) -> Candidate:
    """The model kept, of those measured within the budget: the best trial accuracy, or the most
    importance kept (not the accuracy before fine-tuning: after a deep cut that is noise); then the
    most parameters (grown models all keep 1.0), not the fastest: timing noise would decide that.
    Where the trials judge, the few best whose trials so far score within TRIAL_NOISE of the best
    are fine-tuned with TRIAL_REPEATS seeds each and ranked by the mean. A model judged again is
    weighed by its mean from then on: where the model it lost to gives way (over the budget in a
    second timing), its lucky first trial must not shut out a model its mean is close to."""
    ranked = sorted(feasible, key=lambda c: (*worth(c.widths, c.importance_kept), c.params), reverse=True)
    judge, state = context.judge, context.state
    if judge is None:
        return ranked[0]
    best = _trial_mean(state, ranked[0].key)
    close = [c for c in ranked[:JUDGED_AGAIN] if _trial_mean(state, c.key) >= best - TRIAL_NOISE]
    if len(close) < 2:
        return ranked[0]
    context.say(f"judging the {len(close)} best models again: their trials are within {TRIAL_NOISE * 100:.0f} points; "
                f"{TRIAL_REPEATS} trial fine-tunes each")
    mean = {}
    for candidate in close:
        mean[candidate.key] = float(np.mean([judge.accuracy(candidate.widths, context.space.full, repeat)
                                             for repeat in range(TRIAL_REPEATS)]))
        state.save()
    return max(close, key=lambda c: (mean[c.key], c.importance_kept, c.params))


def _trial_mean(state: SearchState, key: str) -> float:
    return float(np.mean(trial_scores(state.trials, key)))


def _confirm(context: _Search, chosen: Candidate, feasible: list[Candidate], worth, latency_ms: float,
             unpruned_ms: float | None, step_below: Callable[[Candidate], Candidate | None] | None = None,
             ) -> Candidate:
    """The model kept, timed again where it measured within REPEATABILITY under the budget or where
    it was predicted over it: kept if its second timing is within too, else the next best is (up to
    CONFIRMED_AT_MOST models). A model one session timed just under the budget is over it in another
    about as often, and one whose two timings straddle it lands over it in the final build's sessions
    about as often as not; a timing far under what the models measured before it predict may be a
    lucky one (its final build then measures what was predicted).
    ``step_below(model)``: a model narrower than one over in a timing, measured (None: none left;
    the widest step down its trajectory within, where it lies on one): the bisection leaves every model
    it measured near the budget, so without it the next best within may be the smallest model."""
    state, say = context.state, context.say
    left = list(feasible)
    for _ in range(CONFIRMED_AT_MOST):
        near = chosen.measured_ms > latency_ms * (1 - REPEATABILITY)
        predicted_over = chosen.predicted_ms is not None and chosen.predicted_ms > latency_ms
        if chosen.confirmed_ms is not None or not (near or predicted_over) or chosen.reference_ms is None:
            return chosen
        label = f"the model kept ({widths_text(context.space.narrowed(chosen.widths)) or 'unpruned'})"
        say(f"{label}: measured {chosen.measured_ms:.3f} ms, "
            + (f"within {REPEATABILITY:.0%} of the budget" if near else
               f"predicted {chosen.predicted_ms:.3f} ms, over the budget") + ": timing it again")
        again = _measure_candidate(context, Point(chosen.widths, chosen.table_ms, chosen.importance_kept),
                                   context.space.narrowed(chosen.widths), label, None, chosen.importance_kept,
                                   unpruned_ms)
        chosen.confirmed_ms = (chosen.measured_ms + again.measured_ms) / 2
        state.save()
        kept = chosen.confirmed_within(latency_ms)
        say(f"{label}: measured {again.measured_ms:.3f} ms again, {chosen.confirmed_ms:.3f} ms in the mean"
            + ("" if kept else ": over the budget this time, so not kept"))
        if kept:
            return chosen
        left.remove(chosen)
        below = step_below(chosen) if step_below is not None else None
        if below is not None and below.measured_ms <= latency_ms and below not in left:
            left.append(below)
        if not left:
            break
        chosen = _choose(context, left, worth)
    return chosen


def _measure_candidate(context: _Search, point: Point, changed: dict[str, int], label: str,
                       predicted_ms: float | None, importance_kept: float, unpruned_ms: float | None) -> Candidate:
    """A copy of the model pruned to ``point``'s widths by the search's method, scored on the test
    data (before any fine-tuning), and measured whole by the measurer; where the measurer timed it
    in turns with the unpruned model, its latency is that ratio times ``unpruned_ms``."""
    from ..prune import PruneSpec, count_macs_params, prune
    from ..train import evaluate

    config, loaded, space = context.config, context.loaded, context.space
    module = copy.deepcopy(loaded.model.module)
    removed, grown = {}, {}
    if changed:
        context.say(f"{label}: prune")
        result = prune(module, loaded.example, PruneSpec(context.method, None), context.target.channel_multiple,
                       config.prune.exclude, changed, loaded.calibration, allow_grow=bool(space.widened(point.widths)),
                       seed=config.model.seed)
        removed, grown = result.plan, result.grown
    accuracy = evaluate(module, loaded.x_test, loaded.data.y_test) if loaded.data is not None else None
    macs, params = count_macs_params(module, loaded.example)
    timing = context.measurer.time_model(module, loaded.example, label)
    measured_ms = timing.ms
    if timing.reference_ms and unpruned_ms:
        measured_ms = timing.ms * unpruned_ms / timing.reference_ms
    return Candidate(
        widths=point.widths, table_ms=point.cost, predicted_ms=predicted_ms, measured_ms=measured_ms,
        alone_ms=timing.ms, reference_ms=timing.reference_ms, timings=timing.timings,
        memory_bytes=timing.memory_bytes, params=params, macs=macs, accuracy=accuracy, importance_kept=importance_kept,
        where=timing.where, key=widths_key(point.widths),
        removed=removed, grown=grown, schedules=timing.schedules, unscheduled=timing.unscheduled,
    )


def _rescale_on_reference(unpruned: Candidate, beside: Candidate, state: SearchState, say) -> bool:
    """Where the unpruned model ran SLOW_SCALE times faster in turns beside ``beside`` than alone, its
    windows alone fell in a slow spell of the device (spells only slow: a host VM's core taken away
    for seconds, docs/fit.md), and it scaled the search too high: its quiet time beside ``beside``
    becomes the scale, and ``beside``'s latency follows. Saved; True where it rescaled."""
    if not beside.reference_ms or unpruned.measured_ms <= beside.reference_ms * SLOW_SCALE:
        return False
    say(f"the unpruned model ran at {beside.reference_ms:.3f} ms beside the smallest model, {unpruned.measured_ms:.3f} ms "
        f"alone: its windows alone fell in a slow spell of the device; the search's scale is now {beside.reference_ms:.3f} ms")
    unpruned.measured_ms = beside.reference_ms
    beside.measured_ms = beside.alone_ms  # its quiet time over the unpruned model's beside it, times that
    state.save()
    return True


def _widest_within_below(context: _Search, points: list[Point], index: int, within: Callable[[Candidate], bool],
                         predict, verify, latency_ms: float) -> Candidate | None:
    """The widest step of the trajectory ``points`` below ``points[index]`` (a model over the budget)
    that measures ``within`` it, found by measurement as the bisection finds the budget's crossing:
    the step at the predicted crossing of ``latency_ms`` first, then midpoints between the steps
    measured over and within, STEPS_BELOW_MEASURED at most; None where no step below is within."""
    state = context.state

    def known_within(i: int) -> bool | None:
        known = state.walked_at(points[i].widths)
        return None if known is None else within(known)

    for measured in range(STEPS_BELOW_MEASURED + 1):
        low, high = _bracket(len(points), known_within, index)
        if high - low <= 1 or measured == STEPS_BELOW_MEASURED:
            break
        middle = ((low + high) // 2 if measured else
                  next((i for i in range(low + 1, high) if predict(points[i]) <= latency_ms), high - 1))
        context.say(f"measuring the next step down its trajectory: {widths_text(context.space.narrowed(points[middle].widths))}")
        verify(points[middle], predict(points[middle]))
    _, high = _bracket(len(points), known_within, index)
    return None if high == len(points) else state.walked_at(points[high].widths)


def _bracket(count: int, known_within: Callable[[int], bool | None], start: int = -1) -> tuple[int, int]:
    """Where a trajectory of ``count`` steps (widest first) crosses the budget, as measured after
    step ``start``: the first step measured within (``count``: none) and the last step before it
    measured over (``start``: none). ``known_within(i)``: None where step i is not measured."""
    high = next((i for i in range(start + 1, count) if known_within(i)), count)
    return max((i for i in range(start + 1, high) if known_within(i) is False), default=start), high


def _measure_worth_more(context: _Search, trajectory, proposals, worth, fits, predict, verify, latency_ms: float,
                        memory_bytes: float | None, rounds: int) -> int:
    """After a model met the budget, while rounds remain: of each trajectory's widest models not yet
    measured (NEAR_PER_TRAJECTORY) predicted over the best model measured within and within the
    budget plus the predictor's median error on this search (at least MARGIN, at most CLOSE_ENOUGH),
    and of the best model measured within widened (``fill``) up to that, measure the one worth most,
    if it is worth more than every model measured within.
    The prediction errs by several percent, and not evenly (models narrow nearly everywhere ran
    faster beside their table time than wider ones), so a model predicted just over the budget may
    meet it; one predicted further over than the predictor usually errs rarely does, and would spend
    the round. The widened best model is the measured step FLOPs-targeted pruning's bisection takes:
    the trajectories' points are whole steps apart near the budget. Returns the rounds spent so far."""
    state, say = context.state, context.say
    while rounds < context.config.fit.fit_rounds:
        slack = _predictor_slack(state)
        within = [c for c in state.candidates if c.meets(latency_ms, memory_bytes)]
        kept = max(within, key=lambda c: worth(c.widths, c.importance_kept))
        best = worth(kept.widths, kept.importance_kept)
        near = []
        widened = trajectory.fill(Point(kept.widths, kept.table_ms, kept.importance_kept),
                                  lambda p: fits(p, latency_ms * (1 + slack)))
        for points in [trajectory.points, *proposals.values(), [widened]]:
            # the widest few predicted between the kept model and the window's edge: the widest may be
            # worth less than a narrower step of the same trajectory
            window = [p for p in points if not state.met(p.widths) and fits(p, latency_ms * (1 + slack))
                      and predict(p) >= kept.measured_ms][:NEAR_PER_TRAJECTORY]
            near += [p for p in window if p.widths not in [n.widths for n in near]]
        scored = [(worth(p.widths, p.importance_kept), p) for p in near]
        scored = [(w, p) for w, p in scored if w > best]
        if not scored:
            break
        rounds += 1
        value, pick = max(scored, key=lambda item: item[0])
        say(f"allocating: a model predicted {predict(pick):.3f} ms, near the budget, is worth {_worth_text(value)}, "
            f"more than any measured within it ({_worth_text(best)}): measuring it")
        verify(pick, predict(pick))
    return rounds


def _bisect_by_measurement(context: _Search, points: list[Point], predict, verify, latency_ms: float,
                           memory_bytes: float | None, rounds: int) -> int:
    """FLOPs-targeted pruning's own search, inside the loop: bisect the MACs-paced trajectory
    (widest first) by measurement for its widest model within the budget, between the models this
    run measured over and within it. Only measurements bound the bracket: on a trajectory's narrow
    steps the predictor can err far beyond its usual few percent (inner convs cut to a few channels
    run faster in the model than their table time), and a bracket a prediction bounds never
    measures the model that baseline ships. The predictor only says where to look first: the step
    at its predicted crossing of the budget, then the step across it (GUESSED_STEPS); once a guess
    proves wrong, or after those, midpoints. Returns the rounds spent so far."""
    state = context.state
    guesses = GUESSED_STEPS

    def within(index: int) -> bool | None:  # as this run measured it (a resumed run replays its bisection)
        known = state.walked_at(points[index].widths)
        return None if known is None else known.meets(latency_ms, memory_bytes)

    while rounds < context.config.fit.fit_rounds:
        low, high = _bracket(len(points), within)
        if high - low <= 1:
            break
        if guesses:
            # the widest step predicted within; none: the crossing is predicted at `high`, so the step above it
            middle = next((i for i in range(low + 1, high) if predict(points[i]) <= latency_ms), high - 1)
            how = "at the predicted crossing of the budget"
        else:
            middle = (low + high) // 2
            how = "bisecting"
        rounds += 1
        predicted_ms = predict(points[middle])
        context.say(f"allocating: the MACs-paced trajectory by measurement, {how}: step {middle + 1} of {len(points)}")
        measured = verify(points[middle], predicted_ms)
        if guesses:  # a guess proved wrong: the predictor errs here, so bisect from now on
            held = measured.meets(latency_ms, memory_bytes) == (predicted_ms <= latency_ms)
            guesses = guesses - 1 if held else 0
    return rounds


def _predictor_slack(state) -> float:
    """The predictor's median error on the models this search measured after predicting them, at
    least MARGIN and at most CLOSE_ENOUGH: how far over the budget a prediction may still meet it."""
    errors = _prediction_errors(state)
    return min(CLOSE_ENOUGH, max(MARGIN, float(np.median(errors)) if errors else MARGIN))


def _prediction_errors(state) -> list[float]:
    """|predicted - measured| / measured of each model this search measured after predicting it."""
    return [abs(c.predicted_ms - c.measured_ms) / c.measured_ms for c in state.walked if c.predicted_ms]


def _close(latency_ms: float | None, memory_bytes: float | None) -> tuple[float | None, float | None]:
    """The budgets less CLOSE_ENOUGH: a model that does not meet these leaves room to grow into."""
    return (
        latency_ms * (1 - CLOSE_ENOUGH) if latency_ms is not None else None,
        memory_bytes * (1 - CLOSE_ENOUGH) if memory_bytes is not None else None,
    )


def _grow(config, trajectory: Trajectory, state, verify, predict, fits, latency_ms, memory_bytes, say):
    """--allow-grow with room under the budget: widen (Trajectory.grow) up to the corrected
    prediction, build and measure the widest point, correct, and go again; when that settles far
    under the budget, measure the nearest wider model predicted near it (as the pruning loop does).
    Returns (rounds, status, the last growth path)."""
    rounds, path, last, nearest = 0, [], None, False
    far_under = "grew as far as the measurements allow: the next wider model is predicted or measured over the budget"
    while rounds < config.fit.fit_rounds:
        rounds += 1
        slack = (1 + CLOSE_ENOUGH) if nearest else (1 - MARGIN)
        limit = latency_ms * slack if latency_ms else None
        say("growing: widening where the measured cost is lowest" + (" (the nearest wider model)" if nearest else ""))
        grown = trajectory.grow(lambda p: fits(p, limit))
        if nearest:
            wider = [p for p in grown[1:] if not state.met(p.widths) and p.cost > last.cost]
            pick = min(wider, key=lambda p: p.cost) if wider else None
        else:
            path = grown
            pick = grown[-1] if len(grown) > 1 else None
        if pick is None:
            break
        seen_before = state.met(pick.widths)
        candidate = verify(pick, predict(pick) if latency_ms else None)
        if not candidate.meets(latency_ms, memory_bytes):
            if nearest or seen_before:
                break
            continue  # the correction now knows this model: the next round grows less
        if not nearest:
            last = pick
        if all(pick.widths[g] == w[-1] for g, w in trajectory.space.wider.items()):
            return rounds, f"grew every group to the growth limit ({GROW_LIMIT:g}x) within the budget", path
        if latency_ms is None or candidate.measured_ms >= latency_ms * (1 - CLOSE_ENOUGH):
            return rounds, "grew to the budget", path
        nearest = seen_before and not nearest  # settled far under: measure the nearest wider model next
    else:
        return rounds, f"grew within {config.fit.fit_rounds} rounds, not within {CLOSE_ENOUGH:.0%} of the budget", path
    if len(path) <= 1:
        return rounds, "the unpruned model meets the budget; no wider model is predicted within it", path
    return rounds, far_under, path


def _pick(trajectory: Trajectory, proposals: dict[str, list[Point]], accept: Callable[[Point], bool],
          worth: Callable[[Point], tuple[float, ...]], say) -> tuple[Point, bool]:
    """The model to measure next, and whether it is the smallest (nothing predicted within).

    The first point of the trajectory that ``accept``s, and the same from each of the other
    trajectories (``proposals``: name -> points, widest first), each as it is and widened by
    ``fill``. The greedy on measured cost is myopic (each step takes the smallest cut that saves
    2 %, which on a plateau of the table is a deep one), and it and ``fill`` follow the importance
    curves, which price each group's channels alone; so of the picks predicted within the budget
    the one ``worth`` more (a trial fine-tune's accuracy, where there is data) is measured."""
    first = _first(trajectory, accept, say)
    smallest = first is None
    pick = trajectory.points[-1] if smallest else trajectory.fill(first, accept)
    # nothing on the greedy's path predicted within: an alternative predicted within beats the smallest model
    best, best_worth, best_name = pick, (float("-inf"),) if smallest else worth(pick), "measured-cost"
    picks = [] if smallest or first.widths == pick.widths else [("measured-cost (unwidened)", first)]
    for name, points in proposals.items():
        alternative = next((p for p in points if accept(p)), None)
        if alternative is not None:
            picks.append((name, alternative))
            picks.append((f"{name} (widened)", trajectory.fill(alternative, accept)))
    seen = [pick.widths]
    for name, alternative in picks:
        if alternative.widths in seen:
            continue
        seen.append(alternative.widths)
        alternative_worth = worth(alternative)
        if alternative_worth > best_worth:
            best, best_worth, best_name = alternative, alternative_worth, name
    if best is pick:
        return pick, smallest
    say(f"allocating: the {best_name} pick is worth {_worth_text(best_worth)}, the measured-cost pick "
        + ("none predicted within" if smallest else _worth_text(worth(pick))) + f": measuring the {best_name} one")
    return best, False


def _worth_text(worth: tuple[float, ...]) -> str:
    return f"{worth[0]:.1%} held-out accuracy" if len(worth) > 1 else f"{worth[0]:.3f} of the importance"


def _macs_trajectory(trajectory: Trajectory, curves, table_ms, say) -> list[Point]:
    """The same greedy, importance and steps paid in multiply-adds (FLOPs-targeted pruning's
    trajectory), every point priced on the latency table (one measurement for what it lacks)."""
    by_macs = Trajectory(trajectory.space, curves, lambda ws: [float(trajectory.space.macs(w)) for w in ws])
    by_macs.start()
    while by_macs.extend():
        pass
    say(f"allocating: the MACs-paced trajectory, {len(by_macs.points)} steps priced on the table")
    costs = table_ms([p.widths for p in by_macs.points])
    return [Point(p.widths, cost, trajectory.kept(p.widths), p.changed) for p, cost in zip(by_macs.points, costs)]


def _uniform_trajectory(trajectory: Trajectory, table_ms, say) -> list[Point]:
    """Every group at one share of its width (each at the narrowest candidate width keeping that
    share), shares from 95 % down in steps of 5 %: uniform pruning's models, widest first, priced on
    the latency table (one measurement for what it lacks)."""
    space = trajectory.space
    models = []
    for percent in range(95, 0, -5):
        widths = {g: next(w for w in widths if w >= percent / 100 * space.full[g]) for g, widths in space.candidates.items()}
        if widths not in models and widths != space.full:
            models.append(widths)
    say(f"allocating: uniform widths, {len(models)} models priced on the table")
    costs = table_ms(models)
    return [Point(w, cost, trajectory.kept(w)) for w, cost in zip(models, costs)]


def _first(trajectory: Trajectory, accept: Callable[[Point], bool], say) -> Point | None:
    """The first point of the trajectory that ``accept``s, extending it as far as needed."""
    index = 0
    while True:
        while index < len(trajectory.points):
            if accept(trajectory.points[index]):
                return trajectory.points[index]
            index += 1
        say(f"allocating: step {len(trajectory.points)}")
        if not trajectory.extend():
            return None


def _streamed_bytes(weight_bytes: float, cache_bytes: int | None) -> float:
    """The weights a model reads from beyond the core's L2 cache on every run: all of them once
    they exceed it (its runs sweep them in the same order, so none is still there when read
    again), none while they fit; 0 where the device does not say its cache."""
    return float(weight_bytes) if cache_bytes and weight_bytes > cache_bytes else 0.0


def _corrected(table_ms: float, streamed_bytes: float, widths: dict[str, int],
               measured: list[tuple[float, float, float, dict[str, int]]]) -> float:
    """A model's latency from its table time and the weights it streams (``_streamed_bytes``),
    fitted to the models measured so far, ``(table ms, streamed bytes, measured ms, widths)`` each.

    Layers timed alone run with their weights in cache; a whole model whose weights exceed the L2
    cache reads them from further out in every layer, a cost the table does not see and that
    grows with the weights, not the time. The fit is ``a * table + b * streamed`` (least squares,
    both positive; ``b`` is 0 until STREAMING_MODELS measured models stream, and one more is measured:
    the unpruned and the smallest model alone cannot tell streaming from the rest of what differs
    between them, such as the smallest's tiny layers running quicker in the model than alone), each
    measured model weighted by how close its widths are to ``widths`` (``_width_distance``,
    ``NEIGHBOUR_SCALE``): what the table misses depends on which layers were cut, so models cut alike
    err alike, where models merely close in table time do not (docs/fit.md). The search takes a
    measured model's own measurement, not this."""
    table = np.array([m[0] for m in measured], dtype=float)
    stream = np.array([m[1] for m in measured], dtype=float)
    ms = np.array([m[2] for m in measured], dtype=float)
    distance = np.array([_width_distance(widths, m[3]) for m in measured])
    weight = np.sqrt(np.exp(-(distance - distance.min()) / NEIGHBOUR_SCALE)) if measured else distance
    if (stream > 0).sum() >= STREAMING_MODELS and len(measured) > STREAMING_MODELS:
        columns = np.stack([table, stream], axis=1)
        units = np.abs(columns).max(axis=0)  # ms and bytes: unscaled, the weighted system reads as rank 1
        coefficients, _, rank, _ = np.linalg.lstsq(columns / units * weight[:, None], ms * weight, rcond=None)
        a, b = coefficients / units
        if rank == 2 and a > 0 and b > 0:
            return float(a * table_ms + b * streamed_bytes)
    table, ms = table * weight, ms * weight
    return float(ms @ table / (table @ table)) * table_ms if table.any() else table_ms


def _width_distance(a: dict[str, int], b: dict[str, int]) -> float:
    """How differently two models are cut: the mean over groups of |log(width a / width b)|."""
    return float(np.mean([abs(math.log(a[g] / b[g])) for g in a])) if a else 0.0
