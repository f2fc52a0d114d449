"""What the benchmark scripts share: where results go and the record of where they were measured."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import json

import numpy as np

from compactdeploy.bench.layers import conv_layer, nchw_from_nhwc, same_layer_in_tvm
from compactdeploy.resources import write_json as write_json_atomically

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def meta(script: str, seconds: float, **settings) -> dict:
    """Where, when and how a benchmark ran: every results file starts with this. The command is
    ``script`` with the arguments it was run with (when it is the script running)."""
    arguments = sys.argv[1:] if Path(sys.argv[0]).name == script else []
    return {
        "measured_on": f"{platform.node()} ({cpu_description()}), CPU, {time.strftime('%Y-%m-%d')}",
        **settings,
        "seconds": round(seconds),
        "command": " ".join([f".venv/bin/python tools/{script}", *arguments]),
    }


def cpu_description() -> str:
    """``x86_64, AMD EPYC, AVX2, 2 cores``: which CPU a figure came from (machines of one name differ)."""
    from compactdeploy.device.agent import fingerprint

    flags: set[str] = set()
    try:
        flags = next((set(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo")
                      if line.startswith(("flags", "Features"))), set())  # x86 says flags, aarch64 Features
    except OSError:
        pass
    vectors = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON")) if flag in flags), "")
    return ", ".join(part for part in (platform.machine(), fingerprint()["cpu"], vectors, f"{os.cpu_count()} cores") if part)


def write_json(name: str, info: dict, rows: list[dict], **extra) -> None:
    """``docs/benchmarks/NAME.json``: ``meta``, ``rows`` and any ``extra`` sections (e.g. every run behind the rows)."""
    DOCS.mkdir(exist_ok=True)
    # atomic: an interrupted write leaves the previous results whole
    write_json_atomically(DOCS / f"{name}.json", {"meta": info, "rows": rows, **extra})


# After a run, a runtime's worker threads spin before they sleep: measured on this 2-core host,
# TVM's pool burns ~75 ms of CPU, onnxruntime's ~40 ms. Timed inside that window, the next runtime
# shares its cores with them, so each batch starts after this pause and a few untimed runs.
QUIET_S = 0.2
BATCH_WARMUP = 3


def time_interleaved(runners: dict, rounds: int, runs_per_round: int, warmup: int) -> dict:
    """Each runner's run times (s): every runner in turn, ``runs_per_round`` runs each, ``rounds`` times,
    so a slow minute on a shared machine falls on all of them alike. Each batch starts once the
    runner before it has gone quiet (``QUIET_S``), after ``BATCH_WARMUP`` untimed runs."""
    times = {key: [] for key in runners}
    for run in runners.values():
        for _ in range(warmup):
            run()
    for _ in range(rounds):
        for key, run in runners.items():
            time.sleep(QUIET_S)
            for _ in range(BATCH_WARMUP):
                run()
            for _ in range(runs_per_round):
                begin = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - begin)
    return times


def pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, axes, name: str) -> None:
    """Label every panel's accuracy axis, put the legend on the first, write docs/benchmarks/NAME.png."""
    for ax in axes.flat:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(DOCS / f"{name}.png", dpi=110)


def plot_accuracy_at_latency(rows: list[dict], markers: dict[str, str], ylabel: str, name: str) -> None:
    """One panel per model: each strategy's accuracy against its measured latency, the budgets dashed;
    writes docs/benchmarks/NAME.png. Rows carry model, strategy, measured_ms, accuracy (0-1) and budget_ms."""
    plt = pyplot()
    models = sorted({r["model"] for r in rows})
    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes.flat, models):
        for strategy, marker in markers.items():
            points = [(r["measured_ms"], r["accuracy"] * 100) for r in rows
                      if r["model"] == model and r["strategy"] == strategy and r["accuracy"] is not None]
            axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=strategy, s=50)
        for budget in sorted({r["budget_ms"] for r in rows if r["model"] == model}):
            axis.axvline(budget, color="0.6", linestyle="--", linewidth=1)
        axis.set_title(f"{model} (dashed: budgets)", fontsize=9)
        axis.set_xlabel("latency measured on this host, ms")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(DOCS / f"{name}.png", dpi=110)


