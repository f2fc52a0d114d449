"""The pruning methods: which channels of a group to remove, and how to compensate for them.

Scorers give every channel a score (higher = keep) and the lowest go:
- ``l1``      filter L1 norm (Li et al. 2017), data-free baseline
- ``random``  the sanity baseline
- ``apoz``    average percentage of zeros after ReLU over data (Hu et al. 2016, "Network Trimming")
- ``obd``     Optimal Brain Damage (LeCun et al. 1989): sum over a neuron's weights of h_kk w_k^2 / 2,
              h_kk from the empirical Fisher (mean squared per-sample gradient, Levenberg-Marquardt)
- ``taylor``  (sum of g*w over a channel)^2, averaged over batches (Molchanov et al. 2019)

Mergers remove one channel at a time and first fold it into a kept one, in the consuming layers:
- ``data-free`` Srinivas & Babu 2015: saliency s_ij = <a_j^2> ||W_i - W_j||^2 over the incoming
                weight-sets (bias and batch-norm folded in; unit-normalised on ReLU paths, the scale
                moved into the outgoing weights), merge the least salient pair, a_i += a_j
- ``noiseout``  Babaeizadeh et al. 2016: the most correlated pair over data, h_j ~ alpha h_i + beta
                by least squares, W_next[:, i] += alpha W_next[:, j], b_next += beta W_next[:, j]
Where merging is not well defined for a group (a residual sum, a depthwise convolution between
producer and consumer), the group is pruned by ``l1`` instead, and the result says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .groups import ChannelGroup

AUTO = -1  # n_remove for data-free:auto: the method picks the count (the knee of its saliency curve)


@dataclass(frozen=True)
class Calibration:
    """Data for the data-driven methods: inputs already shaped for the model, and labels."""

    x: np.ndarray
    y: np.ndarray
    batch_size: int = 64


@dataclass
class Selection:
    remove: list[int]
    method: str  # what decided it: the method's name, or "l1 (fallback: ...)"
    saliency_curve: list[float] = field(default_factory=list)  # mergers: saliency of each merge, in order


class Method:
    name = ""
    description = ""
    needs_data = False

    def __init__(self, seed: int = 0):
        self.seed = seed  # --seed: every method takes it; those that draw (random) use it

    def prepare(self, module: torch.nn.Module, views: list[ChannelGroup], data: Calibration | None) -> None:
        """Collect what the method needs, once, on the unpruned model."""

    def select(self, view: ChannelGroup, n_remove: int, multiple: int = 1) -> Selection:
        """Choose ``n_remove`` channels (AUTO: the method decides, keeping a multiple of ``multiple``)."""
        raise NotImplementedError

    def removal_costs(self, view: ChannelGroup) -> np.ndarray:
        """What removing each channel in turn costs, in the method's order, >= 0 (the width search
        reads a group's importance curve from it); changes nothing."""
        raise NotImplementedError


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    """The ``count`` channels with the lowest scores, in index order."""
    return sorted(torch.argsort(scores)[:count].tolist())


class Scorer(Method):
    def scores(self, view: ChannelGroup) -> torch.Tensor:
        raise NotImplementedError

    def select(self, view: ChannelGroup, n_remove: int, multiple: int = 1) -> Selection:
        scores = self.scores(view)
        return Selection(_lowest(scores, n_remove), self.name)

    def removal_costs(self, view: ChannelGroup) -> np.ndarray:
        return _sorted_costs(self.scores(view))


def _sorted_costs(scores: torch.Tensor) -> np.ndarray:
    """Scores in removal order, shifted to be >= 0 (APoZ scores are negative fractions)."""
    ordered = np.sort(scores.double().numpy())
    return ordered - min(0.0, float(ordered[0])) if len(ordered) else ordered


def l1_scores(view: ChannelGroup) -> torch.Tensor:
    """Sum of |w| over each channel's incoming weights, in every producer."""
    total = torch.zeros(view.width)
    for producer in view.producers:
        weight = producer.module.weight.detach()
        for channel, rows in enumerate(producer.per_channel):
            total[channel] += weight[rows].abs().sum()
    return total


class L1(Scorer):
    name, description = "l1", "filter L1 norm (Li et al. 2017), data-free baseline"

    def scores(self, view: ChannelGroup) -> torch.Tensor:
        return l1_scores(view)


