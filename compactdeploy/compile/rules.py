"""Default schedules for CPU kernels that have no tuning record: rules, not a search.

TVM 0.27 has DLight rules for GPUs but, for CPUs, only GEMV and softmax-like reductions: a convolution
without a tuning record compiles as a plain loop nest (tens of times slower than onnxruntime). These
rules schedule every kernel from the target's vector unit (``targets.VectorUnit``), in the spirit of
DLight: the output channels tiled by whole vectors, a register block of output pixels beside them,
the weights repacked at compile time so that a vector load reads contiguous channels, the outer loops
fused and run in parallel, elementwise work vectorized and parallel.

``apply_default_schedules`` leaves kernels that are already scheduled (tuning records) alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..targets import VectorUnit

DEFAULT_RULE = "default rule"  # a kernel's schedule came from these rules (report.json's compile.schedules)
# bump when a rule changes the code it makes: layer-latency tables measured with older rules are stale
RULES_VERSION = 2

_REDUCE = 2  # tirx.IterVar.CommReduce
# Starting the thread pool costs about a microsecond a kernel, more than the whole of a tiny kernel
# (lenet5's fully connected layers, a 10-class head); loop nests with less work than this
# (multiply-adds, or elements moved) run on one thread.
PARALLEL_MIN_WORK = 1 << 16
_SCHEDULED = "tirx.is_scheduled"


def apply_default_schedules(lowered, tvm_target, unit: VectorUnit) -> tuple[Any, dict[str, str]]:
    """Schedule every kernel of ``lowered`` that has no schedule yet.

    Returns the module and, for each kernel the rules scheduled, ``DEFAULT_RULE``; a kernel no rule
    fits stays as it was (unscheduled: correct, slow), which the caller reports.
    """
    from tvm import tirx

    scheduled: dict[str, str] = {}
    with tvm_target:
        for gv, func in list(lowered.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            schedule = default_schedule(func, tvm_target, unit)
            if schedule is not None:
                lowered[gv] = schedule.mod["main"].with_attr(_SCHEDULED, True)
                scheduled[gv.name_hint] = DEFAULT_RULE
    return lowered, scheduled


def default_schedule(func, tvm_target, unit: VectorUnit):
    """The first rule's schedule that fits ``func`` (a kernel: a PrimFunc, or a module whose
    ``main`` it is), or None. Its trace replays on the kernel, so tuning keeps it as a candidate."""
    from tvm import tirx
    from tvm.s_tir.dlight.cpu import Reduction

    if not isinstance(func, tirx.PrimFunc):
        func = func["main"]
    for rule in (_TiledReduction(unit), Reduction(), _Injective(unit)):
        try:
            schedule = rule.apply(func, tvm_target, False)
        except Exception:  # a rule that does not fit this kernel's loop nest: try the next
            schedule = None
        if schedule is not None:
            return schedule
    return None


def finish_weight_layouts(lowered, tvm_target):
    """Repack the weights that schedules (tuned or default) asked for in a new layout, once, now:
    the repacking blocks become functions of constants, which constant folding evaluates."""
    import tvm
    from tvm import relax

    with tvm_target:
        return tvm.transform.Sequential(
            [
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
                relax.transform.DeadCodeElimination(),
            ]
        )(lowered)


def _is_scheduled(func) -> bool:
    return func.attrs is not None and _SCHEDULED in func.attrs and bool(func.attrs[_SCHEDULED])


@dataclass(frozen=True)
class RegisterTile:
    channels: int  # output channels per tile: whole vectors where the width allows
    lanes: int  # the vectorized loop's extent (the vector unit's fp32 lanes, or fewer channels)
    pixels: int  # output pixels (or rows) per tile, unrolled


def register_tile(channels: int, pixels: int, unit: VectorUnit, reuses_input: bool) -> RegisterTile:
    """The tile that keeps the FMA units busiest, by a small model of the innermost loop.

    Per reduction step the tile loads one weight vector per channel vector and one input value per
    pixel (broadcast to a vector; a depthwise convolution loads a vector per pixel and channel
    vector instead: ``reuses_input`` False), and does pixels x vectors FMAs into accumulators that
    must all stay in registers. Two FMAs and two loads issue per cycle on the cores targeted here,
    and an accumulator can take one FMA every ~5 cycles (latency), so a step costs at least 5.

    Channels that are no multiple of a whole vector but of a half (or quarter) one are tiled by
    those: 24 channels on AVX-512 as three 8-lane vectors, not one 24-lane loop, for which LLVM
    makes far slower code (figures: docs/tuning.md).
    """
    options = []
    lanes = unit.lanes
    while lanes >= min(4, unit.lanes) and not options:
        options = [(count * lanes, lanes, count) for count in (1, 2, 3, 4) if channels % (count * lanes) == 0]
        lanes //= 2
    if not options:  # fewer channels than a vector, or no multiple of a part of one: one part-vector
        width = _divisor_at_most(channels, 2 * unit.lanes)
        options = [(width, width, 1)]
    best: tuple[tuple[float, int], RegisterTile] | None = None
    for tile_channels, lanes, vectors in options:
        # the accumulators, the weight vectors and one input register (two spare against spills)
        budget = max(1, (unit.registers - vectors - 2) // vectors)
        for tile_pixels in range(1, min(pixels, budget) + 1):
            if pixels % tile_pixels:
                continue
            fmas = tile_pixels * vectors
            loads = vectors + (tile_pixels if reuses_input else fmas)
            score = (round(fmas / max(fmas / 2, loads / 2, 5), 3), tile_channels)
            if best is None or score > best[0]:
                best = (score, RegisterTile(tile_channels, lanes, tile_pixels))
    assert best is not None  # tile_pixels = 1 always fits
    return best[1]


def _divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class _Rule:
    """DLight's rule protocol: ``apply(func, target, tunable)`` -> a schedule, or None if it does not fit."""

    def __init__(self, unit: VectorUnit):
        self.unit = unit


