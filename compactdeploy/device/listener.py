"""The device agent's listener: TVM's RPC protocol, hardened where TVM's own server is not.

TVM's stock listener (``tvm.rpc.server._listen_loop``) ends on one malformed handshake or one
session that ends badly, waits forever on a client that connects and says nothing, and serves
anyone who reaches the port. This one speaks the same protocol (stock TVM clients and trackers
work with it) and:

- refuses a handshake that is malformed, slow (``HANDSHAKE_TIMEOUT_S``) or lacks the access token,
  logs one line, and goes on serving;
- runs each session in a forked child, in a private work directory that is removed when the
  session ends, however it ends (a client killed mid-run, garbage after the handshake);
- on SIGTERM or SIGINT ends the running session, removes its directory and returns;
- raises ``ListenerDied`` when it cannot go on, so the agent exits non-zero and a supervisor
  restarts it.

Only the standard library and the TVM runtime: it runs on the board.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass

HANDSHAKE_TIMEOUT_S = 10.0  # a client that has not finished its handshake by then is dropped
MAX_KEY_BYTES = 4096  # TVM's keys are a few dozen bytes
TOKEN_OPTION = "-token="  # in the client's key: "client:MATCHKEY -token=TOKEN [-timeout=S]"
TRACKER_PING_S = 2.0  # as TVM's server: ask the tracker whether a handed-out key went unused
SESSION_PREFIX = "compactdeploy-session-"


class ListenerDied(Exception):
    """The listener cannot go on (its socket failed, or an unexpected error): exit non-zero."""


class Refused(Exception):
    """A connection that did not pass the handshake; the message says why, for the log."""


class _Probe(Refused):
    """A connection closed before it sent anything: a client checking that the port answers."""


class _Stop(BaseException):
    """SIGTERM or SIGINT: end the running session and return."""


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} compactdeploy agent: {message}", file=sys.stderr, flush=True)


def client_key(matchkey: str, token: str | None) -> str:
    """The key a client sends (TVM adds ``-timeout=`` itself): what ``handshake`` checks."""
    return f"{matchkey} {TOKEN_OPTION}{token}" if token else matchkey


def bind(host: str, port: int, port_end: int) -> socket.socket:
    """A listening socket on the first free port of [port, port_end]."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in range(port, max(port, port_end) + 1):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            continue
        sock.listen(8)
        return sock
    raise OSError(f"no free port in {port}-{port_end} on {host}")


def _recv_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise Refused("the client closed the connection during the handshake")
        data += chunk
    return data


