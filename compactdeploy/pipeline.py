"""``build``: model -> prune -> export -> compile -> benchmark -> bundle, in that order.

Everything the user could get wrong is checked before the first stage runs; the output directory
appears only when every stage has succeeded.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .bundle_runner import THREADS_ENV
from .errors import CompactDeployError
from .export import PARITY_TOLERANCE
from .targets import TargetSpec, load_target

SAMPLE_INPUT = "sample_input.npy"  # the input the bundle was checked with: reused by bench and run


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
    widths: dict[str, int] = field(default_factory=dict)  # layer -> width, overriding the ratio
    allow_grow: bool = False  # widths above a layer's own widen it (function-preserving); the search may grow
    finetune_epochs: int = 0  # training epochs after pruning (needs data)
    distill: bool = False  # fine-tune with knowledge distillation from the unpruned model
    noise_outputs: int = 0  # NoiseOut: K noise outputs trained before pruning (needs noiseout)
    noise_epochs: int = 3
    calibration_samples: int = 256  # training samples the data-driven methods look at
    repeat: int = 100
    warmup: int = 10
    threads: int | None = None
    seed: int = 0
    device: str | None = None  # rpc://HOST:PORT[/KEY]; None: this machine when the target is it
    device_wait_s: float = 60.0  # how long to wait for a busy tracker key
    tune_trials: int = 0  # MetaSchedule measurements to spend (records in the database count)
    latency_budget: str | None = None  # "8ms", "60%": search the widths that meet it on the device
    memory_budget: str | None = None  # "40MB": weights + planned workspace
    resume: bool = False  # the search reuses the models it built and measured before
    fit_rounds: int = 6  # models the search builds and measures after the unpruned one, at most
    fit_points: int = 8  # candidate widths per group


@dataclass(frozen=True)
class BuildResult:
    out: Path
    report: dict[str, Any]
    manifest: dict[str, Any]


class Observer(Protocol):
    """Told when each stage starts, progresses and ends; the CLI shows progress with it."""

    def started(self, stage: str) -> None: ...

    def progress(self, stage: str, message: str) -> None: ...

    def finished(self, stage: str, seconds: float, summary: str) -> None: ...


class _Silent:
    def started(self, stage: str) -> None:
        pass

    def progress(self, stage: str, message: str) -> None:
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
        self.current = name
        self.observer.started(name)
        self.summary = ""
        self._start = time.perf_counter()
        yield self
        self.timings[name] = self.elapsed()
        self.observer.finished(name, self.timings[name], self.summary)

    def progress(self, message: str) -> None:
        self.observer.progress(self.current, message)

    def elapsed(self) -> float:
        """Seconds since the current stage started."""
        return round(time.perf_counter() - self._start, 3)


def _check_inputs(config: BuildConfig):
    """The checks build and prune share, none of them heavy: (target, prune spec or None)."""
    from .prune import parse_prune_spec
    from .zoo import check_input_size, get_spec

    target = load_target(config.target)
    if ".py:" not in config.model:
        get_spec(config.model)  # an unknown name fails here, listing the zoo
    if config.input_shape is not None:
        check_input_size(config.input_shape, "--input-shape")
    if _fitting(config):
        from .fit import check_fit_options

        check_fit_options(config, target)
        prune_spec = None  # the search decides, then the build prunes to its widths
    else:
        prune_spec = parse_prune_spec(config.prune, widths_given=bool(config.widths)) if config.prune else None
        _check_prune_options(config, prune_spec)
    if config.weights is not None and not Path(config.weights).is_file():
        raise CompactDeployError(f"weights file {config.weights} does not exist")
    return target, prune_spec


def build(config: BuildConfig, observer: Observer | None = None) -> BuildResult:
    from . import bundle
    from .compile import resolve_linker
    from .device import check_reachable, parse_device
    from .tune import check_tunable

    # --- checks that need no heavy work: fail before any stage runs ---
    target, prune_spec = _check_inputs(config)
    if config.repeat < 1 or config.warmup < 0:
        raise CompactDeployError(f"--repeat must be at least 1 and --warmup at least 0 (got {config.repeat}, {config.warmup})")
    check_tunable(target, config.tune_trials)
    if config.tune_trials and config.device is None and not target.is_this_machine():
        raise CompactDeployError(
            f"tuning for {target.name} measures candidates on the device: pass --device rpc://HOST:PORT[/KEY]"
        )
    if config.device is not None:
        check_reachable(parse_device(config.device))  # before any work, not after the compile
    linker = resolve_linker(target)
    bundle.check_out_dir(config.out)
    if config.threads:
        # for every TVM of this build: the tuning runner's worker and the local agent inherit it,
        # and the tuning database is the one for this count
        os.environ[THREADS_ENV] = str(config.threads)

    clock = _StageClock(observer or _Silent())
    fitted = None
    if _fitting(config):
        config, prune_spec, fitted = _fit(config, target, linker, clock)
    with bundle.staged(config.out) as staging:
        report, manifest = _run_stages(config, target, prune_spec, linker, staging, clock, fitted)
    return BuildResult(config.out, report, manifest)


def _fitting(config: BuildConfig) -> bool:
    return bool(config.latency_budget or config.memory_budget)


def _fit(config: BuildConfig, target: TargetSpec, linker, clock: _StageClock):
    """The width search; returns the config that builds its choice, the prune spec, and the result."""
    from dataclasses import replace

    from .fit import search
    from .prune import parse_prune_spec

    with clock.stage("fit"):
        fitted = search(config, target, linker, clock.progress)
        chosen = fitted.report["chosen"]
        clock.summary = (
            f"{fitted.report['status']}: {len(fitted.report['verified'])} models measured, chosen "
            f"{chosen['measured_ms']:.3f} ms ({'EMULATED' if 'EMULATED' in chosen['where'] else 'device'}), "
            f"{len(fitted.changed) - len(fitted.widened)} narrowed"
            + (f", {len(fitted.widened)} widened" if fitted.widened else "")
            + f" of {len(fitted.widths)} groups"
        )
    pruning = bool(fitted.changed)
    config = replace(
        config, prune=fitted.method if pruning else None, widths=fitted.changed,
        finetune_epochs=config.finetune_epochs if pruning else 0, distill=config.distill and pruning,
        allow_grow=bool(fitted.widened),
    )
    return config, (parse_prune_spec(fitted.method, widths_given=True) if pruning else None), fitted


def _check_prune_options(config: BuildConfig, spec) -> None:
    from .prune import METHODS

    if config.widths and spec is None:
        raise CompactDeployError("--widths needs --prune METHOD (the method that picks which channels go)")
    if config.allow_grow and not config.widths:
        raise CompactDeployError("--allow-grow widens the layers that --widths (or a --latency-budget search) makes wider: give one of them")
    if spec is not None and METHODS[spec.method].needs_data and config.data is None:
        raise CompactDeployError(f"pruning method {spec.method} needs data: pass --data (a dataset name or a .npz)")
    if config.finetune_epochs and (config.data is None or spec is None):
        raise CompactDeployError("--finetune-epochs needs --prune and --data (the data to fine-tune on)")
    if config.distill and not config.finetune_epochs:
        raise CompactDeployError("--distill needs --finetune-epochs (distillation happens while fine-tuning)")
    if config.noise_outputs and (spec is None or spec.method != "noiseout"):
        raise CompactDeployError("--noise-outputs belongs to NoiseOut: use it with --prune noiseout:RATIO and --data")


@dataclass(frozen=True)
class _Shape:
    """A model's size at one point of the pipeline."""

    widths: dict[str, int]
    macs: int
    params: int


