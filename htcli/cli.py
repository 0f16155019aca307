"""The command-line interface: parses options, calls a library function, prints.

The library names things by their config fields (`max_seq_len`); this module alone knows the flags
that set them (`--seq-len`), through `flag()`, and respells the fields in the library's error
messages as those flags. torch and everything that imports it are imported inside the commands, so
`htcli --help` is instant.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import itertools
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from htcli import __version__
from htcli.config import MAX_SEED, train_default
from htcli.environment import check_environment
from htcli.errors import HtcliError, unreadable_advice
from htcli.help_layout import Command, Group, with_default
from htcli.presets import DEFAULT_PRESET, PRESETS
from htcli.stop import Terminated, started, terminate_unwinds, to_devnull

MAX_SAMPLES = 4096  # sample --num-samples: one batch, one decode cache per sample
PREEMPTED = 75  # exit code of a run stopped (and saved) by SIGTERM: EX_TEMPFAIL, "try again later"
HUNG_UP = 129  # exit code of a run stopped (and saved) by SIGHUP: 128 + 1, as the signal's default action
STOP_CODES = {"SIGTERM": PREEMPTED, "SIGHUP": HUNG_UP}  # (a Ctrl-C's save and stop exits 0)
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
        super().__init__(_environ=_SizedEnviron(), **kwargs)

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
    help="Mixed precision: auto (the default: bf16 on a CUDA GPU with bf16, else fp32; train's also bf16 on a"
    " CPU with AMX or AVX-512 BF16), fp32, bf16, fp16.",
    show_default=False,
)
SEED = typer.Option("--seed", help="Random seed (default 0): same seed, same result.", show_default=False)
JSON = typer.Option(flag("json_output"), help="Print one JSON object on stdout instead of tables.")
Device = Annotated[str, DEVICE]
Dtype = Annotated[str, DTYPE]
Seed = Annotated[int, SEED]
JsonOutput = Annotated[bool, JSON]


def _path(text: str) -> Path:
    """A path argument, refused when empty (Path("") is ".", the current directory: "no checkpoint at .")."""
    if not text:
        raise typer.BadParameter(
            "an empty path was given (an unset shell variable?): name a file or directory"
        )
    return Path(text)


Checkpoint = Annotated[
    Path,
    typer.Argument(
        parser=_path, help="A run directory (as written by `htcli train --out`) or a .safetensors file."
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


def _option(help: str, field: str | None = None, **kwargs) -> typer.Option:
    """A train option, None when not given (a resumed run keeps its saved value)."""
    names = [flag(field)] if field else []
    return typer.Option(*names, help=with_default(help, train_default(field)) if field else help, **kwargs)


def _switch(name: str, help: str) -> typer.Option:
    return typer.Option(f"--{name}/--no-{name}", help=help, show_default=False)


@contextlib.contextmanager
def _user_errors(
    *, start: bool = True, saves: bool = False, smaller: str = "model", streams: bool = False
) -> Iterator[None]:
    """An HtcliError becomes one red line on stderr and exit code 1; a second Ctrl-C exits 130, a SIGTERM
    outside a training loop's save-and-stop 143 (128 + 15, as the signal's default action), both after
    removing what they left half written. start: the command starts here (until then, from the process's
    first moment, a signal ends it at once: htcli.__main__); the callback that runs before every command
    does not start it. saves: the command writes checkpoints (train), and its messages say what is kept.
    smaller: what out of memory says to make smaller (the command's options). streams: the command's output
    is a stream that its reader may close when it has enough (`htcli sample ... | head -c 100`): a closed pipe
    then ends the command without a word, exit code 141 (128 + SIGPIPE's 13, as `yes | head` ends `yes`)."""
    if start:
        started()
    kept = (
        "stopped without saving; any checkpoint saved before is intact"
        if saves
        else "stopped; no file was changed"
    )
    kept_too = "; any checkpoint saved before is intact" if saves else ""  # (after an error's own words)
    try:
        with terminate_unwinds():
            yield
    except HtcliError as error:
        message = respell(str(error), error.fields)
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
        _report_os_error(error, kept_too)
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


def _os_error(error: OSError) -> str:
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
    return f"cannot write the output: {said}" if _output_error(error) else str(error)


def _report_os_error(error: OSError, said_too: str = "", *, output: bool = False) -> None:
    """The OSError's one line on stderr. Where the output failed (output: known to have), stdout goes to
    /dev/null first: its unwritten bytes would fail again at the exit's flush, and say so again (or as a
    traceback)."""
    if output or _output_error(error):
        with contextlib.suppress(OSError, ValueError):  # (a stream without a file descriptor: left as it is)
            to_devnull([sys.stdout.fileno()])
    _print_error(_os_error(error) + said_too)


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
        _report_os_error(error, output=True)
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
        _print_error(f"{message} (see {help_command})")
        sys.exit(error.exit_code)
    except typer.Abort:
        err_console.print("[yellow]aborted", soft_wrap=True)
        sys.exit(1)
    except OSError as error:  # (outside a command: --help or --version to a full disk)
        _report_os_error(error)
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
    with _user_errors(start=False):
        check_environment()


# train's options, None when not given (a resumed run keeps its saved value)
DEFAULT_OUT = "runs/htcli"
OutDir = Annotated[
    str | None,
    typer.Option(
        help=f"Run directory: checkpoint, config.json, log.jsonl (default {DEFAULT_OUT}).", show_default=False
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        flag("config_file"),
        parser=_path,
        help="Options from a TOML file (keys spelled like the options: seq-len = 2048) or a run's "
        "config.json; options given here override it.",
        show_default=False,
    ),
]
PrintConfig = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved configuration as TOML and exit.")
]
Loggers = Annotated[
    list[str] | None,
    typer.Option(
        flag("loggers"),
        help="Also log to tensorboard (event files in --out) or wandb (Weights & Biases); repeat for "
        "both. log.jsonl is always written.",
        show_default=False,
    ),
]
Resume = Annotated[
    str | None,
    typer.Option(
        "--resume",
        metavar="[auto]",
        help="Continue the run in --out exactly where its checkpoint left it (an error if it has none); "
        "--resume auto: continue if --out holds a checkpoint, else start it (one command to requeue).",
        show_default=False,
    ),
]
Preset = Annotated[
    str | None, typer.Option(help=f"Model size: {', '.join(PRESETS)} (default {DEFAULT_PRESET}).")
]
Val = Annotated[
    list[str] | None, _option("Validation corpus (repeat for several); default: the end of CORPUS.")
]
TextField = Annotated[
    str | None, _option("JSONL and Parquet files: the field holding each record's text", "text_field")
]
SkipBadRecords = Annotated[
    bool | None,
    _switch(
        "skip-bad-records", "JSONL and Parquet: leave out bad records (and say how many) instead of stopping."
    ),
]
IncludeHidden = Annotated[
    bool | None, _switch("include-hidden", "Read hidden files and directories (.*) inside named directories.")
]
ValFraction = Annotated[
    float | None, _option("Without --val, hold out this last fraction of CORPUS", "val_fraction")
]
Dim = Annotated[int | None, _option("Model width (overrides the preset).")]
Depth = Annotated[int | None, _option("Number of layers.")]
Heads = Annotated[int | None, _option("Attention heads.")]
DimHead = Annotated[int | None, _option("Width of one head.")]
BlockSize = Annotated[int | None, _option("H-attention block size (even, divides --seq-len).")]
SeqLen = Annotated[
    int | None, typer.Option(flag("max_seq_len"), help="Context length in bytes: the training window.")
]
AttentionKind = Annotated[
    str | None,
    _option(
        "Attention: h (hierarchical, O(n): the default) or exact (softmax attention through SDPA, O(n^2): "
        "the baseline to compare with)."
    ),
]
# the model switches' defaults, every preset's (the model config's: tests/test_cli.py holds them to it)
MODEL_DEFAULTS = dict(
    reversible="off", norm="layer", qk_norm="on", activation="relu2", logit_softcap=0, zero_init="off"
)


def _model_help(help: str, name: str) -> str:
    return with_default(help, MODEL_DEFAULTS[name])


Reversible = Annotated[
    bool | None,
    _switch("reversible", _model_help("Reversible layers: less activation memory", "reversible")),
]
Norm = Annotated[
    str | None, _option(_model_help("Normalisation: rms (RMSNorm) or layer (LayerNorm)", "norm"))
]
QkNorm = Annotated[
    bool | None, _switch("qk-norm", _model_help("RMSNorm of each head's queries and keys", "qk_norm"))
]
Activation = Annotated[
    str | None,
    _option(_model_help("Feed-forward activation: relu2 (ReLU squared) or gelu", "activation")),
]
LogitSoftcap = Annotated[
    float | None,
    _option(_model_help("Soft-cap the logits at this value (c * tanh(x / c)); 0: none", "logit_softcap")),
]
ZeroInit = Annotated[
    bool | None,
    _switch("zero-init", _model_help("Residual output projections start at zero", "zero_init")),
]
LevelDecay = Annotated[
    float | None,
    _option(
        "H-attention's locality prior A: at each coarser level a key weighs 2^-A as much for the first "
        "head, 2^-1 as much for the last, heads between spaced geometrically; 0: none (default 16; 0 with "
        "--attention exact)."
    ),
]
Optimizer = Annotated[
    str | None,
    _option("muon (Muon for the layers' matrices, AdamW for the rest) or adamw (AdamW for all)", "optimizer"),
]
ShiftTokens = Annotated[
    bool | None,
    _switch("shift-tokens", "Half of each byte's features from the previous byte's (default: on)."),
]
Steps = Annotated[int | None, _option("Optimizer steps for the whole run", "steps")]
BatchSize = Annotated[int | None, _option("Windows per micro-batch", "batch_size")]
GradAccum = Annotated[int | None, _option("Micro-batches per optimizer step", "grad_accum")]
Lr = Annotated[float | None, _option("Peak learning rate (default 6e-3 with muon, 3e-3 with adamw).")]
Warmup = Annotated[int | None, _option("Linear warmup steps", "warmup")]
ContextWarmup = Annotated[
    float | None,
    _option(
        "Fraction of the steps that train on short windows first (--context-warmup-start bytes, the same "
        "bytes per step), before --seq-len",
        "context_warmup",
    ),
]
ContextWarmupStart = Annotated[
    int | None, _option("Window length that --context-warmup starts from", "context_warmup_start")
]
MinLr = Annotated[
    float | None, _option("Learning rate at the last step, after cosine decay (default --lr / 10).")
]
WeightDecay = Annotated[
    float | None,
    _option(
        "Weight decay of the matrices and embeddings (AdamW's, and Muon's with --optimizer muon)",
        "weight_decay",
    ),
]
Clip = Annotated[float | None, _option("Gradient norm clip, 0 for none", "clip")]
EvalEvery = Annotated[int | None, _option("Steps between validations, 0: last only", "eval_every")]
EvalBatches = Annotated[int | None, _option("Batches per validation", "eval_batches")]
SaveEvery = Annotated[int | None, _option("Steps between checkpoints, 0: last only", "save_every")]
SampleEvery = Annotated[int | None, _option("Steps between shown samples, 0: never", "sample_every")]
Compile = Annotated[bool | None, _switch("compile", "torch.compile the model (default off).")]
SplitGlobalBatch = Annotated[
    bool | None,
    _switch(
        "split-global-batch",
        "Under torchrun: every process trains on its slice of one global batch drawn from --seed "
        "(the data order of one process with the whole batch) instead of its own windows (default off).",
    ),
]


class _TrainCommand(Command):
    """`htcli train`, whose --resume takes an optional value: `--resume` alone, or `--resume auto`."""

    PANELS = {
        "Corpus": "val val_fraction text_field skip_bad_records include_hidden",
        "Model": "preset dim depth heads dim_head block_size max_seq_len attention reversible shift_tokens "
        "norm qk_norm activation logit_softcap zero_init level_decay",
        "Optimisation": "steps optimizer batch_size grad_accum lr warmup context_warmup context_warmup_start "
        "min_lr weight_decay clip",
        "Validation, checkpoints, samples": "eval_every eval_batches save_every sample_every",
        "Hardware and logging": "device dtype compile seed split_global_batch loggers",
    }

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        given = [
            "--resume=yes" if arg == "--resume" and args[index + 1 : index + 2] != ["auto"] else arg
            for index, arg in enumerate(args)
        ]
        return super().parse_args(ctx, given)


@app.command(cls=_TrainCommand)
def train(
    corpus: Corpus = None,
    out: OutDir = None,
    resume: Resume = None,
    config_file: ConfigFile = None,
    print_config: PrintConfig = False,
    # every parameter below but preset is named like the TrainConfig or HTransformerConfig field it sets
    val: Val = None,
    val_fraction: ValFraction = None,
    text_field: TextField = None,
    skip_bad_records: SkipBadRecords = None,
    include_hidden: IncludeHidden = None,
    preset: Preset = None,
    dim: Dim = None,
    depth: Depth = None,
    heads: Heads = None,
    dim_head: DimHead = None,
    block_size: BlockSize = None,
    max_seq_len: SeqLen = None,
    attention: AttentionKind = None,
    reversible: Reversible = None,
    shift_tokens: ShiftTokens = None,
    norm: Norm = None,
    qk_norm: QkNorm = None,
    activation: Activation = None,
    logit_softcap: LogitSoftcap = None,
    zero_init: ZeroInit = None,
    level_decay: LevelDecay = None,
    steps: Steps = None,
    optimizer: Optimizer = None,
    batch_size: BatchSize = None,
    grad_accum: GradAccum = None,
    lr: Lr = None,
    warmup: Warmup = None,
    context_warmup: ContextWarmup = None,
    context_warmup_start: ContextWarmupStart = None,
    min_lr: MinLr = None,
    weight_decay: WeightDecay = None,
    clip: Clip = None,
    eval_every: EvalEvery = None,
    eval_batches: EvalBatches = None,
    save_every: SaveEvery = None,
    sample_every: SampleEvery = None,
    device: Annotated[str | None, DEVICE] = None,
    dtype: Annotated[str | None, DTYPE] = None,
    compile: Compile = None,
    seed: Annotated[int | None, SEED] = None,
    split_global_batch: SplitGlobalBatch = None,
    loggers: Loggers = None,
) -> None:
    """Train a byte-level model on CORPUS, with checkpoints, log.jsonl and config.json in --out.

    Ctrl-C saves a checkpoint and exits; --resume continues from it.

    On several GPUs or machines, start it with torchrun: `torchrun --nproc-per-node 8 -m htcli train ...`.
    """
    options = {k: v for k, v in locals().items() if k not in ("resume", "config_file", "print_config")}
    _train(options, resume, config_file, print_config)


def _train(options: dict, resume: str | None, config_file: Path | None, print_config: bool) -> None:
    with _user_errors(
        saves=True, smaller="--batch-size (with --grad-accum to keep the bytes per step), --seq-len or model"
    ):
        resume_as = _resume_as(resume)
        given = {name for name, value in options.items() if value is not None and value != []}
        options, from_file = _with_config_file(options, config_file)
        try:
            _train_with(options, resume_as, print_config, given)
        except HtcliError as error:
            raise _in_file(error, from_file, config_file) from None


def _train_with(options: dict, resume: bool | str, print_config: bool, given: set[str]) -> None:
    """train with these options (the command line's, named in given, over the config file's): its config
    printed, or the run, its summary and the exit code of a stop that saved."""
    from htcli.config import config_from_options

    config = config_from_options(
        options.pop("corpus", None) or [], out=_given(options.pop("out", None), DEFAULT_OUT),
        resume=resume, preset=options.pop("preset", None), **options,
    )  # fmt: skip
    _check_ignored(config, given)
    from htcli.rundir import resolve_resume

    _check_corpus_options(config, given, printed_new=print_config and not resolve_resume(resume, config.out))
    if print_config:
        return _print_config(config, resume)
    dropped = _dropped_loggers(config) if "loggers" in given and resolve_resume(resume, config.out) else ""
    with _finished_is_done(resume):
        _train_and_report(config, resume, dropped)


@contextlib.contextmanager
def _finished_is_done(resume: bool | str) -> Iterator[None]:
    """With --resume auto, a run that has trained all its steps is a note and exit code 0 (a job requeued
    after its run finished: it was an error and exit 1); with --resume, still the error."""
    from htcli.distributed import launch_from_env
    from htcli.rundir import RunFinished

    try:
        yield
    except RunFinished as finished:
        if resume != "auto":
            raise
        if launch_from_env().main:
            err_console.print(f"{escape(_finished(finished))}", soft_wrap=True)


def _finished(finished) -> str:
    """The note of a run that has trained all its steps (a RunFinished), where resume auto asked for it."""
    out, step = finished.out, finished.step
    return (
        f"{out} is already at step {step} of --steps {step}: finished, nothing to train (a larger --steps "
        "trains on)"
    )


def _train_and_report(config, resume: bool | str, dropped: str) -> None:
    """The run, shown as it trains, then its summary and the exit code of a stop that saved."""
    from htcli.display import TrainDisplay, train_summary
    from htcli.distributed import process_group
    from htcli.train import train as run_training

    shown = True  # (until stderr takes no more)
    with process_group(config.device) as launch, TrainDisplay(err_console, respell) as display:

        def on_event(event: dict) -> None:
            nonlocal shown
            if not shown:
                return
            try:
                if dropped and event["event"] == "start":  # (once the resume is taken, not before a refusal)
                    err_console.print(dropped, soft_wrap=True)
                display(event)
            except OSError:  # (stderr that takes no more: a closed pipe, a full disk): the run goes on unseen
                shown = False  # (it stopped the run unsaved, without a word: its error line failed too)
                to_devnull([2])

        result = run_training(config, resume=resume, on_event=on_event)
    if display.failed:  # (its last frame: what follows on stderr goes to /dev/null, the exit code kept)
        to_devnull([2])
    code = STOP_CODES.get(result.stopped_by, 0)
    if launch.main:
        try:
            console.print(train_summary(result))
        except OSError as error:  # (the run saved: a scheduler still learns why it stopped)
            if not code:
                raise
            _report_os_error(error, "; the run is saved")
        _how_to_continue(result, launch.world_size)
    if code:
        raise typer.Exit(code)


def _print_config(config, resume: bool | str) -> None:
    """config as TOML on stdout (a dry run): refused where the config contradicts itself or its checkpoint;
    what a run would refuse on this machine (which the config may be meant for another: a GPU it lacks, a
    corpus elsewhere), and the warm-up's warning, said on stderr."""
    from htcli.config_file import write_toml
    from htcli.device import resolve_device, resolve_dtype
    from htcli.display import context_warning, warmup_warning
    from htcli.distributed import launch_from_env
    from htcli.optim import context_schedule
    from htcli.rundir import RunFinished, check_resumable, resolve_resume
    from htcli.train_checks import start_refusal

    finished = None
    try:
        check_resumable(config, resume)  # (what a resume would refuse of its checkpoint)
    except RunFinished as error:
        if resume != "auto":
            raise
        finished = error
    if config.device == "cpu":  # (fp16 on a CPU: on any machine)
        resolve_dtype(config.dtype, resolve_device("cpu"), training=True)
    if not launch_from_env().main:  # (under torchrun, once: every rank printed it)
        return
    resuming = resolve_resume(resume, config.out)
    refused = start_refusal(config, resuming)
    if isinstance(refused, OSError):  # (said as train's error says it)
        refused = HtcliError(_os_error(refused))
    warnings = [warmup_warning(config.warmup, config.steps), finished and _finished(finished)]
    if not resuming:  # (a resumed run's is said from its step, when it starts)
        start = dict(context_schedule(config), seq_len=config.model.max_seq_len, steps=config.steps, step=0)
        warnings.append(context_warning(start))
    warnings += [
        f"a run on this machine would stop: {respell(str(refused), refused.fields)}" if refused else None
    ]
    for warning in filter(None, warnings):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    print(write_toml(config, _file_key), end="")


def _dropped_loggers(config) -> str:
    """The warning where a resume's --logger leaves out a logger of the run (its curves end there); ""."""
    from htcli.config import dropped_loggers
    from htcli.distributed import launch_from_env

    dropped = dropped_loggers(config)
    if not dropped or not launch_from_env().main:
        return ""
    names = " ".join(f"--logger {name}" for name in dropped)
    return (
        f"[yellow]warning:[/] --logger replaces the run's loggers: {', '.join(dropped)} gets no more of"
        f" this run; give {names} too to keep it"
    )


def _check_ignored(config, given: set[str]) -> None:
    """Options given on the command line that the run would ignore, refused: a held-out fraction beside
    held-out files, given or from the config file or the run (a config file's fraction gives way to --val),
    a context warm-up length with the warm-up off."""
    if "val" in given and "val_fraction" in given:
        raise HtcliError("--val and --val-fraction both choose the held-out bytes: give one of them")
    if "val_fraction" in given and config.val:  # (the val of a config file, or of the run resumed)
        raise HtcliError(
            "--val-fraction holds out the corpus's end, and this run's held-out bytes are files (val, from "
            "the config file or the run): leave --val-fraction out, or use a config without val"
        )
    if "context_warmup_start" in given and not config.context_warmup:
        raise HtcliError(
            "--context-warmup-start is the window length of the context warm-up, which is off "
            f"(--context-warmup {config.context_warmup}): give --context-warmup too, or leave it out"
        )


def _check_corpus_options(config, given: set[str], *, printed_new: bool) -> None:
    """The corpus's options given on the command line that would be ignored, refused as train refuses them
    for a new run: also for a resume (it skips them, so that a run goes on as it began, and they were
    recorded in its config.json without effect) and for --print-config; printed_new (a new run's config
    printed, not run): include_hidden from the config file too, as the run would refuse it."""
    from htcli.corpus import RecordOptions, check_hidden_applies, check_records_apply, resolve_corpus

    specs = [*config.corpus, *(config.val or [])]
    if printed_new or "include_hidden" in given:
        check_hidden_applies(specs, config.include_hidden)
    if given & {"text_field", "skip_bad_records"}:
        files = resolve_corpus(specs, include_hidden=config.include_hidden, exclude=[config.out])
        check_records_apply(files, RecordOptions(config.text_field, config.skip_bad_records))


def _given(value, default):
    return default if value is None else value


def _with_config_file(options: dict, path: Path | None) -> tuple[dict, set[str]]:
    """The options given on the command line (None: not given) over those of the config file, and the
    names of those that come from the file."""
    if path is None:
        return options, set()
    from htcli.config import without_derived
    from htcli.config_file import check_run_home, read_options

    given = {k: v for k, v in options.items() if v is not None and v != []}
    from_file = without_derived(read_options(path, _file_key), given)
    if "out" in from_file and "out" not in given:
        check_run_home(path, from_file["out"])
    return {**from_file, **given}, set(from_file) - set(given)


def _file_key(field: str) -> str:
    """How a config file (and --print-config) spells a field: its flag without the dashes."""
    return flag(field)[2:]


def _in_file(error: HtcliError, from_file: set[str], path: Path | None) -> HtcliError:
    """An error about options that all come from the config file, said as the file's: its path first, the
    options by their keys (as flags, the user would look for options never given)."""
    if path is None or not error.fields or not set(error.fields) <= from_file:
        return error
    return HtcliError(f"{path}: {respell(str(error), error.fields, _file_key)}")


def _resume_as(resume: str | None) -> bool | str:
    """--resume's value as train() takes it: absent False, alone True, "auto"."""
    value = {None: False, "yes": True, "auto": "auto"}.get(resume)
    if value is None:
        raise HtcliError(f"--resume takes no value or auto, got {resume!r}")
    return value


def _how_to_continue(result, world_size: int) -> None:
    """After a stop on request: the command that continues the run."""
    if result.interrupted:
        again = "torchrun ... -m htcli train" if world_size > 1 else "htcli train"
        err_console.print(
            f"stopped at step {result.step} by {result.stopped_by}; continue with: "
            f"{again} --resume --out {escape(shlex.quote(str(result.out)))}",
            soft_wrap=True,
        )


@app.command(cls=Command)
def sample(
    checkpoint: Checkpoint,
    prompt: Annotated[str | None, typer.Option(help="Text to continue (default: a newline).")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(parser=_path, help="Continue this file's bytes instead (-: stdin).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Bytes to generate per sample (at least 1).")] = 500,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature; 0: always the most likely byte.")
    ] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Draw only from the k most likely bytes.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Draw only from the top bytes holding this probability.")
    ] = None,
    num_samples: Annotated[
        int, typer.Option(help="Independent samples (seeds --seed, --seed + 1, ...), decoded together.")
    ] = 1,
    stop: Annotated[
        list[str] | None,
        typer.Option(help="End a sample once it produces this text (it ends with it); repeatable."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option(flag("json_output"), help="One JSON object per sample on stdout (JSON lines).")
    ] = False,
    echo: Annotated[
        bool | None,
        _switch("echo", "Print the prompt before its continuation (default on; off with --json)."),
    ] = None,
    cache: Annotated[
        bool,
        _switch(
            "cache",
            "Decode with the model's cache (H-attention's, constant cost per byte, or an exact model's KV "
            "cache; the default), or recompute the model over that context for every byte (slow).",
        ),
    ] = True,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Generate text from a checkpoint, streamed to stdout; timing and bytes/s go to stderr."""
    with _user_errors(smaller="--num-samples or model", streams=True):
        from htcli.checkpoint import load_model
        from htcli.device import resolve_device, resolve_dtype
        from htcli.sample import SamplingConfig, generate_batch

        _check_sample_options(prompt, prompt_file, num_samples, seed, max_new_tokens)
        _check_greedy(temperature, num_samples, bool(echo) and json_output)
        configs = [
            SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed + i) for i in range(num_samples)
        ]
        torch_device = resolve_device(device)
        model, _ = load_model(checkpoint, torch_device)
        context = model.config.max_seq_len
        prompt_bytes = _prompt_bytes(prompt, prompt_file, context)
        stops = [os.fsencode(s) for s in stop or []]  # (fsencode: arguments not UTF-8 byte for byte)
        precision = resolve_dtype(dtype, torch_device)
        steps = generate_batch(model, prompt_bytes, configs, dtype=precision, cache=cache, stop=stops)
        echo = echo is not False and not json_output
        _print_samples(steps, prompt_bytes, configs, echo=echo, json_output=json_output, stops=stops)


def _prompt_bytes(prompt: str | None, prompt_file: Path | None, context: int) -> bytes:
    """The prompt: a file's last context bytes (all the model sees, and what is echoed), or --prompt's
    bytes, echoed whole: one longer than the context gets a note that the model sees only its end (a
    file too, where its size is known: it was kept short without a word)."""
    from htcli.sample import STDIN, read_prompt_sized

    if prompt_file:
        read, size = read_prompt_sized(prompt_file, context)
        what = "standard input" if os.fspath(prompt_file) == STDIN else f"the prompt file {prompt_file}"
        echoed = ", and only those are echoed"
    else:
        read = os.fsencode(prompt or "\n")  # (fsencode: arguments not UTF-8 byte for byte)
        size, what, echoed = len(read), "the prompt", ""
    if size > context:
        err_console.print(
            f"[dim]note: {escape(what)} is {size:,} bytes; the model continues from its last {context:,}"
            f" (its context){echoed}",
            soft_wrap=True,
        )
    return read


def _check_greedy(temperature: float, num_samples: int, echo_json: bool) -> None:
    """Options that others make void, refused (they were ignored): several samples with --temperature 0
    (each the same text), --echo with --json (which prints continuations); SamplingConfig refuses --top-k
    or --top-p with it."""
    if temperature == 0 and num_samples > 1:
        raise HtcliError(
            f"--temperature 0 always takes the most likely byte: --num-samples {num_samples} would give "
            f"one text {num_samples} times under different seeds; give a temperature above 0, or one sample"
        )
    if echo_json:
        raise HtcliError(
            "--json prints each sample's continuation without the prompt: --echo would be ignored; drop it"
        )


def _check_sample_options(
    prompt: str | None, prompt_file: Path | None, num_samples: int, seed: int, max_new_tokens: int
) -> None:
    if prompt is not None and prompt_file is not None:
        raise HtcliError("give --prompt or --prompt-file, not both")
    # (an empty --prompt started from a newline, as no --prompt does, where an empty --prompt-file is refused)
    if prompt == "":
        raise HtcliError(
            "--prompt is empty: give at least one character, or leave it out to start from a newline"
        )
    if not 1 <= num_samples <= MAX_SAMPLES:
        more = f"; for more, run {MAX_SAMPLES:,} at a time, the next with --seed {seed + MAX_SAMPLES}"
        raise HtcliError(
            f"--num-samples must be 1 to {MAX_SAMPLES:,} (they decode as one batch), got {num_samples}"
            + (more if num_samples > MAX_SAMPLES else "")
        )
    if max_new_tokens < 1:  # (0 printed empty samples and "0 bytes in 0.01 s"; generate takes 0)
        raise HtcliError(f"--max-new-tokens must be at least 1 (the bytes to generate), got {max_new_tokens}")
    if 0 <= seed < MAX_SEED <= seed + num_samples - 1:
        raise HtcliError(
            f"--seed {seed} with --num-samples {num_samples} takes seeds past 2**63 - 1: lower --seed"
        )


def _print_samples(
    steps: Iterator[list], prompt: bytes, configs: list, *, echo: bool, json_output: bool, stops: list[bytes]
) -> None:
    """Each sample's bytes: the first streamed to stdout as they come (whole UTF-8 characters; after the
    prompt when echo), the others printed after it, each under a rule on stderr; or, with json_output, one
    JSON line each at the end. Then the speed to stderr. Ctrl-C or SIGTERM prints what each sample has."""
    from htcli.display import byte_count
    from htcli.sample import Utf8Stream

    samples, stream, many = [bytearray() for _ in configs], Utf8Stream(), len(configs) > 1
    show = (lambda text: None) if json_output else _write
    if many and not json_output:
        err_console.rule(f"sample 1 of {len(configs)} (seed {configs[0].seed})")
    started = time.perf_counter()
    try:
        with err_console.status(f"reading the prompt ({byte_count(len(prompt))})", spinner="dots"):
            first = next(steps, None)  # generation starts by reading the whole prompt: long ones take a while
        show(stream.feed(prompt if echo else b""))  # (after the spinner: it erased the line it was drawn on)
        for step in itertools.chain([] if first is None else [first], steps):
            for sample, token in zip(samples, step):
                sample.extend([] if token is None else [token])
            show(stream.feed(b"" if step[0] is None else bytes([step[0]])))
    # (Ctrl-C, out of memory: the line streamed so far ends, so the error has its own)
    except BaseException as error:
        with contextlib.suppress(OSError, ValueError):
            show(stream.flush() + "\n")
            # (with --json a line per sample, those stopped before their first byte too)
            if isinstance(error, KeyboardInterrupt | Terminated):
                if any(samples) or json_output:
                    _print_the_rest(configs, samples, prompt if echo else None, json_output, stops, True)
                _print_speed(samples, time.perf_counter() - started)
        raise
    seconds = time.perf_counter() - started
    show(stream.flush() + "\n")
    _print_the_rest(configs, samples, prompt if echo else None, json_output, stops, False)
    _print_speed(samples, seconds)


def _print_speed(samples: list, seconds: float) -> None:
    """The bytes sampled, in how long, on stderr."""
    from htcli.display import byte_count

    count = sum(map(len, samples))
    rate = count / seconds if seconds > 0 else 0.0
    err_console.print(f"[dim]{byte_count(count)} in {seconds:.2f} s ({rate:.1f} bytes/s)")


def _print_the_rest(
    configs: list, samples: list, echoed: bytes | None, json_output: bool, stops: list, interrupted: bool
) -> None:
    """Every sample as a JSON line (json_output), else the samples after the first (which streamed), each
    under a rule on stderr; interrupted: as far as each came."""
    cut = ", interrupted" if interrupted else ""
    for index, (config, text) in enumerate(zip(configs, map(bytes, samples))):
        if json_output:
            ended = max((s for s in stops if text.endswith(s)), key=len, default=None)  # (he, the: the)
            ended = ended and ended.decode("utf-8", "replace")
            record = {"sample": index + 1, "seed": config.seed, "text": text.decode("utf-8", "replace"),
                      "bytes": len(text), "stop": ended, "interrupted": interrupted}  # fmt: skip
            print(json.dumps(record, ensure_ascii=not _utf8_stdout()), flush=True)
        elif index:
            err_console.rule(f"sample {index + 1} of {len(configs)} (seed {config.seed}){cut}")
            _write(((echoed or b"") + text).decode("utf-8", "replace") + "\n")  # (as sample 1 streamed)


def _write(text: str) -> None:
    """text to stdout, its characters that stdout's encoding lacks (not UTF-8: latin-1, ascii) as ?."""
    if text:
        encoding = sys.stdout.encoding or "ascii"
        sys.stdout.write(text if _utf8_stdout() else text.encode(encoding, "replace").decode(encoding))
        sys.stdout.flush()


