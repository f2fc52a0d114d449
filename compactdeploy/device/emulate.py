"""An emulated Raspberry Pi: an arm64 Debian sysroot run by qemu-user, serving the device agent.

Emulated figures prove the flow and numerical correctness; they say nothing about a board's speed.

The sysroot is Debian bookworm's python3.11 (``mmdebstrap --variant=extract``) plus aarch64 wheels
of the device-side packages, installed by the host's pip with ``--platform``. It is cached under
the user's cache directory, keyed by its package versions, and built into a temporary directory
that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..runtime import THREADS_ENV
from ..errors import CompactDeployError
from ..resources import cache_dir
from . import Agent, _free_port
from .agent import EMULATED_CPU_ENV, EMULATED_ENV

SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3.11", "libstdc++6")
# The device side needs the TVM runtime and numpy; tornado/psutil/cloudpickle serve TVM's RPC.
# onnxruntime is left out: its native module crashes on import under qemu-user (seen with 1.31.1).
DEVICE_WHEELS = (
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.16.0",
    "psutil==7.2.2",
    "cloudpickle==3.1.2",
    "tornado==6.6.1",
)
AARCH64_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
# Left off the device: the compiler (240 MB; the runtime needs only libtvm_runtime.so) and CUDA.
NOT_ON_DEVICE = ("tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so")

Progress = Callable[[str], None]


def sysroot_path() -> Path:
    digest = hashlib.sha256(" ".join((SUITE, *DEBIAN_PACKAGES, *DEVICE_WHEELS)).encode()).hexdigest()[:12]
    return cache_dir("sysroots") / f"arm64-{SUITE}-{digest}"


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise CompactDeployError(f"{tool} not found: install it with 'apt-get install {package}' to emulate a device")
    return path


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise CompactDeployError(f"{what} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")


def ensure_sysroot(progress: Progress | None = None) -> Path:
    """The arm64 sysroot, built on first use (about a minute plus downloads)."""
    root = sysroot_path()
    if (root / ".complete").is_file():
        return root
    say = progress or (lambda _: None)
    mmdebstrap = _require("mmdebstrap", "mmdebstrap")
    _require("qemu-aarch64", "qemu-user")
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        say(f"building an arm64 Debian {SUITE} sysroot (mmdebstrap)")
        mode = "root" if os.geteuid() == 0 else "unshare"
        _run(
            [mmdebstrap, f"--mode={mode}", "--variant=extract", "--architectures=arm64",
             f"--include={','.join(DEBIAN_PACKAGES)}", SUITE, str(partial)],
            "mmdebstrap",
        )
        say("installing aarch64 wheels of the TVM runtime and numpy")
        platforms = [arg for platform in AARCH64_PLATFORMS for arg in ("--platform", platform)]
        _run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", "--implementation", "cp", *platforms,
             "--target", str(partial / "opt" / "py"), *DEVICE_WHEELS],
            "pip install of the aarch64 wheels",
        )
        for relative in NOT_ON_DEVICE:
            (partial / "opt" / "py" / relative).unlink(missing_ok=True)
        (partial / ".complete").write_text(" ".join(DEVICE_WHEELS) + "\n")
        os.replace(partial, root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def _package_path() -> Path:
    """A directory holding only this compactdeploy package, for the emulated Python's path.

    The host's site-packages must not be on it: its x86 numpy would shadow the aarch64 one.
    """
    package = Path(__file__).resolve().parents[1]
    shim = cache_dir("emulated-path") / hashlib.sha256(str(package).encode()).hexdigest()[:12]
    link = shim / "compactdeploy"
    if not link.is_symlink() or link.resolve() != package:
        shim.mkdir(parents=True, exist_ok=True)
        tmp = shim / f".link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(package, target_is_directory=True)
        os.replace(tmp, link)
    return shim


def qemu_cpu(mcpu: str | None) -> str:
    """The CPU qemu emulates: the target's own where qemu knows it (catches instructions it lacks)."""
    if mcpu:
        listing = subprocess.run(["qemu-aarch64", "-cpu", "help"], capture_output=True, text=True).stdout
        if mcpu in listing.split():
            return mcpu
    return "max"


def emulated_agent(
    mcpu: str | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    tracker: str | None = None,
    key: str = "",
    threads: int | None = None,
    progress: Progress | None = None,
    token: str | None = None,
) -> Agent:
    """Start the device agent under qemu-aarch64; ``mcpu`` picks the emulated CPU (cortex-a72 for rpi4).

    ``token``: the access token it requires (default: a new random one, in ``agent.address``)."""
    root = ensure_sysroot(progress)
    port = port or _free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": f"{root / 'opt' / 'py'}:{_package_path()}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TVM_USE_RUNTIME_LIB": "1",
        EMULATED_ENV: "1",
    }
    if threads:
        env[THREADS_ENV] = str(threads)
    cpu = qemu_cpu(mcpu)
    env[EMULATED_CPU_ENV] = cpu
    command = [
        "qemu-aarch64", "-cpu", cpu, "-L", str(root), str(root / "usr" / "bin" / "python3.11"),
        "-m", "compactdeploy.device.agent", "--host", host, "--port", str(port), "--port-end", str(port + 50),
    ]
    if tracker:
        command += ["--tracker", tracker, "--key", key]
    if progress:
        progress("starting the emulated device (qemu-aarch64)")
    return Agent(command, env, "emulated device (qemu-aarch64)", start_timeout_s=180, token=token)


if __name__ == "__main__":
    print(ensure_sysroot(lambda message: print(message, file=sys.stderr)))
