"""Channels that come in blocks: the heads of an attention layer, the groups of a grouped convolution.

Such a layer splits its width into equal blocks by position. Narrowed unevenly, the narrower width is
split again and each head or group reads channels of its neighbours, silently. So a group of channels
that feeds one loses the same number of channels from every block: attention heads by the method's
scores within each head; a grouped convolution at the same positions in every group (a score per
position, summed over the groups), which is also what torch-pruning assumes when it narrows a grouped
convolution's inputs. Merging methods do not merge across blocks: they choose by l1 here, and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CompactDeployError
from .groups import ChannelGroup
from .methods import AUTO, Method, Scorer, Selection, l1_scores


@dataclass(frozen=True)
class Blocks:
    count: int
    kind: str  # "heads" or "groups"
    layers: list[nn.Module]  # the attention layers or grouped convolutions that split the channels

    @property
    def same_positions(self) -> bool:
        return self.kind == "groups"


def blocks_of(view: ChannelGroup, name: str, name_of: dict) -> Blocks | None:
    """How the group's channels split into blocks, or None; refuses splits that do not line up."""
    attention = [layer for layer in view.others if isinstance(layer, nn.MultiheadAttention)]
    grouped = list({id(p.module): p for p in view.producers + view.consumers
                    if isinstance(p.module, (nn.Conv1d, nn.Conv2d)) and p.module.groups > 1}.values())
    if not attention and not grouped:
        return None
    identity = [[c] for c in range(view.width)]
    if attention:
        heads = attention[0].num_heads
        lined_up = all(layer.num_heads == heads and layer.embed_dim == view.width for layer in attention) and all(
            producer.per_channel == identity for producer in view.producers)
        blocks = Blocks(heads, "heads", attention)
        construct = "attention layers whose heads"
    else:
        counts = {p.module.groups for p in grouped}
        blocks = Blocks(max(counts), "groups", [p.module for p in grouped])
        lined_up = len(counts) == 1 and view.width % blocks.count == 0 and all(p.per_channel == identity for p in grouped)
        construct = "grouped convolutions (" + ", ".join(f"{name_of.get(p.module, '?')}: groups={p.module.groups}"
                                                         for p in grouped) + ") whose groups"
    if attention and grouped or not lined_up:
        raise CompactDeployError(
            f"prune: layer {name!r} feeds {construct} do not line up with its channels; pass --exclude {name}"
        )
    return blocks


def select_in_blocks(method: Method, view: ChannelGroup, n_remove: int, blocks: Blocks, name: str,
                     requested: bool) -> Selection:
    """``n_remove`` channels, the same number from every block (rounded to a multiple of the count)."""
    count, size = blocks.count, view.width // blocks.count
    if requested and n_remove % count:
        raise CompactDeployError(
            f"--widths {name}={view.width - n_remove}: its channels feed {count} {blocks.kind} "
            f"({blocks.kind} split channels evenly); give a multiple of {count}"
        )
    per_block = 0 if n_remove == AUTO else min(size - 1, max(0, round(n_remove / count)))
    scorer = isinstance(method, Scorer)
    scores = (method.scores(view) if scorer else l1_scores(view)).reshape(count, size)
    if blocks.same_positions:
        positions = torch.argsort(scores.sum(dim=0), stable=True)[:per_block].tolist()
        remove = [block * size + p for block in range(count) for p in positions]
    else:
        remove = [block * size + p for block in range(count)
                  for p in torch.argsort(scores[block], stable=True)[:per_block].tolist()]
    label = method.name if scorer else f"l1 (fallback: {method.name} does not merge across {blocks.kind})"
    return Selection(sorted(remove), label)


def describe(blocks: Blocks, removed: int, name_of: dict) -> str:
    """What the report says a group's narrowing did to its blocks."""
    layers = ", ".join(name_of.get(layer, "?") for layer in blocks.layers)
    text = f"{removed // blocks.count} channels from each of the {blocks.count} {blocks.kind} of {layers}"
    if blocks.kind == "heads":
        text += "; queries rescaled to keep the attention scale"
    elif removed:
        text += ", at the same positions in every group"
    return text


def head_dims(blocks: Blocks | None) -> list[int]:
    return [layer.head_dim for layer in blocks.layers] if blocks is not None and blocks.kind == "heads" else []


def keep_attention_scale(blocks: Blocks, head_dims_before: list[int]) -> None:
    """Attention divides q.k by sqrt(head_dim); narrower heads would sharpen it. Scaling the queries
    by sqrt(new/old) keeps the original scale."""
    for layer, before in zip(blocks.layers, head_dims_before):
        if layer.head_dim == before:
            continue
        factor = (layer.head_dim / before) ** 0.5
        with torch.no_grad():
            layer.in_proj_weight[: layer.embed_dim] *= factor
            if layer.in_proj_bias is not None:
                layer.in_proj_bias[: layer.embed_dim] *= factor