def compare_layers(plain_lib: Path, scheduled_lib: Path, onnx_path: Path, example: np.ndarray, threads: int) -> dict:
    """Where the time goes: each convolution shape in TVM (the kernel of ``scheduled_lib`` inside the
    model, and alone) and in onnxruntime (its profiler, inside the model). ``plain_lib``: the same
    model compiled unscheduled, whose kernels.json has the layers' own shapes (scheduled kernels
    may take prepacked weights).

    onnxruntime's own profiler gives each node's time; a node and a TVM kernel are the same layer when
    their input and output shapes (channels up to onnxruntime's padding) and kernel sizes are (both
    fuse the bias, the residual add and the activation into the convolution). The rest is "other".
    """
    import tvm
    from tvm import relax

    from compactdeploy.compile import KERNELS_NAME
    from compactdeploy.device.agent import time_each_kernel, time_each_kernel_in_model

    shapes = {k["name"]: k for k in json.loads((Path(plain_lib).parent / KERNELS_NAME).read_text())}
    kernels = json.loads((Path(scheduled_lib).parent / KERNELS_NAME).read_text())
    library = tvm.runtime.load_module(str(scheduled_lib))
    alone = time_each_kernel(library.imports[0], tvm.cpu(), kernels, 100)
    vm = relax.VirtualMachine(library, tvm.cpu())
    in_model = time_each_kernel_in_model(vm, tvm.runtime.tensor(example), 200)
    layers: dict[tuple, dict] = {}

    def layer(key: tuple, label: str, flops: float) -> dict:
        return layers.setdefault(key, {"layer": label, "flops": flops, "tvm_us": 0.0, "tvm_alone_us": 0.0,
                                       "tvm_calls": 0, "onnxruntime_us": 0.0, "onnxruntime_calls": 0})

    for kernel, time_ in zip(kernels, alone):
        original = shapes.get(kernel["name"].removesuffix("_prepacked"))
        if original is not None and "conv2d" in kernel["name"]:
            data, weight, out = (original["args"][i]["shape"] for i in (0, 1, -1))
            entry = layer(*conv_layer(*nchw_from_nhwc(data, weight, out)))
        else:
            entry = layer(("other",), "other", 0.0)
        entry["tvm_us"] += in_model[kernel["name"]] * 1e3 * kernel["calls"]
        entry["tvm_alone_us"] += time_["median_ms"] * 1e3 * kernel["calls"]
        entry["tvm_calls"] += kernel["calls"]
    for node in _onnxruntime_profile(onnx_path, example, threads):
        if node["op"] in ("Conv", "FusedConv"):
            key, label, flops = conv_layer(*(next(iter(t.values())) for t in node["input_type_shape"][:2] + node["output_type_shape"][:1]))
            entry = layer(same_layer_in_tvm(key, layers) or key, label, flops)
        else:
            entry = layer(("other",), "other", 0.0)
        entry["onnxruntime_us"] += node["us"]
        entry["onnxruntime_calls"] += 1
    rows = sorted(layers.values(), key=lambda r: (r["layer"] == "other", -max(r["tvm_us"], r["onnxruntime_us"])))
    for r in rows:
        r["tvm_alone_us"] = round(r["tvm_alone_us"], 2)
        for side in ("tvm", "onnxruntime"):
            r[f"{side}_us"] = round(r[f"{side}_us"], 2)
            calls = r[f"{side}_calls"]
            r[f"{side}_gflops"] = round(r["flops"] * calls / (r[f"{side}_us"] * 1e3), 1) if r["flops"] and r[f"{side}_us"] else None
    return {
        "layers": rows,
        "tvm_sum_us": round(sum(r["tvm_us"] for r in rows), 1),
        "tvm_alone_sum_us": round(sum(r["tvm_alone_us"] for r in rows), 1),
        "onnxruntime_sum_us": round(sum(r["onnxruntime_us"] for r in rows), 1),
        "method": "TVM: each kernel's median per call inside 200 runs of the model (the Relax VM's "
                  "instrument hook; compactdeploy.device.agent.time_each_kernel_in_model) x its calls, and "
                  "alone (time_evaluator, median of 10 repeats of 10 runs, warm caches: how MetaSchedule "
                  "measures); onnxruntime: its profiler's per-node time inside the model, median over 200 "
                  "runs, same thread count (both hooks add a little per kernel)",
    }


def _onnxruntime_profile(onnx_path: Path, x: np.ndarray, threads: int, runs: int = 200) -> list[dict]:
    """Each node's median time (us) from onnxruntime's profiler; op and shapes as it reports them."""
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as scratch:
        options.profile_file_prefix = os.path.join(scratch, "ort")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = {}
    first: dict[str, dict] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            durations.setdefault(event["name"], []).append(event["dur"])
            first.setdefault(event["name"], event["args"])
    return [
        {"node": name, "op": first[name]["op_name"], "us": float(np.median(d)),
         "input_type_shape": first[name]["input_type_shape"], "output_type_shape": first[name]["output_type_shape"]}
        for name, d in durations.items()
    ]
