"""The command-line interface: parses options, calls a library function, prints.

torch and everything that imports it are imported inside the commands, so `htcli --help` is instant.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from htcli import __version__
from htcli.config import train_default
from htcli.errors import HtcliError
from htcli.presets import DEFAULT_PRESET, PRESETS

app = typer.Typer(
    name="htcli",
    help="Train, sample, evaluate and benchmark long-context H-Transformer-1D byte-level language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

# options every command spells the same way (train's are None when not given, for --resume)
DEVICE = typer.Option(
    "--device",
    help="Where to run: auto (the default: CUDA, else MPS, else CPU), cpu, cuda or mps.",
    show_default=False,
)
DTYPE = typer.Option(
    "--dtype",
    help="Mixed precision: auto (the default: bf16 on a CUDA GPU with bf16, else fp32), fp32, bf16, fp16.",
    show_default=False,
)
SEED = typer.Option("--seed", help="Random seed (default 0): same seed, same result.", show_default=False)
Device = Annotated[str, DEVICE]
Dtype = Annotated[str, DTYPE]
Seed = Annotated[int, SEED]
Checkpoint = Annotated[
    Path, typer.Argument(help="A run directory (as written by `htcli train --out`) or a .safetensors file.")
]
Corpus = Annotated[
    list[str] | None,
    typer.Argument(
        help="Text or binary files, directories (all files below), glob patterns, .gz files.",
        show_default=False,
    ),
]


def _default(name: str) -> str:
    return f" (default {train_default(name)})"


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """An HtcliError becomes one red line on stderr and exit code 1; a second Ctrl-C exits 130."""
    try:
        yield
    except HtcliError as error:
        err_console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted: stopped without saving; the last checkpoint is intact", soft_wrap=True
        )
        raise typer.Exit(130) from None


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


@app.command()
def train(
    corpus: Corpus = None,
    out: Annotated[
        str, typer.Option(help="Run directory: checkpoint, config.json, log.jsonl.")
    ] = "runs/htcli",
    val: Annotated[
        list[str] | None,
        typer.Option(
            help="Validation corpus (repeat for several); default: the end of CORPUS.", show_default=False
        ),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(help="Without --val, hold out this last fraction of CORPUS" + _default("val_fraction")),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help=f"Model size: {', '.join(PRESETS)} (default {DEFAULT_PRESET}).")
    ] = None,
    dim: Annotated[int | None, typer.Option(help="Model width (overrides the preset).")] = None,
    depth: Annotated[int | None, typer.Option(help="Number of layers.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    dim_head: Annotated[int | None, typer.Option(help="Width of one head.")] = None,
    block_size: Annotated[
        int | None, typer.Option(help="H-attention block size (even, divides --seq-len).")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Context length in bytes: the training window.")] = None,
    reversible: Annotated[
        bool | None,
        typer.Option("--reversible/--no-reversible", help="Reversible layers: less activation memory."),
    ] = None,
    shift_tokens: Annotated[
        bool | None,
        typer.Option("--shift-tokens/--no-shift-tokens", help="Mix in the previous byte's features."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps for the whole run" + _default("steps"))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Windows per micro-batch" + _default("batch_size"))
    ] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Micro-batches per optimizer step" + _default("grad_accum"))
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate" + _default("lr"))] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warmup steps" + _default("warmup"))] = None,
    min_lr: Annotated[
        float | None,
        typer.Option(help="Learning rate at the last step, after cosine decay (default --lr / 10)"),
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay" + _default("weight_decay"))
    ] = None,
    clip: Annotated[
        float | None, typer.Option(help="Gradient norm clip, 0 for none" + _default("clip"))
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Steps between validations, 0: last step only" + _default("eval_every"))
    ] = None,
    eval_batches: Annotated[
        int | None, typer.Option(help="Batches per validation" + _default("eval_batches"))
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Steps between checkpoints, 0: last step only" + _default("save_every"))
    ] = None,
    sample_every: Annotated[
        int | None, typer.Option(help="Steps between shown samples, 0: never" + _default("sample_every"))
    ] = None,
    device: Annotated[str | None, DEVICE] = None,
    dtype: Annotated[str | None, DTYPE] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model (default off).")
    ] = None,
    seed: Annotated[int | None, SEED] = None,
    split_global_batch: Annotated[
        bool | None,
        typer.Option(
            "--split-global-batch/--no-split-global-batch",
            help="Under torchrun: every process trains on its slice of one global batch drawn from --seed "
            "(the data order of one process with the whole batch) instead of its own windows (default off).",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out exactly where its checkpoint left it.")
    ] = False,
) -> None:
    """Train a byte-level model on CORPUS, with checkpoints, log.jsonl and config.json in --out.

    Ctrl-C saves a checkpoint and exits; --resume continues from it. On several GPUs or machines, start
    it with torchrun: `torchrun --nproc-per-node 8 -m htcli train ...`.
    """
    from htcli.display import TrainDisplay, train_summary
    from htcli.distributed import process_group
    from htcli.train import config_from_options
    from htcli.train import train as run_training

    with _user_errors():
        config = config_from_options(
            corpus or [],
            out=out,
            resume=resume,
            preset=preset,
            model=dict(
                dim=dim,
                depth=depth,
                heads=heads,
                dim_head=dim_head,
                block_size=block_size,
                max_seq_len=seq_len,
                reversible=reversible,
                shift_tokens=shift_tokens,
            ),
            val=val,
            val_fraction=val_fraction,
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup=warmup,
            min_lr=min_lr,
            weight_decay=weight_decay,
            clip=clip,
            eval_every=eval_every,
            eval_batches=eval_batches,
            save_every=save_every,
            sample_every=sample_every,
            device=device,
            dtype=dtype,
            compile=compile,
            seed=seed,
            split_global_batch=split_global_batch,
        )
        with process_group(config.device) as launch, TrainDisplay(err_console) as display:
            result = run_training(config, resume=resume, on_event=display)
        if launch.main:
            console.print(train_summary(result))
        if launch.main and result.interrupted:
            again = "torchrun ... -m htcli train" if launch.world_size > 1 else "htcli train"
            err_console.print(
                f"stopped at step {result.step}; continue with: {again} --resume --out {escape(out)}"
            )


@app.command()
def sample(
    checkpoint: Checkpoint,
    prompt: Annotated[str | None, typer.Option(help="Text to continue (default: a newline).")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Continue this file's bytes instead.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Bytes to generate per sample.")] = 500,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature; 0: always the most likely byte.")
    ] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Draw only from the k most likely bytes.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Draw only from the top bytes holding this probability.")
    ] = None,
    num_samples: Annotated[
        int, typer.Option(help="Independent samples (seeds --seed, --seed + 1, ...).")
    ] = 1,
    echo: Annotated[
        bool, typer.Option("--echo/--no-echo", help="Print the prompt before its continuation.")
    ] = True,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache",
            help="Decode with the hierarchical cache (constant cost per byte), or recompute the model for "
            "every byte (slow; for comparison).",
        ),
    ] = True,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Generate text from a checkpoint, streamed to stdout; timing and tokens/s go to stderr."""
    from htcli.checkpoint import load_model
    from htcli.device import resolve_device, resolve_dtype
    from htcli.sample import SamplingConfig, Utf8Stream, generate

    with _user_errors():
        if prompt is not None and prompt_file is not None:
            raise HtcliError("give --prompt or --prompt-file, not both")
        if num_samples < 1:
            raise HtcliError(f"--num-samples must be a positive integer, got {num_samples}")
        prompt_bytes = _read_prompt(prompt_file) if prompt_file is not None else (prompt or "\n").encode()
        configs = [
            SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed + i) for i in range(num_samples)
        ]
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        model, _ = load_model(checkpoint, torch_device)
        for index, config in enumerate(configs):
            if num_samples > 1:
                err_console.rule(f"sample {index + 1} of {num_samples} (seed {config.seed})")
            stream = Utf8Stream()
            if echo:
                _write(stream.feed(prompt_bytes))
            started, count = time.perf_counter(), 0
            for token in generate(model, prompt_bytes, config, dtype=torch_dtype, cache=cache):
                _write(stream.feed(token))
                count += 1
            seconds = time.perf_counter() - started
            _write(stream.flush() + "\n")
            rate = count / seconds if seconds > 0 else 0.0
            err_console.print(f"[dim]{count} bytes in {seconds:.2f} s ({rate:.1f} tokens/s)")


