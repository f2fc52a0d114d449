"""Measuring a library over an RPC session: latency, memory, a per-layer profile and onnxruntime's
time beside it, all on the device."""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..compile.backends import Backend, backend_of
from ..runtime import latency_stats
from ..device import answering
from ..errors import CompactDeployError

CHUNK_RUNS = 20  # timed runs per RPC call: a device that drops keeps all finished chunks
CHUNK_MS = 100.0  # with a minimum time, a call times this long at least (fewer round trips for a fast model)
# A few dozen milliseconds of runs sample one moment of the device, fast or slow on a shared
# machine, so short medians disagree between builds of one model (docs/benchmarks/measurement-window.md).
MIN_TIMED_MS = 1000.0  # time at least this long by default (more runs than --repeat where the model is fast)
WARMUP_MS = 200.0  # untimed runs add up to at least this long when a minimum time is asked for
MAX_RUNS = 200_000  # a bound on the runs a minimum time adds
PER_LAYER_TOLERANCE = 0.25  # kernels timed alone may sum to within 25 % of the whole model
# A library's quiet time: this percentile of its chunks' medians. On a shared machine another
# tenant's busy spells slow some chunks, and two models not alike (a small model's many short kernels
# wait more for the cores, a big one's weights for memory), so a ratio of whole medians moves with
# how much of the window the spells covered.
QUIET_PERCENTILE = 10
# Where the reference's quiet time in a window is this much over its quietest yet, the device was
# busy through the window: the pair is timed again, QUIET_TRIES windows in all at most, after a pause
# of BUSY_PAUSE_S times the windows so far (another tenant's busy spells last seconds to a minute).
BUSY_WINDOW = 0.05
QUIET_TRIES = 3
BUSY_PAUSE_S = 3.0


@dataclass(frozen=True)
class Measurement:
    latency_ms: dict[str, float] | None  # median, p90, p99, mean, std, min, runs
    runs_requested: int
    cut_short: str | None  # why fewer runs than requested completed, or None
    cold_ms: float | None  # the first inference in a fresh process, timed on the device
    load_ms: float | None  # loading the library and creating the VM, timed on the device
    memory: dict[str, int | None]  # rss_before_bytes, peak_rss_growth_bytes
    output: np.ndarray
    device: dict[str, Any]  # the device's fingerprint (emulated or not, CPU, TVM version, ...)
    per_layer: dict[str, Any] | None
    onnxruntime: dict[str, Any]  # baseline on the same device, or {"not_measured": reason}
    load: dict[str, Any] | None = None  # other work on the device while timing (runtime.load.load_between)
    # the reference library's latency, timed in turns with the model's (``measure``'s ``reference``)
    reference_latency_ms: dict[str, float] | None = None
    chunk_ms: tuple[float, ...] = ()  # the median of each chunk of timed runs, in order
    reference_chunk_ms: tuple[float, ...] = ()  # the reference's, one per turn
    window_medians_ms: tuple[float, ...] = ()  # the median of each window timed alone (``second_window``)

    @property
    def windows_differ(self) -> bool:
        """Timed alone in two windows whose medians differ by more than BUSY_WINDOW: the device was
        slowed through one, and the figures are the quicker's (``_kept_window``)."""
        medians = self.window_medians_ms
        return len(medians) > 1 and max(medians) > min(medians) * (1 + BUSY_WINDOW)


def quiet_times(measurements) -> tuple[float, float]:
    """The model's and the reference's quiet times (ms) over ``measurements`` of one pair timed in
    turns: QUIET_PERCENTILE of each library's chunk medians, all measurements' chunks together."""
    model = [ms for m in measurements for ms in m.chunk_ms]
    reference = [ms for m in measurements for ms in m.reference_chunk_ms]
    if not model or not reference:
        raise ValueError("quiet_times needs measurements timed in turns with a reference")
    return float(np.percentile(model, QUIET_PERCENTILE)), float(np.percentile(reference, QUIET_PERCENTILE))


