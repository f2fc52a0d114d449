"""Structured pruning over torch-pruning's dependency graph.

torch-pruning finds the groups of coupled layers (a residual add, a depthwise conv and a concat tie
channels together); this module decides how many channels each group keeps (a ratio rounded to the
target's ``channel_multiple``, or a width per layer), lets a method from ``methods`` choose which
(and compensate for them), removes them, and records the removals as a plan that can be replayed
on a fresh copy of the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CompactDeployError, first_line
from .groups import channel_group
from .grow import growth_problem, sources_for, widen
from .blocks import blocks_of, describe, head_dims, keep_attention_scale, select_in_blocks
from .methods import AUTO, METHODS, Calibration
from .trace import dependency_graph, fixed_reason


@dataclass(frozen=True)
class PruneSpec:
    method: str
    ratio: float | None  # fraction of each group's channels to remove, before rounding; None: --widths only
    auto: bool = False  # data-free:auto: the method picks each group's width

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "ratio": "auto" if self.auto else self.ratio}


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
    # group root layer name -> channel indices removed from it
    plan: dict[str, list[int]]
    # group root layer name -> what decided it ({"method", "before", "after"}), for the report
    groups: dict[str, dict[str, Any]]
    # group root layer name -> the channels copied to widen it (--allow-grow), applied after ``plan``
    grown: dict[str, list[int]] = field(default_factory=dict)
    # group root layer name -> why the model fixes its width (a channel shuffle, the model's input, a reshape of its own)
    fixed: dict[str, str] = field(default_factory=dict)


def parse_prune_spec(text: str, widths_given: bool = False) -> PruneSpec:
    """``"l1:0.5"`` -> PruneSpec("l1", 0.5); ``"data-free:auto"``; ``"taylor"`` alone with --widths."""
    method, sep, ratio_text = text.partition(":")
    if method not in METHODS:
        raise CompactDeployError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    if not sep:
        if widths_given:
            return PruneSpec(method, None)
        raise CompactDeployError(f"--prune {text!r} needs a ratio: METHOD:RATIO, e.g. {method}:0.5 (or give --widths)")
    if ratio_text == "auto":
        if method != "data-free":
            raise CompactDeployError("only data-free has an automatic stopping rule: data-free:auto")
        return PruneSpec(method, None, auto=True)
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise CompactDeployError(f"prune ratio {ratio_text!r} is not a number") from None
    if not 0.0 < ratio < 1.0:
        raise CompactDeployError(f"prune ratio {ratio} must be between 0 and 1 (exclusive), e.g. {method}:0.5")
    return PruneSpec(method, ratio)


def parse_widths(text: str | None) -> dict[str, int]:
    """``"conv1=8,fc1=60"`` -> {"conv1": 8, "fc1": 60}."""
    widths: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.strip().partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise CompactDeployError(f"--widths item {item!r} is not LAYER=WIDTH (e.g. 7=60)")
        widths[name.strip()] = int(value)
    return widths


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


def call_order(module, example_input, types: tuple | None = None) -> list:
    """The leaf modules (or those of ``types``) in the order one forward pass calls them, repeats kept."""
    import torch

    order: list = []
    hooks = [
        layer.register_forward_hook(lambda m, *_: order.append(m))
        for layer in module.modules()
        if (isinstance(layer, types) if types else not list(layer.children()))
    ]
    try:
        with torch.no_grad():
            module(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def output_layers(module, example_input) -> list:
    """The last conv/linear layer to run: its outputs are the model's, so its width is fixed."""
    return call_order(module, example_input, _prunable_types())[-1:]


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
    names = dict(module.named_modules())
    missing = [n for n in excluded_names if n not in names]
    if missing:
        raise CompactDeployError(
            f"no layer named {missing[0]!r} to exclude; layers are {', '.join(layer_widths(module))}"
        )
    graph, opaque = dependency_graph(module, example_input)
    ignored = output_layers(module, example_input) + [names[n] for n in excluded_names]
    return graph, opaque, ignored, {m: n for n, m in names.items()}


