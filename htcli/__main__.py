"""`htcli` and `python -m htcli`: the command line, with Ctrl-C and SIGTERM answered by one line from the
process's first moment (importing the command line takes a second)."""

from htcli.stop import quit_until_started


def main() -> None:
    quit_until_started()  # until a command starts: cli._user_errors calls stop.started()
    from htcli.cli import run

    run()


if __name__ == "__main__":
    main()
