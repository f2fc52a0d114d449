"""The CUDA path on a machine with an NVIDIA GPU, run as a user would run it.

For each zoo model (random weights, seeded: latency does not depend on the values), unpruned and,
for the convolutional ones, ``--prune l1:0.5``:

- ``compactdeploy build --target cuda`` (DLight schedules, the build's own timing and parity);
- the bundle loaded with the runtime a device uses (hashes verified), its output checked against
  onnxruntime on the CPU for the bundle's sample input and 8 random inputs, and timed again;
- the same torch module (pruned the same way) on the GPU, eager and replayed from a CUDA graph:
  PyTorch's own cuDNN/cuBLAS kernels, the baseline a GPU user knows.

Then ``--target jetson-orin-nano`` is built here, where nvcc and a driver exist, and the library is
checked to hold sm_87 machine code (the Jetson path; it cannot run on another GPU).

Every figure is labelled with the GPU it ran on. Writes OUT/cuda.{json,md} after each model, so an
interrupted run keeps what it finished (default OUT: docs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

CONV_MODELS = {"lenet5", "resnet20", "mobilenetv2"}


def gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU"
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "no NVIDIA GPU"


def nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "no nvcc"
    lines = [line for line in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
             if "release" in line]
    return lines[0].strip() if lines else "unknown"


def cli_build(model: str, target: str, prune: str | None, out: Path, repeat: int) -> tuple[int, float, str]:
    command = [sys.executable, "-m", "compactdeploy.cli", "build", "--model", model, "--target", target,
               "--repeat", str(repeat), "--out", str(out)] + (["--prune", prune] if prune else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
    return done.returncode, time.perf_counter() - start, tail


def torch_module(model: str, prune: str | None, channel_multiple: int):
    """The module the build prunes: same zoo model, seed and method (weights as the build's)."""
    from compactdeploy.config import ModelConfig
    from compactdeploy.prepare import load
    from compactdeploy.prune import parse_prune_spec
    from compactdeploy.prune import prune as prune_model

    loaded = load(ModelConfig(model))
    module = loaded.model.module.eval()
    if prune:
        prune_model(module, loaded.example, parse_prune_spec(prune), channel_multiple, (), None, None, seed=0)
    return module.eval()


def time_torch(module, x: np.ndarray, runs: int) -> dict:
    """Median ms of eager runs and of CUDA-graph replays, each timed with CUDA events."""
    import torch

    device = torch.device("cuda")
    module = module.to(device)
    static = torch.from_numpy(x).to(device)
    result = {}
    with torch.inference_mode():
        for _ in range(50):
            module(static)
        torch.cuda.synchronize()
        result["eager_ms"] = _median_event_ms(lambda: module(static), runs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(5):
                module(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = module(static)
        for _ in range(20):
            graph.replay()
        result["cuda_graph_ms"] = _median_event_ms(graph.replay, runs)
        result["output"] = output.float().cpu().numpy()
    return result


def _median_event_ms(run, runs: int) -> float:
    import torch

    times = []
    for _ in range(runs):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return float(np.median(times))


def check_bundle(out: Path, runs: int) -> dict:
    """Load the bundle as a device does; outputs against onnxruntime (CPU); its own timing."""
    from compactdeploy.export import onnxruntime_session
    from compactdeploy.runtime.run import Model

    bundle = Model(out)
    session = onnxruntime_session(out / "model.onnx")
    name = session.get_inputs()[0].name
    sample = np.load(out / "sample_input.npy")
    rng = np.random.default_rng(0)
    inputs = [sample] + [rng.standard_normal(sample.shape).astype(sample.dtype) for _ in range(8)]
    worst = max(float(np.max(np.abs(bundle(x) - session.run(None, {name: x})[0]))) for x in inputs)
    return {"tvm_vs_onnxruntime_max_abs": worst, "runtime_bench": bundle.bench(runs), "output": bundle(sample)}


def jetson_check(work: Path) -> dict:
    out = work / "resnet20-jetson-orin-nano"
    rc, seconds, tail = cli_build("resnet20", "jetson-orin-nano", None, out, repeat=1)
    from benchlib import cpu_description

    row = {"target": "jetson-orin-nano", "built_on": f"{cpu_description()}, {nvcc_version()}", "rc": rc,
           "build_s": round(seconds, 1)}
    if rc != 0:
        return {**row, "error": tail}
    report = json.loads((out / "report.json").read_text())
    row["device_code"] = report["target"].get("device_code")
    row["latency"] = report["figures"]["latency"]
    library = out / "model.so"
    cuobjdump, listing = shutil.which("cuobjdump"), ""
    if cuobjdump:
        done = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True)
        listing = (done.stdout + done.stderr).strip() if done.returncode == 0 else ""
    if not listing:
        # no cuobjdump, or one that does not read an aarch64 library: the fatbin names its arch all the same
        listing = " ".join(m.decode() for m in set(re.findall(rb"sm_\d+", library.read_bytes())))
    row["library_arches"] = sorted(set(re.findall(r"sm_\d+", listing)))
    file_type = subprocess.run(["file", "-b", str(library)], capture_output=True, text=True).stdout.strip()
    row["library_file"] = file_type[:120]
    return row


def write(out_dir: Path, info: dict, rows: list[dict], jetson: dict | None) -> None:
    from compactdeploy.resources import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "cuda.json", {"meta": info, "rows": rows, "jetson": jetson})
    lines = [
        "# The CUDA target on a real GPU",
        "",
        f"Measured on {info['gpu']} (host CPU: {info['cpu']}), {info['date']}; TVM {info['tvm']}, "
        f"torch {info['torch']}, {info['nvcc']}. Random weights (seeded). Batch 1, fp32. Medians of "
        f"{info['runs']} runs: TVM by its time evaluator, PyTorch by CUDA events. onnxruntime's CUDA "
        "provider is not among them: see the note under the table. Command: `" + info["command"] + "`.",
        "",
        "| model | prune | build s | TVM ms (build) | TVM ms (runtime) | torch eager ms | torch CUDA graph ms "
        "| TVM / graph | max abs vs onnxruntime | max abs vs torch |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['prune'] or '-'} | {r['build_s']} | failed: {r['error'].splitlines()[-1][:80]} "
                         "| | | | | | |")
            continue
        ratio = r["tvm_runtime_ms"] / r["torch_cuda_graph_ms"] if r.get("torch_cuda_graph_ms") else None
        lines.append(
            f"| {r['model']} | {r['prune'] or '-'} | {r['build_s']} | {_fmt(r.get('tvm_build_ms'))} | {r['tvm_runtime_ms']:.3f} "
            f"| {_fmt(r.get('torch_eager_ms'))} | {_fmt(r.get('torch_cuda_graph_ms'))} | {_fmt(ratio, 2)}x "
            f"| {r['tvm_vs_onnxruntime_max_abs']:.1e} | {_fmt_e(r.get('tvm_vs_torch_max_abs'))} |"
        )
    lines += ["", f"onnxruntime's CUDA provider: {info['onnxruntime_cuda']}."]
    if info.get("note"):
        lines += ["", info["note"]]
    if jetson:
        lines += ["", f"Jetson path: `build --model resnet20 --target jetson-orin-nano` on {jetson['built_on']}: rc {jetson['rc']}, "
                      f"device code `{jetson.get('device_code')}`, arches in the library {jetson.get('library_arches')}, "
                      f"library: {jetson.get('library_file')}. Not run: sm_87 code does not load on this GPU."]
    (out_dir / "cuda.md").write_text("\n".join(lines) + "\n")


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"  # None or NaN


def _fmt_e(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,lenet300,mlp-tabular,resnet20,mobilenetv2")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--no-jetson", action="store_true", help="skip the jetson-orin-nano build (needs the aarch64 cross compiler)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compactdeploy-bench-cuda"))
    args = parser.parse_args()

    import torch
    import tvm
    from benchlib import cpu_description

    from compactdeploy.targets import load_target

    start = time.perf_counter()
    info = {"gpu": gpu_name(), "cpu": cpu_description(), "date": time.strftime("%Y-%m-%d"), "tvm": tvm.__version__,
            "torch": torch.__version__, "nvcc": nvcc_version(), "python": platform.python_version(), "runs": args.runs,
            "command": f"python tools/bench_cuda.py --models {args.models} --runs {args.runs}",
            "onnxruntime_cuda": "not measured: the onnxruntime-gpu wheel (300 MB) is larger than "
                                "what can be carried to that machine (64 MiB), which reaches no package index"}
    gpu = torch.cuda.is_available()
    multiple = load_target("cuda").channel_multiple
    rows: list[dict] = []
    shutil.rmtree(args.work, ignore_errors=True)
    for model in args.models.split(","):
        for prune in (None, "l1:0.5") if model in CONV_MODELS else (None,):
            label = f"{model}" + (f" {prune}" if prune else "")
            out = args.work / (model + ("-" + prune.replace(":", "") if prune else ""))
            print(f"[{time.perf_counter() - start:6.0f}s] {label}: build --target cuda", flush=True)
            rc, seconds, tail = cli_build(model, "cuda", prune, out, args.runs)
            row = {"model": model, "prune": prune, "build_s": round(seconds, 1)}
            if rc != 0:
                rows.append({**row, "rc": rc, "error": tail})
                print(tail, flush=True)
                write(args.out, info, rows, None)
                continue
            report = json.loads((out / "report.json").read_text())
            row["latency_where"] = report["figures"]["latency"]
            row["parity_in_report"] = report["parity"]
            row["device_code"] = report["target"].get("device_code")
            row["tvm_build_ms"] = (report.get("latency_ms") or {}).get("median")  # None: not measured
            row["onnxruntime_cpu"] = report.get("onnxruntime_on_device")
            if gpu:
                checked = check_bundle(out, args.runs)
                row["tvm_vs_onnxruntime_max_abs"] = checked["tvm_vs_onnxruntime_max_abs"]
                row["tvm_runtime_ms"] = checked["runtime_bench"]["median_ms"]
                module = torch_module(model, prune, multiple)
                sample = np.load(out / "sample_input.npy")
                timed = time_torch(module, sample, args.runs)
                row["torch_eager_ms"], row["torch_cuda_graph_ms"] = timed["eager_ms"], timed["cuda_graph_ms"]
                row["tvm_vs_torch_max_abs"] = float(np.max(np.abs(checked["output"] - timed["output"])))
            else:
                row["tvm_vs_onnxruntime_max_abs"], row["tvm_runtime_ms"] = float("nan"), float("nan")
            rows.append(row)
            print(f"    {json.dumps({k: v for k, v in row.items() if k != 'parity_in_report'})}", flush=True)
            write(args.out, info, rows, None)
    jetson = None
    if not args.no_jetson:
        print(f"[{time.perf_counter() - start:6.0f}s] jetson-orin-nano build", flush=True)
        jetson = jetson_check(args.work)
        print(f"    {jetson}", flush=True)
    info["seconds"] = round(time.perf_counter() - start)
    write(args.out, info, rows, jetson)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
