"""Schedule transfer: kernels without records take schedules tuned for the same operator at other
widths, timed against their default rule; a schedule that does not fit falls back to the rule."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import read_json, run_cli

import compactdeploy.tune.transfer
from compactdeploy.compile import extract_kernels
from compactdeploy.compile import import_onnx, lower_for_tuning
from compactdeploy.device.agent import fingerprint
from compactdeploy.export import export_onnx
from compactdeploy.targets import load_target
from compactdeploy.tune import TuningDatabase, database_for, local_runner, tune
from compactdeploy.tune.transfer import KernelShape, adapt_factors
from compactdeploy.zoo import create_model

THREADS = 1  # the builds' thread count, so that they read the database the test fills
WIDE = {"conv1": 16, "conv2": 48, "fc1": 240}  # LeNet-5 with room to narrow: no kernel of it has a record


@pytest.mark.unit
@pytest.mark.parametrize("factors,extent", [
    ([2, 2, 4, 8], 64), ([2, 2, 4, 8], 32), ([1, 1, 1, 16], 8), ([4, 16], 32), ([3, 1], 8), ([1, 8, 2, 1], 24),
    ([1, 1, 2, 32], 16), ([2, 5], 7),
])
def test_a_transferred_tile_split_keeps_the_inner_factors_that_still_divide_and_resplits_the_outer(factors, extent):
    new = adapt_factors(factors, extent)
    assert math.prod(new) == extent and len(new) == len(factors)
    rest = extent
    for old, kept in zip(reversed(factors[1:]), reversed(new[1:])):  # innermost first
        # an inner factor changes only where it no longer divides what is left of the loop
        assert kept == old if rest % old == 0 else (kept < old and rest % kept == 0)
        rest //= kept
    assert new[0] == rest  # the outer loop takes the rest


def _lowered(model_args: dict, work, name: str):
    target = load_target("host")
    model = create_model("lenet5", model_args)
    exported = export_onnx(model.module.eval(), torch.randn(model.input_shape), work / f"{name}.onnx")
    return lower_for_tuning(import_onnx(exported.path, target), target.tvm_target())


def _host_database(tmp_path, monkeypatch) -> TuningDatabase:
    """The database a host build with ``--threads THREADS`` applies, in a cache of the test's own."""
    monkeypatch.setenv("COMPACTDEPLOY_CACHE", str(tmp_path / "cache"))
    return database_for(load_target("host"), fingerprint(threads=THREADS))


def _build(tmp_path, name: str, *args: str) -> dict:
    assert run_cli("build", "--model", "lenet5", "--target", "host", "--threads", THREADS, "--repeat", "5",
                   *args, "--out", tmp_path / name) == 0
    return read_json(tmp_path / name / "report.json")


@pytest.mark.slow
def test_a_pruned_variant_takes_schedules_tuned_at_the_full_width_and_the_report_names_them(tmp_path, monkeypatch):
    database = _host_database(tmp_path, monkeypatch)
    target = load_target("host")
    full = _lowered({}, tmp_path, "full")
    # 18 trials measure each kernel unscheduled and by its rule; the search takes the rest
    tune(full, target, database, 48, local_runner(threads=THREADS), None)
    donors = {KernelShape.of(t.dispatched[0]).describe() for t in extract_kernels(full, target.tvm_target())}

    # without a default rule to beat, the fastest transferred schedule is the one kept
    monkeypatch.setattr(compactdeploy.tune.transfer, "default_rule", lambda run, index: None)
    report = _build(tmp_path, "variant", "--model-arg", "conv1=4", "--model-arg", "conv2=8")
    transfer = report["tuning"]["transfer"]["kernels"]
    schedules = report["compile"]["schedules"]
    moved = {k["kernel"]: k["source"] for k in transfer if k["source"]}
    assert any(name.startswith("fused_conv2d") for name in moved), transfer
    for kernel, source in moved.items():
        assert source.startswith("transferred from ") and source.removeprefix("transferred from ") in donors
        assert schedules[kernel] == source  # the report names the kernel each schedule came from
    assert report["tuning"]["kernels_scheduled"] == sum(s == "tuned record" for s in schedules.values())
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4  # a transferred schedule computes the same

    # the records stay: a second build transfers nothing and names the same sources
    monkeypatch.undo()
    monkeypatch.setenv("COMPACTDEPLOY_CACHE", str(tmp_path / "cache"))
    again = _build(tmp_path, "again", "--model-arg", "conv1=4", "--model-arg", "conv2=8")
    assert "transfer" not in again["tuning"] or not again["tuning"]["transfer"]["kernels"]
    assert again["compile"]["schedules"] == schedules

    # --no-transfer leaves a new width to the default rules
    plain = _build(tmp_path, "plain", "--model-arg", "conv1=5", "--no-transfer")
    assert not (plain["tuning"].get("transfer") or {}).get("kernels")
    assert not any(s.startswith("transferred") for s in plain["compile"]["schedules"].values())

    # a budgeted search measures its candidates as they would ship: schedules transferred to their new
    # widths where the database allows; the records those transfers add leave its latency table standing
    transferred_before = sum(o.get("by") == "transfer" for o in database.origins().values())
    code = run_cli("build", "--model", "lenet5", *(f"--model-arg={k}={v}" for k, v in WIDE.items()), "--target", "host",
                   "--threads", THREADS, "--repeat", "20", "--latency-budget", "80%", "--fit-rounds", "2",
                   "--out", tmp_path / "fit")
    assert code in (0, 2)  # 2: the rounds ran out on this host's noise; the candidates are what is checked
    (state,) = (tmp_path / "cache" / "fit").glob("*/state.json")
    candidates = read_json(state)["candidates"]
    assert candidates and all(c["schedules"] and c["unscheduled"] == [] for c in candidates), candidates
    assert sum(o.get("by") == "transfer" for o in database.origins().values()) > transferred_before
    from compactdeploy.fit.costs import table_for

    (table,) = (tmp_path / "cache" / "latency").glob("host-*.json")
    assert table_for(load_target("host"), fingerprint(threads=THREADS), database).path == table


