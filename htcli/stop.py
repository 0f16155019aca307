"""Stopping a run on request: the first Ctrl-C (SIGINT) asks the training loop to save and stop."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """While active, the first SIGINT only sets `requested` (the loop saves, then stops); a second one
    raises KeyboardInterrupt as usual. Signal handlers exist only in the main thread: elsewhere it
    never fires."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
