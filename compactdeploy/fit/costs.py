"""What a width costs on the target: every conv/linear layer compiled alone at the widths the search
may give it, timed on the device, and kept in a table on disk.

A layer's cost depends on both of its widths (a convolution's work is in x out), so the table is
keyed by the layer's whole signature at those widths, not by a group's width alone; layers of the
same shape in different models or runs share an entry. Tables live under the cache, one per
(target, device, TVM version, tuning records), and are rewritten atomically after every batch, so
an interrupted measurement keeps what it finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CompactDeployError
from ..resources import cache_dir
from ..targets import TargetSpec

PROBE_BATCH = 48  # layers compiled into one library and timed in one session
ANCHOR_EVERY = 8  # probes timed between two timings of the anchor layer
# On a shared machine another tenant's busy spells (seconds long) slow a probe and the anchor by
# different factors, so no scaling undoes them: a probe's time is its fastest timing between two
# quiet timings of the anchor (within QUIET_ANCHOR of its fastest), once it has QUIET_TIMINGS of them;
# the rest are timed again in another pass, after a pause, PROBE_PASSES in all at most (docs/fit.md).
PROBE_PASSES = 4
QUIET_TIMINGS = 2
QUIET_ANCHOR = 0.10  # wider than the anchor's quiet timings vary, narrower than a busy spell slows it
FLOAT_BYTES = 4


@dataclass(frozen=True)
class LayerSignature:
    """One conv/linear layer as the compiler sees it: batch 1, float32, followed by bias and ReLU."""

    kind: str  # "conv1d", "conv2d" or "linear"
    in_channels: int
    out_channels: int
    spatial: tuple[int, ...] = ()  # the input's spatial size; () for linear
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True

    @property
    def key(self) -> str:
        if self.kind == "linear":
            return f"linear {self.in_channels}->{self.out_channels} b{int(self.bias)}"
        return (
            f"{self.kind} {self.in_channels}->{self.out_channels} @{_dims(self.spatial)} k{_dims(self.kernel)} "
            f"s{_dims(self.stride)} p{_dims(self.padding)} d{_dims(self.dilation)} g{self.groups} b{int(self.bias)}"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.in_channels, *self.spatial)

    def probe_input_shape(self, channels_last: bool) -> tuple[int, ...]:
        """The input as the compiled layer reads it: NHWC for a conv2d in a channels-last build."""
        if channels_last and self.kind == "conv2d":
            return (1, *self.spatial, self.in_channels)
        return self.input_shape

    def output_spatial(self) -> tuple[int, ...]:
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(self.spatial, self.kernel, self.stride, self.padding, self.dilation)
        )

    def params(self) -> int:
        per_output = (self.in_channels // self.groups) * math.prod(self.kernel or (1,))
        return self.out_channels * per_output + (self.out_channels if self.bias else 0)

    def macs(self) -> int:
        per_output = (self.in_channels // self.groups) * math.prod(self.kernel or (1,))
        return self.out_channels * per_output * math.prod(self.output_spatial() or (1,))


def _dims(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


# A layer timed beside the probes of every batch: a device's slow or fast minutes (thermal
# throttling, a shared host's neighbours) move it with them, so the table's entries are kept on
# the scale of its first timing, whenever and on whichever board of a tracker key each was timed.
ANCHOR = LayerSignature("conv2d", 32, 32, (16, 16), (3, 3), (1, 1), (1, 1), (1, 1))


@dataclass(frozen=True)
class LayerSlot:
    """A layer of the model and how the search's group widths change its signature."""

    name: str
    full: LayerSignature
    out_terms: tuple[tuple[str, int], ...]  # (group, outputs per channel): it produces the group's channels
    in_terms: tuple[tuple[str, int], ...]  # (group, inputs per channel; a block behind a flatten): it reads them
    depthwise_of: str | None = None  # a depthwise conv: in, out and groups all follow this group

    def groups(self) -> set[str]:
        return {g for g, _ in self.out_terms + self.in_terms} | ({self.depthwise_of} if self.depthwise_of else set())

    def at(self, widths: dict[str, int], full: dict[str, int]) -> LayerSignature:
        if self.depthwise_of is not None:
            group = self.depthwise_of
            multiplier = self.full.out_channels // self.full.in_channels
            return replace(self.full, in_channels=widths[group], out_channels=widths[group] * multiplier, groups=widths[group])
        out = self.full.out_channels - sum((full[g] - widths[g]) * n for g, n in self.out_terms)
        inp = self.full.in_channels - sum((full[g] - widths[g]) * n for g, n in self.in_terms)
        return replace(self.full, in_channels=inp, out_channels=out)


