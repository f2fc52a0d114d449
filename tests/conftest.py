"""Shared builds (each made once per test session and inspected by many tests), shared helpers,
and the test tiers.

Tiers, as pytest markers: ``unit`` (pure functions: parsers, budgets, records, the package's
shape; about a minute), ``integration`` (builds and agents on this machine: the default), ``slow``
(tuning, the emulated Pi, ssh). ``make test`` and CI run all three; ``pytest -m unit`` runs one.
``serial`` marks the tests whose outcome rests on this machine's timings: ``make test`` runs
them alone, after the others have run in parallel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compactdeploy.cli import main


TIERS = ("unit", "integration", "slow")
# a test using one of these is slow: qemu-user runs the Pi, sshd receives bundles
SLOW_FIXTURES = {"emulated_pi", "emulated_build", "sshd"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if {"emulated_pi", "emulated_build"} & set(item.fixturenames):
            # one worker starts the emulated Pi (pytest -n): its sysroot and agent are built once
            item.add_marker(pytest.mark.xdist_group("emulated-pi"))
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        item.add_marker("slow" if SLOW_FIXTURES & set(item.fixturenames) else "integration")


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def error_of(capsys, *args) -> str:
    """Run the CLI, expect exit status 2, return its single stderr line."""
    status = run_cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, f"exit status {status}, stderr {err}"
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # the tests must not read or write the user's cache
    os.environ["COMPACTDEPLOY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def lenet5_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "lenet5.pt"
    assert run_cli("train", "--model", "lenet5", "--data", "digits", "--epochs", "4", "--out", path) == 0
    return path


def _build(tmp_path_factory, name: str, *args: str) -> Path:
    out = tmp_path_factory.mktemp("builds") / name
    assert run_cli("build", *args, "--out", out) == 0
    return out


@pytest.fixture(scope="session")
def host_build(tmp_path_factory, lenet5_checkpoint) -> Path:
    return _build(
        tmp_path_factory, "lenet5-host", "--model", "lenet5", "--weights", lenet5_checkpoint,
        "--data", "digits", "--target", "host", "--prune", "l1:0.5", "--repeat", "100",
    )


@pytest.fixture(scope="session")
def rpi4_build(tmp_path_factory, lenet5_checkpoint) -> Path:
    return _build(
        tmp_path_factory, "lenet5-rpi4", "--model", "lenet5", "--weights", lenet5_checkpoint,
        "--target", "rpi4", "--prune", "l1:0.5",
    )


@pytest.fixture(scope="session")
def jetson_build(tmp_path_factory) -> Path:
    return _build(
        tmp_path_factory, "mnv2-orin", "--model", "mobilenetv2", "--model-arg", "width_mult=0.5",
        "--model-arg", "input_size=64", "--target", "jetson-orin-nano",
    )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


needs_emulator = pytest.mark.skipif(
    not (shutil.which("qemu-aarch64") and shutil.which("mmdebstrap")),
    reason="the emulated Raspberry Pi needs qemu-user and mmdebstrap (tools/setup.sh --for-tests)",
)


@pytest.fixture(scope="session")
def emulated_pi():
    from compactdeploy.device.emulate import emulated_agent

    with emulated_agent("cortex-a72") as agent:
        yield agent


@pytest.fixture(scope="session")
def emulated_build(tmp_path_factory, emulated_pi, lenet5_checkpoint):
    out = tmp_path_factory.mktemp("builds") / "lenet5-rpi4-emulated"
    assert run_cli(
        "build", "--model", "lenet5", "--weights", lenet5_checkpoint, "--data", "digits", "--target", "rpi4",
        "--prune", "l1:0.5", "--device", emulated_pi.address.url(), "--repeat", "30", "--out", out,
    ) == 0
    return out


@contextlib.contextmanager
def every_core_spinning() -> Iterator[None]:
    """Other work on this machine: one busy process per core, for the length of the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)  # running, not starting
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def default_sigint() -> None:
    """For a child process (``preexec_fn``): Ctrl-C as a terminal delivers it. A test run started
    in the background of a script inherits SIGINT ignored, and a child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_reaches_this_process() -> Iterator[None]:
    """This process handles SIGINT as Python does by default (see ``default_sigint``)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
