"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_nothing_written, error_of, run_cli

from compactdeploy.zoo import create_model


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def test_unknown_model_lists_the_zoo(capsys, out):
    message = error_of(capsys, "build", "--model", "resnet9000", "--target", "host", "--out", out)
    assert "lenet5" in message and "mobilenetv2" in message
    assert_nothing_written(out)


def test_unknown_target_lists_the_targets(capsys, out):
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "rpi9", "--out", out)
    assert "rpi4" in message and "jetson-orin-nano" in message
    assert_nothing_written(out)


def test_missing_weights_file(capsys, out, tmp_path):
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--weights", tmp_path / "no.pt", "--out", out)
    assert "does not exist" in message
    assert_nothing_written(out)


def test_weights_for_another_architecture(capsys, out, tmp_path):
    weights = tmp_path / "resnet20.pt"
    torch.save(create_model("resnet20").module.state_dict(), weights)
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--weights", weights, "--out", out)
    assert "do not fit model lenet5" in message
    assert_nothing_written(out)


def test_weights_file_that_is_not_a_state_dict(capsys, out, tmp_path):
    weights = tmp_path / "junk.pt"
    weights.write_bytes(b"definitely not a checkpoint")
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--weights", weights, "--out", out)
    assert "cannot load weights" in message and "weights_only" not in message
    assert_nothing_written(out)


def test_input_shape_the_model_rejects(capsys, out):
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--input-shape", "3,7,7", "--out", out)
    assert "rejects input shape (1, 3, 7, 7)" in message
    assert_nothing_written(out)


@pytest.mark.parametrize("spec", ["l1:0", "l1:1", "l1:1.5", "l1:-1"])
def test_prune_ratio_outside_zero_one(capsys, out, spec):
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--prune", spec, "--out", out)
    assert "between 0 and 1" in message
    assert_nothing_written(out)


def test_missing_cross_compiler_says_how_to_install_it(capsys, out, tmp_path):
    target = tmp_path / "board.toml"
    target.write_text(
        'arch = "aarch64"\ncores = 4\nmemory_mb = 1024\nchannel_multiple = 4\n'
        '[tvm]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a53"\n'
        '[compile]\ncross_compiler = "nonexistent-linux-gnu-gcc"\n'
    )
    message = error_of(capsys, "build", "--model", "lenet5", "--target", target, "--out", out)
    assert "nonexistent-linux-gnu-gcc not found" in message and "apt-get install" in message
    assert_nothing_written(out)


def test_unknown_model_argument_lists_the_valid_ones(capsys, out):
    message = error_of(capsys, "build", "--model", "mobilenetv2", "--model-arg", "depth=3", "--target", "host", "--out", out)
    assert "width_mult" in message and "input_size" in message


