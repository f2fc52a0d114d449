"""Verify and run a compactdeploy bundle with only numpy and the TVM runtime.

Every bundle carries a copy of this file as ``run.py``; ``compactdeploy run`` uses it too. On a
device, without compactdeploy:

    pip install apache-tvm numpy && export TVM_USE_RUNTIME_LIB=1
    python run.py --input sample.npy --output out.npy      # the bundle is the directory of run.py
    python run.py --bench 200

Nothing is loaded before the bundle is verified: every file's sha256 against ``SHA256SUMS`` (which
covers ``manifest.json``) and ``manifest.json``, and the bundle's architecture against this machine.
Hashes catch corruption and edits of single files; they are not a signature (someone who rewrites
the bundle and its hash lists consistently is not detected).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not getattr(sys.flags, "safe_path", False):
    # run as ``python run.py``: Python put the bundle's directory first on the import path, so a file
    # dropped there (hashlib.py) would be imported instead of the standard library's before any check
    # ran. Nothing of the bundle is meant to be imported: drop it (``python -P`` never adds it).
    del sys.path[0]

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
FORMAT = "compactdeploy-bundle/1"


class BundleError(Exception):
    """A bundle that must not be loaded, or input it cannot take: one line that says why."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(bundle: str | Path, check_machine: bool = True) -> dict:
    """The bundle's manifest, once every file checks out; BundleError otherwise."""
    bundle = Path(bundle)
    sums_path, manifest_path = bundle / SUMS, bundle / MANIFEST
    if not manifest_path.is_file() or not sums_path.is_file():
        raise BundleError(f"{bundle} is not a compactdeploy bundle (no {MANIFEST} or {SUMS})")
    sums = read_sums(sums_path)
    for name, digest in sums.items():
        path = bundle / name
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{path} is missing; the bundle is incomplete")
        if sha256(path) != digest:
            raise BundleError(f"{path} does not match its sha256 in {SUMS}: the file was changed or corrupted")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not a {FORMAT} manifest")
    listed = set(manifest.get("files", {}))
    if listed | {MANIFEST} != set(sums):
        raise BundleError(f"{MANIFEST} and {SUMS} list different files: the bundle was changed")
    for name, digest in manifest["files"].items():
        if sums[name] != digest:
            raise BundleError(f"{name}: {MANIFEST} and {SUMS} disagree on its sha256: the bundle was changed")
    unlisted = sorted(entry.name for entry in bundle.iterdir() if entry.name not in sums and entry.name != SUMS)
    if unlisted:
        raise BundleError(
            f"{bundle} holds {', '.join(unlisted[:3])}{' ...' if len(unlisted) > 3 else ''}, not listed in {SUMS}: "
            "something was added to the bundle; remove it, or ship the bundle again"
        )
    for field in ("library", "sample_input"):
        name = manifest.get(field)
        if (name is not None or field == "library") and (not isinstance(name, str) or name not in listed):
            raise BundleError(f"{manifest_path}: {field!r} must name a file listed in {SUMS} (it is {name!r})")
    if check_machine:
        built_for, here = manifest["target"]["arch"], platform.machine()
        if built_for != here:
            raise BundleError(
                f"{bundle} is built for {built_for} (target {manifest['target']['name']}); this machine is {here}"
            )
    return manifest


def read_sums(sums_path: Path) -> dict[str, str]:
    """``SHA256SUMS`` as {file name: sha256}; BundleError on a line that is not ``DIGEST  NAME``
    with a plain name (no directory, not hidden)."""
    sums = {}
    for line in sums_path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if not name or "/" in name or name.startswith("."):
            raise BundleError(f"{sums_path} has a malformed line: {line[:80]!r}")
        sums[name] = digest
    return sums


def write_sums(bundle: Path) -> None:
    """Write SHA256SUMS for every file of the bundle (``sha256sum -c SHA256SUMS`` checks it)."""
    lines = [
        f"{sha256(path)}  {path.name}"
        for path in sorted(bundle.iterdir())
        if path.is_file() and path.name != SUMS and not path.name.startswith(".")
    ]
    tmp = bundle / f".{SUMS}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, bundle / SUMS)


THREADS_ENV = "TVM_NUM_THREADS"  # read by TVM when its thread pool starts (the first parallel kernel)
BIND_ENV = "TVM_BIND_THREADS"  # read then too: unset or 1, TVM pins each pool thread to a core
_CPU_SYSFS = Path("/sys/devices/system/cpu")


def default_threads(sysfs: Path = _CPU_SYSFS) -> int:
    """Threads for a model when none are asked for: one per physical core this process may run on.

    TVM's own default on x86 is half the logical CPUs (it assumes two hyperthreads per core): on a
    machine without them, most cloud VMs among them, TVM used half the cores while onnxruntime's
    default (one thread per physical core) used them all. Hyperthreads of a core count once.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux: no affinity, no sysfs
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:  # no topology (some containers): each CPU its own core
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def threads_in_use() -> str:
    """The thread count TVM runs with here: the user's ``TVM_NUM_THREADS``, else ``default_threads()``."""
    return os.environ.get(THREADS_ENV) or str(default_threads())


