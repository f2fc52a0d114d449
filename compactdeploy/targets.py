"""Device targets: one human-editable TOML file each (``targets/*.toml``), or a path to the user's own."""

from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CompactDeployError
from .resources import data_dir

# TVM 0.27 needs a named CPU; "native" in a target file is resolved to it at run time.
_NATIVE = "native"


@dataclass(frozen=True)
class VectorUnit:
    """A CPU's SIMD unit, as the default schedules (``compile.rules``) size their tiles by it."""

    bits: int  # one vector register: 128 (NEON, SSE), 256 (AVX2), 512 (AVX-512)
    registers: int  # vector registers: 32 on aarch64 and with AVX-512, 16 with AVX2

    @property
    def lanes(self) -> int:
        """fp32 values per register."""
        return self.bits // 32


@dataclass(frozen=True)
class TargetSpec:
    """What compactdeploy needs to know about a device: how to compile for it and how to reach it."""

    name: str
    description: str
    arch: str  # "aarch64" or "x86_64": the CPU that loads the compiled library
    cores: int
    memory_mb: int
    channel_multiple: int  # pruned widths are rounded to a multiple of this
    tvm: dict[str, Any]  # a TVM target dict, or {"tag": ..., "host": {...}}
    cross_compiler: str | None = None  # None: link with the host's compiler
    rpc_key: str | None = None
    local: bool = False  # True: this machine is the device, so builds are measured here
    source: str = ""  # the file it was read from
    vector_unit: VectorUnit = VectorUnit(128, 32)  # the CPU's; unused by GPU targets

    @property
    def kind(self) -> str:
        """TVM's target kind: "llvm" for CPUs, "cuda" for NVIDIA GPUs."""
        if "tag" in self.tvm:
            return "cuda" if self.tvm["tag"].startswith("nvidia/") else "llvm"
        return str(self.tvm["kind"])

    def tvm_target_dict(self) -> dict[str, Any]:
        """The TVM target as plain data, with ``mcpu = "native"`` resolved (for reports)."""
        spec = _resolve_native(dict(self.tvm))
        if spec.get("kind") == "llvm":
            spec.setdefault("num-cores", self.cores)  # MetaSchedule sizes parallel loops by it
        return spec

    def tvm_target(self):
        """The ``tvm.target.Target`` (imports TVM)."""
        from tvm.target import Target

        spec = self.tvm_target_dict()
        if "tag" in spec:
            base = Target(spec["tag"])
            host = spec.get("host")
            return Target(base, host=Target(host)) if host else base
        return Target(spec)

    def is_this_machine(self) -> bool:
        return runs_here(self.local, self.arch)


def runs_here(local: bool, arch: str) -> bool:
    """Whether a target (``local``: its file says this machine is the device) is this machine."""
    return local and arch == platform.machine()


