"""The width search: allocate on the measured table, prune the pick, measure it whole on the
device as it would ship, correct the prediction with what was measured, and go again until a
model meets the budget. The unpruned and the smallest model are measured before anything is
predicted: every prediction is then an interpolation between measured models.

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
from collections.abc import Callable
from dataclasses import dataclass
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
from .measure import Measurer
from .report import budget_text, search_report, widths_text
from .state import Candidate, SearchState

MARGIN = 0.03  # aim this far under the budget: whole-model medians move a little between builds
CLOSE_ENOUGH = 0.10  # a feasible model within this share of the budget ends the search
# what a stored search holds (5: table times on the anchor layer's scale, the smallest model measured
# first, picks from the MACs-paced trajectory too); another format is not resumed
STATE_FORMAT = 5


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
    context = _Search(config, target, loaded, measurer, say, method, space, table, state, run_dir)
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


class _Impossible(CompactDeployError):
    """No model of the search space meets the budget (not a failure to resume from)."""


class _RoundsSpent(CompactDeployError):
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
        # prediction interpolates between measurements, and a budget below it is known impossible at once
        verify(Point(smallest_widths, table_ms([smallest_widths])[0], trajectory.kept(smallest_widths)), None)

    cache_bytes = (measurer.fingerprint or {}).get("l2_cache_bytes")

    def streamed(widths: dict[str, int]) -> float:
        return _streamed_bytes(space.params_bytes(widths), cache_bytes)

    def predict(point: Point) -> float:
        if not latency_ms:
            return point.cost
        measured = [(c.table_ms, streamed(c.widths), c.measured_ms) for c in state.walked]
        return _corrected(point.cost, streamed(point.widths), measured)

    def fits(point: Point, target_ms: float | None) -> bool:
        # intermediates grow with the widest group (a bound for grown models, not a measurement)
        growth = max(1.0, max(w / space.full[g] for g, w in point.widths.items()))
        if memory_bytes is not None and space.params_bytes(point.widths) + max(0, workspace_bound) * growth > memory_bytes:
            return False
        return target_ms is None or predict(point) <= target_ms

    rounds, status, grown = 0, None, []
    by_macs = None  # the MACs-paced trajectory's points, priced on the table (_macs_trajectory)
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
        if latency_ms is not None and by_macs is None:
            by_macs = _macs_trajectory(trajectory, curves, table_ms, say)
        pick, smallest = _pick(trajectory, by_macs or [], lambda p: fits(p, target_ms), say)
        seen_before = state.met(pick.widths)
        candidate = verify(pick, predict(pick) if latency_ms else None)
        if candidate.meets(latency_ms, memory_bytes):
            if latency_ms is None or candidate.measured_ms >= latency_ms * (1 - CLOSE_ENOUGH):
                status = "met the budget"
            elif seen_before or smallest:
                # the prediction is exact at measured models, so the next round would pick this one
                # again: measure the nearest wider model predicted near the budget instead
                wider = sorted(
                    (p for p in trajectory.points + (by_macs or []) if p.cost > pick.cost and not state.met(p.widths)
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
    feasible = [c for c in state.candidates if c.meets(latency_ms, memory_bytes)]
    if not feasible:
        closest = min(state.candidates, key=lambda c: c.measured_ms if latency_ms else c.memory_bytes)
        where = "measured" if "EMULATED" not in closest.where else "measured (EMULATED)"
        smallest = min(c.measured_ms for c in state.candidates)
        closest_text = (
            f"the smallest latency reached is {smallest:.3f} ms ({where}); the closest model, "
            f"{widths_text(space.narrowed(closest.widths)) or 'unpruned'}, {closest.measured_ms:.3f} ms and "
            f"{format_size(closest.memory_bytes)}"
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
    # the most importance kept, not the best accuracy before fine-tuning: after a deep cut that is noise;
    # then the most parameters (grown models all keep 1.0), not the slowest: timing noise would decide that
    chosen = max(feasible, key=lambda c: (c.importance_kept, c.params))
    changed = space.narrowed(chosen.widths)
    report = search_report(config.fit, method, latency_budget, memory_budget, latency_ms, memory_bytes, space, trajectory,
                     state, chosen, table, rounds, status, run_dir, predict, grown)
    plan = width_plan(config, method, changed, chosen.removed, chosen.grown, made_by="fit") if changed else None
    return FitResult(method, chosen.widths, changed, space.widened(chosen.widths), report, plan,
                     unpruned_ms=unpruned.measured_ms, reference_library=reference["library"])


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
        alone_ms=timing.ms, reference_ms=timing.reference_ms,
        memory_bytes=timing.memory_bytes, params=params, macs=macs, accuracy=accuracy, importance_kept=importance_kept,
        where=timing.where, key=hashlib.sha256(json.dumps(point.widths, sort_keys=True).encode()).hexdigest()[:12],
        removed=removed, grown=grown, schedules=timing.schedules, unscheduled=timing.unscheduled,
    )


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


def _pick(trajectory: Trajectory, by_macs: list[Point], accept: Callable[[Point], bool], say) -> tuple[Point, bool]:
    """The model to measure next, and whether it is the smallest (nothing predicted within).

    The first point of the trajectory that ``accept``s, widened by ``fill``; and the same from the
    MACs-paced trajectory's points. The greedy on measured cost is myopic (each step takes the
    smallest cut that saves 2 %, which on a plateau of the table is a deep one), and its path can
    end where a MACs-paced one of the same predicted latency keeps more importance, so of the two
    picks predicted within the budget the one that keeps more importance is measured."""
    pick = _first(trajectory, accept, say)
    smallest = pick is None
    pick = trajectory.points[-1] if smallest else trajectory.fill(pick, accept)
    alternative = next((p for p in by_macs if accept(p)), None)
    if alternative is not None:
        alternative = trajectory.fill(alternative, accept)
        if alternative.importance_kept > pick.importance_kept:
            say(f"allocating: the MACs-paced pick keeps {alternative.importance_kept:.3f} of the importance, "
                f"the measured-cost pick {pick.importance_kept:.3f}: measuring the MACs-paced one")
            return alternative, False
    return pick, smallest


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


def _corrected(table_ms: float, streamed_bytes: float, measured: list[tuple[float, float, float]]) -> float:
    """A model's latency from its table time and the weights it streams (``_streamed_bytes``),
    fitted to the models measured so far, ``(table ms, streamed bytes, measured ms)`` each.

    Layers timed alone run with their weights in cache; a whole model whose weights exceed the L2
    cache reads them from further out in every layer, a cost the table does not see and that
    grows with the weights, not the time. The fit is ``a * table + b * streamed`` (non-negative
    least squares; ``b`` is 0 until a model measured streams). What the fit misses at the measured
    models, their ratio measured / fit, is interpolated in table time between the two nearest
    (held beyond them), so the prediction is exact at every measured model."""
    table = np.array([m[0] for m in measured], dtype=float)
    stream = np.array([m[1] for m in measured], dtype=float)
    ms = np.array([m[2] for m in measured], dtype=float)
    per_table, per_byte = float(ms @ table / (table @ table)) if table.any() else 1.0, 0.0
    features = np.stack([table, stream], axis=1)
    if stream.any() and np.linalg.matrix_rank(features) == 2:
        (a, b), *_ = np.linalg.lstsq(features, ms, rcond=None)
        if a > 0 and b > 0:
            per_table, per_byte = float(a), float(b)

    def fit(t: float, s: float) -> float:
        return per_table * t + per_byte * s

    points = sorted((t, m / fit(t, s)) for t, s, m in measured if fit(t, s) > 0)
    residual = np.interp(table_ms, [p[0] for p in points], [p[1] for p in points]) if points else 1.0
    return float(fit(table_ms, streamed_bytes) * residual)
