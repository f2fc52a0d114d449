"""Default CPU schedules: every kernel without a tuning record gets one, with the unscheduled numbers."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import needs_emulator

from compactdeploy.compile import DEFAULT_RULE, compile_onnx, resolve_linker
from compactdeploy.compile.rules import register_tile
from compactdeploy.export import export_onnx
from compactdeploy.targets import VectorUnit, load_target
from compactdeploy.zoo import create_model, zoo

# every zoo model at a size that compiles in seconds (the rules do not depend on the size)
ZOO_ARGS = {"mobilenetv2": {"input_size": 32}}


def zoo_onnx(name: str, directory) -> tuple[str, np.ndarray]:
    model = create_model(name, ZOO_ARGS.get(name, {}))
    x = torch.randn(*model.input_shape, generator=torch.Generator().manual_seed(1))
    return export_onnx(model.module.eval(), x, directory / f"{name}.onnx").path, x.numpy()


def run_on_host(lib_path, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def compiled(onnx_path, target_name: str, directory, default_schedules: bool):
    target = load_target(target_name)
    directory.mkdir()
    return compile_onnx(onnx_path, target, directory, resolve_linker(target), None, default_schedules=default_schedules)


@pytest.mark.parametrize("name", sorted(zoo()))
def test_default_schedules_give_every_zoo_model_its_unscheduled_numbers(name, tmp_path):
    onnx_path, x = zoo_onnx(name, tmp_path)
    ruled = compiled(onnx_path, "host", tmp_path / "ruled", True)
    plain = compiled(onnx_path, "host", tmp_path / "plain", False)
    assert set(ruled.schedules.values()) == {DEFAULT_RULE} and set(plain.schedules.values()) == {"unscheduled"}
    assert ruled.schedules.keys() == plain.schedules.keys()
    expected = run_on_host(plain.lib_path, x)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(run_on_host(ruled.lib_path, x), expected, rtol=1e-4, atol=1e-5)


class Assorted(torch.nn.Module):
    """What the zoo lacks: a grouped convolution, max and average pooling, GELU, layer norm, softmax."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 24, 3, padding=1)
        self.grouped = torch.nn.Conv2d(24, 24, 3, padding=1, groups=3)
        self.project = torch.nn.Conv2d(24, 10, 1)
        self.norm = torch.nn.LayerNorm(10)
        self.head = torch.nn.Linear(10, 7)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.grouped(torch.relu(self.stem(x))))
        x = torch.nn.functional.avg_pool2d(torch.nn.functional.max_pool2d(x, 2), 2)
        return torch.softmax(self.head(self.norm(self.project(x).mean((2, 3)))), -1)


def test_grouped_convolutions_pooling_layer_norm_and_softmax_get_default_schedules(tmp_path):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    onnx_path = export_onnx(Assorted().eval(), x, tmp_path / "assorted.onnx").path
    ruled = compiled(onnx_path, "host", tmp_path / "ruled", True)
    plain = compiled(onnx_path, "host", tmp_path / "plain", False)
    kernels = " ".join(ruled.schedules)
    assert all(op in kernels for op in ("max_pool2d", "avg_pool2d", "layer_norm", "softmax", "erf"))
    assert set(ruled.schedules.values()) == {DEFAULT_RULE}
    np.testing.assert_allclose(run_on_host(ruled.lib_path, x.numpy()), run_on_host(plain.lib_path, x.numpy()),
                               rtol=1e-4, atol=1e-6)


def fused_multiply_adds(lib_path) -> tuple[int, int]:
    """(vector, scalar) fp32 FMAs in an aarch64 library's code."""
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib_path)], capture_output=True, text=True,
                          check=True).stdout
    vector = sum(1 for line in text.splitlines() if "\tfmla\t" in line and ".4s" in line)
    scalar = sum(1 for line in text.splitlines() if "\tfmadd\ts" in line)
    return vector, scalar


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-objdump"), reason="needs binutils for aarch64 (tools/setup.sh)")
def test_the_rpi4_library_computes_with_neon_vector_fmas(tmp_path):
    onnx_path, _ = zoo_onnx("resnet20", tmp_path)
    ruled = fused_multiply_adds(compiled(onnx_path, "rpi4", tmp_path / "ruled", True).lib_path)
    plain = fused_multiply_adds(compiled(onnx_path, "rpi4", tmp_path / "plain", False).lib_path)
    assert plain[1] > plain[0], "unscheduled loop nests multiply-add one value at a time"
    assert ruled[0] > 100 and ruled[1] == 0, f"vector/scalar FMAs {ruled}"


