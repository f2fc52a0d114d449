"""Which widths: the model's width space, each group's importance curve, and the allocation.

Allocation is NetAdapt's iteration run on the measured table instead of on the device: from the
full model, each step shrinks the one group whose cheapest reduction that saves at least ``step`` of
predicted latency loses the least importance per millisecond saved. Not a knapsack, because the
cost is not separable: a convolution's time depends on the widths of the group it reads *and* the
group it writes, so a group's saving depends on its neighbours' widths; each greedy step looks the
exact layer signatures up. NetAdapt's "smallest reduction that meets the step" is what steps over
plateaus, where one multiple less saves nothing and only a bigger cut reaches the next step down.
The steps form a trajectory from the full model to the smallest; the search takes the first point
under the budget.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .costs import FLOAT_BYTES, LayerSignature, LayerSlot, candidate_widths, signature_of


@dataclass(frozen=True)
class WidthSpace:
    """The groups the search sizes, the widths each may take, and the layers those widths shape."""

    full: dict[str, int]  # group (its root layer's name) -> full width
    candidates: dict[str, list[int]]  # group -> widths it may take, ascending, the full one last
    layers: list[LayerSlot]
    norm_channels: dict[str, int]  # group -> normalisation layers on its channels (2 parameters each)
    other_params: int  # parameters no group width changes
    wider: dict[str, list[int]] = field(default_factory=dict)  # --allow-grow: widths above the full one, ascending

    def smallest(self) -> dict[str, int]:
        return {g: c[0] for g, c in self.candidates.items()}

    def narrowed(self, widths: dict[str, int]) -> dict[str, int]:
        """The groups ``widths`` changes from the full model (narrower or, grown, wider): what
        ``build --widths`` takes."""
        return {g: w for g, w in widths.items() if w != self.full[g]}

    def widened(self, widths: dict[str, int]) -> dict[str, int]:
        """The groups ``widths`` makes wider than the full model: they need ``--allow-grow``."""
        return {g: w for g, w in widths.items() if w > self.full[g]}

    def signatures(self, widths: dict[str, int]) -> list[LayerSignature]:
        return [layer.at(widths, self.full) for layer in self.layers]

    def params(self, widths: dict[str, int]) -> int:
        norms = sum(2 * count * widths[g] for g, count in self.norm_channels.items())
        return sum(s.params() for s in self.signatures(widths)) + norms + self.other_params

    def params_bytes(self, widths: dict[str, int]) -> int:
        return FLOAT_BYTES * self.params(widths)

    def macs(self, widths: dict[str, int]) -> int:
        return sum(s.macs() for s in self.signatures(widths))


def width_space(module, example_input, exclude: tuple[str, ...], multiple: int, points: int, grow: bool = False) -> WidthSpace:
    """Read the groups (torch-pruning's) and every conv/linear layer's shape from one forward pass;
    with ``grow``, the groups that can be widened exactly may also take widths up to GROW_LIMIT x."""
    import torch

    from ..prune.core import _prunable_types, prunable_groups
    from ..prune.grow import growth_problem

    inputs: dict = {}

    def record(layer, args) -> None:  # a pre-hook that returned something would replace the input
        inputs.setdefault(layer, tuple(args[0].shape))

    hooks = [
        layer.register_forward_pre_hook(record)
        for layer in module.modules()
        if isinstance(layer, _prunable_types())
    ]
    try:
        with torch.no_grad():
            module.eval()(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    _, name_of, roots, views = prunable_groups(module, example_input, exclude)
    out_terms: dict = {}
    in_terms: dict = {}
    depthwise: dict = {}
    full, norms, wider = {}, {}, {}
    for root, view in zip(roots, views):
        group = name_of[root]
        full[group] = view.width
        norms[group] = len(view.norms)
        growable = grow_widths(view.width, multiple, points) if grow and growth_problem(view) is None else []
        if growable:  # a group narrower than one step of the target's multiple has no width to grow to
            wider[group] = growable
        for producer in view.producers:
            out_terms.setdefault(producer.module, []).append((group, len(producer.per_channel[0])))
        for consumer in view.consumers:
            in_terms.setdefault(consumer.module, []).append((group, len(consumer.per_channel[0])))
        for layer in view.depthwise:
            depthwise[layer] = group
    layers = [
        LayerSlot(name_of[m], signature_of(m, shape), tuple(out_terms.get(m, ())), tuple(in_terms.get(m, ())), depthwise.get(m))
        for m, shape in inputs.items()
    ]
    total_params = sum(p.numel() for p in module.parameters())
    grouped = sum(layer.full.params() for layer in layers) + sum(2 * n * full[g] for g, n in norms.items())
    return WidthSpace(
        full=full,
        candidates={g: candidate_widths(w, multiple, points) for g, w in full.items()},
        layers=layers,
        norm_channels=norms,
        other_params=total_params - grouped,
        wider=wider,
    )


GROW_LIMIT = 2.0  # --allow-grow widens a group to at most this many times its width


def grow_widths(full: int, multiple: int, points: int) -> list[int]:
    """Widths above ``full`` a group may grow to: the steps ``candidate_widths`` takes below it,
    continued up to GROW_LIMIT x full."""
    step = candidate_widths(full, multiple, points)
    step = step[1] - step[0] if len(step) > 1 else max(multiple, full)
    return list(range(full + step, int(GROW_LIMIT * full) + 1, step))


def importance_curves(module, example_input, method_name: str, calibration, exclude: tuple[str, ...]) -> dict[str, np.ndarray]:
    """group -> lost[k]: the share of the group's importance lost when its k least important channels
    go (lost[0] = 0), by the pruning method's own order. Computed on a copy; the model is unchanged."""
    from ..prune.core import prunable_groups
    from ..prune.methods import METHODS

    work = copy.deepcopy(module).eval()
    _, name_of, roots, views = prunable_groups(work, example_input, exclude)
    method = METHODS[method_name]()
    method.prepare(work, views, calibration)
    curves = {}
    for root, view in zip(roots, views):
        costs = np.asarray(method.removal_costs(view), dtype=np.float64)
        lost = np.concatenate([[0.0], np.cumsum(costs)])
        curves[name_of[root]] = lost / lost[-1] if lost[-1] > 0 else np.linspace(0.0, 1.0, len(lost))
    return curves


def group_weights(space: WidthSpace, groups) -> dict[str, float]:
    """group -> the share of the model's multiply-accumulates its channels shape (they sum to 1):
    what one channel of the group computes across every layer it shapes, times its width.

    Computed work, not parameters: a high-resolution layer's channels hold few parameters and feed
    everything after them, so weighted by parameters the greedy cuts early layers first (what that
    cost: docs/fit.md)."""
    full = space.macs(space.full)
    held = {g: max(1, space.full[g] * (full - space.macs({**space.full, g: space.full[g] - 1})))
            if space.full[g] > 1 else 1 for g in groups}
    total = sum(held.values())
    return {g: n / total for g, n in held.items()}


@dataclass(frozen=True)
class Point:
    """One model on the trajectory: its widths, predicted cost (ms, before correction) and importance kept."""

    widths: dict[str, int]
    cost: float
    importance_kept: float  # the importance kept, each group's share weighted by the work it shapes; 1.0 = the full model
    changed: str | None = None  # the group this step shrank


@dataclass
class Trajectory:
    """The allocation's steps from the full model down, extended lazily as the search needs them."""

    space: WidthSpace
    curves: dict[str, np.ndarray]
    cost: Callable[[list[dict[str, int]]], list[float]]  # widths -> predicted cost; measures what it lacks
    step_fraction: float = 0.02  # each step saves at least this share of the full model's cost
    points: list[Point] = field(default_factory=list)
    done: bool = False
    step: float = 0.0  # set by start()
    weights: dict[str, float] | None = None  # group -> its share of the importance (group_weights)

    def lost(self, group: str, width: int) -> float:
        """The model's importance lost when ``group`` is at ``width`` (none when it is grown): the
        share of the group's own importance lost, weighted by the group's share of the model's work
        (``group_weights``), so a residual stream that runs through every block of a stage weighs
        what its channels compute, not what one block's inner convolution does."""
        if self.weights is None:
            self.weights = group_weights(self.space, self.curves)
        return self.weights[group] * float(self.curves[group][max(0, self.space.full[group] - width)])

    def kept(self, widths: dict[str, int]) -> float:
        return 1.0 - sum(self.lost(g, w) for g, w in widths.items() if g in self.curves)

    def _priced(self, proposals: list[tuple[str, list[dict[str, int]]]]) -> list[tuple[str, list[tuple[dict[str, int], float]]]]:
        """Each group's trial widths with their predicted costs, all priced in one call (one
        measurement batch for what the table lacks)."""
        costs = iter(self.cost([trial for _, trials in proposals for trial in trials]))
        return [(group, [(trial, next(costs)) for trial in trials]) for group, trials in proposals]

    def start(self) -> None:
        full = dict(self.space.full)
        self.points = [Point(full, self.cost([full])[0], 1.0)]
        self.step = self.step_fraction * self.points[0].cost

    def extend(self) -> bool:
        """One more step; False when no group can shrink further."""
        if not self.points:
            self.start()
        if self.done:
            return False
        current = self.points[-1]
        # per group: every narrower candidate, tried in the order NetAdapt tries them
        proposals = [
            (group, [{**current.widths, group: w} for w in reversed(widths) if w < current.widths[group]])
            for group, widths in self.space.candidates.items()
        ]
        best = None
        for group, priced in self._priced(proposals):
            chosen = None
            for trial, cost in priced:
                chosen = (trial, cost)
                if current.cost - cost >= self.step:
                    break  # the smallest cut that saves a step
            if chosen is None or current.cost - chosen[1] <= 0:
                continue
            trial, cost = chosen
            loss = self.lost(group, trial[group]) - self.lost(group, current.widths[group])
            score = loss / (current.cost - cost)
            if best is None or score < best[0]:
                best = (score, Point(trial, cost, self.kept(trial), group))
        if best is None:
            self.done = True
            smallest = self.space.smallest()
            if current.widths == smallest:
                return False
            # no cut saves anything by the table, yet narrower widths are left: the table's noise
            # must not hide them, so the smallest model ends the trajectory and its measurement decides
            self.points.append(Point(smallest, self.cost([smallest])[0], self.kept(smallest), None))
            return True
        self.points.append(best[1])
        return True

    def fill(self, point: Point, accept: Callable[[Point], bool]) -> Point:
        """Give back what the last step took too much of: widen, one candidate at a time, the group
        that regains the most importance per millisecond, while ``accept`` still holds (a greedy
        step can jump far below the budget, e.g. halving a group of 16)."""
        current = point
        while True:
            trials = []  # up to the full width: widening past it is grow()'s, with its own score
            for group, widths in self.space.candidates.items():
                wider = [w for w in widths if w > current.widths[group]]
                if wider:
                    trials.append((group, {**current.widths, group: wider[0]}))
            if not trials:
                return current
            costs = self.cost([trial for _, trial in trials])
            best = None
            for (group, trial), cost in zip(trials, costs):
                candidate = Point(trial, cost, self.kept(trial), group)
                if not accept(candidate):
                    continue
                gain = self.lost(group, current.widths[group]) - self.lost(group, trial[group])
                score = gain / max(cost - current.cost, 1e-9)
                if best is None or score > best[0]:
                    best = (score, candidate)
            if best is None:
                return current
            current = best[1]


    def grow(self, accept: Callable[[Point], bool]) -> list[Point]:
        """--allow-grow, when the budget allows more than the full model: NetAdapt's step run upwards.
        From the full model, each step widens the group whose smallest widening that costs at least
        ``step`` (or its widest accepted one) gains the most width per millisecond (log of the width
        ratio, so a group already grown gains less from its next step), while ``accept`` holds.
        The path, the full model first; its last point is the widest accepted."""
        if not self.points:
            self.start()
        path = [self.points[0]]
        while True:
            current = path[-1]
            proposals = [
                (group, [{**current.widths, group: w} for w in widths if w > current.widths[group]])
                for group, widths in self.space.wider.items()
            ]
            best = None
            for group, priced in self._priced(proposals):
                chosen = None
                for trial, cost in priced:
                    candidate = Point(trial, cost, self.kept(trial), group)
                    if not accept(candidate):
                        break
                    chosen = candidate
                    if cost - current.cost >= self.step:
                        break  # the smallest widening that costs a step
                if chosen is None:
                    continue
                gain = float(np.log(chosen.widths[group] / current.widths[group]))
                score = gain / max(chosen.cost - current.cost, 1e-9)
                if best is None or score > best[0]:
                    best = (score, chosen)
            if best is None:
                return path
            path.append(best[1])
