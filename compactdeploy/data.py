"""Datasets that need no download: scikit-learn's bundled tables and digits, MNIST-1D generated
locally from its templates, and a user's ``.npz`` (arrays ``x`` and ``y``).

Every dataset is split 80/20 with a fixed seed, so accuracy before and after pruning is comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CompactDeployError

SPLIT_SEED = 0
MAX_CLASSES = 100_000  # the output layer gets y.max() + 1 units: a stray huge label would exhaust memory


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32; images are (N, H, W) or (N, C, H, W), vectors (N, F)
    y_train: np.ndarray  # int64 class indices
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    kind: str  # "image" or "vector"
    preprocessing: dict[str, Any] = field(default_factory=dict)


def _split(name: str, x: np.ndarray, y: np.ndarray, kind: str, prep: dict[str, Any]) -> Dataset:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    cut = int(round(0.8 * len(x)))
    train, test = order[:cut], order[cut:]
    x, y = x.astype(np.float32), y.astype(np.int64)
    if kind == "vector":
        # standardise with the training split's statistics; the device must apply the same
        mean, std = x[train].mean(0), x[train].std(0) + 1e-8
        x = (x - mean) / std
        prep = {**prep, "standardise": {"mean": mean.tolist(), "std": std.tolist()}}
    return Dataset(name, x[train], y[train], x[test], y[test], int(y.max()) + 1, kind, prep)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images / 16.0  # pixel values are 0..16
    return _split("digits", images, bunch.target, "image", {"scale": "pixel / 16 (0..16 -> 0..1)"})


def _table(loader_name: str, name: str) -> Callable[[], Dataset]:
    def load() -> Dataset:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader_name)()
        return _split(name, bunch.data, bunch.target, "vector", {})

    return load


def _mnist1d() -> Dataset:
    # regenerated from the package's templates with its fixed seed (42): no download
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = np.concatenate([data["x"], data["x_test"]])
    y = np.concatenate([data["y"], data["y_test"]])
    return _split("mnist1d", x, y, "vector", {})


BUILTIN: dict[str, Callable[[], Dataset]] = {
    "digits": _digits,
    "wine": _table("load_wine", "wine"),
    "breast-cancer": _table("load_breast_cancer", "breast-cancer"),
    "mnist1d": _mnist1d,
}


def load_dataset(name_or_path: str) -> Dataset:
    """A built-in dataset by name, or a ``.npz`` file holding ``x`` and ``y``."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]()
    if name_or_path.endswith(".npz"):
        return _npz(Path(name_or_path))
    raise CompactDeployError(
        f"unknown dataset {name_or_path!r}: choose one of {', '.join(BUILTIN)} or pass a .npz file with x and y"
    )


def _npz(path: Path) -> Dataset:
    if not path.is_file():
        raise CompactDeployError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise CompactDeployError(f"{path} must hold arrays named x and y (it has {', '.join(archive.files)})")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError) as exc:
        raise CompactDeployError(f"cannot read {path}: {exc}") from None
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
        raise CompactDeployError(f"{path}: x must hold real numbers (it holds {x.dtype})")
    if x.ndim not in (2, 3, 4):
        raise CompactDeployError(
            f"{path}: x has shape {x.shape}; give (N, FEATURES) vectors, (N, H, W) or (N, C, H, W) images"
        )
    if y.ndim != 1:
        raise CompactDeployError(f"{path}: y has shape {y.shape}; give one class index per sample, shape (N,)")
    if len(x) != len(y) or len(x) < 5:
        raise CompactDeployError(f"{path}: x and y need the same length, at least 5 samples")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise CompactDeployError(f"{path}: x holds NaN or infinite values in {bad} samples; clean or drop them")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= MAX_CLASSES:
        raise CompactDeployError(f"{path}: y must hold class indices 0..K-1, with K at most {MAX_CLASSES}")
    kind = "vector" if x.ndim == 2 else "image"
    return _split(path.stem, x, y, kind, {})


def fit_to_model(data: Dataset, x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """Reshape a split of ``data`` to the model's input (one sample's shape, no batch dimension).

    Images are resized (bilinear) and their single channel repeated as the model needs; a vector
    model given images gets them resized to a square and flattened.
    """
    import torch
    import torch.nn.functional as F

    if data.kind == "vector":
        if x.shape[1:] != tuple(input_shape):
            raise CompactDeployError(
                f"dataset {data.name} has {x.shape[1:]} features per sample; the model takes {tuple(input_shape)}"
            )
        return x
    images = torch.from_numpy(x)
    if images.ndim == 3:
        images = images[:, None]
    if len(input_shape) == 1:  # an MLP on images: resize to side x side, then flatten
        side = int(round(input_shape[0] ** 0.5))
        if side * side != input_shape[0] or images.shape[1] != 1:
            raise CompactDeployError(
                f"dataset {data.name} holds images; model input {tuple(input_shape)} is not a flattened square image"
            )
        target_c, target_hw = 1, (side, side)
    elif len(input_shape) == 3:
        target_c, target_hw = input_shape[0], tuple(input_shape[1:])
    else:
        raise CompactDeployError(f"dataset {data.name} holds images; the model takes {tuple(input_shape)}")
    if images.shape[1] != target_c:
        if images.shape[1] != 1:
            raise CompactDeployError(
                f"dataset {data.name} has {images.shape[1]} channels; the model takes {target_c}"
            )
        images = images.repeat(1, target_c, 1, 1)
    if tuple(images.shape[2:]) != target_hw:
        images = F.interpolate(images, size=target_hw, mode="bilinear", align_corners=False)
    out = images.numpy().astype(np.float32)
    return out.reshape(len(out), -1) if len(input_shape) == 1 else out


def preprocessing_for(data: Dataset, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """What a device must do to raw samples before the model sees them (goes into the manifest)."""
    prep = {"dataset": data.name, **data.preprocessing}
    if data.kind == "image":
        prep["resize"] = f"bilinear to {list(input_shape[-2:]) if len(input_shape) == 3 else input_shape}"
        if len(input_shape) == 3 and input_shape[0] > 1:
            prep["channels"] = f"grey channel repeated {input_shape[0]}x"
    return prep
