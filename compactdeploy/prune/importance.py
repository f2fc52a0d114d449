"""Channel importance criteria: each maps a torch-pruning group to one score per channel (higher = keep).

The registry is the extension point for the research methods; a criterion that needs data says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    needs_data: bool
    make: Callable[[], Callable]  # -> a callable(group) -> scores tensor, one per channel


def _l1():
    import torch_pruning as tp

    # Li et al. 2017: the L1 norm of each filter, averaged over the coupled layers of the group
    return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)


def _random():
    import torch_pruning as tp

    return tp.importance.RandomImportance()


CRITERIA: dict[str, Criterion] = {
    "l1": Criterion("l1", "filter L1 norm (Li et al. 2017), data-free baseline", False, _l1),
    "random": Criterion("random", "uniformly random channels, the sanity baseline", False, _random),
}
