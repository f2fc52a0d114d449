"""Export stage: PyTorch -> ONNX (opset >= 17) -> onnx-simplifier -> parity check with onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CompactDeployError, first_line
from .zoo import check_input

OPSET = 18  # the dynamo exporter's native opset; the issue asks for >= 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    simplified: bool
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    params_bytes: int  # the initializers' size: what the device must hold for the weights
    torch_vs_onnx_max_abs: float


def export_onnx(module, example_input, path: str | Path) -> ExportResult:
    """Export ``module`` for ``example_input``'s shape (batch included), simplify it, check parity."""
    import onnx
    import onnxsim
    import torch

    path = Path(path)
    module.eval()
    expected = check_input(module, example_input)
    raw_path = path.with_suffix(".raw.onnx")
    # The exporter narrates every step on stdout and logs warnings; keep the CLI's output readable.
    with contextlib.redirect_stdout(io.StringIO()), _quiet("torch.onnx", "onnxscript"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            torch.onnx.export(
                module,
                (example_input,),
                str(raw_path),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                external_data=False,
            )
        except Exception as exc:  # the exporter raises many types; its first line says which op failed
            raise CompactDeployError(f"ONNX export failed: {first_line(exc)}") from None
    model = onnx.load(str(raw_path))
    raw_path.unlink()
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:  # onnxsim can fail on unusual graphs; the unsimplified model still works
        simplified, ok = model, False
        logging.getLogger(__name__).warning("onnx-simplifier failed (%s); keeping the unsimplified model", exc)
    if ok:
        model = simplified
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    actual = run_onnxruntime(path, example_input.numpy())
    return ExportResult(
        path=path,
        opset=OPSET,
        simplified=bool(ok),
        inputs=tuple(_tensor_infos(model.graph.input, exclude={i.name for i in model.graph.initializer})),
        outputs=tuple(_tensor_infos(model.graph.output)),
        params_bytes=sum(_initializer_bytes(init) for init in model.graph.initializer),
        torch_vs_onnx_max_abs=check_parity("torch vs onnxruntime", expected, actual),
    )


# Outputs may differ by float32 rounding (other summation orders): at most this fraction of the
# output's scale, max(1, max |reference|), or the build fails.
PARITY_TOLERANCE = 1e-4


def check_parity(what: str, reference: np.ndarray, actual: np.ndarray) -> float:
    """max |actual - reference| (``what``: "A vs B", B the one checked); CompactDeployError when an
    output is not finite or the difference is over ``PARITY_TOLERANCE`` of the output's scale."""
    reference, actual = np.asarray(reference), np.asarray(actual)
    checked = what.split(" vs ")[-1]
    if not (np.isfinite(reference).all() and np.isfinite(actual).all()):
        raise CompactDeployError(
            f"parity {what}: the model's output is not finite (NaN or inf) for the example input; check the "
            "weights (--weights) and the data (--data)"
        )
    if reference.shape != actual.shape:
        raise CompactDeployError(f"parity {what}: {checked} gives shape {actual.shape}, expected {reference.shape}")
    max_abs = float(np.abs(actual - reference).max()) if reference.size else 0.0
    scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
    if max_abs > PARITY_TOLERANCE * scale:
        raise CompactDeployError(
            f"parity {what}: outputs differ by {max_abs:.2e}, over the tolerance ({PARITY_TOLERANCE:g} x {scale:.3g}): "
            f"{checked} computes something else; nothing was written (rerun with --debug and report it)"
        )
    return max_abs


def onnxruntime_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of the model at ``path``, with ``threads`` intra-op threads (None: its default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad model file
        raise CompactDeployError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None


def run_onnxruntime(path: str | Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """One inference with onnxruntime on the CPU."""
    session = onnxruntime_session(path, threads)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _tensor_infos(values, exclude=frozenset()) -> list[TensorInfo]:
    import onnx

    infos = []
    for value in values:
        if value.name in exclude:
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value for d in tensor_type.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        infos.append(TensorInfo(value.name, shape, dtype))
    return infos


def _initializer_bytes(init) -> int:
    import onnx

    count = int(np.prod(init.dims)) if len(init.dims) else 1
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize



@contextlib.contextmanager
def _quiet(*logger_names: str):
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
