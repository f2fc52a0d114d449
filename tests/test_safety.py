"""Nothing lost, no one in: what install paths replace, the device agent under bad clients and
signals, bundle integrity, archive caps.

Every server here binds 127.0.0.1, is started by the test and stops with it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import needs_emulator, read_json, run_cli

from compactdeploy.runtime import MAX_ENTRIES, BundleError, install_archive, verify, write_sums
from compactdeploy.device import DeviceAddress, connect, local_agent
from compactdeploy.device.listener import ListenerDied, bind, listen
from compactdeploy.errors import CompactDeployError
from compactdeploy.ship import ssh_command, parse_ssh


@pytest.fixture
def bundle(host_build, tmp_path) -> Path:
    copy = tmp_path / "lenet5"
    shutil.copytree(host_build, copy)
    return copy


@pytest.fixture
def archive(bundle, tmp_path) -> Path:
    path = tmp_path / "lenet5.tar.gz"
    assert run_cli("pack", bundle, "--out", path) == 0
    return path


# --- what unpack, ship and build replace -------------------------------------------------------

def test_unpack_into_a_home_directory_installs_inside_it_and_keeps_its_files(archive, tmp_path, capsys):
    home = tmp_path / "v" / "home"
    home.mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    assert run_cli("unpack", archive, home) == 0
    assert (home / "thesis.tex").read_text() == "years of work"
    verify(home / "lenet5")
    assert f"at {home / 'lenet5'}" in capsys.readouterr().out
    # again: the bundle installed there is replaced whole, the home is not
    assert run_cli("unpack", archive, home) == 0
    assert "replacing the bundle that was there" in capsys.readouterr().out
    assert sorted(p.name for p in home.iterdir()) == ["lenet5", "thesis.tex"]


def test_unpack_replaces_an_empty_directory_or_a_bundle_but_nothing_else(archive, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    install_archive(archive, empty)
    verify(empty)
    # a bundle with a file added is no longer only a bundle: the new one goes inside it
    (empty / "notes.txt").write_text("mine")
    result = install_archive(archive, empty)
    assert result["path"] == str(empty / "lenet5") and (empty / "notes.txt").read_text() == "mine"
    # a directory named like the bundle, holding something else, is left alone, in one line
    other = tmp_path / "other"
    (other / "lenet5").mkdir(parents=True)
    (other / "lenet5" / "data.csv").write_text("1,2,3")
    assert run_cli("unpack", archive, other) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a compactdeploy bundle" in err and "choose another destination" in err
    assert (other / "lenet5" / "data.csv").read_text() == "1,2,3"
    assert sorted(p.name for p in (other / "lenet5").iterdir()) == ["data.csv"]
    # a link to a directory (a models folder on another disk) is installed in, never replaced
    real = tmp_path / "disk" / "models"
    real.mkdir(parents=True)
    (tmp_path / "models").symlink_to(real, target_is_directory=True)
    assert install_archive(archive, tmp_path / "models")["path"] == str(tmp_path / "models" / "lenet5")
    assert (tmp_path / "models").is_symlink()
    verify(real / "lenet5")
    # a file is never replaced
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        install_archive(archive, afile)
    assert afile.read_text() == "x"


def test_build_out_is_not_taken_for_a_build_because_it_has_a_manifest_json(capsys, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text("{}")
    (site / "index.html").write_text("<html>")
    status = run_cli("build", "--model", "lenet300", "--target", "host", "--out", site)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "not a compactdeploy build" in err[-1]
    assert (site / "index.html").read_text() == "<html>"


def test_ship_over_rpc_puts_a_relative_dest_under_the_agents_home(bundle, tmp_path, monkeypatch, capsys):
    home = tmp_path / "agent-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # the local agent inherits this process's environment
    with local_agent() as agent:
        assert run_cli("ship", bundle, "--to", agent.address.url(), "--dest", "models/rel") == 0
    verify(home / "models" / "rel", check_machine=False)
    assert str(home / "models" / "rel") in capsys.readouterr().out


@pytest.mark.parametrize("text", ["ssh://-oProxyCommand=touch%20x@host:/tmp/x", "ssh://-host:/tmp/x",
                                  "ssh://user@-oProxyCommand=x:/tmp/x"])
@pytest.mark.unit
def test_an_ssh_host_that_ssh_would_read_as_an_option_is_refused(text):
    with pytest.raises(CompactDeployError, match="cannot start with '-'"):
        parse_ssh(text)


@pytest.mark.unit
def test_the_ssh_host_comes_after_the_end_of_options():
    command = ssh_command(parse_ssh("ssh://pi@board:2222:/home/pi"), None)
    assert command[-2:] == ["--", "pi@board"]


# --- bundle integrity ---------------------------------------------------------------------------

def _shadowing_module(bundle: Path, marker: Path) -> None:
    (bundle / "hashlib.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom _hashlib import *\n")


def test_a_file_added_to_a_bundle_is_refused_and_never_imported(bundle, tmp_path, capsys):
    marker = tmp_path / "shadow-ran"
    _shadowing_module(bundle, marker)
    assert run_cli("run", bundle, "--verify") == 2
    assert "hashlib.py, not listed in SHA256SUMS" in capsys.readouterr().err
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    for args in (["--verify"], ["--bench", "3"]):
        done = subprocess.run([sys.executable, str(bundle / "run.py"), *args], env=env, capture_output=True,
                              text=True, cwd=tmp_path)
        assert done.returncode == 2 and "not listed in SHA256SUMS" in done.stderr, done.stderr
    assert not marker.exists()  # python run.py never put the bundle's directory on the import path
    with pytest.raises(CompactDeployError, match="not listed"):  # nor does pack ship it
        from compactdeploy.bundle import pack

        pack(bundle, tmp_path / "b.tar.gz")


def _rewrite_manifest(bundle: Path, **changes) -> None:
    """Change the manifest and re-hash it consistently: what an attacker with write access can do."""
    manifest = read_json(bundle / "manifest.json")
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    write_sums(bundle)


@pytest.mark.parametrize("library", ["../../outside.so", "/usr/lib/evil.so", "missing.so", 7])
def test_the_manifest_library_must_be_a_file_of_the_bundle(bundle, library):
    _rewrite_manifest(bundle, library=library)
    with pytest.raises(BundleError, match="'library' must name a file listed in SHA256SUMS"):
        verify(bundle, check_machine=False)


@pytest.mark.unit
def test_a_decompression_bomb_is_refused_before_it_is_unpacked(tmp_path):
    bomb = tmp_path / "bomb.tar.gz"
    size = 1 << 30  # 1 GiB of zeros: about 1 MB compressed
    with gzip.open(bomb, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w|") as archive:
        info = tarfile.TarInfo("lenet5/model.so")
        info.size = size

        class Zeros(io.RawIOBase):
            left = size

            def readinto(self, buffer):
                count = min(len(buffer), self.left)
                buffer[:count] = bytes(count)
                self.left -= count
                return count

        archive.addfile(info, Zeros())
    assert bomb.stat().st_size < 8 << 20
    destination = tmp_path / "dest"
    with pytest.raises(BundleError, match="decompression bomb"):
        install_archive(bomb, destination)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tar.gz"]


@pytest.mark.unit
def test_an_archive_with_too_many_entries_is_refused_naming_the_cap(tmp_path):
    crowded = tmp_path / "crowded.tar.gz"
    with tarfile.open(crowded, "w:gz") as archive:
        for index in range(MAX_ENTRIES + 1):
            info = tarfile.TarInfo(f"lenet5/f{index}")
            archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(BundleError, match=f"more than {MAX_ENTRIES} entries"):
        install_archive(crowded, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# --- the device agent ---------------------------------------------------------------------------

def _send(port: int, data: bytes, wait_s: float = 0.3) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(data)
        time.sleep(wait_s)


def _handshake(token: str) -> bytes:
    key = f"client: -token={token}".encode()
    return struct.pack("<ii", 0xFF271, len(key)) + key


_TIMING_CLIENT = """
import sys, time
from compactdeploy.device import connect, parse_device
from tvm import relax, runtime
import numpy as np
session = connect(parse_device(sys.argv[1]))
session.remote.upload(sys.argv[2], "model.so")
dev = session.remote.cpu()
vm = relax.VirtualMachine(session.remote.load_module("model.so"), dev)
x = runtime.tensor(np.load(sys.argv[3]), dev)
print("timing", flush=True)
vm.time_evaluator("main", dev, number=1, repeat=100000)(x)
"""


def test_the_agent_survives_malformed_packets_garbage_and_a_client_killed_while_timing(host_build, tmp_path):
    with local_agent() as agent:
        _send(agent.port, struct.pack("<ii", 0xFF271, 0))  # a handshake with an empty key
        _send(agent.port, struct.pack("<ii", 0xFF271, -5))
        _send(agent.port, _handshake(agent.token) + os.urandom(4096), wait_s=1.0)  # a session of garbage
        client = subprocess.Popen(
            [sys.executable, "-c", _TIMING_CLIENT, agent.address.url(), str(host_build / "model.so"),
             str(host_build / "sample_input.npy")], stdout=subprocess.PIPE, text=True,
        )
        assert client.stdout.readline().strip() == "timing"
        time.sleep(1.0)
        client.kill()
        client.wait()
        assert agent.process.poll() is None
        session = connect(agent.address)
        assert session.fingerprint["machine"]
        del session
        assert agent.process.poll() is None


def test_a_silent_connection_is_dropped_and_the_client_says_what_it_waits_for():
    with local_agent() as agent, socket.create_connection(("127.0.0.1", agent.port)):  # says nothing
        messages: list[str] = []
        session = connect(agent.address, progress=messages.append)
        assert session.fingerprint is not None
        # the client waited while the agent held the silent connection, and said so as it waited
        assert any("waiting for" in m and "to start a session" in m for m in messages), messages


def test_a_client_without_the_token_is_refused_in_one_line(host_build, tmp_path, capsys, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(host_build, bundle)
    with local_agent() as agent:
        for address, hint in ((DeviceAddress("127.0.0.1", agent.port), "no access token given"),
                              (DeviceAddress("127.0.0.1", agent.port, token="guess"), "not this device's")):
            with pytest.raises(CompactDeployError, match=hint) as caught:
                connect(address)
            assert "\n" not in str(caught.value) and "guess" not in str(caught.value)
        # the token in the address, or in the environment
        assert run_cli("bench", bundle, "--device", agent.address.url(), "--repeat", "5") == 0
        monkeypatch.setenv("COMPACTDEPLOY_DEVICE_TOKEN", agent.token)
        assert run_cli("bench", bundle, "--device", str(agent.address), "--repeat", "5") == 0
        assert agent.token not in json.dumps(read_json(bundle / "report.json"))  # never written down


def test_device_serve_makes_a_token_prints_it_once_and_requires_it():
    process = subprocess.Popen(
        [sys.executable, "-m", "compactdeploy.cli", "device", "serve", "--port", str(_free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "COMPACTDEPLOY_DEVICE_TOKEN"},
    )
    try:
        port = int(process.stdout.readline().split()[1])
        lines = [process.stderr.readline() for _ in range(2)]
        token_line = next(line for line in lines if line.startswith("access token: "))
        token = token_line.split()[2]
        assert f"rpc://{token}@127.0.0.1:{port}" in token_line
        with pytest.raises(CompactDeployError, match="refused the session"):
            connect(DeviceAddress("127.0.0.1", port))
        assert connect(DeviceAddress("127.0.0.1", port, token=token)).fingerprint["machine"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=20) == 0  # SIGTERM is a requested stop


def test_an_agent_whose_listener_dies_exits_non_zero(tmp_path):
    import threading

    sock = bind("127.0.0.1", _free_port(), _free_port() + 10)
    threading.Timer(0.5, sock.close).start()  # the listening socket fails under the listener
    with pytest.raises(ListenerDied):
        listen(sock, "", "token")
    done = subprocess.run([sys.executable, "-m", "compactdeploy.device.agent", "--host", "256.1.1.1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "stopped serving" in done.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sessions_left(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("compactdeploy-session-"))


def test_a_measurement_leaves_no_session_directory(host_build, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(host_build, bundle)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the local agent's temporary files land here
    assert run_cli("bench", bundle, "--repeat", "5") == 0
    assert _sessions_left(tmp) == []


def test_sigterm_during_a_build_stops_the_agent_and_leaves_nothing(lenet5_checkpoint, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    build = subprocess.Popen(
        [sys.executable, "-m", "compactdeploy.cli", "build", "--model", "lenet5", "--weights", str(lenet5_checkpoint),
         "--target", "host", "--repeat", "1000000", "--out", str(out)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)},
    )
    agent = None
    for line in build.stderr:
        if line.startswith("done compile"):
            break
    deadline = time.monotonic() + 120
    while agent is None and time.monotonic() < deadline:  # the benchmark's agent, timing
        agent = next((c for c in psutil.Process(build.pid).children(recursive=True)
                      if "compactdeploy.device.agent" in " ".join(c.cmdline())), None)
        time.sleep(0.2)
    assert agent is not None
    time.sleep(3.0)
    build.send_signal(signal.SIGTERM)
    assert build.wait(timeout=60) == 130
    assert "interrupted: nothing was written" in build.stderr.read()
    psutil.wait_procs([agent], timeout=20)
    assert not agent.is_running()
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _sessions_left(tmp) == []


@needs_emulator
def test_sigterm_to_device_serve_emulate_stops_the_emulated_agent(emulated_pi):  # the sysroot is built
    process = subprocess.Popen(
        [sys.executable, "-m", "compactdeploy.cli", "device", "serve", "--emulate", "rpi4", "--port", str(_free_port())],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    emulated = []
    while not emulated and time.monotonic() < deadline:
        emulated = [c for c in psutil.Process(process.pid).children(recursive=True) if "qemu-aarch64" in " ".join(c.cmdline())]
        time.sleep(0.5)
    assert emulated
    for line in process.stderr:
        if line.startswith("serving an EMULATED"):
            break
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    gone, alive = psutil.wait_procs(emulated, timeout=20)
    assert not alive


# --- bad data -----------------------------------------------------------------------------------

def test_nan_in_the_model_output_fails_the_build_and_writes_nothing(tmp_path, capsys):
    import torch

    from compactdeploy.zoo import create_model

    state = create_model("lenet300").module.state_dict()
    first = next(iter(state))
    state[first][0, 0] = float("nan")
    weights = tmp_path / "nan.pt"
    torch.save(state, weights)
    out = tmp_path / "out"
    status = run_cli("build", "--model", "lenet300", "--weights", weights, "--target", "host", "--out", out)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "not finite" in err[-1]
    assert not out.exists()


@pytest.mark.unit
def test_parity_over_the_tolerance_or_not_finite_is_an_error():
    from compactdeploy.export import PARITY_TOLERANCE, check_parity

    reference = np.array([[1.0, -40.0, 3.0]], np.float32)
    assert check_parity("a vs b", reference, reference + 1e-6) == pytest.approx(1e-6, rel=0.1)
    # relative to the output's scale: 40 * 1e-4 = 4e-3 allowed here
    assert check_parity("a vs b", reference, reference + 3e-3) <= 40 * PARITY_TOLERANCE
    with pytest.raises(CompactDeployError, match="over the tolerance"):
        check_parity("a vs b", reference, reference + 0.1)
    with pytest.raises(CompactDeployError, match="not finite"):
        check_parity("a vs b", reference, np.full_like(reference, np.nan))
