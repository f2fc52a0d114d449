"""Compile stage: ONNX -> TVM Relax -> a shared library for the target, cross-linked where needed.

``passes`` imports the ONNX model and lowers it, ``backends`` holds what differs per kind of target
(CPU, CUDA), ``link`` finds the linker, ``cuda`` makes CUDA machine code.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..targets import TargetSpec
from .backends import BACKENDS, Backend, backend_of
from .link import Linker, resolve_linker
from .passes import CONV_LAYOUT, TRANSFERRED, TUNED, UNSCHEDULED, extract_kernels, import_onnx, lower_for_tuning
from .rules import DEFAULT_RULE, RULES_VERSION


class Schedules(Protocol):
    """Where a build's kernel schedules come from (a tuning database)."""

    def best_view(self) -> Path | None: ...

LIB_NAME = "model.so"
KERNELS_NAME = "kernels.json"


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
    # kernel -> where its schedule came from (passes.TUNED, passes.TRANSFERRED + the donor kernel,
    # rules.DEFAULT_RULE, passes.UNSCHEDULED); empty where DLight's rules schedule every kernel (CUDA)
    schedules: dict[str, str] = field(default_factory=dict)
    # kernel -> why its schedule is the one it is, where the database says (a default rule that
    # no transferred schedule beat, or that none replayed on)
    schedule_notes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def kernels_scheduled(self) -> int:
        """Kernels that got a schedule from the tuning database."""
        return sum(source == TUNED for source in self.schedules.values())

    @property
    def kernels_transferred(self) -> int:
        """Kernels whose record was transferred from the same operator at another width."""
        return sum(source.startswith(TRANSFERRED) for source in self.schedules.values())

    @property
    def kernels_by_rule(self) -> int:
        """Kernels without a record that the default rules scheduled."""
        return sum(source == DEFAULT_RULE for source in self.schedules.values())

    @property
    def kernels_tunable(self) -> int:
        """Kernels a tuning database could schedule (0: DLight schedules them all)."""
        return len(self.schedules)


def compile_onnx(
    onnx_path: str | Path, target: TargetSpec, out_dir: str | Path, linker: Linker, database: Schedules | None = None,
    default_schedules: bool = True,
) -> CompileResult:
    """Compile an ONNX file for ``target``, with the schedules ``database`` holds; writes ``out_dir/model.so``.

    A CPU kernel without a record gets a default schedule (``rules``); ``default_schedules=False``
    compiles it unscheduled instead (to compare against, or to rule the rules out)."""
    start = time.perf_counter()
    return compile_module(import_onnx(onnx_path, target), target, out_dir, linker, database, start, default_schedules)


def compile_module(
    mod, target: TargetSpec, out_dir: str | Path, linker: Linker, database: Schedules | None = None,
    start: float | None = None, default_schedules: bool = True,
) -> CompileResult:
    """Compile a Relax module (every public function) for ``target``; writes ``out_dir/model.so``."""
    start = time.perf_counter() if start is None else start
    backend = backend_of(target)
    tvm_target = target.tvm_target()
    schedules = database.best_view() if database is not None and backend.tunable else None
    lowered, sources, schedule_notes = backend.lower(mod, target, tvm_target, schedules, default_schedules)
    workspace = planned_storage_bytes(lowered)
    kernels = kernel_calls(lowered)
    generated = backend.codegen(lowered, target, tvm_target)
    executable, device_code, notes = generated.executable, generated.device_code, generated.notes
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
        schedules=sources,
        schedule_notes=schedule_notes,
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


def builds_channels_last(target: TargetSpec) -> bool:
    """Whether ``target``'s build computes convolutions in NHWC (``passes.to_channels_last``)."""
    return backend_of(target).channels_last


__all__ = [
    "BACKENDS", "CONV_LAYOUT", "DEFAULT_RULE", "KERNELS_NAME", "RULES_VERSION", "LIB_NAME", "TRANSFERRED", "TUNED", "UNSCHEDULED", "Backend", "CompileResult", "Linker", "Schedules",
    "backend_of", "builds_channels_last", "compile_module", "compile_onnx", "extract_kernels", "import_onnx",
    "kernel_calls", "lower_for_tuning", "planned_storage_bytes", "resolve_linker",
]
