"""A build's report.json: every section made here, from the stages' typed results, and nowhere else.

``build_report`` writes what is known without a device; ``apply_measurement`` adds (or replaces)
what the device measured, for ``build`` and ``bench`` alike. The CLI renders reports
(``render``); ``slower_than_onnxruntime_advice`` is the one piece of judgement a report carries.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .compile import TRANSFERRED, TUNED
from .export import PARITY_TOLERANCE

# what a short tuning run bought a pruned model after transfer, measured (docs/benchmarks/schedule-transfer.md)
SHORT_TUNING_BUYS = ("on the 2-core build host, ResNet-20 pruned l1:0.5 ran by transfer alone at 0.98x the time a "
                     "300-trial tuning of it reached, and at 0.93x after 30 more trials: docs/benchmarks/schedule-transfer.md")
_PREPACKED = "_prepacked"  # TVM's suffix for a kernel whose weight repacking was split off at compile time
# what a tuning run buys over the default rules, measured (docs/benchmarks/default-schedules.md)
TUNING_BUYS = ("on the 2-core build host the zoo ran at 0.39-1.17x onnxruntime's time with default schedules, "
               "0.37-1.04x after hours of tuning: docs/benchmarks/default-schedules.md")


def build_report(config, target, pruned, exported, compiled, tuned=None, database=None) -> dict[str, Any]:
    """Everything known without a device (``config``: the BuildConfig; ``pruned``: the prune stage's
    PrunedModel; ``exported``, ``compiled``, ``tuned``: the export, compile and tune results)."""
    model, data, prune_result = pruned.model, pruned.data, pruned.result
    before, after = pruned.shapes
    options = config.prune
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
                "widths_requested": options.widths,
                "channel_multiple": prune_result.channel_multiple,
                "excluded": list(options.exclude),
                "calibration_samples": options.calibration_samples if config.model.data else None,
                "noise_outputs": options.noise_outputs,
                "distill": options.distill,
                "groups": prune_result.groups,
                "plan": prune_result.plan,
                "grown": prune_result.grown,
                "fixed": prune_result.fixed,
            }
            if prune_result
            else None
        ),
        "accuracy": (
            {
                "dataset": data.name,
                "split": "test (20%, fixed seed)",
                "before": pruned.accuracies[0],
                "after_pruning": pruned.accuracies[1],
                "after": pruned.accuracies[2],
                "finetune_epochs": options.finetune_epochs,
            }
            if data is not None
            else None
        ),
        "parity": {
            "torch_vs_onnx_max_abs": exported.torch_vs_onnx_max_abs,
            "onnx_vs_tvm_max_abs": None,
            "tolerance": PARITY_TOLERANCE,
            "tolerance_of": "max(1, max |reference output|): a build over it fails",
            "input": "first test sample" if data is not None else f"random normal, seed {config.model.seed}",
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
            # kernel -> where its schedule came from: "tuned record", "transferred from <kernel at another
            # width>" (tune.transfer), "default rule" (compile.rules) or "unscheduled" (no rule fits it);
            # empty where DLight's rules schedule every kernel (GPU)
            "schedules": compiled.schedules,
            # kernel -> why it has that schedule, where the tuning database says (a default rule kept)
            "schedule_notes": compiled.schedule_notes,
            "notes": compiled.notes,
        },
        "versions": versions(),
        "tuning": tuning_section(database, tuned, compiled),
    }


def tuning_section(database, tuned, compiled) -> dict[str, Any] | None:
    """Which database the build applied, and what this build's tuning (``tune.TuneResult``) did."""
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
            # kernels that had no record: what transfer from other widths timed and kept (tune.transfer)
            transfer={"kernels": tuned.transferred, "s": tuned.transfer_s},
            notes=tuned.notes,
            # other work on the machine that timed the candidates, over a second before the first
            # measurement; null where this build measured nothing
            machine_load=tuned.machine_load,
        )
    return section