class Random(Scorer):
    name, description = "random", "uniformly random channels, the sanity baseline"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, view: ChannelGroup) -> torch.Tensor:
        return torch.rand(view.width, generator=self.generator)


def _channel_rows(x: torch.Tensor) -> torch.Tensor:
    """A consumer's input as (input channels or features, values): dim 1 first, the rest flattened."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1)


def _consumer_inputs(module, views: list[ChannelGroup], data: Calibration, on_batch: Callable) -> None:
    """Run the data through ``module``, calling ``on_batch(view, rows)`` with each group's first consumer's input."""
    hooks, seen = [], {}

    def make_hook(consumer_module):
        def hook(_module, inputs):
            seen[consumer_module] = inputs[0]

        return hook

    consumers = {view.consumers[0].module for view in views if view.consumers}
    for consumer in consumers:
        hooks.append(consumer.register_forward_pre_hook(make_hook(consumer)))
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data.x), data.batch_size):
                seen.clear()
                module(torch.from_numpy(data.x[start : start + data.batch_size]))
                for view in views:
                    if view.consumers and view.consumers[0].module in seen:
                        on_batch(view, _channel_rows(seen[view.consumers[0].module]))
    finally:
        for hook in hooks:
            hook.remove()


class APoZ(Scorer):
    name, description, needs_data = "apoz", "average percentage of zeros after ReLU (Hu et al. 2016)", True

    def prepare(self, module, views, data):
        self.zeros: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

        def on_batch(view: ChannelGroup, rows: torch.Tensor) -> None:
            per_channel = view.consumers[0].per_channel
            zeros = torch.stack([(rows[idx] == 0).sum() for idx in per_channel]).double()
            counts = torch.tensor([rows[idx].numel() for idx in per_channel], dtype=torch.float64)
            self.zeros[id(view)] = self.zeros.get(id(view), 0) + zeros
            self.counts[id(view)] = self.counts.get(id(view), 0) + counts

        _consumer_inputs(module, views, data, on_batch)

    def scores(self, view):
        if id(view) not in self.zeros:
            return l1_scores(view)
        return -(self.zeros[id(view)] / self.counts[id(view)]).float()  # many zeros: remove first


def _producer_params(view: ChannelGroup):
    """(parameter, rows of each channel) for every producer's weight and bias."""
    for producer in view.producers:
        yield producer.module.weight, producer.per_channel
        if producer.module.bias is not None:
            yield producer.module.bias, producer.per_channel


def _gradient_passes(module, data: Calibration, batch_size: int, on_gradients: Callable[[], None], limit: int) -> None:
    module.eval()  # batch-norm statistics stay as trained; gradients still flow
    count = min(len(data.x), limit)
    for start in range(0, count, batch_size):
        module.zero_grad(set_to_none=True)
        x = torch.from_numpy(data.x[start : min(start + batch_size, count)])
        y = torch.from_numpy(data.y[start : min(start + batch_size, count)])
        torch.nn.functional.cross_entropy(module(x), y).backward()
        on_gradients()
    module.zero_grad(set_to_none=True)


class Taylor(Scorer):
    name, description, needs_data = "taylor", "(sum of g*w per channel)^2, averaged over batches (Molchanov et al. 2019)", True

    def prepare(self, module, views, data):
        self.sums: dict[int, torch.Tensor] = {id(view): torch.zeros(view.width) for view in views}
        self.batches = 0

        def on_gradients() -> None:
            self.batches += 1
            for view in views:
                first_order = torch.zeros(view.width)
                for param, rows in _producer_params(view):
                    if param.grad is None:
                        continue
                    product = (param.detach() * param.grad).reshape(param.shape[0], -1).sum(dim=1)
                    for channel, idx in enumerate(rows):
                        first_order[channel] += product[idx].sum()
                self.sums[id(view)] += first_order.pow(2)

        _gradient_passes(module, data, data.batch_size, on_gradients, limit=len(data.x))

    def scores(self, view):
        return self.sums[id(view)] / max(1, self.batches)