def prunable_groups(module, example_input, exclude: tuple[str, ...] = (), fixed: dict[str, str] | None = None):
    """torch-pruning's graph, module -> name, and every prunable group: its root layer and channel view.
    ``fixed``, if given, receives the groups left out because the model fixes their width (``trace``;
    and where a reshape and a transpose act on some group's channels, each group is first narrowed
    alone on a copy, and those after which the model no longer runs are left out)."""
    graph, opaque, ignored, name_of = _graph(module, example_input, exclude)
    groups = graph.get_all_groups(ignored_layers=ignored, root_module_types=list(_prunable_types()))
    fixed = {} if fixed is None else fixed
    roots = []
    for group in groups:
        root = group[0].dep.target.module
        reason = fixed_reason(group, opaque)
        if reason is None:
            roots.append(root)
        else:
            fixed[name_of[root]] = reason
    views = [channel_group(graph, root) for root in roots]
    if any(_reshapes_with_a_transpose(view) for view in views):
        breaking = _groups_that_break_the_forward(module, example_input, exclude, [name_of[r] for r in roots])
        fixed.update(breaking)
        kept = [(root, view) for root, view in zip(roots, views) if name_of[root] not in breaking]
        roots, views = [root for root, _ in kept], [view for _, view in kept]
    return graph, name_of, roots, views


BREAKS_THE_FORWARD = "narrowed alone, it breaks the model's forward (the model's code reshapes its channels by sizes of its own)"


def _reshapes_with_a_transpose(view) -> bool:
    """What splitting channels into heads in a model's own code traces to (``qkv.reshape(...).permute(...)``)."""
    return bool(view.ops & {"View", "Reshape"} and view.ops & {"Transpose", "Permute"})


