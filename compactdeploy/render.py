"""How the CLI shows things to a person: stage progress, and a report, a listing or a table in a
few lines (JSON stays what machines read: each command's --json, and report.json)."""

from __future__ import annotations


from .report import counted_sources, slower_than_onnxruntime_advice, tuning_note
from .units import format_size


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


class StageProgress:
    """Shows a spinner for the running stage and one line per finished stage (on stderr)."""

    def __init__(self):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console(stderr=True)
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


def build_summary(result) -> None:
    report = result.report
    out = console()
    model, target = report["model"], report["target"]
    out.print(f"[bold]{model['name']}[/] -> [bold]{target['name']}[/] ({target['arch']}, {target['device_code']})")

    def ratio(after, before):
        return f"{after:,} of {before:,} ({after / before:.0%})" if before else f"{after:,}"

    if model["weights"]["source"] == "random-init":
        out.print("  [yellow]weights    random (no --weights): sizes and speed are real, outputs are not useful[/]")
    out.print(f"  params     {ratio(model['params'], model['params_before'])}")
    out.print(f"  MACs       {ratio(model['macs'], model['macs_before'])}")
    narrowed = model["weights"].get("narrowed_by") or {}
    if narrowed.get("layers"):  # the checkpoint's own narrowing: the counts above start from it
        learned = ", ".join(f"{n}: {w['width']}->{w['kept']}" for n, w in narrowed["layers"].items() if w["kept"] != w["width"])
        out.print(f"  weights    narrowed by {narrowed['method']} in training" + (f": {learned}" if learned else ""))
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
        transfer = (tuning.get("transfer") or {}).get("kernels")
        if transfer:
            ran += (f"; {len(transfer)} kernels without records timed schedules tuned at other widths "
                    f"({tuning['transfer']['s']:.0f} s)")
        out.print(
            f"  tuning     {tuning['kernels_scheduled']}/{tuning['kernels_tunable']} kernels scheduled from "
            f"{tuning['database']}{ran}"
        )
    schedules = report["compile"].get("schedules")
    if schedules:
        out.print(f"  schedules  {schedule_sources(schedules)}")
    note = tuning_note(report)
    if note:
        out.print(f"             {note}")
    fit = report.get("fit")
    if fit:
        error = fit["predictor_error_pct"]
        predicted = f"; predictor error median {error['median']:.1f} %, worst {error['worst']:.1f} %" if error["count"] else ""
        out.print(
            f"  search     {fit['status']} ({fit['budget']['latency'] or ''} {fit['budget']['memory'] or ''}".rstrip()
            + f"): {len(fit['verified'])} models measured{predicted}; plots {', '.join(fit['plots'])}"
        )
        chosen = fit["chosen"]
        if chosen.get("trial_accuracy") is not None:
            repeats = chosen.get("trial_accuracies") or [chosen["trial_accuracy"]]
            trials = ("a trial fine-tune" if len(repeats) == 1 else
                      f"{len(repeats)} trial fine-tunes (mean; the best few were judged again)")
            out.print(f"             kept the model of {sum(repeats) / len(repeats):.1%} held-out accuracy after {trials}, "
                      f"of {sum(1 for c in fit['verified'] if c['trial_accuracy'] is not None)} measured and judged")
        final = fit["final"]
        for over in fit.get("final_builds_over") or []:
            out.print(f"             not kept: {', '.join(f'{g}={w}' for g, w in over['widths'].items())}, measured {over['searched_ms']:.3f} ms in the "
                      f"search, whose final build measured {over['final_ms']:.3f} ms, over the budget")
        if final.get("relative_ms") is not None:
            out.print(
                f"             beside the unpruned model this build runs at {final['relative_ms']:.3f} ms of the "
                f"search's scale (median of {len(final.get('relative_ms_sessions') or [1])} sessions; alone "
                f"{final['measured_ms']:.3f} ms, unpruned beside it {final['unpruned_beside_ms']:.3f} ms): "
                + ("within" if final["meets_latency_budget"] else "over") + f" the budget ({fit['budget']['latency_ms']:.3f} ms)"
            )
        if final["meets_latency_budget"] is False:
            out.print(
                f"  [yellow]note[/]       this build measured {final['judged_ms']:.3f} ms, over the budget "
                f"({fit['budget']['latency_ms']:.3f} ms) the search measured it within ({fit['chosen']['measured_ms']:.3f} ms): "
                "the device's timing moved (other load?); rebuild on an idle device, or give a lower budget"
                + (f" (the {len(fit['final_builds_over'])} models chosen before it measured over too)"
                   if fit.get("final_builds_over") else "")
            )
    measurement(out, report)
    for note in report["compile"]["notes"]:
        out.print(f"  [yellow]note[/]       {note}")
    files = ", ".join(sorted(result.manifest["files"]) + ["manifest.json", "SHA256SUMS"])
    out.print(f"  wrote      {result.out}/ ({files})")


