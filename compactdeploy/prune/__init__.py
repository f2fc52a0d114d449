"""Prune stage: remove whole channels/neurons so the model is physically narrower."""

from .core import (
    PruneResult,
    PruneSpec,
    count_macs_params,
    layer_widths,
    parse_prune_spec,
    parse_widths,
    prune,
    replay,
)
from .methods import METHODS, Calibration

__all__ = [
    "METHODS",
    "Calibration",
    "PruneResult",
    "PruneSpec",
    "count_macs_params",
    "layer_widths",
    "parse_prune_spec",
    "parse_widths",
    "prune",
    "replay",
]
