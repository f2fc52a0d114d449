"""Where a build is measured and how: worked out once, before any stage runs, and passed to the
stages that measure (tune, bench, fit) instead of each deciding again.

A ``Deployment`` says which backend builds for the target, which device measures (a device given
with ``--device``, this machine when the target is it, or none), with how many TVM threads, and
which tuning database builds apply. The thread count is set in the environment only of the
processes that run models: the local agent and the tuner's runner workers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .compile.backends import Backend, backend_of
from .device import DeviceAddress, Session, check_reachable, connect, local_agent, parse_device
from .errors import CompactDeployError
from .runtime import threads_in_use
from .targets import TargetSpec, runs_here

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class Deployment:
    name: str  # the target's name
    arch: str  # the CPU that loads the library
    backend: Backend
    device: DeviceAddress | None  # the device given to measure on; None: see ``local``
    local: bool  # this machine measures: no device given, and the target is this machine
    threads: int  # TVM threads on this machine (a device serves with its own setting)
    wait_s: float = 60.0  # how long to wait for a busy tracker key
    target: TargetSpec | None = None  # None for a bundle measured again (its manifest says the rest)
    database: Any = None  # the tuning database builds apply (``tune.TuningDatabase``); None: none

    @property
    def measurable(self) -> bool:
        return self.device is not None or self.local

    def where(self) -> str:
        return str(self.device) if self.device is not None else "this host"

    def not_measured_reason(self) -> str:
        return (
            f"not measured: no device (target {self.name} is not this machine; "
            "pass --device rpc://HOST:PORT or rpc://TRACKER:PORT/KEY)"
        )

    @contextlib.contextmanager
    def sessions(self, progress: Progress | None = None) -> Iterator[Callable[[], Session]]:
        """Opens sessions with the measuring device for the block. This machine is served by one
        agent (in a fresh process, so its memory figures are the model's) for the whole block; a
        device is connected per call, so a tracker's device is free between batches of work."""
        if self.device is None:
            with local_agent(self.threads) as agent:
                yield lambda: connect(agent.address)
        else:
            yield lambda: connect(self.device, self.wait_s, progress)

    def boards(self) -> int:
        """How many boards measure at once: every one registered under a tracker key, else one."""
        from .device import boards_under

        return boards_under(self.device) if self.device is not None else 1

    def tuning_runners(self) -> tuple[Any, Callable[[], Any]]:
        """MetaSchedule's runner for the search (one worker per board of the key), and a maker of the
        second timing's runner (one board: its choice compares times, so they come from one board)."""
        from .tune import local_runner, rpc_runner

        if self.device is None:
            return (local_runner(threads=self.threads),
                    lambda: local_runner(after_pause=True, threads=self.threads))
        return rpc_runner(self.device, workers=self.boards()), lambda: rpc_runner(self.device, after_pause=True)

    def machine_load(self, seconds: float = 1.0) -> dict[str, Any] | None:
        """What else the measuring machine does, over ``seconds`` (``runtime.load``). None where
        that is not known (a stock TVM server, not Linux)."""
        if self.device is None:
            from .runtime.load import cpu_times, load_between

            start = cpu_times()
            time.sleep(seconds)
            return load_between(start, cpu_times())
        session = connect(self.device, self.wait_s)
        session.cpu_load(mark=True)
        time.sleep(seconds)
        return session.cpu_load(mark=False)


def resolve(
    target: TargetSpec,
    device: str | None,
    threads: int | None = None,
    wait_s: float = 60.0,
    progress: Progress | None = None,
    *,
    tuning: bool = False,
    searching: bool = False,
    with_database: bool = True,
) -> Deployment:
    """The deployment of ``target``: checks the device address (and that something listens there),
    and picks the tuning database. ``tuning``, ``searching``: the build tunes, or searches widths
    under a budget, so something must measure."""
    backend = backend_of(target)
    address = parse_device(device) if device is not None else None
    local = address is None and target.is_this_machine()  # the one place this is decided
    if address is None and not local and (tuning or searching):
        why = (f"tuning for {target.name} measures candidates on the device" if tuning else
               f"a budget is met on the device: the search measures {target.name} there")
        raise CompactDeployError(f"{why}; pass --device rpc://HOST:PORT[/KEY]")
    if address is not None:
        check_reachable(address)  # before any work, not after the compile
    deployment = Deployment(
        name=target.name, arch=target.arch, backend=backend, device=address, local=local,
        threads=threads or int(threads_in_use()), wait_s=wait_s, target=target,
    )
    if not with_database:
        return deployment
    return _with_database(deployment, progress or _quiet)


def _with_database(deployment: Deployment, progress: Progress) -> Deployment:
    """The tuning database of the measuring device (the newest one for the target where none measures)."""
    from dataclasses import replace

    from .tune import database_for, newest_database

    target = deployment.target
    if not deployment.backend.tunable:
        return deployment
    if deployment.device is not None:
        session = connect(deployment.device, deployment.wait_s, progress)
        fingerprint = session.fingerprint
        del session  # frees the tracker key for the measurements that follow
        return replace(deployment, database=database_for(target, fingerprint))
    if deployment.local:
        from .device.agent import fingerprint

        return replace(deployment, database=database_for(target, fingerprint(threads=deployment.threads)))
    return replace(deployment, database=newest_database(target))  # a cross build without a device


def for_bundle(manifest: dict[str, Any], device: str | None, threads: int | None, wait_s: float) -> Deployment:
    """The deployment that measures a built bundle again, from what its manifest says."""
    spec = manifest["target"]
    address = parse_device(device) if device is not None else None
    # bundles record whether their target was this machine; older ones are the "host" target's
    local = address is None and runs_here(spec.get("local", spec["name"] == "host"), spec["arch"])
    return Deployment(
        name=spec["name"], arch=spec["arch"], backend=backend_of(spec.get("kind", "llvm")), device=address,
        local=local, threads=threads or int(threads_in_use()), wait_s=wait_s,
    )