def _utf8_stdout() -> bool:
    """Whether stdout writes UTF-8 (else JSON escapes every character beyond ASCII, as \\uXXXX)."""
    try:
        return codecs.lookup(sys.stdout.encoding or "ascii").name == "utf-8"
    except (LookupError, AttributeError, TypeError):
        return False


Stride = Annotated[
    int | None,
    typer.Option(
        help="Bytes scored per window after the first (default: half the context; all of it with "
        "--by-position, which takes no other)."
    ),
]
ByPosition = Annotated[
    bool,
    typer.Option(
        "--by-position",
        help="Also bits per byte by position in the window (doubling buckets): "
        "does the model use its context? Its windows do not overlap (the stride is the context), so its "
        "overall bits per byte count less context than the default stride's: higher.",
    ),
]
EvalContext = Annotated[
    int | None,
    typer.Option(
        help="Windows of this many bytes instead of the model's context (a multiple of an H-model's block "
        "size): a longer one shows whether the model extrapolates past the length it trained on."
    ),
]
PositionPlot = Annotated[
    Path | None,
    typer.Option(
        flag("plot_path"), help="With --by-position: draw the curve to this file (.png, .pdf, .svg, ...)."
    ),
]


@app.command("eval", cls=Command)
def eval_(
    checkpoint: Checkpoint,
    corpus: Corpus = None,
    stride: Stride = None,
    by_position: ByPosition = False,
    plot_path: PositionPlot = None,
    context: EvalContext = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    text_field: TextField = None,
    skip_bad_records: SkipBadRecords = None,
    include_hidden: IncludeHidden = None,
    json_output: JsonOutput = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Bits (and nats) per byte of a checkpoint over every byte of CORPUS after the first."""
    with _user_errors(smaller="--batch-size or --context"):
        from htcli.checkpoint import load_model
        from htcli.corpus import RecordOptions
        from htcli.device import dtype_name, resolve_device, resolve_dtype
        from htcli.display import by_position_table, eval_table, progress_bar, records_left_out
        from htcli.evaluate import check_options, evaluate
        from htcli.files import printable

        if plot_path is not None and not by_position:
            raise HtcliError("--plot draws the by-position curve: add --by-position")
        if plot_path is not None:
            from htcli.plots import check_plot_path

            check_plot_path(plot_path, "--plot")
        records = RecordOptions("text" if text_field is None else text_field, bool(skip_bad_records))
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        model, info = load_model(checkpoint, torch_device, context=context)
        check_options(model, stride, batch_size, by_position)  # before a long corpus is opened
        with _eval_corpus(corpus or [], records, bool(include_hidden), info.path.parent) as data:
            if data.skipped_records:
                err_console.print(f"[yellow]{records_left_out(data.skipped_records)}")
            with progress_bar(err_console, "scoring", len(data) - 1) as advance:
                result = evaluate(
                    model, data.span(), stride=stride, batch_size=batch_size, dtype=torch_dtype,
                    by_position=by_position, on_progress=advance,
                )  # fmt: skip
        report = {
            "checkpoint": str(info.name), "step": info.step, "corpus": [printable(f) for f in data.files],
            "skipped_records": data.skipped_records, **result.to_dict(),
            "bytes_per_s": result.bytes_scored / result.seconds if result.seconds else None,
            "device": str(torch_device), "dtype": dtype_name(torch_dtype),
        }  # fmt: skip
        if json_output:
            print(json.dumps(report, allow_nan=False), flush=True)  # (a full disk said before the plot)
        else:
            console.print(eval_table(report))
            if by_position:
                console.print(by_position_table(report))
        if plot_path is not None:  # (after the output: a command that fails leaves no new file)
            from htcli.plots import by_position_plot

            by_position_plot({curve_label(checkpoint): result.by_position}, plot_path)
            err_console.print(f"plot written to {escape(str(plot_path))}", soft_wrap=True)


def curve_label(checkpoint: Path) -> str:
    """A checkpoint's name in a plot's legend: its run directory's, or a loose weights file's own (it was the
    name of the folder that file lay in)."""
    from htcli.files import MODEL_FILE

    whole = Path(os.path.abspath(checkpoint))
    return whole.name if whole.is_dir() else whole.parent.name if whole.name == MODEL_FILE else whole.stem


def _eval_corpus(corpus: list[str], records, include_hidden: bool, checkpoint_directory: Path):
    """The corpus that eval scores (a ByteCorpus), its record options checked before any file is unpacked
    into the cache; never the files of the run evaluated (its weights and log were scored as text)."""
    from htcli.corpus import ByteCorpus, check_hidden_applies, check_records_apply, resolve_corpus
    from htcli.files import is_run_directory, printable

    run = [checkpoint_directory] if is_run_directory(checkpoint_directory) else []
    files = resolve_corpus(
        corpus, include_hidden=include_hidden, exclude=run,
        excluded_as=f"the directory of the run evaluated ({printable(checkpoint_directory)})",
    )  # fmt: skip
    check_records_apply(files, records)
    check_hidden_applies(corpus, include_hidden)
    return ByteCorpus.open(corpus, records=records, files=files)


# the bench options that time attention, which --decode (sampling speed) does not use
ATTENTION_BENCH_OPTIONS = (
    "seq_lens", "batch_size", "heads", "dim_head", "block_size", "causal", "both", "warmup", "repeats",
    "max_seconds", "model", "plot_path", "impl",
)  # fmt: skip


BenchPlot = Annotated[
    Path | None,
    typer.Option(flag("plot_path"), help="Also plot time and memory to this file (.png, .svg, ...)."),
]


BenchWarmup = Annotated[
    int | None,
    typer.Option(help="Untimed runs first (default: 2 on CUDA, graphs captured at the second; else 1)."),
]
BenchRepeats = Annotated[
    int,
    typer.Option(
        help="Timed runs: on a CPU the median of runs timed one by one, on CUDA the mean of runs "
        "back to back (after one alone)."
    ),  # fmt: skip
]


@app.command(cls=Command)
def bench(
    ctx: typer.Context,
    seq_lens: Annotated[
        list[str] | None,
        typer.Option(flag("seq_lens"), help="Sequence lengths, default 8192: repeat or give a comma list."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 1,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    dim_head: Annotated[int, typer.Option(help="Width of one head.")] = 64,
    block_size: Annotated[int, typer.Option(help="H-attention block size.")] = 128,
    causal: Annotated[
        bool | None, typer.Option("--causal/--non-causal", help="Measure only causal or only non-causal.")
    ] = None,
    both: Annotated[bool, typer.Option("--both", help="Measure both modes (the default).")] = False,
    warmup: BenchWarmup = None,
    repeats: BenchRepeats = 5,
    max_seconds: Annotated[
        float,
        typer.Option(
            help="Seconds per method and length: a first forward+backward slower than this is "
            "reported as a timeout; repeats stop once it is spent.",
        ),
    ] = 120.0,
    model: Annotated[
        bool, typer.Option("--model", help="Time a full training step of the model (H vs exact attention).")
    ] = False,
    preset: Annotated[str, typer.Option(help="Model preset for --model and --decode.")] = "small",
    decode: Annotated[
        bool, typer.Option("--decode", help="Sampling speed: decode cache vs recomputing the forward pass.")
    ] = False,
    json_output: JsonOutput = False,
    plot_path: BenchPlot = None,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16.")] = "fp32",
    impl: Annotated[
        str,
        typer.Option(
            help="H-attention implementation: auto, eager or triton (default: $HTCLI_ATTENTION, else auto:"
            " triton on CUDA where Triton is installed and the kernels take the shapes, else eager)."
        ),
    ] = "",
) -> None:
    """H-attention against exact attention (SDPA): speed and peak memory, side by side in one run."""
    with _user_errors(smaller="--seq-len or --batch-size"):
        from htcli.bench import BenchConfig

        if decode:
            _refuse_attention_options(ctx)
            _bench_decode(preset, device, dtype, json_output)
            return
        _check_bench_options(ctx, model, preset, both, causal)
        modes = [True] if model else [False, True] if both or causal is None else [causal]
        config = BenchConfig(
            seq_lens=_int_list(seq_lens or ["8192"]), batch_size=batch_size, heads=heads, dim_head=dim_head,
            block_size=block_size, modes=modes, device=device,
            dtype=dtype, warmup=warmup, repeats=repeats, max_seconds=max_seconds, model=model, preset=preset,
            impl=impl,
        )  # fmt: skip
        _bench_attention(config, json_output, plot_path)


def _check_bench_options(
    ctx: typer.Context, model: bool, preset: str, both: bool, causal: bool | None
) -> None:
    """Options of the attention bench that contradict one another."""
    if model and (given := _given_options(ctx, ("heads", "dim_head", "block_size"))):
        raise HtcliError(f"--model times the preset's model (--preset {preset}): drop {given}")
    if not model and _given_options(ctx, ("preset",)):
        raise HtcliError("--preset chooses the model of --model and --decode: add one of them, or drop it")
    if both and causal is not None:
        raise HtcliError("--both measures both modes: give it or --causal/--non-causal, not both")
    if model and (both or causal is False):
        raise HtcliError(
            "--model times the training step of the causal language model that htcli trains (a "
            "bidirectional one would see the bytes it predicts): drop --non-causal/--both"
        )


def _refuse_attention_options(ctx: typer.Context) -> None:
    """--decode with options that only the attention bench uses: an error naming them."""
    if given := _given_options(ctx, ATTENTION_BENCH_OPTIONS):
        raise HtcliError(f"--decode times sampling, not attention: drop {given}")


def _given_options(ctx: typer.Context, names: Iterable[str]) -> str:
    """The flags among names given on the command line, as a list in words ("" if none)."""
    sources = {name: ctx.get_parameter_source(name) for name in names}  # click's
    given = [name for name, source in sources.items() if source is not None and source.name != "DEFAULT"]
    return ", ".join(flag(name) for name in given)


def _int_list(values: list[str]) -> list[int]:
    """--seq-len 8192 --seq-len 16384, or --seq-len 8192,16384."""
    try:
        return [int(part) for value in values for part in value.split(",")]  # (an empty item: a typo)
    except ValueError:
        raise HtcliError(f"--seq-len takes whole numbers, e.g. 8192,32768; got {' '.join(values)}") from None


def _bench_attention(config, json_output: bool, plot_path: Path | None) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.spinner import Spinner

    from htcli.bench import correctness, padded_lengths, run_bench
    from htcli.bench_report import bench_title, measured_shape, plot, to_json
    from htcli.device import device_name
    from htcli.plots import check_plot_path

    if plot_path is not None:
        check_plot_path(plot_path, "--plot")  # before minutes of measuring
    name = device_name(config.device)
    block = measured_shape(config)["block_size"]
    error = correctness(config.device, config.dtype, block, config.impl)
    err_console.print(
        f"correctness: max |h_attention - dense oracle| = {error:.2e} (block {block}, {config.dtype}, {name})"
    )
    if padded := padded_lengths(config):
        said = ", ".join(f"{n:,} as {length:,}" for n, length in padded)
        err_console.print(
            f"note: H-attention computes {said} (its block size, {config.block_size}, times a power of two),"
            " padded; SDPA computes each length as it is",
            soft_wrap=True,
        )
    title = bench_title(config, name)
    rows, total = [], len(config.seq_lens) * len(config.modes)
    waiting = Spinner("dots", text=f"measuring 1 of {total}")
    try:
        with Live(waiting, console=err_console, transient=True) as live:  # progress: on terminals only
            for row in run_bench(config):
                rows.append(row)
                waiting.text = f"measuring {min(len(rows) + 1, total)} of {total}"
                live.update(Group(_bench_tables(rows, config, title), waiting))
    except (KeyboardInterrupt, Terminated):  # (the rows measured are kept: printed before the stop's line)
        if json_output:  # (none too: a JSON reader gets its object)
            print(json.dumps({**to_json(rows, config, error, name), "interrupted": True}))
        elif rows:
            console.print(_bench_tables(rows, config, title))
        raise
    if json_output:
        print(json.dumps({**to_json(rows, config, error, name), "interrupted": False}))
    else:
        console.print(_bench_tables(rows, config, title))
    statuses = {result.get("status") for row in rows for result in row.results.values()}
    if "ok" not in statuses:  # (it exited 0: a script took the run for a measurement)
        advice = {"oom": "a shorter --seq-len or --batch-size", "timeout": "more --max-seconds"}
        ways = [way for status, way in advice.items() if status in statuses]
        raise HtcliError(
            "nothing was measured: every method failed at every length (the table says how)"
            + (f"; give {' or '.join(ways)}" if ways else "")
            + ("; the errors' reasons are under the table" if statuses - {"oom", "timeout"} else "")
        )
    if plot_path is not None:
        plot(rows, config, plot_path)
        err_console.print(f"plot written to {escape(str(plot_path))}", soft_wrap=True)


def _bench_tables(rows, config, title: str):
    """The attention bench's table, with why a cell says "error" and the fitted exponents under it."""
    from rich.console import Group
    from rich.text import Text

    from htcli.bench_report import bench_table, error_lines, exponent_lines

    lines = [Text(line) for line in error_lines(rows) + exponent_lines(rows, config)]  # (not markup)
    return Group(bench_table(rows, config, title), *lines)


def _bench_decode(preset: str, device: str, dtype: str, json_output: bool) -> None:
    from htcli.bench import DECODE_CONTEXTS, check_decode_preset, decode_bench
    from htcli.device import PRECISIONS, check_choice, resolve_device, resolve_dtype
    from htcli.display import cache_table, decode_table

    check_choice("dtype", dtype, PRECISIONS)
    resolve_dtype(dtype, resolve_device(device))  # (before the header: fp16 needs a CUDA GPU)
    check_decode_preset(preset)  # (before the header: an unknown preset, or one too short)
    err_console.print(f"decode bench: {preset} preset, random weights, greedy, {dtype} ...")
    with err_console.status("measuring", spinner="dots"):
        result = decode_bench(preset, device_name=device, dtype_name=dtype, contexts=DECODE_CONTEXTS)
    if json_output:
        print(json.dumps(result))
    else:
        console.print(decode_table(result, dtype))
        console.print(cache_table(result))


@app.command(cls=Command)
def plot(
    runs: Annotated[
        list[Path],
        typer.Argument(parser=_path, help="Run directories (as written by `htcli train --out`)."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The figure to write (its format by its extension: .png, .pdf, .svg, ...)."
        ),
    ] = Path("curves.png"),
    x: Annotated[
        str, typer.Option("--x", help="Against: step, bytes (trained on) or time (of training).")
    ] = "step",
) -> None:
    """Validation bits per byte and training loss of runs (finished, running or crashed) on one figure.

    From each run's log.jsonl; a table of where each run is goes to stdout."""
    with _user_errors():
        from htcli.curves import X_AXES, read_curves, run_names
        from htcli.device import check_choice
        from htcli.display import runs_table
        from htcli.files import LOG_FILE
        from htcli.plots import check_plot_path, curves_plot

        check_choice("x", x, X_AXES)
        check_plot_path(output, "--output")
        curves = [read_curves(run, name) for run, name in zip(runs, run_names(runs))]
        for run, read in zip(runs, curves):
            if read.skipped:
                said = (
                    f"{read.skipped} lines are not htcli events"
                    if read.skipped > 1
                    else "a line is not an htcli event"
                )
                where = escape(str(run / LOG_FILE))
                err_console.print(f"[yellow]warning:[/] {where}: {said} (skipped)", soft_wrap=True)
        if not any(run.train or run.val for run in curves):
            raise HtcliError("nothing to plot: no run has logged a step or an evaluation yet")
        console.print(runs_table(curves))  # (first: where stdout fails, no figure is written either)
        curves_plot(curves, x, output)
        err_console.print(f"plot written to {escape(str(output))}", soft_wrap=True)
