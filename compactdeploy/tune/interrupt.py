"""Ctrl-C (and SIGTERM) during tuning: acted on between batches, where Python alone is on the stack."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from .database import TuningDatabase


class KernelSearchStopped(Exception):
    """Raised from the measure callback to end one kernel's search (it ran out, or Ctrl-C)."""


class Interrupt:
    """A Ctrl-C asked for during tuning, acted on where Python alone is on the stack."""

    def __init__(self):
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_between_batches(database: TuningDatabase) -> Iterator[Interrupt]:
    """Make Ctrl-C stop tuning after the batch in flight is published, not in the middle of it.

    A KeyboardInterrupt raised while MetaSchedule's C++ loop is calling into Python (its cost
    model, our callbacks) must unwind C++ frames that cannot carry it: std::terminate, and the
    process died with SIGSEGV (3 of 4 interrupts here, 0.5-2 s after a batch). So the first
    Ctrl-C only sets a flag that the measure callback and the loop between kernels check; a
    second one leaves at once, which loses nothing published (every batch is an atomic copy).

    A Python signal handler runs only when the main thread next runs Python, which can be many
    seconds into a search, and two Ctrl-C before then arrive as one. Signal numbers written to a
    wakeup pipe by the C-level handler, read by a thread, count every press as it happens.
    Only the main thread can handle signals. An application's own SIGINT handler is left alone, and
    so is an ignored SIGINT (a background job of a script). SIGTERM (a supervisor, ``kill``) counts
    as a Ctrl-C here too, always: raised as an exception mid-search it would meet the same C++ frames.

    TVM's Z3 prover, statically linked and called inside the search, swaps in its own SIGINT handler
    around each proof and consumes a Ctrl-C that lands there (it cancels that proof, nothing more):
    that press is never seen, so the acknowledgement line is how a user knows to press again.
    SIGTERM is not affected.
    """
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    take_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def watch() -> None:
        while data := os.read(read_end, 64):  # empty once tuning is over and the pipe closed
            for _ in range(data.count(signal.SIGINT) + data.count(signal.SIGTERM)):
                if interrupt.requested:
                    os.write(2, f"\nerror: tuning stopped at once; {database.resume_hint()}\n".encode())
                    os._exit(2)  # nothing published is lost; the kernel releases the database lock
                interrupt.requested = True
                os.write(2, b"\ninterrupted: finishing the batch in flight, then stopping (Ctrl-C again to stop at once)\n")

    if take_sigint:
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # the C-level handler feeds the pipe
    previous_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="compactdeploy-ctrl-c", daemon=True)
    watcher.start()
    try:
        yield interrupt
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        if take_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous_sigterm)
        os.close(write_end)
        watcher.join()
        os.close(read_end)
