"""Reaching a device: TVM RPC, directly (``rpc://host:port``) or through a tracker (``rpc://host:port/key``).

The device runs ``agent.py`` (``compactdeploy device serve``); a stock TVM RPC server also works,
with latency and outputs only. ``local_agent`` starts one on this machine, ``emulate`` one under
qemu-user, both on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..runtime import THREADS_ENV
from ..errors import CompactDeployError, first_line
from .agent import EMULATED_ENV, PORT_LINE, TOKEN_ENV

CONNECT_TIMEOUT_S = 10.0
# a session is served one at a time: a client waits while another holds the device
SESSION_WAIT_S = 60.0
_ADDRESS = re.compile(
    r"^rpc://(?:(?P<token>[\w.~-]+)@)?(?P<host>\[[^\]]+\]|[^:/@]+):(?P<port>\d+)(?:/(?P<key>[\w.-]+))?/?$"
)


@dataclass(frozen=True)
class DeviceAddress:
    host: str
    port: int
    key: str | None = None  # set: host:port is a tracker, and key names the kind of device
    token: str | None = field(default=None, repr=False, compare=False)  # the agent's access token

    def __str__(self) -> str:
        """The address without its token: safe in messages, reports and logs."""
        return f"rpc://{self.host}:{self.port}" + (f"/{self.key}" if self.key else "")

    def url(self) -> str:
        """The address with its token, for another compactdeploy command (``--device``)."""
        token = f"{self.token}@" if self.token else ""
        return f"rpc://{token}{self.host}:{self.port}" + (f"/{self.key}" if self.key else "")


def parse_device(text: str) -> DeviceAddress:
    """``rpc://[TOKEN@]HOST:PORT[/KEY]``; without a token in it, ``$COMPACTDEPLOY_DEVICE_TOKEN``'s."""
    match = _ADDRESS.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise CompactDeployError(
            f"device address {_without_token(text)!r} is not rpc://HOST:PORT (a server) or rpc://HOST:PORT/KEY "
            "(a tracker and a device key), with TOKEN@ before HOST to give the device's access token"
        )
    token = match["token"] or os.environ.get(TOKEN_ENV, "").strip() or None
    return DeviceAddress(match["host"].strip("[]"), int(match["port"]), match["key"], token)


def _without_token(text: str) -> str:
    return re.sub(r"^rpc://[^@/]*@", "rpc://", text.strip())


