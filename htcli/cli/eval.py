"""`htcli eval`: bits per byte of a checkpoint on corpora, by position too."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from htcli.cli.common import (
    Checkpoint,
    Corpus,
    Device,
    Dtype,
    IncludeHidden,
    JsonOutput,
    SkipBadRecords,
    TextField,
    app,
    console,
    err_console,
    flag,
    user_errors,
)
from htcli.errors import HtcliError
from htcli.help_layout import Command

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
        "does the model use its context? Its windows do not overlap (the stride is the context; the last "
        "ends at the corpus's end and scores only what the others left), so its overall bits per byte "
        "count less context than the default stride's: higher.",
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


class _EvalCommand(Command):
    NEEDED = frozenset({"corpus"})  # (optional to the parser: its own message says what to give)


@app.command("eval", cls=_EvalCommand)
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
    with user_errors(smaller="--batch-size or --context"):
        from htcli.corpus import RecordOptions
        from htcli.device import dtype_name, resolve_device, resolve_dtype
        from htcli.display import by_position_table, eval_table, progress_bar
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
        model, info = _load_or_say_swapped(checkpoint, corpus or [], torch_device, context)
        check_options(model, stride, batch_size, by_position)  # before a long corpus is opened
        with _eval_corpus(corpus or [], records, bool(include_hidden), info.path.parent) as data:
            _say_what_changes(data, context)
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


def _say_what_changes(data, context: int | None) -> None:
    """On stderr, what changes the scoring: records left out, a --context longer than the corpus (one
    window of the corpus; the JSON's context alone said it)."""
    from htcli.display import records_left_out

    if data.skipped_records:
        err_console.print(f"[yellow]{records_left_out(data.skipped_records)}")
    if context is not None and len(data) - 1 < context:
        err_console.print(
            f"[yellow]note: the corpus is {len(data):,} bytes, fewer than --context {context} plus one: "
            f"scored in one window of {len(data) - 1:,}"
        )


def _load_or_say_swapped(checkpoint: Path, corpus: list[Path], device, context: int | None):
    """load_model's (model, info), its error naming the swap where CHECKPOINT is none and the corpus is a
    run directory (`htcli eval data.txt runs/x`: it said only that data.txt is not a checkpoint)."""
    from htcli.checkpoint import load_model
    from htcli.files import is_run_directory

    try:
        return load_model(checkpoint, device, context=context)
    except HtcliError as error:
        if not any(is_run_directory(Path(item)) for item in corpus):
            raise
        raise HtcliError(
            f"{error}; the arguments look swapped: htcli eval CHECKPOINT CORPUS... (the run first)",
            fields=error.fields,
        ) from None


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
    _refuse_other_runs(corpus, checkpoint_directory)
    files = resolve_corpus(
        corpus, include_hidden=include_hidden, exclude=run,
        excluded_as=f"the directory of the run evaluated ({printable(checkpoint_directory)})",
    )  # fmt: skip
    _refuse_files_of_other_runs(files, checkpoint_directory)
    check_records_apply(files, records)
    check_hidden_applies(corpus, include_hidden)
    from htcli.display import said_if_slow, unpacking_line

    unpacking = lambda file: said_if_slow(err_console, unpacking_line(printable(file)))  # noqa: E731
    return ByteCorpus.open(corpus, records=records, files=files, on_unpack=unpacking)


def _refuse_other_runs(corpus: list[str], checkpoint_directory: Path) -> None:
    """An HtcliError where a corpus argument is another run's directory: `eval runs/a runs/b held_out.txt`,
    to compare two runs, stopped on runs/b's log as a bad record. (Its files, however named, are refused
    once resolved: _refuse_files_of_other_runs; the evaluated run's own are left out by resolve_corpus.)"""
    from htcli.files import is_run_directory, printable

    for path in map(Path, corpus):
        if path.is_dir() and is_run_directory(path) and not os.path.samefile(path, checkpoint_directory):
            raise _not_text(f"{printable(path)} is an htcli run", path)


def _not_text(said: str, run: Path) -> HtcliError:
    """The error of another run among eval's corpus: said, what it is."""
    from htcli.files import printable

    return HtcliError(
        f"{said}, not text to score: htcli eval scores one CHECKPOINT; evaluate {printable(run)} with a "
        "command of its own"
    )


def _refuse_files_of_other_runs(files: list[Path], checkpoint_directory: Path) -> None:
    """An HtcliError where a corpus file lies in another run (reached by a glob, a symlink, a file deeper
    in it: `runs/b/*.safetensors` was scored as text; review). Runs below a corpus directory are left out
    by resolve_corpus, so such a file was named."""
    from htcli.files import is_run_directory, printable

    own, runs = os.path.realpath(checkpoint_directory), {}
    for file in files:
        for folder in Path(os.path.realpath(file)).parents:
            if str(folder) not in runs:
                runs[str(folder)] = str(folder) != own and is_run_directory(folder)
            if runs[str(folder)]:
                raise _not_text(f"{printable(file)} is a file of the htcli run {printable(folder)}", folder)


# the bench options that time attention, which --decode (sampling speed) does not use