def handshake(conn: socket.socket, matchkey: str, server_key: str, token: str | None) -> dict[str, float]:
    """Read and check a client's handshake (TVM's: magic, key length, key); reply; its options.

    Raises ``Refused`` (with the reason) or OSError (timeout, reset); the caller closes ``conn``.
    """
    from tvm.rpc import base

    conn.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        first = conn.recv(4)
        if not first:
            raise _Probe("closed at once")
        (magic,) = struct.unpack("<i", first + _recv_exactly(conn, 4 - len(first)))
        if magic != base.RPC_MAGIC:
            raise Refused("not a TVM RPC client (wrong magic number)")
        (length,) = struct.unpack("<i", _recv_exactly(conn, 4))
        if not 0 < length <= MAX_KEY_BYTES:
            raise Refused(f"malformed handshake (key length {length})")
        words = _recv_exactly(conn, length).decode("utf-8", errors="replace").split()
        refused = None
        if not words or words[0] != f"client:{matchkey}":
            refused = "key mismatch (another device's key, or a stale tracker match)"
        elif token is not None:
            given = next((w[len(TOKEN_OPTION):] for w in words[1:] if w.startswith(TOKEN_OPTION)), "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                refused = "wrong or missing access token"
        if refused:
            conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
            raise Refused(refused)
        conn.sendall(struct.pack("<ii", base.RPC_CODE_SUCCESS, len(server_key)) + server_key.encode())
    except socket.timeout:
        raise Refused(f"no complete handshake within {HANDSHAKE_TIMEOUT_S:.0f} s") from None
    conn.settimeout(None)  # the session's own loop reads the descriptor, blocking
    options = {}
    for word in words[1:]:
        if word.startswith("-timeout="):
            with contextlib.suppress(ValueError):
                options["timeout"] = float(word[len("-timeout="):])
    return options


class _WorkDir:
    """What TVM's session environment expects of its work directory."""

    def __init__(self, path: str):
        self.path = path
        self.libs: list = []

    def relpath(self, name: str) -> str:
        return os.path.join(self.path, name)


def _serve_session_child(conn: socket.socket, work: str) -> None:
    """In the forked child: serve the session until the client leaves; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent ends us with it
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which ends us
        from tvm.rpc import _ffi_api
        from tvm.rpc import server as rpc_server

        os.chdir(work)
        rpc_server._server_env(None, _WorkDir(work))
        _ffi_api.ServerLoop(conn.fileno())
        code = 0
    except BaseException:  # a client gone mid-call, garbage on the wire: this session only
        code = 1
    finally:
        os._exit(code)


def serve_session(conn: socket.socket, address, options: dict[str, float]) -> int:
    """Serve one session in a forked child, in a fresh work directory; its exit status."""
    work = tempfile.mkdtemp(prefix=SESSION_PREFIX)
    pid = os.fork()
    if pid == 0:
        _serve_session_child(conn, work)
    timeout = options.get("timeout") or None
    deadline = time.monotonic() + timeout if timeout else None
    status = None
    try:
        while status is None:
            # blocking where there is no deadline: no wake-ups while the session times a model (a
            # signal still interrupts the wait: its handler raises)
            done, raw = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
            if done:
                status = os.WEXITSTATUS(raw) if os.WIFEXITED(raw) else -os.WTERMSIG(raw)  # Python 3.8 too
                break
            if time.monotonic() > deadline:
                log(f"session from {address[0]} ran past its {timeout:.0f} s timeout; ended")
                with contextlib.suppress(Exception):
                    from tvm.rpc import _ffi_api

                    _ffi_api.ReturnException(conn.fileno(), f"RPCSessionTimeoutError: the {timeout}s session expired")
                _end(pid)
                status = -signal.SIGKILL
                break
            time.sleep(0.2)
    finally:
        if status is None:  # interrupted (SIGTERM): the session ends with the agent
            _end(pid)
        conn.close()
        shutil.rmtree(work, ignore_errors=True)
    if status != 0:
        log(f"session from {address[0]} ended abnormally (exit status {status}); serving on")
    return status


def _end(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@dataclass
class _Tracker:
    """The agent's registration with a TVM tracker (the protocol of TVM's own server)."""

    address: tuple[str, int]
    key: str
    port: int
    custom_addr: str | None = None
    conn: socket.socket | None = None
    matchkey: str = ""
    unmatched: int = 0

    def put(self) -> str:
        """(Re)register as free under a fresh match key; the key clients must present."""
        from tvm.rpc import base

        if self.conn is None:
            self.conn = base.connect_with_retry(self.address)
            self.conn.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            (magic,) = struct.unpack("<i", base.recvall(self.conn, 4))
            if magic != base.RPC_TRACKER_MAGIC:
                raise ListenerDied(f"{self.address[0]}:{self.address[1]} is not a TVM tracker")
            self._ask([base.TrackerCode.UPDATE_INFO, {"key": "server:" + self.key, "addr": (self.custom_addr, self.port)}])
        self.matchkey = base.random_key(self.key + ":")
        self._ask([base.TrackerCode.PUT, self.key, (self.port, self.matchkey), self.custom_addr])
        self.unmatched = 0
        return self.matchkey

    def _ask(self, message) -> None:
        from tvm.rpc import base

        base.sendjson(self.conn, message)
        if base.recvjson(self.conn) != base.TrackerCode.SUCCESS:
            raise OSError(f"the tracker refused {message[0]}")

    def idle(self) -> None:
        """No client for a ping period: a key handed out but never used is replaced (as TVM does)."""
        from tvm.rpc import base

        base.sendjson(self.conn, [base.TrackerCode.GET_PENDING_MATCHKEYS])
        pending = base.recvjson(self.conn)
        self.unmatched = 0 if self.matchkey in pending else self.unmatched + 1
        if self.unmatched * TRACKER_PING_S > 4 + TRACKER_PING_S:
            self.put()

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
        self.conn = None


def listen(
    sock: socket.socket,
    key: str,
    token: str | None,
    tracker_address: tuple[str, int] | None = None,
) -> None:
    """Serve sessions one at a time until SIGTERM or SIGINT; ``ListenerDied`` if it cannot go on."""
    port = sock.getsockname()[1]
    tracker = _Tracker(tracker_address, key, port) if tracker_address else None
    server_key = "server:" + key

    def stop(_signum, _frame):
        raise _Stop

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        matchkey = key
        while True:
            try:
                if tracker is not None and tracker.conn is None:
                    matchkey = tracker.put()
                ready, _, _ = select.select([sock], [], [], TRACKER_PING_S if tracker else 1.0)
                if not ready:
                    if tracker is not None:
                        tracker.idle()
                        matchkey = tracker.matchkey
                    continue
                conn, address = sock.accept()
            except OSError as exc:
                if tracker is not None and sock.fileno() != -1:  # the tracker went away: register again
                    log(f"lost the tracker ({exc}); registering again")
                    tracker.close()
                    time.sleep(1.0)
                    continue
                raise ListenerDied(f"the listening socket failed: {exc}") from None
            try:
                options = handshake(conn, matchkey, server_key, token)
            except (Refused, OSError) as exc:
                if not isinstance(exc, _Probe):
                    log(f"refused a connection from {address[0]}: {exc}")
                conn.close()
                continue
            serve_session(conn, address, options)
            if tracker is not None:
                try:
                    matchkey = tracker.put()  # free again, under a new key
                except OSError:
                    tracker.close()  # registered again at the top of the loop
    except _Stop:
        return
    except ListenerDied:
        raise
    except Exception as exc:  # anything unforeseen: exit non-zero rather than serve half-broken
        raise ListenerDied(f"{type(exc).__name__}: {exc}") from exc
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if tracker is not None:
            tracker.close()
        sock.close()
