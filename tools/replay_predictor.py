#!/usr/bin/env python
"""The width search's latency predictor replayed on stored searches: every model a search predicted
and then measured is predicted again from the models measured before it (as the search did), by the
fit with measured models weighted by how alike they are cut (``fit.search.NEIGHBOUR_SCALE``) at
several scales, and unweighted (the scale infinite: the fit before); at the shipped scale, also with
the weights-streamed term credited from one streaming model on (``fit.search.STREAMING_MODELS``
1, the rule before). Nothing is measured; the states hold the measurements. Usage:
    .venv/bin/python tools/replay_predictor.py STATE_DIR [STATE_DIR ...] [--name NAME]
where each STATE_DIR holds search states (``*/state.json``, as under ``~/.cache/compactdeploy/fit``).
Writes docs/benchmarks/NAME.{md,json} (predictor-replay by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import numpy as np  # noqa: E402

SCALES = (0.05, 0.1, 0.2, 0.4, float("inf"))


def main() -> None:
    import importlib

    from compactdeploy.fit.allocate import FLOAT_BYTES

    search = importlib.import_module("compactdeploy.fit.search")  # the module: the package exports a function of its name
    _corrected, _streamed_bytes = search._corrected, search._streamed_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("states", nargs="+", type=Path)
    parser.add_argument("--l2-bytes", type=int, default=2 << 20, help="the measuring device's L2 cache (its fingerprint's)")
    parser.add_argument("--name", default="predictor-replay", help="docs/benchmarks/NAME.{md,json}")
    args = parser.parse_args()
    start = time.perf_counter()
    shipped = (search.NEIGHBOUR_SCALE, search.STREAMING_MODELS)
    variants = [(scale, shipped[1]) for scale in SCALES] + [(shipped[0], 1)]
    files = sorted({p.resolve() for d in args.states for p in d.glob("**/state.json")})
    errors: dict[tuple[float, int], list[float]] = {variant: [] for variant in variants}
    predictions = []
    for path in files:
        state = json.loads(path.read_text())
        candidates, model = state["candidates"], state["key"]["model"]
        for index, candidate in enumerate(candidates):
            if not candidate.get("predicted_ms"):
                continue  # measured before anything was predicted (the unpruned and smallest models)

            def streamed(c):
                return _streamed_bytes(c["params"] * FLOAT_BYTES, args.l2_bytes)

            before = [(c["table_ms"], streamed(c), c["measured_ms"], c["widths"]) for c in candidates[:index]]
            row = {"model": model, "state": path.parent.name, "measured_ms": candidate["measured_ms"]}
            for variant in variants:
                search.NEIGHBOUR_SCALE, search.STREAMING_MODELS = variant
                predicted = _corrected(candidate["table_ms"], streamed(candidate), candidate["widths"], before)
                error = abs(predicted - candidate["measured_ms"]) / candidate["measured_ms"]
                errors[variant].append(error)
                row[_name(variant)] = round(error, 5)
            predictions.append(row)
    search.NEIGHBOUR_SCALE, search.STREAMING_MODELS = shipped
    rows = [{"neighbour_scale": "inf" if variant[0] == float("inf") else f"{variant[0]:g}", "streaming_models": variant[1],
             "shipped": variant == shipped, "predictions": len(values),
             "median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "worst": float(max(values)),
             "within_10pct": float(np.mean(np.array(values) <= 0.10))}
            for variant, values in errors.items()]
    info = benchlib.meta("replay_predictor.py", time.perf_counter() - start, searches=len(files),
                         figures="replayed from measurements stored in the searches' states (real host measurements "
                                 "by tools/bench_fit.py and tools/bench_budgeted_build.py); nothing measured here")
    benchlib.write_json(args.name, info, rows, predictions=predictions)
    lines = [
        "# The width search's predictor, replayed on stored searches",
        "",
        f"{info['figures']}; `{info['command']}`, {info['searches']} searches, {info['measured_on']}. Each model a "
        "search predicted and then measured, predicted again from the models measured before it: `a x table time + "
        "b x weights streamed`, least squares, each measured model weighted exp(-distance / scale) against the "
        "nearest, distance the mean over groups of |log(width ratio)|; scale inf is the unweighted fit. The weights-"
        "streamed term is fitted once as many measured models as the second column says stream (and one more is "
        f"measured); beyond the cache is over {args.l2_bytes:,} bytes of weights.",
        "",
        "| neighbour scale | streaming models | predictions | median error | 90th percentile | worst | within 10 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['neighbour_scale']}{' (shipped)' if r['shipped'] else ''} | {r['streaming_models']} | {r['predictions']} | "
                     f"{r['median']:.1%} | {r['p90']:.1%} | {r['worst']:.1%} | {r['within_10pct']:.0%} |")
    (benchlib.DOCS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))


def _name(variant: tuple[float, int]) -> str:
    """A variant's key in the JSON's predictions: ``scale/streaming models``."""
    scale, streaming = variant
    return ("inf" if scale == float("inf") else f"{scale:g}") + f"/{streaming}"


if __name__ == "__main__":
    main()