def _resolve_native(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("mcpu") == _NATIVE:
        from tvm.target.codegen import llvm_get_system_cpu

        spec["mcpu"] = str(llvm_get_system_cpu())
    if isinstance(spec.get("host"), dict):
        spec["host"] = _resolve_native(dict(spec["host"]))
    return spec


def available_targets() -> dict[str, Path]:
    """Target name -> file, for every file in the targets directory."""
    return {path.stem: path for path in sorted(data_dir("targets").glob("*.toml"))}


def load_target(name_or_path: str) -> TargetSpec:
    """A target by name (``rpi4``) or by path to a TOML file (``my/board.toml``)."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml"):
        if not path.is_file():
            raise CompactDeployError(f"target file {name_or_path} does not exist")
    else:
        known = available_targets()
        if name_or_path not in known:
            raise CompactDeployError(
                f"unknown target {name_or_path!r}: choose one of {', '.join(known)} "
                "or pass a path to a target .toml file"
            )
        path = known[name_or_path]
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CompactDeployError(f"cannot read target file {path}: {exc}") from None
    return _parse(path, raw)


_KEYS = {"description", "arch", "cores", "memory_mb", "channel_multiple", "tvm", "compile", "device", "cpu"}
_SECTION_KEYS = {"compile": {"cross_compiler"}, "device": {"rpc_key", "local"}, "cpu": {"vector_bits", "vector_registers"}}


def _parse(path: Path, raw: dict[str, Any]) -> TargetSpec:
    # a misspelt key would otherwise be ignored in silence
    unknown = sorted(set(raw) - _KEYS) + sorted(
        f"{section}.{key}" for section, keys in _SECTION_KEYS.items() for key in set(raw.get(section, {})) - keys
    )
    if unknown:
        raise CompactDeployError(
            f"target file {path}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(_KEYS))})"
        )

    def need(key: str) -> Any:
        if key not in raw:
            raise CompactDeployError(f"target file {path} lacks the key {key!r}")
        return raw[key]

    tvm = need("tvm")
    if not isinstance(tvm, dict) or not ("kind" in tvm or "tag" in tvm):
        raise CompactDeployError(f"target file {path}: [tvm] needs a 'kind' (llvm, cuda) or a 'tag'")
    arch = need("arch")
    if arch == _NATIVE:
        arch = platform.machine()
    cores = need("cores")
    if cores == "auto":
        cores = os.cpu_count() or 1
    memory_mb = need("memory_mb")
    if memory_mb == "auto":
        memory_mb = _memory_mb()
    multiple = raw.get("channel_multiple", 1)
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise CompactDeployError(f"target file {path}: channel_multiple must be a whole number >= 1, not {multiple!r}")
    compile_section = raw.get("compile", {})
    device = raw.get("device", {})
    cpu = raw.get("cpu", {})
    this_cpu = _this_vector_unit() if "auto" in (cpu.get("vector_bits"), cpu.get("vector_registers")) else None
    bits = this_cpu.bits if cpu.get("vector_bits") == "auto" else cpu.get("vector_bits", 128)
    registers = this_cpu.registers if cpu.get("vector_registers") == "auto" else cpu.get("vector_registers", 32)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, registers)) or bits not in (128, 256, 512) \
            or not 8 <= registers <= 64:
        raise CompactDeployError(
            f"target file {path}: [cpu] vector_bits must be 128, 256 or 512 and vector_registers 8-64 (or \"auto\"), "
            f"not {bits!r} and {registers!r}"
        )
    return TargetSpec(
        name=path.stem,
        description=str(raw.get("description", "")),
        arch=str(arch),
        cores=int(cores),
        memory_mb=int(memory_mb),
        channel_multiple=multiple,
        tvm=tvm,
        cross_compiler=compile_section.get("cross_compiler"),
        rpc_key=device.get("rpc_key"),
        local=bool(device.get("local", False)),
        source=str(path),
        vector_unit=VectorUnit(bits, registers),
    )


def _this_vector_unit() -> VectorUnit:
    """This machine's vector unit, from the CPU's feature flags."""
    if platform.machine() in ("aarch64", "arm64"):
        return VectorUnit(128, 32)  # NEON; SVE's width varies, and these schedules use NEON
    try:
        flags = next((set(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo") if line.startswith("flags")), set())
    except OSError:
        flags = set()
    if "avx512f" in flags:
        return VectorUnit(512, 32)
    return VectorUnit(256, 16) if "avx2" in flags else VectorUnit(128, 16)


def _memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def listing() -> list[dict[str, Any]]:
    """Every target, as ``compactdeploy targets`` lists it."""
    rows = []
    for name in available_targets():
        spec = load_target(name)
        rows.append({
            "name": spec.name, "tvm_target": spec.tvm_target_dict(), "arch": spec.arch, "cores": spec.cores,
            "memory_mb": spec.memory_mb, "channel_multiple": spec.channel_multiple,
            "cross_compiler": spec.cross_compiler, "rpc_key": spec.rpc_key, "description": spec.description,
        })
    return rows
