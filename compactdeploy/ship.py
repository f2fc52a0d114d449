"""Ship a bundle to a device: over SSH, or over TVM RPC to compactdeploy's device agent.

SSH goes through the system's ``ssh``: it uses the user's own configuration, keys, agent, known
hosts and jump hosts with no extra dependency, and with ``BatchMode=yes`` it fails rather than ask
for a password (compactdeploy never asks for or stores one). The archive is streamed through the
ssh connection itself, so the device needs only a POSIX shell, tar and sha256sum, not sftp.

Either way the bundle lands in a temporary directory beside where it goes, is verified there
(sha256 of every file) and only then renamed into place, so a cut transfer never leaves a
half-installed bundle where the old one was. What is at the destination is replaced only when it
is empty or an earlier bundle holding nothing it does not list; any other directory (a home) gets
the bundle inside it, as DEST/NAME (``runtime.install_path``; ``_INSTALL`` is the same rule
in POSIX shell, for devices reached over SSH).
"""

from __future__ import annotations

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
    if any(part.startswith("-") for part in match["host"].split("@")):
        # ssh would read it as an option (-oProxyCommand=... runs a command here)
        raise CompactDeployError(f"{text!r}: a user or host name cannot start with '-'")
    return SshDestination(match["host"], int(match["port"]) if match["port"] else None, match["path"].rstrip("/") or "/")


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


def ssh_command(target: SshDestination, ssh_config: Path | None) -> list[str]:
    """``ssh [options] HOST``: append the remote command."""
    if shutil.which("ssh") is None:
        raise CompactDeployError("ssh not found: install OpenSSH's client (apt-get install openssh-client)")
    # BatchMode: fail instead of prompting (for a password or an unknown host key)
    command = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}"]
    if ssh_config:
        command += ["-F", str(ssh_config)]
    if target.port:
        command += ["-p", str(target.port)]
    return command + ["--", target.host]  # "--": the host is never read as an option


def _run(command: list[str], what: str, timeout: float = 600, stdin=None) -> str:
    """Run ``command``; its standard output, or one line naming ``what`` failed and why."""
    try:
        done = subprocess.run(
            command, capture_output=True, timeout=timeout, stdin=stdin if stdin is not None else subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise CompactDeployError(f"{what} timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.decode(errors="replace").strip().splitlines() if line.strip()]
        raise CompactDeployError(f"{what} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return done.stdout.decode(errors="replace")


# The device side of an SSH install, in POSIX shell: $1 the destination asked for, $2 the bundle's
# name, $3 a random suffix for the staging directory; the archive comes on standard input. It applies
# runtime.install_path's rule, then unpacks beside the final place, verifies, and renames.
_INSTALL = r"""
set -eu
replaceable() {  # empty, or a compactdeploy bundle holding only files its SHA256SUMS lists
    [ -d "$1" ] && [ ! -L "$1" ] || return 1
    [ -z "$(ls -A "$1")" ] && return 0
    [ -f "$1/SHA256SUMS" ] && [ -f "$1/manifest.json" ] || return 1
    grep -qF '"format": "compactdeploy-bundle/1"' "$1/manifest.json" || return 1
    for entry in "$1"/* "$1"/.[!.]* "$1"/..?*; do
        [ -e "$entry" ] || [ -L "$entry" ] || continue
        name=${entry##*/}
        [ "$name" = SHA256SUMS ] && continue
        [ -f "$entry" ] && [ ! -L "$entry" ] || return 1
        sed 's/^[0-9a-f]*  //' "$1/SHA256SUMS" | grep -qxF -- "$name" || return 1
    done
}
dest=$1
if { [ -e "$dest" ] || [ -L "$dest" ]; } && ! replaceable "$dest"; then
    if [ ! -d "$dest" ]; then  # a link to a directory is a directory to install in, never replaced
        echo "refused: $dest exists and is not a directory; choose another destination" >&2; exit 3
    fi
    dest=$dest/$2
    if { [ -e "$dest" ] || [ -L "$dest" ]; } && ! replaceable "$dest"; then
        echo "refused: $dest exists and is not a compactdeploy bundle (or holds files the bundle does not list); it is left as it is: choose another destination" >&2
        exit 3
    fi
fi
parent=$(dirname -- "$dest")
staging=$parent/.$(basename -- "$dest").partial-$3
mkdir -p -- "$parent"
mkdir -- "$staging"
trap 'rm -rf -- "$staging"' EXIT
trap 'exit 1' HUP INT TERM
tar -xzf - -C "$staging" --no-same-owner
(cd -- "$staging/$2" && sha256sum -c --quiet SHA256SUMS)
replaced=no
if [ -e "$dest" ]; then
    [ -n "$(ls -A "$dest")" ] && replaced=yes
    mv -- "$dest" "$staging/.previous"
fi
mv -- "$staging/$2" "$dest"
echo "$replaced $dest"
"""


def _ship_ssh(archive: Path, name: str, target: SshDestination, ssh_config: Path | None) -> dict:
    ssh = ssh_command(target, ssh_config)
    q = shlex.quote
    remote = f"sh -c {q(_INSTALL)} compactdeploy-install {q(target.path)} {q(name)} {secrets.token_hex(4)}"
    # streamed through ssh itself: no dependence on the device's sftp or legacy scp
    with open(archive, "rb") as data:
        answer = _run(ssh + [remote], f"ssh {target.host} (copying, verifying and installing)", stdin=data)
    replaced, _, path = answer.strip().splitlines()[-1].partition(" ") if answer.strip() else ("no", "", target.path)
    return {"to": f"ssh://{target.host}:{path}", "path": path, "replaced": replaced == "yes"}


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