def signature_of(layer, input_shape: tuple[int, ...]) -> LayerSignature:
    """The signature of a torch conv/linear layer that reads inputs of ``input_shape``."""
    from torch import nn

    if isinstance(layer, nn.Linear):
        return LayerSignature("linear", layer.in_features, layer.out_features, bias=layer.bias is not None)
    kind = "conv2d" if isinstance(layer, nn.Conv2d) else "conv1d"
    if isinstance(layer.padding, str):
        raise CompactDeployError(f"the width search does not model padding={layer.padding!r} convolutions yet")
    return LayerSignature(
        kind, layer.in_channels, layer.out_channels, spatial=tuple(int(s) for s in input_shape[2:]),
        kernel=tuple(layer.kernel_size), stride=tuple(layer.stride), padding=tuple(layer.padding),
        dilation=tuple(layer.dilation), groups=layer.groups, bias=layer.bias is not None,
    )


def candidate_widths(full: int, multiple: int, points: int) -> list[int]:
    """The widths the search may give a group: multiples of the target's ``multiple``, about
    ``points`` of them from one multiple up to the full width (which is always one)."""
    if full <= multiple:
        return [full]
    step = multiple * max(1, math.ceil(full / (multiple * points)))
    return sorted({w for w in range(step, full, step) if w >= multiple} | {full})


@dataclass(frozen=True)
class LayerTimes:
    """A batch's layers timed on the device, on the table's scale."""

    ms: list[float | None]  # None for a layer whose board dropped out
    anchor_ms: float | None  # the anchor's time the batch was scaled to (the table's, or this batch's first)


class LatencyTable:
    """Measured milliseconds per layer signature, for one device; a JSON file under the cache.

    ``anchor_ms`` is the ``ANCHOR`` layer's (quiet) time when the table's first batch was timed; every later
    batch is scaled by it over the anchor's time beside that batch (None where the measurer has none)."""

    def __init__(self, path: Path, identity: dict[str, Any]):
        self.path = path
        self.identity = identity
        self.entries: dict[str, float] = {}
        self.anchor_ms: float | None = None
        if path.exists():
            try:
                stored = json.loads(path.read_text())
                self.entries = {str(k): float(v) for k, v in stored.get("entries", {}).items()}
                self.anchor_ms = float(stored["anchor_ms"]) if stored.get("anchor_ms") is not None else None
            except (ValueError, AttributeError, TypeError):
                # a damaged table is measured again, not trusted
                self.entries, self.anchor_ms = {}, None
        self.measured_now = 0  # entries this process measured (the rest were reused)

    def __contains__(self, signature: LayerSignature) -> bool:
        return signature.key in self.entries

    def ms(self, signature: LayerSignature) -> float:
        return self.entries[signature.key]

    def save(self) -> None:
        from ..resources import write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"identity": self.identity, "anchor_ms": self.anchor_ms,
                               "entries": dict(sorted(self.entries.items()))})


def table_for(target: TargetSpec, fingerprint: dict[str, Any] | None, tuning_database) -> LatencyTable:
    """The table for ``target`` on the device with ``fingerprint``, against the tuning records it compiles with."""
    from ..compile import CONV_LAYOUT, RULES_VERSION, builds_channels_last
    from ..tune import database_for
    from ..tune.transfer import TRANSFER

    identity = dict(database_for(target, fingerprint).identity)
    identity.pop("format", None)  # the database's own format, not the table's
    # tables measured in another layout are stale
    identity["conv_layout"] = CONV_LAYOUT["relax.nn.conv2d"] if builds_channels_last(target) else ["NCHW", "OIHW"]
    # a layer's time depends on its schedule: new tuning records, or new default rules, make a new table
    identity["default_rules"] = RULES_VERSION
    # entries on the scale of the anchor layer's first timing (tables timed without one are stale)
    identity["anchor"] = ANCHOR.key
    # each entry a probe's time between quiet timings of the anchor (tables of one pass are stale)
    identity["probe_timing"] = ("one pass (emulated)" if (fingerprint or {}).get("emulated") else
                                f"quiet passes: {PROBE_PASSES} at most, {QUIET_TIMINGS} timings within {QUIET_ANCHOR}")
    # records the search's own candidates transferred leave the table standing: they follow from the others
    identity["tuning_records_sha256"] = (tuning_database.records_sha256(excluding_by=TRANSFER)
                                         if tuning_database is not None else None)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return LatencyTable(cache_dir("latency") / f"{target.name}-{digest}.json", identity)


