"""Training and evaluation of zoo models on the local datasets (seconds to minutes on a CPU)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset, fit_to_model
from .errors import CompactDeployError
from .zoo import CHECKPOINT_FORMAT, LoadedModel

# (epoch, epochs, train loss, test accuracy)
EpochCallback = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class TrainResult:
    test_accuracy: float
    losses: list[float]
    epochs: int
    stopped: str | None = None  # why architecture learning stopped before the last epoch


def evaluate(module, x: np.ndarray, y: np.ndarray, batch_size: int = 256, classes: int | None = None) -> float:
    """Top-1 accuracy of ``module`` on (x, y), over the first ``classes`` outputs (default: all)."""
    import torch

    module.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = module(torch.from_numpy(x[start : start + batch_size]))[:, :classes]
            correct += int((logits.argmax(1).numpy() == y[start : start + batch_size]).sum())
    return correct / max(1, len(x))


GATE_LR = 0.1
DISTILL_TEMPERATURE = 4.0
DISTILL_WEIGHT = 0.5  # of the soft-target loss; the rest is cross-entropy on the labels
# architecture learning has collapsed where test accuracy, once at this many times chance or above,
# falls below it or below half its best; a network that never reaches it is left at chance
COLLAPSE_OVER_CHANCE = 2.0


def train(
    model: LoadedModel,
    data: Dataset,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: EpochCallback | None = None,
    teacher=None,
    noise_outputs: int = 0,
    learner=None,
) -> TrainResult:
    """Adam on cross-entropy; returns the test accuracy after the last epoch.

    ``teacher``: distil from it too (Hinton et al.: KL at temperature 4, weight 0.5).
    ``noise_outputs``: NoiseOut's aid, K extra outputs trained to fresh random targets each batch,
    which raises the correlation between hidden neurons; they are removed before returning.
    ``learner``: an ``learn.ArchLearner`` whose gates train along, with their penalty.
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    if noise_outputs:
        _add_outputs(model.module, noise_outputs)
    sample_shape = model.input_shape[1:]
    x_train = fit_to_model(data, data.x_train, sample_shape)
    x_test = fit_to_model(data, data.x_test, sample_shape)
    module = model.module
    gates = learner.parameters() if learner else []
    gate_ids = {id(p) for p in gates}
    optimiser = torch.optim.Adam([p for p in module.parameters() if id(p) not in gate_ids], lr=lr)
    # plain SGD for the gates: Adam would normalise away the penalty's strength, leaving its sign
    gate_optimiser = torch.optim.SGD(gates, lr=GATE_LR, momentum=0.9) if gates else None
    rng = np.random.default_rng(seed)
    losses, accuracy, best, stopped = [], 0.0, 0.0, None
    last_good = _snapshot(module, gates) if gates else None
    for epoch in range(epochs):
        module.train()
        order = rng.permutation(len(x_train))
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            optimiser.zero_grad()
            if gate_optimiser:
                gate_optimiser.zero_grad()
            x = torch.from_numpy(x_train[idx])
            logits = module(x)
            if noise_outputs:
                logits, noise = logits[:, :-noise_outputs], logits[:, -noise_outputs:]
            loss = F.cross_entropy(logits, torch.from_numpy(data.y_train[idx]))
            if noise_outputs:
                loss = loss + F.mse_loss(noise, torch.randn_like(noise))
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / DISTILL_TEMPERATURE, dim=1)
                distill = F.kl_div(F.log_softmax(logits / DISTILL_TEMPERATURE, dim=1), soft, reduction="batchmean")
                loss = (1 - DISTILL_WEIGHT) * loss + DISTILL_WEIGHT * DISTILL_TEMPERATURE**2 * distill
            if learner is not None:
                loss = loss + learner.penalty(len(x_train))
            loss.backward()
            optimiser.step()
            if gate_optimiser:
                gate_optimiser.step()
                learner.clip()
            total += loss.item() * len(idx)
        losses.append(total / len(x_train))
        accuracy = evaluate(module, x_test, data.y_test, classes=data.num_classes)
        if on_epoch:
            on_epoch(epoch + 1, epochs, losses[-1], accuracy)
        if gates:
            floor = COLLAPSE_OVER_CHANCE / data.num_classes
            best = max(best, accuracy)
            if best >= floor and accuracy < max(floor, best / 2):  # it had learnt, and the gates are closing it
                _restore(module, gates, last_good)
                accuracy = evaluate(module, x_test, data.y_test, classes=data.num_classes)
                stopped = (f"test accuracy collapsed in epoch {epoch + 1} (the gates were closing the network); "
                           f"kept epoch {epoch} ({accuracy:.2%}); lower --arch-strength (now {learner.config.strength:g}) "
                           "to train on")
                break
            last_good = _snapshot(module, gates)
    if gates and accuracy < COLLAPSE_OVER_CHANCE / data.num_classes:
        raise CompactDeployError(
            f"architecture learning left the network at chance (test accuracy {accuracy:.1%}, chance "
            f"{1 / data.num_classes:.1%}): lower --arch-strength (now {learner.config.strength:g}); nothing written"
        )
    if noise_outputs:
        _drop_outputs(module, noise_outputs)
    module.eval()
    return TrainResult(accuracy, losses, epochs, stopped)


