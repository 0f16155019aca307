"""`htcli bench`: attention against exact attention, and decoding; tables, JSON, a plot."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from htcli.cli.common import Device, JsonOutput, app, console, err_console, flag, user_errors
from htcli.errors import HtcliError
from htcli.help_layout import Command
from htcli.stop import Terminated, import_whole, stops_unwrapped

ATTENTION_BENCH_OPTIONS = (
    "seq_lens", "batch_size", "heads", "dim_head", "block_size", "causal", "both", "warmup", "repeats",
    "max_seconds", "model", "plot_path", "impl", "compile",
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

BenchMaxSeconds = Annotated[
    float,
    typer.Option(
        help="Seconds per method and length: a first forward+backward slower than this is "
        "reported as a timeout; repeats stop once it is spent.",
    ),
]
BenchModel = Annotated[
    bool,
    typer.Option(
        "--model",
        help="Time a full training step of --preset's model (H vs exact attention; causal; not with --heads, "
        "--dim-head or --block-size: the preset's).",
    ),
]
BenchCompile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="With --model: torch.compile both models (as train --compile); compiling is not timed.",
    ),
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
    both: Annotated[
        bool, typer.Option("--both", help="Measure both modes (the default; --model: causal only).")
    ] = False,
    warmup: BenchWarmup = None,
    repeats: BenchRepeats = 5,
    max_seconds: BenchMaxSeconds = 120.0,
    model: BenchModel = False,
    compile: BenchCompile = False,
    preset: Annotated[str, typer.Option(help="Model preset for --model and --decode.")] = "small",
    decode: Annotated[
        bool,
        typer.Option(
            "--decode",
            help="Sampling speed of --preset's model: decode cache vs recomputing the forward pass (takes "
            "only --preset, --device, --dtype and --json).",
        ),
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
    with user_errors(smaller="--seq-len or --batch-size", needs=()):  # (torch: imported whole below)
        if decode:
            _refuse_attention_options(ctx)
            _bench_decode(preset, device, dtype, json_output)
            return
        import_whole("torch")
        from htcli.bench import BenchConfig

        _check_bench_options(ctx, model, preset, both, causal)
        modes = [True] if model else [False, True] if both or causal is None else [causal]
        config = BenchConfig(
            seq_lens=_int_list(seq_lens or ["8192"]), batch_size=batch_size, heads=heads, dim_head=dim_head,
            block_size=block_size, modes=modes, device=device,
            dtype=dtype, warmup=warmup, repeats=repeats, max_seconds=max_seconds, model=model, preset=preset,
            impl=impl, compile=compile,
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

    from htcli.bench import run_bench
    from htcli.bench_report import bench_title, plot, to_json
    from htcli.device import device_name
    from htcli.plots import check_plot_path

    if plot_path is not None:
        check_plot_path(plot_path, "--plot")  # before minutes of measuring
    name = device_name(config.device)
    title = bench_title(config, name)
    rows, total, error = [], len(config.seq_lens) * len(config.modes), None
    waiting = Spinner("dots", text=f"measuring 1 of {total}")
    try:  # (a stop from here on, the correctness check's too: a JSON reader gets its object)
        with stops_unwrapped():
            error = _correctness_said(config, name)
            with Live(waiting, console=err_console, transient=True) as live:  # (progress: terminals only)
                try:
                    for row in run_bench(config):
                        rows.append(row)
                        waiting.text = f"measuring {min(len(rows) + 1, total)} of {total}"
                        live.update(Group(_bench_tables(rows, config, title), waiting))
                finally:  # (rich draws the last frame whole before erasing it: taller than the terminal,
                    live.update("")  # its top stayed on the screen above the table printed after it)
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


def _correctness_said(config, name: str) -> float:
    """H-attention against the dense oracle at the bench's shape (the error, said), and the lengths that it
    computes padded."""
    from htcli.bench import correctness, padded_lengths
    from htcli.bench_report import measured_shape

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
    return error


def _bench_decode(preset: str, device: str, dtype: str, json_output: bool) -> None:
    where = device  # (as given until it is resolved)
    try:  # (a stop from here on, in torch's import too: a JSON reader gets its object, as from bench's)
        with stops_unwrapped():
            import_whole("torch")
            from htcli.bench import DECODE_CONTEXTS, check_decode_preset, decode_bench
            from htcli.device import PRECISIONS, check_choice, resolve_device, resolve_dtype

            check_choice("dtype", dtype, PRECISIONS)
            where = resolve_device(device)  # (as the figures name it: "cpu", not "auto")
            resolve_dtype(dtype, where)  # (before the header: fp16 needs a CUDA GPU)
            check_decode_preset(preset)  # (before the header: an unknown preset, or one too short)
            err_console.print(f"decode bench: {preset} preset, random weights, greedy, {dtype} ...")
            with err_console.status("measuring", spinner="dots"):
                result = decode_bench(preset, device_name=device, dtype_name=dtype, contexts=DECODE_CONTEXTS)
    except (KeyboardInterrupt, Terminated):
        if json_output:
            print(json.dumps({"preset": preset, "device": str(where), "dtype": dtype, "interrupted": True}))
        raise
    if json_output:
        print(json.dumps({**result, "interrupted": False}))
    else:
        from htcli.display import cache_table, decode_table

        console.print(decode_table(result, dtype))
        console.print(cache_table(result))
