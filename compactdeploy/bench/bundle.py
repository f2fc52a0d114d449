"""Benchmark stage: measure a bundle's library on the deployment's device, check it computes what
onnxruntime does, and say where the figures come from (real hardware, emulated, or unknown)."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CompactDeployError
from ..stages import Observer, Progress, StageClock
from .session import MIN_TIMED_MS, Measurement, measure


@dataclass(frozen=True)
class Measured:
    """A bundle measured (or why not): what ``report.apply_measurement`` writes into a report."""

    measurement: Measurement | None
    where: str  # where the figures come from, or why there are none
    summary: str  # one line for the stage's progress display
    onnx_vs_tvm_max_abs: float | None = None


def measure_bundle(directory: Path, deployment, repeat: int, warmup: int, progress: Progress | None = None,
                   open_session=None, profile: bool = True, min_timed_ms: float = MIN_TIMED_MS,
                   reference: Path | None = None) -> Measured:
    """Measure the library in ``directory`` where ``deployment`` (``deployment.Deployment``) says;
    ``open_session``: a session factory already open on that device (the width search's), else one
    is opened for this measurement (on this machine, a fresh agent: its memory figures are the model's).
    ``profile``: also time each kernel and onnxruntime on the device, then the model again in a
    second window (without a reference: ``measure``'s ``second_window``); ``min_timed_ms`` and
    ``reference`` (a library timed in turns with this one): see ``measure``."""
    from ..bundle import SAMPLE_INPUT
    from ..export import check_parity, run_onnxruntime
    from ..runtime.load import describe_load, is_busy

    if not deployment.measurable:
        return Measured(None, deployment.not_measured_reason(), "not measured: no device")
    x = np.load(directory / SAMPLE_INPUT)
    sessions = contextlib.nullcontext(open_session) if open_session is not None else deployment.sessions(progress)
    with sessions as open_session:
        session = open_session()
        # asked in the agent: this process may hold the build-time stand-in for the CUDA driver
        if deployment.local and deployment.backend.device == "cuda" and not session.fingerprint.get("cuda"):
            why = session.fingerprint.get("cuda_missing")
            return Measured(None, f"not measured: {why or 'TVM finds no CUDA GPU on this machine'}",
                            "not measured: no GPU")
        measurement = measure(
            session, directory / "model.so", x, arch=deployment.arch, backend=deployment.backend, repeat=repeat,
            warmup=warmup, kernels_path=directory / "kernels.json" if profile else None,
            onnx_path=directory / "model.onnx" if profile else None, progress=progress, min_timed_ms=min_timed_ms,
            reference=reference, second_window=profile,
        )
        del session
    address = deployment.where()
    expected = run_onnxruntime(directory / "model.onnx", x, deployment.threads)  # on this machine
    fingerprint = measurement.device
    if fingerprint.get("emulated"):
        where = (
            f"EMULATED: qemu-user on the build host ({address}); these figures prove the flow and the "
            "numbers the model computes, not the real board's speed"
        )
    elif fingerprint.get("cpu") is None:
        where = f"measured on the device at {address} (a stock TVM server: real or emulated is unknown)"
    else:
        machine = f"{fingerprint['hostname']} ({fingerprint['cpu']})"
        if deployment.backend.device == "cuda" and fingerprint.get("cuda"):
            machine = f"{fingerprint['cuda']} on {machine}"  # the GPU ran the kernels, not the CPU named
        where = f"measured on real hardware: {machine}, {address}"
    if measurement.cut_short:
        where += f"; CUT SHORT: {measurement.cut_short}"
    windows = measurement.window_medians_ms
    if measurement.windows_differ:
        where += (f"; timed in two windows seconds apart, medians {' and '.join(f'{ms:.4g}' for ms in windows)} ms: "
                  "the device was slowed through one (other work, or on a VM its cores taken away), the quicker "
                  "is reported")
    if is_busy(measurement.load):
        where += (f"; BUSY while timing: {describe_load(measurement.load)}; measure again on an idle device "
                  "(compactdeploy bench), or give TVM fewer threads than the cores left free (--threads)")
    latency = measurement.latency_ms
    return Measured(
        measurement=measurement,
        where=where,
        summary=f"median {latency['median']:.3f} ms over {latency['runs']} runs"
        + (" (emulated)" if fingerprint.get("emulated") else "")
        + (f", the quicker of two windows ({' and '.join(f'{ms:.3f}' for ms in windows)} ms)"
           if measurement.windows_differ else ""),
        onnx_vs_tvm_max_abs=check_parity("onnxruntime vs TVM", expected, measurement.output),
    )


def remeasure(
    directory: Path,
    device: str | None,
    repeat: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    wait_s: float = 60.0,
    observer: Observer | None = None,
    min_time_s: float = MIN_TIMED_MS / 1e3,
) -> dict[str, Any]:
    """Measure an existing bundle (again) on a device and update its report and manifest."""
    import json

    from .. import bundle, runtime
    from ..deployment import for_bundle
    from ..report import apply_measurement, manifest_measured
    from ..resources import write_json

    directory = Path(directory)
    try:
        manifest = runtime.verify(directory, check_machine=False)
    except runtime.BundleError as exc:
        raise CompactDeployError(f"{exc}; rebuild it") from None
    if bundle.SAMPLE_INPUT not in manifest["files"]:
        raise CompactDeployError(f"{directory} was built by an older compactdeploy (no {bundle.SAMPLE_INPUT}); rebuild it")
    deployment = for_bundle(manifest, device, threads, wait_s)
    report = json.loads((directory / "report.json").read_text())
    clock = StageClock(observer)
    with clock.stage("benchmark"):
        measured = measure_bundle(directory, deployment, repeat, warmup, clock.progress, min_timed_ms=min_time_s * 1e3)
        clock.summary = measured.summary
    if measured.measurement is None:
        raise CompactDeployError(measured.where)
    apply_measurement(report, measured)
    with bundle.staged(directory) as staging:
        for path in directory.iterdir():
            if path.is_file():
                shutil.copy2(path, staging / path.name)
        write_json(staging / "report.json", report)
        kept = {k: v for k, v in manifest.items() if k not in ("format", "files")}
        bundle.write_manifest(staging, {**kept, "measured": manifest_measured(report)})
    return report