def open_remote(address: DeviceAddress, session_timeout: float = 0):
    """A TVM RPC session with the device at ``address`` (through its tracker when it has a key),
    presenting the access token; raises what TVM raises (``connect`` turns it into one line)."""
    from tvm import rpc

    from .listener import client_key

    if address.key is None:
        return rpc.connect(address.host, address.port, client_key("", address.token), session_timeout=session_timeout)
    from tvm.rpc import base

    # TrackerSession.request, but presenting the token to the server the tracker names
    with socket.create_connection((address.host, address.port), timeout=CONNECT_TIMEOUT_S) as tracker:
        tracker.settimeout(None)
        tracker.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(tracker, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise RuntimeError(f"{address.host}:{address.port} is not a TVM tracker")
        base.sendjson(tracker, [base.TrackerCode.REQUEST, address.key, "", 1])
        answer = base.recvjson(tracker)
    if answer[0] != base.TrackerCode.SUCCESS:
        raise RuntimeError(f"the tracker answered {answer!r}")
    host, port, matchkey = answer[1]
    return rpc.connect(host, port, client_key(matchkey, address.token), session_timeout=session_timeout)


class Session:
    """An open RPC session with a device, and what it told about itself."""

    def __init__(self, remote, address: DeviceAddress, fingerprint: dict[str, Any] | None):
        self.remote = remote
        self.address = address
        self.fingerprint = fingerprint  # None: a stock TVM server, without compactdeploy's functions

    def call(self, name: str, *args) -> Any:
        """One of the agent's functions; its JSON answer decoded."""
        function = self.remote.get_function(name)
        return json.loads(function(*args))

    def device(self, kind: str):
        return self.remote.cuda(0) if kind == "cuda" else self.remote.cpu(0)

    def cpu_load(self, mark: bool) -> dict[str, Any] | None:
        """Mark a moment on the device, or read what else it did since the mark (``agent.cpu_load``).

        None where that is not known: a stock TVM server, or an agent from before the function.
        """
        if self.fingerprint is None:
            return None
        try:
            with answering(self.address, "reading the device's load"):
                return self.call("compactdeploy.cpu_load", int(mark))
        except CompactDeployError:
            return None


@contextlib.contextmanager
def answering(address: DeviceAddress, doing: str) -> Iterator[None]:
    """Turn a device's failure (connection lost, load refused) into one line that names it."""
    try:
        yield
    except CompactDeployError:
        raise
    except Exception as exc:  # TVM's RPC raises its own error types, with multi-line messages
        raise CompactDeployError(f"{address} failed while {doing}: {first_line(exc, 160)}") from None


def check_reachable(address: DeviceAddress, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when nothing listens there."""
    _check_reachable(address, timeout_s, "tracker" if address.key else "device")


def _check_reachable(address: DeviceAddress, timeout_s: float, what: str) -> None:
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise CompactDeployError(
            f"cannot reach {what} {address.host}:{address.port} ({reason}); is 'compactdeploy device serve' "
            "running there, and the address right?"
        ) from None


def connect(
    address: DeviceAddress,
    wait_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> Session:
    """Open a session; through a tracker, wait up to ``wait_s`` for a free device of the key."""
    if address.key is None:
        _check_reachable(address, CONNECT_TIMEOUT_S, "device")
        remote = _accepted(address, lambda: open_remote(address), max(wait_s, SESSION_WAIT_S), progress)
    else:
        remote = _request_from_tracker(address, wait_s, progress)
    try:
        fingerprint = json.loads(remote.get_function("compactdeploy.fingerprint")())
    except Exception:  # a stock TVM server has no such function
        fingerprint = None
    return Session(remote, address, fingerprint)


def boards_under(address: DeviceAddress) -> int:
    """How many boards can measure at once: those registered under a tracker key (at least 1); 1 for
    a device addressed directly. Registered, not free: a board just handed back re-registers a moment
    later, and work for a busy one waits for it as any request does."""
    if address.key is None:
        return 1
    from tvm import rpc

    try:
        servers = rpc.connect_tracker(address.host, address.port).summary().get("server_info", [])
    except Exception:  # the tracker is checked, with a clear message, when a session is opened
        return 1
    return max(1, sum(1 for server in servers if server.get("key") == f"server:{address.key}"))


def _request_from_tracker(address: DeviceAddress, wait_s: float, progress):
    from tvm import rpc

    _check_reachable(address, CONNECT_TIMEOUT_S, "tracker")
    try:
        tracker = rpc.connect_tracker(address.host, address.port)
    except Exception as exc:  # not a tracker at that address
        raise CompactDeployError(f"{address.host}:{address.port} is not a TVM tracker: {first_line(exc)}") from None
    deadline = time.monotonic() + wait_s
    while True:
        queue = tracker.summary().get("queue_info", {}).get(address.key, {})
        free = int(queue.get("free", 0))
        if free > 0:
            try:
                return _accepted(address, lambda: open_remote(address), SESSION_WAIT_S, progress)
            except CompactDeployError as exc:  # another client took the device between summary and request
                if time.monotonic() >= deadline or "access token" in str(exc):
                    raise
        left = deadline - time.monotonic()
        if left <= 0:
            state = "every one registered is busy" if queue else "none is registered with that key"
            raise CompactDeployError(
                f"no free '{address.key}' device on tracker {address.host}:{address.port} after {wait_s:.0f} s "
                f"({state}); try again later or raise --device-wait"
            )
        if progress:
            known = f"{queue.get('pending', 0)} waiting before us" if queue else "no such device registered yet"
            progress(f"waiting for a free '{address.key}' device ({known}; {left:.0f} s left)")
        time.sleep(min(1.0, max(0.05, left)))


def _accepted(address: DeviceAddress, open_session: Callable[[], Any], wait_s: float, progress):
    """``open_session()``, saying what it waits for: a device serves one session at a time, so the
    handshake waits while another client holds it. One line on a refusal or after ``wait_s``."""
    done: dict[str, Any] = {}

    def attempt() -> None:
        try:
            done["remote"] = open_session()
        except Exception as exc:  # TVM raises its own error types for a refused or foreign peer
            done["error"] = exc

    worker = threading.Thread(target=attempt, daemon=True)  # TVM's handshake cannot be cancelled
    worker.start()
    started = time.monotonic()
    while worker.is_alive():
        worker.join(timeout=2.0)
        waited = time.monotonic() - started
        if worker.is_alive() and waited >= wait_s:
            raise CompactDeployError(
                f"{address} accepted the connection but started no session within {wait_s:.0f} s: another client "
                "holds it (a device serves one session at a time), or it is not a TVM RPC server"
            )
        if worker.is_alive() and progress:
            progress(f"waiting for {address} to start a session (it serves one client at a time; {waited:.0f} s)")
    if "error" in done:
        if "matches key" in str(done["error"]):  # TVM's words for the server's refusal of the handshake
            hint = "no access token given" if address.token is None else "the access token given is not this device's"
            raise CompactDeployError(
                f"{address} refused the session ({hint}): give the token that 'compactdeploy device serve' printed, "
                f"as rpc://TOKEN@HOST:PORT or in ${TOKEN_ENV}"
            ) from None
        raise CompactDeployError(f"{address} did not accept a TVM RPC session: {first_line(done['error'])}") from None
    return done["remote"]


class Agent:
    """A device agent process on this machine (native or under qemu), serving on 127.0.0.1 and
    requiring a fresh random access token, which ``address`` carries."""

    def __init__(self, command: list[str], env: dict[str, str], description: str, start_timeout_s: float,
                 token: str | None = None):
        self.description = description
        self.token = token or secrets.token_urlsafe(18)
        self.process = subprocess.Popen(
            command, env={**env, TOKEN_ENV: self.token}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        try:
            self.port = self._read_port(start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.address = DeviceAddress("127.0.0.1", self.port, token=self.token)

    def _read_port(self, timeout_s: float) -> int:
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = self.process.stdout.readline()
                if line.startswith(PORT_LINE):
                    return int(line.split()[1])
                if not line and self.process.poll() is not None:
                    break
        error = self.process.stderr.read() if self.process.poll() is not None else ""
        tail = error.strip().splitlines()[-1] if error.strip() else f"no answer within {timeout_s:.0f} s"
        raise CompactDeployError(f"the {self.description} did not start: {tail}")

    def stop(self) -> None:
        """End the agent and its session processes (they share its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # sessions still running, or a stuck server
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_agent(threads: int | None = None) -> Agent:
    """This machine as a device: an agent in a fresh process (so its memory figures are the model's)."""
    env = dict(os.environ)
    env["TVM_USE_RUNTIME_LIB"] = "1"  # what a device has: the runtime, not the 240 MB compiler
    env.pop(EMULATED_ENV, None)
    if threads:
        env[THREADS_ENV] = str(threads)
    port = _free_port()
    command = [sys.executable, "-m", "compactdeploy.device.agent", "--port", str(port), "--port-end", str(port + 50)]
    return Agent(command, env, "local device agent", start_timeout_s=120)
