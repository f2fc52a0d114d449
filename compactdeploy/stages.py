"""How a stage tells the outside that it started, progresses and ended: one ``Observer`` for a
build (the CLI's progress display), and the clock that times each stage for the report."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Protocol

Progress = Callable[[str], None]  # one line of progress, within a stage


class Observer(Protocol):
    """Told when each stage starts, progresses and ends; the CLI shows progress with it."""

    def started(self, stage: str) -> None: ...

    def progress(self, stage: str, message: str) -> None: ...

    def finished(self, stage: str, seconds: float, summary: str) -> None: ...


class Silent:
    def started(self, stage: str) -> None:
        pass

    def progress(self, stage: str, message: str) -> None:
        pass

    def finished(self, stage: str, seconds: float, summary: str) -> None:
        pass


class StageClock:
    """Times each stage and forwards its progress to the observer; ``summary`` is the stage's last word."""

    def __init__(self, observer: Observer | None = None):
        self.observer = observer or Silent()
        self.timings: dict[str, float] = {}
        self.summary = ""
        self.current = ""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageClock]:
        self.current = name
        self.observer.started(name)
        self.summary = ""
        self._start = time.perf_counter()
        yield self
        took = self.elapsed()
        self.timings[name] = round(self.timings.get(name, 0.0) + took, 3)  # a stage run again (a rebuild) adds up
        self.observer.finished(name, took, self.summary)

    def progress(self, message: str) -> None:
        self.observer.progress(self.current, message)

    def elapsed(self) -> float:
        """Seconds since the current stage started."""
        return round(time.perf_counter() - self._start, 3)
