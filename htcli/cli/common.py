"""What every command shares: the Typer app, the consoles, the options every command spells the same way,
the field-to-flag table, and the one error boundary (`user_errors`) that turns a library error, Ctrl-C or
a failed write into one line and an exit code.

The library names things by their config fields (`max_seq_len`); the command line alone knows the flags
that set them (`--seq-len`), through `flag()`, and respells the fields in the library's error messages
as those flags. torch and everything that imports it are imported inside the commands, so `htcli --help`
is instant.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from htcli import __version__
from htcli.config import train_default
from htcli.environment import check_environment
from htcli.errors import HtcliError, room_advice, unreadable_advice
from htcli.help_layout import Group, with_default
from htcli.stop import (
    Terminated,
    command_over,
    import_whole,
    started,
    stops_unwrapped,
    terminate_unwinds,
    to_devnull,
)

# the fields whose flag is not `--` + the field's name with dashes (`batch_size` -> `--batch-size`)
FLAGS = {
    "max_seq_len": "--seq-len",
    "seq_lens": "--seq-len",
    "json_output": "--json",
    "plot_path": "--plot",
    "loggers": "--logger",
    "config_file": "--config",
}

app = typer.Typer(
    cls=Group,
    name="htcli",
    help="Train, sample, evaluate and benchmark long-context H-Transformer-1D byte-level language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # (every command's: -h was "No such option")
)


SIZES = ("COLUMNS", "LINES")  # the terminal's size, as the environment may say it


def _usable(size: str) -> bool:
    """Whether an environment's COLUMNS or LINES is a size: a whole number above 0."""
    return size.strip().isdecimal() and int(size) > 0


class _SizedEnviron(Mapping):
    """os.environ as it is at each read, without a COLUMNS or LINES that is not a size."""

    def __getitem__(self, name: str) -> str:
        value = os.environ[name]
        if name in SIZES and not _usable(value):
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in os.environ if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # (a closed stream)
        return False


class _Console(Console):
    """A console whose pipe closed early (`| head`) is an OSError the commands handle (rich's own answer,
    SystemExit(1) at once after sending stdout to /dev/null, lost a stopped run's exit code 75 and its line
    on how to continue; on stderr's console it ended a training run unsaved, without a word)."""

    def __init__(self, **kwargs) -> None:
        stream = sys.stderr if kwargs.get("stderr") else sys.stdout
        piped = not _isatty(stream) and os.environ.get("TTY_COMPATIBLE") != "1"  # (rich's: a log that moves)
        if os.environ.get("FORCE_COLOR") and piped:  # colours asked for, into a file or pipe:
            # (rich took FORCE_COLOR for a terminal: spinners and cursor moves went into the log too)
            kwargs |= {"force_terminal": False, "color_system": "256"}
        # (COLUMNS=0: rich printed nothing, errors' lines too; COLUMNS=²: a ValueError on import, in rich)
        # (highlight: rich's colouring of what looks like numbers coloured "1." of 1.1MB and "3", ",", "000")
        super().__init__(_environ=_SizedEnviron(), **{"highlight": False, **kwargs})

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


console = _Console()
err_console = _Console(stderr=True)


