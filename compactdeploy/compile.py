"""Compile stage: ONNX -> TVM Relax -> a shared library for the target, cross-linked where needed."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cuda import binary_codegen
from .errors import CompactDeployError, first_line
from .resources import cache_dir
from .targets import TargetSpec
from .tune import TuningDatabase

LIB_NAME = "model.so"
KERNELS_NAME = "kernels.json"


@dataclass(frozen=True)
class Linker:
    """How ``export_library`` links: the host's compiler (``command`` None) or a cross compiler."""

    description: str
    command: str | None

    def fcompile(self):
        if self.command is None:
            return None
        from tvm.support import cc

        return cc.cross_compiler(self.command)


@dataclass(frozen=True)
class CompileResult:
    lib_path: Path
    target: str
    tvm_target: dict[str, Any]
    arch: str
    workspace_bytes: int  # the storage TVM's static memory planner allocates for intermediates
    kernels_path: Path  # the kernels main calls, with argument shapes: for per-layer profiles
    device_code: str  # "cpu", or for CUDA: "cuda-sm_87-fatbin" (machine code) or "cuda-source"
    linker: str
    compile_s: float
    kernels_scheduled: int  # kernels that got a schedule from the tuning database
    kernels_tunable: int  # kernels a tuning database could schedule (0: DLight schedules them all)
    notes: list[str] = field(default_factory=list)


def resolve_linker(target: TargetSpec) -> Linker:
    """Find the linker before any work starts, so a missing toolchain fails fast with a fix."""
    if target.cross_compiler is None:
        for compiler in ("g++", "c++", "clang++"):
            if shutil.which(compiler):
                return Linker(f"host {compiler}", None)
        raise CompactDeployError(
            "no C++ compiler to link the library: install one (apt-get install g++)"
        )
    if shutil.which(target.cross_compiler):
        return Linker(target.cross_compiler, target.cross_compiler)
    triple = target.cross_compiler.removesuffix("-gcc").removesuffix("-g++")
    if _has_ziglang():
        return Linker(f"zig cc -target {triple}", str(_zig_wrapper(triple)))
    package = target.cross_compiler.removesuffix("-gcc").replace("_", "-")
    raise CompactDeployError(
        f"cross compiler {target.cross_compiler} not found: install it with "
        f"'apt-get install gcc-{package}' (or 'pip install ziglang'), then build again"
    )


def _has_ziglang() -> bool:
    import importlib.util

    return importlib.util.find_spec("ziglang") is not None


def _zig_wrapper(triple: str) -> Path:
    # TVM calls the linker as one command; zig needs "cc -target ...", so wrap it in a script.
    path = cache_dir("linkers") / f"zig-cc-{triple}"
    body = f'#!/bin/sh\nexec "{sys.executable}" -m ziglang cc -target {triple} "$@"\n'
    if not path.exists() or path.read_text() != body:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(body)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, path)
    return path


def _cpu_lower(mod, tvm_target, database):
    from tvm import relax

    from .tune import apply_database, lower_for_tuning

    # Fused kernels, each scheduled from the tuning database where it holds a record; the rest
    # compile unscheduled (correct but slow: see 'build --tune-trials').
    lowered, scheduled, tasks = apply_database(lower_for_tuning(mod, tvm_target), tvm_target, database)
    with tvm_target:
        return relax.get_pipeline("default")(lowered), scheduled, tasks


def _cuda_lower(mod, tvm_target, database):
    from tvm import relax

    # The CUDA pipeline schedules every kernel with DLight; unscheduled GPU kernels do not build.
    with tvm_target:
        return relax.get_default_pipeline(tvm_target)(mod), 0, 0


# One table for the per-kind differences; add a kind here, not an if-chain elsewhere.
PIPELINES: dict[str, Callable] = {"llvm": _cpu_lower, "cuda": _cuda_lower}


def builds_channels_last(target: TargetSpec) -> bool:
    """Whether ``target``'s pipeline computes convolutions in NHWC (the CPU one: ``tune.to_channels_last``)."""
    return PIPELINES.get(target.kind) is _cpu_lower