def time_quietly(measure_window: Callable[[], Measurement], quietest_reference_ms: float | None,
                 progress: Callable[[str], None] | None = None, pause: Callable[[float], None] = time.sleep,
                 ) -> list[Measurement]:
    """Windows of one pair timed in turns (``measure_window`` times one): the first, and more while
    the reference's quiet time over them is BUSY_WINDOW over ``quietest_reference_ms`` (its quietest
    in earlier windows; None: no window to compare with), QUIET_TRIES windows in all at most, each
    after a pause (``pause(seconds)``) growing by BUSY_PAUSE_S."""
    say = progress or (lambda _: None)
    windows = []
    while True:
        windows.append(measure_window())
        if not windows[-1].reference_chunk_ms:
            return windows
        reference_ms = quiet_times(windows)[1]
        if quietest_reference_ms is None or reference_ms <= quietest_reference_ms * (1 + BUSY_WINDOW) \
                or len(windows) >= QUIET_TRIES:
            return windows
        wait_s = BUSY_PAUSE_S * len(windows)
        say(f"the reference ran {reference_ms / quietest_reference_ms - 1:.0%} over its quietest beside it: the device "
            f"was busy through the window; timing again in {wait_s:.0f} s")
        pause(wait_s)


def time_alone_quietly(measure_window: Callable[[], Measurement], progress: Callable[[str], None] | None = None,
                       pause: Callable[[float], None] = time.sleep) -> list[Measurement]:
    """Windows of one library timed alone (``measure_window`` times one): two, a pause apart, and
    more while no two of them agree within BUSY_WINDOW in quiet time, QUIET_TRIES in all at most. One
    window alone cannot tell a busy spell from the library's own time, and a model that scales a
    whole search (the unpruned one) must not be timed in one; ``quiet_time`` reads them."""
    say = progress or (lambda _: None)
    windows = [measure_window()]
    pause(BUSY_PAUSE_S)
    while True:
        windows.append(measure_window())
        quiet = sorted(_quiet_ms(w) for w in windows)
        if quiet[1] <= quiet[0] * (1 + BUSY_WINDOW) or len(windows) >= QUIET_TRIES:
            return windows
        wait_s = BUSY_PAUSE_S * len(windows)
        say(f"its windows differ by {quiet[1] / quiet[0] - 1:.0%} in quiet time: the device was busy through one; "
            f"timing again in {wait_s:.0f} s")
        pause(wait_s)


def quiet_time(windows: list[Measurement]) -> float:
    """A library's quiet time alone over ``windows``: QUIET_PERCENTILE of every window's chunk
    medians together, the statistic ``quiet_times`` gives a pair timed in turns. Not the median of
    the quietest window: a shared host can run the model at half speed for seconds, in some chunks
    of each window, so every window's median was the slow one while its quiet chunks were not."""
    return float(np.percentile([ms for w in windows for ms in (w.chunk_ms or [w.latency_ms["median"]])],
                               QUIET_PERCENTILE))


def _quiet_ms(measurement: Measurement) -> float:
    return quiet_time([measurement])


class QuietTimer:
    """Times pairs in turns (``time_quietly``), keeping the reference's quietest quiet time across
    them: what a later window is judged busy against."""

    def __init__(self) -> None:
        self.quietest_reference_ms: float | None = None

    def time(self, measure_window: Callable[[], Measurement], progress: Callable[[str], None] | None = None,
             pause: Callable[[float], None] = time.sleep) -> list[Measurement]:
        windows = time_quietly(measure_window, self.quietest_reference_ms, progress, pause)
        if windows[0].reference_chunk_ms:
            reference_ms = quiet_times(windows)[1]
            self.quietest_reference_ms = min(self.quietest_reference_ms or reference_ms, reference_ms)
        return windows


