"""Ship a bundle to a device: over SSH, or over TVM RPC to compactdeploy's device agent.

SSH goes through the system's ``ssh``: it uses the user's own configuration, keys, agent, known
hosts and jump hosts with no extra dependency, and with ``BatchMode=yes`` it fails rather than ask
for a password (compactdeploy never asks for or stores one). The archive is streamed through the
ssh connection itself, so the device needs only a POSIX shell, tar and sha256sum, not sftp.

Either way the bundle lands in a temporary directory beside the destination, is verified there
(sha256 of every file) and only then renamed into place, so a cut transfer never leaves a
half-installed bundle where the old one was.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CompactDeployError

_SSH = re.compile(r"^ssh://(?P<host>(?:[^@/:]+@)?(?:\[[^\]]+\]|[^:/]+))(?::(?P<port>\d+))?:(?P<path>/.*)$")
SSH_TIMEOUT_S = 15


@dataclass(frozen=True)
class SshDestination:
    host: str  # [user@]host
    port: int | None
    path: str  # absolute, on the device


def parse_ssh(text: str) -> SshDestination:
    match = _SSH.match(text)
    if not match:
        raise CompactDeployError(f"{text!r} is not ssh://[USER@]HOST[:PORT]:/ABSOLUTE/PATH")
    return SshDestination(match["host"], int(match["port"]) if match["port"] else None, match["path"].rstrip("/"))


def ship(bundle: Path, to: str, dest: str | None = None, ssh_config: Path | None = None, wait_s: float = 60.0) -> dict:
    """Send ``bundle`` (a build directory) to ``to`` (ssh://... or rpc://...)."""
    from .bundle import pack

    if to.startswith("ssh://"):
        target = parse_ssh(to)
        if dest:
            raise CompactDeployError("--dest is for rpc:// devices; an ssh:// address carries its path")
    elif to.startswith("rpc://"):
        from .device import parse_device

        address = parse_device(to)
    else:
        raise CompactDeployError(f"--to {to!r}: give ssh://[USER@]HOST:/PATH or rpc://HOST:PORT[/KEY]")
    with tempfile.TemporaryDirectory(prefix="compactdeploy-ship-") as tmp:
        archive = pack(Path(bundle), Path(tmp) / "bundle.tar.gz")
        if to.startswith("ssh://"):
            return _ship_ssh(archive, Path(bundle).name, target, ssh_config)
        return _ship_rpc(archive, address, dest or f"~/compactdeploy/bundles/{Path(bundle).name}", wait_s)


def _ssh_command(target: SshDestination, ssh_config: Path | None) -> list[str]:
    """``ssh [options] HOST``: append the remote command."""
    if shutil.which("ssh") is None:
        raise CompactDeployError("ssh not found: install OpenSSH's client (apt-get install openssh-client)")
    # BatchMode: fail instead of prompting (for a password or an unknown host key)
    command = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}"]
    if ssh_config:
        command += ["-F", str(ssh_config)]
    if target.port:
        command += ["-p", str(target.port)]
    return command + [target.host]


def _run(command: list[str], what: str, timeout: float = 600, stdin=None) -> None:
    try:
        done = subprocess.run(
            command, capture_output=True, timeout=timeout, stdin=stdin if stdin is not None else subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise CompactDeployError(f"{what} timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.decode(errors="replace").strip().splitlines() if line.strip()]
        raise CompactDeployError(f"{what} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")


def _ship_ssh(archive: Path, name: str, target: SshDestination, ssh_config: Path | None) -> dict:
    dest = target.path
    staging = posixpath.join(posixpath.dirname(dest), f".{posixpath.basename(dest)}.partial-{secrets.token_hex(4)}")
    ssh = _ssh_command(target, ssh_config)
    where = f"ssh {target.host}"
    q = shlex.quote
    _run(ssh + [f"mkdir -p {q(staging)}"], f"{where} (creating {staging})")
    try:
        # streamed through ssh itself: no dependence on the device's sftp or legacy scp
        with open(archive, "rb") as data:
            _run(ssh + [f"cat > {q(staging)}/bundle.tar.gz"], f"{where} (copying the bundle)", stdin=data)
        install = (
            f"set -e; cd {q(staging)}; tar -xzf bundle.tar.gz --no-same-owner; rm bundle.tar.gz; "
            f"cd {q(name)}; sha256sum -c --quiet SHA256SUMS; cd /; "
            f"if [ -e {q(dest)} ]; then mv {q(dest)} {q(staging)}/previous; fi; "
            f"mv {q(staging)}/{q(name)} {q(dest)}"
        )
        _run(ssh + [install], f"{where} (verifying and installing)")
    finally:
        subprocess.run(ssh + [f"rm -rf {q(staging)}"], capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL, check=False)
    return {"to": f"ssh://{target.host}:{dest}", "path": dest}


def _ship_rpc(archive: Path, address, dest: str, wait_s: float) -> dict:
    from .device import answering, connect

    session = connect(address, wait_s)
    if session.fingerprint is None:
        raise CompactDeployError(
            f"{address} runs a stock TVM RPC server, which cannot install bundles: run "
            "'compactdeploy device serve' there, or ship over ssh://"
        )
    with answering(address, "installing the bundle"):
        session.remote.upload(str(archive), "bundle.tar.gz")
        result = session.call("compactdeploy.install_bundle", "bundle.tar.gz", dest)
    if "error" in result:
        raise CompactDeployError(f"{address} refused the bundle: {result['error']}")
    return {"to": str(address), **result}