@dataclass
class PrunedModel:
    """What the load and prune stages hand on."""

    model: Any  # LoadedModel
    data: Any  # Dataset or None
    example: Any  # torch.Tensor, one input
    shapes: tuple[_Shape, _Shape]  # before, after
    accuracies: tuple[float | None, float | None, float | None]  # before, pruned, fine-tuned
    result: Any  # PruneResult or None


@dataclass
class Loaded:
    """What the load stage hands on: the model, its data, one example input, calibration samples."""

    model: Any  # LoadedModel
    data: Any  # Dataset or None
    example: Any  # torch.Tensor, one input
    calibration: Any  # Calibration or None
    x_test: np.ndarray | None


def load(config: BuildConfig) -> Loaded:
    """The model with its weights, sized to the data; the example input is a test sample, else random."""
    import torch

    from .data import fit_to_model, load_dataset
    from .prune import Calibration
    from .zoo import check_input, load_model

    data = load_dataset(config.data) if config.data else None
    model = load_model(config.model, data, config.weights, config.model_args, config.input_shape)
    sample_shape = model.input_shape[1:]
    calibration, x_test = None, None
    if data is not None:
        x_test = fit_to_model(data, data.x_test, sample_shape)
        example = torch.from_numpy(x_test[:1].copy())
        count = min(config.calibration_samples, len(data.x_train))
        calibration = Calibration(fit_to_model(data, data.x_train[:count], sample_shape), data.y_train[:count])
    else:
        example = torch.randn(*model.input_shape, generator=torch.Generator().manual_seed(config.seed))
    check_input(model.module, example)
    return Loaded(model, data, example, calibration, x_test)