def measurement(out, report) -> None:
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


def schedule_sources(schedules: dict[str, str]) -> str:
    """Where the kernels' schedules came from, counted: "9 kernels: 6 default rule, 3 tuned record"
    (which kernel each transferred schedule came from is in report.json)."""
    text = f"{len(schedules)} kernels: {counted_sources(schedules)}"
    if "unscheduled" in schedules.values():
        text += " (no default rule fits an unscheduled kernel: it is slow until tuned, --tune-trials)"
    return text


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def bench_summary(report) -> None:
    out = console()
    out.print(f"[bold]{report['model']['name']}[/] on [bold]{report['target']['name']}[/]")
    measurement(out, report)
    out.print(f"  parity     onnxruntime on this host vs TVM on the device: {report['parity']['onnx_vs_tvm_max_abs']:.1e}")


def prune_summary(summary, prune: str, out_path) -> None:
    out = console()
    params = summary["params"]
    out.print(f"[bold]{summary['model']}[/] pruned with {prune}: params {params['after']:,} of {params['before']:,}")
    for name, group in summary["prune"]["groups"].items():
        out.print(f"  {name:<24} {group['before']:>5} -> {group['after']:<5} {group['method']}")
    if summary["accuracy"]:
        acc = summary["accuracy"]
        out.print(f"  accuracy   {acc['before']:.2%} -> {acc['after_pruning']:.2%} pruned -> {acc['after']:.2%}")
    out.print(f"  wrote      {out_path} (build --weights {out_path} replays the pruning)")


def train_summary(trained, epochs: int, out_path) -> None:
    """``trained``: a ``train.TrainedCheckpoint``."""
    out = console()
    learned = trained.learned
    if learned is not None and learned["method"] == "sparse":
        out.print(f"  kept {learned['weights_kept']:,} of {learned['weights']:,} weights ({learned['sparsity']:.1%} sparse)")
    elif learned is not None:
        for name, layer in learned["layers"].items():
            linear = " (learnt linear: ReLU removed)" if layer.get("linear") else ""
            out.print(f"  {name:<20} {layer['width']:>5} -> {layer['kept']:<5}{linear}")
        for first, second in trained.merged:
            out.print(f"  {first} merged into {second} (a linear layer folded into the next)")
        for name, why in learned["not_gated"].items():
            out.print(f"  {name:<20} not gated: {why}")
    if trained.result.stopped:
        console(stderr=True).print(f"warning: {trained.result.stopped}")
    out.print(
        f"{trained.model.name} on {trained.data.name}: test accuracy {trained.result.test_accuracy:.2%} after {epochs} "
        f"epochs ({len(trained.data.y_test)} test samples); wrote {out_path}"
    )


def targets_table(rows: list[dict]) -> None:
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
    console().print(table)


def models_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table("model", "input", "data", "options (--model-arg)", "description")
    table.columns[0].no_wrap = True
    for row in rows:
        options = ", ".join(f"{k}={v}" for k, v in row["args"].items())
        table.add_row(row["name"], "x".join(map(str, row["input_shape"])), row["default_data"] or "", options, row["description"])
    console().print(table)


def cache_listing(root, databases, removed, in_use, others: dict[str, int], removing: bool) -> None:
    """The tuning databases (``tune.StoredDatabase``), what --remove-stale did, and the cache's other parts."""
    import time

    from rich.markup import escape

    out = console()
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
    if stale and not removing:  # after --remove-stale, the ones left were named above
        out.print(f"{stale} no build reads: `compactdeploy cache --remove-stale` deletes them")
    for name, size in others.items():
        out.print(f"{name}: {format_size(size)}")