def test_out_that_is_not_a_build_is_never_replaced(capsys, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--out", precious)
    assert "not a compactdeploy build" in message
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_a_failed_rebuild_leaves_the_previous_build_whole(capsys, tmp_path):
    out = tmp_path / "build"
    assert run_cli("build", "--model", "lenet300", "--target", "host", "--repeat", "5", "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    error_of(capsys, "build", "--model", "lenet300", "--target", "host", "--input-shape", "5", "--out", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["build"]


def test_console_script_prints_one_line_and_exits_nonzero(tmp_path):
    """The installed entry point, as a user runs it: no traceback, exit status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "compactdeploy.cli", "build", "--model", "nope", "--target", "host", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: unknown model 'nope'")


def test_finetuning_without_data_is_refused(capsys, out):
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--prune", "l1:0.5", "--finetune-epochs", "2", "--out", out)
    assert "--data" in message
    assert_nothing_written(out)


def test_target_file_with_a_misspelt_key_is_refused(capsys, out, tmp_path):
    target = tmp_path / "board.toml"
    target.write_text('arch = "aarch64"\ncores = 4\nmemory_mb = 1024\nchanel_multiple = 4\n[tvm]\nkind = "llvm"\n')
    message = error_of(capsys, "build", "--model", "lenet5", "--target", target, "--out", out)
    assert "unknown key 'chanel_multiple'" in message


def test_target_file_with_a_channel_multiple_that_is_not_a_number_is_refused(capsys, out, tmp_path):
    target = tmp_path / "board.toml"
    target.write_text('arch = "aarch64"\ncores = 4\nmemory_mb = 1024\nchannel_multiple = "eight"\n[tvm]\nkind = "llvm"\n')
    message = error_of(capsys, "build", "--model", "lenet5", "--target", target, "--out", out)
    assert "channel_multiple must be a whole number >= 1, not 'eight'" in message
    assert_nothing_written(out)


@pytest.mark.parametrize("cpu", ["vector_bits = 96\nvector_registers = 32", "vector_bits = 128\nvector_registers = \"many\""])
def test_target_file_with_an_impossible_vector_unit_is_refused(capsys, out, tmp_path, cpu):
    target = tmp_path / "board.toml"
    target.write_text(f'arch = "aarch64"\ncores = 4\nmemory_mb = 1024\n[cpu]\n{cpu}\n[tvm]\nkind = "llvm"\n')
    message = error_of(capsys, "build", "--model", "lenet5", "--target", target, "--out", out)
    assert "[cpu] vector_bits must be 128, 256 or 512 and vector_registers 8-64" in message
    assert_nothing_written(out)


def test_target_file_that_is_not_toml_is_refused(capsys, out, tmp_path):
    target = tmp_path / "board.toml"
    target.write_text("this is [not toml")
    message = error_of(capsys, "build", "--model", "lenet5", "--target", target, "--out", out)
    assert "cannot read target file" in message


def test_compile_refuses_a_corrupt_onnx_file(tmp_path):
    from compactdeploy.compile import compile_onnx, resolve_linker
    from compactdeploy.errors import CompactDeployError
    from compactdeploy.targets import load_target

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    target = load_target("host")
    with pytest.raises(CompactDeployError, match="not a readable ONNX model|cannot import"):
        compile_onnx(bad, target, tmp_path, resolve_linker(target))


def test_compile_names_an_operator_tvm_does_not_support(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from compactdeploy.compile import compile_onnx, resolve_linker
    from compactdeploy.errors import CompactDeployError
    from compactdeploy.targets import load_target

    node = helper.make_node("FancyNewOp", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    target = load_target("host")
    with pytest.raises(CompactDeployError, match="FancyNewOp"):
        compile_onnx(path, target, tmp_path, resolve_linker(target))


def test_onnxruntime_refuses_a_corrupt_model_in_one_line(tmp_path):
    from compactdeploy.errors import CompactDeployError
    from compactdeploy.export import onnxruntime_session

    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    with pytest.raises(CompactDeployError, match="onnxruntime cannot load") as caught:
        onnxruntime_session(corrupt, threads=1)
    assert str(corrupt) in str(caught.value) and "\n" not in str(caught.value)


def test_compile_names_a_malformed_clip_in_one_line(tmp_path):
    """compactdeploy rewrites Clip before TVM imports it; a Clip with no input must still be refused
    as an unimportable model, not crash in the rewrite."""
    import onnx
    from onnx import TensorProto, helper

    from compactdeploy.compile import compile_onnx, resolve_linker
    from compactdeploy.errors import CompactDeployError
    from compactdeploy.targets import load_target

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Clip", [], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    target = load_target("host")
    with pytest.raises(CompactDeployError, match="cannot import") as caught:
        compile_onnx(path, target, tmp_path, resolve_linker(target))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "model.so").exists()


@pytest.mark.parametrize("count", ["0", "-2"])
def test_a_thread_count_under_one_is_refused_before_anything_runs(capsys, out, count):
    status = run_cli("build", "--model", "lenet5", "--target", "host", "--threads", count, "--out", out)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "--threads" in err[-1] and ">=1" in err[-1], err
    assert_nothing_written(out)


# --- user mistakes that once ended as "internal error", each now one line and exit 2 ----------

def _npz(path: Path, x, y) -> Path:
    import numpy as np

    np.savez(path, x=x, y=y)
    return path


def _bad_datasets(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import numpy as np

    labels = np.arange(20) % 2
    nan = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    nan[3, 1, 1] = np.nan
    return {
        "strings": (_npz(tmp_path / "s.npz", np.array(["a"] * 20), labels), "must hold real numbers"),
        "1-D": (_npz(tmp_path / "a.npz", np.zeros(20, np.float32), labels), "give (N, FEATURES)"),
        "5-D": (_npz(tmp_path / "b.npz", np.zeros((20, 1, 2, 2, 2), np.float32), labels), "give (N, FEATURES)"),
        "scalar": (_npz(tmp_path / "c.npz", np.float32(1), labels), "give (N, FEATURES)"),
        "huge label": (_npz(tmp_path / "d.npz", np.zeros((20, 4), np.float32), labels * 10**9), "class indices 0..K-1"),
        "NaN": (_npz(tmp_path / "e.npz", nan, labels), "NaN or infinite values in 1 samples"),
    }


@pytest.mark.parametrize("case", ["strings", "1-D", "5-D", "scalar", "huge label", "NaN"])
def test_a_dataset_file_the_model_cannot_use_is_refused(capsys, out, tmp_path, case):
    path, expected = _bad_datasets(tmp_path)[case]
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--data", path, "--out", out)
    assert expected in message and str(path.name) in message
    assert_nothing_written(out)


def _weights(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "no-state-dict":
        from compactdeploy.zoo import CHECKPOINT_FORMAT

        torch.save({"format": CHECKPOINT_FORMAT, "model": "lenet5"}, path)
    else:
        good = tmp_path / "good.pt"
        torch.save(create_model("lenet5").module.state_dict(), good)
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 3] if kind == "truncated" else bytes(range(256)) * 40)
    return path


@pytest.mark.parametrize("kind,expected", [
    ("no-state-dict", "without its state_dict"),
    ("truncated", "truncated or damaged"),
    ("garbage", "not a PyTorch weights file"),
])
def test_weights_that_are_garbage_truncated_or_incomplete_say_so(capsys, out, tmp_path, kind, expected):
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--weights", _weights(tmp_path, kind), "--out", out)
    assert expected in message and "Errno" not in message
    assert_nothing_written(out)


@pytest.mark.parametrize("args,expected", [
    (["--input-shape", "3,100000,100000"], "more than the"),
    (["--model-arg", "input_size=100000"], "more than the"),
    (["--model-arg", "num_classes=0"], "output is empty"),
    (["--warmup", "-1"], "--warmup"),
    (["--calibration-samples", "0", "--prune", "apoz:0.5", "--data", "digits"], "--calibration-samples"),
    (["--finetune-epochs", "-1"], "--finetune-epochs"),
    (["--device-wait", "-1"], "--device-wait"),
])
def test_impossible_option_values_are_refused_before_any_work(capsys, out, args, expected):
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", *args, "--out", out)
    assert expected in message
    assert_nothing_written(out)


def test_out_under_a_file_or_where_nothing_can_be_written(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--out", afile / "o")
    assert "is a file, not a directory" in message and afile.read_text() == "mine"
    message = error_of(capsys, "train", "--model", "lenet5", "--data", "digits", "--out", afile / "x.pt")
    assert "is a file, not a directory" in message
    if Path("/proc/self").is_dir():  # a directory nothing can be created in, even by root
        message = error_of(capsys, "build", "--model", "lenet5", "--target", "host", "--out", "/proc/compactdeploy-o")
        assert "cannot write in /proc" in message


@pytest.mark.parametrize("args,expected", [(["--lr", "-1"], "--lr"), (["--batch-size", "0"], "--batch-size")])
def test_training_options_out_of_range_are_refused(capsys, tmp_path, args, expected):
    message = error_of(capsys, "train", "--model", "lenet5", "--data", "digits", *args, "--out", tmp_path / "t.pt")
    assert expected in message and not (tmp_path / "t.pt").exists()


def test_run_refuses_an_npz_input_a_negative_bench_and_an_output_under_a_file(capsys, host_build, tmp_path):
    import numpy as np

    from compactdeploy.runtime.run import main as run_py

    x = np.load(host_build / "sample_input.npy")
    np.savez(tmp_path / "x.npz", x=x)
    assert "is an .npz archive" in error_of(capsys, "run", host_build, "--input", tmp_path / "x.npz")
    assert "--bench" in error_of(capsys, "run", host_build, "--bench", "-5")
    assert run_py([str(host_build), "--bench", "-5"]) == 2  # the bundle's own run.py, too
    assert "at least 1" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "afile").write_text("mine")
    message = error_of(capsys, "run", host_build, "--input", tmp_path / "x.npy", "--output", tmp_path / "afile" / "y.npy")
    assert "cannot write --output" in message and (tmp_path / "afile").read_text() == "mine"
