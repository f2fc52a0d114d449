"""Load stage: models by name from the zoo (``models/*.py``) or from a user's own file, plus weights.

A zoo file registers factories with ``@register_model``; ``create_model(name, **args)`` is the one
way to build one. A user's model is ``path/to/file.py:factory``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CompactDeployError, first_line
from .resources import data_dir
from .runtime import sha256 as file_sha256

CHECKPOINT_FORMAT = "compactdeploy-checkpoint/1"
INIT_SEED = 0  # zoo models start from the same random weights on every run


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: how to build the model and what input it takes."""

    name: str
    factory: Callable[..., Any]
    # One sample's shape, without the batch dimension, as a function of the factory's arguments.
    shape_fn: Callable[..., tuple[int, ...]]
    description: str = ""
    default_data: str | None = None
    # The factory argument that sizes the input from the data ("in_features" for MLPs), if any.
    input_arg: str | None = None

    def arguments(self) -> dict[str, Any]:
        """The factory's keyword arguments with their defaults."""
        params = inspect.signature(self.factory).parameters
        return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}

    def input_shape(self, args: dict[str, Any] | None = None) -> tuple[int, ...]:
        return tuple(self.shape_fn(**{**self.arguments(), **(args or {})}))


@dataclass
class LoadedModel:
    """A model ready for the pipeline: the module, its input shape and where it came from."""

    name: str
    module: Any  # torch.nn.Module
    input_shape: tuple[int, ...]  # with the batch dimension
    args: dict[str, Any]
    weights: dict[str, Any]  # {"source": "random-init"} or {"source": path, "sha256": ...}


_REGISTRY: dict[str, ModelSpec] = {}
_ZOO_LOADED = False


def register_model(
    name: str,
    *,
    input_shape: tuple[int, ...] | Callable[..., tuple[int, ...]],
    description: str = "",
    default_data: str | None = None,
    input_arg: str | None = None,
):
    """Decorator for a zoo factory. ``input_shape`` may be a function of the factory's arguments."""

    def wrap(factory):
        _REGISTRY[name] = ModelSpec(
            name=name,
            factory=factory,
            shape_fn=input_shape if callable(input_shape) else (lambda **_: input_shape),
            description=description,
            default_data=default_data,
            input_arg=input_arg,
        )
        return factory

    return wrap


def _load_zoo() -> None:
    global _ZOO_LOADED
    if _ZOO_LOADED:
        return
    for path in sorted(data_dir("models").glob("*.py")):
        if not path.name.startswith("_"):
            _import_file(path, f"compactdeploy_zoo_{path.stem}")
    _ZOO_LOADED = True


def _import_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CompactDeployError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's file can raise anything; report it in one line
        del sys.modules[module_name]
        raise CompactDeployError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def zoo() -> dict[str, ModelSpec]:
    _load_zoo()
    return dict(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    models = zoo()
    if name not in models:
        raise CompactDeployError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(models))} "
            "or pass your own as path/to/file.py:factory"
        )
    return models[name]


