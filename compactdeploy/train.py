"""Training and evaluation of zoo models on the local datasets (seconds to minutes on a CPU)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset, fit_to_model
from .zoo import CHECKPOINT_FORMAT, LoadedModel

# (epoch, epochs, train loss, test accuracy)
EpochCallback = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class TrainResult:
    test_accuracy: float
    losses: list[float]
    epochs: int


def evaluate(module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``module`` on (x, y)."""
    import torch

    module.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = module(torch.from_numpy(x[start : start + batch_size]))
            correct += int((logits.argmax(1).numpy() == y[start : start + batch_size]).sum())
    return correct / max(1, len(x))


def train(
    model: LoadedModel,
    data: Dataset,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Adam on cross-entropy; returns the test accuracy after the last epoch."""
    import torch

    torch.manual_seed(seed)
    sample_shape = model.input_shape[1:]
    x_train = fit_to_model(data, data.x_train, sample_shape)
    x_test = fit_to_model(data, data.x_test, sample_shape)
    module = model.module
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    losses, accuracy = [], 0.0
    for epoch in range(epochs):
        module.train()
        order = rng.permutation(len(x_train))
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                module(torch.from_numpy(x_train[idx])), torch.from_numpy(data.y_train[idx])
            )
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x_train))
        accuracy = evaluate(module, x_test, data.y_test)
        if on_epoch:
            on_epoch(epoch + 1, epochs, losses[-1], accuracy)
    module.eval()
    return TrainResult(accuracy, losses, epochs)


def save_checkpoint(model: LoadedModel, data: Dataset, result: TrainResult, path: str | Path) -> None:
    """Write a checkpoint that ``build --weights`` can load with ``weights_only=True``; atomically."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model.name,
        "model_args": model.args,
        "input_shape": list(model.input_shape),
        "data": data.name,
        "epochs": result.epochs,
        "test_accuracy": result.test_accuracy,
        "state_dict": model.module.state_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
