"""Growing a narrow model into a latency budget (--allow-grow) vs keeping it, vs growing every group alike.

For each narrow model (trained here on digits) and each budget (a share above its own latency
measured on this host), all given the same extra training epochs:
- keep:    the trained model, trained that many more epochs at its width (the budget unused);
- grow:    `build --latency-budget --allow-grow` (widened where the measured table says width is
           cheapest, Net2WiderNet copies, then fine-tuned);
- uniform: every growable group widened by the same factor, the largest whose build measures
           within the budget (bisection), then fine-tuned the same way.
Every latency is a whole-model median measured on this host (TVM, no tuning records); accuracies
are on digits' fixed 20 % test split. Writes docs/benchmarks/grow-benchmark.{md,json,png}; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit import Progress, log  # noqa: E402
from benchlib import DOCS, meta, plot_accuracy_at_latency, write_json  # noqa: E402

MODELS = {
    "resnet20": {"width": 4},
    "mobilenetv2": {"input_size": 32, "width_mult": 0.25},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default="150,200", help="percent of the narrow model's measured latency")
    parser.add_argument("--train-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compactdeploy-bench-grow")
    args = parser.parse_args()
    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("COMPACTDEPLOY_CACHE", str(args.work / "cache"))  # untuned: no records from other work
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, MODELS[name], [float(b) / 100 for b in args.budgets.split(",")], args)
        write_all(rows, args, time.time() - start)


def bench_model(name: str, model_args: dict, budgets: list[float], args) -> list[dict]:
    from compactdeploy.fit.allocate import width_space
    from compactdeploy.config import BuildConfig, FitConfig, MeasureConfig, ModelConfig, PruneConfig
    from compactdeploy.pipeline import build, prune_and_finetune
    from compactdeploy.prepare import load
    from compactdeploy.targets import load_target
    from compactdeploy.train import train, train_to_checkpoint

    target = load_target("host")
    weights = args.work / f"{name}.pt"
    if not weights.exists():
        log(f"{name}: training {args.train_epochs} epochs on digits")
        train_to_checkpoint(name, "digits", weights, args.train_epochs, model_args=model_args)
    base = BuildConfig(ModelConfig(name, model_args=model_args, weights=weights, data="digits"), target="host",
                       out=args.work / "x", measure=MeasureConfig(repeat=args.repeat), prune=PruneConfig(prune="l1"))
    loaded = load(base.model)
    space = width_space(loaded.model.module, loaded.example, (), target.channel_multiple, 8, grow=True)
    measured: dict[str, dict] = {}

    def measure(widths: dict[str, int]) -> dict:
        key = json.dumps(widths, sort_keys=True)
        if key not in measured:
            changed = space.narrowed(widths)
            config = replace(base, out=args.work / f"{name}-{len(measured)}", prune=PruneConfig(
                prune="l1" if changed else None, widths=changed, allow_grow=bool(changed)))
            report = build(config, Progress()).report
            measured[key] = {"ms": report["latency_ms"]["median"], "params": report["model"]["params"],
                             "macs": report["model"]["macs"], "widths": widths}
        return measured[key]

    def grown_accuracy(widths: dict[str, int]) -> float:
        config = replace(base, prune=PruneConfig(prune="l1", widths=space.narrowed(widths), allow_grow=True,
                                                 finetune_epochs=args.finetune_epochs))
        return prune_and_finetune(config, Progress()).accuracies[2]

    log(f"{name}: the narrow model as trained")
    narrow = measure(dict(space.full))
    keep_model = load(base.model)
    keep_accuracy = train(keep_model.model, keep_model.data, args.finetune_epochs, seed=base.model.seed).test_accuracy
    factors = [1 + k / 8 for k in range(1, 9)]  # up to the growth limit, 2x

    def uniform(factor: float) -> dict[str, int]:
        return {g: max([w for w in space.wider.get(g, []) if w <= factor * space.full[g]], default=space.full[g])
                for g in space.full}

    rows = []
    for share in budgets:
        budget_ms = share * narrow["ms"]
        log(f"{name}: budget {share:.0%} = {budget_ms:.3f} ms")
        rows.append(_row(name, share, budget_ms, "keep", narrow, keep_accuracy, builds=0))
        report = build(replace(base, out=args.work / f"{name}-grow-{int(share * 100)}",
                               prune=PruneConfig(prune="l1", allow_grow=True, finetune_epochs=args.finetune_epochs),
                               fit=FitConfig(latency_budget=f"{budget_ms:.6f}ms", resume=True)), Progress()).report
        fit = report["fit"]
        chosen = {"ms": fit["chosen"]["measured_ms"], "params": report["model"]["params"], "macs": report["model"]["macs"],
                  "widths": fit["chosen"]["widths"]}
        rows.append(_row(name, share, budget_ms, "grow", chosen, report["accuracy"]["after"], builds=len(fit["verified"]),
                         status=fit["status"]))
        before, found = len(measured), None
        low, high = 0, len(factors) - 1
        while low <= high:  # the largest uniform factor measuring within the budget
            middle = (low + high) // 2
            result = measure(uniform(factors[middle]))
            if result["ms"] <= budget_ms:
                found, low = result, middle + 1
            else:
                high = middle - 1
        if found is None or found["widths"] == space.full:
            rows.append(_row(name, share, budget_ms, "uniform", found or narrow, keep_accuracy if found else None,
                             builds=len(measured) - before, status="no uniform growth fits"))
        else:
            rows.append(_row(name, share, budget_ms, "uniform", found, grown_accuracy(found["widths"]),
                             builds=len(measured) - before))
        for row in rows[-3:]:
            log(f"  {row['strategy']:<8} {row['measured_ms']:.3f} ms, {row['params']:,} params, accuracy {row['accuracy']}")
    for row in rows:
        row["narrow_ms"], row["narrow_widths"] = narrow["ms"], dict(space.full)
    return rows


def _row(model, share, budget_ms, strategy, result, accuracy, builds, status=None):
    return {"model": model, "budget_share": share, "budget_ms": budget_ms, "strategy": strategy,
            "widths": result["widths"], "measured_ms": result["ms"], "params": result["params"], "macs": result["macs"],
            "accuracy": accuracy, "builds_measured": builds, "status": status}


def write_all(rows: list[dict], args, seconds: float) -> None:
    info = meta("bench_grow.py", seconds, train_epochs=args.train_epochs, finetune_epochs=args.finetune_epochs,
                repeat=args.repeat, models={m: MODELS[m] for m in args.models.split(",")},
                data="digits (8x8, resized to the model input)",
                latency="whole-model median on this host (measured), TVM without tuning records")
    write_json("grow-benchmark", info, rows)
    lines = [
        "# Growing a narrow model into a latency budget (`--allow-grow`)",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}` ({info['seconds']} s). Narrow models "
        f"({', '.join(f'{m} {a}' for m, a in info['models'].items())}) trained here on digits ({args.train_epochs} "
        f"epochs); each strategy then trains {args.finetune_epochs} more epochs. Latency is the whole-model median of "
        f"{args.repeat} runs on this host (real measurements, not emulated), TVM untuned.",
        "",
        "| model | budget | strategy | measured latency | MACs | params | accuracy | builds measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['accuracy']:.2%}" if r["accuracy"] is not None else "-"
        lines.append(f"| {r['model']} | {r['budget_share']:.0%} = {r['budget_ms']:.3f} ms | {r['strategy']} | "
                     f"{r['measured_ms']:.3f} ms | {r['macs']:,} | {r['params']:,} | {acc} | {r['builds_measured']} |")
    lines += ["", "keep: the narrow model trained the same extra epochs (its latency is the narrow model's). grow: the "
                  "search's choice (status in the JSON). uniform: the largest common growth factor (1.125 to 2.0) "
                  "measuring within the budget. Accuracy is on the fixed 20 % test split of digits (359 samples)."]
    (DOCS / "grow-benchmark.md").write_text("\n".join(lines) + "\n")
    plot_accuracy_at_latency(rows, {"keep": "s", "grow": "o", "uniform": "^"}, "test accuracy after the extra epochs, %", "grow-benchmark")


if __name__ == "__main__":
    main()
