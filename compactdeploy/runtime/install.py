"""Installing a bundle archive on a device: safe unpacking, and what may be replaced.

Used by ``compactdeploy unpack`` and by the device agent (``ship --to rpc://``); ships inside the
package, not in bundles. The same replace rule is written in POSIX shell for ssh devices
(``ship._INSTALL``).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from .run import FORMAT, MANIFEST, SUMS, BundleError, read_sums, verify

# An archive is refused before anything is written when it exceeds these: a bundle is a dozen files,
# and model weights compress little, so far more than MAX_EXPANSION means a decompression bomb.
MAX_ENTRIES = 1000
MAX_BUNDLE_BYTES = 16 << 30
MAX_EXPANSION = 100  # unpacked / archive size, checked once the unpacked size passes EXPANSION_FLOOR
EXPANSION_FLOOR = 64 << 20


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"


def _safe_members(archive: tarfile.TarFile, archive_bytes: int) -> list[tarfile.TarInfo]:
    """The entries of a bundle archive; BundleError if any would escape the destination or be a link,
    or if there are too many, or they unpack too large. Checked header by header, so a bomb is
    refused before its bulk is decompressed."""
    members, unpacked = [], 0
    for member in archive:
        if len(members) == MAX_ENTRIES:
            raise BundleError(f"the archive holds more than {MAX_ENTRIES} entries (a bundle holds a dozen); refusing it")
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise BundleError(f"archive entry {member.name!r} points outside the destination; refusing the archive")
        if not (member.isfile() or member.isdir()):
            raise BundleError(f"archive entry {member.name!r} is a link or device file; refusing the archive")
        unpacked += member.size if member.isfile() else 0
        if unpacked > MAX_BUNDLE_BYTES:
            raise BundleError(f"the archive unpacks to over {_gib(MAX_BUNDLE_BYTES)}, the cap on a bundle; refusing it")
        if unpacked > EXPANSION_FLOOR and unpacked > MAX_EXPANSION * archive_bytes:
            raise BundleError(
                f"the archive unpacks to over {_gib(unpacked)} from {_gib(archive_bytes)} (more than {MAX_EXPANSION}x; "
                "model weights compress far less): refusing it as a decompression bomb"
            )
        members.append(member)
    return members


def replaceable(directory: Path) -> bool:
    """Whether ``directory`` may be replaced whole by a bundle: it is empty, or it is a compactdeploy
    bundle (a manifest of this format) holding nothing its ``SHA256SUMS`` does not list."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    entries = list(directory.iterdir())
    if not entries:
        return True
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        listed = read_sums(directory / SUMS)
    except (OSError, ValueError, BundleError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return False
    return all(e.name == SUMS or (e.name in listed and e.is_file() and not e.is_symlink()) for e in entries)


def install_path(destination: Path, name: str) -> Path:
    """Where a bundle called ``name`` installs when ``destination`` is asked for.

    ``destination`` itself when it does not exist or is ``replaceable``; otherwise, when it is a
    directory (a home, a models folder), ``destination/name``, which must itself be absent or
    replaceable. Nothing else is ever replaced: BundleError says so.
    """
    if not (destination.exists() or destination.is_symlink()) or replaceable(destination):
        return destination
    if not destination.is_dir():  # a link to a directory is a directory to install in, never replaced
        raise BundleError(f"{destination} exists and is not a directory; choose another destination")
    inside = destination / name
    if (inside.exists() or inside.is_symlink()) and not replaceable(inside):
        raise BundleError(
            f"{inside} exists and is not a compactdeploy bundle (or holds files the bundle does not list); "
            "it is left as it is: choose another destination"
        )
    return inside


def install_archive(archive_path: str | Path, destination: str | Path) -> dict:
    """Unpack a bundle archive at ``install_path(destination)``: into a temporary sibling, verify,
    then rename. Returns where it went, and whether a bundle there was replaced.

    Refuses the whole archive, writing nothing, for entries with absolute paths, ``..``, links or
    device files, and past the caps on entries and size; an earlier bundle is replaced only once
    the new one is verified.
    """
    destination = Path(destination).absolute()
    try:
        archive_bytes = os.path.getsize(archive_path)
        with tarfile.open(archive_path, "r:gz") as archive:
            members = _safe_members(archive, archive_bytes)
            tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
            if len(tops) != 1:
                raise BundleError(f"{archive_path} must hold one bundle directory (it holds {len(tops)} entries)")
            name = tops.pop()
            target = install_path(destination, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            unpacked_bytes = sum(member.size for member in members)
            free = shutil.disk_usage(target.parent).free
            if unpacked_bytes > free:
                raise BundleError(f"the bundle needs {_gib(unpacked_bytes)} and {target.parent} has {_gib(free)} free")
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
            try:
                # the entry checks above are the guard; tarfile's own filter (Python >= 3.11.4; Debian
                # bookworm and Raspberry Pi OS ship 3.11.2) is added where it exists
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                archive.extractall(staging, members=members, **extra)
                manifest = verify(staging / name, check_machine=False)
                replaced = target.exists() and any(target.iterdir())  # not just an empty directory
                if target.exists():
                    os.replace(target, staging / ".previous")
                os.replace(staging / name, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{archive_path} is not a readable bundle archive ({exc})") from None
    except OSError as exc:
        raise BundleError(f"cannot install {archive_path} at {destination}: {exc.strerror or exc}") from None
    return {"path": str(target), "model": manifest["model"]["name"], "target": manifest["target"]["name"],
            "replaced": replaced}