def _record_fixed_split(database: TuningDatabase, lowered, target) -> str:
    """Records, for lenet5's second convolution, a schedule that samples one tile split and fixes
    another to the kernel's 8 output channels: it cannot replay where there are more. Returns the
    kernel's description."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.s_tir import Schedule

    from compactdeploy.tune.candidates import KernelScratch

    task = next(t for t in extract_kernels(lowered, target.tvm_target())
                if t.task_name.startswith("fused_conv2d1"))
    mod = task.dispatched[0]
    schedule = Schedule(mod)
    block = schedule.get_sblock("conv2d_nhwc")
    _, height, _, channels, *_ = schedule.get_loops(block)
    schedule.split(height, schedule.sample_perfect_tile(height, n=2))
    schedule.split(channels, factors=[2, 4])  # the product must reach the loop's extent: 8 here
    scratch = KernelScratch(database.path.parent / "scratch", database, None, [])
    db = ms.database.JSONDatabase(str(scratch.workloads), str(scratch.records), allow_missing=True)
    db.commit_tuning_record(ms.database.TuningRecord(
        schedule.trace, db.commit_workload(mod), [2e-5], task.target,
        ms.arg_info.ArgInfo.from_entry_func(schedule.mod, remove_preproc=True)))
    scratch.publish()
    return KernelShape.of(mod).describe()


@pytest.mark.slow
def test_a_transferred_schedule_that_does_not_fit_falls_back_to_the_default_rule_with_the_reason(tmp_path, monkeypatch):
    database = _host_database(tmp_path, monkeypatch)
    target = load_target("host")
    donor = _record_fixed_split(database, _lowered({"conv2": 8}, tmp_path, "narrow"), target)

    report = _build(tmp_path, "wide", "--model-arg", "conv2=16")
    outcomes = {k["kernel"]: k for k in report["tuning"]["transfer"]["kernels"]}
    # the second convolution (16 channels) cannot take the split; the first (6) can, imperfectly
    kernel = next(name for name in outcomes if name.startswith("fused_conv2d1"))
    outcome = outcomes[kernel]
    assert outcome["transferred"] == 0 and outcome["source"] == "default rule"
    assert outcome["failed"] and outcome["failed"][0].startswith(f"from {donor}: its trace does not replay here")
    assert report["compile"]["schedules"][kernel] == "default rule"
    note = report["compile"]["schedule_notes"][kernel]
    assert note.startswith("no schedule transferred from other widths applied") and donor in note
    assert report["parity"]["onnx_vs_tvm_max_abs"] <= 1e-4


def test_a_build_that_only_transfers_does_not_wait_for_another_build_tuning_into_the_database(tmp_path):
    from compactdeploy.errors import CompactDeployError

    target = load_target("host")
    lowered = _lowered({}, tmp_path, "full")
    database = TuningDatabase(tmp_path / "db", {"test": "locked"})
    with database.locked():  # another build tuning
        result = tune(lowered, target, database, 0, local_runner(), None)
        assert result.trials_run == 0 and "another build is tuning into" in result.summary()
        with pytest.raises(CompactDeployError, match="another build is tuning into"):
            tune(lowered, target, database, 8, local_runner(), None)  # tuning itself must wait its turn


def test_transfer_outcomes_name_the_record_the_build_applies_whatever_the_database_numbering(tmp_path):
    # the database numbers workloads in the order they arrived, not the order of the model's kernels:
    # naming by the kernel's position read another kernel's record (a flaky report mismatch before)
    from compactdeploy.tune.database import record_key
    from compactdeploy.tune.search import _name_applied

    database = TuningDatabase(tmp_path / "db", {"test": True})
    lines = {}
    for workload_hash, donor, seconds in [("b-hash", "kernel B's donor", 2e-6), ("a-hash", "kernel A's donor", 1e-6)]:
        record = json.dumps([0, [[[], []], [seconds, seconds], {"kind": "llvm"}, []]])
        lines[workload_hash] = record
        database.publish(json.dumps([workload_hash, "module"]), [record],
                         [{"source": "transferred", "from": donor, "donor": "x", "by": "transfer"}])
    assert database.origins()[record_key(lines["a-hash"])]["from"] == "kernel A's donor"
    # the model's kernel 0 is A, kernel 1 is B; the database holds B as workload 0
    outcomes = [{"source": "transferred from a first timing's choice"}, {"source": "transferred from kernel B's donor"}]
    _name_applied(outcomes, ["a-hash", "b-hash"], database)
    assert outcomes[0]["source"] == "transferred from kernel A's donor"
    assert outcomes[0]["first_timing"] == "transferred from a first timing's choice"
    assert outcomes[1] == {"source": "transferred from kernel B's donor"}
