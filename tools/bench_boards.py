"""Wall time of a width search's latency table on one board against two under one tracker key.

Starts a TVM tracker on 127.0.0.1 and emulated Raspberry Pi 4 boards (qemu-user, the sysroot of
tools/build_sysroot.sh) registered under one key, then measures the latency table of a budgeted
search (every layer of the model at every width the search may give it) from an empty cache,
first with one board registered, then with two. Only the wall time is a result: the boards are
EMULATED on this host, so their layer times say nothing of a real Pi's. Writes
docs/benchmarks/boards.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DOCS, meta, write_json  # noqa: E402


def table_wall_time(model: str, model_args: dict, boards: int, points: int, work: Path) -> dict:
    from tvm.rpc.tracker import Tracker

    from compactdeploy.compile import resolve_linker
    from compactdeploy.config import MeasureConfig, ModelConfig
    from compactdeploy.deployment import resolve
    from compactdeploy.device import DeviceAddress, _free_port, boards_under
    from compactdeploy.device.emulate import emulated_agent
    from compactdeploy.fit.allocate import width_space
    from compactdeploy.fit.costs import measure_missing
    from compactdeploy.fit.measure import DeviceMeasurer
    from compactdeploy.prepare import load
    from compactdeploy.targets import load_target

    os.environ["COMPACTDEPLOY_CACHE"] = str(work / f"cache-{boards}")  # an empty table each time
    target = load_target("rpi4")
    loaded = load(ModelConfig(model, model_args=model_args))
    space = width_space(loaded.model.module, loaded.example, (), target.channel_multiple, points)
    signatures = {s.key: s for widths in _every_single_group_cut(space) for s in space.signatures(widths)}
    port = _free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 20, silent=True)
    token = secrets.token_urlsafe(12)
    try:
        with contextlib.ExitStack() as stack:
            for _ in range(boards):
                stack.enter_context(emulated_agent("cortex-a72", tracker=f"127.0.0.1:{port}", key="pi", token=token))
            address = DeviceAddress("127.0.0.1", port, "pi", token=token)
            deadline = time.monotonic() + 120
            while boards_under(address) < boards and time.monotonic() < deadline:
                time.sleep(0.5)
            deployment = resolve(target, address.url(), searching=True)
            linker = resolve_linker(target)
            with DeviceMeasurer.open(target, deployment, linker, MeasureConfig(), progress=print) as measurer:
                table = measurer.table()
                start = time.perf_counter()
                measure_missing(table, list(signatures.values()), measurer.time_layers, print)
                seconds = time.perf_counter() - start
    finally:
        tracker.terminate()
    return {"model": model, "boards": boards, "layers": len(signatures), "table_s": round(seconds, 1)}


def _every_single_group_cut(space):
    """The full model and, per group, each width the search may give it: the layers a search's table needs."""
    yield dict(space.full)
    for group, widths in space.candidates.items():
        for width in widths:
            yield {**space.full, group: width}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--points", type=int, default=4)
    args = parser.parse_args()
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="compactdeploy-bench-boards-") as tmp:
        for boards in (1, 2):
            rows.append(table_wall_time(args.model, {}, boards, args.points, Path(tmp)))
            print(rows[-1], file=sys.stderr)
    info = meta("bench_boards.py", time.time() - start, model=args.model, points=args.points,
                boards="EMULATED Raspberry Pi 4s (qemu-user on this host), registered under one tracker key",
                figures="wall time of the search's latency table only; no layer time here is a board's")
    write_json("boards", info, rows)
    one, two = rows
    lines = [
        "# Latency table on one board against two (EMULATED boards)",
        "",
        f"Measured on {info['measured_on']}; `{info['command']}` (model {args.model}, {args.points} widths per group; "
        f"{info['seconds']} s). Boards: {info['boards']}; the figures are wall times of the flow on this host, "
        "not a real Pi's speed.",
        "",
        "| boards | layers timed | wall time of the table |",
        "|---|---|---|",
        *(f"| {r['boards']} | {r['layers']} | {r['table_s']} s |" for r in rows),
        "",
        f"Two boards took {two['table_s'] / one['table_s']:.2f}x the wall time of one. Compiling each part stays on "
        "the build host; on this 2-core host the two emulated boards also share its cores with the compiler.",
    ]
    (DOCS / "boards.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
