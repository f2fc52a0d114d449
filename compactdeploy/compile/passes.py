"""The compiler's passes: ONNX import, and the CPU lowering that tuning and builds share.

Tuning searches the fused kernels of ``lower_for_tuning``; a build lowers the same way and applies
the tuning database's schedules (``apply_database``), so every record found is one a build uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CompactDeployError, first_line
from ..targets import TargetSpec

# the layout every CPU build computes convolutions in (data, weights); see lower_for_tuning
CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "OHWI"]}
# the two files of a MetaSchedule JSON database (its own names)
WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"
# beside them in a tuning database's view: where each applied record came from, when not the search
SOURCES_FILE = "sources.json"


def import_onnx(onnx_path: str | Path, target: TargetSpec):
    """The ONNX file as a Relax module, weights embedded as constants."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    from .backends import backend_of

    backend_of(target)  # an unsupported kind fails before the import
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf decode errors and the like
        raise CompactDeployError(f"{onnx_path} is not a readable ONNX model: {exc}") from None
    try:
        _clip_as_max_min(model.graph)  # inside: a malformed Clip is the model's fault, reported as such
        mod = from_onnx(model, keep_params_in_input=False)
    except Exception as exc:  # TVM reports unsupported operators with several exception types
        raise CompactDeployError(f"TVM cannot import {onnx_path}: {first_line(exc)}") from None
    return _take_wrapping(_pairwise_max_min(mod))


