"""Width search vs uniform vs FLOPs-targeted pruning at equal measured latency, on this host.

For each model (trained here on a local dataset) and each latency budget (a share of the unpruned
model's latency measured on this host), three ways to choose widths, all pruned by the same method
and fine-tuned the same number of epochs:
- loop:    `build --latency-budget` (the measured latency table, allocation, verify-and-correct; the
           models it weighs judged by a trial fine-tune scored on held-out training data);
- uniform: one ratio for every group, the smallest ratio whose build measures within the budget;
- flops:   the same greedy allocation and importance as the loop, but paying in MACs instead of
           measured milliseconds; the largest model on that trajectory measuring within the budget.
Every latency is a whole-model median measured on this host, of the model compiled as it ships
(default schedules: the benchmark's own cache holds no tuning records). Every model a search
predicted and measured, and each strategy's pick, is then timed in RETIME_SESSIONS sessions of its
own, in rounds over all of them (minutes apart): the predictor is judged against their median, and
the strategies' latencies are compared in it. Writes
docs/benchmarks/fit-benchmark.{md,json,png}; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from statistics import mean, stdev
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DOCS, meta, plot_accuracy_at_latency, write_json  # noqa: E402

# label -> (zoo model, its options, dataset)
MODELS = {
    "resnet20": ("resnet20", {}, "digits"),
    "mobilenetv2": ("mobilenetv2", {"input_size": 32}, "digits"),
    # an MLP wide enough that its time is more than the runtime's fixed cost per call
    "mlp-mnist1d": ("lenet300", {"in_features": 40, "hidden1": 1024, "hidden2": 512}, "mnist1d"),
}


MEASURING = re.compile(r": measure( in turns with the unpruned model)?$")  # fit.measure's say(), timing starts


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Progress:
    def started(self, stage):
        pass

    def progress(self, stage, message):
        # the search's decisions (what it picks, judges and measures) and when a candidate's timing
        # starts (tools/loop_time_shares.py splits the build host's part from the device's), not each step's chatter
        if stage == "fit" and message.startswith(("allocating: the", "allocating: a", "judging")) \
                or stage == "fit" and (": measured " in message or MEASURING.search(message)):
            log(f"    {message}")

    def finished(self, stage, seconds, summary):
        if stage in ("fit", "benchmark"):
            log(f"  {stage}: {summary}")


def main() -> None:
    from compactdeploy.config import FitConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default="60,40", help="percent of the unpruned model's measured latency")
    parser.add_argument("--method", default="l1")
    parser.add_argument("--train-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=5,
                        help="fine-tunings of every chosen model, seeds 0..N-1: the noise of repeated runs "
                             "(one fine-tune moves digits' 359-sample test accuracy by a point)")
    parser.add_argument("--fit-trial-epochs", type=int, default=FitConfig().fit_trial_epochs,
                        help="the loop's trial fine-tunes, at most (build --fit-trial-epochs)")
    parser.add_argument("--name", default="fit-benchmark",
                        help="docs/benchmarks/NAME.{md,json,png}: another name for a run of some models")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compactdeploy-bench-fit")
    args = parser.parse_args()
    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    # its own cache: no tuning records from other work (the figures are untuned TVM), the latency
    # table and searches kept for a rerun
    os.environ.setdefault("COMPACTDEPLOY_CACHE", str(args.work / "cache"))
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, *MODELS[name], [float(b) / 100 for b in args.budgets.split(",")], args)
        write_all(rows, args, time.time() - start)  # after each model: a long run keeps what it finished


def bench_model(name: str, model: str, model_args: dict, data: str, budgets: list[float], args) -> list[dict]:
    from compactdeploy.fit.allocate import Trajectory, importance_curves, width_space
    from compactdeploy.config import BuildConfig, FitConfig, MeasureConfig, ModelConfig, PruneConfig
    from compactdeploy.errors import CompactDeployError
    from compactdeploy.pipeline import build
    from compactdeploy.prepare import load
    from compactdeploy.prune.core import kept_width
    from compactdeploy.targets import load_target
    from compactdeploy.train import train_to_checkpoint

    target = load_target("host")
    weights = args.work / f"{name}.pt"
    if not weights.exists():
        log(f"{name}: training {args.train_epochs} epochs on {data}")
        train_to_checkpoint(model, data, weights, args.train_epochs, model_args=model_args)
    base = BuildConfig(ModelConfig(model, model_args=model_args, weights=weights, data=data), target="host",
                       out=args.work / "x", measure=MeasureConfig(repeat=args.repeat))
    loaded = load(base.model)
    space = width_space(loaded.model.module, loaded.example, (), target.channel_multiple, 8)
    measured: dict[str, dict] = {}

    def measure(widths: dict[str, int]) -> dict:
        """Build (no fine-tuning) and measure on this host, in turns with the unpruned model as the
        loop measures its candidates: the quiet ratio times the unpruned model's own median. One build per
        distinct set of widths."""
        key = json.dumps(widths, sort_keys=True)
        if key not in measured:
            changed = space.narrowed(widths)
            out = args.work / f"{name}-{len(measured)}"
            config = replace(base, out=out, prune=PruneConfig(prune=args.method if changed else None, widths=changed))
            report = build(config, Progress()).report
            ms = report["latency_ms"]["median"]
            if changed:
                ms = beside_unpruned(out) * measured_unpruned_ms[0]
            else:
                measured_unpruned_ms.append(ms)
            measured[key] = {"ms": ms, "alone_ms": report["latency_ms"]["median"], "macs": report["model"]["macs"],
                             "params": report["model"]["params"], "widths": widths, "out": out}
        return measured[key]

    measured_unpruned_ms: list[float] = []
    unpruned_quiet_ms: list[float] = []  # the unpruned model's quiet time in every session beside another

    def beside_unpruned(out: Path) -> float:
        ratio, reference_ms = ratio_to_reference(out, args.work / f"{name}-0", args.repeat)
        unpruned_quiet_ms.append(reference_ms)
        return ratio

    def finetuned_accuracy(widths: dict[str, int], seed: int = 0) -> float:
        from compactdeploy.pipeline import prune_and_finetune

        changed = space.narrowed(widths)
        config = replace(base, model=replace(base.model, seed=seed),
                         prune=PruneConfig(prune=args.method if changed else None, widths=changed,
                                                 finetune_epochs=args.finetune_epochs if changed else 0))
        return prune_and_finetune(config, Progress()).accuracies[2]

    log(f"{name}: unpruned")
    unpruned = measure(dict(space.full))
    curves = importance_curves(loaded.model.module, loaded.example, args.method, loaded.calibration, ())
    by_macs = Trajectory(space, curves, lambda ws: [float(space.macs(w)) for w in ws])
    by_macs.start()
    while by_macs.extend():
        pass
    uniform = [{g: kept_width(w, ratio / 100, target.channel_multiple) for g, w in space.full.items()}
               for ratio in range(5, 100, 5)]

    def largest_within(candidates: list[dict], budget_ms: float) -> dict | None:
        """Bisection over models ordered largest first: the first whose measured latency fits."""
        low, high, found = 0, len(candidates) - 1, None
        while low <= high:
            middle = (low + high) // 2
            result = measure(candidates[middle])
            if result["ms"] <= budget_ms:
                found, high = result, middle - 1
            else:
                low = middle + 1
        return found

    rows = []
    for share in budgets:
        budget_ms = share * unpruned["ms"]
        log(f"{name}: budget {share:.0%} = {budget_ms:.3f} ms")
        fit_out = args.work / f"{name}-fit-{int(share * 100)}"
        started = time.time()
        try:
            fit_report = build(replace(base, out=fit_out, prune=PruneConfig(prune=args.method, finetune_epochs=args.finetune_epochs),
                                       fit=FitConfig(latency_budget=f"{share * 100:g}%", resume=True,
                                                     fit_trial_epochs=args.fit_trial_epochs)), Progress()).report
        except CompactDeployError as exc:  # below the smallest model the search can make: the row says so
            log(f"  loop: {exc}")
            rows.append(_row(name, share, budget_ms, "loop", None, None, None, None, None, builds=None,
                             build_s=round(time.time() - started, 1)))
            rows[-1]["refused"] = str(exc)
        else:
            fit = fit_report["fit"]
            # the search judged "60%" against its own first measurement of the unpruned model: its
            # figures, relative to that, on this benchmark's scale
            scale = unpruned["ms"] / fit["verified"][0]["measured_ms"]
            final = fit["final"]["judged_ms"]
            # timed again where it was kept near the budget: the mean of the two
            chosen_ms = fit["chosen"].get("confirmed_ms") or fit["chosen"]["measured_ms"]
            rows.append(_row(name, share, budget_ms, "loop", fit["chosen"]["widths"], chosen_ms * scale,
                             fit_report["model"]["macs"], fit_report["model"]["params"], fit_report["accuracy"]["after"],
                             builds=len(fit["verified"]), predictor=fit["predictor_error_pct"],
                             verified=[(c["predicted_ms"], c["measured_ms"]) for c in fit["verified"] if c["predicted_ms"]],
                             final_ms=final * scale, build_s=round(time.time() - started, 1),
                             schedules=fit["chosen"]["schedules"]))
            # the models the search measured after predicting them, as ratios to its unpruned model
            rows[-1]["predicted_models"] = [
                {"widths": c["widths"], "predicted_ratio": c["predicted_ms"] / fit["verified"][0]["measured_ms"],
                 "search_ratio": c["measured_ms"] / fit["verified"][0]["measured_ms"]}
                for c in fit["verified"] if c["predicted_ms"] and not c.get("grown")]
            rows[-1]["trial_accuracy"] = fit["chosen"].get("trial_accuracy")
            rows[-1]["trial_accuracies"] = fit["chosen"].get("trial_accuracies")
            rows[-1]["judged_by"] = fit.get("judged_by")
        rows[-1]["data"] = data
        for label, candidates in (("uniform", uniform), ("flops", [p.widths for p in by_macs.points])):
            before = len(measured)
            chosen = largest_within(candidates, budget_ms)
            if chosen is None:
                rows.append(_row(name, share, budget_ms, label, None, None, None, None, None, builds=len(measured) - before))
                continue
            rows.append(_row(name, share, budget_ms, label, chosen["widths"], chosen["ms"], chosen["macs"], chosen["params"],
                             finetuned_accuracy(chosen["widths"]), builds=len(measured) - before))
            rows[-1]["data"] = data
        for row in rows[-3:]:
            if row["widths"] is not None:  # the same widths fine-tuned again with other seeds
                row["accuracy_seeds"] = [row["accuracy"]] + [finetuned_accuracy(row["widths"], seed)
                                                             for seed in range(1, args.seeds)]
            log(f"  {row['strategy']:<8} {row['measured_ms']} ms, accuracy {row.get('accuracy_seeds', row['accuracy'])}")
    # the predictor judged against more than one timing, and the strategies compared at latencies timed
    # more than once: every model the searches predicted, and each strategy's pick, timed beside the
    # unpruned model in RETIME_SESSIONS sessions of its own, in rounds over all of them, so one model's
    # sessions are minutes apart (the host's slow or fast spells last minutes: sessions in a row share them)
    to_time = {json.dumps(w, sort_keys=True): w for w in
               [m["widths"] for row in rows for m in row.get("predicted_models") or []]
               + [row["widths"] for row in rows if row["widths"] is not None]}
    sessions: dict[str, list[float]] = {key: [] for key in to_time}
    for done in range(RETIME_SESSIONS):
        for index, (key, widths) in enumerate(to_time.items()):
            log(f"{name}: re-timing, round {done + 1} of {RETIME_SESSIONS}: model {index + 1} of {len(to_time)}")
            if done == 0:  # a model the bisection measured keeps that session; the rest are built here
                sessions[key].append(measure(widths)["ms"] / measured_unpruned_ms[0])
            else:
                sessions[key].append(beside_unpruned(measured[key]["out"]))
    for row in rows:
        for model in row.get("predicted_models") or []:
            model["retimed_ratios"] = sessions[json.dumps(model["widths"], sort_keys=True)]
        if row["widths"] is not None:
            row["retimed_ratios"] = sessions[json.dumps(row["widths"], sort_keys=True)]
            row["retimed_ms"] = float(np.median(row["retimed_ratios"])) * unpruned["ms"]
    # every figure so far is a ratio to the unpruned model times its one build's median, which a
    # minute on one core doubles (and with it every budget in ms): put them on the median of its
    # quiet times beside every model instead, sessions minutes apart (the ratios are unchanged)
    scale_ms = float(np.median(unpruned_quiet_ms)) if unpruned_quiet_ms else unpruned["ms"]
    for row in rows:
        for field in ("budget_ms", "measured_ms", "final_build_ms", "retimed_ms"):
            if row.get(field) is not None:
                row[field] *= scale_ms / unpruned["ms"]
        row["unpruned_ms"], row["unpruned_build_ms"] = scale_ms, unpruned["ms"]
        row["unpruned_accuracy"] = None
    return rows


RETIME_SESSIONS = 3  # the final build is judged by as many (fit.report.FINAL_SESSIONS)
_quiet_timers: dict[Path, object] = {}  # per reference: bench.QuietTimer, its quietest window yet


def ratio_to_reference(bundle: Path, reference: Path, repeat: int) -> tuple[float, float]:
    """The bundle's quiet time over the reference bundle's (``bench.quiet_times``), the two timed in
    turns on this host (a fresh device agent), a second of runs each at least, and again where the
    host was busy through the window, as the search times its candidates (``bench.time_quietly``);
    and the reference's quiet time (ms)."""
    from compactdeploy.bench import QuietTimer, measure, quiet_times
    from compactdeploy.device import connect, local_agent

    agent = local_agent()
    try:
        def window():
            session = connect(agent.address)
            return measure(session, bundle / "model.so", np.load(bundle / "sample_input.npy"),
                           arch=session.fingerprint["machine"], repeat=repeat, min_timed_ms=1000.0,
                           reference=reference / "model.so")

        timed = _quiet_timers.setdefault(reference, QuietTimer()).time(window, log)
    finally:
        agent.stop()
    model_ms, reference_ms = quiet_times(timed)
    return model_ms / reference_ms, reference_ms


