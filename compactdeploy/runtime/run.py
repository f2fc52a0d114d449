"""Verify and run a compactdeploy bundle with only numpy and the TVM runtime.

The runtime's entry point: the bundle format, ``verify``, the thread policy, the latency
statistics and the loaded ``Model``. Every bundle carries a copy of this file as ``run.py``, so it
is one file that imports only the standard library, numpy and TVM's runtime (a test checks);
``compactdeploy run`` uses it too. On a device, without compactdeploy:

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


def load_cuda_plugin() -> str | None:
    """Load TVM's CUDA runtime plugin; returns why it cannot be, or None.

    A runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, what a device runs) does not autoload its backends,
    so without this ``tvm.cuda(0)`` finds no GPU even on a machine that has one.
    """
    from tvm.base import _LOADED_LIBS  # importing tvm loads libtvm_runtime
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return None
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError) as exc:
        # typically libcudart.so.13 (CUDA 13's runtime) or the driver's libcuda.so.1 is not installed
        return f"TVM's CUDA plugin does not load ({str(exc).splitlines()[0][:160]})"
    return None


def init_cuda_driver() -> str | None:
    """``cuInit`` once in this process; why it fails, or None.

    TVM's plugin calls driver functions (cuDeviceGetName, cuModuleLoadData) that need it, but
    leaves it to the CUDA runtime's lazy start, which a forked session process does not always
    get (seen as CUDA_ERROR_NOT_INITIALIZED in the device agent's sessions)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")  # the plugin links it: already loaded
        status = driver.cuInit(0)
    except (OSError, AttributeError) as exc:
        return f"no NVIDIA driver ({str(exc).splitlines()[0][:160]})"
    if status == 0:
        return None
    name = ctypes.c_char_p()
    driver.cuGetErrorName(status, ctypes.byref(name))
    return f"the NVIDIA driver does not start (cuInit: {(name.value or b'').decode() or status})"


def tvm_device(kind: str):
    """``tvm.cuda(0)`` (its plugin loaded) or ``tvm.cpu(0)``; raises BundleError where there is no GPU."""
    import tvm

    if kind != "cuda":
        return tvm.cpu(0)
    reason = load_cuda_plugin() or init_cuda_driver()
    device = tvm.cuda(0)
    if reason or not device.exist:
        raise BundleError("TVM finds no CUDA GPU on this machine" + (f" ({reason})" if reason else ""))
    return device


class Model:
    """A verified bundle, loaded: ``model(x)`` runs one inference."""

    def __init__(self, bundle: str | Path):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.bundle = Path(bundle)
        self.manifest = verify(self.bundle)
        self.input = self.manifest["inputs"][0]
        try:
            self.device = tvm_device(self.manifest["target"]["kind"])
        except BundleError as exc:
            raise BundleError(f"{self.bundle} needs an NVIDIA GPU: {exc}") from None
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
