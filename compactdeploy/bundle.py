"""Bundle stage: the output directory, written whole or not at all, with a manifest of file hashes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import runtime
from .errors import CompactDeployError
from .resources import check_writable_parent, write_json

MANIFEST_FORMAT = runtime.FORMAT
MANIFEST = runtime.MANIFEST
RUNNER = "run.py"
SAMPLE_INPUT = "sample_input.npy"  # the input the bundle was checked with: reused by bench and run


def check_out_dir(out: Path) -> None:
    """Refuse, before any work, to replace something that is not an earlier build (a bundle
    holding nothing it does not list: ``runtime.replaceable``), or to write where it cannot."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise CompactDeployError(f"--out {out} is a file; choose a directory")
    if out.exists() and not runtime.replaceable(out):
        raise CompactDeployError(
            f"--out {out} holds files that are not a compactdeploy build (a build is replaced whole); "
            "choose another directory"
        )
    check_writable_parent(out, "--out")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A staging directory that replaces ``out`` if the block succeeds, and vanishes if it fails."""
    staging = staging_dir(out)
    try:
        yield staging
        commit(staging, out)
    except BaseException:
        discard(staging)
        raise


def staging_dir(out: Path) -> Path:
    """A fresh directory beside ``out`` (same file system, so the final rename is atomic)."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))


def commit(staging: Path, out: Path) -> None:
    """Move a finished staging directory to ``out``, replacing an earlier build there."""
    out = out.resolve()
    # mkdtemp makes the directory private (0700); a build is meant to be read like any other output
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def add_runner(directory: Path) -> None:
    """Put the standalone runner in the bundle, so a device needs only numpy and the TVM runtime."""
    shutil.copyfile(Path(runtime.run.__file__), directory / RUNNER)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` with the sha256 of every other file, then ``SHA256SUMS`` over all."""
    files = {
        path.name: runtime.sha256(path)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name not in (MANIFEST, runtime.SUMS) and not path.name.startswith(".")
    }
    manifest = {"format": MANIFEST_FORMAT, **manifest, "files": files}
    write_json(directory / MANIFEST, manifest)
    runtime.write_sums(directory)
    return manifest


def pack(directory: Path, archive: Path | None = None) -> Path:
    """A verified bundle as ``NAME.tar.gz`` (one top directory, regular files only), atomically."""
    directory = Path(directory)
    try:
        runtime.verify(directory, check_machine=False)
    except runtime.BundleError as exc:
        raise CompactDeployError(str(exc)) from None
    archive = Path(archive) if archive else directory.with_name(directory.name + ".tar.gz")
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    with tarfile.open(tmp, "w:gz") as out:
        for path in sorted(directory.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                out.add(path, arcname=f"{directory.name}/{path.name}", recursive=False)
    os.replace(tmp, archive)
    return archive