def probe_module(signatures: list[LayerSignature], channels_last: bool, seed: int = 0):
    """A Relax module with one function per signature: the layer, its bias and a ReLU, random weights.

    The ops are the ones TVM's ONNX importer emits for Conv and Gemm (the weight transpose already
    folded), in the layout the build computes them in (``channels_last``: conv2d in NHWC, as
    ``compactdeploy.tune.CONV_LAYOUT``), so the compiler fuses and schedules each probe as it does the
    layer in the model, with no layout change around it that the model does not have.
    """
    from tvm import relax

    rng = np.random.default_rng(seed)
    builder = relax.BlockBuilder()

    def const(*shape):
        return relax.const(rng.standard_normal(shape).astype("float32") * 0.1)

    for index, s in enumerate(signatures):
        x = relax.Var("x", relax.TensorType(s.probe_input_shape(channels_last), "float32"))
        nhwc = channels_last and s.kind == "conv2d"
        with builder.function(f"probe_{index}", [x]):
            with builder.dataflow():
                if s.kind == "linear":
                    y = builder.emit(relax.op.matmul(x, const(s.in_channels, s.out_channels)))
                    if s.bias:
                        y = builder.emit(relax.op.add(y, const(s.out_channels)))
                else:
                    conv = relax.op.nn.conv2d if s.kind == "conv2d" else relax.op.nn.conv1d
                    layout = {"data_layout": "NHWC", "kernel_layout": "OHWI"} if nhwc else {}
                    weight = (const(s.out_channels, *s.kernel, s.in_channels // s.groups) if nhwc
                              else const(s.out_channels, s.in_channels // s.groups, *s.kernel))
                    y = builder.emit(conv(x, weight, strides=s.stride, padding=s.padding, dilation=s.dilation,
                                          groups=s.groups, **layout))
                    if s.bias:
                        ones = [1] * len(s.spatial)
                        y = builder.emit(relax.op.add(y, const(1, *ones, s.out_channels) if nhwc
                                                      else const(1, s.out_channels, *ones)))
                y = builder.emit_output(builder.emit(relax.op.nn.relu(y)))
            builder.emit_func_output(y)
    return builder.get()


def measure_missing(
    table: LatencyTable,
    signatures: Iterable[LayerSignature],
    time_layers: Callable[[list[LayerSignature]], list[float]],
    progress: Callable[[str], None] | None = None,
) -> int:
    """Time every signature the table lacks (``time_layers``: a batch -> ms each, None where a board
    dropped out before timing it), in batches; returns how many."""
    missing = list({s.key: s for s in signatures if s not in table}.values())
    say = progress or (lambda _: None)
    for start in range(0, len(missing), PROBE_BATCH):
        batch = missing[start : start + PROBE_BATCH]
        say(f"latency table: {len(batch)} layers ({start + len(batch)}/{len(missing)} new, {len(table.entries)} known)")
        times = time_layers(batch)
        finished = [(signature, ms) for signature, ms in zip(batch, times) if ms is not None]
        for signature, ms in finished:
            table.entries[signature.key] = ms
        table.measured_now += len(finished)
        table.save()  # after every batch: an interrupted run keeps what it measured
        if len(finished) < len(batch):
            raise CompactDeployError(f"{len(batch) - len(finished)} layers of the latency table were not timed: "
                                     "their board dropped out and no other took them")
    return len(missing)


def time_layers_on_device(batch: list[LayerSignature], target: TargetSpec, session_factory: Callable[[], Any], linker,
                          database, progress: Callable[[str], None] | None = None, boards: int = 1,
                          anchor_ms: float | None = None) -> LayerTimes:
    """Each layer of ``batch`` compiled as the build compiles it (``database``'s records, else the
    default rules), and timed on the device beside the ``ANCHOR`` layer: ms each, scaled to
    ``anchor_ms`` (the table's; None: to this batch's first anchor timing).

    With ``boards`` > 1 (the boards of a tracker key) the batch is cut in as many
    libraries, each timed in a session of its own while the next compiles; a part whose board drops
    out is timed again on another, and is None only if that fails too, so the rest is kept. Each
    part is scaled by its own board's anchor, so boards of one key that differ in speed share a scale."""
    say = progress or (lambda _: None)
    parts = [batch[i::boards] for i in range(min(boards, len(batch)))]
    with tempfile.TemporaryDirectory(prefix="compactdeploy-probes-") as tmp, \
            ThreadPoolExecutor(max_workers=len(parts)) as pool:
        timed = []
        for index, part in enumerate(parts):
            say(f"latency table: compiling {len(part)} layers" + (f" (part {index + 1}/{len(parts)})" if len(parts) > 1 else ""))
            directory = Path(tmp) / str(index)
            directory.mkdir()
            lib = _compile_probes(part, target, directory, linker, database)
            timed.append(pool.submit(_time_part, session_factory, lib, part, target, retry=len(parts) > 1, say=say))
        say(f"latency table: timing {len(batch)} layers on " + (f"{len(parts)} boards" if len(parts) > 1 else "the device"))
        by_key = {}
        for part, future in zip(parts, timed):
            times, part_anchor_ms = future.result()
            if part_anchor_ms is not None:
                anchor_ms = anchor_ms or part_anchor_ms
                times = [t * anchor_ms / part_anchor_ms for t in times]
            by_key.update(zip((s.key for s in part), times))
    return LayerTimes([by_key[s.key] for s in batch], anchor_ms)


def _time_part(session_factory, lib: Path, part: list[LayerSignature], target: TargetSpec, retry: bool,
               say) -> tuple[list[float | None], float | None]:
    try:
        return _time_probes(session_factory, lib, part, target)
    except CompactDeployError as exc:
        if not retry:
            raise
        say(f"latency table: {exc}; timing its {len(part)} layers on another board")
    try:
        return _time_probes(session_factory, lib, part, target)
    except CompactDeployError as exc:
        say(f"latency table: {exc}")
        return [None] * len(part), None


def _compile_probes(batch, target: TargetSpec, directory: Path, linker, database) -> Path:
    """``batch``'s probes, then the anchor's (the library's last function)."""
    from ..compile import builds_channels_last, compile_module

    return compile_module(probe_module([*batch, ANCHOR], builds_channels_last(target)), target, directory, linker,
                          database).lib_path


def _time_probes(session_factory, lib: Path, batch: list[LayerSignature], target: TargetSpec) -> tuple[list[float], float]:
    """ms of each probe of ``batch``, and the anchor's quiet ms (``time_in_quiet_passes``)."""
    from tvm import relax
    from tvm import runtime as tvm_runtime

    from ..compile import builds_channels_last
    from ..device import answering

    session = session_factory()
    fingerprint = session.fingerprint
    if fingerprint is not None and fingerprint["machine"] != target.arch:
        raise CompactDeployError(
            f"{session.address} is {fingerprint['machine']}, but target {target.name} is {target.arch}: "
            "measure a target's costs on a device of that target"
        )
    from ..compile import backend_of

    dev = session.device(backend_of(target).device)
    layout = builds_channels_last(target)
    rng = np.random.default_rng(0)
    with answering(session.address, "timing layers for the latency table"):
        session.remote.upload(str(lib), "probes.so")
        vm = relax.VirtualMachine(session.remote.load_module("probes.so"), dev)
        inputs = [tvm_runtime.tensor(rng.standard_normal(s.probe_input_shape(layout)).astype("float32"), dev)
                  for s in [*batch, ANCHOR]]

        def timed(index: int) -> float:  # the anchor is the library's last function
            # several runs per repeat where a layer is tiny, so the timer's resolution does not matter
            result = vm.time_evaluator(f"probe_{index}", dev, number=1, repeat=7, min_repeat_ms=2)(inputs[index])
            return float(np.median(result.results)) * 1e3

        # an emulated device's times are never latency: passes and pauses would clean nothing worth having
        passes = 1 if fingerprint is not None and fingerprint.get("emulated") else PROBE_PASSES
        return time_in_quiet_passes(timed, lambda: timed(len(batch)), len(batch), passes=passes)


def time_in_quiet_passes(time_probe: Callable[[int], float], time_anchor: Callable[[], float], count: int,
                         pause: Callable[[float], None] = time.sleep, passes: int = PROBE_PASSES,
                         ) -> tuple[list[float], float]:
    """``count`` probes timed in passes with the anchor every ANCHOR_EVERY probes: ms of each (its
    fastest timing between quiet anchor timings, ``passes`` at most), and the anchor's median quiet ms
    (a median: the fastest of more timings would be faster, and scale a busier batch's entries up)."""
    from ..bench.session import BUSY_PAUSE_S

    timings: list[list[tuple[float, float]]] = [[] for _ in range(count)]  # (ms, the slower anchor around it)
    anchors: list[float] = []
    pending = list(range(count))

    def quiet(index: int) -> list[float]:
        return [ms for ms, anchor in timings[index] if anchor <= min(anchors) * (1 + QUIET_ANCHOR)]

    for done in range(passes):
        if done:
            pause(BUSY_PAUSE_S * done)
        time_anchor()  # not kept: the first timing in a session, or after a pause, runs cold (up to 2x)
        before = time_anchor()
        anchors.append(before)
        for start in range(0, len(pending), ANCHOR_EVERY):
            segment = [(index, time_probe(index)) for index in pending[start : start + ANCHOR_EVERY]]
            after = time_anchor()
            anchors.append(after)
            for index, ms in segment:
                timings[index].append((ms, max(before, after)))
            before = after
        pending = [index for index in pending if len(quiet(index)) < QUIET_TIMINGS]
        if not pending:
            break
    quiet_anchor = float(np.median([ms for ms in anchors if ms <= min(anchors) * (1 + QUIET_ANCHOR)]))
    return [min(quiet(index) or [ms for ms, _ in timings[index]]) for index in range(count)], quiet_anchor