def measure(
    session,
    lib_path: str | Path,
    x: np.ndarray,
    *,
    arch: str,
    backend: Backend | None = None,
    repeat: int = 100,
    warmup: int = 10,
    kernels_path: str | Path | None = None,
    onnx_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    min_timed_ms: float = 0.0,
    reference: str | Path | None = None,
    second_window: bool = False,
) -> Measurement:
    """Upload ``lib_path`` to the device of ``session`` and measure it there (``backend``: the
    library's, by default the CPU's). ``min_timed_ms``: time more than ``repeat`` runs (up to
    MAX_RUNS) until they add up to this long, after warm-up runs of WARMUP_MS at least; 0: exactly
    ``warmup`` and ``repeat`` runs. ``reference``: another library of the same input (the unpruned
    model), timed in turns with this one, a chunk each, about as long: a device's slow minute then
    slows both (``reference_latency_ms``; ``quiet_times`` compares the two by their quiet chunks).
    ``second_window``: without a reference, time the model again after the profile, seconds later,
    and keep what ``_kept_window`` keeps (``window_medians_ms`` has both); not on an emulated device."""
    from tvm import relax
    from tvm import runtime as tvm_runtime

    backend = backend or backend_of("llvm")
    device_kind = backend.device
    say = progress or (lambda _: None)
    if repeat < 1:
        raise CompactDeployError(f"--repeat must be at least 1 (got {repeat})")
    fingerprint = session.fingerprint
    if fingerprint is not None and fingerprint["machine"] != arch:
        raise CompactDeployError(
            f"the library is built for {arch}, but {session.address} is {fingerprint['machine']}: "
            "build for that device's target (see 'compactdeploy targets')"
        )
    if fingerprint is not None and device_kind == "cuda" and not fingerprint.get("cuda"):
        why = fingerprint.get("cuda_missing")
        raise CompactDeployError(f"{session.address} has no CUDA GPU that TVM can use"
                                 + (f" ({why})" if why else "") + "; the library needs one")
    agent = fingerprint is not None
    remote, dev = session.remote, session.device(device_kind)

    with answering(session.address, "loading the model"):
        memory_before = session.call("compactdeploy.memory", 1) if agent else None
        with tempfile.TemporaryDirectory(prefix="compactdeploy-measure-") as tmp:
            input_path = Path(tmp, "input.npy")
            np.save(input_path, x)
            say("uploading the library")
            remote.upload(str(lib_path), "model.so")
            remote.upload(str(input_path), "input.npy")
        first = session.call("compactdeploy.first_run", "model.so", "input.npy", device_kind) if agent else {}
        vm = relax.VirtualMachine(remote.load_module("model.so"), dev)
        x_device = tvm_runtime.tensor(x, dev)
        output = vm["main"](x_device).numpy()
        reference_vm = None
        if reference is not None:
            remote.upload(str(reference), "reference.so")
            reference_vm = relax.VirtualMachine(remote.load_module("reference.so"), dev)
        reference_run_ms = 0.0
        for machine in (vm, reference_vm):
            if machine is None or not warmup:
                continue
            warmed_s = machine.time_evaluator("main", dev, number=warmup, repeat=1)(x_device).mean * warmup
            reference_run_ms = warmed_s * 1e3 / warmup  # the reference's, once both are warm
            if min_timed_ms and warmed_s * 1e3 < WARMUP_MS:
                more = math.ceil((WARMUP_MS - warmed_s * 1e3) / max(warmed_s * 1e3 / warmup, 1e-3))
                machine.time_evaluator("main", dev, number=min(more, MAX_RUNS), repeat=1)(x_device)

    window = _time_window(session, vm, reference_vm, x_device, dev, repeat, min_timed_ms, reference_run_ms, say)
    if not window.times_ms:
        raise CompactDeployError(window.cut_short)
    latency, cut_short = latency_stats(window.times_ms), window.cut_short

    memory = {"rss_before_bytes": None, "peak_rss_growth_bytes": None}
    per_layer, baseline = None, {"not_measured": "the device runs a stock TVM RPC server, not compactdeploy's agent"}
    if agent and cut_short is None:
        try:
            with answering(session.address, "measuring memory"):
                after = session.call("compactdeploy.memory", 0)
            memory["rss_before_bytes"] = memory_before["rss_bytes"]
            if memory_before["peak_reset"]:
                memory["peak_rss_growth_bytes"] = max(0, after["peak_rss_bytes"] - memory_before["rss_bytes"])
            if kernels_path is not None and backend.profiles_layers:
                say("timing each kernel (per-layer profile)")
                with answering(session.address, "timing kernels"):
                    per_layer = _per_layer(session, Path(kernels_path), latency["median"], repeat)
            if onnx_path is not None and backend.profiles_layers:
                say("onnxruntime baseline on the device")
                with answering(session.address, "running onnxruntime"):
                    baseline = _onnxruntime_baseline(session, Path(onnx_path), repeat, warmup, latency["median"],
                                                     min_timed_ms)
        except CompactDeployError as exc:
            cut_short = f"all {repeat} runs finished, then {exc}"
    window_medians = (latency["median"],)
    if second_window and cut_short is None and reference_vm is None and not (fingerprint or {}).get("emulated"):
        say("timing it again: a second window, seconds after the first")
        again = _time_window(session, vm, None, x_device, dev, repeat, min_timed_ms, 0.0, say)
        if again.cut_short is None:
            window_medians += (float(np.median(again.times_ms)),)
            if _kept_window(window, again) is again:  # the profile's ratios to the whole model follow it
                window, latency = again, latency_stats(again.times_ms)
                if per_layer and "kernels" in per_layer:
                    per_layer = {**per_layer, **_kernels_against_whole(per_layer["sum_ms"], latency["median"])}
                if (baseline.get("latency_ms") or {}).get("median"):
                    baseline = {**baseline, "tvm_over_onnxruntime": latency["median"] / baseline["latency_ms"]["median"]}
    return Measurement(
        latency_ms=latency,
        runs_requested=repeat,
        cut_short=cut_short,
        cold_ms=first.get("cold_ms"),
        load_ms=first.get("load_ms"),
        memory=memory,
        output=output,
        device=fingerprint or {"hostname": session.address.host, "emulated": None},
        per_layer=per_layer,
        onnxruntime=baseline,
        load=window.load,
        reference_latency_ms=latency_stats(window.reference_ms) if window.reference_ms else None,
        chunk_ms=window.chunk_ms,
        reference_chunk_ms=window.reference_chunk_ms,
        window_medians_ms=window_medians,
    )