class OBD(Scorer):
    name, description, needs_data = "obd", "Optimal Brain Damage, h_kk w_k^2 / 2 with an empirical-Fisher Hessian diagonal", True
    samples = 128  # per-sample gradients: one backward pass each

    def prepare(self, module, views, data):
        params = {id(p): p for view in views for p, _ in _producer_params(view)}
        fisher = {key: torch.zeros_like(p) for key, p in params.items()}
        samples = 0

        def on_gradients() -> None:
            nonlocal samples
            samples += 1
            for key, param in params.items():
                if param.grad is not None:
                    fisher[key] += param.grad.detach().pow(2)

        _gradient_passes(module, data, 1, on_gradients, limit=self.samples)
        # saliencies now: pruning an earlier group replaces the parameters of later ones
        self.saliency = {id(view): self._saliency(view, fisher, max(1, samples)) for view in views}

    @staticmethod
    def _saliency(view, fisher, samples: int) -> torch.Tensor:
        saliency = torch.zeros(view.width)
        for param, rows in _producer_params(view):
            h = fisher[id(param)] / samples
            per_row = (h * param.detach().pow(2) / 2).reshape(param.shape[0], -1).sum(dim=1)
            for channel, idx in enumerate(rows):
                saliency[channel] += per_row[idx].sum()
        return saliency

    def scores(self, view):
        return self.saliency[id(view)]


class _Merger(Method):
    """Sequential merging; groups where it is not defined fall back to l1."""

    def select(self, view: ChannelGroup, n_remove: int, multiple: int = 1) -> Selection:
        problem = view.merge_problem
        if problem is not None:
            count = n_remove if n_remove != AUTO else 0
            return Selection(_lowest(l1_scores(view), count), f"l1 (fallback: {problem})")
        return self.merge(view, n_remove, multiple)

    def merge(self, view: ChannelGroup, n_remove: int, multiple: int) -> Selection:
        raise NotImplementedError

    def removal_costs(self, view: ChannelGroup) -> np.ndarray:
        if view.merge_problem is not None:
            return _sorted_costs(l1_scores(view))
        return self.merge_costs(view)

    def merge_costs(self, view: ChannelGroup) -> np.ndarray:
        raise NotImplementedError


def knee(curve: list[float]) -> int:
    """How many merges to make: where the saliency curve turns up (the paper's stopping rule).

    Saliencies span orders of magnitude, so the curve is read on a log scale; the knee is the point
    farthest below the chord from its first to its last value.
    """
    if len(curve) < 3:
        return 0
    y = np.log(np.maximum(np.asarray(curve, dtype=np.float64), 1e-12))
    y = (y - y.min()) / (y.max() - y.min()) if y.max() > y.min() else np.zeros_like(y)
    x = np.linspace(0.0, 1.0, len(y))
    return int(np.argmax(x - y))  # merges before the curve turns up


class DataFree(_Merger):
    name, description = "data-free", "merge similar neurons, compensate the next layer (Srinivas & Babu 2015)"

    def merge(self, view: ChannelGroup, n_remove: int, multiple: int) -> Selection:
        merges, curve = self._plan(view, view.width - 1 if n_remove == AUTO else n_remove)
        if n_remove == AUTO:
            kept = view.width - knee(curve)
            if view.width > multiple:  # round the width the knee chose to the target's multiple
                kept = min(view.width, max(multiple, int(round(kept / multiple)) * multiple))
            merges = merges[: view.width - kept]
        for keep, drop, ratio in merges:
            view.fold_into(keep, drop, scale=ratio)
        return Selection(sorted(drop for _, drop, _ in merges), self.name, curve)

    def merge_costs(self, view: ChannelGroup) -> np.ndarray:
        return np.maximum(np.asarray(self._plan(view, view.width - 1)[1]), 0.0)

    def _plan(self, view: ChannelGroup, steps: int) -> tuple[list[tuple[int, int, float]], list[float]]:
        """The first ``steps`` merges (keep, drop, scale ratio) and their saliencies, without folding."""
        incoming = view.incoming().double()
        norms = incoming.norm(dim=1)
        # on a ReLU path h(c W) = c h(W) for c > 0: compare directions, carry the scale outward
        scale = torch.where(norms > 0, norms, torch.ones_like(norms)) if view.positively_homogeneous else torch.ones_like(norms)
        directions = incoming / scale[:, None]
        distance = torch.cdist(directions, directions).pow(2)
        outgoing = torch.cat(view.outgoing(), dim=1).double() * scale[:, None]  # a_j in normalised units
        alive = torch.ones(view.width, dtype=torch.bool)
        distance.fill_diagonal_(float("inf"))
        merges, curve = [], []
        for _ in range(steps):
            a2 = outgoing.pow(2).mean(dim=1)
            saliency = distance * a2[None, :]  # [i, j]: delete j, fold it into i
            saliency[~alive, :] = float("inf")
            saliency[:, ~alive] = float("inf")
            flat = int(torch.argmin(saliency))
            keep, drop = divmod(flat, view.width)
            curve.append(float(saliency[keep, drop]))
            merges.append((keep, drop, float(scale[drop] / scale[keep])))
            outgoing[keep] += outgoing[drop]
            alive[drop] = False
        return merges, curve


