"""The ``compactdeploy`` command: parses options into the stages' typed configs, calls the stage,
and renders what it returns (``render``). Heavy libraries (torch, TVM) are imported inside the
commands, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from .errors import CompactDeployError, first_line
from .options import DEVICE_WAIT, model_and_pruning, parse_model_args
from .runtime import BundleError


def _json_out(rows) -> None:
    click.echo(json.dumps(rows, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="compactdeploy")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Prune a PyTorch model, compile it with TVM and ship it to a Raspberry Pi or a Jetson."""
    ctx.obj = {"debug": debug}


def _config(options: dict):
    from .config import BuildConfig, FitConfig, MeasureConfig, ModelConfig, PruneConfig, TuneConfig, from_options

    options = {**options, "exclude": tuple(options["exclude"])}
    return BuildConfig(
        model=from_options(ModelConfig, options), target=options["target"], out=options["out"],
        prune=from_options(PruneConfig, options), measure=from_options(MeasureConfig, options),
        tune=from_options(TuneConfig, options), fit=from_options(FitConfig, options),
    )


@cli.command()
@model_and_pruning
@click.option("--target", required=True, help="Target name (see 'compactdeploy targets') or path/to/target.toml.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory (replaced whole).")
@click.option("--repeat", default=100, show_default=True, type=click.IntRange(min=1), help="Timed runs when benchmarking.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="Untimed runs before timing.")
@click.option("--min-time", "min_time_s", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Time runs for at least this many seconds (more than --repeat for a fast model): a short "
                   "window samples one moment of a device, fast or slow; 0: exactly --repeat runs.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for TVM and onnxruntime (default: one per physical core).")
@click.option("--device", help="Measure on this device: rpc://HOST:PORT (a server) or rpc://HOST:PORT/KEY (a tracker).")
@DEVICE_WAIT
@click.option("--tune-trials", default=0, show_default=True,
              help="Tune the kernels with this many MetaSchedule measurements on the device; records in the "
                   "tuning database count, so a rerun resumes and a tuned model costs nothing.")
@click.option("--default-schedules/--no-default-schedules", default=True, show_default=True,
              help="Schedule CPU kernels that have no tuning record by compactdeploy's rules; without, they "
                   "compile as plain loop nests (slow: to compare, or to rule the rules out).")
@click.option("--transfer/--no-transfer", default=True, show_default=True,
              help="Give kernels that have no tuning record the schedules the database holds for the same "
                   "operator at other widths (a pruned model's layers), each timed on the device against "
                   "the default rule; the fastest is kept as a record.")
@click.option("--latency-budget", metavar="TIME",
              help="Search the widths: the most accurate model (with --data; else the one keeping the most channel "
                   "importance) whose latency measured on the device is within TIME (8ms, 800us, or 60% of the "
                   "unpruned model).")
@click.option("--memory-budget", metavar="SIZE", help="... and whose weights + workspace fit SIZE (40MB, 512KiB, 50%).")
@click.option("--resume", is_flag=True, help="Reuse the models an interrupted search already built and measured.")
@click.option("--fit-rounds", default=12, show_default=True,
              help="Models the search may build and measure, at most, besides the unpruned and smallest ones it measures first.")
@click.option("--fit-points", default=8, show_default=True, help="Candidate widths per group (multiples of the target's).")
@click.option("--fit-trial-epochs", default=4, show_default=True,
              help="With --data, the search judges models by their accuracy on held-out training data after a "
                   "fine-tune that sees as many samples as --finetune-epochs will, at most this many epochs; 0: by "
                   "channel importance.")
def build(**options) -> None:
    """Load, prune, export, compile, benchmark and bundle a model for a target."""
    from .pipeline import build as run_build
    from .render import StageProgress, build_summary

    with StageProgress() as progress:
        result = run_build(_config(options), progress)
    build_summary(result)


@cli.command("prune")
@model_and_pruning
@click.option("--target", default="host", show_default=True, help="Target whose channel multiple the widths round to.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint to write (build --weights takes it).")
def prune_command(**options) -> None:
    """Prune a model and write a checkpoint of it, without compiling."""
    from .pipeline import prune_to_checkpoint
    from .render import StageProgress, prune_summary

    with StageProgress() as progress:
        summary = prune_to_checkpoint(_config(options), progress)
    prune_summary(summary, options["prune"], options["out"])


@cli.command()
@click.option("--model", required=True, help="Zoo name or path/to/file.py:factory.")
@click.option("--data", required=True, help="digits, wine, breast-cancer, mnist1d or a .npz (x, y).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", callback=parse_model_args,
              help="Model option, repeatable.")
@click.option("--seed", default=0, show_default=True)
@click.option("--learn-arch", type=click.Choice(["gates", "gdropout", "sparse"]),
              help="Let training choose the widths (gates, gdropout) or the weights kept (sparse).")
@click.option("--arch-strength", type=float,
              help="gates/sparse: lambda1; gdropout: the weight of the Beta prior  [default: gates 0.002, sparse 0.001, gdropout 3]")
@click.option("--arch-k", default=0.3, show_default=True, help="gates: lambda3 = k * lambda1 (the width penalty).")
@click.option("--prior", default="0.05,0.5", show_default=True, metavar="ALPHA,BETA",
              help="gdropout's Beta prior: SAL (< 1, the default, beta/alpha = 10), Dropout++ (equal, > 1), flat (1,1).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint file to write.")
def train(model, data, out, **options) -> None:
    """Train a model on a local dataset and write a checkpoint for 'build --weights'."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .render import console, train_summary
    from .train import train_to_checkpoint

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console(stderr=True))
    task = None

    def on_start(loaded, dataset):  # after loading: an error before it prints only itself
        nonlocal task
        bar.start()
        task = bar.add_task(f"training {loaded.name} on {dataset.name}", total=options["epochs"])

    def on_epoch(epoch, total, loss, accuracy):
        bar.update(task, advance=1, description=f"epoch {epoch}/{total} loss {loss:.3f} test acc {accuracy:.2%}")

    try:
        trained = train_to_checkpoint(model, data, out, on_epoch=on_epoch, on_start=on_start, **options)
    finally:
        bar.stop()
    train_summary(trained, options["epochs"], out)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", help="rpc://HOST:PORT or rpc://HOST:PORT/KEY; default: this machine, if the bundle is for it.")
@click.option("--repeat", default=100, show_default=True, type=click.IntRange(min=1), help="Timed runs.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="Untimed runs before timing.")
@click.option("--min-time", "min_time_s", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Time runs for at least this many seconds (more than --repeat for a fast model): a short "
                   "window samples one moment of a device, fast or slow; 0: exactly --repeat runs.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads on this machine (a remote device uses its own setting).")
@DEVICE_WAIT
@click.option("--json", "as_json", is_flag=True, help="Print the updated report.json.")
def bench(bundle, device, repeat, warmup, min_time_s, threads, device_wait, as_json) -> None:
    """Measure a build on a device and update its report.json."""
    from .bench import remeasure
    from .render import StageProgress, bench_summary

    with StageProgress() as progress:
        report = remeasure(bundle, device, repeat, warmup, threads, device_wait, progress, min_time_s)
    _json_out(report) if as_json else bench_summary(report)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(path_type=Path), help="An .npy file with one input.")
@click.option("--output", type=click.Path(path_type=Path), help="Write the output here (.npy).")
@click.option("--bench", type=click.IntRange(min=1), metavar="RUNS", help="Time RUNS inferences on the bundled sample input.")
@click.option("--verify", "verify_only", is_flag=True, help="Only verify the bundle.")
def run(bundle, input_path, output, bench, verify_only) -> None:
    """Verify a bundle, then run it on this machine (needs only numpy and the TVM runtime)."""
    from .runtime import execute

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
    from .runtime import install_archive

    result = install_archive(archive, destination)
    replaced = " (replacing the bundle that was there)" if result["replaced"] else ""
    click.echo(f"installed {result['model']} for {result['target']} at {result['path']}{replaced}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, help="ssh://[USER@]HOST[:PORT]:/PATH or rpc://HOST:PORT[/KEY].")
@click.option("--dest", help="Path on an rpc:// device; relative to the agent's home (default ~/compactdeploy/bundles/NAME).")
@click.option("--ssh-config", type=click.Path(path_type=Path), help="An ssh_config file (default: your own).")
@DEVICE_WAIT
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
    from .device.serve import serve_device

    serve_device(host, port, tracker, key, emulate_target, threads, say=lambda line: click.echo(line, err=True))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets(as_json: bool) -> None:
    """List the device targets."""
    from .render import targets_table
    from .targets import listing

    _json_out(listing()) if as_json else targets_table(listing())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the model zoo."""
    from .render import models_table
    from .zoo import listing

    _json_out(listing()) if as_json else models_table(listing())


@cli.command()
@click.option("--remove-stale", is_flag=True,
              help="Delete the tuning databases no build reads (another TVM version, or no identity).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache(remove_stale: bool, as_json: bool) -> None:
    """List the tuning databases and what else the cache holds."""
    from .render import cache_listing
    from .resources import cache_dir, cache_parts
    from .tune import remove_stale_databases, stored_databases

    databases = stored_databases()
    removed, in_use = remove_stale_databases(databases) if remove_stale else ([], [])
    databases = [entry for entry in databases if entry not in removed]
    if as_json:
        _json_out({
            "cache": str(cache_dir()), "tuning_databases": [entry.as_dict() for entry in databases],
            "removed": [str(entry.path) for entry in removed], "in_use": [str(entry.path) for entry in in_use],
            "other_bytes": cache_parts(),
        })
        return
    cache_listing(cache_dir(), databases, removed, in_use, cache_parts(), remove_stale)


def main(argv: list[str] | None = None) -> int:
    """Entry point: a CompactDeployError is one line on stderr and exit status 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    from .device.serve import ServeFailed

    previous = _sigterm_as_interrupt()
    try:
        cli.main(args=argv, prog_name="compactdeploy", standalone_mode=False)
    except (CompactDeployError, BundleError) as exc:
        if debug and not isinstance(exc, ServeFailed):
            raise
        click.echo(f"error: {exc}", err=True)
        return 1 if isinstance(exc, ServeFailed) else 2
    except (click.exceptions.Abort, KeyboardInterrupt):
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
    if threading.current_thread() is threading.main_thread():
        def interrupt(_signum, _frame):
            raise KeyboardInterrupt

        return signal.signal(signal.SIGTERM, interrupt)
    return None


if __name__ == "__main__":
    sys.exit(main())
