"""The width search: allocate on the measured table, build the pick, measure it whole on the
device, correct the prediction with what was measured, and go again until a model meets the budget.

Every verified candidate is a real build (prune -> export -> compile -> benchmark) kept under the
cache with the search's state, so ``--resume`` after an interruption or a lost device re-measures
nothing it already has.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CompactDeployError
from ..resources import cache_dir
from ..units import format_size
from .allocate import GROW_LIMIT, Point, Trajectory, importance_curves, width_space
from .costs import measure_missing, table_for

MARGIN = 0.03  # aim this far under the budget: whole-model medians move a little between builds
CLOSE_ENOUGH = 0.10  # a feasible model within this share of the budget ends the search
STEP_DROP = 0.01  # a width is a latency step when it saves this share of the full model below every wider one
DEFAULT_ROUNDS = 6
DEFAULT_POINTS = 8

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


@dataclass
class Candidate:
    """A model the search built and measured whole on the device."""

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
    build: str

    def meets(self, latency_ms: float | None, memory_bytes: float | None) -> bool:
        return (latency_ms is None or self.measured_ms <= latency_ms) and (memory_bytes is None or self.memory_bytes <= memory_bytes)


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
    walked: list[Candidate] = field(default_factory=list)  # met by this run, stored or new; not saved

    def find(self, widths: dict[str, int]) -> Candidate | None:
        return next((c for c in self.candidates if c.widths == widths), None)

    def met(self, widths: dict[str, int]) -> bool:
        return any(c.widths == widths for c in self.walked)

    def meet(self, candidate: Candidate) -> Candidate:
        if not self.met(candidate.widths):
            self.walked.append(candidate)
        return candidate

    def save(self) -> None:
        from ..bundle import write_json

        write_json(self.path, {"key": self.key, "candidates": [asdict(c) for c in self.candidates]})

    @classmethod
    def load(cls, path: Path, key: dict[str, Any], resume: bool) -> SearchState:
        state = cls(path, key)
        if resume and path.exists():
            try:
                stored = json.loads(path.read_text())
                state.candidates = [Candidate(**c) for c in stored["candidates"]]
            except (ValueError, KeyError, TypeError):
                raise CompactDeployError(f"the search state {path} is damaged; run without --resume to start over") from None
        return state


@dataclass(frozen=True)
class FitResult:
    method: str
    widths: dict[str, int]  # the chosen model's width of every group
    changed: dict[str, int]  # the groups whose width differs from the unpruned model's: build --widths
    widened: dict[str, int]  # those of them grown wider (--allow-grow)
    report: dict[str, Any]


def default_method(config) -> str:
    """The method given with --prune, else data-free without data and taylor with it."""
    if config.prune:
        method, sep, _ = config.prune.partition(":")
        if sep:
            raise CompactDeployError(
                f"with a budget, --prune names only the method ({method}); the search chooses the widths"
            )
        return method
    return "taylor" if config.data else "data-free"


def check_fit_options(config, target) -> None:
    """What can be refused before any work."""
    from ..prune import METHODS

    if config.latency_budget:
        parse_latency_budget(config.latency_budget)
    if config.memory_budget:
        parse_memory_budget(config.memory_budget)
    if config.widths:
        raise CompactDeployError("--widths and a budget exclude each other: the search chooses the widths")
    if config.finetune_epochs and config.data is None:
        raise CompactDeployError("--finetune-epochs needs --data (the data to fine-tune on)")
    if config.distill and not config.finetune_epochs:
        raise CompactDeployError("--distill needs --finetune-epochs (distillation happens while fine-tuning)")
    if config.noise_outputs:
        raise CompactDeployError("--noise-outputs is not supported with a budget yet: build with --prune noiseout:RATIO")
    if config.tune_trials:
        raise CompactDeployError("tune first (build --tune-trials N without a budget), then search: the table is measured with the tuned kernels")
    method = default_method(config)
    if method not in METHODS:
        raise CompactDeployError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    if METHODS[method].needs_data and config.data is None:
        raise CompactDeployError(f"pruning method {method} needs data: pass --data (a dataset name or a .npz)")
    if config.allow_grow and not (config.data and config.finetune_epochs):
        raise CompactDeployError(
            "--allow-grow needs --data and --finetune-epochs N: a widened model computes exactly what the original "
            "did until it is trained"
        )
    if config.fit_rounds < 1:
        raise CompactDeployError(f"--fit-rounds must be at least 1 (got {config.fit_rounds})")
    if config.device is None and not target.is_this_machine():
        raise CompactDeployError(
            f"a budget is met on the device: the search measures {target.name} there; pass --device rpc://HOST:PORT[/KEY]"
        )


class _Forward:
    """Shows a candidate build's stages as progress lines of the search."""

    def __init__(self, say: Callable[[str], None], label: str):
        self.say, self.label = say, label

    def started(self, stage: str) -> None:
        self.say(f"{self.label}: {stage}")

    def progress(self, stage: str, message: str) -> None:
        self.say(f"{self.label}: {stage}: {message}")

    def finished(self, stage: str, seconds: float, summary: str) -> None:
        pass


