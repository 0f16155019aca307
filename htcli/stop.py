"""Stopping a run on request: the first Ctrl-C (SIGINT) or SIGTERM (what schedulers such as SLURM and
Kubernetes, and `timeout`, send before they kill) asks the training loop to save and stop, as does SIGHUP
(the terminal the run was started from closed: an ssh session lost). Outside a
training loop, SIGTERM unwinds like Ctrl-C, so that files half written (a corpus cache entry, a
checkpoint) are removed and the old ones kept. Before the command line has started (its imports and
parsing, where nothing is written), either signal ends the process at once with one line."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOPS = (*SIGNALS, signal.SIGHUP)  # what a training loop saves and stops on
NOTICE_AFTER = 1.0  # seconds a stop may wait unacknowledged before `on_wait` is told of it
TELL_WAIT = 5.0  # seconds the end of a stop request waits for a notice being given
# what the command line's process does as a command's work ends, its error said or not (htcli.__main__: stops
# from then on keep the command's exit code); empty where htcli runs inside another program
AFTER_COMMAND: list[Callable[[], None]] = []


def command_over() -> None:
    """A command's work is over, its exit code known: AFTER_COMMAND's hooks run."""
    for hook in AFTER_COMMAND:
        hook()


def _terminal_outputs() -> list[int]:
    """Which of stdout and stderr are a terminal (asked before a hangup: after it, isatty says no)."""
    return [fd for fd in (1, 2) if os.isatty(fd)]


def to_devnull(fds: list[int]) -> None:
    """These descriptors sent to /dev/null (where one cannot be, it is left as it was)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