@dataclass(frozen=True)
class _Window:
    """One window of timed runs (and the reference's, timed in turns), as ``_time_window`` times it."""

    times_ms: list[float]
    reference_ms: list[float]
    chunk_ms: tuple[float, ...]
    reference_chunk_ms: tuple[float, ...]
    cut_short: str | None
    load: dict[str, Any] | None


def _time_window(session, vm, reference_vm, x_device, dev, repeat: int, min_timed_ms: float,
                 reference_run_ms: float, say: Callable[[str], None]) -> _Window:
    """Time ``vm`` in chunks (``reference_vm`` in turns, a chunk each about as long) until ``repeat``
    runs and ``min_timed_ms`` are reached; a dropped connection keeps the chunks that finished."""
    times_ms, reference_ms, cut_short = [], [], None
    chunks, reference_chunks = [], []
    session.cpu_load(mark=True)  # other work while timing, the model's own runs left out
    wanted = repeat

    def more_runs() -> bool:
        nonlocal wanted
        if len(times_ms) >= wanted and sum(times_ms) < min_timed_ms and wanted < MAX_RUNS:
            per_run = max(sum(times_ms) / len(times_ms), 1e-6)
            wanted = min(MAX_RUNS, len(times_ms) + math.ceil((min_timed_ms - sum(times_ms)) / per_run))
        return len(times_ms) < wanted

    while more_runs():
        chunk = CHUNK_RUNS
        if min_timed_ms and times_ms:
            chunk = max(chunk, math.ceil(CHUNK_MS / max(sum(times_ms) / len(times_ms), 1e-6)))
        runs = min(chunk, wanted - len(times_ms))
        try:
            # number=1: each repeat is one inference, so the results are the distribution itself
            with answering(session.address, "timing"):
                result = vm.time_evaluator("main", dev, number=1, repeat=runs)(x_device)
        except CompactDeployError as exc:  # the connection dropped or the device died: keep what finished
            cut_short = f"stopped after {len(times_ms)} of {wanted} runs ({exc})"
            break
        chunk_ms = [t * 1e3 for t in result.results]
        times_ms += chunk_ms
        chunks.append(float(np.median(chunk_ms)))
        if reference_vm is not None:  # its turn: about as long as the model's chunk
            per_run = reference_run_ms or sum(chunk_ms) / len(chunk_ms)
            runs = max(1, min(MAX_RUNS, round(sum(chunk_ms) / max(per_run, 1e-6))))
            try:
                with answering(session.address, "timing the reference"):
                    result = reference_vm.time_evaluator("main", dev, number=1, repeat=runs)(x_device)
            except CompactDeployError as exc:
                cut_short = f"stopped after {len(times_ms)} of {wanted} runs ({exc})"
                break
            reference_ms += [t * 1e3 for t in result.results]
            reference_chunks.append(float(np.median(result.results)) * 1e3)
            reference_run_ms = float(np.median(reference_ms))
        say(f"timed {len(times_ms)}/{wanted} runs")
    load = session.cpu_load(mark=False) if cut_short is None and times_ms else None
    return _Window(times_ms, reference_ms, tuple(chunks), tuple(reference_chunks), cut_short, load)


