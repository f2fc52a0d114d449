"""What a build is asked to do, in small typed parts whose field names are the command's options
(``--finetune-epochs`` is ``PruneConfig.finetune_epochs``), so the CLI fills them by name."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import CompactDeployError


@dataclass(frozen=True)
class ModelConfig:
    model: str  # a zoo name or path/to/file.py:factory
    weights: Path | None = None
    data: str | None = None  # a dataset name or a .npz (x, y)
    model_args: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # one sample, without the batch dimension
    seed: int = 0  # training's, and the random example input's when there is no data


@dataclass(frozen=True)
class PruneConfig:
    prune: str | None = None  # "METHOD[:RATIO]"
    widths: dict[str, int] = field(default_factory=dict)  # layer -> width, overriding the ratio
    plan: Path | None = None  # a width plan (prune.plan) to replay: method, widths and channels
    allow_grow: bool = False  # widths above a layer's own widen it (function-preserving); the search may grow
    exclude: tuple[str, ...] = ()
    finetune_epochs: int = 0  # training epochs after pruning (needs data)
    distill: bool = False  # fine-tune with knowledge distillation from the unpruned model
    noise_outputs: int = 0  # NoiseOut: K noise outputs trained before pruning (needs noiseout)
    noise_epochs: int = 3
    calibration_samples: int = 256  # training samples the data-driven methods look at


@dataclass(frozen=True)
class MeasureConfig:
    device: str | None = None  # rpc://[TOKEN@]HOST:PORT[/KEY]; None: this machine when the target is it
    device_wait: float = 60.0  # seconds to wait for a busy tracker key
    repeat: int = 100
    warmup: int = 10
    min_time_s: float = 1.0  # runs are timed for this long at least (bench.session.MIN_TIMED_MS)
    threads: int | None = None  # TVM and onnxruntime threads on this machine


@dataclass(frozen=True)
class TuneConfig:
    tune_trials: int = 0  # MetaSchedule measurements to spend (records in the database count)
    default_schedules: bool = True  # kernels without a record get compile.rules' schedules (else none)
    # kernels without a record take schedules tuned at other widths, timed on the device (tune.transfer)
    transfer: bool = True


@dataclass(frozen=True)
class FitConfig:
    latency_budget: str | None = None  # "8ms", "60%": search the widths that meet it on the device
    memory_budget: str | None = None  # "40MB": weights + planned workspace
    resume: bool = False  # the search reuses the models it built and measured before
    fit_rounds: int = 12  # models the search builds and measures besides the unpruned and smallest ones, at most
    fit_points: int = 8  # candidate widths per group
    # with data: models are judged by held-out accuracy after this many epochs of fine-tuning (at
    # most --finetune-epochs; fit.judge); 0 judges by channel importance
    fit_trial_epochs: int = 4

    @property
    def searching(self) -> bool:
        return bool(self.latency_budget or self.memory_budget)


@dataclass(frozen=True)
class BuildConfig:
    model: ModelConfig
    target: str  # a target name or path/to/target.toml
    out: Path
    prune: PruneConfig = field(default_factory=PruneConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    fit: FitConfig = field(default_factory=FitConfig)


def from_options(config_type: type, options: dict[str, Any], **overrides: Any):
    """A config of ``config_type`` from the command's options of the same names."""
    values = {f.name: options[f.name] for f in fields(config_type) if f.name in options}
    return config_type(**{**values, **overrides})


def check_finetune_options(prune: PruneConfig, data: str | None, pruning: bool = True) -> None:
    """Fine-tuning needs data and something pruned; distillation happens while fine-tuning."""
    if prune.finetune_epochs and data is None:
        raise CompactDeployError("--finetune-epochs needs --data (the data to fine-tune on)")
    if prune.finetune_epochs and not pruning:
        raise CompactDeployError("--finetune-epochs needs --prune (it fine-tunes the pruned model)")
    if prune.distill and not prune.finetune_epochs:
        raise CompactDeployError("--distill needs --finetune-epochs (distillation happens while fine-tuning)")