def flag(field: str) -> str:
    """The command-line flag that sets a config field."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def respell(message: str, fields: Iterable[str], spell: Callable[[str], str] | None = None) -> str:
    """A library message with the config fields it names written as their flags, or as spell writes them (a
    word of a path, as out in runs/out or runs/out.txt, is not a field)."""
    for name in fields:
        message = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w-]|[./]\w)", (spell or flag)(name), message)
    return message


# options every command spells the same way (train's are None when not given, for --resume)
DEVICE = typer.Option(
    "--device",
    help="Where to run: auto (the default: CUDA, else MPS, else CPU), cpu, cuda or mps.",
    show_default=False,
)
DTYPE = typer.Option(
    "--dtype",
    help="Mixed precision: auto (the default: bf16 on a CUDA GPU with bf16, else fp32; training also uses"
    " bf16 on a CPU with AMX or AVX-512 BF16), fp32, bf16, fp16.",
    show_default=False,
)
SEED = typer.Option("--seed", help="Random seed (default 0): same seed, same result.", show_default=False)
JSON = typer.Option(flag("json_output"), help="Print one JSON object on stdout instead of tables.")
Device = Annotated[str, DEVICE]
Dtype = Annotated[str, DTYPE]
Seed = Annotated[int, SEED]
JsonOutput = Annotated[bool, JSON]


def parse_path(text: str) -> Path:
    """A path argument, refused when empty (Path("") is ".", the current directory: "no checkpoint at .")."""
    if not text:
        raise typer.BadParameter(
            "an empty path was given (an unset shell variable?): name a file or directory"
        )
    return Path(text)


Checkpoint = Annotated[
    Path,
    typer.Argument(
        parser=parse_path, help="A run directory (as written by `htcli train --out`) or a .safetensors file."
    ),
]
Corpus = Annotated[
    list[str] | None,
    typer.Argument(
        help="Text or binary files, directories (the files below, hidden ones aside), glob patterns; "
        ".gz, .zst, .bz2 and .xz files; JSONL (.jsonl, .jsonl.gz, ...) and Parquet files (a text field "
        "per record).",
        show_default=False,
    ),
]


def train_option(help: str, field: str | None = None, **kwargs) -> typer.Option:
    """A train option, None when not given (a resumed run keeps its saved value)."""
    names = [flag(field)] if field else []
    return typer.Option(*names, help=with_default(help, train_default(field)) if field else help, **kwargs)


def switch(name: str, help: str) -> typer.Option:
    return typer.Option(f"--{name}/--no-{name}", help=help, show_default=False)


@contextlib.contextmanager
def user_errors(
    *,
    start: bool = True,
    saves: bool = False,
    smaller: str = "model",
    streams: bool = False,
    spell: Callable[[str], str] = flag,
    needs: tuple[str, ...] = ("torch",),
) -> Iterator[None]:
    """An HtcliError becomes one red line on stderr and exit code 1; a second Ctrl-C exits 130, a SIGTERM
    outside a training loop's save-and-stop 143 (128 + 15, as the signal's default action), both after
    removing what they left half written. start: the command starts here (until then, from the process's
    first moment, a signal ends it at once: htcli.__main__); the callback that runs before every command
    does not start it. saves: the command writes checkpoints (train), and its messages say what is kept.
    smaller: what out of memory says to make smaller (the command's options). streams: the command's output
    is a stream that its reader may close when it has enough (`htcli sample ... | head -c 100`): a closed pipe
    then ends the command without a word, exit code 141 (128 + SIGPIPE's 13, as `yes | head` ends `yes`).
    spell: how a message names the fields it is about (the command's flags). needs: the modules the command
    imports first, whole (stop.import_whole: a Ctrl-C inside torch's import was lost or broke numpy)."""
    if start:
        started()
    kept = (
        "stopped without saving; any checkpoint saved before is intact"
        if saves
        else "stopped; no file was changed"
    )
    kept_too = "; any checkpoint saved before is intact" if saves else ""  # (after an error's own words)
    try:
        with terminate_unwinds(), stops_unwrapped():
            try:
                if start:
                    import_whole(*needs)
                yield
            finally:
                if start:  # (the command line's process: stops from here on keep its exit code)
                    command_over()
    except HtcliError as error:
        message = respell(str(error), error.fields, spell)
        _print_error(message)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted: {kept}", soft_wrap=True)
        raise typer.Exit(130) from None
    except Terminated:
        err_console.print(f"[yellow]terminated (SIGTERM): {kept}", soft_wrap=True)
        raise typer.Exit(143) from None
    except OSError as error:  # (the library's own are HtcliErrors: a path it cannot reach, full stdout)
        if streams and error.errno == errno.EPIPE and error.filename is None:
            with contextlib.suppress(OSError, ValueError):  # (its unwritten bytes would fail again at exit)
                to_devnull([sys.stdout.fileno(), sys.stderr.fileno()])
            raise typer.Exit(CLOSED_PIPE) from None
        report_os_error(error, kept_too)
        raise typer.Exit(1) from None
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        err_console.print(f"[red]error:[/] out of memory: use a smaller {smaller}{kept_too}", soft_wrap=True)
        raise typer.Exit(1) from None


# click's errors, from typer's own click (typer 0.24 and later vendor one) or the click package
_CLICK_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


CLOSED_PIPE = 128 + 13  # the exit code of a stream's command whose reader closed the pipe (SIGPIPE's)


# what writing to stdout fails with: a full disk or quota, a closed pipe, a failed device, a file too large
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EPIPE, errno.EIO, errno.EFBIG}


def _output_error(error: OSError) -> bool:
    """Whether error is (likely) a failed write of the output: no file named, an output errno."""
    return error.filename is None and error.errno in OUTPUT_ERRNOS


def os_error_line(error: OSError) -> str:
    """One line for an OSError that reached a command: the path it concerns where it names one, the
    output that could not be written, or what it says."""
    said = error.strerror or str(error)
    if isinstance(error, PermissionError) and error.filename is not None:
        return f"{error.filename}: {said}: give a path you may read (and write, for a run), or change that"
    if error.errno == errno.ENAMETOOLONG and error.filename is not None:
        return f"{error.filename}: {said}: give a shorter name or path"
    if error.errno in (errno.EMFILE, errno.ENFILE):  # (any file: a module's, a checkpoint's; not its fault)
        return f"{error.filename or 'a file'}: {said}: {unreadable_advice(error)}"
    if error.filename is not None:
        return f"{error.filename}: {said}"
    if not _output_error(error):
        return str(error)
    # (a closed pipe: its reader ended, nothing to mend)
    mend = room_advice(error.errno) or ("check the device" if error.errno == errno.EIO else None)
    return f"cannot write the output: {said}" + (f": {mend}, or send the output elsewhere" if mend else "")


def report_os_error(error: OSError, said_too: str = "", *, output: bool = False) -> None:
    """The OSError's one line on stderr. Where the output failed (output: known to have), stdout goes to
    /dev/null first: its unwritten bytes would fail again at the exit's flush, and say so again (or as a
    traceback)."""
    if output or _output_error(error):
        with contextlib.suppress(OSError, ValueError):  # (a stream without a file descriptor: left as it is)
            to_devnull([sys.stdout.fileno()])
    _print_error(os_error_line(error) + said_too)


def _print_error(message: str) -> None:
    """The one red line of an error on stderr; bytes of a name that are not UTF-8 (Python holds them as
    surrogates) shown as \\xe9, as plot and the checkpoint's checks show them (they came out as \\udce9),
    and control characters as \\x1b (a name's newline broke the line, its escape sequences reached the
    terminal)."""
    from htcli.display import one_line
    from htcli.files import printable

    err_console.print(f"[red]error:[/] {escape(one_line(printable(message)))}", soft_wrap=True)


def _end_output(code: int) -> None:
    """Flush stdout after a command that ended with this exit code; where that fails (a full disk, a closed
    pipe), one line, and exit code 1 unless the command's was already another (a run stopped and saved by
    SIGTERM keeps its 75)."""
    try:
        sys.stdout.flush()
    except OSError as error:
        report_os_error(error, output=True)
        sys.exit(code or 1)


def _no_zero_sizes() -> None:
    """COLUMNS or LINES that is not a size (0, as some CI systems and editors' shells export, made rich print
    nothing, typer's help and the errors' lines too) taken as unset: the terminal's size, else 80 columns
    (for typer's console, made later, and the processes this one starts; htcli's own skip it)."""
    for name in SIZES:
        if not _usable(os.environ.get(name, "1")):
            del os.environ[name]


def run(args: list[str] | None = None) -> None:
    """The command line as the `htcli` script runs it (args: sys.argv[1:] when None), with click's own
    errors (an unknown option or command, a value of the wrong type, a missing argument) as one line on
    stderr that names the command's --help, exit code 2, instead of typer's box of four lines or more."""
    if sys.stdout is None:  # (started with stdout closed, `htcli ... >&-`)
        err_console.print(
            "[red]error:[/] stdout is closed: send it to a file or to /dev/null", soft_wrap=True
        )
        sys.exit(1)
    _no_zero_sizes()
    if getattr(sys.stdout, "errors", None) in ("strict", "surrogateescape") and hasattr(
        sys.stdout, "reconfigure"
    ):
        # (a name stdout's encoding lacks, a run rün's in a table on an ASCII stdout, was a traceback after
        # the command had done its work: shown as r\xfcn, as stderr shows it)
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        code = app(args, prog_name="htcli", standalone_mode=False)
    except _CLICK_ERROR as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # typer has printed the help
            sys.exit(2)
        context = getattr(error, "ctx", None)
        help_command = f"{context.command_path if context else _command_path(args)} --help"
        message = " ".join(error.format_message().split())
        if help_command == "htcli sample --help" and message.startswith("Got unexpected extra argument"):
            message += (
                "; a prompt is given with --prompt TEXT (or --prompt-file)"  # (`htcli sample run "Hi"`)
            )
        _print_error(f"{message} (see {help_command})")
        sys.exit(error.exit_code)
    except typer.Abort:
        err_console.print("[yellow]aborted", soft_wrap=True)
        sys.exit(1)
    except OSError as error:  # (outside a command: --help or --version to a full disk)
        report_os_error(error)
        sys.exit(1)
    code = code if isinstance(code, int) else 0
    _end_output(code)
    sys.exit(code)


def _command_path(args: list[str] | None) -> str:
    """`htcli COMMAND` for the command that args name, or `htcli`: for click's errors that come without their
    command's context (an option given without its value: `htcli sample RUN --stop`)."""
    commands = typer.main.get_command(app).commands
    named = next((arg for arg in (sys.argv[1:] if args is None else args) if not arg.startswith("-")), None)
    return f"htcli {named}" if named in commands else "htcli"


def _out_of_memory(error: BaseException) -> bool:
    """Whether error is an allocation that failed: Python's MemoryError, torch's on a GPU
    (torch.OutOfMemoryError, a RuntimeError) or on the CPU (a RuntimeError from its allocator)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    message = str(error)
    return any(sign in message for sign in ("can't allocate memory", "std::bad_alloc", "out of memory"))


def _version(value: bool) -> None:
    if value:
        print(f"htcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """htcli: hierarchical-attention transformers for long contexts, on one GPU or a CPU."""
    with user_errors(start=False):
        check_environment()


# corpus options of train and eval
TextField = Annotated[
    str | None, train_option("JSONL and Parquet files: the field holding each record's text", "text_field")
]
SkipBadRecords = Annotated[
    bool | None,
    switch(
        "skip-bad-records", "JSONL and Parquet: leave out bad records (and say how many) instead of stopping."
    ),
]
IncludeHidden = Annotated[
    bool | None, switch("include-hidden", "Read hidden files and directories (.*) inside named directories.")
]
