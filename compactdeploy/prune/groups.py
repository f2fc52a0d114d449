"""A per-channel view of one torch-pruning group: which weights make channel c, which consume it.

torch-pruning finds the coupled layers; the research methods need more than that: the incoming
weight-set W_c of each channel (every producer's row, batch-norm folded in), the outgoing weights
a_c (each consumer's input slice, a block of columns behind a flatten), and the elementwise ops in
between (to know whether ReLU's positive homogeneity holds). ``ChannelGroup`` gives exactly that,
and applies the merge compensation a_i <- a_i + s * a_j.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

_GRAD_FN = re.compile(r"\((\w+)Backward\d*\)")
# how torch-pruning traces a consuming layer itself (a Linear's matmul and transpose, a conv);
# depthwise convolutions are caught by their modules, not here
_CONSUMER_OPS = {"Addmm", "Mm", "T", "Linear", "Convolution", "Unsqueeze"}
# activations that map each value alone (grad_fn names: SiLU is Silu, SELU and ELU are Elu, ReLU6 Hardtanh)
_ELEMENTWISE_ACTIVATIONS = {"Relu", "LeakyRelu", "Hardtanh", "Silu", "Hardswish", "Hardsigmoid", "Gelu", "Sigmoid",
                            "Tanh", "Elu", "Celu", "Mish", "Softplus", "Hardshrink", "Softshrink", "Threshold"}
# ops that act on each channel alone and keep "equal inputs -> equal outputs"
_CHANNELWISE = {"MaxPool2DWithIndices", "MaxPool2D", "AvgPool2D", "AdaptiveAvgPool2D", "Mean", "View",
                "Reshape", "Flatten", "Clone", "Contiguous", "T", "Permute", "Transpose", "Squeeze",
                "Unsqueeze", "NativeBatchNorm", "Dropout"} | _ELEMENTWISE_ACTIVATIONS | _CONSUMER_OPS
# ops for which positive scaling commutes: f(c*x) = c*f(x) for c > 0 (SiLU, GELU... do not: their
# merges compare weights as they are, not their directions)
_POSITIVELY_HOMOGENEOUS = {"Relu", "LeakyRelu", "MaxPool2DWithIndices", "MaxPool2D", "AvgPool2D", "AdaptiveAvgPool2D",
                           "Mean", "View", "Reshape", "Flatten", "Clone", "Contiguous", "T", "Permute", "Transpose",
                           "Squeeze", "Unsqueeze", "Dropout"} | _CONSUMER_OPS


@dataclass
class _Slices:
    module: nn.Module
    per_channel: list[list[int]]  # channel (root index) -> indices along the pruned dimension


@dataclass
class ChannelGroup:
    root: nn.Module
    width: int
    producers: list[_Slices] = field(default_factory=list)  # conv/linear whose out-channels are the channel
    norms: list[_Slices] = field(default_factory=list)  # batch norms on the channel
    consumers: list[_Slices] = field(default_factory=list)  # conv/linear whose in-channels are the channel
    depthwise_slices: list[_Slices] = field(default_factory=list)  # depthwise convs on the channel, rows per channel
    others: list[nn.Module] = field(default_factory=list)  # layers with parameters on the channels, of no kind above
    ops: set[str] = field(default_factory=set)  # elementwise ops on the channel (grad_fn names)

    def refresh(self, graph) -> None:
        """Re-read the channel indices from ``graph`` after other groups were pruned: behind a
        concatenation, a group's channels move when an earlier input of it narrows."""
        fresh = channel_group(graph, self.root)
        self.producers, self.norms, self.consumers = fresh.producers, fresh.norms, fresh.consumers
        self.depthwise_slices, self.others, self.ops = fresh.depthwise_slices, fresh.others, fresh.ops

    @property
    def depthwise(self) -> list[nn.Module]:
        return [s.module for s in self.depthwise_slices]

    @property
    def merge_problem(self) -> str | None:
        """Why merging with compensation is not exact here, or None when it is well defined."""
        if len(self.producers) != 1 and not self.gated:
            return "its channels are a sum of several layers (a residual addition)"
        if any(isinstance(p.module, (nn.Conv1d, nn.Conv2d)) and p.module.groups > 1 for p in self.producers + self.consumers):
            return "a grouped convolution splits its channels"
        if any(isinstance(layer, nn.MultiheadAttention) for layer in self.others):
            return "attention heads split its channels"
        if not self.consumers:
            return "no layer consumes its channels"
        other = self.ops - _CHANNELWISE - ({"Mul"} if self.gated else set())  # the gate's product is per channel
        if other:
            return f"{', '.join(sorted(other))} acts across its channels"
        return None

    @property
    def gated(self) -> bool:
        """Several layers make each channel by a product (a squeeze-excitation gate), not a sum."""
        return len(self.producers) > 1 and "Mul" in self.ops and "Add" not in self.ops

    @property
    def positively_homogeneous(self) -> bool:
        """ReLU-like path: scaling a channel's incoming weights by c > 0 scales what consumers see by c."""
        return self.single_path and not (self.ops - _POSITIVELY_HOMOGENEOUS)

    @property
    def single_path(self) -> bool:
        """One layer makes each channel and nothing but batch norms and elementwise ops follow it."""
        return len(self.producers) == 1 and not self.depthwise

    def incoming(self) -> torch.Tensor:
        """(width, k): each channel's incoming weight-set with its bias, batch-norm folded in.

        Where a gate or a depthwise convolution also acts on the channel, it is every parameter on
        the channel side by side (producers, norms, depthwise filters): two channels are equal after
        all of them exactly when these are."""
        if not self.single_path:
            return self._every_parameter()
        producer = self.producers[0]
        weight = producer.module.weight.detach()
        bias = producer.module.bias.detach() if producer.module.bias is not None else torch.zeros(weight.shape[0])
        index = torch.tensor([idx[0] for idx in producer.per_channel])
        w = weight[index].reshape(self.width, -1).clone()
        b = bias[index].clone()
        for norm in self.norms:
            bn = norm.module
            n_index = torch.tensor([idx[0] for idx in norm.per_channel])
            scale = (bn.weight.detach()[n_index] if bn.affine else torch.ones(self.width)) / torch.sqrt(
                bn.running_var[n_index] + bn.eps
            )
            shift = bn.bias.detach()[n_index] if bn.affine else torch.zeros(self.width)
            w = w * scale[:, None]
            b = (b - bn.running_mean[n_index]) * scale + shift
        return torch.cat([w, b[:, None]], dim=1)

    def _every_parameter(self) -> torch.Tensor:
        parts = []
        for layer in self.producers + self.depthwise_slices:
            weight = layer.module.weight.detach()
            parts.append(torch.stack([weight[rows].reshape(-1) for rows in layer.per_channel]))
            if layer.module.bias is not None:
                bias = layer.module.bias.detach()
                parts.append(torch.stack([bias[rows].reshape(-1) for rows in layer.per_channel]))
        for norm in self.norms:
            bn, index = norm.module, torch.tensor([rows[0] for rows in norm.per_channel])
            stats = [bn.running_mean[index], bn.running_var[index]] + ([bn.weight.detach()[index], bn.bias.detach()[index]]
                                                                        if bn.affine else [])
            parts.append(torch.stack(stats, dim=1))
        return torch.cat(parts, dim=1)

    def outgoing(self) -> list[torch.Tensor]:
        """For each consumer, (width, m): the weights that read each channel, flattened."""
        result = []
        for consumer in self.consumers:
            weight = consumer.module.weight.detach()
            result.append(torch.stack([weight[:, idx].reshape(-1) for idx in consumer.per_channel]))
        return result

    @torch.no_grad()
    def fold_into(self, keep: int, drop: int, scale: float = 1.0, shift: float = 0.0) -> None:
        """Consumers read ``keep`` in place of ``drop``: a_keep += scale * a_drop, bias += shift * a_drop.

        ``shift`` compensates an affine relation h_drop = scale * h_keep + shift (NoiseOut); for a
        convolution the bias term sums the kernel, exact away from zero padding.
        """
        for consumer in self.consumers:
            weight = consumer.module.weight
            keep_idx, drop_idx = consumer.per_channel[keep], consumer.per_channel[drop]
            dropped = weight[:, drop_idx].clone()
            weight[:, keep_idx] += scale * dropped
            if shift:
                if consumer.module.bias is None:
                    consumer.module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype))
                consumer.module.bias += shift * dropped.reshape(weight.shape[0], -1).sum(dim=1)