def _read_prompt(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise HtcliError(f"prompt file {path} does not exist") from None
    except OSError as error:
        raise HtcliError(f"cannot read prompt file {path}: {error.strerror or error}") from None


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


@app.command("eval")
def eval_(
    checkpoint: Checkpoint,
    corpus: Corpus = None,
    stride: Annotated[
        int | None, typer.Option(help="Bytes scored per window after the first (default: half the context).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Bits (and nats) per byte of a checkpoint over every byte of CORPUS after the first."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from htcli.checkpoint import load_model
    from htcli.data import ByteCorpus
    from htcli.device import dtype_name, resolve_device, resolve_dtype
    from htcli.evaluate import evaluate

    with _user_errors():
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        model, info = load_model(checkpoint, torch_device)
        with ByteCorpus.open(corpus or []) as data:
            columns = (TextColumn("scoring"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
            with Progress(*columns, console=err_console, transient=True) as progress:
                task = progress.add_task("eval", total=max(1, len(data) - 1))
                result = evaluate(
                    model,
                    data.span(),
                    stride=stride,
                    batch_size=batch_size,
                    dtype=torch_dtype,
                    on_progress=lambda done, total: progress.update(task, completed=done),
                )
        report = {
            "checkpoint": str(info.path),
            "step": info.step,
            "corpus": [str(c) for c in data.files],
            **result.to_dict(),
            "bytes_per_s": result.bytes_scored / result.seconds if result.seconds else None,
            "device": str(torch_device),
            "dtype": dtype_name(torch_dtype),
        }
        if json_output:
            print(json.dumps(report))
            return
        table = Table(show_header=False, title=f"{escape(str(info.path))} (step {info.step})")
        table.add_column(style="bold")
        table.add_column()
        table.add_row("bits per byte", f"{result.bits_per_byte:.4f}")
        table.add_row("nats per byte", f"{result.nats_per_byte:.4f}")
        table.add_row("bytes scored", f"{result.bytes_scored:,} in {len(data.files)} files")
        table.add_row("context / stride", f"{result.context} / {result.stride}")
        table.add_row("time", f"{result.seconds:.1f} s ({report['bytes_per_s'] or 0:,.0f} bytes/s)")
        console.print(table)


def _int_list(values: list[str]) -> list[int]:
    """--seq-len 8192 --seq-len 16384, or --seq-len 8192,16384."""
    try:
        return [int(part) for value in values for part in value.split(",") if part.strip()]
    except ValueError:
        raise HtcliError(f"--seq-len takes whole numbers, e.g. 8192,32768; got {' '.join(values)}") from None


@app.command()
def bench(
    seq_len: Annotated[
        list[str] | None, typer.Option(help="Sequence lengths: repeat the option or give a comma list.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 1,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    dim_head: Annotated[int, typer.Option(help="Width of one head.")] = 64,
    block_size: Annotated[int, typer.Option(help="H-attention block size.")] = 128,
    causal: Annotated[
        bool | None, typer.Option("--causal/--non-causal", help="Measure only causal or only non-causal.")
    ] = None,
    both: Annotated[bool, typer.Option("--both", help="Measure both modes (the default).")] = False,
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs; the median is reported.")] = 5,
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
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the results to this JSON file.")
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Also plot time and memory to this PNG.")
    ] = None,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 (default), bf16 or fp16.")] = "fp32",
    impl: Annotated[
        str,
        typer.Option(
            help="H-attention implementation: eager or triton (default: $HTCLI_ATTENTION, else eager)."
        ),
    ] = "",
) -> None:
    """H-attention against exact attention (SDPA): speed and peak memory, side by side in one run."""
    with _user_errors():
        if decode:
            _bench_decode(preset, device, dtype, json_path)
            return
        modes = [False, True] if both or causal is None else [causal]
        _bench_attention(
            seq_len, batch_size, heads, dim_head, block_size, modes, warmup, repeats, max_seconds,
            model, preset, json_path, plot_path, device, dtype, impl,
        )  # fmt: skip


def _bench_attention(
    seq_len, batch_size, heads, dim_head, block_size, modes, warmup, repeats, max_seconds,
    model, preset, json_path, plot_path, device, dtype, impl,
) -> None:  # fmt: skip
    from rich.live import Live

    from htcli.bench import BenchConfig, correctness, run_bench
    from htcli.bench_report import bench_table, exponent_lines, plot, to_json, write_json
    from htcli.device import resolve_device

    config = BenchConfig(
        seq_lens=_int_list(seq_len or ["8192"]), batch_size=batch_size, heads=heads, dim_head=dim_head,
        block_size=block_size, modes=modes, device=device, dtype=dtype, warmup=warmup, repeats=repeats,
        max_seconds=max_seconds, model=model, preset=preset, impl=impl,
    )  # fmt: skip
    torch_device = resolve_device(device)
    name = torch_device.type
    if name == "cuda":
        import torch

        name = torch.cuda.get_device_name(torch_device)
    error = correctness(device, dtype, block_size, config.impl)
    err_console.print(f"correctness: max |h_attention - dense oracle| = {error:.2e} ({dtype}, {name})")
    what = (
        f"training step, {preset} preset"
        if model
        else f"batch {batch_size}, {heads} heads, dim_head {dim_head}"
    )
    title = f"{what}, block {block_size}, {dtype}, {name}, {config.impl} H-attn"
    rows = []
    with Live(bench_table(rows, config, title), console=console, transient=True) as live:
        for row in run_bench(config):
            rows.append(row)
            live.update(bench_table(rows, config, title))
    console.print(bench_table(rows, config, title))
    for line in exponent_lines(rows, config):
        console.print(line)
    if json_path is not None:
        write_json(json_path, to_json(rows, config, error, name))
    if plot_path is not None:
        plot(rows, config, plot_path)
        err_console.print(f"plot written to {plot_path}")


def _bench_decode(preset: str, device: str, dtype: str, json_path: Path | None) -> None:
    from rich.table import Table

    from htcli.bench import decode_bench
    from htcli.bench_report import write_json

    err_console.print(f"decode bench: {preset} preset, random weights, batch 1, {dtype} ...")
    result = decode_bench(preset, device_name=device, dtype_name=dtype)
    table = Table(title=f"sampling, {preset} preset, {result['device']}, {dtype}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        f"tokens/s, {result['new_tokens']} new after a {result['prompt_len']}-byte prompt: cache",
        f"{result['cached_tokens_per_s']:.1f}",
    )
    table.add_row("tokens/s, recomputing the forward pass", f"{result['recompute_tokens_per_s']:.2f}")
    table.add_row("speedup, cache vs recompute", f"{result['speedup']:.0f}x")
    table.add_row(
        f"time per token near position {result['early_position']}",
        f"{result['token_s_near_1000'] * 1e3:.2f} ms",
    )
    table.add_row(
        f"time per token near position {result['late_position']}",
        f"{result['token_s_near_8000'] * 1e3:.2f} ms",
    )
    table.add_row("late / early", f"{result['late_over_early']:.2f}x")
    table.add_row(f"prefill of {result['prompt_len']} bytes", f"{result['prefill_s']:.2f} s")
    table.add_row("one forward pass, same length", f"{result['forward_s']:.2f} s")
    table.add_row("prefill / forward", f"{result['prefill_over_forward']:.2f}x")
    console.print(table)
    if json_path is not None:
        write_json(json_path, result)