def _snapshot(module, gates) -> tuple[dict, list]:
    import copy

    return copy.deepcopy(module.state_dict()), [g.detach().clone() for g in gates]


def _restore(module, gates, snapshot) -> None:
    import torch

    state, values = snapshot
    module.load_state_dict(state)
    with torch.no_grad():
        for gate, value in zip(gates, values):
            gate.copy_(value)


def _output_layer(module):
    from torch import nn

    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CompactDeployError("--noise-outputs needs a model whose output layer is an nn.Linear")
    return linears[-1]


def _add_outputs(module, count: int) -> None:
    """Widen the output layer by ``count`` rows, trained to noise and dropped after training."""
    import torch

    layer = _output_layer(module)
    extra = torch.randn(count, layer.in_features) * layer.weight.detach().std()
    layer.weight = torch.nn.Parameter(torch.cat([layer.weight.detach(), extra]))
    layer.bias = torch.nn.Parameter(torch.cat([layer.bias.detach(), torch.zeros(count)]))
    layer.out_features += count


def _drop_outputs(module, count: int) -> None:
    import torch

    layer = _output_layer(module)
    layer.weight = torch.nn.Parameter(layer.weight.detach()[:-count].clone())
    layer.bias = torch.nn.Parameter(layer.bias.detach()[:-count].clone())
    layer.out_features -= count


def save_checkpoint(model: LoadedModel, data: Dataset, result: TrainResult, path: str | Path) -> None:
    """A trained model's checkpoint, which ``build --weights`` loads with ``weights_only=True``."""
    _write_checkpoint(model, path, data=data.name, epochs=result.epochs, test_accuracy=result.test_accuracy)


def save_pruned_checkpoint(
    model: LoadedModel, plan: dict[str, list[int]], summary: dict[str, Any], path: str | Path,
    linearized: list[str] | None = None,
    merged: list[tuple[str, str]] | None = None,
    grown: dict[str, list[int]] | None = None,
) -> None:
    """A pruned model's checkpoint: the original model, the plan that narrows (and widens) it, its weights."""
    _write_checkpoint(
        model, path, prune_plan=plan, prune_summary=json.dumps(summary), linearized=linearized or [],
        merged=[list(pair) for pair in merged or []], grow_plan=grown or {},
    )


def _write_checkpoint(model: LoadedModel, path: str | Path, **extra: Any) -> None:
    """Plain data only (weights_only loading), written to a temporary name and renamed into place."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model.name,
        "model_args": model.args,
        "input_shape": list(model.input_shape),
        **extra,
        "state_dict": model.module.state_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrainedCheckpoint:
    """What ``compactdeploy train`` did: the model, its data, the result, and what architecture
    learning chose (None without ``--learn-arch``)."""

    model: LoadedModel
    data: Dataset
    result: TrainResult
    learned: dict[str, Any] | None  # ArchLearner.summary(), with the method and test accuracy
    merged: list[tuple[str, str]]  # linear layers folded into the next


def train_to_checkpoint(
    model_name: str, data_name: str, out: Path, epochs: int, lr: float = 1e-3, batch_size: int = 64,
    model_args: dict[str, Any] | None = None, seed: int = 0, learn_arch: str | None = None,
    arch_strength: float | None = None, arch_k: float = 0.3, prior: str = "0.05,0.5",
    on_epoch: EpochCallback | None = None, on_start: Callable[[LoadedModel, Dataset], None] | None = None,
) -> TrainedCheckpoint:
    """Train a zoo model on a local dataset (learning its architecture with ``learn_arch``) and write
    a checkpoint ``build --weights`` loads. ``on_start`` is told the model and data before epoch 1."""
    from .data import load_dataset
    from .resources import check_writable_parent
    from .zoo import load_model

    check_writable_parent(out, "--out")  # before training, not after
    dataset = load_dataset(data_name)
    loaded = load_model(model_name, dataset, model_args=model_args or {})
    learner = None
    if learn_arch:
        import torch

        from .learn import DEFAULT_STRENGTH, ArchConfig, ArchLearner

        arch_strength = DEFAULT_STRENGTH[learn_arch] if arch_strength is None else arch_strength
        try:
            alpha, beta = (float(v) for v in prior.split(","))
        except ValueError:
            raise CompactDeployError(f"--prior {prior!r} is not ALPHA,BETA (e.g. 0.05,0.5)") from None
        example = torch.from_numpy(fit_to_model(dataset, dataset.x_train[:1], loaded.input_shape[1:]))
        learner = ArchLearner(loaded.module, example, ArchConfig(learn_arch, strength=arch_strength, k=arch_k,
                                                                 alpha=alpha, beta=beta))
    if on_start is not None:
        on_start(loaded, dataset)
    result = train(loaded, dataset, epochs, lr=lr, batch_size=batch_size, seed=seed, on_epoch=on_epoch, learner=learner)
    if learner is None:
        save_checkpoint(loaded, dataset, result, out)
        return TrainedCheckpoint(loaded, dataset, result, None, [])
    summary = {"method": learn_arch, "strength": arch_strength, **learner.summary(), "test_accuracy": result.test_accuracy,
               "stopped": result.stopped}
    plan = learner.finalize()
    save_pruned_checkpoint(loaded, plan, summary, out, learner.linearized, learner.merged)
    return TrainedCheckpoint(loaded, dataset, result, summary, list(learner.merged))
