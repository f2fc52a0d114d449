"""Which model is worth more: NetAdapt's short-term fine-tune, on held-out training data.

The importance curves price each group's channels alone, before any training. What decides a
pruned model's worth is how well it trains back, and weight norms can rate a cut cheap that does
not train back at all: a residual stream feeding the classifier cut to a few channels (what that
cost: docs/fit.md). So where the build has data, every model the search weighs is pruned, fine-tuned
briefly on most of the training split, and scored on the rest of it; the test split stays for the
report.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

HELD_OUT = 0.2  # of the training split: what the trial fine-tunes never train on


def held_out_split(data):
    """``data`` (``data.Dataset``) with its training split cut in two: the first part to train on,
    the last as the "test" split a trial is scored on (the splits are shuffled when made)."""
    cut = int(round((1 - HELD_OUT) * len(data.x_train)))
    if cut < 1 or cut >= len(data.x_train):
        return None
    return replace(data, x_train=data.x_train[:cut], y_train=data.y_train[:cut],
                   x_test=data.x_train[cut:], y_test=data.y_train[cut:])


@dataclass
class TrialJudge:
    """Scores widths by the held-out accuracy of the model pruned to them and fine-tuned ``epochs``
    (0: scored right after pruning, which is what a build without fine-tuning ships). Scores are
    kept in ``scores`` (the search's state, by widths key), so a resumed search trains nothing twice."""

    loaded: Any  # prepare.Loaded
    method: str
    channel_multiple: int
    exclude: tuple[str, ...]
    epochs: int
    seed: int
    scores: dict[str, float]  # widths key -> held-out accuracy
    split: Any  # data.Dataset: held_out_split of the build's data

    def accuracy(self, widths: dict[str, int], full: dict[str, int], repeat: int = 0) -> float:
        """The held-out accuracy of the trial fine-tune seeded ``seed + repeat`` (the same pruned
        channels each time: only the fine-tune's shuffling and dropout differ)."""
        from ..prune import PruneSpec, prune
        from ..train import evaluate, train
        from .state import widths_key

        key = trial_key(widths_key(widths), repeat)
        if key not in self.scores:
            model = copy.deepcopy(self.loaded.model)
            changed = {g: w for g, w in widths.items() if w != full[g]}
            if changed:
                prune(model.module, self.loaded.example, PruneSpec(self.method, None), self.channel_multiple,
                      self.exclude, changed, self.loaded.calibration,
                      allow_grow=any(w > full[g] for g, w in changed.items()), seed=self.seed)
            if self.epochs:
                self.scores[key] = train(model, self.split, self.epochs, seed=self.seed + repeat).test_accuracy
            else:
                from ..data import fit_to_model

                x = fit_to_model(self.split, self.split.x_test, model.input_shape[1:])
                self.scores[key] = evaluate(model.module, x, self.split.y_test, classes=self.split.num_classes)
        return self.scores[key]


def trial_key(key: str, repeat: int = 0) -> str:
    """Names one trial of a model (its widths key) in the scores: the first by the key itself."""
    return f"{key}+{repeat}" if repeat else key


def trial_scores(scores: dict[str, float], key: str) -> list[float]:
    """Every trial of the model ``key`` names, the first first (more where it was judged again)."""
    found = []
    while trial_key(key, len(found)) in scores:
        found.append(scores[trial_key(key, len(found))])
    return found


def trial_epochs(fit, finetune_epochs: int) -> int | None:
    """The epochs a trial fine-tunes (``fit``: the build's ``FitConfig``): as many training samples
    as the build's fine-tune will see (its ``finetune_epochs`` over the share of the split a trial
    trains on, rounded), at most ``--fit-trial-epochs``; None with ``--fit-trial-epochs 0`` (no trials). A trial shorter than the
    build's fine-tune ranks a deep cut, which trains back slower, below one it overtakes by the
    build's end (docs/benchmarks/trial-judge.md)."""
    if not fit.fit_trial_epochs:
        return None
    matched = max(1, math.floor(finetune_epochs / (1 - HELD_OUT) + 0.5)) if finetune_epochs else 0
    return min(fit.fit_trial_epochs, matched)


def trial_judge(config, loaded, method: str, channel_multiple: int, scores: dict[str, float]) -> TrialJudge | None:
    """The build's judge: None without data or with ``--fit-trial-epochs 0`` (the search then keeps
    the model that keeps the most importance). Trials fine-tune as long as the build will, up to
    ``--fit-trial-epochs``."""
    epochs = trial_epochs(config.fit, config.prune.finetune_epochs)
    if loaded.data is None or epochs is None:
        return None
    split = held_out_split(loaded.data)
    if split is None:
        return None
    return TrialJudge(loaded, method, channel_multiple, config.prune.exclude, epochs, config.model.seed, scores, split)