def _row(model, share, budget_ms, strategy, widths, ms, macs, params, accuracy, builds, predictor=None, verified=None,
         final_ms=None, build_s=None, schedules=None):
    return {"model": model, "budget_share": share, "budget_ms": budget_ms, "strategy": strategy, "widths": widths,
            "measured_ms": ms, "macs": macs, "params": params, "accuracy": accuracy, "builds_measured": builds,
            "predictor_error_pct": predictor, "verified": verified, "final_build_ms": final_ms, "build_s": build_s,
            "schedules": schedules}


def write_all(rows: list[dict], args, seconds: float) -> None:
    from compactdeploy.bench.session import QUIET_PERCENTILE
    from compactdeploy.config import FitConfig
    from compactdeploy.fit.judge import trial_epochs

    info = meta("bench_fit.py", seconds, method=args.method, train_epochs=args.train_epochs,
                finetune_epochs=args.finetune_epochs, repeat=args.repeat, seeds=args.seeds,
                data={name: MODELS[name][2] for name in args.models.split(",")},
                latency="the quiet ratio to the unpruned model times the median of its quiet times beside every model "
                        "(unpruned_build_ms: its one build's median), on this host (measured), compiled as builds ship: "
                        "default schedules, no tuning records")
    write_json(args.name, info, rows)
    lines = [
        "# Width search vs uniform vs FLOPs-targeted pruning, at equal measured latency",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}` ({info['seconds']} s). Models trained here "
        f"({args.train_epochs} epochs; data: {', '.join(f'{m} on {d}' for m, d in info['data'].items())}), pruned by "
        f"`{args.method}`, fine-tuned {args.finetune_epochs} epochs; latency is measured whole, {args.repeat} "
        "runs at least, over one second at least (the default `--min-time`), on this host, timed in turns with "
        f"the unpruned model and given as the ratio of the two's quiet times (percentile {QUIET_PERCENTILE} of their "
        "chunks' medians; timed again where the host was busy through the window) times the median of the unpruned model's "
        "quiet times in every such session (one build's median doubles in a minute on one core), as the "
        "loop measures (real measurements, not emulated) of each model compiled as a build ships it: TVM's "
        "default schedules, no tuning records. The loop's row is the model the search chose, as it measured it; "
        "its final build, fine-tuned and measured again by the build's own benchmark, is the last column, with the "
        "loop's wall time (`build_s` in the JSON). The loop judges the models it weighs (its measured-cost, MACs-paced "
        "and uniform picks, and every model it measured within the budget) by a trial fine-tune of "
        f"{trial_epochs(FitConfig(fit_trial_epochs=args.fit_trial_epochs), args.finetune_epochs)} epochs on 80 % of the training split, scored on the other 20 % (never the test "
        "split): training the baselines do not spend.",
        "",
        f"| model | budget | strategy | measured latency | median of {RETIME_SESSIONS} sessions | MACs | params | "
        f"accuracy after fine-tuning (seed 0) | mean over {args.seeds} seeds (min-max) | builds measured | final build |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['measured_ms']:.3g} ms" if r["measured_ms"] is not None else "none within budget"
        acc = f"{r['accuracy']:.2%}" if r["accuracy"] is not None else "-"
        macs = f"{r['macs']:,}" if r["macs"] else "-"
        params = f"{r['params']:,}" if r["params"] else "-"
        final = "-"
        if r.get("final_build_ms") is not None:
            final = f"{r['final_build_ms']:.3g} ms, " + ("within" if r["final_build_ms"] <= r["budget_ms"] else "OVER")
        builds = r["builds_measured"] if r["builds_measured"] is not None else "-"
        seeds = r.get("accuracy_seeds")
        spread = f"{mean(seeds):.2%} ({min(seeds):.2%}-{max(seeds):.2%})" if seeds else "-"
        retimed = "-"
        if r.get("retimed_ms") is not None:
            retimed = f"{r['retimed_ms']:.3g} ms, " + ("within" if r["retimed_ms"] <= r["budget_ms"] else "OVER")
        lines.append(f"| {r['model']} | {r['budget_share']:.0%} = {r['budget_ms']:.3g} ms | {r['strategy']} | {ms} | "
                     f"{retimed} | {macs} | {params} | {acc} | {spread} | {builds} | {final} |")
    refused = [r for r in rows if r.get("refused")]
    if refused:
        lines += [""] + [f"The loop at {r['model']} {r['budget_share']:.0%}: {r['refused']}" for r in refused]
    lines += ["", f"Measured latency: the one timing each strategy chose by (the search's, or the bisection's); the "
                  f"median of {RETIME_SESSIONS} sessions: the same model timed again in rounds over every model of the "
                  "run, minutes apart, each beside the unpruned model (for uniform and flops, the first session is the "
                  "bisection's timing)."]
    lines += ["", "Builds measured: for uniform and flops, the builds this budget's bisection added; for the loop, every "
                  "model in the search's state (the searches of one model share it, so a later budget counts the "
                  "earlier one's models). Accuracy is on each dataset's fixed 20 % test split (digits: 359 samples)."]
    lines += ["", f"The loop against the others, in the mean over {args.seeds} fine-tunings (seeds 0-{args.seeds - 1}) "
                  "of the same widths; the noise of repeated runs is the larger of the two strategies' standard deviations "
                  "over seeds:", ""]
    for model, share in dict.fromkeys((r["model"], r["budget_share"]) for r in rows):
        by = {r["strategy"]: r for r in rows if (r["model"], r["budget_share"]) == (model, share)}
        loop = by.get("loop", {}).get("accuracy_seeds")
        for other in ("flops", "uniform"):
            theirs = by.get(other, {}).get("accuracy_seeds")
            if loop and theirs:
                noise = max(stdev(loop), stdev(theirs)) if len(loop) > 1 else 0.0
                latency = ""
                if by["loop"].get("retimed_ms") and by[other].get("retimed_ms"):
                    latency = (f"; latency in {RETIME_SESSIONS} sessions {by['loop']['retimed_ms']:.3g} against "
                               f"{by[other]['retimed_ms']:.3g} ms ({by[other]['retimed_ms'] / by['loop']['retimed_ms']:.2f}x)")
                lines.append(f"- {model} at {share:.0%}: loop - {other} = {(mean(loop) - mean(theirs)) * 100:+.2f} points "
                             f"(noise {noise * 100:.2f}){latency}")
    # the searches of one model share their state: a model a later budget replays is counted once
    verified = {(p, m) for r in rows if r["verified"] for p, m in r["verified"]}
    errors = [abs(p - m) / m * 100 for p, m in verified]
    if errors:
        lines += ["", f"Latency-table predictor against whole-model measurements (every model the loop built after a "
                      f"prediction, {len(errors)} models): median error {np.median(errors):.1f} %, worst {max(errors):.1f} %."]
    retimed = {json.dumps(m["widths"], sort_keys=True): m for r in rows for m in r.get("predicted_models") or []
               if m.get("retimed_ratios")}
    if retimed:
        def spread(pairs):
            errors = [abs(a - b) / b * 100 for a, b in pairs]
            return f"median {np.median(errors):.1f} %, worst {max(errors):.1f} %"

        sessions = len(next(iter(retimed.values()))["retimed_ratios"])
        truth = {k: float(np.median(m["retimed_ratios"])) for k, m in retimed.items()}
        lines += ["", f"The same {len(retimed)} models built again by this benchmark and timed in {sessions} sessions of "
                      "their own, in rounds over every model of the run (a model's sessions minutes apart), each beside "
                      "the unpruned model (a fresh device agent each; the figure is the median of the sessions' ratios to "
                      "the unpruned model, as the final build is judged):", "",
                  f"- the predictor against the median of {sessions} sessions: "
                  + spread([(m["predicted_ratio"], truth[k]) for k, m in retimed.items()]),
                  f"- the search's one timing against the median of {sessions} sessions (the noise of one timing): "
                  + spread([(m["search_ratio"], truth[k]) for k, m in retimed.items()]),
                  f"- the {sessions} sessions' spread, the slowest over the fastest of each model: "
                  + spread([(max(m["retimed_ratios"]), min(m["retimed_ratios"])) for m in retimed.values()])]
    (DOCS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot_results(rows, args.seeds, args.name)


def plot_results(rows: list[dict], seeds: int, name: str) -> None:
    """docs/benchmarks/NAME.png: each strategy's mean accuracy over the seeds at its latency in
    RETIME_SESSIONS sessions (the figures the comparison is made in), where the row has them."""
    plotted = [dict(r, measured_ms=r.get("retimed_ms") or r["measured_ms"],
                    accuracy=mean(r["accuracy_seeds"]) if r.get("accuracy_seeds") else r["accuracy"]) for r in rows]
    plot_accuracy_at_latency(plotted, {"loop": "o", "uniform": "s", "flops": "^"},
                             f"test accuracy after fine-tuning, mean of {seeds} seeds, %", name)


if __name__ == "__main__":
    main()
