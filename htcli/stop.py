"""Stopping a run on request: the first Ctrl-C (SIGINT) or SIGTERM (what schedulers such as SLURM and
Kubernetes, and `timeout`, send before they kill) asks the training loop to save and stop. Outside a
training loop, SIGTERM unwinds like Ctrl-C, so that files half written (a corpus cache entry, a
checkpoint) are removed and the old ones kept."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """While active, the first SIGINT or SIGTERM only records itself in `signal` (the loop saves, then
    stops); a second one acts as it would have without this (SIGINT: KeyboardInterrupt; SIGTERM:
    Terminated under `terminate_unwinds`, else the process ends). Signal handlers exist only in the main
    thread: elsewhere it never fires."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum)
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.getsignal(number) for number in SIGNALS}
            for number in SIGNALS:
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class Terminated(BaseException):
    """Raised by SIGTERM under `terminate_unwinds` (a BaseException, as KeyboardInterrupt is, so that no
    `except Exception` takes it for an error to handle)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """While active, SIGTERM raises Terminated instead of ending the process at once, so that `finally`
    blocks run (temporary files removed). Only where SIGTERM has its default action, in the main thread,
    and not in a process of torchrun's: its launcher sends SIGTERM to stop the others when one fails, and a
    process waiting inside a collective operation would only unwind when it returns (or be killed later)."""
    launched = "LOCAL_RANK" in os.environ
    main_thread = threading.current_thread() is threading.main_thread()
    if launched or not main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
