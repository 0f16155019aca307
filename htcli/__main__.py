"""`htcli` and `python -m htcli`: the command line, with Ctrl-C and SIGTERM answered by one line from the
process's first moment (importing the command line takes a second)."""

import signal

from htcli.stop import quit_until_started


def main() -> None:
    quit_until_started()  # until a command starts: cli._user_errors calls stop.started()
    from htcli.cli import run

    try:
        run()
    finally:
        # the command is over, its files saved or cleaned up: a Ctrl-C now (a second one, pressed as the
        # first one's save ends) would only break into Python's exit (torch's atexit hooks) with a
        # traceback, and the exit code would be the command's all the same
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
