"""Learning the architecture while training: the network's widths come out of training itself.

- ``gates``    Srinivas & Babu 2016, "Learning Neural Network Architectures using Backpropagation":
               a gate w in [0, 1] per neuron/channel, binarised in the forward pass (w >= 0.5),
               straight-through gradients, clipped to [0, 1] after each step; each ReLU becomes
               tri-state, y = x for x >= 0 and d*x otherwise, with a depth gate d per layer.
               Loss L + l1*sum w(1-w) + l2*sum d(1-d) + sum_i l3_i*h_i*[d_i < 0.5] - l4*sum d,
               h_i = sum_j w_ij; l3 = k*l1 (l3_i = l3 * mean width / width_i), l2 = l1/10, l4 = l3/10.
- ``gdropout`` Srinivas & Babu 2016, "Generalized Dropout": theta_j ~ Bernoulli(k_j) per neuron,
               k_j learnt with a Beta(alpha, beta) prior, straight-through; at test time the
               neuron is scaled by k_j (folded into the next layer). Dropout++ (alpha = beta > 1),
               flat (alpha = beta = 1), SAL (alpha, beta < 1, which drives k to 0 or 1).
- ``sparse``   Srinivas, Subramanya & Babu 2017, "Training Sparse Neural Networks": a gate per
               weight, loss L + l1*sum g(1-g) + l2*sum g. Unstructured: it shrinks the file after
               compression, not dense latency.

Gates sit where the next layer reads each channel, so a channel whose gate is 0 contributes
exactly nothing, and removing it physically (a pruning plan, replayable by ``build``) leaves the
outputs unchanged. Groups where a channel is not simply read by the next layer (a residual sum, a
depthwise convolution) are not gated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import CompactDeployError
from .prune.core import _graph, _prunable_types, call_order, replay
from .prune.groups import ChannelGroup, channel_group
from .prune.trace import fixed_reason

GATE_INIT = 0.51  # just above the 0.5 threshold: every unit starts on, and the bimodal pull is ~0
DEPTH_INIT = 0.3
KEEP_INIT = 0.5  # gdropout: plain dropout at first; the prior and the data move k from there
KEEP_THRESHOLD = 0.1  # gdropout: units whose keep probability k ends below this are removed
EPS = 1e-4
# --arch-strength by method: inside the band where each keeps a useful model (docs/methods.md);
# narrow layers feel the gates' width penalty most, so the default suits the narrow models too
DEFAULT_STRENGTH = {"gates": 0.002, "sparse": 0.001, "gdropout": 3.0}


def _binary(value: torch.Tensor) -> torch.Tensor:
    """Forward: value >= 0.5 as 0/1; backward: the identity (straight-through)."""
    return (value >= 0.5).to(value.dtype) + value - value.detach()


@dataclass
class _GatedGroup:
    name: str
    view: ChannelGroup
    gate: nn.Parameter  # per channel: w (gates) or k (gdropout)
    depth: nn.Parameter | None = None  # gates: the tri-state ReLU's d
    relu: nn.Module | None = None


@dataclass
class ArchConfig:
    method: str
    strength: float = 1e-3  # l1 for gates and sparse; the prior's weight for gdropout
    k: float = 0.3  # gates: l3 = k * l1
    alpha: float = 0.05  # gdropout prior (default SAL, beta/alpha = 10)
    beta: float = 0.5


class ArchLearner:
    """Gates on a model, their penalty, and their removal into a physically narrower model."""

    def __init__(self, module: nn.Module, example: torch.Tensor, config: ArchConfig):
        if config.method not in ("gates", "gdropout", "sparse"):
            raise CompactDeployError(f"unknown --learn-arch {config.method!r}: choose gates, gdropout or sparse")
        self.module, self.example, self.config = module, example, config
        self.groups: list[_GatedGroup] = []
        self.skipped: dict[str, str] = {}
        self.weight_gates: dict[str, nn.Parameter] = {}
        self.linearized: list[str] = []  # ReLUs whose depth gate opened: replaced by the identity
        self.merged: list[tuple[str, str]] = []  # (linear layer, next layer) pairs folded into one
        self._hooks: list = []
        if config.method == "sparse":
            self._attach_weight_gates()
        else:
            self._attach_channel_gates()

    # --- attaching ---------------------------------------------------------------------------
    def _attach_channel_gates(self) -> None:
        graph, opaque, ignored, name_of = _graph(self.module, self.example, ())
        order = call_order(self.module, self.example)
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(_prunable_types())):
            root = group[0].dep.target.module
            name = name_of[root]
            fixed = fixed_reason(group, opaque)
            if fixed is not None:  # the model fixes this width: no gate can narrow it
                self.skipped[name] = fixed
                continue
            view = channel_group(graph, root)
            problem = view.merge_problem
            if problem is None and not view.single_path:  # a gate here would not sit where one layer's d can act
                problem = "a depthwise convolution or a squeeze-excitation gate acts on its channels"
            if problem is not None:
                self.skipped[name] = problem
                continue
            start = GATE_INIT if self.config.method == "gates" else KEEP_INIT
            gated = _GatedGroup(name, view, nn.Parameter(torch.full((view.width,), start)))
            if self.config.method == "gates":
                gated.relu = _relu_after(order, root, view)
                if gated.relu is not None and order.count(gated.relu) > 1:
                    gated.relu = None  # one ReLU module used at several places cannot carry one layer's d
                if gated.relu is not None:
                    gated.relu.inplace = False
                    gated.depth = nn.Parameter(torch.tensor(DEPTH_INIT))
                    self._hooks.append(gated.relu.register_forward_hook(self._tri_state(gated)))
            for consumer in view.consumers:
                self._hooks.append(consumer.module.register_forward_pre_hook(self._gate_input(gated, consumer)))
            self.groups.append(gated)

    def _attach_weight_gates(self) -> None:
        from torch.nn.utils import parametrize

        learner = self

        class Gate(nn.Module):
            def __init__(self, shape):
                super().__init__()
                self.g = nn.Parameter(torch.full(shape, GATE_INIT))

            def forward(self, weight):
                gate = _binary(self.g) if learner.module.training else (self.g >= 0.5).to(weight.dtype)
                return weight * gate

        for name, layer in self.module.named_modules():
            if isinstance(layer, _prunable_types()):
                parametrize.register_parametrization(layer, "weight", Gate(tuple(layer.weight.shape)))
                self.weight_gates[name] = layer.parametrizations.weight[0].g

    def _gate_input(self, gated: _GatedGroup, consumer):
        index = torch.empty(sum(len(idx) for idx in consumer.per_channel), dtype=torch.long)
        for channel, idx in enumerate(consumer.per_channel):
            index[idx] = channel

        def hook(_module, inputs):
            x = inputs[0]
            mask = self._mask(gated, x.shape[0])[..., index] if self.config.method == "gdropout" else self._mask(gated, None)[index]
            shape = (mask.shape[0], -1) + (1,) * (x.dim() - 2) if mask.dim() == 2 else (1, -1) + (1,) * (x.dim() - 2)
            return (x * mask.reshape(shape),) + tuple(inputs[1:])

        return hook

    def _mask(self, gated: _GatedGroup, batch: int | None) -> torch.Tensor:
        if self.config.method == "gates":
            return _binary(gated.gate)
        keep = gated.gate.clamp(EPS, 1 - EPS)
        if not self.module.training:
            # at test time a unit is scaled by its keep probability; near 0 it is pruned
            return torch.where(keep >= KEEP_THRESHOLD, keep, torch.zeros_like(keep))
        theta = torch.bernoulli(keep.detach().expand(batch, -1))
        return theta + keep - keep.detach()  # straight-through to k

    def _tri_state(self, gated: _GatedGroup):
        def hook(_module, inputs, output):
            d = _binary(gated.depth)
            return output + d * (inputs[0] - output)  # negative inputs pass scaled by d

        return hook

    # --- training ----------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        params = [g.gate for g in self.groups] + [g.depth for g in self.groups if g.depth is not None]
        return params + list(self.weight_gates.values())

    def penalty(self, dataset_size: int) -> torch.Tensor:
        c = self.config
        total = torch.zeros(())
        if c.method == "sparse":
            for g in self.weight_gates.values():
                total = total + c.strength * (g * (1 - g)).sum() + (c.strength / 10) * g.sum()
            return total
        if c.method == "gdropout":
            for gated in self.groups:
                keep = gated.gate.clamp(EPS, 1 - EPS)
                prior = (c.alpha - 1) * torch.log(keep).sum() + (c.beta - 1) * torch.log(1 - keep).sum()
                total = total - c.strength * prior / dataset_size
            return total
        l1, l3 = c.strength, c.k * c.strength
        # l3 scaled inversely with layer width, relative to the mean width: on average each gate
        # feels l3, wide layers less, narrow layers more
        mean_width = sum(g.view.width for g in self.groups) / max(1, len(self.groups))
        for gated in self.groups:
            w = gated.gate
            total = total + l1 * (w * (1 - w)).sum()
            nonlinear = gated.depth is None or bool(gated.depth < 0.5)
            if nonlinear:
                total = total + (l3 * mean_width / gated.view.width) * w.sum()
            if gated.depth is not None:
                d = gated.depth
                total = total + (l1 / 10) * d * (1 - d) - (l3 / 10) * d
        return total

    @torch.no_grad()
    def clip(self) -> None:
        for param in self.parameters():
            param.clamp_(0.0, 1.0)
        if self.config.method == "gates":
            for gated in self.groups:  # never every unit of a layer closed: no signal would pass to learn from
                strongest = int(torch.argmax(gated.gate))
                if gated.gate[strongest] < 0.5:
                    gated.gate[strongest] = 0.5

    # --- removal -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        if self.config.method == "sparse":
            total = sum(g.numel() for g in self.weight_gates.values())
            kept = sum(int((g >= 0.5).sum()) for g in self.weight_gates.values())
            return {"weights": total, "weights_kept": kept, "sparsity": 1 - kept / max(1, total)}
        layers = {}
        for gated in self.groups:
            kept = int(self._kept(gated).sum())
            layers[gated.name] = {"width": gated.view.width, "kept": kept}
            if gated.depth is not None:
                layers[gated.name]["depth_gate"] = float(gated.depth.detach())
                layers[gated.name]["linear"] = bool(gated.depth >= 0.5)
        return {"layers": layers, "not_gated": self.skipped}

    def _open(self, gated: _GatedGroup) -> torch.Tensor:
        """Which units pass anything: gate >= 0.5 (gates), keep probability >= the threshold (gdropout)."""
        return gated.gate.detach() >= (0.5 if self.config.method == "gates" else KEEP_THRESHOLD)

    def _kept(self, gated: _GatedGroup) -> torch.Tensor:
        kept = self._open(gated)
        if not kept.any():  # never an empty layer: keep the strongest unit
            kept[int(torch.argmax(gated.gate.detach()))] = True
        return kept

    def finalize(self) -> dict[str, list[int]]:
        """Fold the gates into the weights, take them off, remove dead units; returns the plan."""
        from torch.nn.utils import parametrize

        if self.config.method == "sparse":
            for name, layer in self.module.named_modules():
                if name in self.weight_gates:
                    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
                    with torch.no_grad():
                        layer.weight.mul_((self.weight_gates[name] >= 0.5).to(layer.weight.dtype))
            return {}
        plan: dict[str, list[int]] = {}
        for gated in self.groups:
            kept = self._kept(gated)
            silent = (kept & ~self._open(gated)).nonzero().flatten().tolist()
            if silent:  # the unit kept so that no layer is empty: it passed nothing when gated, so neither now
                with torch.no_grad():
                    for consumer in gated.view.consumers:
                        for channel in silent:
                            consumer.module.weight[:, consumer.per_channel[channel]] = 0
            if self.config.method == "gdropout":  # the test-time scale k, into the next layer
                with torch.no_grad():
                    for consumer in gated.view.consumers:
                        for channel, idx in enumerate(consumer.per_channel):
                            consumer.module.weight[:, idx] *= float(gated.gate[channel].clamp(EPS, 1 - EPS))
            removed = [c for c in range(gated.view.width) if not kept[c]]
            if removed:
                plan[gated.name] = removed
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        # a layer whose depth gate opened (d = 1) is linear: its ReLU becomes the identity
        names = {m: n for n, m in self.module.named_modules()}
        linear = [g for g in self.groups if g.depth is not None and g.depth >= 0.5]
        self.linearized = [names[g.relu] for g in linear]
        # a linear Linear -> Linear step with nothing else between collapses into one layer
        order = call_order(self.module, self.example)
        mergeable = [
            g for g in linear
            if isinstance(g.view.producers[0].module, nn.Linear) and len(g.view.consumers) == 1
            and isinstance(g.view.consumers[0].module, nn.Linear) and not g.view.norms
            and not (g.view.ops - {"Relu", "T", "Addmm", "Mm", "Linear", "Reshape"})
            and all(len(idx) == 1 for idx in g.view.consumers[0].per_channel)  # one column per unit: no flatten
        ]
        mergeable.sort(key=lambda g: order.index(g.view.producers[0].module))
        self.merged = [(names[g.view.producers[0].module], names[g.view.consumers[0].module]) for g in mergeable]
        linearize(self.module, self.linearized)
        if plan:
            replay(self.module, self.example, plan)
        merge_linear(self.module, self.merged)
        return plan


def merge_linear(module: nn.Module, pairs: list[tuple[str, str]], compute: bool = True) -> None:
    """Fold each (first, second) pair of nn.Linear with nothing between into one layer in place of
    the second; the first becomes the identity. ``compute=False`` only reshapes (to load weights)."""
    for first_name, second_name in pairs:
        first, second = module.get_submodule(first_name), module.get_submodule(second_name)
        merged = nn.Linear(first.in_features, second.out_features, bias=True)
        if compute:
            with torch.no_grad():
                merged.weight.copy_(second.weight @ first.weight)
                bias = second.weight @ first.bias if first.bias is not None else torch.zeros(second.out_features)
                merged.bias.copy_(bias + (second.bias if second.bias is not None else 0))
        _replace(module, second_name, merged)
        _replace(module, first_name, nn.Identity())


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


def linearize(module: nn.Module, names: list[str]) -> None:
    """Replace the named activation modules by the identity (layers learnt to be linear)."""
    for name in names:
        _replace(module, name, nn.Identity())


def _relu_after(order: list[nn.Module], producer: nn.Module, view: ChannelGroup) -> nn.Module | None:
    """The nn.ReLU that the producer's output passes through before its consumers read it."""
    if producer not in order:
        return None
    consumers = {c.module for c in view.consumers}
    for module in order[order.index(producer) + 1 :]:
        if module in consumers:
            return None
        if isinstance(module, nn.ReLU):
            return module
    return None
