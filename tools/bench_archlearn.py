#!/usr/bin/env python
"""Architectures learnt while training, against a Bayesian-optimisation search at equal budget.

For LeNet-5 (conv 20, conv 50, fc 500, as in the papers) on scikit-learn's digits and
LeNet-300-100 on MNIST-1D (generated locally): plain training; ``gates``, ``gdropout`` and
``sparse`` at several strengths; and optuna's TPE searching the hidden widths with the same total
number of training epochs as the three-point ``gates`` sweep. Every resulting model is built for
this host with compactdeploy (ONNX, TVM), so accuracy, parameters, the gzip-compressed ONNX size and
TVM latency (median of 100 runs, measured on this host) come from the same pipeline.

Writes docs/benchmarks/archlearn-benchmark.md, .json and .png. Usage: .venv/bin/python tools/bench_archlearn.py
(about ten minutes on 2 cores).
"""

from __future__ import annotations

import gzip
import tempfile
import time
from pathlib import Path

import benchlib
import torch

from compactdeploy.data import fit_to_model, load_dataset
from compactdeploy.learn import ArchConfig, ArchLearner
from compactdeploy.config import BuildConfig, MeasureConfig, ModelConfig
from compactdeploy.pipeline import build
from compactdeploy.train import save_checkpoint, save_pruned_checkpoint, train
from compactdeploy.zoo import load_model

DOCS = benchlib.DOCS
EPOCHS = 10
SETUPS = [
    # title, model, fixed args, dataset, searched width args with their full sizes
    ("LeNet-5 (20-50-500) on digits", "lenet5", {"conv1": 20, "conv2": 50, "fc1": 500, "fc2": 0}, "digits",
     {"conv1": 20, "conv2": 50, "fc1": 500}),
    ("LeNet-300-100 on MNIST-1D", "lenet300", {}, "mnist1d", {"hidden1": 300, "hidden2": 100}),
]
# strengths from where they start to act up to just before the network collapses (0.01 closes every
# gate of both networks: see docs/methods.md)
RUNS = [("gates", 0.001), ("gates", 0.002), ("gates", 0.003), ("gdropout", 1.0), ("gdropout", 3.0),
        ("sparse", 1e-4), ("sparse", 1e-3)]
BO_TRIALS = 3  # x EPOCHS each = the budget of the three gates runs
BO_PARAM_WEIGHT = 0.1  # the search maximises accuracy - 0.1 * params / params of the full model


def measure(model_name, args, data_name, checkpoint: Path, work: Path) -> dict:
    out = work / f"build-{checkpoint.stem}"
    result = build(BuildConfig(ModelConfig(model_name, weights=checkpoint, data=data_name), target="host", out=out,
                               measure=MeasureConfig(repeat=100)))
    report = result.report
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(out / "model.onnx")).graph
    nonzero = sum(int(np.count_nonzero(numpy_helper.to_array(init))) for init in graph.initializer if init.data_type == 1)
    return {
        "nonzero_params": nonzero,
        "accuracy": report["accuracy"]["before"],
        "params": report["model"]["params"],
        "widths": {n: w["after"] for n, w in report["model"]["widths"].items()},
        "onnx_gzip_bytes": len(gzip.compress((out / "model.onnx").read_bytes(), 9)),
        "tvm_median_ms": report["latency_ms"]["median"],
    }


def run_setup(title, model_name, args, data_name, searched, rows, work: Path, log) -> None:
    data = load_dataset(data_name)

    def trained(extra_args, method=None, strength=None, epochs=EPOCHS, tag="model"):
        model = load_model(model_name, data, model_args={**args, **extra_args})
        learner = None
        if method:
            example = torch.from_numpy(fit_to_model(data, data.x_train[:1], model.input_shape[1:]))
            learner = ArchLearner(model.module, example, ArchConfig(method, strength=strength))
        start = time.perf_counter()
        result = train(model, data, epochs, seed=0, learner=learner)
        seconds = time.perf_counter() - start
        path = work / f"{tag}.pt"
        if learner is None:
            save_checkpoint(model, data, result, path)
        else:
            summary = learner.summary()
            plan = learner.finalize()
            save_pruned_checkpoint(model, plan, summary, path, learner.linearized, learner.merged)
        return path, seconds, result.test_accuracy

    path, seconds, _ = trained({}, tag=f"{model_name}-plain")
    full = measure(model_name, args, data_name, path, work)
    rows.append({"setup": title, "method": "plain", "strength": None, "train_s": seconds, **full})
    log(f"{title}: plain {full['accuracy']:.4f}, {full['params']:,} params")
    for method, strength in RUNS:
        path, seconds, _ = trained({}, method, strength, tag=f"{model_name}-{method}-{strength}")
        row = measure(model_name, args, data_name, path, work)
        rows.append({"setup": title, "method": method, "strength": strength, "train_s": seconds, **row})
        log(f"  {method} {strength}: {row['accuracy']:.4f}, {row['params']:,} params, widths {row['widths']}")

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = []

    def objective(trial):
        widths = {name: trial.suggest_int(name, 1, size) for name, size in searched.items()}
        path, seconds, _ = trained(widths, tag=f"{model_name}-bo-{trial.number}")
        row = measure(model_name, {**args, **widths}, data_name, path, work)
        trials.append({"trial": trial.number, "searched": widths, "train_s": seconds, **row})
        return row["accuracy"] - BO_PARAM_WEIGHT * row["params"] / full["params"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=BO_TRIALS)
    best = trials[study.best_trial.number]
    rows.append({"setup": title, "method": "bo-tpe (best)", "strength": None, **best,
                 "trials": trials, "budget_epochs": BO_TRIALS * EPOCHS})
    log(f"  bo-tpe best of {BO_TRIALS}: {best['accuracy']:.4f}, {best['params']:,} params, widths {best['searched']}")


