"""CUDA device code for builds on a host without an NVIDIA GPU.

TVM's wheel generates CUDA C for the kernels; turning it into sm_XX machine code happens in its
CUDA plugin (``libtvm_runtime_cuda.so``), which links the driver (``libcuda.so.1``) and so does not
load on a GPU-less build host. Compiling needs no driver call, though: with a link-time stand-in
for the driver (every function returns "no device", the same trick as the CUDA toolkit's own
``stubs/libcuda.so``) the plugin loads, and nvcc turns the kernels into a fatbin for the target's
arch. Without nvcc or the plugin, the library keeps the CUDA source and the manifest says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..resources import cache_dir

# The driver functions that the pinned TVM wheel's CUDA plugin imports (nm -D --undefined-only).
_DRIVER_FUNCTIONS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuLaunchKernelEx", "cuModuleGetFunction",
    "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
)
_STUB_SOURCE = (
    "/* Build-host stand-in for the NVIDIA driver: every call fails with CUDA_ERROR_NO_DEVICE. */\n"
    "typedef int CUresult;\n"
    + "".join(f"CUresult {name}(void) {{ return 100; }}\n" for name in _DRIVER_FUNCTIONS)
    + "CUresult cuInit(unsigned int flags) { return 100; }\n"  # what the runtime calls first (runtime.run)
    + 'CUresult cuGetErrorName(CUresult e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }\n'
    'CUresult cuGetErrorString(CUresult e, const char **s) { *s = "no NVIDIA driver on this build host"; return 0; }\n'
)


@dataclass
class CudaCodegen:
    """What happened to the kernels of one build."""

    binary: bool = False  # True: machine code for ``arch`` is embedded
    arch: str = ""
    kernels_compiled: int = 0
    notes: list[str] = field(default_factory=list)


def _plugin_loaded() -> bool:
    from tvm.base import _LOADED_LIBS

    return "tvm_runtime_cuda" in _LOADED_LIBS


def _driver_stub() -> Path:
    path = cache_dir("cuda-stub") / "libcuda.so.1"
    source = path.with_name("cuda_stub.c")
    if not path.exists() or not source.exists() or source.read_text() != _STUB_SOURCE:
        source.write_text(_STUB_SOURCE)
        tmp = path.with_name(f".libcuda.so.1.{os.getpid()}")
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(source)],
            check=True, capture_output=True,
        )
        os.replace(tmp, path)
    return path


def _load_plugin() -> str | None:
    """Load TVM's CUDA plugin; returns why it cannot be, or None."""
    if _plugin_loaded():
        return None
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # a real driver, where there is one
    except OSError:
        if shutil.which("cc") is None:
            return "no C compiler to build the driver stand-in"
        try:
            ctypes.CDLL(str(_driver_stub()), mode=ctypes.RTLD_GLOBAL)
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"the driver stand-in did not build or load ({exc})"
    from ..runtime.run import load_cuda_plugin  # the plugin links the driver: it must be loaded first

    return load_cuda_plugin()


def _nvcc_release(nvcc: str) -> str:
    done = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if "release" in line]
    return lines[0].strip() if lines else "unknown version"


@contextlib.contextmanager
def binary_codegen(arch: str) -> Iterator[CudaCodegen]:
    """Within this context, ``tvm.compile`` for CUDA embeds machine code for ``arch`` where it can."""
    import tvm_ffi

    result = CudaCodegen(arch=arch)
    nvcc = shutil.which("nvcc")
    reason = "nvcc (the CUDA toolkit) is not installed on this build host" if nvcc is None else _load_plugin()
    if reason is not None:
        result.notes.append(
            f"CUDA kernels are embedded as CUDA C source, not {arch} machine code: {reason}. "
            "The TVM runtime loads only ptx/cubin/fatbin, so this library will not run on the device: "
            "install the CUDA toolkit (nvcc) on the build host and build again."
        )
        yield result
        return

    from tvm.support import nvcc as tvm_nvcc

    def compile_kernels(code: str) -> bytes:
        result.kernels_compiled += 1
        return tvm_nvcc.compile_cuda(code, target_format="fatbin", arch=arch, compiler="nvcc")

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_kernels, override=True)
    try:
        yield result
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
    result.binary = result.kernels_compiled > 0
    result.notes.append(
        f"CUDA kernels embedded as an {arch} fatbin, compiled by nvcc ({_nvcc_release(nvcc)}) on the build host."
    )
