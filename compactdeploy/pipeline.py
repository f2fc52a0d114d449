"""``build``: model -> prune -> export -> compile -> benchmark -> bundle, in that order.

Everything the user could get wrong is checked before the first stage runs; the output directory
appears only when every stage has succeeded.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .errors import CompactDeployError
from .targets import TargetSpec, load_target

PARITY_TOLERANCE = 1e-4
STAGES = ("load", "prune", "export", "compile", "benchmark", "bundle")


@dataclass(frozen=True)
class BuildConfig:
    model: str
    target: str
    out: Path
    prune: str | None = None  # "METHOD:RATIO"
    weights: Path | None = None
    data: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # one sample, without the batch dimension
    exclude: tuple[str, ...] = ()
    finetune_epochs: int = 0  # training epochs after pruning (needs data)
    repeat: int = 100
    warmup: int = 10
    threads: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class BuildResult:
    out: Path
    report: dict[str, Any]
    manifest: dict[str, Any]


class Observer(Protocol):
    """Told when each stage starts and ends; the CLI shows progress with it."""

    def started(self, stage: str) -> None: ...

    def finished(self, stage: str, seconds: float, summary: str) -> None: ...


class _Silent:
    def started(self, stage: str) -> None:
        pass

    def finished(self, stage: str, seconds: float, summary: str) -> None:
        pass


class _StageClock:
    def __init__(self, observer: Observer):
        self.observer = observer
        self.timings: dict[str, float] = {}
        self.summary = ""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[_StageClock]:
        self.observer.started(name)
        self.summary = ""
        self._start = time.perf_counter()
        yield self
        self.timings[name] = self.elapsed()
        self.observer.finished(name, self.timings[name], self.summary)

    def elapsed(self) -> float:
        """Seconds since the current stage started."""
        return round(time.perf_counter() - self._start, 3)


def build(config: BuildConfig, observer: Observer | None = None) -> BuildResult:
    from . import bundle
    from .compile import resolve_linker
    from .prune import parse_prune_spec
    from .zoo import get_spec

    # --- checks that need no heavy work: fail before any stage runs ---
    target = load_target(config.target)
    if ".py:" not in config.model:
        get_spec(config.model)  # an unknown name fails here, listing the zoo
    prune_spec = parse_prune_spec(config.prune) if config.prune else None
    if config.weights is not None and not Path(config.weights).is_file():
        raise CompactDeployError(f"weights file {config.weights} does not exist")
    if config.repeat < 1:
        raise CompactDeployError(f"--repeat must be at least 1 (got {config.repeat})")
    if config.finetune_epochs and (config.data is None or prune_spec is None):
        raise CompactDeployError("--finetune-epochs needs --prune and --data (the data to fine-tune on)")
    linker = resolve_linker(target)
    bundle.check_out_dir(config.out)

    clock = _StageClock(observer or _Silent())
    staging = bundle.staging_dir(config.out)
    try:
        report, manifest = _run_stages(config, target, prune_spec, linker, staging, clock)
        bundle.commit(staging, config.out)
    except BaseException:
        bundle.discard(staging)
        raise
    return BuildResult(config.out, report, manifest)


def _run_stages(config, target: TargetSpec, prune_spec, linker, staging: Path, clock: _StageClock):
    import torch

    from . import bundle
    from .bench import measure_local
    from .compile import compile_onnx
    from .data import fit_to_model, load_dataset, preprocessing_for
    from .export import export_onnx, run_onnxruntime
    from .prune import count_macs_params, layer_widths, prune
    from .train import evaluate, train
    from .zoo import check_input, load_model

    with clock.stage("load"):
        data = load_dataset(config.data) if config.data else None
        model = load_model(config.model, data, config.weights, config.model_args, config.input_shape)
        sample_shape = model.input_shape[1:]
        if data is not None:
            x_test = fit_to_model(data, data.x_test, sample_shape)
            example = torch.from_numpy(x_test[:1].copy())
        else:
            x_test = None
            example = torch.randn(*model.input_shape, generator=torch.Generator().manual_seed(config.seed))
        check_input(model.module, example)
        accuracy_before = evaluate(model.module, x_test, data.y_test) if data is not None else None
        before = _Shape(layer_widths(model.module), *count_macs_params(model.module, example))
        clock.summary = f"{model.name}, input {list(model.input_shape)}, weights: {model.weights['source']}"

    prune_result = None
    with clock.stage("prune"):
        if prune_spec is not None:
            prune_result = prune(model.module, example, prune_spec, target.channel_multiple, config.exclude)
            clock.summary = (
                f"{prune_spec.method}:{prune_spec.ratio}, params {prune_result.params_before:,} -> "
                f"{prune_result.params_after:,}"
            )
        else:
            clock.summary = "skipped (no --prune)"
        accuracy_pruned = evaluate(model.module, x_test, data.y_test) if data is not None else None
        if config.finetune_epochs:
            tuned = train(model, data, config.finetune_epochs, seed=config.seed)
            clock.summary += f", fine-tuned {config.finetune_epochs} epochs"
            accuracy_after = tuned.test_accuracy
        else:
            accuracy_after = accuracy_pruned
        after = _Shape(layer_widths(model.module), *count_macs_params(model.module, example))

    with clock.stage("export"):
        exported = export_onnx(model.module, example, staging / "model.onnx")
        clock.summary = f"opset {exported.opset}, torch vs onnxruntime max |diff| {exported.torch_vs_onnx_max_abs:.2e}"

    with clock.stage("compile"):
        compiled = compile_onnx(exported.path, target, staging, linker)
        clock.summary = f"{target.name} ({target.arch}, {compiled.device_code}), linked with {compiled.linker}"

    measurement, onnx_vs_tvm = None, None
    with clock.stage("benchmark"):
        if target.is_this_machine():
            x = example.numpy()
            measurement = measure_local(compiled.lib_path, x, config.repeat, config.warmup, config.threads)
            reference = run_onnxruntime(exported.path, x, config.threads)
            onnx_vs_tvm = float(np.abs(measurement.output - reference).max())
            clock.summary = f"median {measurement.latency_ms['median']:.3f} ms over {config.repeat} runs"
        else:
            clock.summary = "not measured: no device"

    with clock.stage("bundle"):
        report = _report(
            config, target, model, data, (before, after), prune_result, exported, compiled, measurement,
            onnx_vs_tvm, (accuracy_before, accuracy_pruned, accuracy_after),
        )
        # the bundle stage's own time, up to here: only the hashing below is left out
        report["timings_s"] = {**clock.timings, "bundle": clock.elapsed()}
        bundle.write_json(staging / "report.json", report)
        manifest = bundle.write_manifest(
            staging,
            {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "compactdeploy_version": __version__,
                "model": {"name": model.name, "args": model.args},
                "target": {
                    "name": target.name,
                    "arch": target.arch,
                    "kind": target.kind,
                    "tvm_target": compiled.tvm_target,
                    "device_code": compiled.device_code,
                },
                "tvm_version": _version("tvm"),
                "library": compiled.lib_path.name,
                "inputs": [t.as_dict() for t in exported.inputs],
                "outputs": [t.as_dict() for t in exported.outputs],
                "preprocessing": preprocessing_for(data, sample_shape) if data is not None else None,
                "prune": report["prune"],
                "measured": {
                    "latency_ms": report["latency_ms"],
                    "where": report["figures"]["latency"],
                },
                "notes": compiled.notes,
            },
        )
        clock.summary = str(config.out)
    return report, manifest


@dataclass(frozen=True)
class _Shape:
    """A model's size at one point of the pipeline."""

    widths: dict[str, int]
    macs: int
    params: int