def parse_model_args(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["width_mult=0.5", "input_size=96"]`` -> typed values (JSON literals, else strings); no eval."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CompactDeployError(f"model argument {pair!r} is not KEY=VALUE")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def create_model(name: str, args: dict[str, Any] | None = None) -> LoadedModel:
    """A zoo model (``lenet5``) or a user's (``file.py:factory``) with random initial weights."""
    args = dict(args or {})
    if ".py:" in name:
        return _create_user_model(name, args)
    spec = get_spec(name)
    valid = spec.arguments()
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise CompactDeployError(
            f"model {name} has no argument {', '.join(unknown)}: it takes {', '.join(valid) or 'none'}"
        )
    import torch

    shape = (1, *spec.input_shape(args))
    check_input_size(shape[1:], f"model {name} with {args}")
    try:
        with torch.random.fork_rng():  # the same initial weights every time, global RNG untouched
            torch.manual_seed(INIT_SEED)
            module = spec.factory(**args)
        _calibrate_batchnorm(module, shape)
    except (TypeError, ValueError, RuntimeError) as exc:  # torch rejects impossible layer sizes with these
        raise CompactDeployError(f"cannot build model {name} with {args}: {first_line(exc, 200)}") from None
    return LoadedModel(name, module.eval(), shape, args, {"source": "random-init"})


# One sample's elements, at most: 256 MiB of float32, far past any board's model input.
MAX_INPUT_ELEMENTS = 1 << 26


def check_input_size(shape: tuple[int, ...], what: str) -> None:
    """Refuse an input shape that could not even be allocated, before anything allocates it."""
    elements = 1
    for dim in shape:
        elements *= int(dim)
    if elements > MAX_INPUT_ELEMENTS:
        raise CompactDeployError(
            f"{what}: an input of shape {tuple(shape)} has {elements:,} elements, more than the {MAX_INPUT_ELEMENTS:,} "
            "compactdeploy takes; check --input-shape or the model's input_size"
        )


def _calibrate_batchnorm(module, input_shape: tuple[int, ...], batch: int = 8) -> None:
    """Give a random-init model's BatchNorm layers the statistics of one batch of random inputs.

    In eval mode BatchNorm uses its running statistics, which start at mean 0 / variance 1; in a
    deep net such as MobileNetV2 the activations then shrink to nothing and every input gives the
    same output, which makes parity checks vacuous. Loading weights replaces these buffers.
    """
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches seen
    generator = torch.Generator().manual_seed(0)
    module.train()
    with torch.no_grad():
        module(torch.randn(batch, *input_shape[1:], generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    module.eval()


def _create_user_model(ref: str, args: dict[str, Any]) -> LoadedModel:
    import torch

    file, _, factory_name = ref.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise CompactDeployError(f"model file {file} does not exist")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module = _import_file(path, f"compactdeploy_user_{digest}")
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise CompactDeployError(f"{file} has no callable {factory_name!r}")
    shape_arg = args.pop("input_shape", None)
    try:
        model = factory(**args)
    except TypeError as exc:
        raise CompactDeployError(f"cannot call {ref} with {args}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise CompactDeployError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module")
    shape = shape_arg or getattr(module, "INPUT_SHAPE", None) or getattr(model, "input_shape", None)
    if shape is None:
        raise CompactDeployError(
            f"{ref}: the input shape is unknown; pass --input-shape C,H,W (or define INPUT_SHAPE in {file})"
        )
    check_input_size(tuple(shape), ref)
    return LoadedModel(ref, model.eval(), (1, *tuple(shape)), args, {"source": "random-init"})


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``compactdeploy train``, or a bare state_dict, loaded safely."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CompactDeployError(f"weights file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or unsafe file
        raise CompactDeployError(
            f"cannot load weights {path}: {_unreadable_weights(path, exc)}; compactdeploy loads plain state_dicts "
            "(torch.save(model.state_dict(), path)) and 'compactdeploy train' checkpoints"
        ) from None
    if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT:
        if not isinstance(data.get("state_dict"), dict):
            raise CompactDeployError(f"weights file {path} is a compactdeploy checkpoint without its state_dict: write it again")
        return data
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"state_dict": data}
    raise CompactDeployError(f"weights file {path} holds no state_dict")


def _unreadable_weights(path: Path, exc: Exception) -> str:
    """Why torch could not read ``path``, in words: garbage, a damaged file, or unsafe contents."""
    import zipfile

    with open(path, "rb") as handle:
        head = handle.read(4)
    if zipfile.is_zipfile(path):  # torch.save's format: a zip archive
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            return "it holds objects other than tensors"
        return "the file is damaged (torch cannot read its archive)"
    if head.startswith(b"PK"):
        return "the file is truncated or damaged (an incomplete zip archive)"
    if head[:1] == b"\x80":  # a legacy (pre-1.6) pickle
        return "it is an old-format or damaged pickle that cannot be loaded safely"
    return "it is not a PyTorch weights file (neither torch.save's zip archive nor a pickle)"


def load_weights(model: LoadedModel, path: str | Path, checkpoint: dict[str, Any] | None = None) -> None:
    """Load a state_dict into ``model`` in place; a file for another architecture is refused."""
    checkpoint = checkpoint or read_checkpoint(path)
    state = checkpoint["state_dict"]
    own = model.module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            k = mismatched[0]
            details.append(f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CompactDeployError(
            f"weights {path} do not fit model {model.name}: {'; '.join(details)}"
            " - were they trained for another model or other --model-arg values?"
        )
    model.module.load_state_dict(state)
    model.weights = {"source": str(path), "sha256": file_sha256(path)}
    for key in ("data", "test_accuracy", "epochs"):
        if key in checkpoint:
            model.weights[key] = checkpoint[key]
    if checkpoint.get("prune_summary"):  # narrowed by 'compactdeploy prune' or learnt by 'train --learn-arch'
        model.weights["narrowed_by"] = json.loads(checkpoint["prune_summary"])


def load_model(
    ref: str,
    data=None,
    weights: str | Path | None = None,
    model_args: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """The load stage: a model sized to ``data`` (a ``Dataset``), with ``weights`` if given.

    Arguments come from the checkpoint first (it knows what it was trained with), then from the
    data (class count; feature count for vector models), then from ``model_args``.
    """
    checkpoint = read_checkpoint(weights) if weights is not None else None
    args = dict(checkpoint.get("model_args", {})) if checkpoint else {}
    if ".py:" not in ref:
        spec = get_spec(ref)
        if data is not None and not checkpoint:
            if "num_classes" in spec.arguments():
                args["num_classes"] = data.num_classes
            if spec.input_arg and data.kind == "vector":
                args[spec.input_arg] = int(data.x_train.shape[1])
    elif input_shape is not None:
        args["input_shape"] = input_shape
    args.update(model_args or {})
    model = create_model(ref, args)
    if input_shape is not None:
        model.input_shape = (1, *input_shape)
    if checkpoint is not None:
        if checkpoint.get("linearized"):
            from .learn import linearize  # layers that 'train --learn-arch gates' made linear

            linearize(model.module, checkpoint["linearized"])
        if checkpoint.get("prune_plan") or checkpoint.get("grow_plan"):
            # a 'compactdeploy prune' (or learn-arch) checkpoint: narrow the fresh model the same way
            import torch

            from .prune import replay

            replay(model.module, torch.zeros(model.input_shape), checkpoint.get("prune_plan") or {}, checkpoint.get("grow_plan"))
        if checkpoint.get("merged"):
            from .learn import merge_linear  # linear layers folded into the next: reshape, then load

            merge_linear(model.module, [tuple(pair) for pair in checkpoint["merged"]], compute=False)
        load_weights(model, weights, checkpoint)
    return model


def check_input(module, example_input):
    """Run the model once; an input shape it rejects is a user error, not a crash later in export."""
    import torch

    try:
        with torch.no_grad():
            out = module(example_input)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise CompactDeployError(
            f"the model rejects input shape {tuple(example_input.shape)}: {first_line(exc, 200)} "
            "- pass the shape it takes with --input-shape"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise CompactDeployError(f"the model returns {type(out).__name__}; compactdeploy needs a single tensor output")
    if out.numel() == 0:
        raise CompactDeployError(f"the model's output is empty (shape {tuple(out.shape)}): check its --model-arg values")
    return out.numpy()  # an ndarray: the reference output for parity checks


def listing() -> list[dict[str, Any]]:
    """Every zoo model, as ``compactdeploy models`` lists it."""
    return [
        {"name": spec.name, "input_shape": list(spec.input_shape()), "default_data": spec.default_data,
         "args": spec.arguments(), "description": spec.description}
        for spec in zoo().values()
    ]