def import_onnx(onnx_path: str | Path, target: TargetSpec):
    """The ONNX file as a Relax module, weights embedded as constants."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    if target.kind not in PIPELINES:
        raise CompactDeployError(
            f"target {target.name}: TVM kind {target.kind!r} is not supported; use one of {', '.join(PIPELINES)}"
        )
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf decode errors and the like
        raise CompactDeployError(f"{onnx_path} is not a readable ONNX model: {exc}") from None
    try:
        _clip_as_max_min(model.graph)  # inside: a malformed Clip is the model's fault, reported as such
        mod = from_onnx(model, keep_params_in_input=False)
    except Exception as exc:  # TVM reports unsupported operators with several exception types
        raise CompactDeployError(f"TVM cannot import {onnx_path}: {first_line(exc)}") from None
    return _pairwise_max_min(mod)


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


def compile_onnx(
    onnx_path: str | Path, target: TargetSpec, out_dir: str | Path, linker: Linker, database: TuningDatabase | None = None
) -> CompileResult:
    """Compile an ONNX file for ``target``, with the schedules ``database`` holds; writes ``out_dir/model.so``."""
    start = time.perf_counter()
    return compile_module(import_onnx(onnx_path, target), target, out_dir, linker, database, start)


def compile_module(
    mod, target: TargetSpec, out_dir: str | Path, linker: Linker, database: TuningDatabase | None = None,
    start: float | None = None,
) -> CompileResult:
    """Compile a Relax module (every public function) for ``target``; writes ``out_dir/model.so``."""
    import tvm

    start = time.perf_counter() if start is None else start
    tvm_target = target.tvm_target()
    lowered, scheduled, tunable = PIPELINES[target.kind](mod, tvm_target, database)
    workspace = planned_storage_bytes(lowered)
    kernels = kernel_calls(lowered)
    device_code, notes = "cpu", []
    if target.kind == "cuda":
        # nvcc reads the arch from the current target, so the compile runs inside its scope
        with binary_codegen(str(tvm_target.attrs.get("arch", "sm_87"))) as cuda, tvm_target:
            executable = tvm.compile(lowered, target=tvm_target, relax_pipeline=None)
        if not any(m.kind == "cuda" for m in _walk_imports(executable.mod)):
            raise CompactDeployError(f"the build for {target.name} holds no CUDA module")
        device_code = f"cuda-{cuda.arch}-fatbin" if cuda.binary else "cuda-source"
        notes = list(cuda.notes)
        if target.arch == "aarch64":
            notes.append(
                "Unverified on a Jetson: the aarch64 TVM 0.27 wheel's CUDA runtime links libcudart.so.13 "
                "(CUDA 13), while JetPack 6 ships CUDA 12."
            )
    else:
        executable = tvm.compile(lowered, target=tvm_target, relax_pipeline=None)
    lib_path = Path(out_dir) / LIB_NAME
    executable.export_library(str(lib_path), fcompile=linker.fcompile())
    kernels_path = Path(out_dir) / KERNELS_NAME
    kernels_path.write_text(json.dumps(kernels) + "\n")
    return CompileResult(
        lib_path=lib_path,
        target=target.name,
        tvm_target=target.tvm_target_dict(),
        arch=target.arch,
        workspace_bytes=workspace,
        kernels_path=kernels_path,
        device_code=device_code,
        linker=linker.description,
        compile_s=time.perf_counter() - start,
        kernels_scheduled=scheduled,
        kernels_tunable=tunable,
        notes=notes,
    )


def planned_storage_bytes(lowered) -> int:
    """Bytes of every static ``R.vm.alloc_storage`` in the lowered ``main``: the planned workspace."""
    import numpy as np
    import tvm
    from tvm import relax

    alloc_storage = tvm.ir.Op.get("relax.vm.alloc_storage")
    total = 0

    def visit(expr) -> None:
        nonlocal total
        if isinstance(expr, relax.Call) and expr.op.same_as(alloc_storage) and isinstance(expr.args[0], relax.ShapeExpr):
            count = int(np.prod([int(v) for v in expr.args[0].values]))
            total += count * np.dtype(str(expr.args[2].value)).itemsize

    for function in _entry_functions(lowered):
        relax.analysis.post_order_visit(function, visit)
    return total


def kernel_calls(lowered) -> list[dict[str, Any]]:
    """Every compiled kernel that ``main`` calls, with its argument shapes and how often it runs.

    The device times each kernel alone with these shapes to build the per-layer profile (TVM 0.27
    has no VM profiler any more).
    """
    from tvm import relax, tirx

    kernels: dict[str, dict[str, Any]] = {}

    def visit(expr) -> None:
        if not (isinstance(expr, relax.Call) and isinstance(expr.op, relax.GlobalVar)):
            return
        if not isinstance(lowered[expr.op], tirx.PrimFunc):
            return
        name = expr.op.name_hint
        if name in kernels:
            kernels[name]["calls"] += 1
            return
        args = [{"shape": [int(d) for d in a.ty.shape], "dtype": str(a.ty.dtype)} for a in expr.args]
        kernels[name] = {"name": name, "args": args, "calls": 1}

    for function in _entry_functions(lowered):
        relax.analysis.post_order_visit(function, visit)
    return list(kernels.values())


def _entry_functions(lowered) -> list:
    """``main``, or every Relax function of a module without one (the width search's probe modules)."""
    from tvm import relax

    functions = {gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, relax.Function)}
    return [functions["main"]] if "main" in functions else list(functions.values())


def _walk_imports(module):
    yield module
    for child in module.imports:
        yield from _walk_imports(child)