@contextlib.contextmanager
def _sessions(config) -> Iterator[Callable[[], Any]]:
    """Opens a session per batch of measurements and lets it go after (a tracker's device is then
    free for the candidate builds); this machine is served by one agent for the whole search."""
    from ..device import connect, local_agent, parse_device

    if config.device is None:
        with local_agent(config.threads) as agent:
            yield lambda: connect(agent.address)
    else:
        address = parse_device(config.device)
        yield lambda: connect(address, config.device_wait_s)


def _run_key(config, target, method: str, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    from ..zoo import file_sha256

    return {
        "model": config.model,
        "model_args": config.model_args,
        "weights_sha256": file_sha256(config.weights) if config.weights else None,
        "data": config.data,
        "input_shape": config.input_shape,
        "exclude": list(config.exclude),
        "method": method,
        "calibration_samples": config.calibration_samples,
        "seed": config.seed,
        "points": config.fit_points,
        "target": target.name,
        "device": {k: (fingerprint or {}).get(k) for k in ("cpu", "machine", "cuda", "emulated", "hostname")},
    }


def search(config, target, linker, say: Callable[[str], None]) -> FitResult:
    """Find the widths of the most accurate model whose measured latency and memory meet the budgets."""
    from ..pipeline import load
    from ..tune import database_for

    method = default_method(config)
    latency_budget = parse_latency_budget(config.latency_budget) if config.latency_budget else None
    memory_budget = parse_memory_budget(config.memory_budget) if config.memory_budget else None

    say("reading the model's groups and the importance of their channels")
    loaded = load(config)
    space = width_space(loaded.model.module, loaded.example, config.exclude, target.channel_multiple, config.fit_points,
                        grow=config.allow_grow)
    if not space.full:
        raise CompactDeployError(f"{loaded.model.name} has no layer the search can narrow (all excluded, or only the output layer)")
    curves = importance_curves(loaded.model.module, loaded.example, method, loaded.calibration, config.exclude)
    if memory_budget is not None and memory_budget.value is not None:
        floor = space.params_bytes(space.smallest())
        if floor > memory_budget.value:
            raise CompactDeployError(
                f"--memory-budget {config.memory_budget} is smaller than the weights of the smallest model the search "
                f"can make ({format_size(floor)} at {target.channel_multiple} channels per group): raise the budget"
            )

    with _sessions(config) as open_session:
        fingerprint = open_session().fingerprint
        # the database the candidate builds compile with, from the fingerprint already asked for
        database = database_for(target, fingerprint) if target.kind == "llvm" else None
        table = table_for(target, fingerprint, database)
        key = _run_key(config, target, method, fingerprint)
        run_dir = cache_dir("fit", hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16])
        state = SearchState.load(run_dir / "state.json", key, config.resume)
        try:
            return _search(config, target, linker, say, method, latency_budget, memory_budget, loaded, space, curves,
                           table, open_session, database, state, run_dir)
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


