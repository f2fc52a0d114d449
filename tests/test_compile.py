"""The compile stage's CPU pipeline: convolutions in NHWC, activations carried through, same numbers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compactdeploy.compile import compile_onnx, resolve_linker
from compactdeploy.export import export_onnx, run_onnxruntime
from compactdeploy.targets import load_target


class InvertedResidual(torch.nn.Module):
    """MobileNetV2's block in small: ReLU6 (an ONNX Clip) between convolutions, a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU6())
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(16, 32, 1), torch.nn.ReLU6(),
            torch.nn.Conv2d(32, 32, 3, 1, 1, groups=32), torch.nn.ReLU6(),
            torch.nn.Conv2d(32, 16, 1),
        )
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


def run_tvm(lib_path, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.fixture(scope="module")
def host():
    target = load_target("host")
    return target, resolve_linker(target)


def test_convolutions_run_in_nhwc_with_relu6_between_them_and_match_onnxruntime(host, tmp_path):
    target, linker = host
    torch.manual_seed(0)
    model = InvertedResidual().eval()
    x = torch.randn(1, 3, 16, 16)
    exported = export_onnx(model, x, tmp_path / "block.onnx")
    assert any(node.op_type == "Clip" for node in onnx.load(str(exported.path)).graph.node)
    built = compile_onnx(exported.path, target, tmp_path, linker)
    kernels = json.loads(built.kernels_path.read_text())
    convolutions = [k for k in kernels if "conv2d" in k["name"]]
    assert len(convolutions) == 4
    for k in convolutions:  # data (N, H, W, C) and weights (O, KH, KW, I): channels last
        data, weight = k["args"][0]["shape"], k["args"][1]["shape"]
        assert data[3] in (3, 16, 32) and data[1] == data[2], k
        assert weight[1] == weight[2] in (1, 3), k
    # only the model's input and output change layout: no transposes around each ReLU6
    transposes = [k["name"] for k in kernels if "transpose" in k["name"]]
    assert len(transposes) <= 2, transposes
    expected = run_onnxruntime(exported.path, x.numpy())
    np.testing.assert_allclose(run_tvm(built.lib_path, x.numpy()), expected, rtol=1e-4, atol=1e-5)


def clip_model(opset: int, low: float | None, high: float | None) -> onnx.ModelProto:
    """Conv then Clip, the bounds as attributes (opset < 11) or as optional inputs (opset >= 11)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")
    initializers, inputs, attributes = [weight], ["conv"], {}
    for name, bound in (("min", low), ("max", high)):
        if opset < 11:
            if bound is not None:
                attributes[name] = bound
        elif bound is None:
            inputs.append("")
        else:
            initializers.append(numpy_helper.from_array(np.array(bound, dtype=np.float32), name))
            inputs.append(name)
    while inputs[-1] == "":
        inputs.pop()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Clip", inputs, ["y"], **attributes)],
        "clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    "opset,low,high",
    [(10, 0.0, 6.0), (13, 0.0, 6.0), (13, None, 1.5), (13, -0.5, None), (10, -1.0, None)],
)
def test_clip_in_each_onnx_form_gives_onnxruntime_numbers(host, tmp_path, opset, low, high):
    target, linker = host
    path = tmp_path / "clip.onnx"
    onnx.save(clip_model(opset, low, high), str(path))
    x = np.random.default_rng(1).standard_normal((1, 2, 6, 6)).astype(np.float32) * 4
    expected = run_onnxruntime(path, x)
    assert (expected == (high if high is not None else low)).any()  # the bound really clips something
    built = compile_onnx(path, target, tmp_path, linker)
    np.testing.assert_allclose(run_tvm(built.lib_path, x), expected, rtol=1e-5, atol=1e-5)


def test_a_model_the_layout_pass_cannot_convert_keeps_its_layout_and_its_numbers(host, tmp_path):
    """A three-input Max imports as a 5-D stack, which TVM's layout pass rejects: NCHW, with a warning."""
    target, linker = host
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), f"w{i}") for i in range(3)]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]) for i in range(3)]
        + [helper.make_node("Max", ["c0", "c1", "c2"], ["y"])],
        "max3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "max3.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    with pytest.warns(UserWarning, match="convolutions stay NCHW"):
        built = compile_onnx(path, target, tmp_path, linker)
    np.testing.assert_allclose(run_tvm(built.lib_path, x), run_onnxruntime(path, x), rtol=1e-5, atol=1e-5)


def test_the_layout_pass_runs_only_where_there_is_a_convolution(tmp_path):
    # a Transformer build warned "convolutions stay NCHW ... std::bad_alloc" though it had no convolution
    import warnings

    from compactdeploy.compile import import_onnx
    from compactdeploy.compile.passes import to_channels_last

    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1).eval()
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    for name, module, x, converted in [("encoder", encoder, torch.randn(1, 5, 16), False),
                                       ("conv", conv, torch.randn(1, 3, 8, 8), True)]:
        export_onnx(module, x, tmp_path / f"{name}.onnx")
        mod = import_onnx(tmp_path / f"{name}.onnx", load_target("host"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = to_channels_last(mod)
        assert not [w for w in caught if "NCHW" in str(w.message)]
        assert (out is not mod) == converted
        if name == "encoder":  # its Gathers: "fast" take warned once per call at legalization
            script = mod.script()
            assert "R.take(" in script and 'mode="fast"' not in script
