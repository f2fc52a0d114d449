"""``build``: model -> prune -> export -> compile -> benchmark -> bundle, in that order; and
``prune_to_checkpoint``, the first two alone (``compactdeploy prune``).

Everything the user could get wrong is checked before the first stage runs (``check_inputs``);
the output directory appears only when every stage has succeeded. With a latency or memory
budget, the width search (``fit``) runs first and the build prunes to its choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import BuildConfig, check_finetune_options
from .deployment import Deployment, resolve
from .errors import CompactDeployError
from .stages import Observer, StageClock
from .targets import TargetSpec


@dataclass(frozen=True)
class BuildResult:
    out: Path
    report: dict[str, Any]
    manifest: dict[str, Any]


def build(config: BuildConfig, observer: Observer | None = None, deployment: Deployment | None = None) -> BuildResult:
    """Build ``config``; ``deployment``: one already resolved for its target (the width search's
    candidate builds share the search's), else resolved here."""
    from . import bundle
    from .compile import resolve_linker
    from .tune import check_tunable

    # --- checks that need no heavy work: fail before any stage runs ---
    target, prune_spec = check_inputs(config)
    measure = config.measure
    if measure.repeat < 1 or measure.warmup < 0:
        raise CompactDeployError(f"--repeat must be at least 1 and --warmup at least 0 (got {measure.repeat}, {measure.warmup})")
    check_tunable(target, config.tune.tune_trials)
    linker = resolve_linker(target)
    bundle.check_out_dir(config.out)
    clock = StageClock(observer)
    if deployment is None:
        deployment = resolve(target, measure.device, measure.threads, measure.device_wait, clock.progress,
                             tuning=bool(config.tune.tune_trials), searching=config.fit.searching)

    fitted = None
    if config.fit.searching:
        config, prune_spec, fitted = _fit(config, target, deployment, linker, clock)
    with bundle.staged(config.out) as staging:
        report, manifest = _run_stages(config, target, deployment, prune_spec, linker, staging, clock, fitted)
    return BuildResult(config.out, report, manifest)


def _fit(config: BuildConfig, target: TargetSpec, deployment: Deployment, linker, clock: StageClock):
    """The width search; returns the config that builds its choice, the prune spec, and the result."""
    from .fit import search
    from .prepare import load
    from .prune import parse_prune_spec

    def build_candidate(candidate: BuildConfig, observer: Observer) -> BuildResult:
        return build(candidate, observer, deployment)

    with clock.stage("fit"):
        clock.progress("reading the model's groups and the importance of their channels")
        loaded = load(config.model, config.prune.calibration_samples)
        fitted = search(config, target, loaded, deployment, linker, build_candidate, clock.progress)
        chosen = fitted.report["chosen"]
        clock.summary = (
            f"{fitted.report['status']}: {len(fitted.report['verified'])} models measured, chosen "
            f"{chosen['measured_ms']:.3f} ms ({'EMULATED' if 'EMULATED' in chosen['where'] else 'device'}), "
            f"{len(fitted.changed) - len(fitted.widened)} narrowed"
            + (f", {len(fitted.widened)} widened" if fitted.widened else "")
            + f" of {len(fitted.widths)} groups"
        )
    pruning = bool(fitted.changed)
    options = config.prune
    config = replace(config, prune=replace(
        options, prune=fitted.method if pruning else None, widths=fitted.changed,
        finetune_epochs=options.finetune_epochs if pruning else 0, distill=options.distill and pruning,
        allow_grow=bool(fitted.widened),
    ))
    return config, (parse_prune_spec(fitted.method, widths_given=True) if pruning else None), fitted


def _run_stages(config: BuildConfig, target: TargetSpec, deployment: Deployment, prune_spec, linker, staging: Path,
                clock: StageClock, fitted=None):
    from . import bundle
    from .bench import measure_bundle
    from .compile import compile_onnx
    from .data import preprocessing_for
    from .export import export_onnx
    from .prepare import load_and_prune
    from .report import apply_measurement, build_report, fit_section, manifest_measured, version_of
    from .resources import write_json

    pruned = load_and_prune(config, target, prune_spec, clock)
    model, data, example = pruned.model, pruned.data, pruned.example

    with clock.stage("export"):
        exported = export_onnx(model.module, example, staging / "model.onnx")
        clock.summary = f"opset {exported.opset}, torch vs onnxruntime max |diff| {exported.torch_vs_onnx_max_abs:.2e}"

    database = deployment.database
    tuned = None
    # without trials the stage still transfers schedules to kernels without records, where the
    # database holds records to transfer and a device times them
    transfers = (config.tune.transfer and database is not None and deployment.measurable
                 and database.record_count() > 0)
    if config.tune.tune_trials or transfers:
        with clock.stage("tune"):
            tuned = _tune(config, target, deployment, exported.path, linker, clock)
            clock.summary = tuned.summary()

    with clock.stage("compile"):
        compiled = compile_onnx(exported.path, target, staging, linker, database, config.tune.default_schedules)
        clock.summary = (
            f"{target.name} ({target.arch}, {compiled.device_code}), linked with {compiled.linker}; "
            f"{compiled.kernels_scheduled}/{compiled.kernels_tunable} kernels from tuning records"
            + (f", {compiled.kernels_transferred} transferred from other widths" if compiled.kernels_transferred else "")
            + (f", {compiled.kernels_by_rule} by default rules" if compiled.kernels_by_rule else "")
        )

    with clock.stage("benchmark"):
        np.save(staging / bundle.SAMPLE_INPUT, example.numpy())
        measured = measure_bundle(staging, deployment, config.measure.repeat, config.measure.warmup, clock.progress)
        clock.summary = measured.summary

    with clock.stage("bundle"):
        report = build_report(config, target, pruned, exported, compiled, tuned, database)
        apply_measurement(report, measured)
        if fitted is not None:
            report["fit"] = fit_section(fitted, report, staging)
        # the bundle stage's own time, up to here: only the hashing below is left out
        report["timings_s"] = {**clock.timings, "bundle": clock.elapsed()}
        write_json(staging / "report.json", report)
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
                    "local": target.local,
                    "tvm_target": compiled.tvm_target,
                    "device_code": compiled.device_code,
                },
                "tvm_version": version_of("tvm"),
                "library": compiled.lib_path.name,
                "inputs": [t.as_dict() for t in exported.inputs],
                "outputs": [t.as_dict() for t in exported.outputs],
                "preprocessing": preprocessing_for(data, model.input_shape[1:]) if data is not None else None,
                "sample_input": bundle.SAMPLE_INPUT,
                "prune": report["prune"],
                "measured": manifest_measured(report),
                "notes": compiled.notes,
            },
        )
        clock.summary = str(config.out)
    return report, manifest


