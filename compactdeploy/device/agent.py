"""The device side: a TVM RPC server with a few measuring functions of compactdeploy's own.

Runs on the board (or under qemu, or on the host as a local device) with only the standard library,
numpy and the TVM runtime: ``TVM_USE_RUNTIME_LIB=1`` works, so the 240 MB compiler library can be
left off the device. Started by ``compactdeploy device serve``; of compactdeploy it imports only
``runtime`` (which has the same needs).

The stock TVM RPC server runs every session in a forked child, so the functions registered here
exist in the process that loads and runs the model, and the memory they read is that process's.

SECURITY: a TVM RPC server runs whatever code its clients send. This one serves only clients that
present its access token (``listener``); the token travels in clear text, so serve only on a
trusted network (or over an SSH tunnel). The default address is 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import sys
import time
from pathlib import Path

from compactdeploy.runtime.load import cpu_times, load_between

EMULATED_ENV = "COMPACTDEPLOY_EMULATED"
EMULATED_CPU_ENV = "COMPACTDEPLOY_EMULATED_CPU"
# one line on stdout tells a parent process which port the server bound
PORT_LINE = "compactdeploy-agent-port"
# the access token: how a launcher gives it to the agent, and how a user gives it to clients
TOKEN_ENV = "COMPACTDEPLOY_DEVICE_TOKEN"

# The model loaded by first_run, kept for the session's later calls (one model per session).
_SESSION: dict = {}


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def fingerprint(threads: int | None = None) -> dict:
    """What machine this is: enough to tell a Pi 4 from an emulated one or from the build host.

    ``threads``: the count a process started to run models here will use (default: this one's)."""
    from compactdeploy.runtime import threads_in_use, threads_pinned

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key = line.split(":")[0].strip().lower()
                if key in ("model name", "hardware", "cpu model"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    governor = max_mhz = None
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") as handle:
            governor = handle.read().strip()
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as handle:
            max_mhz = int(handle.read()) // 1000
    except (OSError, ValueError):
        pass
    import tvm

    if os.environ.get(EMULATED_ENV) == "1":
        # qemu-user shows the host's /proc/cpuinfo; name the CPU that is really being emulated
        cpu = f"{os.environ.get(EMULATED_CPU_ENV, 'aarch64')} emulated by qemu-user on {cpu}"
    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "governor": governor,
        "max_mhz": max_mhz,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tvm_version": tvm.__version__,
        **_cuda_fields(),
        "threads": str(threads) if threads else threads_in_use(),
        "threads_pinned": threads_pinned(),  # one per core (TVM's default) or not (compactdeploy's)
        # qemu-user reports the guest's machine; only its launcher knows the CPU is emulated
        "emulated": os.environ.get(EMULATED_ENV) == "1",
        "l2_cache_bytes": _l2_cache_bytes(),
    }


def _l2_cache_bytes() -> int | None:
    """The size of the second-level cache cpu0 reads through (a model whose weights exceed it reads
    them from further out on every run), or None where the kernel does not say."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2" or (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except ValueError:
            return None
    return None


def _cuda_fields() -> dict:
    """``cuda``: the first CUDA GPU's name, or None; ``cuda_missing``: why TVM finds none (plugin, CUDA
    runtime or driver missing), None where it finds one."""
    try:
        return {"cuda": str(_device("cuda").device_name), "cuda_missing": None}
    except Exception as exc:  # no CUDA plugin, runtime or driver: no GPU as far as TVM is concerned
        return {"cuda": None, "cuda_missing": str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}


def _workpath(name: str) -> str:
    import tvm

    return tvm.get_global_func("tvm.rpc.server.workpath")(name) if os.sep not in name else name


def memory(reset: int) -> str:
    """RSS and peak RSS of this session's process; ``reset`` restarts the peak from now."""
    reset_ok = False
    if reset:
        try:  # writing 5 to clear_refs resets VmHWM (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            reset_ok = True
        except OSError:
            pass
    rss, hwm = _status_kb("VmRSS"), _status_kb("VmHWM")
    return json.dumps({
        "rss_bytes": None if rss is None else rss * 1024,
        "peak_rss_bytes": None if hwm is None else hwm * 1024,
        "peak_reset": reset_ok,
    })


