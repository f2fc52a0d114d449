"""The ``compactdeploy`` command: a thin layer over the stage functions.

Heavy libraries (torch, TVM) are imported inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from .bundle_runner import THREADS_ENV, BundleError
from .errors import CompactDeployError, first_line
from .units import format_size


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _parse_shape(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a shape like 1,28,28") from None
    if not shape or min(shape) < 1:
        raise click.BadParameter(f"{value!r} is not a shape like 1,28,28")
    return shape


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="compactdeploy")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Prune a PyTorch model, compile it with TVM and ship it to a Raspberry Pi or a Jetson."""
    ctx.obj = {"debug": debug}


def _options(*decorators):
    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


# what build and prune share: the model, its data, and how to prune it
_model_and_pruning = _options(
    click.option("--model", required=True, help="Zoo name (see 'compactdeploy models') or path/to/file.py:factory."),
    click.option("--prune", "prune_spec", metavar="METHOD[:RATIO]",
                 help="l1, random, data-free, noiseout, apoz, obd, taylor; RATIO of each layer's channels goes "
                      "(data-free:auto picks widths itself)."),
    click.option("--widths", help="Per-layer widths, e.g. 7=60,9=40 (overrides RATIO for those layers)."),
    click.option("--allow-grow", is_flag=True,
                 help="Let --widths above a layer's width (or a budget search with room to spare) widen it: copies of its "
                      "strongest channels, function-preserving (Net2WiderNet); train it after with --finetune-epochs."),
    click.option("--weights", type=click.Path(path_type=Path), help="A state_dict or a 'compactdeploy train/prune' checkpoint."),
    click.option("--data", help="digits, wine, breast-cancer, mnist1d or a .npz (x, y): reports accuracy."),
    click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Model option, repeatable."),
    click.option("--input-shape", callback=_parse_shape, help="One sample's shape, e.g. 3,32,32 (batch is 1)."),
    click.option("--exclude", multiple=True, metavar="LAYER", help="Layer name not to prune, repeatable."),
    click.option("--finetune-epochs", default=0, show_default=True, type=click.IntRange(min=0), help="Train this many epochs after pruning (needs --data)."),
    click.option("--distill", is_flag=True, help="Fine-tune with distillation from the unpruned model."),
    click.option("--noise-outputs", default=0, show_default=True, type=click.IntRange(min=0), help="NoiseOut: K noise outputs trained before pruning."),
    click.option("--noise-epochs", default=3, show_default=True, type=click.IntRange(min=1), help="Epochs of that training."),
    click.option("--calibration-samples", default=256, show_default=True, type=click.IntRange(min=1), help="Training samples the data-driven methods see."),
    click.option("--seed", default=0, show_default=True, help="Seed of training and of the random example input."),
)


def _config(options: dict, **extra):
    from .pipeline import BuildConfig
    from .prune import parse_widths
    from .zoo import parse_model_args

    return BuildConfig(
        model=options["model"],
        target=options["target"],
        out=options["out"],
        prune=options["prune_spec"],
        weights=options["weights"],
        data=options["data"],
        model_args=parse_model_args(options["model_args"]),
        input_shape=options["input_shape"],
        exclude=tuple(options["exclude"]),
        widths=parse_widths(options["widths"]),
        allow_grow=options["allow_grow"],
        finetune_epochs=options["finetune_epochs"],
        distill=options["distill"],
        noise_outputs=options["noise_outputs"],
        noise_epochs=options["noise_epochs"],
        calibration_samples=options["calibration_samples"],
        seed=options["seed"],
        **extra,
    )