def apply_measurement(report: dict[str, Any], measured) -> None:
    """Write a ``bench.Measured`` into a report, replacing any earlier measurement."""
    m = measured.measurement
    report["figures"]["latency"] = measured.where
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
    if len(m.window_medians_ms) > 1:  # timed alone in two windows: the first's figures, or the quicker second's
        report["latency_ms"]["window_medians"] = list(m.window_medians_ms)
    if m.reference_latency_ms:  # the unpruned model, timed in turns with this one (a budgeted build)
        report["latency_ms"]["reference"] = m.reference_latency_ms
    # load: what else the device did while timing (None: not known), see runtime.load.load_between
    report["measured_on"] = {**m.device, "emulated": bool(m.device.get("emulated")), "load": m.load}
    report["parity"]["onnx_vs_tvm_max_abs"] = measured.onnx_vs_tvm_max_abs
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


def manifest_measured(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's copy of the measurement: the latency and where it was measured."""
    return {"latency_ms": report.get("latency_ms"), "where": report["figures"]["latency"]}


def versions() -> dict[str, str]:
    return {
        "compactdeploy": __version__,
        "torch": version_of("torch"),
        "tvm": version_of("tvm"),
        "onnx": version_of("onnx"),
        "onnxruntime": version_of("onnxruntime"),
        "torch_pruning": version_of("torch_pruning"),
    }


def version_of(module_name: str) -> str:
    import importlib

    try:
        return str(importlib.import_module(module_name).__version__)
    except (ImportError, AttributeError):
        return "unknown"


def tuning_note(report) -> str | None:
    """What a short tuning run would still buy this build: its kernels that are not tuned, their
    share of the kernel time measured on the device, and what tuning bought such kernels in the
    benchmark (None: every kernel is tuned, or no tuning database applies)."""
    tuning = report.get("tuning")
    schedules = report["compile"].get("schedules") or {}
    untuned = {kernel for kernel, source in schedules.items() if source != TUNED}
    if not tuning or not untuned:
        return None
    share = ""
    kernels = (report.get("per_layer") or {}).get("kernels")
    if kernels:  # the per-layer profile names kernels as compiled: weight repacking split off
        part = sum(k["share"] for k in kernels if k["kernel"].removesuffix(_PREPACKED) in untuned)
        share = f", {part:.0%} of the kernel time measured here"
    return (f"{len(untuned)} of {len(schedules)} kernels are not tuned ({counted_sources(schedules, TUNED)}{share}); "
            f"a short run with --tune-trials searches from their schedules: {SHORT_TUNING_BUYS}")


def count_by_source(schedules: dict[str, str], leave_out: str | None = None) -> dict[str, int]:
    """Kernels by where their schedule came from; every transferred one under one name."""
    counts: dict[str, int] = {}
    for source in schedules.values():
        if source != leave_out:
            source = f"{TRANSFERRED} other widths" if source.startswith(TRANSFERRED) else source
            counts[source] = counts.get(source, 0) + 1
    return counts


def counted_sources(schedules: dict[str, str], leave_out: str | None = None) -> str:
    """"6 transferred from other widths, 8 default rule": kernels by where their schedule came from."""
    return ", ".join(f"{n} {source}" for source, n in sorted(count_by_source(schedules, leave_out).items()))


def slower_than_onnxruntime_advice(report) -> str | None:
    """What to do when the build runs slower than onnxruntime on the same device (None: it does not)."""
    baseline = report.get("onnxruntime_on_device") or {}
    ratio = baseline.get("tvm_over_onnxruntime")
    if ratio is None or ratio <= 1.0:
        return None
    tuning = report.get("tuning")
    if not tuning:  # no tuning database applies: a GPU build, its kernels scheduled by DLight's rules
        return (
            f"TVM takes {ratio:.2f}x onnxruntime's time here (kernels scheduled by DLight, not tuned): "
            "run this bundle's model.onnx with onnxruntime on the device instead"
        )
    missing = tuning["kernels_tunable"] - tuning["kernels_scheduled"]
    if missing:
        how = counted_sources(report["compile"].get("schedules") or {}, leave_out=TUNED)
        return (
            f"TVM takes {ratio:.2f}x onnxruntime's time here, and {missing} of {tuning['kernels_tunable']} kernels "
            f"are not tuned{f' ({how})' if how else ''}: build again with --tune-trials N to tune them (records are "
            f"kept, an interrupted run resumes; {TUNING_BUYS})"
        )
    return (
        f"TVM takes {ratio:.2f}x onnxruntime's time here with every kernel tuned: more --tune-trials may close "
        "it (the per-layer profile shows where); otherwise run this bundle's model.onnx with onnxruntime"
    )