# /proc/stat counts in ticks (10 ms at the usual 100 Hz): a shorter window than this reads as noise
MIN_LOAD_WINDOW_S = 0.5


def cpu_load(mark: int) -> str:
    """``mark=1``: remember this moment; ``mark=0``: other work's share of the CPU since then (JSON,
    null where unknown). Timed across a measurement, so its own runs are left out; a measurement
    shorter than ``MIN_LOAD_WINDOW_S`` (a small model's 100 runs) is followed by a wait to fill it."""
    if mark:
        _SESSION["cpu_mark"] = (time.monotonic(), cpu_times())
        return json.dumps(None)
    if "cpu_mark" not in _SESSION:
        return json.dumps(None)
    marked_at, start = _SESSION.pop("cpu_mark")
    time.sleep(max(0.0, marked_at + MIN_LOAD_WINDOW_S - time.monotonic()))
    return json.dumps(load_between(start, cpu_times()))


def _device(kind: str):
    from compactdeploy.runtime.run import tvm_device

    return tvm_device(kind)


def first_run(lib_name: str, input_name: str, device_kind: str) -> str:
    """Load the library and run it once, timing both here on the device (no RPC in the figures)."""
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = _device(device_kind)
    start = time.perf_counter()
    module = tvm.runtime.load_module(_workpath(lib_name))
    vm = VirtualMachine(module, dev)
    load_s = time.perf_counter() - start
    x = tvm.runtime.tensor(np.load(_workpath(input_name)), dev)
    start = time.perf_counter()
    vm["main"](x)
    dev.sync()
    cold_s = time.perf_counter() - start
    _SESSION.update(module=module, vm=vm, dev=dev, x=x)
    return json.dumps({"load_ms": load_s * 1e3, "cold_ms": cold_s * 1e3})


def time_kernels(kernels_json: str, repeat: int) -> str:
    """Median time of each compiled kernel alone, on random inputs of its shapes (needs first_run)."""
    if "module" not in _SESSION or not _SESSION["module"].imports:
        return json.dumps({"error": "no model loaded in this session"})
    return json.dumps(time_each_kernel(_SESSION["module"].imports[0], _SESSION["dev"], json.loads(kernels_json), repeat))