@cli.command()
@_model_and_pruning
@click.option("--target", required=True, help="Target name (see 'compactdeploy targets') or path/to/target.toml.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory (replaced whole).")
@click.option("--repeat", default=100, show_default=True, type=click.IntRange(min=1), help="Timed runs when benchmarking.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="Untimed runs before timing.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for TVM and onnxruntime (default: one per physical core).")
@click.option("--device", help="Measure on this device: rpc://HOST:PORT (a server) or rpc://HOST:PORT/KEY (a tracker).")
@click.option("--device-wait", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for a busy tracker key.")
@click.option(
    "--tune-trials", default=0, show_default=True,
    help="Tune the kernels with this many MetaSchedule measurements on the device; records in the "
    "tuning database count, so a rerun resumes and a tuned model costs nothing.",
)
@click.option("--latency-budget", metavar="TIME",
              help="Search the widths: the model keeping the most channel importance whose latency measured on the device is within "
                   "TIME (8ms, 800us, or 60% of the unpruned model).")
@click.option("--memory-budget", metavar="SIZE", help="... and whose weights + workspace fit SIZE (40MB, 512KiB, 50%).")
@click.option("--resume", is_flag=True, help="Reuse the models an interrupted search already built and measured.")
@click.option("--fit-rounds", default=6, show_default=True, help="Models the search may build and measure, at most.")
@click.option("--fit-points", default=8, show_default=True, help="Candidate widths per group (multiples of the target's).")
def build(**options) -> None:
    """Load, prune, export, compile, benchmark and bundle a model for a target."""
    from .pipeline import build as run_build

    config = _config(
        options, repeat=options["repeat"], warmup=options["warmup"], threads=options["threads"],
        device=options["device"], device_wait_s=options["device_wait"], tune_trials=options["tune_trials"],
        latency_budget=options["latency_budget"], memory_budget=options["memory_budget"], resume=options["resume"],
        fit_rounds=options["fit_rounds"], fit_points=options["fit_points"],
    )
    with _StageProgress() as progress:
        result = run_build(config, progress)
    _print_build_summary(result)


@cli.command("prune")
@_model_and_pruning
@click.option("--target", default="host", show_default=True, help="Target whose channel multiple the widths round to.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint to write (build --weights takes it).")
def prune_command(**options) -> None:
    """Prune a model and write a checkpoint of it, without compiling."""
    from .pipeline import prune_to_checkpoint

    with _StageProgress() as progress:
        summary = prune_to_checkpoint(_config(options), progress)
    out = _console()
    params = summary["params"]
    out.print(f"[bold]{summary['model']}[/] pruned with {options['prune_spec']}: params {params['after']:,} of {params['before']:,}")
    for name, group in summary["prune"]["groups"].items():
        out.print(f"  {name:<24} {group['before']:>5} -> {group['after']:<5} {group['method']}")
    if summary["accuracy"]:
        acc = summary["accuracy"]
        out.print(f"  accuracy   {acc['before']:.2%} -> {acc['after_pruning']:.2%} pruned -> {acc['after']:.2%}")
    out.print(f"  wrote      {options['out']} (build --weights {options['out']} replays the pruning)")


class _StageProgress:
    """Shows a spinner for the running stage and one line per finished stage (on stderr)."""

    def __init__(self):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = _console(stderr=True)
        self.progress_bar = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        self.task = None
        self.running = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.running:
            self.progress_bar.stop()

    def started(self, stage: str) -> None:
        # a live display only on a terminal (rich ends one with a blank line on a pipe), and only
        # from the first stage on, so an error found before any work prints only itself
        if not self.running and self.console.is_terminal:
            self.progress_bar.start()
            self.running = True
        self.task = self.progress_bar.add_task(f"{stage}...") if self.running else None

    def progress(self, stage: str, message: str) -> None:
        if self.running and self.task is not None:
            self.progress_bar.update(self.task, description=f"{stage}: {message}")

    def finished(self, stage: str, seconds: float, summary: str) -> None:
        if self.task is not None:
            self.progress_bar.remove_task(self.task)
            self.task = None
        self.console.print(f"[green]done[/] {stage:<9} {seconds:7.1f} s  {summary}")


def _print_build_summary(result) -> None:
    report = result.report
    out = _console()
    model, target = report["model"], report["target"]
    out.print(f"[bold]{model['name']}[/] -> [bold]{target['name']}[/] ({target['arch']}, {target['device_code']})")

    def ratio(after, before):
        return f"{after:,} of {before:,} ({after / before:.0%})" if before else f"{after:,}"

    if model["weights"]["source"] == "random-init":
        out.print("  [yellow]weights    random (no --weights): sizes and speed are real, outputs are not useful[/]")
    out.print(f"  params     {ratio(model['params'], model['params_before'])}")
    out.print(f"  MACs       {ratio(model['macs'], model['macs_before'])}")
    changed = [f"{n}: {w['before']}->{w['after']}" for n, w in model["widths"].items() if w["before"] != w["after"]]
    if changed:
        shown = ", ".join(changed[:6]) + (f", ... ({len(changed)} layers)" if len(changed) > 6 else "")
        out.print(f"  widths     {shown}")
    if report["accuracy"]:
        acc = report["accuracy"]
        tuned = f" -> {acc['after']:.2%} after {acc['finetune_epochs']} fine-tuning epochs" if acc["finetune_epochs"] else ""
        out.print(
            f"  accuracy   {acc['before']:.2%} -> {acc['after_pruning']:.2%} pruned{tuned} "
            f"({acc['dataset']}, {acc['split']})"
        )
    parity = report["parity"]
    tvm_parity = "not checked (no device)" if parity["onnx_vs_tvm_max_abs"] is None else f"{parity['onnx_vs_tvm_max_abs']:.1e}"
    out.print(f"  parity     torch vs onnxruntime {parity['torch_vs_onnx_max_abs']:.1e}, onnxruntime vs TVM {tvm_parity}")
    tuning = report.get("tuning")
    if tuning:
        ran = (
            f"; this build ran {tuning['trials_run']} trials in {tuning['tune_s']:.0f} s, reused {tuning['trials_reused']}"
            if tuning["requested_trials"] else " (no --tune-trials)"
        )
        out.print(
            f"  tuning     {tuning['kernels_scheduled']}/{tuning['kernels_tunable']} kernels scheduled from "
            f"{tuning['database']}{ran}"
        )
    fit = report.get("fit")
    if fit:
        error = fit["predictor_error_pct"]
        predicted = f"; predictor error median {error['median']:.1f} %, worst {error['worst']:.1f} %" if error["count"] else ""
        out.print(
            f"  search     {fit['status']} ({fit['budget']['latency'] or ''} {fit['budget']['memory'] or ''}".rstrip()
            + f"): {len(fit['verified'])} models measured{predicted}; plots {', '.join(fit['plots'])}"
        )
        if fit["final"]["meets_latency_budget"] is False:
            out.print(
                f"  [yellow]note[/]       this build measured {fit['final']['measured_ms']:.3f} ms, over the budget "
                f"({fit['budget']['latency_ms']:.3f} ms) the search measured it within ({fit['chosen']['measured_ms']:.3f} ms): "
                "the device's timing moved (other load?); rebuild on an idle device, or give a lower budget"
            )
    _print_measurement(out, report)
    for note in report["compile"]["notes"]:
        out.print(f"  [yellow]note[/]       {note}")
    files = ", ".join(sorted(result.manifest["files"]) + ["manifest.json", "SHA256SUMS"])
    out.print(f"  wrote      {result.out}/ ({files})")


def _print_measurement(out, report) -> None:
    latency = report["latency_ms"]
    if latency:
        out.print(
            f"  latency    median {latency['median']:.3f} ms, p90 {latency['p90']:.3f}, p99 {latency['p99']:.3f} "
            f"({latency['runs']} runs; first run {_ms(latency['cold_first_run'])}, load {_ms(latency['module_load'])})"
        )
    out.print(f"             {report['figures']['latency']}")
    baseline = report.get("onnxruntime_on_device")
    if baseline and "latency_ms" in baseline:
        out.print(
            f"  baseline   onnxruntime {baseline['version']} on the same device: median "
            f"{baseline['latency_ms']['median']:.3f} ms (TVM / onnxruntime = {baseline['tvm_over_onnxruntime']:.2f})"
        )
        advice = slower_than_onnxruntime_advice(report)
        if advice:
            out.print(f"  [yellow]note[/]       {advice}")
    per_layer = report.get("per_layer")
    if per_layer and "kernels" in per_layer:
        top = ", ".join(f"{k['kernel']} {k['share']:.0%}" for k in per_layer["kernels"][:3])
        out.print(
            f"  per layer  kernels sum to {per_layer['sum_ms']:.3f} ms timed alone ({per_layer['sum_over_whole']:.0%} of "
            f"the whole), {per_layer['in_model_sum_ms']:.3f} ms inside the model's runs; slowest: {top}"
        )
    memory = report["memory"]
    rss = "not measured" if memory["peak_rss_bytes"] is None else format_size(memory["peak_rss_bytes"])
    out.print(
        f"  memory     params {format_size(memory['params_bytes'])}, workspace {format_size(memory['workspace_bytes'])}, "
        f"peak RSS growth {rss}"
    )


def slower_than_onnxruntime_advice(report) -> str | None:
    """What to do when the build runs slower than onnxruntime on the same device (None: it does not)."""
    baseline = report.get("onnxruntime_on_device") or {}
    ratio = baseline.get("tvm_over_onnxruntime")
    if ratio is None or ratio <= 1.0:
        return None
    tuning = report.get("tuning")
    if not tuning:  # no tuning database applies: a GPU build, its kernels scheduled by DLight's rules
        return (
            f"TVM takes {ratio:.2f}x onnxruntime's time here (kernels scheduled by DLight, not tuned): "
            "run this bundle's model.onnx with onnxruntime on the device instead"
        )
    missing = tuning["kernels_tunable"] - tuning["kernels_scheduled"]
    if missing:
        return (
            f"TVM takes {ratio:.2f}x onnxruntime's time here, and {missing} of {tuning['kernels_tunable']} kernels "
            "have no tuning record (unscheduled, slow): build again with --tune-trials N (the tuning benchmark gave "
            "ResNet-20 1600-1800 for its 14 kernels; records are kept, an interrupted run resumes)"
        )
    return (
        f"TVM takes {ratio:.2f}x onnxruntime's time here with every kernel tuned: more --tune-trials may close "
        "it (the per-layer profile shows where); otherwise run this bundle's model.onnx with onnxruntime"
    )


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


@cli.command()
@click.option("--model", required=True, help="Zoo name or path/to/file.py:factory.")
@click.option("--data", required=True, help="digits, wine, breast-cancer, mnist1d or a .npz (x, y).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Model option, repeatable.")
@click.option("--seed", default=0, show_default=True)
@click.option("--learn-arch", type=click.Choice(["gates", "gdropout", "sparse"]),
              help="Let training choose the widths (gates, gdropout) or the weights kept (sparse).")
@click.option("--arch-strength", default=0.01, show_default=True,
              help="gates/sparse: lambda1; gdropout: the weight of the Beta prior.")
@click.option("--arch-k", default=0.3, show_default=True, help="gates: lambda3 = k * lambda1 (the width penalty).")
@click.option("--prior", default="0.05,0.5", show_default=True, metavar="ALPHA,BETA",
              help="gdropout's Beta prior: SAL (< 1, the default, beta/alpha = 10), Dropout++ (equal, > 1), flat (1,1).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint file to write.")
def train(model, data, epochs, lr, batch_size, model_args, seed, learn_arch, arch_strength, arch_k, prior, out) -> None:
    """Train a model on a local dataset and write a checkpoint for 'build --weights'."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .data import fit_to_model, load_dataset
    from .train import save_checkpoint, save_pruned_checkpoint
    from .train import train as run_train
    from .zoo import load_model, parse_model_args

    from .resources import check_writable_parent

    check_writable_parent(out, "--out")  # before training, not after
    dataset = load_dataset(data)
    loaded = load_model(model, dataset, model_args=parse_model_args(model_args))
    learner = None
    if learn_arch:
        import torch

        from .learn import ArchConfig, ArchLearner

        try:
            alpha, beta = (float(v) for v in prior.split(","))
        except ValueError:
            raise CompactDeployError(f"--prior {prior!r} is not ALPHA,BETA (e.g. 0.05,0.5)") from None
        example = torch.from_numpy(fit_to_model(dataset, dataset.x_train[:1], loaded.input_shape[1:]))
        config = ArchConfig(learn_arch, strength=arch_strength, k=arch_k, alpha=alpha, beta=beta)
        learner = ArchLearner(loaded.module, example, config)
    console = _console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"training {loaded.name} on {dataset.name}", total=epochs)

        def on_epoch(epoch, total, loss, accuracy):
            bar.update(task, advance=1, description=f"epoch {epoch}/{total} loss {loss:.3f} test acc {accuracy:.2%}")

        result = run_train(
            loaded, dataset, epochs, lr=lr, batch_size=batch_size, seed=seed, on_epoch=on_epoch, learner=learner
        )
    console = _console()
    if learner is None:
        save_checkpoint(loaded, dataset, result, out)
    else:
        summary = {"method": learn_arch, **learner.summary(), "test_accuracy": result.test_accuracy}
        plan = learner.finalize()
        save_pruned_checkpoint(loaded, plan, summary, out, learner.linearized, learner.merged)
        if learn_arch == "sparse":
            console.print(f"  kept {summary['weights_kept']:,} of {summary['weights']:,} weights ({summary['sparsity']:.1%} sparse)")
        else:
            for name, layer in summary["layers"].items():
                linear = " (learnt linear: ReLU removed)" if layer.get("linear") else ""
                console.print(f"  {name:<20} {layer['width']:>5} -> {layer['kept']:<5}{linear}")
            for first, second in learner.merged:
                console.print(f"  {first} merged into {second} (a linear layer folded into the next)")
            for name, why in summary["not_gated"].items():
                console.print(f"  {name:<20} not gated: {why}")
    console.print(
        f"{loaded.name} on {dataset.name}: test accuracy {result.test_accuracy:.2%} after {epochs} epochs "
        f"({len(dataset.y_test)} test samples); wrote {out}"
    )


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", help="rpc://HOST:PORT or rpc://HOST:PORT/KEY; default: this machine, if the bundle is for it.")
@click.option("--repeat", default=100, show_default=True, type=click.IntRange(min=1), help="Timed runs.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="Untimed runs before timing.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads on this machine (a remote device uses its own setting).")
@click.option("--device-wait", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for a busy tracker key.")
@click.option("--json", "as_json", is_flag=True, help="Print the updated report.json.")
def bench(bundle, device, repeat, warmup, threads, device_wait, as_json) -> None:
    """Measure a build on a device and update its report.json."""
    from .pipeline import remeasure

    with _StageProgress() as progress:
        report = remeasure(bundle, device, repeat, warmup, threads, device_wait, progress)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
        return
    out = _console()
    out.print(f"[bold]{report['model']['name']}[/] on [bold]{report['target']['name']}[/]")
    _print_measurement(out, report)
    parity = report["parity"]["onnx_vs_tvm_max_abs"]
    out.print(f"  parity     onnxruntime on this host vs TVM on the device: {parity:.1e}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(path_type=Path), help="An .npy file with one input.")
@click.option("--output", type=click.Path(path_type=Path), help="Write the output here (.npy).")
@click.option("--bench", type=click.IntRange(min=1), metavar="RUNS", help="Time RUNS inferences on the bundled sample input.")
@click.option("--verify", "verify_only", is_flag=True, help="Only verify the bundle.")
def run(bundle, input_path, output, bench, verify_only) -> None:
    """Verify a bundle, then run it on this machine (needs only numpy and the TVM runtime)."""
    from .bundle_runner import execute

    click.echo(execute(bundle, input_path, output, bench, verify_only))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Archive to write (default: BUNDLE.tar.gz).")
def pack(bundle, out) -> None:
    """Verify a bundle and write it as one .tar.gz."""
    from .bundle import pack as pack_bundle

    click.echo(f"wrote {pack_bundle(bundle, out)}")


@cli.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("destination", type=click.Path(path_type=Path))
def unpack(archive, destination) -> None:
    """Unpack a bundle archive safely (no path escapes, no links, size caps), verify it, then put it in place.

    DESTINATION is replaced only if it is empty or an earlier bundle; any other directory gets the
    bundle inside it, as DESTINATION/NAME.
    """
    from .bundle_runner import install_archive

    result = install_archive(archive, destination)
    replaced = " (replacing the bundle that was there)" if result["replaced"] else ""
    click.echo(f"installed {result['model']} for {result['target']} at {result['path']}{replaced}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, help="ssh://[USER@]HOST[:PORT]:/PATH or rpc://HOST:PORT[/KEY].")
@click.option("--dest", help="Path on an rpc:// device; relative to the agent's home (default ~/compactdeploy/bundles/NAME).")
@click.option("--ssh-config", type=click.Path(path_type=Path), help="An ssh_config file (default: your own).")
@click.option("--device-wait", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for a busy tracker key.")
def ship(bundle, to, dest, ssh_config, device_wait) -> None:
    """Send a bundle to a device; it is verified there before it replaces anything.

    The path is replaced only if it is empty or an earlier bundle; any other directory (a home) gets
    the bundle inside it, as PATH/NAME.
    """
    from .ship import ship as ship_bundle

    result = ship_bundle(bundle, to, dest, ssh_config, device_wait)
    replaced = ", replacing the bundle that was there" if result.get("replaced") else ""
    click.echo(f"shipped {bundle} to {result['to']} ({result['path']}, verified{replaced})")


@cli.group()
def device() -> None:
    """Serve this machine (or an emulated board) as a device for measurements."""


@device.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; others can reach only what you bind.")
@click.option("--port", default=9090, show_default=True, help="First port to try.")
@click.option("--tracker", help="Register with a TVM tracker at HOST:PORT (then --key is required).")
@click.option("--key", default="", help="This device's key on the tracker, e.g. rpi4.")
@click.option("--emulate", "emulate_target", help="Serve an emulated board (qemu-user) for this target, e.g. rpi4.")
@click.option("--threads", type=click.IntRange(min=1), help="TVM threads (default: one per physical core).")
def serve(host, port, tracker, key, emulate_target, threads) -> None:
    """Run a TVM RPC server with compactdeploy's measuring functions, until interrupted.

    Clients must give its access token: $COMPACTDEPLOY_DEVICE_TOKEN if set, else a new one, printed
    once. It runs any code such a client sends: serve only on a trusted network.
    """
    from .device import agent
    from .device.listener import ListenerDied

    if tracker and not key:
        raise CompactDeployError("--tracker needs --key (the kind of device, e.g. rpi4)")
    err = _console(stderr=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning[/]: serving on {host}: anyone who can reach it and has the token can run code here")
    where = f"tracker {tracker} as '{key}'" if tracker else "directly"
    token, made = agent.token_from_environment()

    def ready(bound: int, what: str = "this machine") -> None:
        # plain lines (rich would wrap them, and a wrapped token cannot be copied)
        click.echo(f"serving {what} on rpc://{host}:{bound} ({where}); Ctrl-C stops", err=True)
        if made:  # printed once; a supervisor that restarts the agent should set the variable instead
            click.echo(agent.token_line(token, host, bound), err=True)

    if emulate_target is None:
        import os

        if threads:
            os.environ[THREADS_ENV] = str(threads)
        try:
            agent.serve(host, port, port + 100, tracker, key, token, on_ready=ready)
        except (ListenerDied, OSError) as exc:
            raise _ServeFailed(f"the agent stopped serving: {exc}") from None
        return
    from .device.emulate import emulated_agent
    from .targets import load_target

    target = load_target(emulate_target)
    if target.arch != "aarch64":
        raise CompactDeployError(f"only aarch64 boards can be emulated; {target.name} is {target.arch}")
    mcpu = (target.tvm_target_dict().get("host") or target.tvm_target_dict()).get("mcpu")
    with emulated_agent(mcpu, port, host, tracker, key, threads, token=token,
                        progress=lambda m: err.print(m)) as emulated:
        ready(emulated.port, f"an EMULATED {target.name} ({mcpu}, qemu-user: not the board's speed)")
        try:
            status = emulated.process.wait()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main turns it into one): leaving stops the agent
            return
    if status != 0:
        raise _ServeFailed(f"the emulated agent stopped serving (exit status {status})")


class _ServeFailed(CompactDeployError):
    """The agent's listener died: exit 1, so that a supervisor restarts it."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets(as_json: bool) -> None:
    """List the device targets."""
    from .targets import available_targets, load_target

    rows = []
    for name in available_targets():
        spec = load_target(name)
        rows.append(
            {
                "name": spec.name,
                "tvm_target": spec.tvm_target_dict(),
                "arch": spec.arch,
                "cores": spec.cores,
                "memory_mb": spec.memory_mb,
                "channel_multiple": spec.channel_multiple,
                "cross_compiler": spec.cross_compiler,
                "rpc_key": spec.rpc_key,
                "description": spec.description,
            }
        )
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("target", "TVM target", "arch", "cores", "memory", "channel multiple")
    table.columns[0].no_wrap = True
    for row in rows:
        tvm = row["tvm_target"]
        tvm_text = tvm.get("tag") or f"{tvm['kind']} {tvm.get('mcpu', '')}".strip()
        if "tag" in tvm and "host" in tvm:
            tvm_text += f" (host {tvm['host'].get('mcpu')})"
        table.add_row(
            row["name"], tvm_text, row["arch"], str(row["cores"]), f"{row['memory_mb']} MB",
            str(row["channel_multiple"]),
        )
    _console().print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the model zoo."""
    from .zoo import zoo

    rows = [
        {
            "name": spec.name,
            "input_shape": list(spec.input_shape()),
            "default_data": spec.default_data,
            "args": spec.arguments(),
            "description": spec.description,
        }
        for spec in zoo().values()
    ]
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("model", "input", "data", "options (--model-arg)", "description")
    table.columns[0].no_wrap = True
    for row in rows:
        options = ", ".join(f"{k}={v}" for k, v in row["args"].items())
        table.add_row(row["name"], "x".join(map(str, row["input_shape"])), row["default_data"] or "", options, row["description"])
    _console().print(table)


@cli.command()
@click.option("--remove-stale", is_flag=True,
              help="Delete the tuning databases no build reads (another TVM version, or no identity).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache(remove_stale: bool, as_json: bool) -> None:
    """List the tuning databases and what else the cache holds."""
    import time

    from .resources import cache_dir, directory_bytes
    from .tune import remove_database, stored_databases

    root = cache_dir()
    databases = stored_databases()
    removed, in_use = [], []
    if remove_stale:
        for entry in [entry for entry in databases if entry.stale is not None]:
            try:
                remove_database(entry.path)
                removed.append(entry)
            except CompactDeployError:  # a build is tuning into it now: left whole
                in_use.append(entry)
        databases = [entry for entry in databases if entry not in removed]
    # the cache's other parts (latency tables, fit runs, sysroots, linkers), with the room each takes
    others = {
        part.name: directory_bytes(part) for part in sorted(root.iterdir()) if part.is_dir() and part.name != "tuning"
    }
    if as_json:
        import json

        click.echo(json.dumps({
            "cache": str(root),
            "tuning_databases": [entry.as_dict() for entry in databases],
            "removed": [str(entry.path) for entry in removed],
            "in_use": [str(entry.path) for entry in in_use],
            "other_bytes": others,
        }, indent=2))
        return
    from rich.markup import escape

    out = _console()
    out.print(f"cache: {root} ($COMPACTDEPLOY_CACHE sets it)")
    for entry in removed:
        out.print(f"removed {entry.path.name}: {entry.stale}")
    for entry in in_use:
        out.print(f"left {entry.path.name}: a build is tuning into it now")
    for entry in databases:  # two lines each: a table of ten columns does not fit a terminal
        identity = entry.identity
        target = identity.get("target") or {}
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.written))
        status = "read by builds" if entry.stale is None else f"[bold]stale[/]: {escape(entry.stale)}"
        out.print(f"[bold]{entry.path.name}[/]  {status}")
        out.print(
            "  " + escape(
                f"{target.get('tag') or target.get('mcpu') or target.get('kind') or '?'}"
                f" on {identity.get('cpu') or 'an unknown CPU'}{' (emulated)' if identity.get('emulated') else ''}, "
                f"{identity.get('threads') or '?'} threads, TVM {identity.get('tvm_version') or '?'}; "
                f"{entry.kernels} kernels, {entry.records} records, {format_size(entry.size_bytes)}, written {written}"
            )
        )
    if not databases:
        out.print("no tuning databases: builds with --tune-trials make them")
    stale = sum(entry.stale is not None for entry in databases)
    if stale and not remove_stale:  # after --remove-stale, the ones left were named above
        out.print(f"{stale} no build reads: `compactdeploy cache --remove-stale` deletes them")
    for name, size in others.items():
        out.print(f"{name}: {format_size(size)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: a CompactDeployError is one line on stderr and exit status 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    previous = _sigterm_as_interrupt()
    try:
        cli.main(args=argv, prog_name="compactdeploy", standalone_mode=False)
    except _ServeFailed as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except (CompactDeployError, BundleError) as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("interrupted: nothing was written", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        return 130
    except click.UsageError as exc:  # a bad option: one line, as every other error
        command = exc.ctx.command_path if exc.ctx else "compactdeploy"
        click.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # a bug, not bad input: one line, the traceback on request
        if debug:
            raise
        click.echo(f"internal error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)", err=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _sigterm_as_interrupt():
    """SIGTERM cleans up as Ctrl-C does (staging directories removed, agents stopped); the handler
    it replaces, or None off the main thread (where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
