"""`htcli` and `python -m htcli`: the command line, with Ctrl-C and SIGTERM answered by one line from the
process's first moment (importing the command line takes a second)."""

import os
import signal

from htcli.stop import quit_until_started


def main() -> None:
    quit_until_started()  # until a command starts: cli._user_errors calls stop.started()
    from htcli.cli import run

    code = 1
    try:
        run()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
        raise
    finally:
        # the command is over, its files saved or cleaned up: a Ctrl-C now (a second one, pressed as the
        # first one's save ends) would break into Python's exit (torch's atexit hooks) with a traceback;
        # it ends the process at once, quietly, with the command's exit code
        signal.signal(signal.SIGINT, lambda *_: os._exit(code))


if __name__ == "__main__":
    main()