def _take_wrapping(mod):
    """ONNX Gather imports as ``take(mode="fast")``, which TVM legalizes with a warning per call
    ("Fast mode segfaults when there are out-of-bounds indices"); "wrap" reads the same elements
    for every index ONNX allows (negative ones too) and cannot read out of bounds."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.take")(wildcard(), wildcard())

    def rewrite(call, _matches):
        if call.attrs.mode != "fast":
            return call
        axis = None if call.attrs.axis is None else int(call.attrs.axis)
        return relax.op.take(call.args[0], call.args[1], axis=axis, mode="wrap")

    for gv, function in list(mod.functions_items()):
        if isinstance(function, relax.Function):
            mod[gv] = rewrite_call(pattern, rewrite, function)
    return mod


def _clip_as_max_min(graph) -> None:
    """Rewrite every Clip (ReLU6 and the like) as Max then Min, in place.

    TVM's importer emits Clip as an opaque TE call, which the NHWC layout pass cannot see through:
    it would wrap every ReLU6 in a pair of transposes. Max and Min import as Relax operators, made
    layout-neutral by ``_pairwise_max_min``.
    """
    import numpy as np
    import onnx

    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {tensor.name for tensor in graph.initializer} | {value.name for value in graph.input}

    def unused(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    nodes = []
    for node in graph.node:
        if node.op_type != "Clip":
            nodes.append(node)
            continue
        bounds = list(node.input[1:3]) + [""] * (3 - len(node.input))  # opset >= 11: optional inputs
        for attribute in node.attribute:  # opset < 11: attributes
            name = unused(f"{node.output[0]}/clip_{attribute.name}")
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(attribute.f, dtype=np.float32), name))
            bounds[0 if attribute.name == "min" else 1] = name
        value = node.input[0]
        for op, bound in (("Max", bounds[0]), ("Min", bounds[1])):
            if bound:
                out = unused(f"{node.output[0]}/clip_{op.lower()}")
                nodes.append(onnx.helper.make_node(op, [value, bound], [out], name=out))
                value = out
        nodes.append(onnx.helper.make_node("Identity", [value], [node.output[0]], name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)


def _pairwise_max_min(mod):
    """Relax's ``maximum(a, b)`` for the importer's two-input Max, ``max(stack(broadcast a, b))``
    (and the same for Min): the layout pass carries the elementwise form, not the stacked one."""
    from tvm import relax
    from tvm.relax.dpl import is_op, is_tuple, rewrite_call, wildcard

    for reduce, elementwise in (("relax.max", relax.op.maximum), ("relax.min", relax.op.minimum)):
        a, b = wildcard(), wildcard()
        stacked = is_op("relax.stack")(is_tuple([is_op("relax.broadcast_to")(a, wildcard()),
                                                 is_op("relax.broadcast_to")(b, wildcard())]))
        pattern = is_op(reduce)(stacked)

        def rewrite(call, matches, a=a, b=b, stacked=stacked, elementwise=elementwise):
            over_stack_axis = [int(x) for x in call.attrs.axis or []] == [0] and int(matches[stacked].attrs.axis) == 0
            return elementwise(matches[a], matches[b]) if over_stack_axis and not call.attrs.keepdims else call

        for gv, function in list(mod.functions_items()):
            if isinstance(function, relax.Function):
                mod[gv] = rewrite_call(pattern, rewrite, function)
    return relax.transform.DeadCodeElimination()(mod)


def lower_for_tuning(mod, tvm_target, channels_last: bool = True):
    """Legalize and fuse: the kernels tuning searches are the fused ones the build then runs.

    ``channels_last=False`` keeps the model's NCHW convolutions (tools/tune_kernel.py compares them).
    """
    import tvm
    from tvm import relax

    with tvm_target:
        return tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                # folds the weight transposes and reshapes the ONNX importer leaves for run time
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                # lets a schedule choose the weights' memory layout (packed blocks for the vector
                # units); the repacking runs once, at compile time, in ``apply_database``
                relax.transform.AttachAttrLayoutFreeBuffers(),
            ]
        )(to_channels_last(mod) if channels_last else mod)


def to_channels_last(mod):
    """Convolutions in NHWC (``CONV_LAYOUT``), the layout carried through the operators between them.

    Channels innermost: MetaSchedule vectorizes over channels (multiples of 8 or 16) instead of the
    image width (7 or 14 late in a network), which tuned faster (docs/tuning.md). Where TVM's
    layout pass cannot handle a model (an operator it has no layout rule for), the model keeps its
    layout, with a warning: correct, slower.
    """
    import warnings

    from tvm import relax

    if not _has_convolution(mod):  # nothing to convert: no pass to run, and no warning to give
        return mod
    try:
        return relax.transform.ConvertLayout(CONV_LAYOUT)(mod)
    except Exception as exc:  # TVM raises InternalError and friends from inside the pass
        warnings.warn(f"convolutions stay NCHW (slower kernels): TVM's layout pass failed: {first_line(exc)}",
                      stacklevel=2)
        return mod


def _has_convolution(mod) -> bool:
    import tvm
    from tvm import relax

    found = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name.startswith("relax.nn.conv"):
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function) and not found:
            relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


TUNED = "tuned record"  # where a kernel's schedule came from: a record of the tuning database
UNSCHEDULED = "unscheduled"  # none: the kernel compiles as TVM legalized it (correct, slow)
# a record whose schedule was tuned for the same operator at another width ("transferred from <kernel>")
TRANSFERRED = "transferred from"
TRANSFERRED_ORIGIN = "transferred"  # such a record's ``source`` in the tuning database's origins


def apply_database(lowered, tvm_target, schedules: Path | None) -> tuple[Any, dict[str, str], dict[str, str]]:
    """Replace every kernel that ``schedules`` (a MetaSchedule JSON database directory: a tuning
    database's ``best_view``) has a record for by that schedule.

    Returns the module, where each kernel's schedule came from (kernel -> ``TUNED``,
    ``TRANSFERRED`` + the donor kernel, ``rules.DEFAULT_RULE`` for a default-rule record that was
    timed fastest, or ``UNSCHEDULED``), and why, where the view says (kernel -> reason). The weights
    the records repack are repacked by ``rules.finish_weight_layouts``.
    """
    import tvm.s_tir.meta_schedule as ms
    import tvm_ffi
    from tvm import relax

    from .rules import DEFAULT_RULE

    tasks = extract_kernels(lowered, tvm_target)
    sources = {task.task_name: UNSCHEDULED for task in tasks}
    notes: dict[str, str] = {}
    if schedules is None:
        return lowered, sources, notes
    db = ms.database.JSONDatabase(str(schedules / WORKLOADS_FILE), str(schedules / RECORDS_FILE), allow_missing=False)
    origins = json.loads((schedules / SOURCES_FILE).read_text()) if (schedules / SOURCES_FILE).exists() else {}
    for task in tasks:
        if not db.has_workload(task.dispatched[0]):
            continue
        origin = origins.get(str(tvm_ffi.structural_hash(task.dispatched[0])))
        if origin is None:
            sources[task.task_name] = TUNED
        elif origin["source"] == TRANSFERRED_ORIGIN:
            sources[task.task_name] = f"{TRANSFERRED} {origin['from']}"
        else:
            sources[task.task_name] = DEFAULT_RULE
        if origin is not None and origin.get("why"):
            notes[task.task_name] = origin["why"]
    if all(source == UNSCHEDULED for source in sources.values()):
        return lowered, sources, notes
    with tvm_target, db:
        lowered = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(lowered)
    # a record with an empty trace (the kernel measured fastest unscheduled) leaves the kernel as it
    # was: marked scheduled all the same, so that no default rule replaces what was measured faster
    for gv, func in list(lowered.functions_items()):
        if sources.get(gv.name_hint, UNSCHEDULED) != UNSCHEDULED and not (func.attrs or {}).get("tirx.is_scheduled", False):
            lowered[gv] = func.with_attr("tirx.is_scheduled", True)
    return lowered, sources, notes


def extract_kernels(lowered, tvm_target) -> list:
    import tvm.s_tir.meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(lowered, tvm_target))