def channel_group(graph, root: nn.Module) -> ChannelGroup:
    """The per-channel view of the group rooted at ``root`` (before any of it is pruned)."""
    width = graph.get_out_channels(root)
    group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs=list(range(width)))
    view = ChannelGroup(root=root, width=width)
    for item in group.items:
        dep, module = item.dep, item.dep.target.module
        per_channel: list[list[int]] = [[] for _ in range(width)]
        for index, root_index in zip(item.idxs, item.root_idxs):
            per_channel[int(root_index)].append(int(index))
        handler = getattr(dep.handler, "__name__", "")
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            is_depthwise = isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
            if is_depthwise:
                if not _has(view.depthwise_slices, module):
                    view.depthwise_slices.append(_Slices(module, per_channel))
                elif handler == "prune_out_channels":  # its rows are its outputs (a channel multiplier > 1 has several)
                    view.depthwise_slices[view.depthwise.index(module)] = _Slices(module, per_channel)
            elif handler == "prune_out_channels" and not _has(view.producers, module):
                view.producers.append(_Slices(module, per_channel))
            elif handler == "prune_in_channels" and not _has(view.consumers, module):
                view.consumers.append(_Slices(module, per_channel))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not _has(view.norms, module):
                view.norms.append(_Slices(module, per_channel))
        else:
            if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)) and module not in view.others:
                view.others.append(module)
            match = _GRAD_FN.search(str(dep.target.name))
            if match:
                view.ops.add(match.group(1))
            elif "Reshape" in str(dep.target.name) or "Flatten" in str(dep.target.name):
                view.ops.add("Reshape")
    return view


def _has(slices: list[_Slices], module: nn.Module) -> bool:
    return any(s.module is module for s in slices)
