"""The load and prune stages of a build: the model with its weights and data, then pruned (and
fine-tuned) as the config asks."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import BuildConfig, ModelConfig
from .stages import StageClock
from .targets import TargetSpec


@dataclass(frozen=True)
class Shape:
    """A model's size at one point of the pipeline."""

    widths: dict[str, int]
    macs: int
    params: int


@dataclass
class Loaded:
    """What the load stage hands on: the model, its data, one example input, calibration samples."""

    model: Any  # zoo.LoadedModel
    data: Any  # data.Dataset or None
    example: Any  # torch.Tensor, one input
    calibration: Any  # Calibration or None
    x_test: np.ndarray | None


@dataclass
class PrunedModel:
    """What the load and prune stages hand on."""

    model: Any  # zoo.LoadedModel
    data: Any  # data.Dataset or None
    example: Any  # torch.Tensor, one input
    shapes: tuple[Shape, Shape]  # before, after
    accuracies: tuple[float | None, float | None, float | None]  # before, pruned, fine-tuned
    result: Any  # PruneResult or None


def load(model_config: ModelConfig, calibration_samples: int = 256) -> Loaded:
    """The model with its weights, sized to the data; the example input is a test sample, else random."""
    import torch

    from .data import fit_to_model, load_dataset
    from .prune import Calibration
    from .zoo import check_input, load_model

    config = model_config
    data = load_dataset(config.data) if config.data else None
    model = load_model(config.model, data, config.weights, config.model_args, config.input_shape)
    sample_shape = model.input_shape[1:]
    calibration, x_test = None, None
    if data is not None:
        x_test = fit_to_model(data, data.x_test, sample_shape)
        example = torch.from_numpy(x_test[:1].copy())
        count = min(calibration_samples, len(data.x_train))
        calibration = Calibration(fit_to_model(data, data.x_train[:count], sample_shape), data.y_train[:count])
    else:
        example = torch.randn(*model.input_shape, generator=torch.Generator().manual_seed(config.seed))
    check_input(model.module, example)
    return Loaded(model, data, example, calibration, x_test)


def load_and_prune(config: BuildConfig, target: TargetSpec, prune_spec, clock: StageClock, plan=None,
                   loaded: Loaded | None = None) -> PrunedModel:
    """``plan``: a width plan (``prune.WidthPlan``) the pruning must reproduce; ``loaded``: the model
    as an earlier load gave it (the width search's), pruned here in place."""
    from .prune import count_macs_params, layer_widths, prune
    from .train import evaluate, train

    options = config.prune
    with clock.stage("load"):
        loaded = loaded or load(config.model, options.calibration_samples)
        model, data, example, x_test = loaded.model, loaded.data, loaded.example, loaded.x_test
        accuracy_before = evaluate(model.module, x_test, data.y_test) if data is not None else None
        before = Shape(layer_widths(model.module), *count_macs_params(model.module, example))
        clock.summary = f"{model.name}, input {list(model.input_shape)}, weights: {model.weights['source']}"

    prune_result = None
    seed = config.model.seed
    with clock.stage("prune"):
        teacher = copy.deepcopy(model.module).eval() if options.distill else None
        if options.noise_outputs:
            clock.progress(f"training {options.noise_epochs} epochs with {options.noise_outputs} noise outputs")
            train(model, data, options.noise_epochs, seed=seed, noise_outputs=options.noise_outputs)
        if prune_spec is not None:
            clock.progress(f"{prune_spec.method}: choosing channels")
            prune_result = prune(
                model.module, example, prune_spec, target.channel_multiple, options.exclude, options.widths,
                loaded.calibration, allow_grow=options.allow_grow, seed=seed,
            )
            if plan is not None:
                plan.check_replayed(prune_result.plan, prune_result.grown)
            fallbacks = sum(1 for g in prune_result.groups.values() if g["method"] != prune_spec.method)
            clock.summary = (
                f"{options.prune}, params {prune_result.params_before:,} -> {prune_result.params_after:,}"
                + (f" ({fallbacks} coupled groups by l1)" if fallbacks else "")
                + "".join(f"; {', '.join(n for n, w in prune_result.fixed.items() if w == why)} kept: {why}"
                          for why in dict.fromkeys(prune_result.fixed.values()))
            )
        else:
            clock.summary = "skipped (no --prune)"
        accuracy_pruned = evaluate(model.module, x_test, data.y_test) if data is not None else None
        accuracy_after = accuracy_pruned
        if options.finetune_epochs:
            clock.progress(f"fine-tuning {options.finetune_epochs} epochs" + (" with distillation" if teacher else ""))
            accuracy_after = train(model, data, options.finetune_epochs, seed=seed, teacher=teacher).test_accuracy
            clock.summary += f", fine-tuned {options.finetune_epochs} epochs"
        after = Shape(layer_widths(model.module), *count_macs_params(model.module, example))
    return PrunedModel(model, data, example, (before, after), (accuracy_before, accuracy_pruned, accuracy_after), prune_result)


def width_plan(config: BuildConfig, method: str, widths: dict[str, int], removed: dict[str, list[int]],
               grown: dict[str, list[int]], made_by: str):
    """The width plan (``prune.WidthPlan``) of ``config``'s model pruned by ``method``: what
    ``build --plan`` replays; the build and the width search both record theirs this way."""
    from .prune.plan import WidthPlan
    from .zoo import file_sha256

    model = config.model
    return WidthPlan(
        model=model.model, model_args=dict(model.model_args),
        weights_sha256=file_sha256(model.weights) if model.weights else None, method=method, seed=model.seed,
        exclude=tuple(config.prune.exclude), widths=dict(widths), removed=removed, grown=grown, made_by=made_by,
    )
