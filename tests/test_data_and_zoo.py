"""Local datasets, the zoo, user models and the targets, including from an installed wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import run_cli

from compactdeploy.data import BUILTIN, fit_to_model, load_dataset
from compactdeploy.errors import CompactDeployError
from compactdeploy.zoo import create_model, load_model, read_checkpoint, zoo


@pytest.mark.parametrize(
    ("name", "kind", "classes", "sample_shape"),
    [("digits", "image", 10, (8, 8)), ("wine", "vector", 3, (13,)), ("breast-cancer", "vector", 2, (30,)), ("mnist1d", "vector", 10, (40,))],
)
def test_builtin_datasets_need_no_download(name, kind, classes, sample_shape):
    data = load_dataset(name)
    assert data.kind == kind and data.num_classes == classes
    assert data.x_train.shape[1:] == sample_shape and data.x_train.dtype == np.float32
    assert len(data.x_train) > len(data.x_test) > 0
    # fixed split: the same every time, so accuracy before and after pruning compare
    assert np.array_equal(load_dataset(name).y_test, data.y_test)


@pytest.mark.unit
def test_digits_are_resized_and_repeated_for_rgb_cnns():
    data = load_dataset("digits")
    x = fit_to_model(data, data.x_test[:3], (3, 32, 32))
    assert x.shape == (3, 3, 32, 32)
    assert np.array_equal(x[:, 0], x[:, 2])


@pytest.mark.unit
def test_users_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.normal(size=(50, 6)).astype(np.float32), y=rng.integers(0, 3, 50))
    data = load_dataset(str(path))
    assert data.kind == "vector" and data.num_classes <= 3 and data.x_train.shape[1] == 6
    model = load_model("mlp-tabular", data)
    assert model.input_shape == (1, 6)


@pytest.mark.unit
def test_npz_without_x_and_y_is_refused(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((10, 2)))
    with pytest.raises(CompactDeployError, match="x and y"):
        load_dataset(str(path))


@pytest.mark.unit
def test_vector_models_are_sized_to_the_data():
    model = load_model("lenet300", load_dataset("mnist1d"))
    assert model.input_shape == (1, 40)
    assert model.module(torch.zeros(2, 40)).shape == (2, 10)


def test_train_writes_a_checkpoint_that_loads_safely(lenet5_checkpoint):
    checkpoint = read_checkpoint(lenet5_checkpoint)
    assert checkpoint["model"] == "lenet5" and checkpoint["data"] == "digits"
    assert checkpoint["test_accuracy"] > 0.8


def test_users_own_model_file(tmp_path):
    source = tmp_path / "mynet.py"
    source.write_text(
        "from torch import nn\n"
        "INPUT_SHAPE = (12,)\n"
        "def make(hidden=32):\n"
        "    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 3))\n"
    )
    model = create_model(f"{source}:make", {"hidden": 16})
    assert model.input_shape == (1, 12)
    out = tmp_path / "build"
    assert run_cli(
        "build", "--model", f"{source}:make", "--model-arg", "hidden=16", "--target", "host",
        "--prune", "l1:0.5", "--repeat", "5", "--out", out,
    ) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["widths"]["0"] == {"before": 16, "after": 8}
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4
    with pytest.raises(CompactDeployError, match="no callable 'missing'"):
        create_model(f"{source}:missing")


def test_cli_lists_targets_and_models(capsys):
    assert run_cli("targets", "--json") == 0
    targets = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"host", "rpi4", "rpi5", "jetson-orin-nano", "jetson-agx-orin"} <= set(targets)
    assert targets["rpi4"]["cores"] == 4 and targets["rpi4"]["tvm_target"]["mcpu"] == "cortex-a72"
    assert targets["host"]["tvm_target"]["mcpu"] != "native"
    assert run_cli("models", "--json") == 0
    models = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert models == {"lenet300", "lenet5", "resnet20", "mobilenetv2", "mlp-tabular"} == set(zoo())


def test_installed_wheel_finds_its_models_and_targets(tmp_path):
    """A wheel carries models/ and targets/ inside the package; import it from outside the tree."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(repo)],
        check=True, capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("compactdeploy-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "compactdeploy/_bundled/targets/rpi4.toml" in names
    assert "compactdeploy/_bundled/models/resnet.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import compactdeploy, compactdeploy.targets as t, compactdeploy.zoo as z;"
        "assert compactdeploy.__file__.startswith(%r), compactdeploy.__file__;"
        "print(sorted(t.available_targets()), sorted(z.zoo()))" % str(site)
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rpi4" in done.stdout and "mobilenetv2" in done.stdout
    assert set(BUILTIN) == {"digits", "wine", "breast-cancer", "mnist1d"}