def _tune(config: BuildConfig, target: TargetSpec, deployment: Deployment, onnx_path: Path, linker, clock: StageClock):
    from .compile import import_onnx, lower_for_tuning
    from .tune import tune

    database = deployment.database
    lowered = lower_for_tuning(import_onnx(onnx_path, target), target.tvm_target())
    runner, pick_runner = deployment.tuning_runners()
    try:
        return tune(lowered, target, database, config.tune.tune_trials, runner, linker.command, clock.progress,
                    pick_runner, read_load=deployment.machine_load, transfer=config.tune.transfer)
    except KeyboardInterrupt:
        raise CompactDeployError(f"tuning interrupted; {database.resume_hint()}") from None


def prune_and_finetune(config: BuildConfig, observer: Observer | None = None):
    """Load, prune and fine-tune as ``build`` does, without export or compile: the model and its
    accuracies (the benchmark scripts score the widths a search chose this way)."""
    from .prepare import load_and_prune

    target, prune_spec = check_inputs(config)
    return load_and_prune(config, target, prune_spec, StageClock(observer))


def prune_to_checkpoint(config: BuildConfig, observer: Observer | None = None) -> dict[str, Any]:
    """``compactdeploy prune``: load and prune only, and write a checkpoint that ``build`` replays."""
    from .resources import check_writable_parent
    from .train import save_pruned_checkpoint

    if not config.prune.prune:
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


def check_inputs(config: BuildConfig):
    """The checks build and prune share, none of them heavy: (target, prune spec or None)."""
    from .prune import parse_prune_spec
    from .targets import load_target
    from .zoo import check_input_size, get_spec

    target = load_target(config.target)
    model = config.model
    if ".py:" not in model.model:
        get_spec(model.model)  # an unknown name fails here, listing the zoo
    if model.input_shape is not None:
        check_input_size(model.input_shape, "--input-shape")
    if config.fit.searching:
        from .fit import check_fit_options

        check_fit_options(config, target)
        prune_spec = None  # the search decides, then the build prunes to its widths
    else:
        prune = config.prune
        prune_spec = parse_prune_spec(prune.prune, widths_given=bool(prune.widths)) if prune.prune else None
        check_prune_options(config, prune_spec)
    if model.weights is not None and not Path(model.weights).is_file():
        raise CompactDeployError(f"weights file {model.weights} does not exist")
    return target, prune_spec


def check_prune_options(config: BuildConfig, spec) -> None:
    from .prune import METHODS

    prune, data = config.prune, config.model.data
    if prune.widths and spec is None:
        raise CompactDeployError("--widths needs --prune METHOD (the method that picks which channels go)")
    if prune.allow_grow and not prune.widths:
        raise CompactDeployError("--allow-grow widens the layers that --widths (or a --latency-budget search) makes wider: give one of them")
    if spec is not None and METHODS[spec.method].needs_data and data is None:
        raise CompactDeployError(f"pruning method {spec.method} needs data: pass --data (a dataset name or a .npz)")
    check_finetune_options(prune, data, pruning=spec is not None)
    if prune.noise_outputs and (spec is None or spec.method != "noiseout"):
        raise CompactDeployError("--noise-outputs belongs to NoiseOut: use it with --prune noiseout:RATIO and --data")