def _load_and_prune(config, target: TargetSpec, prune_spec, clock: _StageClock) -> PrunedModel:
    from .prune import count_macs_params, layer_widths, prune
    from .train import evaluate, train

    with clock.stage("load"):
        loaded = load(config)
        model, data, example, calibration, x_test = loaded.model, loaded.data, loaded.example, loaded.calibration, loaded.x_test
        accuracy_before = evaluate(model.module, x_test, data.y_test) if data is not None else None
        before = _Shape(layer_widths(model.module), *count_macs_params(model.module, example))
        clock.summary = f"{model.name}, input {list(model.input_shape)}, weights: {model.weights['source']}"

    prune_result = None
    with clock.stage("prune"):
        teacher = copy.deepcopy(model.module).eval() if config.distill else None
        if config.noise_outputs:
            clock.progress(f"training {config.noise_epochs} epochs with {config.noise_outputs} noise outputs")
            train(model, data, config.noise_epochs, seed=config.seed, noise_outputs=config.noise_outputs)
        if prune_spec is not None:
            clock.progress(f"{prune_spec.method}: choosing channels")
            prune_result = prune(
                model.module, example, prune_spec, target.channel_multiple, config.exclude, config.widths, calibration,
                allow_grow=config.allow_grow, seed=config.seed,
            )
            fallbacks = sum(1 for g in prune_result.groups.values() if g["method"] != prune_spec.method)
            clock.summary = (
                f"{config.prune}, params {prune_result.params_before:,} -> {prune_result.params_after:,}"
                + (f" ({fallbacks} coupled groups by l1)" if fallbacks else "")
            )
        else:
            clock.summary = "skipped (no --prune)"
        accuracy_pruned = evaluate(model.module, x_test, data.y_test) if data is not None else None
        accuracy_after = accuracy_pruned
        if config.finetune_epochs:
            clock.progress(f"fine-tuning {config.finetune_epochs} epochs" + (" with distillation" if teacher else ""))
            accuracy_after = train(model, data, config.finetune_epochs, seed=config.seed, teacher=teacher).test_accuracy
            clock.summary += f", fine-tuned {config.finetune_epochs} epochs"
        after = _Shape(layer_widths(model.module), *count_macs_params(model.module, example))
    return PrunedModel(model, data, example, (before, after), (accuracy_before, accuracy_pruned, accuracy_after), prune_result)


