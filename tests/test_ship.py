"""Shipping: self-contained bundles, verified on arrival and before loading, run on the device.

The SSH server is Debian's sshd on 127.0.0.1 with a throwaway key, started and stopped here.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_emulator, read_json, run_cli

from compactdeploy.runtime import (
    BIND_ENV,
    BundleError,
    Model,
    default_threads,
    install_archive,
    threads_in_use,
    threads_pinned,
    use_default_threads,
    verify,
)
from compactdeploy.export import run_onnxruntime

SSHD = "/usr/sbin/sshd"


@pytest.fixture
def bundle(host_build, tmp_path) -> Path:
    copy = tmp_path / "lenet5"
    shutil.copytree(host_build, copy)
    return copy


def test_bundle_is_self_contained_and_hash_listed(bundle):
    names = {p.name for p in bundle.iterdir()}
    assert {"model.so", "run.py", "manifest.json", "SHA256SUMS", "sample_input.npy"} <= names
    manifest = verify(bundle)
    for key in ("model", "target", "tvm_version", "inputs", "outputs", "prune", "measured", "files"):
        assert key in manifest
    assert manifest["measured"]["where"].startswith("measured on real hardware")
    sums = (bundle / "SHA256SUMS").read_text()
    assert "manifest.json" in sums and "model.so" in sums
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=bundle).returncode == 0


def test_run_matches_onnxruntime_and_benches(bundle, tmp_path, capsys):
    x = np.load(bundle / "sample_input.npy")
    np.save(tmp_path / "x.npy", x)
    assert run_cli("run", bundle, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy") == 0
    y = np.load(tmp_path / "y.npy")
    assert np.abs(y - run_onnxruntime(bundle / "model.onnx", x)).max() <= 1e-4
    capsys.readouterr()
    assert run_cli("run", bundle, "--bench", "30") == 0
    out = capsys.readouterr().out
    assert '"runs": 30' in out
    assert f'"threads": "{os.environ.get("TVM_NUM_THREADS", default_threads())}"' in out
    # not pinned to cores unless the user asks with TVM_BIND_THREADS=1 (docs/tuning.md, "A busy machine is named")
    pinned = os.environ.get("TVM_BIND_THREADS", "0") == "1"
    assert f'"threads_pinned": {str(pinned).lower()}' in out


def _fake_cpus(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


@pytest.mark.unit
def test_threads_are_not_pinned_to_cores_unless_the_user_pins_them(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", threads_in_use())  # restored after the test, as BIND_ENV is
    monkeypatch.delenv(BIND_ENV, raising=False)
    assert threads_pinned()  # TVM's own default
    use_default_threads()
    assert os.environ[BIND_ENV] == "0" and not threads_pinned()
    monkeypatch.setenv(BIND_ENV, "1")
    use_default_threads()
    assert os.environ[BIND_ENV] == "1" and threads_pinned()
    monkeypatch.setenv(BIND_ENV, "yes")  # TVM reads it with atoi: anything but 1 leaves them free
    assert not threads_pinned()


@pytest.mark.unit
def test_default_threads_count_physical_cores_this_process_may_use(tmp_path, monkeypatch):
    # two cores with two hyperthreads each (Linux numbers the siblings 0,2 and 1,3)
    sysfs = _fake_cpus(tmp_path / "smt", {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert default_threads(sysfs) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})  # pinned to one core's siblings
    assert default_threads(sysfs) == 1
    # no hyperthreads (this kind of VM): every CPU a core, where TVM's own default took half
    sysfs = _fake_cpus(tmp_path / "vm", {0: (0, 0), 1: (0, 1)})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_threads(sysfs) == 2
    assert default_threads(tmp_path / "no-topology") == 2  # each CPU counted as a core


def test_the_bundled_runner_needs_no_compactdeploy(bundle, tmp_path):
    """run.py with the TVM runtime and numpy only: compactdeploy hidden from the import path."""
    np.save(tmp_path / "x.npy", np.load(bundle / "sample_input.npy"))
    blocker = tmp_path / "blocker"
    (blocker / "compactdeploy").mkdir(parents=True)
    (blocker / "compactdeploy" / "__init__.py").write_text("raise ImportError('compactdeploy must not be needed')\n")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=str(blocker))
    done = subprocess.run([sys.executable, str(bundle / "run.py"), "--input", str(tmp_path / "x.npy"),
                           "--output", str(tmp_path / "y.npy")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "y.npy").shape == (1, 10)


@pytest.mark.parametrize("victim", ["model.so", "manifest.json", "run.py"])
def test_a_byte_changed_anywhere_is_refused_before_loading(bundle, victim, capsys):
    data = bytearray((bundle / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / victim).write_bytes(bytes(data))
    assert run_cli("run", bundle, "--verify") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and victim in err and err.count("\n") == 0
    with pytest.raises(BundleError):
        Model(bundle)


def test_a_bundle_for_another_architecture_is_refused(rpi4_build, tmp_path, capsys):
    copy = tmp_path / "rpi4"
    shutil.copytree(rpi4_build, copy)
    assert run_cli("run", copy, "--bench", "5") == 2
    assert "built for aarch64" in capsys.readouterr().err


def test_wrong_input_shape_or_dtype_names_the_expected_ones(bundle, tmp_path, capsys):
    for array in (np.zeros((1, 1, 32, 32), np.float32), np.zeros((1, 1, 28, 28), np.float64)):
        np.save(tmp_path / "bad.npy", array)
        assert run_cli("run", bundle, "--input", tmp_path / "bad.npy") == 2
        assert "the model takes 'input' of shape (1, 1, 28, 28) and dtype float32" in capsys.readouterr().err


def test_pack_and_unpack_round_trip(bundle, tmp_path):
    assert run_cli("pack", bundle, "--out", tmp_path / "b.tar.gz") == 0
    assert run_cli("unpack", tmp_path / "b.tar.gz", tmp_path / "installed") == 0
    verify(tmp_path / "installed")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".installed")] == []


def _archive(path: Path, entries: list[tarfile.TarInfo], payload: bytes = b"x") -> None:
    with tarfile.open(path, "w:gz") as archive:
        for info in entries:
            archive.addfile(info, io.BytesIO(payload) if info.isfile() else None)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_crafted_archives_are_refused_and_write_nothing(tmp_path, kind):
    entry = tarfile.TarInfo({"dotdot": "bundle/../../escaped.txt", "absolute": "/tmp/escaped-abs.txt"}.get(kind, "bundle/link"))
    entry.size = 1
    if kind == "symlink":
        entry.type, entry.linkname = tarfile.SYMTYPE, "/etc/passwd"
    if kind == "hardlink":
        entry.type, entry.linkname = tarfile.LNKTYPE, "/etc/passwd"
    archive = tmp_path / "evil.tar.gz"
    _archive(archive, [entry])
    destination = tmp_path / "deep" / "dest"
    with pytest.raises(BundleError, match="refusing the archive"):
        install_archive(archive, destination)
    assert not destination.exists() and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/escaped-abs.txt").exists()
    assert not (tmp_path / "deep").exists()  # refused before anything was created


def test_an_archive_whose_files_do_not_match_is_refused_and_the_old_bundle_stays(bundle, tmp_path):
    good = tmp_path / "good.tar.gz"
    assert run_cli("pack", bundle, "--out", good) == 0
    destination = tmp_path / "dest"
    install_archive(good, destination)
    before = (destination / "model.so").read_bytes()
    (bundle / "model.so").write_bytes(before[:-1] + bytes([before[-1] ^ 1]))  # tampered after packing
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as archive:
        for path in sorted(bundle.iterdir()):
            archive.add(path, arcname=f"lenet5/{path.name}")
    with pytest.raises(BundleError, match="does not match its sha256"):
        install_archive(bad, destination)
    assert (destination / "model.so").read_bytes() == before


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    """Debian's sshd on 127.0.0.1 with throwaway keys; an ssh_config that reaches it as 'device'."""
    if not os.access(SSHD, os.X_OK) or os.geteuid() != 0:
        pytest.skip("needs root and Debian's openssh-server (tools/setup.sh --for-tests)")
    home = tmp_path / "ssh"
    home.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    (home / "authorized_keys").write_text((home / "user.pub").read_text())
    port = _free_port()
    (home / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {home / 'host'}\nAuthorizedKeysFile {home / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {home / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
    )
    (home / "ssh_config").write_text(
        f"Host device\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {home / 'user'}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {home / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(home / "sshd_config")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield home / "ssh_config"
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=10)


def test_ship_over_ssh_installs_a_verified_bundle_that_runs(bundle, sshd, tmp_path, capsys):
    destination = tmp_path / "device" / "opt" / "models" / "lenet5"
    assert run_cli("ship", bundle, "--to", f"ssh://device:{destination}", "--ssh-config", sshd) == 0
    verify(destination)
    assert run_cli("run", destination, "--bench", "5") == 0
    # a second ship replaces the first whole, leaving no staging directories
    assert run_cli("ship", bundle, "--to", f"ssh://device:{destination}", "--ssh-config", sshd) == 0
    assert [p.name for p in destination.parent.iterdir()] == ["lenet5"]


def test_ship_over_ssh_never_replaces_with_a_broken_bundle(bundle, sshd, tmp_path, capsys):
    destination = tmp_path / "device" / "lenet5"
    assert run_cli("ship", bundle, "--to", f"ssh://device:{destination}", "--ssh-config", sshd) == 0
    before = (destination / "model.so").read_bytes()
    (bundle / "model.so").write_bytes(b"not a library")
    capsys.readouterr()
    assert run_cli("ship", bundle, "--to", f"ssh://device:{destination}", "--ssh-config", sshd) == 2
    assert "model.so" in capsys.readouterr().err  # refused before anything left this machine
    assert (destination / "model.so").read_bytes() == before


def test_ship_to_an_unreachable_ssh_host_fails_in_one_line(bundle, tmp_path, capsys):
    status = run_cli("ship", bundle, "--to", f"ssh://root@127.0.0.1:{_free_port()}:/tmp/nowhere")
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and "Connection refused" in err


@pytest.mark.parametrize("address", ["ssh://host/no-colon", "ftp://host/x", "ssh://host:relative/path"])
def test_malformed_ship_addresses_are_refused(bundle, address, capsys):
    assert run_cli("ship", bundle, "--to", address) == 2
    assert "error:" in capsys.readouterr().err


@needs_emulator
def test_ship_over_rpc_to_the_emulated_pi_and_run_there_matches_onnxruntime(emulated_build, emulated_pi, tmp_path):
    from compactdeploy.device.emulate import ensure_sysroot

    destination = tmp_path / "pi" / "lenet5"
    assert run_cli("ship", emulated_build, "--to", emulated_pi.address.url(), "--dest", destination) == 0
    verify(destination, check_machine=False)
    # run it inside the emulated Pi, with its Python, numpy and TVM runtime only
    root = ensure_sysroot()
    x = np.random.default_rng(5).random((1, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(root / "opt" / "py"), "TVM_USE_RUNTIME_LIB": "1"}
    done = subprocess.run(
        ["qemu-aarch64", "-cpu", "cortex-a72", "-L", str(root), str(root / "usr" / "bin" / "python3.11"),
         str(destination / "run.py"), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    on_pi = np.load(tmp_path / "y.npy")
    assert np.abs(on_pi - run_onnxruntime(destination / "model.onnx", x)).max() <= 1e-4
    assert read_json(destination / "manifest.json")["target"]["arch"] == "aarch64"


def test_ship_over_ssh_into_a_home_directory_installs_inside_it(bundle, sshd, tmp_path, capsys):
    home = tmp_path / "device" / "home" / "pi"
    home.mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    assert run_cli("ship", bundle, "--to", f"ssh://device:{home}", "--ssh-config", sshd) == 0
    assert (home / "thesis.tex").read_text() == "years of work"
    verify(home / "lenet5")
    assert str(home / "lenet5") in capsys.readouterr().out
    # a second ship replaces that bundle, and only it
    assert run_cli("ship", bundle, "--to", f"ssh://device:{home}", "--ssh-config", sshd) == 0
    assert "replacing the bundle that was there" in capsys.readouterr().out
    assert sorted(p.name for p in home.iterdir()) == ["lenet5", "thesis.tex"]
    # a directory of the bundle's name holding other files is refused, untouched
    (home / "lenet5" / "notes.txt").write_text("mine")
    other = tmp_path / "device" / "home" / "other"
    (other / "lenet5").mkdir(parents=True)
    (other / "lenet5" / "data.csv").write_text("1,2")
    assert run_cli("ship", bundle, "--to", f"ssh://device:{other}", "--ssh-config", sshd) == 2
    assert "is not a compactdeploy bundle" in capsys.readouterr().err
    assert sorted(p.name for p in (other / "lenet5").iterdir()) == ["data.csv"]
    assert sorted(p.name for p in other.iterdir()) == ["lenet5"]  # no staging left behind