class StopRequest:
    """While active, the first SIGINT, SIGTERM or SIGHUP only records itself in `signal` (the loop saves,
    then stops; after SIGHUP, output to the terminal goes to /dev/null); a second one acts as it would have
    without this (SIGINT: KeyboardInterrupt; SIGTERM: Terminated under `terminate_unwinds`, else the
    process ends), but SIGHUP then only sends output to /dev/null (it comes twice when a terminal closes:
    from the terminal and from its shell). Signal handlers exist only in the main thread: elsewhere it never
    fires. A SIGHUP that the process ignores (under `nohup`) stays ignored. In a rank of torchrun's, `poll`
    records a SIGTERM once torchrun is gone.

    on_wait: called with the signal and whether another of it ends the process at once, from a thread of
    its own, where a first SIGINT or SIGTERM is not `acknowledge`d within NOTICE_AFTER seconds (a slow step
    went on after a Ctrl-C, which looked ignored); never after `acknowledge` has returned."""

    def __init__(self, on_wait: Callable[[signal.Signals, bool], None] | None = None) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}
        self._terminal: list[int] = []
        self._launcher: int | None = None  # torchrun's process id, in a rank it started
        self._on_wait = on_wait
        self._answered = threading.Event()  # (acknowledged, or the request's end)
        self._telling = threading.Lock()  # (held while on_wait runs: no notice after the acknowledgement)
        self._wake: tuple[int, int] | None = None  # a pipe: the handler writes, the watcher reads
        self._watcher: threading.Thread | None = None

    def poll(self) -> None:
        """A stop recorded as SIGTERM once torchrun, the launcher of this rank, is gone: killed by a signal
        it cannot pass on (SIGKILL, the OOM killer), its ranks, handed to another parent, trained on to
        the last step without a word and held the run's lock."""
        if self.signal is None and self._launcher is not None and os.getppid() != self._launcher:
            self.signal = signal.SIGTERM

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (torchrun gone too: asked between a validation's batches and a
        sample's bytes, not only at the steps' agreement)."""
        self.poll()
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        # after a hangup, writing to the terminal fails (EIO), and a failed print must not stop the save that
        # follows: its outputs go to /dev/null (nohup's redirection, made late)
        if signum == signal.SIGHUP:
            to_devnull(self._terminal)
        self.signal = signal.Signals(signum)
        if self._wake is not None and signum != signal.SIGHUP:  # (a write: no lock a handler could meet)
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"s")
        for number, handler in self._previous.items():  # (SIGHUP's set at once: no moment at its default)
            if number == signal.SIGHUP:  # (a shell that loses its terminal sends its own SIGHUP too)
                handler = lambda *_: to_devnull(self._terminal)  # noqa: E731
            elif self._term_ignored(number, handler):
                handler = ignore_signal
            signal.signal(number, handler)

    def _term_ignored(self, number: int, handler) -> bool:
        """Whether a SIGTERM after the first stop is ignored until the process ends: in a rank of torchrun's,
        where a scheduler (SLURM, systemd) sends SIGTERM to every process of the job and torchrun passes its
        own on, so each rank gets two; the second killed the rank in its save or its last words (torchrun and
        the scheduler send SIGKILL later, where a save takes too long)."""
        return number == signal.SIGTERM and handler is signal.SIG_DFL and "LOCAL_RANK" in os.environ

    def __enter__(self) -> StopRequest:
        # (TORCHELASTIC_RUN_ID: set by torchrun's agent alone, not by ranks started by hand)
        if "TORCHELASTIC_RUN_ID" in os.environ:
            self._launcher = os.getppid()
        if threading.current_thread() is threading.main_thread():
            self._terminal = _terminal_outputs()
            handlers = {number: signal.getsignal(number) for number in STOPS}
            ignored = handlers[signal.SIGHUP] in (signal.SIG_IGN, None)  # (under nohup: stays so)
            self._previous = {n: h for n, h in handlers.items() if not (ignored and n == signal.SIGHUP)}
            if self._on_wait is not None:  # (first: no handler left installed where it fails)
                self._start_watching()
            for number in self._previous:
                signal.signal(number, self._handle)
        return self

    def _start_watching(self) -> None:
        """The watcher thread and its pipe; none (and no notice) where the process has no descriptor or thread
        left for them (`ulimit -n`)."""
        try:
            self._wake = os.pipe()
        except OSError:
            return
        # (its end of the pipe as an argument: a thread that starts late must not find _wake gone)
        self._watcher = threading.Thread(
            target=self._watch, args=(self._wake[0],), name="htcli-stop-notice", daemon=True
        )
        try:
            self._watcher.start()
        except RuntimeError:
            for fd in self._wake:
                os.close(fd)
            self._wake = self._watcher = None

    def acknowledge(self) -> None:
        """The stop is being acted on: `on_wait` is not called from now on (one being called finishes first,
        unless it takes over TELL_WAIT seconds: a stderr that nobody reads)."""
        got = self._telling.acquire(timeout=TELL_WAIT)
        self._answered.set()
        if got:
            self._telling.release()

    def _watch(self, wake: int) -> None:
        """Waits for the handler's word on `wake`, then NOTICE_AFTER seconds for the acknowledgement; a notice
        that cannot be given (a closed terminal) is left out: it must not end the run."""
        try:
            woken = os.read(wake, 1) == b"s"
        except OSError:
            return
        if not woken or self._answered.wait(NOTICE_AFTER):
            return
        with self._telling:
            if not self._answered.is_set() and self.signal is not None:  # (acknowledged meanwhile: none)
                with contextlib.suppress(Exception):
                    self._on_wait(self.signal, _quits(signal.getsignal(self.signal)))

    def _stop_watching(self) -> None:
        self.acknowledge()
        wake, self._wake = self._wake, None  # (first: a handler that runs now writes to no closed pipe)
        if wake is None:
            return
        with contextlib.suppress(OSError):
            os.write(wake[1], b"q")
        self._watcher.join(timeout=TELL_WAIT)  # (a notice being printed finishes first)
        for fd in wake:
            os.close(fd)
        self._watcher = None

    def __exit__(self, *exc) -> None:
        """The handlers as they were; after a SIGHUP, SIGHUP stays ignored (the terminal is gone: a late
        one would end the saved run's last words, or a library caller's next run)."""
        self._stop_watching()
        for number, handler in self._previous.items():
            hung_up = number == signal.SIGHUP and self.signal == signal.SIGHUP
            terminated = self.signal is not None and self._term_ignored(number, handler)
            signal.signal(number, signal.SIG_IGN if hung_up else ignore_signal if terminated else handler)


def _quits(handler: object) -> bool:
    """Whether a signal with this handler ends the process at once (a Ctrl-C ignored before the run, as in
    a background job, stays so after its first: "Ctrl-C again quits" would not hold)."""
    return handler in (signal.SIG_DFL, signal.default_int_handler, _raise_terminated)


def ignore_signal(signum, frame) -> None:
    """A signal ignored by a Python handler, not SIG_IGN: one that had arrived when its handler became SIG_IGN
    (a rank's SIGTERM with the Ctrl-C that torchrun passes on) was printed as "OSError: Signal 15 ignored
    due to race condition" with a traceback of whatever ran then."""


class Terminated(BaseException):
    """Raised by SIGTERM under `terminate_unwinds` (a BaseException, as KeyboardInterrupt is, so that no
    `except Exception` takes it for an error to handle)."""


def import_whole(*modules: str) -> None:
    """Import modules (torch, matplotlib) with Ctrl-C, SIGTERM and SIGHUP held until they are in, then
    taken: one raised inside an extension's import broke it. torch's C initialisation imports numpy and
    swallows what that raises, so a Ctrl-C there was lost (the command ran on), or left numpy half made
    (a RecursionError or "numpy has no attribute multiply" later); a SIGTERM raised through its C++ aborted
    the process (SIGABRT, no line); matplotlib's turned into an ImportError (review). A second one quits at
    once (an import that hangs: a filesystem that does not answer)."""
    with signals_held(quits=f"stopped while importing {', '.join(modules)}; nothing was written"):
        for name in modules:
            importlib.import_module(name)


def stop_within(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Terminated that error is, or was raised from (None if neither): Python 3.11
    turns one raised while a class is made (an attribute's __set_name__, as in a dataclass, many of which
    torch's lazy imports make) into RuntimeError("Error calling __set_name__ ...") from it."""
    while error is not None and not isinstance(error, KeyboardInterrupt | Terminated):
        error = error.__cause__
    return error


@contextlib.contextmanager
def stops_unwrapped() -> Iterator[None]:
    """An exception raised from a Ctrl-C or SIGTERM (see stop_within) leaves the block as that stop."""
    try:
        yield
    except Exception as error:
        stop = stop_within(error)
        if stop is None:
            raise
        raise stop from None


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
        if signal.getsignal(signal.SIGTERM) is _raise_terminated:  # (not where AFTER_COMMAND changed it)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def signals_held(quits: str | None = None) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP that come inside the block are delivered when it ends, to the handlers in
    place then: so that starting a child process (subprocess.Popen) is not cut between its fork and the
    caller holding it, which would leave the child running on its own. Main thread only (else a no-op).
    quits: where the block may take long (an import from a slow filesystem), a second Ctrl-C or SIGTERM in
    it ends the process at once with this line ("interrupted: " + quits), exit 130 or 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum, frame) -> None:
        if quits is not None and signum in caught and signum in SIGNALS:
            _end_at_once(signum, quits)
        caught.append(signum)

    # (one this process ignores stays ignored, so that the child inherits it so: a background job's worker
    # died of a Ctrl-C that its parent, ignoring it, did not stop on; the bench went on without it)
    held = [signum for signum in STOPS if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, hold) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught:
            signal.raise_signal(signum)


_BEFORE_START: dict[int, object] = {}  # the handlers quit_until_started replaced


def _end_at_once(signum: int, said: str) -> None:
    """The process ended now by SIGINT or SIGTERM, with one line ("interrupted: " + said) and exit code 128
    + the signal's number: from a handler, where nothing is half written."""
    what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    try:
        os.write(2, f"{what}: {said}\n".encode())
    except OSError:  # (stderr closed, or a pipe nobody reads: end all the same)
        pass
    os._exit(128 + signum)


def _quit_before_start(signum, frame) -> None:
    _end_at_once(signum, "stopped before starting; nothing was written")


def quit_until_started() -> None:
    """Until `started()`, SIGINT and SIGTERM end the process at once with one line on stderr and exit code
    128 + the signal's number (130, 143): for the command line's first second (importing and parsing),
    where nothing is written yet and Python's own handling prints a traceback (Ctrl-C) or nothing
    (SIGTERM). A signal that the process ignores (a background job's SIGINT) stays ignored, as does one
    whose handler Python did not install (which could not be put back)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in SIGNALS:
        previous = signal.getsignal(number)
        if previous not in (signal.SIG_IGN, None) and previous is not _quit_before_start:
            _BEFORE_START[number] = previous
            signal.signal(number, _quit_before_start)


def started() -> None:
    """The handlers that quit_until_started replaced, back (where its own are still installed)."""
    for number, previous in list(_BEFORE_START.items()):
        if signal.getsignal(number) is _quit_before_start:
            signal.signal(number, previous)
        del _BEFORE_START[number]
