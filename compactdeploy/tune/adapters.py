"""MetaSchedule's side: a builder with warm workers, runners on this machine or over RPC, the
evaluator that times each call after a pause, its logging kept quiet, and a kernel's identity."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

from ..errors import first_line

PICK_CALLS = 15  # calls per candidate and round in the second timing, each after a pause
PICK_PAUSE_MS = 1


def ignore_interrupts() -> None:
    """Worker processes share the terminal's process group: Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_INTRINSICS = "tvm.s_tir.tensor_intrin"
_CPU_INTRINSICS = ("x86", "arm_cpu")  # what CPU schedule rules tensorize with (VNNI, AVX-512, Arm dot products)


@contextlib.contextmanager
def cpu_tensor_intrinsics() -> Iterator[None]:
    """MetaSchedule with the CPU tensor intrinsics registered, not every backend's.

    Every tune context imports ``tvm.s_tir.tensor_intrin``, which parses the intrinsics of CUDA,
    ROCm, Hexagon, Metal and RISC-V too, once per process, for rules a CPU never uses (what it
    costs: docs/benchmarks/tuning-startup.md). Within the block that package holds the CPU modules only; after it, a
    plain import registers the rest (the CPU modules stay loaded, registered once).
    """
    import importlib
    import importlib.util
    import sys
    import types

    import tvm.s_tir

    if _INTRINSICS in sys.modules:  # already imported whole (or by an enclosing block)
        yield
        return
    spec = importlib.util.find_spec(_INTRINSICS)
    package = types.ModuleType(_INTRINSICS)
    package.__path__, package.__spec__, package.__file__ = list(spec.submodule_search_locations), spec, spec.origin
    sys.modules[_INTRINSICS] = package
    try:
        for name in _CPU_INTRINSICS:
            importlib.import_module(f"{_INTRINSICS}.{name}")
        yield
    finally:
        del sys.modules[_INTRINSICS]
        if getattr(tvm.s_tir, "tensor_intrin", None) is package:
            delattr(tvm.s_tir, "tensor_intrin")


@contextlib.contextmanager
def metaschedule_logging() -> Iterator[None]:
    """Keep MetaSchedule's logging configuration from printing or failing.

    Every tuning call reconfigures its loggers: it prints a task table per batch to stdout at its
    logger's level (which it resets to DEBUG each time; progress comes through ``say`` instead),
    and it lists that logger's handlers by name, failing on unnamed ones (pytest's capture
    handlers, an application's own), so those are set aside while it runs.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in unnamed:
            logger.addHandler(handler)


def pause_evaluator(rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """The second timing's evaluator: one call per repeat, each after ``PICK_PAUSE_MS`` of sleep
    (a LocalRunner's ``f_run_evaluator``; it runs in the runner's worker on the device)."""
    costs = []
    for args in repeated_args:
        timer = rt_mod.time_evaluator(rt_mod.entry_name, device, number=1, repeat=PICK_CALLS, min_repeat_ms=0,
                                      cooldown_interval_ms=PICK_PAUSE_MS, repeats_to_cooldown=1)
        device.sync()
        costs.extend(float(c) for c in timer(*args).results)
    return costs


def _remote_pause_evaluator(session, rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """``pause_evaluator`` over RPC (an RPCRunner's evaluator also takes the session)."""
    return pause_evaluator(rt_mod, device, evaluator_config, repeated_args)


def device_type(target) -> str:
    """The device a candidate of ``target`` runs on, by the name TVM's runtime knows."""
    return device_name(target.kind.name)


def device_name(device_type: str) -> str:
    """"cpu" for the target kind "llvm": TVM 0.27's runtime and RPC sessions know device names only
    ("Unknown device: llvm")."""
    return "cpu" if device_type == "llvm" else device_type


def kernel_hash(task) -> str:
    """The kernel's identity across processes (what MetaSchedule's JSON database keys workloads by)."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def kernel_flops(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # loops with data-dependent bounds have no static count
        return 1.0


def build_candidate(mod, target, linker_command: str | None, directory: str | None = None) -> str:
    """Compile one scheduled kernel and export it as a shared library under ``directory`` (runs in
    a warm worker)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    library = tvm.compile(mod, target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="candidate-", dir=directory), "candidate.so")
    if linker_command is None:
        library.export_library(path)
    else:
        from tvm.support import cc

        library.export_library(path, fcompile=cc.cross_compiler(linker_command))
    return path


