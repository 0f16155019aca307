"""`htcli` and `python -m htcli`: the command line, with Ctrl-C and SIGTERM answered by one line from the
process's first moment (importing the command line takes a second)."""

import atexit
import os
import signal
import sys

from htcli.stop import AFTER_COMMAND, SIGNALS, ignore_signal, quit_until_started

INTERRUPTED = 128 + signal.SIGINT  # the exit code of a command that a Ctrl-C stopped
_ending = [None]  # the command's exit code, once it is over


def _last_of_exit() -> None:
    """The last of Python's exit hooks (threads joined, the other hooks run). SIGINT and SIGTERM ignored
    from here on: where its module teardown (torch's takes half a second) begins, Python puts their
    handlers back to the system's default, so that one arriving then killed the process, exit 130 or 143
    with no word, after a command that had finished (a job script read a run that was complete as
    interrupted). And a command that a Ctrl-C stopped ends here, with its code: where the Ctrl-C's
    KeyboardInterrupt was raised in code that exec() ran from a string (dataclasses make classes so, in
    imports a command's first operations start), Python kept it as "unhandled" however it was answered,
    and would end the process by SIGINT after its teardown (exit -2, not 130; CPython gh-128130)."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if _ending[0] == INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # (closed, or a pipe whose reader ended: as Python's exit would)
                pass
        os._exit(INTERRUPTED)


def _stops_change_nothing() -> None:
    """Once a command's work is over (cli.common.user_errors' end), Ctrl-C and SIGTERM change nothing until
    main's end sets how they end the process: one in between, as typer returned, killed a process whose
    run had finished (SIGTERM: -15) or raised into Python's exit (Ctrl-C: a traceback, -2; review)."""
    for number in SIGNALS:
        signal.signal(number, ignore_signal)


def main() -> None:
    quit_until_started()  # until a command starts: cli.common.user_errors calls stop.started()
    atexit.register(_last_of_exit)  # (first registered: the last to run)
    AFTER_COMMAND.append(_stops_change_nothing)
    from htcli.cli import run

    code = 1
    try:
        run()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
        raise
    finally:
        _ending[0] = code
        # the command is over, its files saved or cleaned up: a Ctrl-C or SIGTERM now (a second Ctrl-C,
        # pressed as the first one's save ends) would break into Python's exit (torch's atexit hooks) with a
        # traceback; it ends the process at once, quietly, with the command's exit code
        for number in SIGNALS:
            signal.signal(number, lambda *_: os._exit(code))


if __name__ == "__main__":
    main()