def _kept_window(first: _Window, second: _Window) -> _Window:
    """Of two windows of one library timed alone, the one its figures come from: the first, unless
    the second's median is more than BUSY_WINDOW quicker. A device slowed through one window
    (another tenant's busy spell; on a VM, a core taken away for seconds, unseen as steal) reads up
    to 2.4x there (docs/benchmarks/thread-windows.md); nothing makes a window quicker."""
    if float(np.median(first.times_ms)) > float(np.median(second.times_ms)) * (1 + BUSY_WINDOW):
        return second
    return first


def _per_layer(session, kernels_path: Path, whole_ms: float, repeat: int) -> dict[str, Any]:
    kernels = json.loads(kernels_path.read_text())
    timed = session.call("compactdeploy.time_kernels", json.dumps(kernels), max(10, min(repeat, 100)))
    if isinstance(timed, dict):
        return {"error": timed["error"]}
    in_model = session.call("compactdeploy.time_kernels_in_model", max(10, min(repeat, 50)))
    if "error" in in_model:
        return {"error": in_model["error"]}
    calls = {k["name"]: k["calls"] for k in kernels}
    rows = [
        {"kernel": t["name"], "calls": calls[t["name"]], "median_ms": t["median_ms"], "total_ms": t["median_ms"] * calls[t["name"]],
         "in_model_ms": in_model[t["name"]]}
        for t in timed
    ]
    total = sum(r["total_ms"] for r in rows)
    in_model_total = sum(r["in_model_ms"] * r["calls"] for r in rows)
    for row in rows:
        row["share"] = row["total_ms"] / total if total else 0.0
    return {
        "kernels": sorted(rows, key=lambda r: -r["total_ms"]),
        "sum_ms": total,
        "in_model_sum_ms": in_model_total,
        **_kernels_against_whole(total, whole_ms),
        "method": "median_ms: each kernel timed alone on random inputs of its shapes (median of 10 repeats), times its "
                  "call count; in_model_ms: each kernel's median per call inside the model's own runs (the VM's "
                  "instrument hook), where its data is where the kernel before it left it",
    }


def _kernels_against_whole(kernels_ms: float, whole_ms: float) -> dict[str, Any]:
    return {
        "whole_model_median_ms": whole_ms,
        "sum_over_whole": kernels_ms / whole_ms if whole_ms else None,
        "tolerance": PER_LAYER_TOLERANCE,
        "within_tolerance": bool(whole_ms) and abs(kernels_ms / whole_ms - 1) <= PER_LAYER_TOLERANCE,
    }


def _onnxruntime_baseline(session, onnx_path: Path, repeat: int, warmup: int, tvm_median: float,
                          min_timed_ms: float) -> dict[str, Any]:
    session.remote.upload(str(onnx_path), "model.onnx")
    # timed as long as TVM was: a ratio of a long window to a short one would carry the short one's luck
    result = session.call("compactdeploy.onnxruntime_times", "model.onnx", "input.npy", repeat, warmup,
                          json.dumps({"min_timed_ms": min_timed_ms, "warmup_ms": WARMUP_MS if min_timed_ms else 0.0,
                                      "max_runs": MAX_RUNS}))
    if "error" in result:
        return {"not_measured": result["error"]}
    stats = latency_stats(result["times_ms"])
    return {
        "latency_ms": stats,
        "version": result["version"],
        "tvm_over_onnxruntime": tvm_median / stats["median"] if stats["median"] else None,
        "method": "InferenceSession.run timed with perf_counter on the device, same thread count",
    }
