"""What the width search measures with: a ``Measurer`` times layers (for the latency table) and
whole candidate models, compiled as they would ship.

``DeviceMeasurer`` runs the build's own stages on a candidate, with nothing written but a
scratch directory: export to ONNX, the tune stage's schedule transfer (no trials) where the
tuning database has records to transfer, compile with the database's records and the default
rules, and the benchmark stage on the deployment's device. Tests give the search a measurer that
stands in for a device where the device is not the point.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import CompactDeployError

# kernels that must never ship unscheduled on a CPU: the ones the default rules exist for
HEAVY_KERNELS = ("conv", "matmul", "dense")


@dataclass(frozen=True)
class ModelTiming:
    """A candidate compiled as it would ship and measured whole."""

    ms: float  # its quiet time: alone, over every window (``bench.quiet_time``); beside a reference, ``bench.quiet_times``
    memory_bytes: int  # weights (ONNX initializers) + TVM's planned workspace
    where: str  # where the figure comes from (real hardware, EMULATED, ...)
    schedules: dict[str, int] = field(default_factory=dict)  # schedule source -> kernels compiled with it
    unscheduled: list[str] = field(default_factory=list)  # conv/matmul kernels compiled without any schedule
    reference_ms: float | None = None  # the reference model's quiet time, timed in turns with this one (set_reference)
    timings: int = 1  # the windows it was timed in (more where the device was busy through one)


class Measurer(Protocol):
    """What the search needs from a device."""

    fingerprint: dict[str, Any] | None  # the measuring device (keys the latency table and the search's state)

    def table(self) -> Any:
        """The latency table (``costs.LatencyTable``) of this device and the schedules it compiles with."""

    def time_layers(self, batch: list[Any]) -> list[float | None]:
        """Milliseconds of each layer signature (``costs.LayerSignature``) of ``batch``, on the
        table's scale (``costs.time_layers_on_device``); None for those a board that dropped out left untimed."""

    def time_model(self, module: Any, example: Any, label: str) -> ModelTiming:
        """One candidate model (a torch module and an example input) compiled as it would ship, measured whole."""

    def set_reference(self, module: Any, example: Any, directory: Path) -> Path | None:
        """Compile ``module`` (the unpruned model) as it ships into ``directory`` and time every later
        model in turns with it; the library, or None where the measurer has no device to drift."""


def unscheduled_heavy_kernels(schedules: dict[str, str]) -> list[str]:
    """The conv/matmul kernels of a compile result's ``schedules`` that got no schedule at all."""
    from ..compile.passes import UNSCHEDULED

    return sorted(k for k, source in schedules.items()
                  if source == UNSCHEDULED and any(word in k for word in HEAVY_KERNELS))


