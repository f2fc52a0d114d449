"""``build``: model -> prune -> export -> compile -> benchmark -> bundle, in that order; and
``prune_to_checkpoint``, the first two alone (``compactdeploy prune``).

Everything the user could get wrong is checked before the first stage runs (``check_inputs``);
the output directory appears only when every stage has succeeded. With a latency or memory
budget, the width search (``fit``) runs first and the build prunes to its choice.
"""

from __future__ import annotations

import copy
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
    config, plan = with_plan(config)
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

    if not config.fit.searching:
        with bundle.staged(config.out) as staging:
            report, manifest = _run_stages(config, target, deployment, prune_spec, linker, staging, clock, None, plan)
        return BuildResult(config.out, report, manifest)
    return _budgeted_build(config, target, deployment, linker, clock)


def _budgeted_build(searched: BuildConfig, target: TargetSpec, deployment: Deployment, linker,
                    clock: StageClock) -> BuildResult:
    """The search, then its choice built and timed beside the unpruned model. A final build over the
    budget is not shipped while the search can offer another: the search, resumed, keeps the next
    model down (``fit.record_final_over``), up to FINAL_BUILDS builds; the last ships whatever it measures."""
    from . import bundle
    from .fit import NoModelWithin, record_final_over
    from .fit.report import FINAL_BUILDS

    config, prune_spec, fitted, loaded = _fit(searched, target, deployment, linker, clock)
    unpruned = copy.deepcopy(loaded.model.module)  # the build prunes the loaded model in place
    staging = None
    try:
        for attempt in range(1, FINAL_BUILDS + 1):
            staging = bundle.staging_dir(config.out)
            report, manifest = _run_stages(config, target, deployment, prune_spec, linker, staging, clock, fitted,
                                           fitted.plan, loaded)
            final = report["fit"]["final"]
            if final["meets_latency_budget"] is not False:
                break
            record_final_over(fitted, final["judged_ms"])  # a resumed search knows it too
            if attempt == FINAL_BUILDS:
                break
            clock.progress(f"the final build measured {final['judged_ms']:.3f} ms, over the budget "
                           f"({report['fit']['budget']['latency_ms']:.3f} ms): searching on for the next model down "
                           f"(build {attempt + 1} of at most {FINAL_BUILDS})")
            loaded = replace(loaded, model=replace(loaded.model, module=copy.deepcopy(unpruned)))
            table_measured = fitted.report["latency_table"]["measured_this_run"]
            try:
                config, prune_spec, fitted, loaded = _fit(replace(searched, fit=replace(searched.fit, resume=True)),
                                                          target, deployment, linker, clock, loaded)
            except NoModelWithin as exc:  # nothing else within: this build ships, its report says over
                clock.progress(f"no other model to build ({exc}): keeping this one")
                break
            # "this run" is this build: the resumed search reads from disk what the first one measured
            fitted.report["latency_table"]["measured_this_run"] += table_measured
            bundle.discard(staging)
        bundle.commit(staging, config.out)
    except BaseException:
        if staging is not None:
            bundle.discard(staging)
        raise
    return BuildResult(config.out, report, manifest)


def with_plan(config: BuildConfig):
    """``config`` with its --plan's method, widths and seed; and the plan (None without --plan)."""
    from .prune.plan import WidthPlan
    from .zoo import file_sha256

    if config.prune.plan is None:
        return config, None
    plan = WidthPlan.load(config.prune.plan)
    model, options = config.model, config.prune
    if options.prune or options.widths or config.fit.searching:
        raise CompactDeployError("--plan gives the method and the widths: leave out --prune, --widths and the budgets")
    if model.model != plan.model or (model.model_args and model.model_args != plan.model_args):
        raise CompactDeployError(f"plan {config.prune.plan} was made for {plan.model} {plan.model_args or ''}, not "
                                 f"{model.model} {model.model_args or ''}: build that model with it")
    weights = file_sha256(model.weights) if model.weights else None
    if weights != plan.weights_sha256:
        raise CompactDeployError(f"plan {config.prune.plan} was made with other weights than "
                                 f"{model.weights or 'the model initialised by --seed'}: give the --weights it was made with")
    config = replace(
        config, model=replace(model, model_args=dict(plan.model_args), seed=plan.seed),
        prune=replace(options, prune=plan.method, widths=dict(plan.widths), exclude=tuple(plan.exclude),
                      allow_grow=bool(plan.grown)),
    )
    return config, plan


