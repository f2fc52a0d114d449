"""Structured pruning over torch-pruning's dependency graph.

torch-pruning finds the groups of coupled layers (a residual add, a depthwise conv and a concat tie
channels together); this module decides how many channels each group keeps (rounded to the target's
``channel_multiple``), which ones (a criterion from ``importance``), and records the removals as a
plan that can be replayed on a fresh copy of the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import CompactDeployError
from .importance import CRITERIA


@dataclass(frozen=True)
class PruneSpec:
    method: str
    ratio: float  # fraction of each group's channels to remove, before rounding

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "ratio": self.ratio}


@dataclass(frozen=True)
class PruneResult:
    spec: PruneSpec
    channel_multiple: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    # group root layer name -> channel indices removed from it, in the order they were removed
    plan: dict[str, list[int]]


def parse_prune_spec(text: str) -> PruneSpec:
    """``"l1:0.5"`` -> PruneSpec("l1", 0.5)."""
    method, sep, ratio_text = text.partition(":")
    if method not in CRITERIA:
        raise CompactDeployError(f"unknown pruning method {method!r}: choose one of {', '.join(CRITERIA)}")
    if not sep:
        raise CompactDeployError(f"--prune {text!r} needs a ratio: METHOD:RATIO, e.g. {method}:0.5")
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise CompactDeployError(f"prune ratio {ratio_text!r} is not a number") from None
    if not 0.0 < ratio < 1.0:
        raise CompactDeployError(f"prune ratio {ratio} must be between 0 and 1 (exclusive), e.g. {method}:0.5")
    return PruneSpec(method, ratio)


def _prunable_types():
    from torch import nn

    return (nn.Conv2d, nn.Conv1d, nn.Linear)


def layer_widths(module) -> dict[str, int]:
    """Output width (channels or neurons) of every conv and linear layer, by module name."""
    widths = {}
    for name, layer in module.named_modules():
        if isinstance(layer, _prunable_types()):
            widths[name] = int(getattr(layer, "out_channels", None) or layer.out_features)
    return widths


def output_layers(module, example_input) -> list:
    """The last conv/linear layer to run: its outputs are the model's, so its width is fixed."""
    import torch

    order: list = []
    hooks = [
        layer.register_forward_hook(lambda m, *_: order.append(m))
        for layer in module.modules()
        if isinstance(layer, _prunable_types())
    ]
    try:
        with torch.no_grad():
            module(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1:]


def kept_width(width: int, ratio: float, multiple: int) -> int:
    """Channels to keep: width*(1-ratio) rounded to a multiple, at least one multiple, at most width."""
    if width <= multiple:
        return width
    keep = int(round(width * (1.0 - ratio) / multiple)) * multiple
    return min(width, max(multiple, keep))


def count_macs_params(module, example_input) -> tuple[int, int]:
    """Multiply-accumulates for one forward pass of ``example_input``, and the parameter count."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example_input)
    return int(macs), int(params)


def _graph(module, example_input, excluded_names: tuple[str, ...]):
    import torch_pruning as tp

    names = dict(module.named_modules())
    missing = [n for n in excluded_names if n not in names]
    if missing:
        raise CompactDeployError(
            f"no layer named {missing[0]!r} to exclude; layers are {', '.join(layer_widths(module))}"
        )
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example_input)
    ignored = output_layers(module, example_input) + [names[n] for n in excluded_names]
    return graph, ignored, {m: n for n, m in names.items()}


def prune(
    module,
    example_input,
    spec: PruneSpec,
    channel_multiple: int = 1,
    exclude: tuple[str, ...] = (),
) -> PruneResult:
    """Remove ``spec.ratio`` of the channels of every prunable group of ``module``, in place."""
    import torch

    criterion = CRITERIA[spec.method]
    if criterion.needs_data:
        raise CompactDeployError(f"pruning method {spec.method} needs data: pass --data")
    importance = criterion.make()
    module.eval()
    widths_before = layer_widths(module)
    macs_before, params_before = count_macs_params(module, example_input)
    graph, ignored, name_of = _graph(module, example_input, exclude)
    plan: dict[str, list[int]] = {}
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(_prunable_types())):
        root = group[0].dep.target.module
        width = graph.get_out_channels(root)
        keep = kept_width(width, spec.ratio, channel_multiple)
        if keep >= width:
            continue
        scores = importance(group)
        if scores is None:  # torch-pruning returns None for groups it cannot score
            continue
        remove = sorted(torch.argsort(scores)[: width - keep].tolist())
        _remove_channels(graph, root, remove)
        plan[name_of[root]] = remove
    macs_after, params_after = count_macs_params(module, example_input)
    return PruneResult(
        spec=spec,
        channel_multiple=channel_multiple,
        widths_before=widths_before,
        widths_after=layer_widths(module),
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        plan=plan,
    )


def _remove_channels(graph, root, indices: list[int]) -> None:
    group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs=indices)
    if not graph.check_pruning_group(group):
        raise CompactDeployError(f"removing {len(indices)} channels from {root} would leave a layer empty")
    group.prune()


def replay(module, example_input, plan: dict[str, list[int]]) -> None:
    """Apply a recorded plan to a fresh copy of the model it was made on, in place."""
    import torch_pruning as tp

    names = dict(module.named_modules())
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example_input)
    for name, indices in plan.items():
        if name not in names:
            raise CompactDeployError(f"pruning plan names layer {name!r}, which this model does not have")
        width = graph.get_out_channels(names[name])
        if indices and (max(indices) >= width or len(indices) >= width):
            raise CompactDeployError(f"pruning plan removes {len(indices)} of {width} channels of {name}")
        _remove_channels(graph, names[name], indices)


def ratio_summary(result: PruneResult) -> dict[str, Any]:
    """Fractions kept, for the human summary."""
    def frac(after: int, before: int) -> float:
        return after / before if before else math.nan

    return {
        "params_kept": frac(result.params_after, result.params_before),
        "macs_kept": frac(result.macs_after, result.macs_before),
    }