def _groups_that_break_the_forward(module, example_input, exclude, names: list[str]) -> dict[str, str]:
    """Each group of ``names`` narrowed alone by the fewest channels it can lose (one per head or
    convolution group), on a copy of the model: those after which the copy no longer runs."""
    import copy

    import torch

    broken: dict[str, str] = {}
    for name in names:
        trial = copy.deepcopy(module)
        graph, _, _, name_of = _graph(trial, example_input, exclude)
        root = dict(trial.named_modules())[name]  # the same layer roots the same group in the copy
        view = channel_group(graph, root)
        try:
            blocks = blocks_of(view, name, name_of)
        except CompactDeployError:
            continue  # refused when it is narrowed, with its own message
        remove = [b * (view.width // blocks.count) for b in range(blocks.count)] if blocks else [0]
        if len(remove) >= view.width:
            continue
        try:
            _remove_channels(graph, root, remove)
            with torch.no_grad():
                trial(example_input)
        except Exception:  # shapes no longer agree, whatever the construct
            broken[name] = BREAKS_THE_FORWARD
    return broken


def prune(
    module,
    example_input,
    spec: PruneSpec,
    channel_multiple: int = 1,
    exclude: tuple[str, ...] = (),
    widths: dict[str, int] | None = None,
    calibration: Calibration | None = None,
    allow_grow: bool = False,
    seed: int = 0,
) -> PruneResult:
    """Prune every prunable group of ``module`` in place, by ``spec`` and the per-layer ``widths``;
    with ``allow_grow``, a width above a group's own widens it, function-preserving (``grow``)."""
    method = METHODS[spec.method](seed=seed)
    if method.needs_data and calibration is None:
        raise CompactDeployError(f"pruning method {spec.method} needs data: pass --data (a dataset or a .npz)")
    widths = dict(widths or {})
    module.eval()
    widths_before = layer_widths(module)
    macs_before, params_before = count_macs_params(module, example_input)
    fixed: dict[str, str] = {}
    graph, name_of, roots, views = prunable_groups(module, example_input, exclude, fixed)
    _check_widths(widths, roots, views, name_of, widths_before, allow_grow, fixed)
    method.prepare(module, views, calibration)
    plan: dict[str, list[int]] = {}
    groups: dict[str, dict[str, Any]] = {}
    growing, narrowing = [], []
    for root, view in zip(roots, views):
        name = name_of[root]
        if name in widths and widths[name] > view.width:
            growing.append((name, view))
            continue
        if name in widths:
            n_remove = view.width - widths[name]
        elif spec.auto:
            n_remove = AUTO
        elif spec.ratio is not None:
            n_remove = view.width - kept_width(view.width, spec.ratio, channel_multiple)
        else:
            continue
        if n_remove != 0:
            narrowing.append((root, view, name, n_remove))
    for root, view, name, n_remove in narrowing:
        try:
            view.refresh(graph)  # the same view (what prepare() saw), its indices as they are now
            blocks = blocks_of(view, name, name_of)
            if blocks is not None:
                selection = select_in_blocks(method, view, n_remove, blocks, name, requested=name in widths)
            else:
                selection = method.select(view, n_remove, channel_multiple)
            dims_before = head_dims(blocks)
            if selection.remove:
                _remove_channels(graph, root, selection.remove)
                if dims_before:
                    keep_attention_scale(blocks, dims_before)
        except CompactDeployError:
            raise
        except Exception as exc:  # a construct the channel views do not model: say where, and the way out
            raise CompactDeployError(
                f"prune: narrowing layer {name!r} by {spec.method} failed ({type(exc).__name__}: {first_line(exc)}); "
                f"something on its channels is not supported yet: "
                f"pass --exclude {name}"
            ) from exc
        groups[name] = {"method": selection.method, "before": view.width, "after": view.width - len(selection.remove)}
        if blocks is not None:
            groups[name]["attention" if blocks.kind == "heads" else "grouped"] = describe(
                blocks, len(selection.remove), name_of)
        if selection.remove:
            plan[name] = selection.remove
    grown: dict[str, list[int]] = {}
    for name, view in growing:
        before = view.width
        grown[name] = sources_for(view, widths[name] - before)
        widen(view, grown[name], seed)
        groups[name] = {"method": "net2wider", "before": before, "after": view.width}
    try:
        macs_after, params_after = count_macs_params(module, example_input)
    except RuntimeError as exc:  # shapes no longer agree: a reshape with sizes of its own split the channels
        raise CompactDeployError(
            f"prune: the narrowed model no longer runs ({first_line(exc)[:160]}); a reshape in the model's own "
            f"code that splits channels into heads or groups (a hand-written attention's qkv.reshape) is the usual cause"
            + (f": pass --exclude for the layers whose channels it reshapes ({', '.join(sorted(suspects))})"
               if (suspects := _reshaped_groups(narrowing)) else ": exclude the layers before it (--exclude LAYER)")
        ) from exc
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
        groups=groups,
        grown=grown,
        fixed=fixed,
    )


def _reshaped_groups(narrowing) -> list[str]:
    """Narrowed groups whose channels pass a reshape with a transpose (what splitting into heads traces to)."""
    return [name for _, view, name, _ in narrowing if _reshapes_with_a_transpose(view)]


def _check_widths(widths, roots, views, name_of, all_widths, allow_grow: bool = False,
                  fixed: dict[str, str] | None = None) -> None:
    root_names = {name_of[root]: view for root, view in zip(roots, views)}
    for name, width in widths.items():
        if name not in all_widths:
            raise CompactDeployError(f"--widths names layer {name!r}, which the model does not have; layers: {', '.join(all_widths)}")
        if name in (fixed or {}):
            raise CompactDeployError(f"layer {name!r} cannot be given a width: {fixed[name]}")
        if name not in root_names:
            owner = next(
                (root for root, view in root_names.items()
                 if any(name_of.get(m) == name for m in [p.module for p in view.producers] + view.depthwise)),
                None,
            )
            hint = f": its width follows layer {owner}" if owner else " (it is the output layer, or excluded)"
            raise CompactDeployError(f"layer {name!r} cannot be given a width{hint}")
        if width < 1:
            raise CompactDeployError(f"--widths {name}={width} would remove every channel of {name}; keep at least 1")
        if width > root_names[name].width:
            if not allow_grow:
                raise CompactDeployError(
                    f"--widths {name}={width} is wider than {name} ({root_names[name].width}): "
                    "add --allow-grow to widen it (function-preserving), or give at most its width"
                )
            problem = growth_problem(root_names[name])
            if problem is not None:
                raise CompactDeployError(f"--widths {name}={width} would widen {name}, but it cannot grow: {problem}")


def _remove_channels(graph, root, indices: list[int]) -> None:
    group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs=indices)
    if not graph.check_pruning_group(group):
        raise CompactDeployError(f"removing {len(indices)} channels from {root} would leave a layer empty")
    group.prune()


def replay(module, example_input, plan: dict[str, list[int]], grown: dict[str, list[int]] | None = None) -> None:
    """Apply a recorded plan (removals, then the copies that widened groups) to a fresh copy of the
    model it was made on, in place. The copies' weights do not matter: the checkpoint's replace them."""
    names = dict(module.named_modules())
    graph, _ = dependency_graph(module, example_input)
    growing = []
    for name, sources in (grown or {}).items():
        if name not in names:
            raise CompactDeployError(f"pruning plan widens layer {name!r}, which this model does not have")
        view = channel_group(graph, names[name])  # before the removals, as prune() saw it
        if sources and max(sources) >= view.width:
            raise CompactDeployError(f"pruning plan copies channel {max(sources)} of {name}, which has {view.width}")
        growing.append((view, sources))
    for name, indices in plan.items():
        if name not in names:
            raise CompactDeployError(f"pruning plan names layer {name!r}, which this model does not have")
        width = graph.get_out_channels(names[name])
        if indices and (max(indices) >= width or len(indices) >= width):
            raise CompactDeployError(f"pruning plan removes {len(indices)} of {width} channels of {name}")
        _remove_channels(graph, names[name], indices)
    for view, sources in growing:
        widen(view, sources)

