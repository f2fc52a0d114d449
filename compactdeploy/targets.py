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


_KEYS = {"description", "arch", "cores", "memory_mb", "channel_multiple", "tvm", "compile", "device"}
_SECTION_KEYS = {"compile": {"cross_compiler"}, "device": {"rpc_key", "local"}}


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
    )


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
