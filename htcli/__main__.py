"""`htcli` and `python -m htcli`: the command line, with Ctrl-C and SIGTERM answered by one line from the
process's first moment (importing the command line takes a second)."""

import atexit
import os
import signal

from htcli.stop import SIGNALS, quit_until_started


def _ignore_stops() -> None:
    """SIGINT and SIGTERM ignored for the rest of Python's exit: where its module teardown (torch's takes
    half a second) begins, Python puts their handlers back to the system's default, so that one arriving
    then killed the process, exit 130 or 143 with no word, after a command that had finished (a job
    script read a run that was complete as interrupted)."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def main() -> None:
    quit_until_started()  # until a command starts: cli.common.user_errors calls stop.started()
    atexit.register(_ignore_stops)  # (first registered: the last to run)
    from htcli.cli import run

    code = 1
    try:
        run()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
        raise
    finally:
        # the command is over, its files saved or cleaned up: a Ctrl-C or SIGTERM now (a second Ctrl-C,
        # pressed as the first one's save ends) would break into Python's exit (torch's atexit hooks) with a
        # traceback; it ends the process at once, quietly, with the command's exit code
        for number in SIGNALS:
            signal.signal(number, lambda *_: os._exit(code))


if __name__ == "__main__":
    main()