def WarmBuilder(linker_command: str | None, workers: int | None = None, timeout_s: float = 300.0):
    """A MetaSchedule builder whose worker processes live for the whole tuning run."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _WarmBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=workers or os.cpu_count() or 1, timeout=timeout_s,
                                          initializer=ignore_interrupts)
            # every candidate's library, removed at shutdown: MetaSchedule's local runner leaves them
            self.directory = tempfile.mkdtemp(prefix="compactdeploy-tuning-")

        def build(self, build_inputs):
            jobs = [(i.mod, i.target, linker_command, self.directory) for i in build_inputs]
            results = []
            for done in self.pool.map_with_error_catching(lambda job: build_candidate(*job), jobs):
                if done.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(done.value, None))
                else:
                    results.append(BuilderResult(None, f"build {done.status}: {first_line(done.value)}"))
            return results

        def shutdown(self):
            self.pool.shutdown()
            shutil.rmtree(self.directory, ignore_errors=True)

    return _WarmBuilder()


def _evaluator():
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    # ~50 ms of runs per candidate: enough to rank kernels of a few microseconds, short enough
    # that measuring a batch costs less than building it
    return EvaluatorConfig(number=3, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False)


def local_runner(after_pause: bool = False, threads: int | None = None):
    """Measure candidates on this machine, in one worker process kept for the whole run, with
    ``threads`` TVM threads (None: ``runtime.threads_in_use()``), the count builds run them with.

    ``after_pause``: each call after a pause, as ``pick_records`` times them; else back to back.
    """
    from tvm.s_tir.meta_schedule.runner import LocalRunner

    return LocalRunner(timeout_sec=60, evaluator_config=_evaluator(), initializer=functools.partial(worker_setup, threads),
                       f_run_evaluator=pause_evaluator if after_pause else None)


def worker_setup(threads: int | None) -> None:
    """In a runner's worker, before TVM's thread pool starts: the thread count, and Ctrl-C left to the parent."""
    from ..runtime import THREADS_ENV, use_default_threads

    if threads:
        os.environ[THREADS_ENV] = str(threads)
    use_default_threads()
    ignore_interrupts()


def rpc_runner(address, after_pause: bool = False, workers: int = 1):
    """Measure candidates on a device over TVM RPC (a server, or a tracker and a key).

    ``after_pause``: each call after a pause, as ``pick_records`` times them; else back to back.
    ``workers``: candidates measured at once, each in a session of its own (a tracker hands each a
    free board of the key); a board that drops out fails only the candidates it was running.
    """
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    evaluator = _remote_pause_evaluator if after_pause else None

    def connect_server(_config):  # runs in MetaSchedule's worker process: an absolute import
        from compactdeploy.device import open_remote

        return open_remote(address, session_timeout=120)  # through the tracker when it has a key

    # the tracker fields are unused: connect_server opens every session, presenting the token
    config = RPCConfig(tracker_host="unused", tracker_port=1, tracker_key="unused", session_timeout_sec=120)
    runner = RPCRunner(rpc_config=config, evaluator_config=_evaluator(), f_create_session=connect_server,
                       f_run_evaluator=evaluator, max_workers=workers)
    return _named_device_runner(runner)


def _named_device_runner(inner):
    """``inner`` with each candidate's device named "cpu" rather than "llvm".

    MetaSchedule passes the target kind as the device type; TVM 0.27's RPC session accepts device
    names only ("Unknown device: llvm"), so every remote measurement failed without this.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerInput

    @derived_object
    class _Runner(PyRunner):
        def run(self, runner_inputs):
            renamed = [
                RunnerInput(i.artifact_path, device_name(i.device_type), i.args_info)
                for i in runner_inputs
            ]
            return inner.run(renamed)

    return _Runner()
