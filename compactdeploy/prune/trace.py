"""torch-pruning's dependency graph, and the groups whose width the model fixes.

Two things in real models make a group's width not ours to change, and torch-pruning 1.6 says
neither:

- a channel shuffle (ShuffleNet: reshape to ``(n, g, c/g, ...)``, swap those two axes, reshape
  back) permutes channels across the blocks it interleaves, so narrowing one side of it breaks the
  other; torch-pruning maps no indices through it, and on ShuffleNetV2 its reshape mapping divides
  by zero while the graph is built. The shuffle is recognised here, the mapping left alone, and every
  group whose channels pass it keeps its width (the branches' interiors still narrow);
- a residual stream that is the model's input (``x + f(x)`` on the input itself): the input's width
  is the caller's.

A reshape torch-pruning cannot map at all (its shape inference divides by zero) fixes its groups too.
"""

from __future__ import annotations

SHUFFLE = "its channels pass a channel shuffle (reshape, transpose, reshape), which keeps every width it interleaves"
UNMAPPED = "torch-pruning cannot map its channels through a reshape"
MODEL_INPUT = "its channels are added to the model's input (or a buffer), whose width is fixed"

_ADDING = ("AddBackward", "SubBackward")
_SKIPPED = ("CloneBackward", "ContiguousBackward")  # .contiguous() between the transpose and the reshape


def dependency_graph(module, example_input):
    """torch-pruning's graph of ``module``, and the reshape nodes it maps no channels through
    (node -> why), which ``fixed_reason`` turns into the groups that keep their width."""
    import torch_pruning as tp

    from ..errors import CompactDeployError, first_line

    _wrap_reshape_mapping()
    try:
        graph = tp.DependencyGraph().build_dependency(module, example_inputs=example_input)
    except Exception as exc:  # an operation its tracer does not know: nothing can be narrowed without the graph
        raise CompactDeployError(
            f"prune: torch-pruning cannot trace this model's channels ({type(exc).__name__}: {first_line(exc)[:160]}); "
            "it follows autograd back from the model's outputs, which must be tensors (or tuples, lists or dicts of "
            "them); build without --prune otherwise"
        ) from exc
    return graph, graph.__dict__.setdefault(_OPAQUE, {})


def fixed_reason(group, opaque: dict) -> str | None:
    """Why the channels of ``group`` (torch-pruning's) cannot be narrowed, or None where they can."""
    for item in group:
        for node in (item.dep.source, item.dep.target):
            if node in opaque:
                return opaque[node]
            grad_fn = getattr(node, "grad_fn", None)
            # an operand no layer makes has no history: torch-pruning's graph shows it as a missing input
            if (grad_fn is not None and grad_fn.name().startswith(_ADDING)
                    and any(fn is None for fn, _ in grad_fn.next_functions)):
                return MODEL_INPUT
    return None


_OPAQUE = "_compactdeploy_opaque_reshapes"


def _wrap_reshape_mapping() -> None:
    """Have torch-pruning leave a shuffle's reshapes unmapped, and record them and the reshapes it
    cannot map on the graph. It maps every reshape again each time it forms a group, so the wrapper
    stays for the process (a graph built elsewhere only gains the two cases that raised or mis-mapped)."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    if getattr(original, "_compactdeploy", False):
        return

    def update(graph, node) -> None:
        opaque = graph.__dict__.setdefault(_OPAQUE, {})
        if node in opaque:
            return
        if _splits_channels_for_a_shuffle(node) or _merges_a_shuffle(node):
            opaque[node] = SHUFFLE
            return
        try:
            original(graph, node)
        except ZeroDivisionError:  # its shape inference counted 0 channels on one side
            opaque[node] = UNMAPPED

    update._compactdeploy = True
    index_mapping.update_reshape_index_mapping = update


def _sizes(grad_fn) -> tuple[int, ...] | None:
    """The input's shape a reshape saved (its name changed across torch versions)."""
    for name in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        sizes = getattr(grad_fn, name, None)
        if sizes is not None:
            return tuple(int(s) for s in sizes)
    return None


def _swaps_axes_1_and_2(grad_fn) -> bool:
    name = grad_fn.name()
    if name.startswith("TransposeBackward"):
        return {int(grad_fn._saved_dim0), int(grad_fn._saved_dim1)} == {1, 2}
    if name.startswith("PermuteBackward"):
        dims = [int(d) for d in grad_fn._saved_dims]
        return dims[:3] == [0, 2, 1] and dims[3:] == list(range(3, len(dims)))
    return False


def _next(nodes, skip=_SKIPPED):
    """Follow single-node chains past clones."""
    for node in nodes:
        while node.grad_fn is not None and node.grad_fn.name().startswith(skip) and len(node.outputs) == 1:
            node = node.outputs[0]
        yield node


def _previous(nodes, skip=_SKIPPED):
    for node in nodes:
        while node.grad_fn is not None and node.grad_fn.name().startswith(skip) and len(node.inputs) == 1:
            node = node.inputs[0]
        yield node


def _splits_channels_for_a_shuffle(node) -> bool:
    """(n, c, ...) -> (n, g, c/g, ...), then axes 1 and 2 swapped, then back to (n, c, ...)."""
    sizes = _sizes(node.grad_fn) if node.grad_fn is not None else None
    if not sizes or len(sizes) < 3:
        return False
    for swap in _next(node.outputs):
        if swap.grad_fn is None or not _swaps_axes_1_and_2(swap.grad_fn):
            continue
        for merge in _next(swap.outputs):
            split = _sizes(merge.grad_fn) if merge.grad_fn is not None else None
            if split and len(split) == len(sizes) + 1 and split[1] * split[2] == sizes[1]:
                return True
    return False


def _merges_a_shuffle(node) -> bool:
    if node.grad_fn is None or not node.grad_fn.name().lower().startswith(("view", "reshape", "unsafeview")):
        return False
    for swap in _previous(node.inputs):
        if swap.grad_fn is not None and _swaps_axes_1_and_2(swap.grad_fn):
            if any(_splits_channels_for_a_shuffle(split) for split in _previous(swap.inputs)):
                return True
    return False
