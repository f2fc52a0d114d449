"""The package's shape: what runs on a device imports only what a device has, and the stages import
each other one way (no circles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "compactdeploy"
# what a device has besides the standard library (the TVM runtime wheel brings tvm_ffi)
DEVICE_MODULES = {"numpy", "tvm", "tvm_ffi", "onnxruntime"}
# onnxruntime is optional on a device: the agent times it only where it is installed


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, at any depth (functions too), made absolute; with its level."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names += [(module, node.level)] if node.module else [(f"{module}.{a.name}", node.level) for a in node.names]
            else:
                names.append((node.module, 0))
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "runtime").glob("*.py")) + [PACKAGE / "device" / "agent.py",
                                                                                PACKAGE / "device" / "listener.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_what_runs_on_a_device_imports_only_the_standard_library_numpy_and_the_tvm_runtime(path):
    for module, _ in _imports(path):
        top = module.split(".")[0]
        if top == "compactdeploy":
            # the device side may use the runtime package and nothing else of compactdeploy
            assert module.startswith(("compactdeploy.runtime", "compactdeploy.device.listener")), (path.name, module)
        else:
            assert top in sys.stdlib_module_names or top in DEVICE_MODULES, (path.name, module)
    if path.name == "run.py":  # copied into every bundle alone: nothing of compactdeploy at all
        assert not any(m.startswith("compactdeploy") for m, level in _imports(path)), "run.py must stand alone"


def test_importing_the_runtime_loads_nothing_outside_the_standard_library():
    code = ("import sys; before = set(sys.modules); import compactdeploy.runtime, compactdeploy.runtime.load; "
            "print('\\n'.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    foreign = [m for m in loaded if m not in sys.stdlib_module_names and m != "compactdeploy"]
    assert foreign == [], foreign


def _stage_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_stages_import_each_other_one_way():
    """An edge A -> B when a module of A (compactdeploy.A or its subpackage) imports one of B, lazily
    or not; no path may lead back to where it started."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        source = _stage_of(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for module, _ in _imports(path):
            target = _stage_of(module)
            if module.startswith("compactdeploy.") and target != source:
                edges.setdefault(source, set()).add(target)

    def circle_from(start: str, node: str, path: list[str]) -> list[str] | None:
        for after in sorted(edges.get(node, ())):
            if after == start:
                return path + [after]
            if after not in path:
                found = circle_from(start, after, path + [after])
                if found:
                    return found
        return None

    for stage in edges:
        assert circle_from(stage, stage, [stage]) is None, " -> ".join(circle_from(stage, stage, [stage]))