def prune_and_finetune(config: BuildConfig, observer: Observer | None = None) -> PrunedModel:
    """Load, prune and fine-tune as ``build`` does, without export or compile: the model and its
    accuracies (the benchmark scripts score the widths a search chose this way)."""
    target, prune_spec = _check_inputs(config)
    return _load_and_prune(config, target, prune_spec, _StageClock(observer or _Silent()))


def prune_to_checkpoint(config: BuildConfig, observer: Observer | None = None) -> dict[str, Any]:
    """``compactdeploy prune``: load and prune only, and write a checkpoint that ``build`` replays."""
    from .train import save_pruned_checkpoint

    from .resources import check_writable_parent

    if not config.prune:
        raise CompactDeployError("prune needs --prune METHOD[:RATIO]")
    check_writable_parent(config.out, "--out")
    pruned = prune_and_finetune(config, observer)
    summary = {
        "model": pruned.model.name,
        "prune": {**pruned.result.spec.as_dict(), "groups": pruned.result.groups},
        "params": {"before": pruned.shapes[0].params, "after": pruned.shapes[1].params},
        "accuracy": dict(zip(("before", "after_pruning", "after"), pruned.accuracies)) if pruned.data else None,
        "widths": {n: {"before": w, "after": pruned.shapes[1].widths.get(n)} for n, w in pruned.shapes[0].widths.items()},
    }
    save_pruned_checkpoint(pruned.model, pruned.result.plan, summary, config.out, grown=pruned.result.grown)
    return summary


def _run_stages(config, target: TargetSpec, prune_spec, linker, staging: Path, clock: _StageClock, fitted=None):
    from . import bundle
    from .compile import compile_onnx
    from .data import preprocessing_for
    from .export import export_onnx

    pruned = _load_and_prune(config, target, prune_spec, clock)
    model, data, example, prune_result = pruned.model, pruned.data, pruned.example, pruned.result
    sample_shape = model.input_shape[1:]

    with clock.stage("export"):
        exported = export_onnx(model.module, example, staging / "model.onnx")
        clock.summary = f"opset {exported.opset}, torch vs onnxruntime max |diff| {exported.torch_vs_onnx_max_abs:.2e}"

    database = _tuning_database(config, target, clock)
    tuned = None
    if config.tune_trials:
        with clock.stage("tune"):
            tuned = _tune(config, target, database, exported.path, linker, clock)
            clock.summary = tuned.summary()

    with clock.stage("compile"):
        compiled = compile_onnx(exported.path, target, staging, linker, database)
        clock.summary = (
            f"{target.name} ({target.arch}, {compiled.device_code}), linked with {compiled.linker}; "
            f"{compiled.kernels_scheduled}/{compiled.kernels_tunable} kernels from tuning records"
        )

    with clock.stage("benchmark"):
        np.save(staging / SAMPLE_INPUT, example.numpy())
        measured = measure_bundle(
            staging, target, config.device, config.repeat, config.warmup, config.threads,
            config.device_wait_s, on_progress=clock.progress,
        )
        clock.summary = measured["summary"]

    with clock.stage("bundle"):
        report = _report(config, target, model, data, pruned.shapes, prune_result, exported, compiled, pruned.accuracies)
        report["tuning"] = _tuning_report(database, tuned, compiled)
        apply_measurement(report, measured)
        if fitted is not None:
            report["fit"] = _fit_report(fitted, report, staging)
        # the bundle stage's own time, up to here: only the hashing below is left out
        report["timings_s"] = {**clock.timings, "bundle": clock.elapsed()}
        bundle.write_json(staging / "report.json", report)
        bundle.add_runner(staging)
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
                "sample_input": SAMPLE_INPUT,
                "prune": report["prune"],
                "measured": _manifest_measured(report),
                "notes": compiled.notes,
            },
        )
        clock.summary = str(config.out)
    return report, manifest


