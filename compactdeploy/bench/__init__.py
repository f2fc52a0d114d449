"""Benchmark stage: latency and memory of a compiled model, measured where it runs.

``measure_local`` runs ``runner.py`` in a fresh process on this machine; the device issue adds the
same measurement over TVM RPC. Both return a ``Measurement``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CompactDeployError

RUNNER = Path(__file__).with_name("runner.py")


@dataclass(frozen=True)
class Measurement:
    latency_ms: dict[str, float]  # median, p90, p99, mean, std, min, runs
    cold_ms: float
    load_ms: float
    peak_rss_growth_bytes: int | None
    output: np.ndarray
    measured_on: dict[str, Any]
    threads: int | None


def latency_stats(times_ms: list[float]) -> dict[str, float]:
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


def measure_local(
    lib_path: str | Path,
    x: np.ndarray,
    repeat: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    timeout_s: float = 600,
) -> Measurement:
    """Load and time ``lib_path`` in a new process on this machine."""
    if repeat < 1:
        raise CompactDeployError(f"--repeat must be at least 1 (got {repeat})")
    env = dict(os.environ)
    # The runner needs only the TVM runtime; skipping the compiler library saves ~200 MB of RSS.
    env["TVM_USE_RUNTIME_LIB"] = "1"
    if threads:
        env["TVM_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="compactdeploy-bench-") as tmp:
        input_path, output_path = Path(tmp, "input.npy"), Path(tmp, "output.npy")
        np.save(input_path, x)
        command = [
            sys.executable, str(RUNNER), "--lib", str(lib_path), "--input", str(input_path),
            "--output", str(output_path), "--repeat", str(repeat), "--warmup", str(warmup),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise CompactDeployError(f"benchmark of {lib_path} took longer than {timeout_s:.0f} s") from None
        report = _parse_runner_output(done.stdout, done.stderr)
        output = np.load(output_path)
    return Measurement(
        latency_ms=latency_stats(report["times_ms"]),
        cold_ms=report["cold_ms"],
        load_ms=report["load_ms"],
        peak_rss_growth_bytes=report["peak_rss_growth_bytes"],
        output=output,
        measured_on=report["device"],
        threads=int(report["threads"]) if report.get("threads") else None,
    )


def _parse_runner_output(stdout: str, stderr: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        raise CompactDeployError(f"the benchmark runner failed: {tail}")
    report = json.loads(lines[-1])
    if "error" in report:
        raise CompactDeployError(f"the benchmark runner failed: {report['error']}")
    return report