def _fit(config: BuildConfig, target: TargetSpec, deployment: Deployment, linker, clock: StageClock, loaded=None):
    """The width search; returns the config that builds its choice, the prune spec, the result,
    and the loaded model (the build prunes it again: loaded once). ``loaded``: the unpruned model,
    where a search resumed after a final build over the budget has it."""
    from .fit import search
    from .fit.measure import DeviceMeasurer
    from .prepare import load
    from .prune import parse_prune_spec

    with clock.stage("fit"):
        clock.progress("reading the model's groups and the importance of their channels")
        loaded = loaded or load(config.model, config.prune.calibration_samples)
        with DeviceMeasurer.open(target, deployment, linker, config.measure, config.tune.transfer,
                                 config.tune.default_schedules, clock.progress) as measurer:
            fitted = search(config, target, loaded, measurer, clock.progress)
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
    return config, (parse_prune_spec(fitted.method, widths_given=True) if pruning else None), fitted, loaded


def _run_stages(config: BuildConfig, target: TargetSpec, deployment: Deployment, prune_spec, linker, staging: Path,
                clock: StageClock, fitted=None, plan=None, loaded=None):
    from . import bundle
    from .bench import measure_bundle
    from .compile import compile_onnx
    from .data import preprocessing_for
    from .export import export_onnx
    from .prepare import load_and_prune
    from .fit.report import fit_section
    from .report import apply_measurement, build_report, manifest_measured, version_of
    from .prepare import width_plan
    from .prune.plan import PLAN_FILE
    from .resources import write_json
    from .tune import transfers_schedules, tune_model

    pruned = load_and_prune(config, target, prune_spec, clock, plan, loaded)
    model, data, example = pruned.model, pruned.data, pruned.example

    with clock.stage("export"):
        exported = export_onnx(model.module, example, staging / "model.onnx")
        clock.summary = f"opset {exported.opset}, torch vs onnxruntime max |diff| {exported.torch_vs_onnx_max_abs:.2e}"

    database = deployment.database
    tuned = None
    if config.tune.tune_trials or transfers_schedules(deployment, config.tune.transfer):
        with clock.stage("tune"):
            tuned = tune_model(exported.path, target, deployment, config.tune.tune_trials, linker, clock.progress,
                               transfer=config.tune.transfer)
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
        # a budgeted build is timed in turns with the unpruned model, as the search timed its candidates
        reference = fitted.reference_library if fitted is not None else None
        measured = measure_bundle(staging, deployment, config.measure.repeat, config.measure.warmup, clock.progress,
                                  min_timed_ms=config.measure.min_time_s * 1e3, reference=reference)
        clock.summary = measured.summary
        sessions = [measured.measurement] if measured.measurement is not None else []
        if reference is not None and sessions:  # the budget is judged by the median of a few sessions' ratios
            from .fit.report import FINAL_SESSIONS

            for index in range(2, FINAL_SESSIONS + 1):
                clock.progress(f"timing it beside the unpruned model again, session {index} of {FINAL_SESSIONS}")
                again = measure_bundle(staging, deployment, config.measure.repeat, config.measure.warmup,
                                       clock.progress, profile=False, min_timed_ms=config.measure.min_time_s * 1e3,
                                       reference=reference).measurement
                if again is not None:
                    sessions.append(again)

    with clock.stage("bundle"):
        report = build_report(config, target, pruned, exported, compiled, tuned, database)
        apply_measurement(report, measured)
        if fitted is not None:
            report["fit"] = fit_section(fitted, report, staging, sessions)
        # the bundle stage's own time, up to here: only the hashing below is left out
        report["timings_s"] = {**clock.timings, "bundle": clock.elapsed()}
        write_json(staging / "report.json", report)
        if pruned.result is not None:
            result = pruned.result
            width_plan(config, result.spec.method, {name: group["after"] for name, group in result.groups.items()},
                       result.plan, result.grown, made_by="fit" if fitted is not None else "prune").save(staging / PLAN_FILE)
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


def prune_and_finetune(config: BuildConfig, observer: Observer | None = None):
    """Load, prune and fine-tune as ``build`` does, without export or compile: the model and its
    accuracies (the benchmark scripts score the widths a search chose this way)."""
    from .prepare import load_and_prune

    config, plan = with_plan(config)
    target, prune_spec = check_inputs(config)
    return load_and_prune(config, target, prune_spec, StageClock(observer), plan)


def prune_to_checkpoint(config: BuildConfig, observer: Observer | None = None) -> dict[str, Any]:
    """``compactdeploy prune``: load and prune only, and write a checkpoint that ``build`` replays."""
    from .resources import check_writable_parent
    from .train import save_pruned_checkpoint

    if not (config.prune.prune or config.prune.plan):
        raise CompactDeployError("prune needs --prune METHOD[:RATIO] (or --plan PLAN.json)")
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