def _report(
    config, target, model, data, shapes: tuple[_Shape, _Shape], prune_result, exported, compiled,
    measurement, onnx_vs_tvm, accuracies: tuple[float | None, float | None, float | None],
) -> dict[str, Any]:
    before, after = shapes
    measured = measurement is not None
    where = (
        "measured on real hardware: this host ("
        + (measurement.measured_on.get("cpu") or platform.machine())
        + ")"
        if measured
        else f"not measured: no device (target {target.name} is not this machine; "
        "device measurement over RPC is a later feature)"
    )
    return {
        "model": {
            "name": model.name,
            "args": model.args,
            "input_shape": list(model.input_shape),
            "weights": model.weights,
            "params": after.params,
            "macs": after.macs,
            "params_before": before.params,
            "macs_before": before.macs,
            "widths": {name: {"before": w, "after": after.widths.get(name)} for name, w in before.widths.items()},
        },
        "prune": (
            {
                **prune_result.spec.as_dict(),
                "channel_multiple": prune_result.channel_multiple,
                "excluded": list(config.exclude),
                "plan": prune_result.plan,
            }
            if prune_result
            else None
        ),
        "accuracy": (
            {
                "dataset": data.name,
                "split": "test (20%, fixed seed)",
                "before": accuracies[0],
                "after_pruning": accuracies[1],
                "after": accuracies[2],
                "finetune_epochs": config.finetune_epochs,
            }
            if data is not None
            else None
        ),
        "parity": {
            "torch_vs_onnx_max_abs": exported.torch_vs_onnx_max_abs,
            "onnx_vs_tvm_max_abs": onnx_vs_tvm,
            "tolerance": PARITY_TOLERANCE,
            "input": "first test sample" if data is not None else f"random normal, seed {config.seed}",
        },
        "target": {
            "name": target.name,
            "description": target.description,
            "arch": target.arch,
            "tvm_target": compiled.tvm_target,
            "device_code": compiled.device_code,
        },
        "latency_ms": (
            {**measurement.latency_ms, "cold_first_run": measurement.cold_ms, "module_load": measurement.load_ms}
            if measured
            else None
        ),
        "memory": {
            "params_bytes": exported.params_bytes,
            "workspace_bytes": compiled.workspace_bytes,
            "peak_rss_bytes": measurement.peak_rss_growth_bytes if measured else None,
        },
        "measured_on": (
            {
                "hostname": measurement.measured_on["hostname"],
                "cpu": measurement.measured_on["cpu"],
                "cores": measurement.measured_on["cores"],
                "threads": measurement.threads,
                "emulated": bool(measurement.measured_on.get("emulated")),
            }
            if measured
            else None
        ),
        "figures": {
            "latency": where,
            "peak_rss_bytes": "growth of the runner process's peak RSS (VmHWM) over its RSS before loading "
            "the library, while loading and running it" if measured else "not measured",
            "params_bytes": "size of the ONNX initializers (exact)",
            "workspace_bytes": "TVM's static memory plan for intermediates (exact, from the compiled IR)",
            "macs": "counted by torch-pruning for one input (exact)",
        },
        "compile": {
            "onnx_opset": exported.opset,
            "onnx_simplified": exported.simplified,
            "linker": compiled.linker,
            "compile_s": round(compiled.compile_s, 3),
            "notes": compiled.notes,
        },
        "versions": {
            "compactdeploy": __version__,
            "torch": _version("torch"),
            "tvm": _version("tvm"),
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"),
            "torch_pruning": _version("torch_pruning"),
        },
    }


def _version(module_name: str) -> str:
    import importlib

    try:
        return str(importlib.import_module(module_name).__version__)
    except (ImportError, AttributeError):
        return "unknown"