def write(rows, seconds) -> None:
    meta = benchlib.meta("bench_archlearn.py", seconds, epochs=EPOCHS, bo_trials=BO_TRIALS)
    benchlib.write_json("archlearn-benchmark", meta, rows)
    lines = [
        "# Architecture learnt while training vs a Bayesian-optimisation search",
        "",
        f"Measured by `{meta['command']}` on {meta['measured_on']} in {meta['seconds']} s. Every model trained"
        f" {EPOCHS} epochs (seed 0), then built for this host by compactdeploy; accuracy on the fixed 20 % test"
        " split; latency is TVM's (untuned) median of 100 runs on this host; size is the gzip-9 of model.onnx."
        f" The TPE search ran {BO_TRIALS} trials of {EPOCHS} epochs (the budget of the three gates runs),"
        f" maximising accuracy - {BO_PARAM_WEIGHT} x params / full params.",
        "",
    ]
    for setup in dict.fromkeys(r["setup"] for r in rows):
        lines += [f"## {setup}", "", "| method | strength | widths | params | non-zero | accuracy | onnx.gz | TVM median |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["setup"] == setup):
            widths = "-".join(str(w) for w in r["widths"].values())
            lines.append(f"| {r['method']} | {r['strength'] if r['strength'] is not None else ''} | {widths} | "
                         f"{r['params']:,} | {r['nonzero_params']:,} | {r['accuracy']:.4f} | {r['onnx_gzip_bytes'] / 1024:.0f} KiB | {r['tvm_median_ms']:.3f} ms |")
        lines.append("")
    lines += ["`sparse` zeroes weights but keeps the layers dense: \"params\" counts its zeros, \"non-zero\" does not; it",
              "buys a smaller compressed file, not speed: the dense kernels run every weight.", "", "![accuracy vs parameters](archlearn-benchmark.png)", ""]
    (DOCS / "archlearn-benchmark.md").write_text("\n".join(lines))
    plot(rows)


def plot(rows) -> None:
    plt = benchlib.pyplot()
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    figure, axes = plt.subplots(1, len(setups), figsize=(6 * len(setups), 4.5), squeeze=False)
    markers = {"plain": "s", "gates": "o", "gdropout": "^", "sparse": "x", "bo-tpe (best)": "*"}
    for ax, setup in zip(axes[0], setups):
        for method, marker in markers.items():
            points = [(r["params"], r["accuracy"]) for r in rows if r["setup"] == setup and r["method"] == method]
            if points:
                ax.scatter(*zip(*points), marker=marker, s=70, label=method)
        for r in rows:
            if r["setup"] == setup and r["method"] == "bo-tpe (best)":
                trials = [(t["params"], t["accuracy"]) for t in r["trials"]]
                ax.scatter(*zip(*trials), marker=".", color="grey", label="bo-tpe trials")
        ax.set_xscale("log")
        ax.set_title(setup, fontsize=10)
        ax.set_xlabel("parameters (log)")
    benchlib.save_figure(figure, axes, "archlearn-benchmark")


def main() -> None:
    rows: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compactdeploy-archlearn-") as tmp:
        for title, model_name, args, data_name, searched in SETUPS:
            run_setup(title, model_name, args, data_name, searched, rows, Path(tmp), print)
    write(rows, time.perf_counter() - start)
    print(f"wrote {DOCS / 'archlearn-benchmark.md'}")


if __name__ == "__main__":
    main()