def time_each_kernel(kernel_module, dev, kernels: list[dict], repeat: int, flush_cache: bool = False) -> list[dict]:
    """Each kernel of a compiled model alone: ``kernels`` as in kernels.json, median of 10 repeats.

    ``flush_cache``: every argument but the first (the input) is evicted from the CPU caches before
    each run, one run per repeat (``repeat`` of them), as a kernel's weights are inside a model.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    results = []
    for kernel in kernels:
        args = random_kernel_args(kernel, dev, rng)
        if flush_cache:
            timer = kernel_module.time_evaluator(kernel["name"], dev, number=1, repeat=repeat,
                                                 f_preproc="cache_flush_cpu_non_first_arg")
        else:
            timer = kernel_module.time_evaluator(kernel["name"], dev, number=max(1, repeat // 10), repeat=10)
        results.append({"name": kernel["name"], "median_ms": float(np.median(timer(*args).results)) * 1e3})
    return results


def random_kernel_args(kernel: dict, dev, rng) -> list:
    """Arguments for one kernel of kernels.json: random floats, zeros for integer arguments."""
    import numpy as np
    import tvm

    return [
        tvm.runtime.tensor(rng.standard_normal(a["shape"]).astype(a["dtype"]), dev)
        if a["dtype"].startswith("float") else tvm.runtime.tensor(np.zeros(a["shape"], a["dtype"]), dev)
        for a in kernel["args"]
    ]


def time_kernels_in_model(runs: int) -> str:
    """Each kernel's median time per call inside the loaded model's runs (needs first_run)."""
    if "vm" not in _SESSION:
        return json.dumps({"error": "no model loaded in this session"})
    return json.dumps(time_each_kernel_in_model(_SESSION["vm"], _SESSION["x"], runs))


def time_each_kernel_in_model(vm, x, runs: int, rerun_first: bool = False) -> dict[str, float]:
    """Each kernel's median time per call (ms) while the whole model runs ``runs`` times, by name.

    Timed from the Relax VM's hook before and after every call, so a kernel meets its data where the
    model leaves it: written by the kernel before it, partly on the other cores, the weights of
    the whole model competing for the caches. Timed alone (``time_each_kernel``, and MetaSchedule
    while tuning) the same kernel reads what it read the run before, warm in its own core's cache,
    and can be several times faster. The hook adds a Python call around each kernel (~1 us).

    ``rerun_first``: each kernel also runs once, untimed, just before its timed call, so the timed
    call finds its weights cached and its input where its own thread split puts it; the rest of the
    model's surroundings stay (a diagnosis: the model's results are not meant to be read then).
    """
    import numpy as np

    times: dict[str, list[float]] = {}
    started: list[float] = [0.0]

    def instrument(func, symbol, before, _result, *args):
        if symbol.startswith("vm.builtin."):  # the VM's own bookkeeping: not a kernel
            return 0
        if before:
            if rerun_first:
                func(*args)
            started[0] = time.perf_counter()
        else:
            times.setdefault(symbol, []).append(time.perf_counter() - started[0])
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    vm["main"](x)  # warm-up, and the pooled allocator's buffers
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            vm["main"](x)
    finally:
        vm.set_instrument(None)
    return {symbol: float(np.median(each)) * 1e3 for symbol, each in times.items()}


def onnxruntime_times(onnx_name: str, input_name: str, repeat: int, warmup: int, window: str = "{}") -> str:
    """Per-run times of the same model in onnxruntime on this device, if it is installed here.

    ``window`` (JSON): ``min_timed_ms``, ``warmup_ms`` and ``max_runs``, the same minimum times the
    TVM measurement beside it had (bench.session.measure)."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return json.dumps({"error": "onnxruntime is not installed on the device"})
    from compactdeploy.runtime import threads_in_use

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads_in_use())  # as many as TVM's
    session = ort.InferenceSession(_workpath(onnx_name), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.load(_workpath(input_name))}
    limits = json.loads(window)
    min_timed_ms, warmup_ms = limits.get("min_timed_ms", 0.0), limits.get("warmup_ms", 0.0)
    max_runs = max(repeat, int(limits.get("max_runs", repeat)))
    start = time.perf_counter()
    for run in range(max_runs):
        if run >= warmup and (time.perf_counter() - start) * 1e3 >= warmup_ms:
            break
        session.run(None, feed)
    times = []
    while len(times) < repeat or (sum(times) < min_timed_ms and len(times) < max_runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return json.dumps({"times_ms": times, "version": ort.__version__})


def install_bundle(archive_name: str, destination: str) -> str:
    """Unpack a shipped bundle archive to ``destination`` (verified, then renamed into place).

    A relative ``destination`` is under the agent's home directory: the session's own working
    directory is deleted when the session ends.
    """
    from compactdeploy.runtime import BundleError, install_archive

    path = os.path.expanduser(destination)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser("~"), path)
    try:
        return json.dumps(install_archive(_workpath(archive_name), path))
    except BundleError as exc:
        return json.dumps({"error": str(exc)})
    except Exception as exc:  # report anything else in one line too, rather than as an RPC failure
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"})


def random_fill_for_measure(tensor) -> None:
    """Random inputs for MetaSchedule's measurements, where the TVM runtime lacks its own.

    The runtime-only library a device loads (TVM_USE_RUNTIME_LIB=1, and the emulated Pi) has no
    ``tvm.contrib.random``; numpy fills the tensor instead.
    """
    import numpy as np

    rng = np.random.default_rng()
    dtype = np.dtype(str(tensor.dtype))
    shape = tuple(int(d) for d in tensor.shape)
    if dtype.kind in "iu":
        values = rng.integers(0, 8, size=shape).astype(dtype)
    elif dtype.kind == "b":
        values = rng.integers(0, 2, size=shape).astype(dtype)
    else:
        values = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
    tensor.copyfrom(values)


