"""How well the width search's trial fine-tunes rank models against the fine-tune the build gives them:
the ResNet-20 models docs/benchmarks/fit-benchmark.json compared (the loop's, uniform pruning's and
FLOPs-targeted pruning's, at each budget), each trial-fine-tuned for 2, 3 and 4 epochs with several
seeds on 80 % of the training split and scored on the rest, as the search's judge does, beside the
mean test accuracy the benchmark measured after each model's full fine-tunes (3 seeds). Writes
docs/benchmarks/trial-judge.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DOCS, meta, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="2,3,4", help="trial fine-tune lengths to compare")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compactdeploy-bench-trial-judge")
    args = parser.parse_args()
    from compactdeploy.config import ModelConfig
    from compactdeploy.fit.allocate import width_space
    from compactdeploy.fit.judge import HELD_OUT, TrialJudge, held_out_split
    from compactdeploy.prepare import load
    from compactdeploy.targets import load_target
    from compactdeploy.train import train_to_checkpoint

    start = time.time()
    benchmark = json.loads((DOCS / "fit-benchmark.json").read_text())
    compared = [r for r in benchmark["rows"] if r["model"] == "resnet20"]
    args.work.mkdir(parents=True, exist_ok=True)
    weights = args.work / "resnet20.pt"
    if not weights.exists():  # as bench_fit trains it
        train_to_checkpoint("resnet20", benchmark["meta"]["data"]["resnet20"], weights, benchmark["meta"]["train_epochs"])
    loaded = load(ModelConfig("resnet20", weights=weights, data=benchmark["meta"]["data"]["resnet20"]))
    target = load_target("host")
    space = width_space(loaded.model.module, loaded.example, (), target.channel_multiple, 8)
    split = held_out_split(loaded.data)
    lengths = [int(e) for e in args.epochs.split(",")]
    rows = []
    for row in compared:
        entry = {"budget_share": row["budget_share"], "strategy": row["strategy"], "widths": row["widths"],
                 "finetuned": row["accuracy_seeds"], "finetuned_mean": float(np.mean(row["accuracy_seeds"]))}
        for epochs in lengths:
            judge = TrialJudge(loaded, benchmark["meta"]["method"], target.channel_multiple, (), epochs, 0, {}, split)
            scores = [judge.accuracy(row["widths"], space.full, seed) for seed in range(args.seeds)]
            entry[f"trial_{epochs}"] = scores
            entry[f"trial_{epochs}_mean"] = float(np.mean(scores))
        print(json.dumps({k: v for k, v in entry.items() if k != "widths"}), file=sys.stderr, flush=True)
        rows.append(entry)

    def best(budget: float, key: str) -> str:
        return max((r for r in rows if r["budget_share"] == budget), key=lambda r: r[key])["strategy"]

    budgets = sorted({r["budget_share"] for r in rows}, reverse=True)
    agreement = {str(b): {"finetuned_best": best(b, "finetuned_mean"),
                          **{f"trial_{e}_best": best(b, f"trial_{e}_mean") for e in lengths}} for b in budgets}
    finetune_epochs = benchmark["meta"]["finetune_epochs"]
    info = meta("bench_trial_judge.py", time.time() - start, model="resnet20", seeds=args.seeds,
                finetune_epochs=finetune_epochs, held_out=HELD_OUT,
                finetuned_from="docs/benchmarks/fit-benchmark.json (" + benchmark["meta"]["measured_on"] + ")",
                weights=f"trained here {benchmark['meta']['train_epochs']} epochs, as bench_fit trains them")
    write_json("trial-judge", info, rows, best=agreement)
    lines = [
        "# Trial fine-tunes against the build's fine-tune",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}`. ResNet-20 on digits, the models "
        f"[fit-benchmark](fit-benchmark.md) compared; trials fine-tune on {1 - HELD_OUT:.0%} of the training split "
        f"and score on the rest (seeds 0-{args.seeds - 1}, mean); the build's fine-tune is {finetune_epochs} epochs "
        f"on the whole training split, scored on the test split (the benchmark's 3 seeds, mean). Accuracy in %.",
        "",
        "| budget | strategy | fine-tuned | " + " | ".join(f"trial {e} epochs" for e in lengths) + " |",
        "|---|---|---|" + "---|" * len(lengths),
    ]
    for r in rows:
        lines.append(f"| {r['budget_share']:.0%} | {r['strategy']} | {100 * r['finetuned_mean']:.1f} | "
                     + " | ".join(f"{100 * r[f'trial_{e}_mean']:.1f}" for e in lengths) + " |")
    lines += ["", "Best of each budget by each judge:", ""]
    for b, picks in agreement.items():
        lines.append(f"- {float(b):.0%}: " + ", ".join(f"{k.replace('_best', '').replace('_', ' ')} {v}" for k, v in picks.items()))
    (DOCS / "trial-judge.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