def _search(config, target, linker, say, method, latency_budget, memory_budget, loaded, space, curves,
            table, open_session, database, state, run_dir) -> FitResult:
    from ..pipeline import build

    def table_ms(widths_list):
        signatures = [s for w in widths_list for s in space.signatures(w)]
        measure_missing(table, signatures, target, open_session, linker, database, say)
        return [sum(table.ms(s) for s in space.signatures(w)) for w in widths_list]

    trajectory = Trajectory(space, curves, table_ms)
    if latency_budget is None:  # memory only: the same steps, paid in parameters
        trajectory = Trajectory(space, curves, lambda ws: [float(space.params_bytes(w)) for w in ws])

    def verify(point: Point, predicted_ms: float | None) -> Candidate:
        known = state.find(point.widths)
        if known is not None:
            return state.meet(known)
        changed = space.narrowed(point.widths)
        label = f"model {len(state.candidates) + 1} ({_widths_text(changed) or 'unpruned'})"
        out = run_dir / "candidates" / hashlib.sha256(json.dumps(point.widths, sort_keys=True).encode()).hexdigest()[:12]
        candidate_config = replace(
            config, out=out, prune=method if changed else None, widths=changed, finetune_epochs=0, distill=False,
            noise_outputs=0, latency_budget=None, memory_budget=None, resume=False,
            allow_grow=bool(space.widened(point.widths)),
        )
        report = build(candidate_config, _Forward(say, label)).report
        if report["latency_ms"] is None:
            raise CompactDeployError(f"the device did not measure {label}: {report['figures']['latency']}")
        candidate = Candidate(
            widths=point.widths, table_ms=point.cost, predicted_ms=predicted_ms, measured_ms=report["latency_ms"]["median"],
            memory_bytes=report["memory"]["params_bytes"] + report["memory"]["workspace_bytes"],
            params=report["model"]["params"], macs=report["model"]["macs"],
            accuracy=report["accuracy"]["after_pruning"] if report["accuracy"] else None,
            importance_kept=trajectory.kept(point.widths), where=report["figures"]["latency"], build=str(out),
        )
        state.candidates.append(candidate)
        state.meet(candidate)
        state.save()
        say(f"{label}: measured {candidate.measured_ms:.3f} ms" + (f", predicted {predicted_ms:.3f} ms" if predicted_ms else ""))
        return candidate

    trajectory.start()
    unpruned = verify(trajectory.points[0], None)
    latency_ms = latency_budget.resolve(unpruned.measured_ms) if latency_budget else None
    memory_bytes = memory_budget.resolve(unpruned.memory_bytes) if memory_budget else None
    workspace_bound = unpruned.memory_bytes - space.params_bytes(space.full)  # narrower models plan less

    def predict(point: Point) -> float:
        return _corrected(point.cost, [(c.table_ms, c.measured_ms) for c in state.walked]) if latency_ms else point.cost

    def fits(point: Point, target_ms: float | None) -> bool:
        # intermediates grow with the widest group (a bound for grown models, not a measurement)
        growth = max(1.0, max(w / space.full[g] for g, w in point.widths.items()))
        if memory_bytes is not None and space.params_bytes(point.widths) + max(0, workspace_bound) * growth > memory_bytes:
            return False
        return target_ms is None or predict(point) <= target_ms

    rounds, status, grown, walk_ended = 0, None, [], False
    if unpruned.meets(latency_ms, memory_bytes):
        status = "the unpruned model already meets the budget"
        if space.wider and unpruned.meets(*_close(latency_ms, memory_bytes)):  # room to grow into
            rounds, status, grown = _grow(config, trajectory, state, verify, predict, fits, latency_ms, memory_bytes, say)
    while status is None and rounds < config.fit_rounds:
        rounds += 1
        target_ms = latency_ms * (1 - MARGIN) if latency_ms else None
        pick = _first(trajectory, lambda p: fits(p, target_ms), say)
        smallest = pick is None
        if smallest:
            pick = trajectory.points[-1]
        else:
            pick = trajectory.fill(pick, lambda p: fits(p, target_ms))
        seen_before = state.met(pick.widths)
        candidate = verify(pick, predict(pick) if latency_ms else None)
        if candidate.meets(latency_ms, memory_bytes):
            if latency_ms is None or candidate.measured_ms >= latency_ms * (1 - CLOSE_ENOUGH):
                status = "met the budget"
            elif seen_before or smallest:
                # the prediction is exact at measured models, so the next round would pick this one
                # again: measure the nearest wider model predicted near the budget instead
                wider = sorted(
                    (p for p in trajectory.points if p.cost > pick.cost and not state.met(p.widths)
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
        closest_text = (
            f"the closest, {_widths_text(space.narrowed(closest.widths)) or 'unpruned'}, "
            f"{where} {closest.measured_ms:.3f} ms and {format_size(closest.memory_bytes)}"
        )
        if walk_ended:
            raise _Impossible(
                f"no model in the search space meets {_budget_text(config)}: {closest_text}; raise the budget "
                f"(its build is in {closest.build})"
            )
        # the rounds ran out with narrower models left: a noisy or mispredicted round is not an impossible budget
        raise _RoundsSpent(
            f"no model of the {len(state.candidates)} built in {rounds} rounds meets {_budget_text(config)}, and narrower "
            f"ones are left: {closest_text}; run the same command with --resume --fit-rounds {rounds + 3} "
            f"(the models measured are kept in {run_dir}) or raise the budget"
        )
    if status is None:
        status = f"met the budget within {config.fit_rounds} rounds, not within {CLOSE_ENOUGH:.0%} of it"
    # the most importance kept, not the best accuracy before fine-tuning: after a deep cut that is noise;
    # then the most parameters (grown models all keep 1.0), not the slowest: timing noise would decide that
    chosen = max(feasible, key=lambda c: (c.importance_kept, c.params))
    changed = space.narrowed(chosen.widths)
    report = _report(config, method, latency_budget, memory_budget, latency_ms, memory_bytes, space, trajectory,
                     state, chosen, table, rounds, status, run_dir, predict, grown)
    return FitResult(method, chosen.widths, changed, space.widened(chosen.widths), report)


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
    while rounds < config.fit_rounds:
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
        return rounds, f"grew within {config.fit_rounds} rounds, not within {CLOSE_ENOUGH:.0%} of the budget", path
    if len(path) <= 1:
        return rounds, "the unpruned model meets the budget; no wider model is predicted within it", path
    return rounds, far_under, path


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


def _corrected(table_ms: float, measured: list[tuple[float, float]]) -> float:
    """The table's sum corrected by the whole-model measurements: the ratio measured / table (layers
    timed alone run with warm caches; the model adds kernels outside conv/linear and call overhead)
    is interpolated between the verified models nearest in table time, held constant beyond them."""
    points = sorted(measured)
    xs = np.array([p[0] for p in points])
    ratios = np.array([p[1] / p[0] if p[0] > 0 else 1.0 for p in points])
    return float(table_ms * np.interp(table_ms, xs, ratios))


def _report(config, method, latency_budget, memory_budget, latency_ms, memory_bytes, space, trajectory, state,
            chosen, table, rounds, status, run_dir, predict, grown) -> dict[str, Any]:
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
        "importance": f"{method}: per group, the share of its channel importance that stays (mean over groups)",
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
        "latency_steps": _steps(space, table),
        "verified": [asdict(c) for c in state.candidates],
        "predictor_error_pct": {
            "median": float(np.median(errors)) if errors else None,
            "worst": float(max(errors)) if errors else None,
            "count": len(errors),
            "means": "|predicted - measured| / measured of every model built after a prediction",
        },
        "chosen": asdict(chosen),
        "widths": {g: {"before": space.full[g], "after": chosen.widths[g]} for g in space.full},
        "search_dir": str(run_dir),
        "figures": "latencies are whole-model medians measured on the device named in 'where'; "
                   "accuracies are after pruning, before fine-tuning",
    }


def _steps(space, table) -> dict[str, Any]:
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


def _widths_text(widths: dict[str, int]) -> str:
    return ", ".join(f"{g}={w}" for g, w in widths.items())


def _budget_text(config) -> str:
    parts = [f"latency {config.latency_budget}" if config.latency_budget else "", f"memory {config.memory_budget}" if config.memory_budget else ""]
    return " and ".join(p for p in parts if p)