def _fit_report(fitted, report: dict[str, Any], staging: Path) -> dict[str, Any]:
    """The search's report, with this (final, fine-tuned) build's own measurement, and its plots."""
    from .fit.plots import draw

    section = dict(fitted.report)
    latency, budget = report["latency_ms"], section["budget"]["latency_ms"]
    section["final"] = {
        "measured_ms": latency["median"] if latency else None,
        "meets_latency_budget": None if not (latency and budget) else latency["median"] <= budget,
        "note": "the chosen widths built again (fine-tuned where --finetune-epochs is given) and measured again; "
                "its median can differ from the search's by the device's run-to-run noise",
    }
    section["plots"] = draw(section, staging)
    return section


def _tuning_database(config: BuildConfig, target: TargetSpec, clock: _StageClock):
    """The tuning database this build reads (and, with --tune-trials, writes); None: none applies."""
    from .tune import database_for, newest_database

    if target.kind != "llvm":
        return None
    if config.device is not None:
        from .device import connect, parse_device

        session = connect(parse_device(config.device), config.device_wait_s, clock.progress)
        fingerprint = session.fingerprint
        del session  # frees the tracker key for the measurements that follow
        return database_for(target, fingerprint)
    if target.is_this_machine():
        from .device.agent import fingerprint

        return database_for(target, fingerprint())
    return newest_database(target)  # a cross build without a device: the records last tuned for it


def _tune(config: BuildConfig, target: TargetSpec, database, onnx_path: Path, linker, clock: _StageClock):
    from .compile import import_onnx
    from .tune import local_runner, lower_for_tuning, rpc_runner, tune

    lowered = lower_for_tuning(import_onnx(onnx_path, target), target.tvm_target())
    if config.device is None:
        runner, pick_runner = local_runner(), lambda: local_runner(after_pause=True)
    else:
        from .device import parse_device

        address = parse_device(config.device)
        runner, pick_runner = rpc_runner(address), lambda: rpc_runner(address, after_pause=True)
    try:
        return tune(lowered, target, database, config.tune_trials, runner, linker.command, clock.progress,
                    pick_runner, read_load=lambda: _load_before_tuning(config))
    except KeyboardInterrupt:
        raise CompactDeployError(f"tuning interrupted; {database.resume_hint()}") from None


def _load_before_tuning(config: BuildConfig, seconds: float = 1.0) -> dict[str, Any] | None:
    """What else the machine that times the candidates does, over ``seconds`` before it measures.

    Tuning keeps what it measures: records timed on a busy machine are slow and noisy, and later
    builds apply them. None where that is not known (a stock TVM server, not Linux).
    """
    from .device.agent import cpu_times, load_between

    if config.device is None:
        start = cpu_times()
        time.sleep(seconds)
        return load_between(start, cpu_times())
    from .device import connect, parse_device

    session = connect(parse_device(config.device), config.device_wait_s)
    session.cpu_load(mark=True)
    time.sleep(seconds)
    return session.cpu_load(mark=False)


def _tuning_report(database, tuned, compiled) -> dict[str, Any] | None:
    if database is None:
        return None
    section = {
        "database": str(database.path),
        "device": database.identity,
        "kernels_scheduled": compiled.kernels_scheduled,
        "kernels_tunable": compiled.kernels_tunable,
        "requested_trials": 0,
    }
    if tuned is not None:
        section.update(
            requested_trials=tuned.requested_trials, trials_run=tuned.trials_run,
            trials_reused=tuned.trials_reused, tune_s=tuned.tune_s, kernels=tuned.tasks,
            second_timing=tuned.picked,
            # other work on the machine that timed the candidates, over a second before the first
            # measurement; null where this build measured nothing
            machine_load=tuned.machine_load,
        )
    return section


