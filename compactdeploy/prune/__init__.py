"""Prune stage: remove whole channels/neurons so the model is physically narrower."""

from .core import PruneResult, PruneSpec, count_macs_params, layer_widths, parse_prune_spec, prune, replay
from .importance import CRITERIA

__all__ = [
    "CRITERIA",
    "PruneResult",
    "PruneSpec",
    "count_macs_params",
    "layer_widths", "parse_prune_spec", "prune", "replay"]
