"""Where the user-editable data (the model zoo, the target files) and the cache live, and how
files are written there: whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CompactDeployError

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """The ``models`` or ``targets`` directory: inside an installed wheel, else the source tree's."""
    bundled = _PACKAGE_DIR / "_bundled" / kind
    if bundled.is_dir():
        return bundled
    return _PACKAGE_DIR.parent / kind


def cache_dir(*parts: str) -> Path:
    """A directory under the user's cache (``$COMPACTDEPLOY_CACHE`` or ``$XDG_CACHE_HOME/compactdeploy``)."""
    root = os.environ.get("COMPACTDEPLOY_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compactdeploy"
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def directory_bytes(path: Path) -> int:
    """What the files under ``path`` take (links not followed: a sysroot's point outside it)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def check_writable_parent(path: Path, option: str) -> None:
    """Create ``path``'s directory and prove something can be written there, before any work; one
    line naming ``option`` otherwise (``os.access`` says yes to root, even under /proc)."""
    parent = Path(path).resolve().parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CompactDeployError(f"{option} {path}: {blocker} is a file, not a directory; choose another place")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{Path(path).name}.probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise CompactDeployError(f"{option} {path}: cannot write in {parent} ({exc.strerror or exc})") from None


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, replacing it atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def cache_parts() -> dict[str, int]:
    """The cache's parts other than the tuning databases (latency tables, fit runs, sysroots,
    linkers), with the room each takes."""
    root = cache_dir()
    return {part.name: directory_bytes(part) for part in sorted(root.iterdir()) if part.is_dir() and part.name != "tuning"}