class DeviceMeasurer:
    """Measures on a deployment's device; open it with ``DeviceMeasurer.open`` for a whole search."""

    def __init__(self, target, deployment, linker, open_session: Callable, fingerprint, measure_config,
                 transfer: bool, default_schedules: bool, progress: Callable[[str], None], boards: int = 1):
        self.target, self.deployment, self.linker = target, deployment, linker
        self.open_session, self.fingerprint, self.boards = open_session, fingerprint, boards
        self.measure_config, self.transfer, self.default_schedules = measure_config, transfer, default_schedules
        self.say = progress
        self.reference: Path | None = None
        self.quiet_timer = None  # bench.QuietTimer: the reference's quietest window in this search
        self._table = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, target, deployment, linker, measure_config, transfer: bool = True, default_schedules: bool = True,
             progress: Callable[[str], None] | None = None) -> Iterator[DeviceMeasurer]:
        """A session per batch of measurements, let go after (a tracker's device is then free
        between them); this machine is served by one agent for the whole search."""
        say = progress or (lambda _: None)
        boards = deployment.boards()  # counted before this search holds one
        if boards > 1:
            say(f"{boards} boards under {deployment.device}: the latency table is timed on all of them")
        with deployment.sessions() as open_session:
            fingerprint = open_session().fingerprint
            yield cls(target, deployment, linker, open_session, fingerprint, measure_config, transfer,
                      default_schedules, say, boards)

    def table(self):
        from .costs import table_for

        if self._table is None:
            self._table = table_for(self.target, self.fingerprint, self.deployment.database)
        return self._table

    def time_layers(self, batch):
        from .costs import time_layers_on_device

        table = self.table()
        timed = time_layers_on_device(batch, self.target, self.open_session, self.linker, self.deployment.database,
                                      self.say, self.boards, anchor_ms=table.anchor_ms)
        table.anchor_ms = timed.anchor_ms  # saved with the batch's entries
        return timed.ms

    def _compile(self, module, example, directory: Path, say):
        """Export, transfer schedules where the database has records to transfer, and compile, as a build does."""
        from ..compile import compile_onnx
        from ..export import export_onnx
        from ..tune import transfers_schedules, tune_model

        deployment = self.deployment
        say("export")
        exported = export_onnx(module, example, directory / "model.onnx")
        if transfers_schedules(deployment, self.transfer):
            say("schedule transfer")
            tune_model(exported.path, self.target, deployment, 0, self.linker, say, transfer=True)
        say("compile")
        return exported, compile_onnx(exported.path, self.target, directory, self.linker, deployment.database,
                                      self.default_schedules)

    def set_reference(self, module, example, directory: Path) -> Path:
        import shutil

        if directory.exists():
            shutil.rmtree(directory)  # compiled again: the database may hold new records since
        directory.mkdir(parents=True)
        _, compiled = self._compile(module, example, directory, lambda message: self.say(f"reference model: {message}"))
        self.reference = compiled.lib_path
        return self.reference

    def time_model(self, module, example, label: str) -> ModelTiming:
        import numpy as np

        from ..bundle import SAMPLE_INPUT
        from ..report import count_by_source

        def say(message: str) -> None:
            self.say(f"{label}: {message}")

        with tempfile.TemporaryDirectory(prefix="compactdeploy-candidate-") as tmp:
            directory = Path(tmp)
            exported, compiled = self._compile(module, example, directory, say)
            np.save(directory / SAMPLE_INPUT, example.numpy())
            say("measure" + (" in turns with the unpruned model" if self.reference else ""))
            windows = self._measure(directory, label, say)
        from ..bench import quiet_time, quiet_times

        timed = [w.measurement for w in windows]
        ms, reference_ms = quiet_time(timed), None
        if timed[0].reference_chunk_ms:
            ms, reference_ms = quiet_times(timed)
        return ModelTiming(
            ms=ms, memory_bytes=exported.params_bytes + compiled.workspace_bytes,
            where=windows[-1].where, schedules=count_by_source(compiled.schedules),
            unscheduled=unscheduled_heavy_kernels(compiled.schedules),
            reference_ms=reference_ms, timings=len(windows),
        )

    def _measure(self, directory: Path, label: str, say) -> list:
        """The library in ``directory`` timed in turns with the reference, where there is one, and
        again where the device was busy through the window (``bench.time_quietly``); alone (the
        unpruned model, which scales the search), in windows until two agree (``bench.time_alone_quietly``).
        Each window's ``bench.Measured``."""
        from ..bench import QuietTimer, measure_bundle, time_alone_quietly

        windows = []

        def window():
            # in the search's own session (on this machine, the agent that timed the layers), without
            # the per-kernel profile, over the same minimum time as the final build's benchmark
            measured = measure_bundle(directory, self.deployment, self.measure_config.repeat,
                                      self.measure_config.warmup, say, self.open_session, profile=False,
                                      min_timed_ms=self.measure_config.min_time_s * 1e3, reference=self.reference)
            if measured.measurement is None:
                raise CompactDeployError(f"the device did not measure {label}: {measured.where}")
            windows.append(measured)
            return measured.measurement

        if self.reference is None:
            time_alone_quietly(window, say)
            return windows
        self.quiet_timer = self.quiet_timer or QuietTimer()
        self.quiet_timer.time(window, say)
        return windows