FUNCTIONS = {
    "compactdeploy.fingerprint": lambda: json.dumps(fingerprint()),
    "compactdeploy.memory": memory,
    "compactdeploy.first_run": first_run,
    "compactdeploy.time_kernels": time_kernels,
    "compactdeploy.time_kernels_in_model": time_kernels_in_model,
    "compactdeploy.onnxruntime_times": onnxruntime_times,
    "compactdeploy.install_bundle": install_bundle,
    "compactdeploy.cpu_load": cpu_load,
}


def _keep_torch_out() -> None:
    """Stop TVM's FFI from importing torch into the agent, which never uses it.

    tvm_ffi imports torch whenever it is installed; a CUDA build of torch loaded in this process
    before a session is forked leaves the CUDA driver unable to start in the session (cuInit:
    CUDA_ERROR_NOT_INITIALIZED), so a Jetson or GPU host with torch measured nothing."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # "import torch" now raises ImportError, which tvm_ffi skips


def serve(host: str, port: int, port_end: int, tracker: str | None, key: str, token: str | None,
          on_ready=None, threads: int | None = None) -> None:
    """Register the functions and serve until SIGTERM or Ctrl-C; ``on_ready(port)`` once bound.
    ``threads``: TVM's thread count in this agent (default: ``runtime.threads_in_use()``).

    ``token``: clients must present it (``listener.client_key``); None serves anyone who reaches
    the port. Raises ``listener.ListenerDied`` when serving cannot go on.
    """
    _keep_torch_out()
    import tvm_ffi
    from tvm.rpc import server as _session_environment  # noqa: F401 (loads what sessions load: see below)

    from compactdeploy.runtime import THREADS_ENV, use_default_threads

    from .listener import bind, listen

    if threads:  # this process is the agent: its environment is the device's
        os.environ[THREADS_ENV] = str(threads)
    use_default_threads()  # before any model runs; onnxruntime_times takes the same count
    for name, function in FUNCTIONS.items():
        tvm_ffi.register_global_func(name, function, override=True)
    # only where no loaded TVM library has it (the runtime-only one): registering it before the
    # compiler library loads makes that library's own registration abort the process
    if tvm_ffi.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True) is None:
        tvm_ffi.register_global_func("tvm.contrib.random.random_fill_for_measure", random_fill_for_measure)
    tracker_addr = None
    if tracker:
        tracker_host, _, tracker_port = tracker.rpartition(":")
        tracker_addr = (tracker_host, int(tracker_port))
    # our own listener, in this process: the stock one dies on one bad client, and its worker
    # re-executes Python, which fails under qemu-user
    sock = bind(host, port, port_end)
    bound = sock.getsockname()[1]
    print(f"{PORT_LINE} {bound}", flush=True)
    if on_ready:
        on_ready(bound)
    listen(sock, key, token, tracker_addr)


def token_from_environment() -> tuple[str, bool]:
    """The access token clients must give: ``$COMPACTDEPLOY_DEVICE_TOKEN``, else a new random one
    (True: made here, so the user has not seen it yet). Removed from the environment: the code
    that sessions load has no business reading it."""
    given = os.environ.pop(TOKEN_ENV, "").strip()
    return (given, False) if given else (secrets.token_urlsafe(18), True)


def token_line(token: str, host: str, port: int) -> str:
    """How a token the agent made is shown, once: with the address a client gives it in."""
    return f"access token: {token} (clients: rpc://{token}@{host}:{port}, or {TOKEN_ENV}={token})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compactdeploy device agent (a TVM RPC server)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=9090, help="first port to try")
    parser.add_argument("--port-end", type=int, default=0, help="last port to try (default: port + 100)")
    parser.add_argument("--tracker", help="register with a TVM tracker at HOST:PORT")
    parser.add_argument("--key", default="", help="the device key on the tracker (e.g. rpi4)")
    args = parser.parse_args(argv)
    if args.tracker and not args.key:
        parser.error("--tracker needs --key")
    from .listener import ListenerDied

    token, made = token_from_environment()

    def ready(bound: int) -> None:
        if made:
            print(token_line(token, args.host, bound), file=sys.stderr, flush=True)

    try:
        serve(args.host, args.port, args.port_end or args.port + 100, args.tracker, args.key, token, on_ready=ready)
    except (ListenerDied, OSError) as exc:
        print(f"error: the agent stopped serving: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
