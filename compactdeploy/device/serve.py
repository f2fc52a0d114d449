"""``compactdeploy device serve``: this machine, or an emulated board, served as a device until stopped."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import CompactDeployError


class ServeFailed(CompactDeployError):
    """The agent's listener died: the command exits 1, so that a supervisor restarts it."""


def serve_device(host: str, port: int, tracker: str | None, key: str, emulate_target: str | None,
                 threads: int | None, say: Callable[[str], None]) -> None:
    """Serve until interrupted; ``say`` gets plain lines (a token must not be wrapped, to be copied)."""
    from . import agent
    from .listener import ListenerDied

    if tracker and not key:
        raise CompactDeployError("--tracker needs --key (the kind of device, e.g. rpi4)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: serving on {host}: anyone who can reach it and has the token can run code here")
    where = f"tracker {tracker} as '{key}'" if tracker else "directly"
    token, made = agent.token_from_environment()

    def ready(bound: int, what: str = "this machine") -> None:
        say(f"serving {what} on rpc://{host}:{bound} ({where}); Ctrl-C stops")
        if made:  # printed once; a supervisor that restarts the agent should set the variable instead
            say(agent.token_line(token, host, bound))

    if emulate_target is None:
        try:
            agent.serve(host, port, port + 100, tracker, key, token, on_ready=ready, threads=threads)
        except (ListenerDied, OSError) as exc:
            raise ServeFailed(f"the agent stopped serving: {exc}") from None
        return
    from ..targets import load_target
    from .emulate import emulated_agent

    target = load_target(emulate_target)
    if target.arch != "aarch64":
        raise CompactDeployError(f"only aarch64 boards can be emulated; {target.name} is {target.arch}")
    mcpu = (target.tvm_target_dict().get("host") or target.tvm_target_dict()).get("mcpu")
    with emulated_agent(mcpu, port, host, tracker, key, threads, token=token, progress=say) as emulated:
        ready(emulated.port, f"an EMULATED {target.name} ({mcpu}, qemu-user: not the board's speed)")
        try:
            status = emulated.process.wait()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main turns it into one): leaving stops the agent
            return
    if status != 0:
        raise ServeFailed(f"the emulated agent stopped serving (exit status {status})")