class _TiledReduction(_Rule):
    """Kernels with one reduction: convolutions (regular, 1x1, depthwise, grouped), dense and matmul,
    pooling, means; with elementwise work before it (padding) and after it (bias, activation,
    residual addition)."""

    def apply(self, func, target, tunable):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        names = [sch.get(b).name_hint for b in blocks]
        position = names.index(sch.get(main).name_hint)
        prologue, epilogue = blocks[:position], blocks[position + 1:]
        block = sch.get(main)
        loops = sch.get_loops(main)
        extents = [_extent(sch, loop) for loop in loops]
        if len(loops) != len(block.iter_vars) or None in extents:
            return None
        variables = [iv.var for iv in block.iter_vars]
        kinds = ["R" if int(iv.iter_type) == _REDUCE else "S" for iv in block.iter_vars]
        if not _bound_one_to_one(sch, main, loops):
            return None
        output_axes = [_axis_of(region.min, variables) for region in block.writes[0].region]
        channel = output_axes[-1]  # the output's innermost dimension: channels in NHWC, features in dense
        if channel is None or kinds[channel] != "S":
            return None
        pixel = next((a for a in reversed(output_axes[:-1]) if a is not None and kinds[a] == "S" and extents[a] > 1), None)
        reuses_input = _reduces_over_input_channels(block, variables, kinds, extents)
        tile = register_tile(extents[channel], extents[pixel] if pixel is not None else 1, self.unit, reuses_input)

        for b in epilogue[:-1]:  # the bias, activation and residual addition become one block
            sch.compute_inline(b)
        if epilogue:
            last = epilogue[-1]
        else:  # the reduction writes the output: accumulate in a tile first
            sch.cache_write(main, 0, "global")
            last = _root_blocks(sch)[-1]

        channel_outer, channel_vectors, channel_lanes = sch.split(
            loops[channel], [None, tile.channels // tile.lanes, tile.lanes]
        )
        if pixel is not None:
            pixel_outer, pixel_inner = sch.split(loops[pixel], [None, tile.pixels])
        others = [loops[i] for i, kind in enumerate(kinds) if kind == "S" and i not in (channel, pixel)]
        outer = [channel_outer, *others] + ([pixel_outer] if pixel is not None else [])
        inner = ([pixel_inner] if pixel is not None else []) + [channel_vectors, channel_lanes]
        sch.reorder(*outer, *[loops[i] for i, kind in enumerate(kinds) if kind == "R"], *inner)
        tiles = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.reverse_compute_at(last, tiles)
        for b in prologue:
            self._prologue(sch, b, tiles, reuses_input)
        if math.prod(extents) >= PARALLEL_MIN_WORK:
            sch.parallel(tiles)
        if pixel is not None:
            sch.unroll(pixel_inner)
        sch.unroll(channel_vectors)
        sch.vectorize(channel_lanes)
        if "R" in kinds:
            init = sch.decompose_reduction(main, loops[kinds.index("R")])
            sch.vectorize(sch.get_loops(init)[-1])
        _vectorize_innermost(sch, last)
        # as MetaSchedule's traces do: the repacking is a postprocessing step, which a search that
        # starts from this schedule leaves out and redoes its own way
        sch.enter_postproc()
        _pack_weights(sch, func, main, block, variables[channel], tile.channels)
        return sch

    def _prologue(self, sch, block, tiles, reuses_input: bool) -> None:
        """Padding is computed per tile where the convolution reads every input channel (a copy of
        the tile's window, small beside the work); for depthwise convolutions and pooling it would
        cost as much as the kernel, so it stays a parallel pass of its own. Other elementwise work
        before the reduction is inlined into it."""
        if not _is_padding(sch, block):
            try:
                sch.compute_inline(block)
                return
            except Exception:  # e.g. read twice with different indices: keep it a pass of its own
                pass
        elif reuses_input:
            sch.compute_at(block, tiles, preserve_unit_loops=True)
            _vectorize_innermost(sch, block)
            return
        _schedule_injective(sch, block, self.unit)


class _Injective(_Rule):
    """Kernels without a reduction (transposes, reshapes, elementwise chains): one fused loop nest,
    parallel outside, vectorized inside."""

    def apply(self, func, target, tunable):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        if not blocks or any(_is_reduction(sch, b) for b in blocks):
            return None
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # a producer read at several places: it keeps its own loop nest
                pass
        for b in _root_blocks(sch):
            _schedule_injective(sch, b, self.unit)
        return sch


def _schedule_injective(sch, block, unit: VectorUnit) -> None:
    loops = sch.get_loops(block)
    extents = [_extent(sch, loop) for loop in loops]
    if not loops or None in extents:
        return
    if extents[-1] >= 2:
        lanes = _divisor_at_most(extents[-1], 2 * unit.lanes)
        if lanes < extents[-1]:
            rest, vector = sch.split(loops[-1], [None, lanes])
            loops = [*loops[:-1], rest]
        else:
            vector, loops = loops[-1], loops[:-1]
        if lanes >= 2:
            sch.vectorize(vector)
    if loops and math.prod(extents) >= PARALLEL_MIN_WORK:
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def _pack_weights(sch, func, main, block, channel_variable, tile_channels: int) -> None:
    """Weights indexed by the output channel in any dimension but the last are repacked so that
    a tile's channels lie side by side (``OHWI`` -> ``O/t,H,W,I,t``): a vector load, not a gather.

    Only the model's constants (``layout_free_buffers``) are repacked; the repacking runs at compile
    time (``finish_weight_layouts``)."""
    from tvm.tirx import IndexMap

    free = [func.params[int(i)] for i in (func.attrs.get("layout_free_buffers", []) if func.attrs else [])]
    for region in block.reads:
        if not any(region.source.same_as(buffer) for buffer in free):
            continue
        dims = [d for d, r in enumerate(region.region) if r.min.same_as(channel_variable)]
        if len(dims) != 1 or dims[0] == len(region.region) - 1:
            continue
        index = next(i for i, r in enumerate(sch.get(main).reads) if r.source.same_as(region.source))
        repack = sch.cache_read(main, index, "global")
        sch.annotate(repack, "meta_schedule.layout_rewrite_preproc", 1)
        sch.transform_layout(repack, ("write", 0), IndexMap.from_func(_tiled_layout(dims[0], tile_channels),
                                                                      ndim=len(region.region)))


def _tiled_layout(dim: int, tile: int):
    def layout(*index):
        return (*index[:dim], index[dim] // tile, *index[dim + 1:], index[dim] % tile)

    return layout


def _root_blocks(sch) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_reduction(sch, block) -> bool:
    return any(int(iv.iter_type) == _REDUCE for iv in sch.get(block).iter_vars)


def _is_padding(sch, block) -> bool:
    return "if_then_else" in sch.get(block).body.script()


def _extent(sch, loop) -> int | None:
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _axis_of(index, variables) -> int | None:
    return next((i for i, v in enumerate(variables) if index.same_as(v)), None)


def _bound_one_to_one(sch, block, loops) -> bool:
    """Whether the block's i-th axis is bound to its i-th loop (as legalized kernels are), so that
    splitting a loop tiles the axis of the same index."""
    import tvm

    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    return all(value.same_as(sch.get(loop).loop_var) for value, loop in zip(realize.iter_values, loops))


def _reduces_over_input_channels(block, variables, kinds, extents) -> bool:
    """Whether a read's innermost index is a reduction axis longer than one: a convolution or a
    matmul summing over input channels, whose input values each serve a whole channel vector.
    Depthwise convolutions and pooling sum over a window only."""
    for region in block.reads:
        axis = _axis_of(region.region[-1].min, variables)
        if axis is not None and kinds[axis] == "R" and extents[axis] > 1:
            return True
    return False


def _vectorize_innermost(sch, block) -> None:
    loops = sch.get_loops(block)
    if loops and (_extent(sch, loops[-1]) or 0) >= 2:
        sch.vectorize(loops[-1])
