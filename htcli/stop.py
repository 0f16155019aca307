"""Stopping a run on request: the first Ctrl-C (SIGINT) or SIGTERM (what schedulers such as SLURM and
Kubernetes, and `timeout`, send before they kill) asks the training loop to save and stop."""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """While active, the first SIGINT or SIGTERM only records itself in `signal` (the loop saves, then
    stops); a second one acts as it would have without this (SIGINT: KeyboardInterrupt; SIGTERM: the
    process ends). Signal handlers exist only in the main thread: elsewhere it never fires."""

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
