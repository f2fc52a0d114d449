"""One table of what differs between the kinds of target TVM builds for (CPU, CUDA).

Add a kind here; the stages ask its ``Backend`` (how it lowers, whether tuning databases apply,
which device it runs on, whether the device profiles its layers), never ``target.kind``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CompactDeployError
from ..targets import TargetSpec


@dataclass(frozen=True)
class Codegen:
    """What the code generator made: the executable, its device code, and notes for the report."""

    executable: Any
    device_code: str  # "cpu", or for CUDA: "cuda-sm_87-fatbin" (machine code) or "cuda-source"
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Backend:
    kind: str  # TVM's target kind
    device: str  # the device TVM's runtime (and an RPC session) knows it by
    tunable: bool  # MetaSchedule tuning databases schedule its kernels (else DLight's rules do)
    channels_last: bool  # convolutions computed in NHWC (``passes.CONV_LAYOUT``)
    profiles_layers: bool  # the device times each kernel and runs onnxruntime beside it
    # (module, target, TVM target, schedules directory or None, default schedules?)
    #   -> (lowered, kernel -> where its schedule came from, kernel -> why, where known)
    lower: Callable[[Any, TargetSpec, Any, Path | None, bool], tuple[Any, dict[str, str], dict[str, str]]]
    codegen: Callable[[Any, TargetSpec, Any], Codegen]


def _cpu_lower(mod, target: TargetSpec, tvm_target, schedules: Path | None, default_schedules: bool):
    from tvm import relax

    from .passes import apply_database, lower_for_tuning
    from .rules import apply_default_schedules, finish_weight_layouts

    # Fused kernels, each scheduled from the tuning database where it holds a record, the rest by
    # the default rules (``default_schedules`` False: they compile unscheduled, correct but slow).
    lowered, sources, notes = apply_database(lower_for_tuning(mod, tvm_target), tvm_target, schedules)
    if default_schedules:
        lowered, by_rule = apply_default_schedules(lowered, tvm_target, target.vector_unit)
        sources.update({kernel: source for kernel, source in by_rule.items() if kernel in sources})
    lowered = finish_weight_layouts(lowered, tvm_target)
    with tvm_target:
        return relax.get_pipeline("default")(lowered), sources, notes


def _cuda_lower(mod, target: TargetSpec, tvm_target, schedules: Path | None, default_schedules: bool):
    from tvm import relax

    # The CUDA pipeline schedules every kernel with DLight; unscheduled GPU kernels do not build.
    with tvm_target:
        return relax.get_default_pipeline(tvm_target)(mod), {}, {}


def _cpu_codegen(lowered, target: TargetSpec, tvm_target) -> Codegen:
    import tvm

    return Codegen(tvm.compile(lowered, target=tvm_target, relax_pipeline=None), "cpu")


def _cuda_codegen(lowered, target: TargetSpec, tvm_target) -> Codegen:
    import tvm

    from .cuda import binary_codegen

    # nvcc reads the arch from the current target, so the compile runs inside its scope
    with binary_codegen(str(tvm_target.attrs.get("arch", "sm_87"))) as cuda, tvm_target:
        executable = tvm.compile(lowered, target=tvm_target, relax_pipeline=None)
    if not any(m.kind == "cuda" for m in _walk_imports(executable.mod)):
        raise CompactDeployError(f"the build for {target.name} holds no CUDA module")
    notes = list(cuda.notes)
    if target.arch == "aarch64":
        notes.append(
            "Unverified on a Jetson: the aarch64 TVM 0.27 wheel's CUDA runtime links libcudart.so.13 "
            "(CUDA 13), while JetPack 6 ships CUDA 12."
        )
    return Codegen(executable, f"cuda-{cuda.arch}-fatbin" if cuda.binary else "cuda-source", notes)


def _walk_imports(module):
    yield module
    for child in module.imports:
        yield from _walk_imports(child)


BACKENDS: dict[str, Backend] = {
    "llvm": Backend("llvm", "cpu", tunable=True, channels_last=True, profiles_layers=True,
                    lower=_cpu_lower, codegen=_cpu_codegen),
    "cuda": Backend("cuda", "cuda", tunable=False, channels_last=False, profiles_layers=False,
                    lower=_cuda_lower, codegen=_cuda_codegen),
}


def backend_of(target: TargetSpec | str) -> Backend:
    """The backend of ``target`` (a target, or a TVM target kind); one line for a kind not supported."""
    kind = target if isinstance(target, str) else target.kind
    try:
        return BACKENDS[kind]
    except KeyError:
        name = kind if isinstance(target, str) else target.name
        raise CompactDeployError(
            f"target {name}: TVM kind {kind!r} is not supported; use one of {', '.join(BACKENDS)}"
        ) from None