class NoiseOut(_Merger):
    name, description, needs_data = "noiseout", "merge correlated neurons over data, fit and compensate (Babaeizadeh et al. 2016)", True

    def prepare(self, module, views, data):
        self.stats: dict[int, list] = {}

        def on_batch(view: ChannelGroup, rows: torch.Tensor) -> None:
            # each channel's values, aligned across channels (a flatten maps a channel to a block)
            per_channel = view.consumers[0].per_channel
            h = torch.stack([rows[idx].reshape(-1) for idx in per_channel]).double()
            total = self.stats.setdefault(id(view), [0, torch.zeros(view.width, dtype=torch.float64),
                                                     torch.zeros(view.width, view.width, dtype=torch.float64)])
            total[0] += h.shape[1]
            total[1] += h.sum(dim=1)
            total[2] += h @ h.T

        _consumer_inputs(module, views, data, on_batch)

    def merge(self, view: ChannelGroup, n_remove: int, multiple: int) -> Selection:
        if id(view) not in self.stats:
            return Selection(_lowest(l1_scores(view), n_remove), "l1 (fallback: no activations seen)")
        merges, curve = self._plan(view, n_remove)
        for keep, drop, alpha, beta in merges:
            view.fold_into(keep, drop, scale=alpha, shift=beta)
        return Selection(sorted(drop for _, drop, _, _ in merges), self.name, curve)

    def merge_costs(self, view: ChannelGroup) -> np.ndarray:
        if id(view) not in self.stats:
            return _sorted_costs(l1_scores(view))
        # a merge costs what the fit leaves unexplained: 1 - |correlation|
        return np.clip(1.0 - np.asarray(self._plan(view, view.width - 1)[1]), 0.0, None)

    def _plan(self, view: ChannelGroup, steps: int) -> tuple[list[tuple[int, int, float, float]], list[float]]:
        """The first ``steps`` merges (keep, drop, alpha, beta) and each pair's |correlation|, without folding."""
        n, sums, products = self.stats[id(view)]
        mean = sums / n
        cov = products / n - torch.outer(mean, mean)
        var = cov.diagonal().clamp(min=0)
        constant = var <= 1e-12 * max(1.0, float(var.max()))
        std = var.sqrt()
        corr = cov / torch.outer(std, std).clamp(min=1e-30)
        fit = corr.abs()
        fit[constant, :] = -1.0  # a constant channel predicts nothing...
        fit[:, constant] = 1.0  # ...but is predicted exactly (alpha 0, beta its mean)
        fit.fill_diagonal_(-1.0)
        alive = torch.ones(view.width, dtype=torch.bool)
        merges, curve = [], []
        for _ in range(steps):
            masked = fit.clone()
            masked[~alive, :] = -1.0
            masked[:, ~alive] = -1.0
            keep, drop = divmod(int(torch.argmax(masked)), view.width)
            curve.append(float(masked[keep, drop]))
            if constant[drop]:
                alpha, beta = 0.0, float(mean[drop])
            else:
                alpha = float(cov[keep, drop] / var[keep]) if var[keep] > 0 else 0.0
                beta = float(mean[drop] - alpha * mean[keep])
            alive[drop] = False
            merges.append((keep, drop, alpha, beta))
        return merges, curve


METHODS: dict[str, Callable[[], Method]] = {
    "l1": L1,
    "random": Random,
    "data-free": DataFree,
    "noiseout": NoiseOut,
    "apoz": APoZ,
    "obd": OBD,
    "taylor": Taylor,
}

