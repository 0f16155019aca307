"""`htcli sample`: the prompt, the options' checks, the samples streamed and printed."""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from htcli.cli.common import (
    Checkpoint,
    Device,
    Dtype,
    Seed,
    app,
    err_console,
    flag,
    parse_path,
    switch,
    user_errors,
)
from htcli.config import MAX_SEED
from htcli.errors import HtcliError
from htcli.help_layout import Command
from htcli.stop import Terminated, import_whole, stop_within, stops_unwrapped

MAX_SAMPLES = 4096  # sample --num-samples: one batch, one decode cache per sample


Temperature = Annotated[
    float,
    typer.Option(
        help="Sampling temperature; 0: always the most likely byte (then no --top-k, --top-p or several "
        "samples)."
    ),
]
Echo = Annotated[
    bool | None,
    switch(
        "echo", "Print the prompt before its continuation (default on; not with --json, which leaves it out)."
    ),
]
Cache = Annotated[
    bool,
    switch(
        "cache",
        "Decode with the model's cache (the default: H-attention's, a constant cost per byte, or an exact "
        "model's KV cache), or with --no-cache run the model over the whole context for every byte (slow).",
    ),
]


@app.command(cls=Command)
def sample(
    checkpoint: Checkpoint,
    prompt: Annotated[str | None, typer.Option(help="Text to continue (default: a newline).")] = None,
    prompt_file: Annotated[
        Path | None,
        typer.Option(parser=parse_path, help="Continue this file's bytes (-: stdin), not with --prompt."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Bytes to generate per sample (at least 1).")] = 500,
    temperature: Temperature = 0.8,
    top_k: Annotated[
        int | None, typer.Option(help="Draw only from the k most likely bytes (1 to 256).")
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(help="Draw only from the top bytes holding this probability (above 0, at most 1)."),
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
    echo: Echo = None,
    cache: Cache = True,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Generate text from a checkpoint, streamed to stdout; timing and bytes/s go to stderr."""
    with user_errors(smaller="--num-samples or model", streams=True, needs=()):  # (torch: below)
        _check_sample_options(prompt, prompt_file, num_samples, seed, max_new_tokens)
        _check_greedy(temperature, num_samples, bool(echo) and json_output)
        seeds = [seed + i for i in range(num_samples)]
        stops = [os.fsencode(s) for s in stop or []]  # (fsencode: arguments not UTF-8 byte for byte)
        echo = echo is not False and not json_output
        with _lines_if_stopped(seeds, json_output, stops):  # (from torch's import to the prompt's reading)
            import_whole("torch")
            from htcli.checkpoint import load_model
            from htcli.device import resolve_device, resolve_dtype
            from htcli.sample import SamplingConfig, generate_batch

            configs = [SamplingConfig(max_new_tokens, temperature, top_k, top_p, each) for each in seeds]
            torch_device = resolve_device(device)
            model, _ = load_model(checkpoint, torch_device)
            prompt_bytes = _prompt_bytes(prompt, prompt_file, model.config.max_seq_len, echoed=echo)
            precision = resolve_dtype(dtype, torch_device)
        steps = generate_batch(model, prompt_bytes, configs, dtype=precision, cache=cache, stop=stops)
        _print_samples(steps, prompt_bytes, configs, echo=echo, json_output=json_output, stops=stops)


@contextlib.contextmanager
def _lines_if_stopped(seeds: list[int], json_output: bool, stops: list[bytes]) -> Iterator[None]:
    """With --json, a Ctrl-C or SIGTERM in the block prints every sample's line, empty, "interrupted":
    true, as one later does (it printed none: review)."""
    try:
        with stops_unwrapped():
            yield
    except (KeyboardInterrupt, Terminated):
        if json_output:
            with contextlib.suppress(OSError, ValueError):
                configs = [types.SimpleNamespace(seed=each) for each in seeds]  # (the lines need their seeds)
                _print_the_rest(configs, [b""] * len(seeds), None, json_output, stops, True)
        raise


def _prompt_bytes(prompt: str | None, prompt_file: Path | None, context: int, echoed: bool) -> bytes:
    """The prompt: a file's last context bytes (all the model sees, and what is echoed), or --prompt's
    bytes, echoed whole: one longer than the context gets a note that the model sees only its end (a
    file too, where its size is known: it was kept short without a word). echoed: the prompt is echoed
    (the note then says which bytes)."""
    from htcli.sample import STDIN, read_prompt_sized

    if prompt_file:
        read, size = read_prompt_sized(prompt_file, context)
        what = "standard input" if os.fspath(prompt_file) == STDIN else f"the prompt file {prompt_file}"
        said = ", and only those are echoed" if echoed else ""
    else:
        read = os.fsencode(prompt or "\n")  # (fsencode: arguments not UTF-8 byte for byte)
        size, what, said = len(read), "the prompt", ""
    if size > context:
        err_console.print(
            f"[dim]note: {escape(what)} is {size:,} bytes; the model continues from its last {context:,}"
            f" (its context){said}",
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
            if stop_within(error) is not None:  # (a Ctrl-C or SIGTERM)
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
    """text to stdout, its characters that stdout's encoding lacks (not UTF-8: latin-1, ascii) as ?, and
    on a terminal its control characters that would change the terminal's state as \\x1b (a file or a
    pipe gets them as they are)."""
    if text:
        from htcli.display import for_terminal

        text = for_terminal(text) if sys.stdout.isatty() else text
        encoding = sys.stdout.encoding or "ascii"
        sys.stdout.write(text if _utf8_stdout() else text.encode(encoding, "replace").decode(encoding))
        sys.stdout.flush()


def _utf8_stdout() -> bool:
    """Whether stdout writes UTF-8 (else JSON escapes every character beyond ASCII, as \\uXXXX)."""
    try:
        return codecs.lookup(sys.stdout.encoding or "ascii").name == "utf-8"
    except (LookupError, AttributeError, TypeError):
        return False
