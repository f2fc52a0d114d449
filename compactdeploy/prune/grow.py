"""Widening a group, function-preserving (Net2WiderNet, Chen et al. 2016): the seed research's
networks that grow to fit the hardware, for when a budget allows more than the starting model.

A new channel is a copy of an existing one: every producer's row, bias and batch-norm entry is
copied, a depthwise convolution between gets a copy of its filter, and every consumer reads the
copy with the original's weights split between the two. The split is random per consumer row
(shares summing to one) rather than Net2Net's equal halves: equal halves leave the copies with
identical gradients forever, so fine-tuning could never make them different features; unequal
shares give them different gradients while the function stays exactly the same.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CompactDeployError
from .groups import ChannelGroup, _Slices

SHARE_SPREAD = 0.5  # shares are drawn from [1 - spread, 1 + spread], then normalised


def growth_problem(view: ChannelGroup) -> str | None:
    """Why this group cannot be widened exactly, or None."""
    if not view.producers:
        return "no layer produces its channels"
    for slices in view.producers + view.consumers:
        layer = slices.module
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups > 1:
            return f"it feeds a grouped convolution ({layer.groups} groups)"
    if view.others:
        return f"{type(view.others[0]).__name__} layers on its channels cannot be widened yet"
    return None


def sources_for(view: ChannelGroup, count: int) -> list[int]:
    """The channels to copy: the strongest first (sum of |w| over every producer's row), round-robin
    when more copies than channels are asked for; strong features are the ones worth splitting."""
    strength = torch.zeros(view.width)
    for producer in view.producers:
        weight = producer.module.weight.detach()
        for channel, rows in enumerate(producer.per_channel):
            strength[channel] += weight[rows].abs().sum()
    order = torch.argsort(strength, descending=True, stable=True).tolist()
    return [order[i % len(order)] for i in range(count)]


@torch.no_grad()
def widen(view: ChannelGroup, sources: list[int], seed: int = 0) -> None:
    """Append one copy of channel ``s`` for each ``s`` in ``sources``, in place; the model computes
    the same function after. The view is spent afterwards (its indices describe the old widths)."""
    problem = growth_problem(view)
    if problem is not None:
        raise CompactDeployError(f"cannot widen the group of {_name(view.root)}: {problem}")
    if not sources:
        return
    generator = torch.Generator().manual_seed(seed)
    for producer in view.producers:
        layer = producer.module
        layer.weight = nn.Parameter(_appended(layer.weight, 0, producer.per_channel, sources))
        if layer.bias is not None:
            layer.bias = nn.Parameter(_appended(layer.bias, 0, producer.per_channel, sources))
        _set_width(layer, out=layer.weight.shape[0])
    for norm in view.norms:
        bn = norm.module
        for name in ("weight", "bias"):
            if getattr(bn, name) is not None:
                setattr(bn, name, nn.Parameter(_appended(getattr(bn, name), 0, norm.per_channel, sources)))
        for name in ("running_mean", "running_var"):
            if getattr(bn, name) is not None:
                setattr(bn, name, _appended(getattr(bn, name), 0, norm.per_channel, sources))
        bn.num_features = bn.running_mean.shape[0] if bn.running_mean is not None else bn.weight.shape[0]
    for depthwise in view.depthwise_slices:
        layer = depthwise.module
        layer.weight = nn.Parameter(_appended(layer.weight, 0, depthwise.per_channel, sources))
        if layer.bias is not None:
            layer.bias = nn.Parameter(_appended(layer.bias, 0, depthwise.per_channel, sources))
        layer.in_channels += len(sources)
        layer.groups += len(sources)
        layer.out_channels = layer.weight.shape[0]
    for consumer in view.consumers:
        layer = consumer.module
        layer.weight = nn.Parameter(_split(layer.weight, consumer, sources, generator))
        _set_width(layer, inp=layer.weight.shape[1])
    view.width += len(sources)


def _appended(tensor: torch.Tensor, dim: int, per_channel: list[list[int]], sources: list[int]) -> torch.Tensor:
    """``tensor`` with the slices of ``sources`` inserted right after the group's block along ``dim``
    (its end for a plain layer; behind a flatten, a channel's block of positions; inside a concat,
    where the producer's new channels land)."""
    end = max(i for indices in per_channel for i in indices) + 1
    copies = tensor.index_select(dim, torch.tensor([i for s in sources for i in per_channel[s]], device=tensor.device))
    return torch.cat([tensor.narrow(dim, 0, end), copies, tensor.narrow(dim, end, tensor.shape[dim] - end)], dim=dim).contiguous()


def _split(weight: torch.Tensor, consumer: _Slices, sources: list[int], generator: torch.Generator) -> torch.Tensor:
    """The consumer's weight with columns for the copies; each channel's columns shared among its copies."""
    grown = _appended(weight, 1, consumer.per_channel, sources)
    end = max(i for indices in consumer.per_channel for i in indices) + 1
    block = len(consumer.per_channel[0])
    copies_of: dict[int, list[list[int]]] = {}
    for k, s in enumerate(sources):
        copies_of.setdefault(s, []).append(list(range(end + k * block, end + (k + 1) * block)))
    rows = weight.shape[0]
    for channel, copies in copies_of.items():
        columns = [consumer.per_channel[channel], *copies]
        shares = 1.0 + SHARE_SPREAD * (2 * torch.rand(len(columns), rows, generator=generator) - 1)
        shares = (shares / shares.sum(dim=0)).to(weight.dtype)
        original = weight[:, consumer.per_channel[channel]]
        view_shape = (rows,) + (1,) * (original.dim() - 1)
        for share, cols in zip(shares, columns):
            grown[:, cols] = original * share.view(view_shape)
    return grown


def _set_width(layer: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    if isinstance(layer, nn.Linear):
        layer.out_features = out if out is not None else layer.out_features
        layer.in_features = inp if inp is not None else layer.in_features
    else:
        layer.out_channels = out if out is not None else layer.out_channels
        layer.in_channels = inp if inp is not None else layer.in_channels


def _name(layer: nn.Module) -> str:
    return type(layer).__name__