@needs_emulator
def test_default_schedules_run_every_zoo_model_correctly_on_the_emulated_pi(tmp_path, emulated_pi):
    from tvm import relax, runtime

    from compactdeploy.device import connect

    session = connect(emulated_pi.address)
    dev = session.remote.cpu()
    for name in sorted(zoo()):
        onnx_path, x = zoo_onnx(name, tmp_path)
        ruled = compiled(onnx_path, "rpi4", tmp_path / f"{name}-rpi4", True)
        expected = run_on_host(compiled(onnx_path, "host", tmp_path / f"{name}-host", False).lib_path, x)
        session.remote.upload(str(ruled.lib_path), f"{name}.so")
        vm = relax.VirtualMachine(session.remote.load_module(f"{name}.so"), dev)
        on_pi = vm["main"](runtime.tensor(x, dev)).numpy()
        np.testing.assert_allclose(on_pi, expected, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.unit
@pytest.mark.parametrize("unit", [VectorUnit(256, 16), VectorUnit(128, 32), VectorUnit(512, 32)])
@pytest.mark.parametrize("channels,pixels", [(16, 32), (24, 56), (960, 7), (6, 14), (10, 1), (3, 224), (1000, 1)])
def test_a_register_tile_fits_the_registers_and_divides_the_layer(unit, channels, pixels):
    for reuses_input in (True, False):
        tile = register_tile(channels, pixels, unit, reuses_input)
        assert channels % tile.channels == 0 and pixels % tile.pixels == 0 and tile.channels % tile.lanes == 0
        vectors = tile.channels // tile.lanes
        assert tile.pixels * vectors + vectors + 2 <= unit.registers or tile.pixels == 1
        if channels % unit.lanes == 0:
            assert tile.lanes == unit.lanes  # whole vectors wherever the channels allow


@pytest.mark.unit
@pytest.mark.parametrize("channels,lanes", [(24, 8), (40, 8), (48, 16), (72, 8), (12, 4), (10, 10)])
def test_channels_no_whole_vector_divides_are_tiled_by_half_or_quarter_vectors_on_avx512(channels, lanes):
    # one odd-length part-vector (24 lanes on a 16-lane unit) compiled to code 20x slower per multiply-add
    tile = register_tile(channels, 16, VectorUnit(512, 32), True)
    assert tile.lanes == lanes and channels % tile.channels == 0


def test_a_build_says_each_kernels_schedule_and_can_leave_the_rules_out(tmp_path, capsys, monkeypatch):
    from conftest import read_json, run_cli

    monkeypatch.setenv("COMPACTDEPLOY_CACHE", str(tmp_path / "cache"))  # no records of other tests' builds

    common = ("build", "--model", "lenet5", "--target", "host", "--repeat", "5")
    assert run_cli(*common, "--out", tmp_path / "ruled") == 0
    assert "kernels: 9 default rule" in capsys.readouterr().out.replace("\n", " ")
    assert run_cli(*common, "--no-default-schedules", "--out", tmp_path / "plain") == 0
    ruled, plain = (read_json(tmp_path / name / "report.json") for name in ("ruled", "plain"))
    assert set(ruled["compile"]["schedules"].values()) == {DEFAULT_RULE}
    assert set(plain["compile"]["schedules"].values()) == {"unscheduled"}
    assert plain["compile"]["schedules"].keys() == ruled["compile"]["schedules"].keys()
    assert max(r["parity"]["onnx_vs_tvm_max_abs"] for r in (ruled, plain)) <= 1e-4
