"""How the library is linked: the host's C++ compiler, a cross gcc, or zig from PyPI."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompactDeployError
from ..resources import cache_dir
from ..targets import TargetSpec


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
