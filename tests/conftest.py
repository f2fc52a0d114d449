"""Shared builds: each is made once per test session and inspected by many tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compactdeploy.cli import main


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # the tests must not read or write the user's cache
    import os

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