def threads_pinned() -> bool:
    """Whether TVM pins its pool's threads one per core here: unless ``TVM_BIND_THREADS`` is set to
    something other than 1 (TVM reads it with atoi)."""
    value = os.environ.get(BIND_ENV)
    if value is None:
        return True
    try:
        return int(value.strip()) == 1
    except ValueError:
        return False


def use_default_threads() -> str:
    """Make ``threads_in_use()`` TVM's count in this process (and its children), its threads not
    pinned to cores unless the user's ``TVM_BIND_THREADS`` says so; returns the count.

    Unpinned: a pinned thread whose core other work takes stalls every parallel loop until the
    scheduler gives that core back; on an idle machine pinning gained nothing measurable (figures:
    docs/benchmarks/load-effect.json, docs/benchmarks/pinning-idle.json).
    """
    os.environ[THREADS_ENV] = threads_in_use()
    os.environ.setdefault(BIND_ENV, "0")
    return os.environ[THREADS_ENV]


def latency_stats(times_ms) -> dict:
    """Median, p90, p99, mean, std and min of per-run times (ms), and how many runs."""
    import numpy as np

    values = np.asarray(times_ms, dtype=np.float64)
    return {
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "runs": int(values.size),
    }


class Model:
    """A verified bundle, loaded: ``model(x)`` runs one inference."""

    def __init__(self, bundle: str | Path):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.bundle = Path(bundle)
        self.manifest = verify(self.bundle)
        self.input = self.manifest["inputs"][0]
        cuda = self.manifest["target"]["kind"] == "cuda"
        self.device = tvm.cuda(0) if cuda else tvm.cpu(0)
        if cuda and not self.device.exist:
            raise BundleError(f"{self.bundle} needs an NVIDIA GPU, and TVM finds none on this machine")
        library = self.bundle / self.manifest["library"]
        self.threads = use_default_threads()  # before the first run starts TVM's thread pool
        self.vm = VirtualMachine(tvm.runtime.load_module(str(library)), self.device)

    def check(self, x) -> None:
        expected_shape, expected_dtype = tuple(self.input["shape"]), self.input["dtype"]
        if tuple(x.shape) != expected_shape or str(x.dtype) != expected_dtype:
            raise BundleError(
                f"input has shape {tuple(x.shape)} and dtype {x.dtype}; the model takes "
                f"'{self.input['name']}' of shape {expected_shape} and dtype {expected_dtype}"
            )

    def __call__(self, x):
        import tvm

        self.check(x)
        return self.vm["main"](tvm.runtime.tensor(x, self.device)).numpy()

    def bench(self, runs: int, warmup: int = 10) -> dict:
        import numpy as np
        import tvm

        x = np.load(self.bundle / self.manifest["sample_input"])
        self.check(x)
        tensor = tvm.runtime.tensor(x, self.device)
        if warmup:
            self.vm.time_evaluator("main", self.device, number=warmup, repeat=1)(tensor)
        times = np.asarray(self.vm.time_evaluator("main", self.device, number=1, repeat=runs)(tensor).results) * 1e3
        stats = latency_stats(times)
        return {
            "runs": stats["runs"], **{f"{key}_ms": stats[key] for key in ("median", "p90", "p99", "mean", "min")},
            "machine": platform.machine(), "hostname": platform.node(), "threads": self.threads,
            "threads_pinned": threads_pinned(),
        }


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


def execute(bundle: str | Path, input_path=None, output_path=None, bench: int | None = None, verify_only=False) -> str:
    """Do what the command line asks; returns what to print, raises BundleError."""
    if verify_only:
        manifest = verify(bundle)
        return f"ok: {manifest['model']['name']} for {manifest['target']['name']}, {len(manifest['files'])} files verified"
    if bench is not None and bench < 1:
        raise BundleError(f"--bench takes the number of runs to time, at least 1 (got {bench})")
    model = Model(bundle)
    if bench:
        return json.dumps(model.bench(bench))
    import numpy as np

    if not input_path:
        raise BundleError("give --input FILE.npy (or --bench RUNS, or --verify)")
    try:
        x = np.load(input_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {input_path} as an .npy array ({exc})") from None
    if not isinstance(x, np.ndarray):  # np.load opens an .npz as an archive of arrays
        x.close()
        raise BundleError(f"{input_path} is an .npz archive; give one array saved with np.save (.npy)")
    start = time.perf_counter()
    y = model(x)
    elapsed = (time.perf_counter() - start) * 1e3
    if output_path:
        output_path = Path(output_path)
        tmp = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}.npy")
        try:  # written whole or not at all
            np.save(tmp, y)
            os.replace(tmp, output_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise BundleError(f"cannot write --output {output_path}: {exc.strerror or exc}") from None
        return f"wrote {output_path}: shape {tuple(y.shape)}, {elapsed:.2f} ms"
    return np.array2string(y, threshold=50)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify and run a compactdeploy bundle (numpy + TVM runtime only).")
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).resolve().parent), help="bundle directory")
    parser.add_argument("--input", help="an .npy file with one input")
    parser.add_argument("--output", help="write the output here (.npy); default: print it")
    parser.add_argument("--bench", type=int, metavar="RUNS", help="time RUNS inferences on the bundled sample input")
    parser.add_argument("--verify", action="store_true", help="only verify the bundle")
    args = parser.parse_args(argv)
    try:
        print(execute(args.bundle, args.input, args.output, args.bench, args.verify))
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