def _report(
    config, target, model, data, shapes: tuple[_Shape, _Shape], prune_result, exported, compiled,
    accuracies: tuple[float | None, float | None, float | None],
) -> dict[str, Any]:
    """Everything known without a device; ``apply_measurement`` adds what the device measured."""
    before, after = shapes
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
                "widths_requested": config.widths,
                "channel_multiple": prune_result.channel_multiple,
                "excluded": list(config.exclude),
                "calibration_samples": config.calibration_samples if config.data else None,
                "noise_outputs": config.noise_outputs,
                "distill": config.distill,
                "groups": prune_result.groups,
                "plan": prune_result.plan,
                "grown": prune_result.grown,
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
            "onnx_vs_tvm_max_abs": None,
            "tolerance": PARITY_TOLERANCE,
            "tolerance_of": "max(1, max |reference output|): a build over it fails",
            "input": "first test sample" if data is not None else f"random normal, seed {config.seed}",
        },
        "target": {
            "name": target.name,
            "description": target.description,
            "arch": target.arch,
            "tvm_target": compiled.tvm_target,
            "device_code": compiled.device_code,
        },
        "memory": {
            "params_bytes": exported.params_bytes,
            "workspace_bytes": compiled.workspace_bytes,
            "peak_rss_bytes": None,
        },
        "figures": {
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


def measure_bundle(
    directory: Path,
    target: TargetSpec,
    device: str | None,
    repeat: int,
    warmup: int,
    threads: int | None = None,
    wait_s: float = 60.0,
    on_progress=None,
) -> dict[str, Any]:
    """Measure the library in ``directory`` on ``device``, or on this machine when the target is it.

    Returns the report sections that the measurement fills (see ``apply_measurement``).
    """
    from .bench import measure
    from .device import connect, local_agent, parse_device
    from .device.agent import describe_load, is_busy
    from .export import check_parity, run_onnxruntime

    if device is None and not target.is_this_machine():
        reason = (
            f"not measured: no device (target {target.name} is not this machine; "
            "pass --device rpc://HOST:PORT or rpc://TRACKER:PORT/KEY)"
        )
        return {"measurement": None, "where": reason, "summary": "not measured: no device"}
    x = np.load(directory / SAMPLE_INPUT)
    device_kind = "cuda" if target.kind == "cuda" else "cpu"

    arguments = dict(
        arch=target.arch, device_kind=device_kind, repeat=repeat, warmup=warmup,
        kernels_path=directory / "kernels.json", onnx_path=directory / "model.onnx", on_progress=on_progress,
    )
    if device is None:
        with local_agent(threads) as agent:
            session = connect(agent.address)
            # asked in the agent: this process may hold the build-time stand-in for the CUDA driver
            if device_kind == "cuda" and not session.fingerprint.get("cuda"):
                return {
                    "measurement": None,
                    "where": "not measured: no NVIDIA GPU on this host (TVM finds no CUDA device)",
                    "summary": "not measured: no GPU",
                }
            measurement = measure(session, directory / "model.so", x, **arguments)
            del session
        address = "this host"
    else:
        address = parse_device(device)
        session = connect(address, wait_s, on_progress)
        measurement = measure(session, directory / "model.so", x, **arguments)
        del session
    reference = run_onnxruntime(directory / "model.onnx", x, threads)
    fingerprint = measurement.device
    if fingerprint.get("emulated"):
        where = (
            f"EMULATED: qemu-user on the build host ({address}); these figures prove the flow and the "
            "numbers the model computes, not the real board's speed"
        )
    elif fingerprint.get("cpu") is None:
        where = f"measured on the device at {address} (a stock TVM server: real or emulated is unknown)"
    else:
        where = f"measured on real hardware: {fingerprint['hostname']} ({fingerprint['cpu']}), {address}"
    if measurement.cut_short:
        where += f"; CUT SHORT: {measurement.cut_short}"
    if is_busy(measurement.load):
        where += (f"; BUSY while timing: {describe_load(measurement.load)}; measure again on an idle device "
                  "(compactdeploy bench), or give TVM fewer threads than the cores left free (--threads)")
    latency = measurement.latency_ms
    return {
        "measurement": measurement,
        "where": where,
        "onnx_vs_tvm_max_abs": check_parity("onnxruntime vs TVM", reference, measurement.output),
        "summary": f"median {latency['median']:.3f} ms over {latency['runs']} runs"
        + (" (emulated)" if fingerprint.get("emulated") else ""),
    }


def apply_measurement(report: dict[str, Any], measured: dict[str, Any]) -> None:
    """Write a ``measure_bundle`` result into a report, replacing any earlier measurement."""
    m = measured["measurement"]
    report["figures"]["latency"] = measured["where"]
    if m is None:
        report.update(latency_ms=None, measured_on=None, per_layer=None, onnxruntime_on_device=None)
        report["parity"]["onnx_vs_tvm_max_abs"] = None
        report["memory"]["peak_rss_bytes"] = None
        report["figures"]["peak_rss_bytes"] = "not measured"
        return
    report["latency_ms"] = {
        **m.latency_ms,
        "requested_runs": m.runs_requested,
        "cut_short": m.cut_short,
        "cold_first_run": m.cold_ms,
        "module_load": m.load_ms,
    }
    # load: what else the device did while timing (None: not known), see device.agent.load_between
    report["measured_on"] = {**m.device, "emulated": bool(m.device.get("emulated")), "load": m.load}
    report["parity"]["onnx_vs_tvm_max_abs"] = measured["onnx_vs_tvm_max_abs"]
    report["parity"]["tvm_on"] = "the device" if m.device.get("cpu") else "the device (stock server)"
    report["memory"]["peak_rss_bytes"] = m.memory["peak_rss_growth_bytes"]
    report["figures"]["peak_rss_bytes"] = (
        "growth of the device process's peak RSS (VmHWM, reset first) over its RSS before loading the "
        "library, while loading and running it"
        if m.memory["peak_rss_growth_bytes"] is not None
        else "not measured (needs compactdeploy's device agent on Linux)"
    )
    report["per_layer"] = m.per_layer
    report["onnxruntime_on_device"] = m.onnxruntime


def _manifest_measured(report: dict[str, Any]) -> dict[str, Any]:
    return {"latency_ms": report.get("latency_ms"), "where": report["figures"]["latency"]}


def _version(module_name: str) -> str:
    import importlib

    try:
        return str(importlib.import_module(module_name).__version__)
    except (ImportError, AttributeError):
        return "unknown"


def remeasure(
    directory: Path,
    device: str | None,
    repeat: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    wait_s: float = 60.0,
    observer: Observer | None = None,
) -> dict[str, Any]:
    """Measure an existing bundle (again) on a device and update its report and manifest."""
    import json

    from . import bundle, bundle_runner
    from .device import parse_device

    directory = Path(directory)
    try:
        manifest = bundle_runner.verify(directory, check_machine=False)
    except bundle_runner.BundleError as exc:
        raise CompactDeployError(f"{exc}; rebuild it") from None
    if SAMPLE_INPUT not in manifest["files"]:
        raise CompactDeployError(f"{directory} was built by an older compactdeploy (no {SAMPLE_INPUT}); rebuild it")
    if device is not None:
        parse_device(device)
    spec = manifest["target"]
    target = TargetSpec(
        name=spec["name"], description="", arch=spec["arch"], cores=0, memory_mb=0, channel_multiple=1,
        tvm=spec["tvm_target"], local=spec["name"] == "host",
    )
    report = json.loads((directory / "report.json").read_text())
    clock = _StageClock(observer or _Silent())
    with clock.stage("benchmark"):
        measured = measure_bundle(directory, target, device, repeat, warmup, threads, wait_s, clock.progress)
        clock.summary = measured["summary"]
    if measured["measurement"] is None:
        raise CompactDeployError(f"{measured['where']}")
    apply_measurement(report, measured)
    with bundle.staged(directory) as staging:
        for path in directory.iterdir():
            if path.is_file():
                shutil.copy2(path, staging / path.name)
        bundle.write_json(staging / "report.json", report)
        kept = {k: v for k, v in manifest.items() if k not in ("format", "files")}
        bundle.write_manifest(staging, {**kept, "measured": _manifest_measured(report)})
    return report
