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
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..bundle_runner import THREADS_ENV
from ..errors import CompactDeployError, first_line
from .agent import EMULATED_ENV, PORT_LINE

CONNECT_TIMEOUT_S = 10.0
_ADDRESS = re.compile(r"^rpc://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)(?:/(?P<key>[\w.-]+))?/?$")


@dataclass(frozen=True)
class DeviceAddress:
    host: str
    port: int
    key: str | None = None  # set: host:port is a tracker, and key names the kind of device

    def __str__(self) -> str:
        return f"rpc://{self.host}:{self.port}" + (f"/{self.key}" if self.key else "")


def parse_device(text: str) -> DeviceAddress:
    match = _ADDRESS.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise CompactDeployError(
            f"device address {text!r} is not rpc://HOST:PORT (a server) or rpc://HOST:PORT/KEY (a tracker and a device key)"
        )
    return DeviceAddress(match["host"].strip("[]"), int(match["port"]), match["key"])


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
    on_wait: Callable[[str], None] | None = None,
) -> Session:
    """Open a session; through a tracker, wait up to ``wait_s`` for a free device of the key."""
    from tvm import rpc

    if address.key is None:
        _check_reachable(address, CONNECT_TIMEOUT_S, "device")
        try:
            remote = rpc.connect(address.host, address.port, session_timeout=0)
        except Exception as exc:  # TVM raises its own error types for a refused or foreign peer
            raise CompactDeployError(f"{address} did not accept a TVM RPC session: {first_line(exc)}") from None
    else:
        remote = _request_from_tracker(address, wait_s, on_wait)
    try:
        fingerprint = json.loads(remote.get_function("compactdeploy.fingerprint")())
    except Exception:  # a stock TVM server has no such function
        fingerprint = None
    return Session(remote, address, fingerprint)


def _request_from_tracker(address: DeviceAddress, wait_s: float, on_wait):
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
                return tracker.request(address.key, priority=1, session_timeout=0, max_retry=2)
            except Exception as exc:  # another client took the device between summary and request
                if time.monotonic() >= deadline:
                    raise CompactDeployError(f"tracker gave no {address.key} device: {first_line(exc)}") from None
        left = deadline - time.monotonic()
        if left <= 0:
            state = "every one registered is busy" if queue else "none is registered with that key"
            raise CompactDeployError(
                f"no free '{address.key}' device on tracker {address.host}:{address.port} after {wait_s:.0f} s "
                f"({state}); try again later or raise --device-wait"
            )
        if on_wait:
            known = f"{queue.get('pending', 0)} waiting before us" if queue else "no such device registered yet"
            on_wait(f"waiting for a free '{address.key}' device ({known}; {left:.0f} s left)")
        time.sleep(min(1.0, max(0.05, left)))


class Agent:
    """A device agent process on this machine (native or under qemu), serving on 127.0.0.1."""

    def __init__(self, command: list[str], env: dict[str, str], description: str, start_timeout_s: float):
        self.description = description
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            self.port = self._read_port(start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.address = DeviceAddress("127.0.0.1", self.port)

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
