"""The command line end to end (train, sample, eval) and every bad input it must refuse cleanly."""

import gzip
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_FLAGS,
    assert_user_error,
    events,
    invoke,
    make_text,
    on_a_terminal,
    tiny_config,
    wait_for_a_step,
)
from safetensors.torch import load_file, save_file

from htcli import __version__, checkpoint
from htcli.checkpoint import load_model
from htcli.corpus import ByteCorpus, reader
from htcli.evaluate import evaluate
from htcli.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory holding a 6-step tiny model, and its corpus."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_bytes(make_text(20_000))
    train(tiny_config(corpus, root / "run"))
    return root / "run", corpus


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run that a test may try (and fail) to overwrite."""
    run, corpus = trained
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", corpus


def file_with(path, content: bytes):
    path.write_bytes(content)
    return path


def snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_help_does_not_import_torch():
    """`htcli --help` stays instant: importing the CLI does not import torch."""
    code = "import sys, htcli.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_command_list_gives_each_command_one_sentence():
    """`htcli --help` lists each command by its docstring's first paragraph, line breaks kept: that paragraph
    is one line of source, so that rich wraps it to the terminal (plot's broke after "(finished,")."""
    from htcli.cli import app

    for command in app.registered_commands:
        first = command.callback.__doc__.split("\n\n")[0]
        assert "\n" not in first, (command.callback.__name__, first)


@pytest.mark.parametrize("command", ["train", "sample", "eval", "bench", "plot", None])
def test_help_reads_at_80_columns(command):
    """Each command's --help (and htcli's, None) at 80 columns as a real program: every option named whole
    (train's cut `--no-skip-bad-re…` and squeezed its help to a column of 20 characters), a switch's two
    names stacked in one column, no `<bool>` type for a switch, a repeated option or argument typed by one
    value (`corpus...  <str>`, not `<list[str]>`), defaults said as train's are."""
    environment = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    process = subprocess.run(
        [sys.executable, "-m", "htcli", *([command] if command else []), "--help"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in process.stdout
    options = [line for line in lines if line.strip("│ ").startswith("--")]
    rows = [line.strip("│ ") for line in options]
    assert not [row for row in rows if "<bool>" in row or "list[" in row]
    assert "list[" not in process.stdout  # (nor an argument's: eval's corpus..., plot's runs...)
    assert "[default:" not in process.stdout  # (typer's, on a line of its own; htcli's say "(default 8)")
    assert ") (default" not in " ".join(process.stdout.split())  # (after a parenthesis: ", default ...")
    names = [row.split()[0] for row in rows]
    for index, name in enumerate(names):
        if name.startswith("--no-"):
            assert names[index - 1] == "--" + name.removeprefix("--no-"), name
    # the help text starts by column 42 (it started at 58 with the switches side by side)
    starts = [line.index(row.split("  ")[-1].strip()) for line, row in zip(options, rows) if "  " in row]
    assert starts and max(starts) <= 42, starts


def test_train_help_groups_its_options():
    """train's options in panels, Corpus before Model; every panel names parameters train has (an
    assertion when the command is built)."""
    environment = {**os.environ, "COLUMNS": "100", "TERM": "dumb"}
    process = subprocess.run(
        [sys.executable, "-m", "htcli", "train", "--help"], capture_output=True, text=True, env=environment
    )
    titles = [line.split("─ ")[1].split(" ─")[0] for line in process.stdout.splitlines() if "╭─ " in line]
    assert titles == [
        "Arguments",
        "Options",
        "Corpus",
        "Model",
        "Optimisation",
        "Validation, checkpoints, samples",
        "Hardware and logging",
    ]


def test_help_leaves_the_switches_parsing():
    """The help renames a switch for its layout alone: the same command parses --no-cache after it."""
    import typer.main

    from htcli.cli import app

    command = typer.main.get_command(app).commands["sample"]
    context = command.make_context("sample", ["run", "--no-cache"])
    assert context.params["cache"] is False
    command.get_help(context)
    again = command.make_context("sample", ["run", "--no-cache", "--stop", "x"])
    assert again.params["cache"] is False and again.params["stop"] == ["x"]
    assert [param.opts for param in command.params if param.name == "cache"] == [["--cache"]]


def test_a_sample_in_trains_display_shows_control_bytes_and_is_not_all_dim():
    """train's sample panel: the corpus's and the model's control bytes shown as \\x1b (an escape sequence
    changed the terminal's title, cleared its screen, left colours on), the prompt dim and the model's
    bytes not (both were dim); its lines not cut where stderr is a file (a path over three lines)."""
    from rich.console import Console

    from htcli.display import TrainDisplay

    console = Console(record=True, width=60, force_terminal=False)
    with TrainDisplay(console) as display:
        display({"event": "sample", "step": 1, "prompt": "a\x1b]0;pwned\x07b", "text": "c\x1b[2Jd\x9b\r\ne"})
        spans = display.sample.renderable.spans
        console.print(display.sample)  # (the live view's panel, drawn here: the console is no terminal)
        display({"event": "checkpoint", "step": 1, "path": "/tmp/" + "a" * 80 + "/run"})
    text = console.export_text()
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    assert "a\\x1b]0;pwned\\x07b" in text and "c\\x1b[2Jd\\x9b" in text and "x0d" not in text  # (CRLF's CR)
    assert [(span.start, span.end, span.style) for span in spans] == [(0, len("a\\x1b]0;pwned\\x07b"), "dim")]
    assert "/tmp/" + "a" * 80 + "/run" in text  # (one line: soft wrap)


def test_trains_display_says_at_once_that_a_stop_waits_for_the_step():
    """The "stopping" event (a Ctrl-C or SIGTERM during a slow step) is one line that says the run saves and
    stops when the step ends, and, for a Ctrl-C, what a second one does where it does that."""
    from rich.console import Console

    from htcli.display import TrainDisplay

    console = Console(record=True, width=60, force_terminal=False)
    with TrainDisplay(console) as display:
        display({"event": "stopping", "step": 3, "signal": "SIGINT", "again_quits": True})
        display({"event": "stopping", "step": 3, "signal": "SIGINT", "again_quits": False})
        display({"event": "stopping", "step": 3, "signal": "SIGTERM", "again_quits": True})
    lines = console.export_text().splitlines()
    assert lines == [
        "Ctrl-C: saving and stopping once the step in progress ends (Ctrl-C again quits without saving)",
        "Ctrl-C: saving and stopping once the step in progress ends",  # (one ignored before the run)
        "SIGTERM: saving and stopping once the step in progress ends",
    ]


def test_a_display_whose_stderr_fails_at_its_end_says_so_and_raises_nothing():
    """The live view's last frame on a stderr that takes no more (a pipe closed as a stopped run ends): its
    OSError ended the command with exit 1, a saved run stopped by SIGTERM lost its 75."""
    import io

    from rich.console import Console

    from htcli.display import TrainDisplay

    class Failing(io.StringIO):
        def write(self, text):
            raise OSError(
                28, "No space left on device"
            )  # (a full disk; a closed pipe as htcli's console says it)

    console = Console(file=io.StringIO(), force_terminal=False)
    display = TrainDisplay(console)
    with display:
        display({"event": "step", "step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0})
        display.live.start()
        console.file = Failing()
    assert display.failed


def test_a_slow_run_says_how_long_it_will_take_at_its_first_step():
    """Plain `htcli train data.txt` on 2 CPU cores (the small preset, ~40 s a step) showed no eta (rich
    estimated its speed over 30 s, which held no two steps) and nothing of its 11 hours until its first
    eval, an hour in (review): its first step says the pace and the hours left, with advice on a CPU, and
    the eta's speed is estimated over an hour."""
    import io

    from rich.console import Console

    from htcli.display import TrainDisplay

    for device, seconds, said in (  # fmt: skip
        (
            "cpu",
            40.0,
            "note: the first step took 40 s: at that pace (a first step is often the slowest) the 999"
            " steps left take about 11 h: a smaller",
        ),
        (
            "cuda",
            4.0,
            "note: the first step took 4 s: at that pace (a first step is often the slowest) the 999"
            " steps left take about 1.1 h\n",
        ),
        ("cuda", 4.4, "note: the first step took 4.4 s: at that pace"),
        ("cpu", 1.0, None),
    ):
        out = io.StringIO()
        display = TrainDisplay(Console(file=out, force_terminal=False, width=200))
        start = dict(event="start", steps=1000, step=0, resumed=False, params=1, device=device, dtype="fp32",
                     train_bytes=1, val_bytes=1, tokens_per_step=1)  # fmt: skip
        display(start)
        step = {
            "event": "step",
            "step": 1,
            "loss": 1.0,
            "lr": 1e-3,
            "tokens_per_s": 1.0,
            "step_seconds": seconds,
        }
        display(step)
        display({**step, "step": 2})  # (said once, at the session's first step)
        assert out.getvalue().count("note:") == (said is not None) and (
            said is None or said in out.getvalue()
        )
    assert display.progress.speed_estimate_period >= 3600


def test_compile_without_a_cxx_compiler_is_one_line(corpus, tmp_path):
    """--compile on a CPU where no C++ compiler works (inductor's InvalidCxxCompiler at the first step) was
    a traceback of 135 lines; one line says to train without --compile (review)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("g++", "gcc", "cc", "c++", "clang", "clang++"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "CXX": str(fake / "g++"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    command = [sys.executable, "-m", "htcli", "train", corpus, "--out", tmp_path / "run", *TINY_FLAGS]
    done = subprocess.run([*map(str, command), "--steps", "2", "--compile"], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("error: --compile failed (InvalidCxxCompiler: No working C++ compiler found")
    assert said.endswith("stopped (none saved yet): train without --compile")


def test_the_live_tokens_per_second_is_tokens_over_time():
    """The live view's tokens/s is the recent steps' tokens over their time, as the summary's is the
    session's: after a slow first step (10 s for 1,000 tokens) and five fast ones (1 s each), 400, where an
    average of rates smoothed 0.9 said 469 (a run's live 11.6k beside its summary's 12.6k; review); the
    first step leaves it after RATE_STEPS more."""
    import io

    from rich.console import Console

    from htcli.display import RATE_STEPS, TrainDisplay

    display = TrainDisplay(Console(file=io.StringIO(), force_terminal=False))
    step = {"event": "step", "loss": 1.0, "lr": 1e-3}
    display({**step, "step": 1, "tokens_per_s": 100.0, "step_seconds": 10.0})
    for number in range(2, 7):
        display({**step, "step": number, "tokens_per_s": 1000.0, "step_seconds": 1.0})
    assert display.tokens_per_s == 400.0 and "400 tok/s" in display._stats_line()
    for number in range(7, 7 + RATE_STEPS):
        display({**step, "step": number, "tokens_per_s": 1000.0, "step_seconds": 1.0})
    assert display.tokens_per_s == 1000.0


def test_help_gives_every_presets_model_defaults():
    """The model switches' defaults that train --help states are each preset's model config's."""
    from htcli.cli import MODEL_DEFAULTS
    from htcli.presets import PRESETS, model_config

    for preset in PRESETS:
        config = model_config(preset)
        for name, default in MODEL_DEFAULTS.items():
            value = getattr(config, name)
            if isinstance(value, bool):
                value = "on" if value else "off"
            assert value == default, (preset, name, value)


def test_an_arguments_own_metavar_is_its_usage():
    """A metavar given to an argument is written as it is, as click writes it (review: upper-cased, in
    brackets)."""
    from typing import Annotated

    import typer
    from typer.testing import CliRunner

    from htcli.help_layout import Command

    one = typer.Typer()

    @one.command(cls=Command)
    def main(path: Annotated[str, typer.Argument(metavar="<file>")]) -> None:
        """A command."""

    shown = CliRunner().invoke(one, ["--help"], env={"COLUMNS": "80"})
    assert "Usage: main [OPTIONS] <file>" in shown.stdout, shown.stdout


def test_help_gives_every_presets_sizes_usage_lines_and_takes_h():
    """--preset's help names each preset's width, depth and context (it named the presets alone, and the
    size options gave no default; review); -h is --help, for every command (it was "No such option");
    usage lines name arguments as click does, eval's corpus as needed."""
    from typer.testing import CliRunner

    from htcli.cli import app
    from htcli.cli.train import PRESET_SIZES
    from htcli.presets import PRESETS, model_config

    assert set(PRESET_SIZES) == set(PRESETS)
    for preset, said in PRESET_SIZES.items():
        config = model_config(preset)
        assert said.startswith(f"dim {config.dim}, depth {config.depth}, {config.max_seq_len}"), preset
    usages = {  # (typer 0.29 wrote {checkpoint} and eval's [corpus]..., which it asks for)
        "": "[OPTIONS] COMMAND [ARGS]...",
        "train": "[OPTIONS] [CORPUS]...",
        "sample": "[OPTIONS] CHECKPOINT",
        "eval": "[OPTIONS] CHECKPOINT CORPUS...",
        "bench": "[OPTIONS]",
        "plot": "[OPTIONS] RUNS...",
    }
    for command, usage in usages.items():
        shown = CliRunner().invoke(app, [*command.split(), "-h"], env={"COLUMNS": "80"})
        assert shown.exit_code == 0, (command, shown.output)
        assert f"Usage: {' '.join(['htcli', *command.split(), usage])}" in shown.stdout, shown.stdout
    shown = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    assert "tiny (dim 64, depth 2, 256-byte context" in " ".join(shown.replace("│", " ").split())


def test_train_writes_a_run(corpus, tmp_path):
    """`htcli train` writes weights, optimizer, state, config and log, the best weights, and prints a
    summary."""
    result = invoke("train", corpus, "--out", tmp_path / "run", "--steps", 4, "--eval-every", 2, *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names == {
        "model.safetensors",
        "best.safetensors",
        "optimizer.safetensors",
        "state.json",
        "config.json",
        "log.jsonl",
        ".lock",
    }
    assert "val bits per byte" in result.stdout and "4 of 4" in result.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["dim"] == 32 and config["corpus"] == [str(corpus)]


def test_resume_from_the_command_line_is_exact(corpus, tmp_path):
    """--steps 4 then --resume --steps 8 gives the weights of one --steps 8 run (constant learning rate)."""
    flags = [*TINY_FLAGS, "--lr", "1e-3", "--min-lr", "1e-3", "--eval-every", 0, "--save-every", 0]
    assert invoke("train", corpus, "--out", tmp_path / "one", "--steps", 8, *flags).exit_code == 0
    assert invoke("train", corpus, "--out", tmp_path / "two", "--steps", 4, *flags).exit_code == 0
    resumed = invoke("train", "--out", tmp_path / "two", "--resume", "--steps", 8)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at step 4" in resumed.stderr
    # the summary's steps are the run's, its time and bytes this session's: said so (they read as the run's)
    summary = " ".join(resumed.stdout.split())
    assert (
        "steps │ 8 of 8 (4 this session, from step 4)" in summary
        and "bytes trained on this session" in summary
    )
    one, two = (
        load_file(str(tmp_path / "one/model.safetensors")),
        load_file(str(tmp_path / "two/model.safetensors")),
    )
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_sample_is_reproducible_and_reports_speed(trained):
    """Same seed, same text on stdout; timing and bytes/s on stderr; the prompt is echoed."""
    run, _ = trained
    args = ["sample", run, "--prompt", "the ", "--max-new-tokens", 30, "--seed", 3, "--device", "cpu"]
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.startswith("the ")
    assert "30 bytes in" in first.stderr and "bytes/s" in first.stderr
    other = invoke(*args[:-4], "--seed", 4, "--device", "cpu")
    assert other.stdout != first.stdout
    one = invoke("sample", run, "--max-new-tokens", 1, "--device", "cpu")
    assert "1 byte in" in one.stderr, one.stderr  # (was "1 bytes")


def test_sample_on_a_terminal_echoes_the_whole_prompt(trained):
    """stdout and stderr on one terminal: the spinner shown while the prompt is read is drawn and erased
    before the prompt is echoed (it was drawn on the line of a prompt that does not end in a newline, and
    erasing it erased that line)."""
    run, _ = trained
    command = [sys.executable, "-m", "htcli", "sample", run, "--prompt", "class Foo:\n    def __init__(self",
               "--max-new-tokens", 5, "--device", "cpu"]  # fmt: skip
    code, shown = on_a_terminal(command)
    assert code == 0, shown
    assert b"reading the prompt" in shown  # (the spinner was drawn: a terminal)
    assert shown.rindex(b"reading the prompt") < shown.index(b"    def __init__(self"), shown


def test_sample_shows_control_characters_on_a_terminal_and_sends_them_to_a_file(trained, tmp_path):
    """A prompt (or a model of binary data) with ESC and SO: on a terminal they are shown as \\x1b (sent
    raw, they turned the text red and the rest into line-drawing characters; review), tabs, newlines and
    carriage returns as they are; a pipe gets the bytes as they are."""
    run, _ = trained
    (tmp_path / "p.txt").write_bytes(b"\x1b[31mred\x1b[0m\x0e\tx\r\n")
    command = [sys.executable, "-m", "htcli", "sample", run, "--prompt-file", tmp_path / "p.txt",
               "--max-new-tokens", 1, "--device", "cpu", "--temperature", 0]  # fmt: skip
    code, shown = on_a_terminal(command, stderr=subprocess.DEVNULL)
    assert code == 0, shown
    assert shown.startswith(b"\\x1b[31mred\\x1b[0m\\x0e\tx\r"), shown
    assert b"\x1b" not in shown and b"\x0e" not in shown, shown
    piped = subprocess.run(list(map(str, command)), capture_output=True, timeout=60)
    assert piped.returncode == 0 and piped.stdout.startswith(b"\x1b[31mred\x1b[0m\x0e\tx\r\n"), piped


def test_sample_to_a_stdout_of_another_encoding(trained):
    """stdout in latin-1 or ASCII (PYTHONIOENCODING, a legacy locale): the characters it lacks print as ?,
    and --json escapes them (both stopped with a UnicodeEncodeError traceback)."""
    run, _ = trained
    base = [sys.executable, "-m", "htcli", "sample", run, "--prompt", "déf ✓ ", "--max-new-tokens", 20,
            "--device", "cpu", "--temperature", 0]  # fmt: skip
    expected = invoke(*base[3:], "--json")
    text = json.loads(expected.stdout)["text"]
    for encoding in ("latin-1", "ascii"):
        env = {**os.environ, "PYTHONIOENCODING": encoding}
        plain = subprocess.run(list(map(str, base)), capture_output=True, env=env, timeout=60)
        assert plain.returncode == 0 and b"Traceback" not in plain.stderr, plain.stderr
        shown = ("déf ✓ " + text + "\n").encode(encoding, "replace")
        assert plain.stdout == shown
        as_json = subprocess.run(list(map(str, [*base, "--json"])), capture_output=True, env=env, timeout=60)
        assert as_json.returncode == 0, as_json.stderr
        assert as_json.stdout.isascii() and json.loads(as_json.stdout)["text"] == text


@pytest.mark.parametrize("json_output", [False, True])
def test_sample_into_a_pipe_its_reader_closes_ends_quietly(trained, json_output):
    """`htcli sample RUN | head -c 100`: the sample ends at the closed pipe without a word, exit code 141 as
    for `yes | head` (it said "error: cannot write the output: Broken pipe", exit 1)."""
    run, _ = trained
    length = 300 if json_output else 1_000_000  # (--json writes at the end: into the pipe closed before)
    command = [sys.executable, "-m", "htcli", "sample", run, "--max-new-tokens", length, "--device", "cpu"]
    command += ["--json", "--num-samples", 2] if json_output else []
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if not json_output:
            assert len(process.stdout.read(100)) == 100
        process.stdout.close()
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 141, stderr
    assert b"error" not in stderr and b"Traceback" not in stderr, stderr


def test_tables_naming_a_run_on_an_ascii_stdout(trained, tmp_path):
    """eval's and plot's tables name the run; a run named rün on an ASCII stdout was a UnicodeEncodeError's
    traceback and exit 1 after the work was done (train's summary alike; review): shown as r\\xfcn."""
    run, corpus = trained
    shutil.copytree(run, tmp_path / "rün")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    base = [sys.executable, "-m", "htcli"]
    for args in (["eval", "rün", str(corpus), "--device", "cpu"], ["plot", "rün", "-o", "p.png"]):
        done = subprocess.run([*base, *args], cwd=tmp_path, capture_output=True, env=env, timeout=120)
        assert done.returncode == 0 and b"r\\xfcn" in done.stdout, done.stderr
    # an ASCII locale's stdout (surrogateescape errors: it was the same traceback)
    ascii_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    ascii_locale.pop("PYTHONIOENCODING", None)
    done = subprocess.run(
        [*base, "plot", "rün", "-o", "p.png"],
        cwd=tmp_path,
        capture_output=True,
        env=ascii_locale,
        timeout=120,
    )
    assert done.returncode == 0 and b"r\\xfcn" in done.stdout, done.stderr


def test_force_color_into_a_pipe_gives_colours_without_live_displays(trained):
    """FORCE_COLOR=1 with stdout and stderr piped (a CI log that keeps colours): rich took it for a terminal,
    and the spinners' frames and cursor moves went into the log (review); colours alone now."""
    run, corpus = trained
    env = {**os.environ, "FORCE_COLOR": "1"}
    env.pop("NO_COLOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "htcli", "eval", str(run), str(corpus), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\x1b[" in done.stdout  # (colours, as asked)
    assert "\x1b[?25" not in done.stderr + done.stdout and "\x1b[1A" not in done.stderr  # (no cursor moves)
    # TTY_COMPATIBLE=1, rich's word that a log takes a terminal's codes, still draws them (review)
    done = subprocess.run(
        [sys.executable, "-m", "htcli", "eval", str(run), str(corpus), "--device", "cpu"],
        capture_output=True, text=True, env={**env, "TTY_COMPATIBLE": "1"}, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "\x1b[?25" in done.stderr, done.stderr
    # numbers are not coloured on their own (rich's highlighting coloured "1." of 1.1MB, "(" but not ")")
    done = subprocess.run(
        [sys.executable, "-m", "htcli", "sample", str(run), "--max-new-tokens", "5", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "\x1b[2m5 bytes in " in done.stderr, done.stderr


@pytest.mark.parametrize("columns", ["0", "²"])
def test_a_terminal_width_of_0_is_taken_as_unset(tmp_path, columns):
    """COLUMNS=0 (exported by some CI systems and editors' shells) made rich print nothing: no error line,
    no help (review); COLUMNS=² was a ValueError's traceback at import (rich's int of a digit)."""
    env = {**os.environ, "COLUMNS": columns}
    missing = str(tmp_path / "nope.txt")
    done = subprocess.run(
        [sys.executable, "-m", "htcli", "train", missing], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 1 and f"error: corpus {missing} does not exist" in done.stderr, done.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "htcli", "--help"], capture_output=True, text=True, env=env
    )
    assert "Usage: htcli" in helped.stdout


def test_sample_from_a_file_and_several_samples(trained, tmp_path):
    """--prompt-file continues a file's bytes; --num-samples prints that many continuations."""
    run, _ = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("of the ")
    result = invoke("sample", run / "model.safetensors", "--prompt-file", prompt, "--num-samples", 2,
                    "--max-new-tokens", 5, "--temperature", 0.01, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith("of the ")


def test_a_prompt_longer_than_the_context_is_said_to_be(trained, tmp_path):
    """--prompt is echoed whole; one longer than the model's context (64 bytes here) gets a note on stderr
    that the model continues from its end (it said nothing); the continuation is that of the end alone."""
    run, _ = trained
    text = make_text(300).decode()
    args = ["sample", run, "--max-new-tokens", 6, "--temperature", 0, "--device", "cpu"]
    long, end = invoke(*args, "--prompt", text), invoke(*args, "--prompt", text[-64:])
    assert long.exit_code == 0 and long.stdout.startswith(text), long.output
    assert "note: the prompt is 300 bytes; the model continues from its last 64 (its context)" in long.stderr
    assert "note:" not in end.stderr and long.stdout[len(text) :] == end.stdout[64:]
    # a prompt file longer than the context: its end is read (and echoed), now with a note (review)
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "short.txt").write_text(text[-64:])
    from_file = invoke(*args, "--prompt-file", tmp_path / "long.txt")
    said = f"note: the prompt file {tmp_path / 'long.txt'} is 300 bytes; the model continues from its last 64"
    assert said in " ".join(from_file.stderr.split()) and from_file.stdout == end.stdout
    assert "note:" not in invoke(*args, "--prompt-file", tmp_path / "short.txt").stderr


def test_eval_with_its_arguments_swapped_says_so(trained):
    """`htcli eval data.txt runs/x` said only that data.txt is not a checkpoint (review): with a run
    directory among the corpus, the line says the arguments look swapped; a wrong checkpoint alone does
    not."""
    run, corpus = trained
    result = invoke("eval", corpus, run, "--device", "cpu")
    assert_user_error(result, f"{corpus} is not a checkpoint")
    assert result.stderr.strip().endswith(
        "the arguments look swapped: htcli eval CHECKPOINT CORPUS... (the run first)"
    )
    result = invoke("eval", corpus, corpus, "--device", "cpu")
    assert_user_error(result, f"{corpus} is not a checkpoint")
    assert "swapped" not in result.stderr


def test_eval_of_another_run_as_corpus_is_refused(trained, run_copy):
    """`htcli eval runs/a runs/b/model.safetensors held_out.txt` (comparing two runs) scored runs/b's
    weights as text, 14 bits per byte, exit 0; `runs/a runs/b` stopped on runs/b's log as a bad record
    (review): one line saying it is a run, not text; the run evaluated as its own corpus is as before."""
    (run, corpus), copy = trained, run_copy[0]
    for other, what in [(copy, "an htcli run"), (copy / "model.safetensors", "a file of the htcli run")]:
        result = invoke("eval", run, other, corpus, "--device", "cpu")
        assert_user_error(result, f"{other} is {what}")
        assert "not text to score: htcli eval scores one CHECKPOINT" in " ".join(result.stderr.split())
    result = invoke("eval", run, run / "model.safetensors", "--device", "cpu")
    assert result.exit_code == 1 and "the directory of the run evaluated" in result.stderr
    # reached by a glob, a symlink or a file deeper in it (each scored as text after the first fix; review)
    (copy / "notes").mkdir()
    (copy / "notes" / "a.txt").write_bytes(b"x" * 200)
    link = copy.parent / "weights.st"
    link.symlink_to(copy / "model.safetensors")
    for other, inside in [(f"{copy}/*.safetensors", copy / "best.safetensors"), (link, link),
                          (copy / "notes" / "a.txt", copy / "notes" / "a.txt")]:  # fmt: skip
        result = invoke("eval", run, other, "--device", "cpu")
        assert_user_error(result, f"{inside} is a file of the htcli run {copy}, not text to score")


def test_eval_says_when_its_context_is_longer_than_the_corpus(trained, tmp_path):
    """--context above the corpus's length was shrunk to one window of the corpus without a word (the
    JSON's context alone said it; review): a note on stderr; none where the corpus is long enough."""
    run, corpus = trained
    short = tmp_path / "short.txt"
    short.write_bytes(corpus.read_bytes()[:40])
    result = invoke("eval", run, short, "--context", 64, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    said = "note: the corpus is 40 bytes, fewer than --context 64 plus one: scored in one window of 39"
    assert said in " ".join(result.stderr.split()) and json.loads(result.stdout)["context"] == 39
    assert "note:" not in invoke("eval", run, corpus, "--context", 64, "--device", "cpu").stderr


def test_a_prompt_from_standard_input(trained, tmp_path):
    """--prompt-file - reads standard input to its end (3 MB here: chunks, the last context's worth kept)
    and continues it as the same bytes in a file; without a standard input, or as a corpus, one line."""
    run, _ = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(make_text(3_000_000))
    command = [
        sys.executable,
        "-m",
        "htcli",
        "sample",
        str(run),
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]
    command += ["--device", "cpu", "--prompt-file"]
    done = [
        subprocess.run([*command, str(path)], input=prompt.read_bytes(), capture_output=True, timeout=60)
        for path in ("-", prompt)
    ]
    assert done[0].returncode == 0 and done[0].stdout == done[1].stdout, done[0].stderr
    # (both longer than the context: each says so, standard input too; review)
    said = "is 3,000,000 bytes; the model continues from its last 64 (its context), and only those are echoed"
    assert b"note: standard input " + said.encode() in b" ".join(done[0].stderr.split())
    assert f"note: the prompt file {prompt} {said}".encode() in b" ".join(done[1].stderr.split())
    quiet = subprocess.run([*command, str(prompt), "--no-echo"], capture_output=True, timeout=60)
    said = said.removesuffix(", and only those are echoed")  # (nothing is echoed: review)
    assert f"{prompt} {said}".encode() in b" ".join(quiet.stderr.split())
    assert b"echoed" not in quiet.stderr, quiet.stderr
    closed = subprocess.run(
        [*command, "-"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert (
        closed.returncode == 1
        and " ".join(closed.stderr.split())
        == "error: standard input (prompt file -) is empty: generation needs at least one byte to continue;"
        " give some text"
    )
    none = subprocess.run(
        shlex.join(command) + " - <&-", shell=True, capture_output=True, text=True, timeout=60
    )
    assert none.returncode == 1, none.stderr
    assert (
        none.stderr == "error: the prompt file - is standard input, and this process has none: give a file\n"
    )
    assert_user_error(
        invoke("eval", run, "-"), "a corpus is read from files, not from standard input (-): save"
    )


def test_each_of_several_samples_prints_as_its_seed_alone(trained, tmp_path):
    """A prompt that ends inside a UTF-8 character: samples 2.. were decoded apart from the prompt (two
    U+FFFD where their seed alone printed the character the first byte completes)."""
    run, _ = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"ab\xc3")
    args = [
        "sample",
        run,
        "--prompt-file",
        prompt,
        "--max-new-tokens",
        1,
        "--temperature",
        5,
        "--device",
        "cpu",
    ]
    together = invoke(*args, "--num-samples", 8)
    assert together.exit_code == 0, together.output
    alone = [invoke(*args, "--seed", seed).stdout for seed in range(8)]
    assert together.stdout == "".join(alone)
    assert any(not text.startswith("ab\ufffd") for text in alone)  # (one completes the character)


def test_several_samples_at_once_as_json_lines_equal_each_seed_alone(trained):
    run, _ = trained
    args = ["sample", run, "--prompt", "the ", "--max-new-tokens", 20, "--device", "cpu", "--json"]
    together = invoke(*args, "--num-samples", 3, "--seed", 5)
    assert together.exit_code == 0, together.output
    records = [json.loads(line) for line in together.stdout.splitlines()]
    assert [r["seed"] for r in records] == [5, 6, 7] and [r["sample"] for r in records] == [1, 2, 3]
    for record in records:
        alone = json.loads(invoke(*args, "--seed", record["seed"]).stdout)
        assert alone["text"] == record["text"] and record["bytes"] == 20 and record["stop"] is None
        assert record["interrupted"] is False


@pytest.mark.parametrize("json_output", [True, False])
def test_samples_interrupted_are_printed_as_far_as_they_came(trained, monkeypatch, json_output):
    """Ctrl-C during several samples (--json: during any) printed nothing of those not streamed: with
    --json every sample's line comes, marked interrupted (also before the first byte, while the model
    reads the prompt: it printed none; review), then the bytes/s line (there too) and the one line; 130."""
    from htcli import sample

    def interrupted_after_five(*args, **kwargs):
        yield from itertools.islice(generate_batch(*args, **kwargs), bytes_before)
        raise KeyboardInterrupt

    run, _ = trained
    args = ["sample", run, "--prompt", "the ", "--device", "cpu", "--num-samples", 3, "--no-echo"]
    generate_batch = sample.generate_batch
    monkeypatch.setattr(sample, "generate_batch", interrupted_after_five)
    bytes_before = 5
    result = invoke(*args, *(["--json"] if json_output else []))
    assert result.exit_code == 130 and result.stderr.endswith("interrupted: stopped; no file was changed\n")
    assert "15 bytes in" in result.stderr
    if json_output:
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert [(r["sample"], r["bytes"], r["interrupted"]) for r in records] == [
            (i, 5, True) for i in (1, 2, 3)
        ]
        bytes_before = 0
        result = invoke(*args, "--json")
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert [(r["bytes"], r["text"], r["interrupted"]) for r in records] == [(0, "", True)] * 3
        assert result.exit_code == 130
    else:
        assert "sample 3 of 3 (seed 2), interrupted" in result.stderr
        assert [len(line.encode()) >= 5 for line in result.stdout.split("\n")] == [True] * 3 + [False]
        bytes_before = 0  # (stopped while the model reads the prompt: no text, the bytes/s line all the same)
        result = invoke(*args)
        assert result.exit_code == 130 and "0 bytes in" in result.stderr and not result.stdout.strip()


def test_samples_stopped_while_the_model_loads_have_their_json_lines(trained, monkeypatch):
    """--json stopped while the model loaded (before it read the prompt) printed no line (review): every
    sample's, empty, "interrupted": true, as once the prompt is being read; exit 130."""
    import htcli.checkpoint

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(htcli.checkpoint, "load_model", stopped)
    run, _ = trained
    result = invoke("sample", run, "--device", "cpu", "--num-samples", 2, "--json")
    assert result.exit_code == 130 and result.stderr == "interrupted: stopped; no file was changed\n"
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["sample"], r["text"], r["interrupted"]) for r in records] == [(1, "", True), (2, "", True)]


def test_stop_ends_a_sample_with_the_stop_string(trained):
    run, _ = trained
    args = ["sample", run, "--prompt", "the ", "--max-new-tokens", 60, "--seed", 1, "--device", "cpu"]
    free = json.loads(invoke(*args, "--json").stdout)["text"]
    stop = next(
        c for c in free[10:] if c.isascii() and c.isprintable()
    )  # (a tiny model's text is not all UTF-8)
    record = json.loads(invoke(*args, "--json", "--stop", stop, "--stop", "\x00never").stdout)
    assert record["text"] == free[: free.find(stop) + len(stop)] and record["stop"] == stop
    plain = invoke(*args, "--stop", stop)
    assert plain.stdout == "the " + record["text"] + "\n"
    # two stops that both end the text (one the other's end): the field names the longer, in either order
    printable = [i for i, c in enumerate(free) if c.isascii() and c.isprintable()]
    end = next(i for i in printable if i - 1 in printable and free.find(free[i]) == i)
    short, longer = free[end], free[end - 1 : end + 1]
    for stops in (["--stop", short, "--stop", longer], ["--stop", longer, "--stop", short]):
        both = json.loads(invoke(*args, "--json", *stops).stdout)
        assert both["text"] == free[: end + 1] and both["stop"] == longer, stops


def test_eval_json_matches_the_library(trained, tmp_path):
    """`htcli eval --json` prints one object whose bits per byte equal evaluate() on the same corpus."""
    run, _ = trained
    corpus = tmp_path / "held_out.txt"
    corpus.write_bytes(make_text(500, seed=9))
    result = invoke("eval", run, corpus, "--stride", 32, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model, _ = load_model(run)
    with ByteCorpus([corpus]) as opened:
        expected = evaluate(model, opened.span(), stride=32)
    assert report["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert report["bytes_scored"] == 499 and report["step"] == 6
    assert report["nats_per_byte"] == pytest.approx(expected.nats_per_byte, rel=1e-6)
    table = invoke("eval", run, corpus, "--stride", 32, "--device", "cpu")
    assert "bits per byte" in table.stdout and f"{expected.bits_per_byte:.4f}" in table.stdout


def test_eval_json_of_a_corpus_whose_name_is_not_utf8(trained, tmp_path):
    """A corpus file whose name is not UTF-8: --json names it with the byte escaped as text (\\xe9), as
    messages do; it wrote a lone surrogate escape (\\udce9), which strict JSON readers refuse."""
    run, _ = trained
    corpus = os.fsdecode(bytes(tmp_path) + b"/held\xe9.txt")
    with open(corpus, "wb") as file:
        file.write(make_text(500, seed=9))
    result = invoke("eval", run, corpus, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "\\ud" not in result.stdout
    assert json.loads(result.stdout)["corpus"] == [f"{tmp_path}/held\\xe9.txt"]


def test_errors_show_bytes_of_names_that_are_not_utf8_as_plot_does(trained, tmp_path):
    """A missing corpus or prompt file whose name is not UTF-8: the byte as \\xe9 (it was \\udce9, where
    plot and the checkpoint's checks wrote \\xe9)."""
    run, _ = trained
    missing = os.fsdecode(bytes(tmp_path) + b"/no\xe9.txt")
    shown = f"{tmp_path}/no\\xe9.txt"
    assert_user_error(invoke("eval", run, missing), f"corpus {shown} does not exist")
    assert_user_error(
        invoke("sample", run, "--prompt-file", missing),
        f"prompt file {shown} does not exist: give a file of text, or - for standard input",
    )


@pytest.mark.parametrize("stop,said", [(KeyboardInterrupt, "the Ctrl-C"), ("Terminated", "the SIGTERM")])
def test_a_stop_after_the_run_ended_changes_nothing(corpus, tmp_path, monkeypatch, stop, said):
    """A Ctrl-C or SIGTERM 0-3 ms after a run logged its end (its last checkpoint saved: while it closed,
    or its summary printed) said "stopped without saving", exit 130 or 143: a scheduler took the finished
    run as failed (review). Here one comes as the run closes: a note, exit 0, the run whole."""
    from htcli import stop as stops
    from htcli.train import Run

    stop = getattr(stops, stop) if isinstance(stop, str) else stop
    close = Run.close

    def closed_then_stopped(self):
        close(self)
        raise stop

    monkeypatch.setattr(Run, "close", closed_then_stopped)
    result = invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert (
        result.stderr.splitlines()[-1]
        == f"{said} came after the run had ended at step 2, saved: its exit code kept"
    )
    assert checkpoint.read_checkpoint_info(tmp_path / "run").step == 2


def test_a_ctrl_c_while_the_loggers_close_cuts_none_short(corpus, tmp_path, monkeypatch):
    """After the run's end, its loggers close (W&B's for seconds): a Ctrl-C then raised inside the close,
    cutting the logger short, and said "stopped without saving", exit 130 (review). It is the training
    loop's first stop, recorded: the logger closes, the run ends as it would, exit 0 and its summary."""
    from htcli.loggers import TensorBoardLogger

    close = TensorBoardLogger.close
    closed = []

    def interrupted_then_closed(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # (the handler runs)
        close(self)
        closed.append(True)

    monkeypatch.setattr(TensorBoardLogger, "close", interrupted_then_closed)
    result = invoke(
        "train", corpus, *TINY_FLAGS, "--steps", "2", "--logger", "tensorboard", "--out", tmp_path / "r"
    )
    assert result.exit_code == 0 and closed == [True], result.output
    assert "interrupted" not in result.stderr and "2 of 2" in result.stdout


def test_ctrl_c_saves_and_exits_zero(corpus, tmp_path):
    """A real SIGINT mid-run saves a checkpoint of the last finished step and exits 0."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "htcli", "train", str(corpus), "--out", str(out), "--steps", "100000"]
    command += [*TINY_FLAGS, "--eval-every", "0", "--save-every", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_a_step(out, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "continue with: htcli train --resume" in stderr
    state = json.loads((out / "state.json").read_text())
    log = (out / "log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log if '"event": "step"' in line]
    assert state["step"] == steps[-1] > 0
    assert load_model(out)[1].step == state["step"]


def test_resume_says_when_the_corpus_files_changed_at_the_same_size(tmp_path):
    """Files of a corpus directory in another order (a rename) move the held-out tail and every window:
    the resume said nothing (it compared the bytes in all alone); a resume as it was, nothing."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_bytes(make_text(15_000))
    (data / "b.txt").write_bytes(make_text(9_000, seed=1))
    out = tmp_path / "run"
    assert invoke("train", data, "--out", out, *TINY_FLAGS, "--steps", 2).exit_code == 0
    same = invoke("train", "--out", out, "--resume", "--steps", 3)
    assert same.exit_code == 0 and "corpus" not in same.stderr, same.output
    (data / "a.txt").rename(data / "c.txt")
    moved = invoke("train", "--out", out, "--resume", "--steps", 4)
    assert moved.exit_code == 0, moved.output
    said = " ".join(moved.stderr.split())
    assert "the corpus or its split changed since the checkpoint (its files are others, or in another" in said
    assert (
        "; its held-out bytes, the end of the corpus, may be bytes it trained on (--val holds out files)"
        in said
    )
    starts = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"start"' in line]
    last = starts[-1]
    assert [e["corpus_was"] for e in starts] == [None, None, [last["train_bytes"], last["val_bytes"]]]


def test_counts_print_in_the_unit_they_round_to():
    """999,700 bytes printed as '1e+03kB' (3 digits rounded up past 999 in the smaller unit)."""
    from htcli.display import human

    assert [human(n) for n in (999, 999.7, 1234, 999_700, 999_999_000, 2.5e9)] == [
        "999", "1k", "1.23k", "1M", "1G", "2.5G"
    ]  # fmt: skip


def test_resume_says_when_the_corpus_changed(tmp_path):
    """A corpus that grew since the checkpoint cannot continue the run exactly (another split, other
    windows): the resume says so, and log.jsonl's start event keeps what it was; unchanged, nothing."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(make_text(20_000))
    out = tmp_path / "run"
    assert invoke("train", corpus, "--out", out, *TINY_FLAGS, "--steps", 2).exit_code == 0
    same = invoke("train", corpus, "--out", out, "--resume", "--steps", 3)
    assert same.exit_code == 0 and "corpus changed" not in same.stderr
    with open(corpus, "ab") as grown:
        grown.write(make_text(5_000, seed=1))
    result = invoke("train", corpus, "--out", out, "--resume", "--steps", 4)
    assert result.exit_code == 0, result.output
    assert "the corpus or its split changed since the checkpoint" in result.stderr
    # (in bytes: a few bytes more printed the same 3 digits for then as the start line did for now)
    said = " ".join(result.stderr.split())  # (the console wraps lines)
    assert "(19,800 bytes to train on and 200 held out then, 24,750 and 250 now)" in said
    events = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    starts = [e for e in events if e["event"] == "start"]
    assert [e["corpus_was"] is not None for e in starts] == [False, False, True]
    assert "trained on" not in said  # (grown at its end: the held-out bytes are new ones)
    corpus.write_bytes(make_text(15_000))  # (shorter: its end now lies in what it trained on)
    shorter = invoke("train", corpus, "--out", out, "--resume", "--steps", 5)
    said = " ".join(shorter.stderr.split())
    assert (
        shorter.exit_code == 0
        and (
            "; its held-out bytes, the end of the shorter corpus, hold 150 bytes it trained on: its val bpb"
            " is no longer held out (give --val files of your own to hold out others)"
        )
        in said
    ), shorter.output


def test_arguments_that_are_not_utf8_are_bytes(trained):
    """A byte-level model takes a prompt and a stop string that are not UTF-8 byte for byte (they were
    a UnicodeEncodeError traceback: Python hands such arguments over as surrogates)."""
    run, _ = trained
    command = [sys.executable, "-m", "htcli", "sample", str(run), "--device", "cpu", "--json"]
    command = [os.fsencode(part) for part in command]
    command += [b"--prompt", b"ab\xff", b"--stop", b"\xfe\xff", b"--max-new-tokens", b"4"]
    result = subprocess.run(command, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["bytes"] <= 4


def start_interruptible(command: list, **popen) -> subprocess.Popen:
    """command as a real process that takes SIGINT as a terminal leaves it (a shell's background job, as
    a CI runner may be, starts ignoring it; a signal the parent handles starts at its default in the
    child)."""
    ours = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    finally:
        signal.signal(signal.SIGINT, ours)


def test_a_ctrl_c_while_python_exits_after_a_command_is_ignored():
    """A second Ctrl-C, pressed as the first one's save ended, broke into torch's atexit hooks: "Exception
    ignored in atexit callback ... KeyboardInterrupt" and its traceback. Here a Ctrl-C comes during the
    exit (from an atexit hook of its own) and ends the process quietly, with the command's exit code."""
    code = (
        "import atexit, os, signal, sys, time\n"
        "from htcli.__main__ import main\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.3)))\n"
        "sys.argv = ['htcli', 'plot', 'no-such-run']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: no-such-run"), done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_python_tears_down_its_modules_keeps_the_commands_code(signum):
    """A Ctrl-C or SIGTERM once Python tears down its modules (torch's take half a second), where Python has
    put the handlers back to the system's: it killed the process, exit 130 or 143 without a word, after a
    command that had finished (a review's `htcli train` that saved its last step). Here one comes from an
    object that module teardown deletes: ignored, the command's exit code kept."""
    code = (
        "import os, signal, sys, time\n"
        "from htcli.__main__ import main\n"
        "class Late:\n"
        f"    def __del__(self):\n        os.kill(os.getpid(), {int(signum)})\n"
        "        time.sleep(0.2)\n        os.write(2, b'gone\\n')\n"
        "late = Late()\n"
        "sys.argv = ['htcli', 'plot', 'no-such-run']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith("error: no-such-run"), (
        done.returncode,
        done.stderr,
    )
    assert done.stderr.endswith("gone\n"), done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_as_the_command_returns_keeps_its_code(signum):
    """A Ctrl-C or SIGTERM after a command's work, as typer returned (before main's end sets how they end
    the process): SIGTERM killed the process (-15), Ctrl-C raised a traceback (-2), after a run that had
    finished (review). They change nothing: the command's exit code and its one line."""
    code = (
        "import os, signal, sys, time\n"
        "import htcli.cli.common as common\n"
        "from htcli.__main__ import main\n"
        "command = common.app\n"
        "def app(*args, **kwargs):\n"
        "    try:\n"
        "        return command(*args, **kwargs)\n"
        "    finally:\n"
        f"        os.kill(os.getpid(), {int(signum)})\n"
        "        time.sleep(0.3)\n"
        "common.app = app\n"
        "sys.argv = ['htcli', 'bench', '--decode', '--preset', 'nosuch']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, (done.returncode, done.stderr)
    assert done.stderr.startswith("error: ") and "preset" in done.stderr


def test_a_ctrl_c_after_the_run_and_its_summary_keeps_its_code(corpus, tmp_path):
    """A Ctrl-C that came after train's summary, as its command returned, said "stopped without saving",
    exit 130 (3 of 90 aimed trials of a re-fuzz): once the run is over, stops keep its exit code."""
    code = (
        "import os, signal, sys, time\n"
        "import htcli.cli.train as command\n"
        "from htcli.__main__ import main\n"
        "reported = command._train_and_report\n"
        "def and_then_stopped(*args):\n"
        "    reported(*args)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.3)\n"
        "command._train_and_report = and_then_stopped\n"
        "sys.argv[1:] = ['train', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = [corpus, *TINY_FLAGS, "--steps", "2", "--out", tmp_path / "run"]
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "interrupted" not in done.stderr, (done.returncode, done.stderr)
    assert "2 of 2" in done.stdout


def test_ctrl_c_while_sampling_exits_130_with_one_line(trained):
    """A real SIGINT while a sample streams: exit 130, one line that no file was changed (it said, as
    train does, that a checkpoint saved before is intact); no traceback; the run is untouched. The second
    sample, decoded beside the first, is printed as far as it came (it was lost)."""
    run, _ = trained
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    command = [sys.executable, "-m", "htcli", "sample", str(run), "--prompt", "a", "--device", "cpu"]
    command += ["--max-new-tokens", "10000000", "--num-samples", "2", "--top-k", "1"]
    process = start_interruptible(command)
    # the prompt and two bytes of the first sample (and so of the second), read from the pipe itself:
    # process.stdout.read(3) kept what else had come in its buffer, which communicate() then left out
    begun = b""
    while len(begun) < 3 and (chunk := os.read(process.stdout.fileno(), 3 - len(begun))):
        begun += chunk
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    stdout = begun + stdout
    lines = stderr.decode().strip().splitlines()
    # 130, or an end by SIGINT itself, which a shell reports as 130 too (CPython ends so when it counts
    # the interrupt as unhandled; seen once in about 30 runs, its cause not pinned down)
    assert process.returncode in (130, -signal.SIGINT), stderr.decode()
    if process.returncode == 130:  # the streamed line ends (the error went on after the text in a terminal)
        assert stdout.endswith(b"\n"), stdout[-20:]
        half = len(stdout) // 2  # top-k 1: the second is the first again, one byte longer at most
        assert half > 2 and stdout[half:].startswith(stdout[: half - 1]), stdout
        assert "sample 2 of 2 (seed 1), interrupted" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert lines[-1] == "interrupted: stopped; no file was changed"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# `htcli ARGS...` whose import of MODULE takes a minute, so that a signal surely comes while it imports
SLOW_IMPORT = """
import importlib.abc, os, pathlib, sys, time
marker, module, args = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == module:
            marker.touch()
            time.sleep(float(os.environ.get("SLOW_IMPORT_SECONDS", 60)))
sys.meta_path.insert(0, Slow())
sys.argv[1:] = args
from htcli.__main__ import main
main()
"""
BEFORE_ANY_COMMAND = "stopped before starting; nothing was written"
INSIDE_A_COMMAND = "stopped; no file was changed"
INSIDE_TRAIN = "stopped without saving; any checkpoint saved before is intact"


@pytest.mark.parametrize(
    "module,args,said",
    [
        ("typer", ["--version"], BEFORE_ANY_COMMAND),
        ("torch", ["eval", "run", "a.txt"], INSIDE_A_COMMAND),
        ("torch", ["train", "a.txt", "--out", "run"], INSIDE_TRAIN),
        ("numpy", ["eval", "run", "a.txt"], INSIDE_A_COMMAND),
        ("numpy", ["sample", "run", "--json", "--num-samples", "2"], INSIDE_A_COMMAND),
        ("numpy", ["bench", "--decode", "--json", "--device", "cpu"], INSIDE_A_COMMAND),
    ],
)
@pytest.mark.parametrize(
    "signum,code,what", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")]
)
def test_a_signal_while_the_command_line_starts_ends_with_one_line(
    tmp_path, module, args, said, signum, code, what
):
    """Ctrl-C or SIGTERM in a process's first second, while it imports the command line (before any
    command runs) or torch (in a command: taken once torch is in, here after 2 s): one line, exit 130 or 143,
    no traceback (Python's own Ctrl-C would print one; SIGTERM would end it without a word). numpy: torch's
    C initialisation imports it and swallows what that raises, so a Ctrl-C there was lost (the command ran on,
    to its error about the run) or left numpy half made, and a SIGTERM raised through its C++ aborted the
    process (review): held until torch is in, they are taken then (sample and bench --decode with --json:
    their JSON printed)."""
    marker = tmp_path / "importing"
    env = {name: value for name, value in os.environ.items() if name not in ("FORCE_COLOR", "PYTHONWARNINGS")}
    env["SLOW_IMPORT_SECONDS"] = "2"
    command = [sys.executable, "-c", SLOW_IMPORT, str(marker), module, *args]
    process = start_interruptible(command, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert stderr == f"{what}: {said}\n"
    if "--json" in args:  # (sample's lines, every sample's, empty; the decode bench's object: interrupted)
        expected = [True, True] if args[0] == "sample" else [True]
        assert [json.loads(line)["interrupted"] for line in stdout.splitlines()] == expected


def test_a_second_ctrl_c_quits_an_import_that_hangs(tmp_path):
    """Stops are held while a command imports torch (above): one that hangs (a filesystem that does not
    answer) could not be stopped but by SIGKILL (review). A second Ctrl-C quits at once, with one line."""
    marker = tmp_path / "importing"
    env = {name: value for name, value in os.environ.items() if name not in ("FORCE_COLOR", "PYTHONWARNINGS")}
    command = [sys.executable, "-c", SLOW_IMPORT, str(marker), "numpy", "eval", "run", "a.txt"]  # (60 s)
    process = start_interruptible(command, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert process.poll() is None  # (the first is held)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert (process.returncode, stderr) == (
        130,
        "interrupted: stopped while importing torch; nothing was written\n",
    )


def test_the_htcli_command_starts_where_signals_are_answered():
    """The `htcli` script runs htcli.__main__.main, which answers signals before importing anything."""
    from pathlib import Path

    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()  # (no tomllib before 3.11)
    assert '\n[project.scripts]\nhtcli = "htcli.__main__:main"\n' in pyproject


# ---------------------------------------------------------------------------
# bad input: one line saying what to do, non-zero exit, no traceback, nothing overwritten
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_corpus,message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: file_with(p / "empty.txt", b""), "is empty (0 bytes)"),
        (
            lambda p: file_with(p / "short.txt", b"x" * 100),
            "100 bytes, shorter than a training window plus a "
            "validation window: with --seq-len 64 it must be at least 130 bytes",
        ),
        (
            lambda p: file_with(p / "one.txt", b"x"),
            "the corpus is 1 byte, shorter than a training window",  # (was "1 bytes")
        ),
        (lambda p: (p / "dir").mkdir() or p / "dir", "has no files"),
        (lambda p: p / "*.nothing", "no files match"),
        (lambda p: (p / "loop").symlink_to(p / "loop") or p / "loop", "is a link that leads to no file"),
        (lambda p: (p / "dangling").symlink_to(p / "gone") or p / "dangling", "(its target is missing, or"),
    ],
)
def test_bad_corpus(run_copy, tmp_path, make_corpus, message):
    """Missing, empty, too short, empty directory, unmatched glob: a clear error, the run untouched."""
    run, _ = run_copy
    before = snapshot(run)
    result = invoke("train", make_corpus(tmp_path), "--out", run, "--resume", "--steps", 10)
    assert_user_error(result, message)
    assert snapshot(run) == before


def test_unreadable_corpus(run_copy, tmp_path, monkeypatch):
    """A corpus file that cannot be opened names the file and the reason."""
    run, _ = run_copy
    locked = tmp_path / "locked.txt"
    locked.write_bytes(make_text(5000))

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reader, "open", refuse, raising=False)
    before = snapshot(run)
    result = invoke("train", locked, "--out", run, "--resume", "--steps", 10)
    assert_user_error(result, f"cannot read {locked}: Permission denied: give a path you may read, or change")
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--block-size", "12"], "--seq-len (64) must be a multiple of --block-size (12)"),
        (["--dim", "48"], "the model differs from its checkpoint (--dim 32 in the checkpoint, 48 asked)"),
        # (a switch was "True in the checkpoint, False asked")
        (
            ["--no-shift-tokens"],
            "differs from its checkpoint (--shift-tokens on in the checkpoint, off asked)",
        ),
        # (was "--level-decay is H-attention's: with --attention exact set it to 0", never given)
        (["--attention", "exact"], "checkpoint (--attention h in the checkpoint, exact asked); drop those"),
        (["--preset", "huge"], "unknown --preset 'huge'"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "1e40"], "--lr must be a positive number up to 1000, got 1e+40"),  # (was a traceback)
        (["--val-fraction", "0"], "--val-fraction must be above 0 and below 1, got 0.0"),
        (["--dtype", "fp8"], "unknown --dtype 'fp8'"),
        # (one GPU of several: "unknown --device 'cuda:1': use one of auto, cpu, cuda, mps"; review)
        (
            ["--device", "cuda:1"],
            "'cuda:1': give --device cuda, and choose the GPU with CUDA_VISIBLE_DEVICES=1",
        ),
        (["--steps", "6"], "already at step 6 of --steps 6"),
        # (config.json took the new seed, which changed nothing else: a rerun from it would not reproduce)
        (["--seed", "5"], "a resumed run goes on with the random state of its checkpoint (--seed 0 at its"),
        # (was taken, saying only "not exactly": part of what it trained on was then scored as held out)
        (["--val-fraction", "0.2"], "a resumed run keeps its held-out split (--val-fraction 0.01)"),
    ],
)
def test_impossible_options(run_copy, flags, message):
    """Impossible or conflicting options: a clear error, the run untouched."""
    run, corpus = run_copy
    before = snapshot(run)
    result = invoke("train", corpus, "--out", run, "--resume", "--steps", 10, *flags)
    assert_user_error(result, message)
    assert snapshot(run) == before


def test_resume_auto_of_a_finished_run_is_done(run_copy):
    """A job requeued after its run finished (killed after the last save): --resume auto says the run is
    finished and exits 0 (it was the error, exit 1: a scheduler took the job for failed), the run untouched;
    --print-config says so and prints; plain --resume, and fewer --steps, stay errors (review)."""
    run, corpus = run_copy
    before = snapshot(run)
    done = invoke("train", corpus, "--out", run, "--resume", "auto", "--steps", 6)
    assert done.exit_code == 0, done.output
    said = f"{run} is already at step 6 of --steps 6: finished, nothing to train (a larger --steps trains on)"
    assert said in " ".join(done.stderr.split()) and "error" not in done.stderr
    printed = invoke("train", corpus, "--out", run, "--resume", "auto", "--steps", 6, "--print-config")
    assert printed.exit_code == 0 and "steps = 6" in printed.stdout and said in printed.stderr
    assert_user_error(
        invoke("train", corpus, "--out", run, "--resume", "--steps", 6), "pass a larger --steps"
    )
    fewer = invoke("train", corpus, "--out", run, "--resume", "auto", "--steps", 5)
    assert_user_error(fewer, "already at step 6 of --steps 5: pass a larger --steps")
    assert snapshot(run) == before


def test_a_config_json_edited_by_hand_is_named_on_resume(run_copy):
    """A run's config.json whose model no longer matches its checkpoint (edited, or copied from another
    run): the resume blamed an option never given ("--dim 32 in the checkpoint, 48 asked; drop those
    options"); it names the file and what to set there. A --print-config of the resume says the same."""
    run, corpus = run_copy
    saved = json.loads((run / "config.json").read_text())
    saved["model"]["dim"] = 48
    (run / "config.json").write_text(json.dumps(saved))
    before = snapshot(run)
    said = (
        f"cannot resume {run}: its config.json (edited, or another run's?) does not describe its "
        f"checkpoint's model (dim 48 there, 32 in the checkpoint): set dim to 32 in {run / 'config.json'}"
    )
    for extra in ([], ["--print-config"]):
        assert_user_error(invoke("train", "--out", run, "--resume", "--steps", 10, *extra), said)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--context-warmup", "0.5", "--context-warmup-start", "0"], "warmup-start must be a positive"),
        (["--context-warmup", "0.5", "--context-warmup-start", "24"], "(24) must divide the context"),
        (["--context-warmup", "0.5"], "--context-warmup-start (256) must be shorter than the context length"),
        (["--context-warmup", "0.5", "--context-warmup-start", "64"], "(64) must be shorter than the"),
        (
            ["--val", "VAL", "--val-fraction", "0.5"],
            "--val and --val-fraction both choose the held-out bytes: give one of them",
        ),
        (["--config", "VALFILE", "--val-fraction", "0.5"], "--val-fraction holds out the corpus's end, and"),
        (["--text-field", "body"], "--text-field concerns the records of JSONL and Parquet files, and the"),
        (["--skip-bad-records", "--val", "VAL"], "--skip-bad-records concerns the records of JSONL and"),
        (["--text-field", "body", "--skip-bad-records"], "leave them out (or set --text-field to text and"),
        (
            ["--context-warmup-start", "16"],
            "--context-warmup-start is the window length of the context warm-up,",
        ),
        (
            ["--dim-head", "5"],
            "the rotary-position embedding needs an even --dim-head of at least 4, got 5",
        ),  # (said --rotary)
        (["--clip", "-1"], "--clip must be >= 0, got -1.0"),  # (named --weight-decay too)
        (["--include-hidden"], "--include-hidden reads the hidden files of directories and glob patterns"),
        (["--include-hidden", "--val", "VAL"], "and the corpus names files alone: leave it out"),
    ],
)
def test_impossible_new_runs(corpus, tmp_path, flags, message):
    """A window length the context warm-up cannot cut windows into, options that would be ignored without a
    word (a held-out fraction beside held-out files; record options for a corpus of plain text): one line
    that says what to do."""
    val = tmp_path / "val.txt"
    val.write_bytes(corpus.read_bytes()[:2000])
    (tmp_path / "val.toml").write_text(f"val = [{str(val)!r}]\n")  # (its fraction was ignored)
    flags = [{"VAL": val, "VALFILE": tmp_path / "val.toml"}.get(flag, flag) for flag in flags]
    result = invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", tmp_path / "run", *flags)
    assert_user_error(result, message)
    if {"--include-hidden", "--text-field", "--skip-bad-records"} & set(flags):  # (it printed them)
        printed = invoke("train", corpus, *TINY_FLAGS, "--out", tmp_path / "run", *flags, "--print-config")
        assert_user_error(printed, message)


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]])
def test_printed_config_of_a_new_run_refuses_include_hidden_from_its_file(corpus, tmp_path, resume):
    """--print-config of what would be a new run (--resume auto where no checkpoint is: it was skipped)
    refuses a config file's include_hidden that the run would refuse for a corpus of named files."""
    config_file = tmp_path / "hidden.toml"
    config_file.write_text("include_hidden = true\n")
    flags = ["--config", config_file, "--out", tmp_path / "run", "--print-config", *resume]
    result = invoke("train", corpus, *TINY_FLAGS, *flags)
    assert_user_error(result, "include-hidden reads the hidden files of directories and glob patterns")


def test_a_resume_refuses_corpus_options_it_would_ignore(run_copy):
    """--text-field, --skip-bad-records or --include-hidden given to a resume of a plain-text run named
    alone: taken without a word (config.json recorded them, without effect), where a new run refuses them;
    the run is left as it was."""
    run, _ = run_copy
    before = snapshot(run)
    for flags, message in (
        (["--text-field", "body"], "--text-field concerns the records of JSONL and Parquet files, and the"),
        (["--skip-bad-records"], "--skip-bad-records concerns the records of JSONL and Parquet files"),
        (["--include-hidden"], "--include-hidden reads the hidden files of directories and glob patterns"),
    ):
        assert_user_error(invoke("train", "--out", run, "--resume", "--steps", 10, *flags), message)
    assert snapshot(run) == before
    resumed = invoke("train", "--out", run, "--resume", "--steps", 10, "--no-skip-bad-records")
    assert resumed.exit_code == 0, resumed.output  # (the default: nothing to ignore)


def test_out_of_memory_is_an_error_not_a_traceback(corpus, tmp_path):
    """A batch no memory holds fails at its first step (after the progress lines) with an error line
    that says what to do, exit code 1, no traceback."""
    flags = ["--steps", "2", "--batch-size", "1000000000000000", "--out", tmp_path / "run"]
    result = invoke("train", corpus, *TINY_FLAGS, *flags)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "error: out of memory: use a smaller --batch-size" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.output


def test_new_run_into_a_checkpoint_is_refused(run_copy):
    """Training without --resume into a directory with a checkpoint refuses to overwrite it."""
    run, corpus = run_copy
    before = snapshot(run)
    assert_user_error(invoke("train", corpus, "--out", run, *TINY_FLAGS), "already holds a checkpoint")
    assert snapshot(run) == before


@pytest.mark.parametrize("resume", [[], ["--resume"], ["--resume", "auto"]])
def test_a_run_directory_that_is_a_file(tmp_path, corpus, resume):
    """--out naming a file (or a path under one): one line saying so, new run or resumed (--resume said
    the file's config.json was not readable JSON)."""
    file = tmp_path / "notes.txt"
    file.write_bytes(b"mine")
    for out, where in ((file, "is a file"), (file / "run", f"is under {file}, a file")):
        assert_user_error(invoke("train", corpus, "--out", out, *resume), f"(--out) {out} {where}: give a")
    assert file.read_bytes() == b"mine"


def test_a_run_directory_that_is_a_broken_link(tmp_path, corpus):
    """--out naming a symbolic link to nothing (or a path under one) said "File exists"."""
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone")
    for out, where in ((link, "is a link"), (link / "run", f"is under {link}, a link")):
        message = f"(--out) {out} {where} to {tmp_path / 'gone'}, which does not exist: make that directory"
        assert_user_error(invoke("train", corpus, "--out", out, *TINY_FLAGS), message)
    assert not (tmp_path / "gone").exists()
    relative, loop = tmp_path / "relative", tmp_path / "loop"
    relative.symlink_to("gone/run")  # (its target is read from the link's folder, not the current one)
    loop.symlink_to(loop)
    for out, message in (
        (relative, f"a link to {tmp_path}/gone/run, which"),
        (loop, "a link in a loop of links"),
    ):
        assert_user_error(invoke("train", corpus, "--out", out, *TINY_FLAGS), f"(--out) {out} is {message}")


@pytest.mark.parametrize(
    "files,named",
    [
        ({"config.json": b'{"theme": "dark"}'}, "config.json"),
        ({"log.jsonl": b"12:00 started\n", "notes.txt": b"mine"}, "log.jsonl"),
        (
            {"src/a.py": b"", "docs/b.md": b"", "tests/c.py": b"", "data/d": b"", ".git/HEAD": b""},
            "data, docs, src and 1 more",
        ),
    ],
)
def test_a_new_run_into_a_directory_of_other_files_is_refused(corpus, tmp_path, files, named):
    """A new run into an existing directory whose config.json or log.jsonl is someone else's, or that holds
    folders (a project, `--out /`): refused, nothing written there (it replaced the config.json, appended
    to the log and wrote its checkpoint beside them). An empty directory, one with other files (a `tee
    run/train.log`), and a run's that never saved, are taken."""
    out = tmp_path / "project"
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    said = f"{out} holds what is not an htcli run's ({named}), which a new run would overwrite or mix with"
    assert_user_error(invoke("train", corpus, "--out", out, *TINY_FLAGS, "--steps", 1), said)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.log").write_bytes(b"tee's")
    assert invoke("train", corpus, "--out", tmp_path / "empty", *TINY_FLAGS, "--steps", 1).exit_code == 0
    never_saved = tmp_path / "empty"
    for name in ("model.safetensors", "optimizer.safetensors", "state.json", "best.safetensors"):
        (never_saved / name).unlink()
    assert invoke("train", corpus, "--out", never_saved, *TINY_FLAGS, "--steps", 1).exit_code == 0


def test_a_resume_whose_corpus_was_moved_says_to_give_it_again(corpus, tmp_path):
    """The run's corpus moved since it saved: the resume said only "corpus X does not exist: give a file, a
    directory or a glob pattern"; it says where the path came from and that giving it again resumes."""
    out = tmp_path / "run"
    assert invoke("train", corpus, "--out", out, *TINY_FLAGS, "--steps", 1).exit_code == 0
    moved = corpus.rename(tmp_path / "moved.txt")
    said = (
        f"the run's corpus {corpus} (from {out / 'config.json'}) is not there any more: if it was moved, "
        "give the corpus again where it is now, and the resume reads it there"
    )
    assert_user_error(invoke("train", "--out", out, "--resume", "--steps", 2), said)
    assert invoke("train", moved, "--out", out, "--resume", "--steps", 2).exit_code == 0


def test_a_lock_file_that_is_a_link_is_refused(corpus, tmp_path):
    """A run directory whose .lock is a link (dangling: the run made the link's target, outside the run
    directory, and locked that): refused, nothing made."""
    out, target = tmp_path / "run", tmp_path / "elsewhere" / "made"
    out.mkdir()
    (out / ".lock").symlink_to(target)
    result = invoke("train", corpus, "--out", out, *TINY_FLAGS, "--steps", 1)
    assert_user_error(result, f"{out / '.lock'} (the run's lock) is a link: remove it (htcli makes its own)")
    assert not target.parent.exists() and os.listdir(out) == [".lock"]


def test_a_lock_file_that_is_a_directory_is_refused(corpus, tmp_path):
    """A run directory whose .lock is a directory: what to do, not the bare "Is a directory"."""
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    result = invoke("train", corpus, "--out", tmp_path / "run", *TINY_FLAGS, "--steps", 1)
    lock = tmp_path / "run" / ".lock"
    assert_user_error(
        result, f"{lock} (the run's lock) is a directory: remove it (htcli makes its lock a file)"
    )
    assert os.listdir(tmp_path / "run") == [".lock"]


def test_a_cache_of_corpus_bytes_inside_the_run_directory_is_taken(corpus, tmp_path, monkeypatch):
    """HTCLI_CACHE_DIR inside a new run's --out: the cache was made there first, then the run refused the
    directory for holding it ("holds what is not an htcli run's (cache)"), and left it behind."""
    out = tmp_path / "run"
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(out / "cache"))
    compressed = tmp_path / "corpus.txt.gz"
    compressed.write_bytes(gzip.compress(corpus.read_bytes()))
    result = invoke("train", compressed, "--out", out, *TINY_FLAGS, "--steps", 1)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and (out / "cache" / "CACHEDIR.TAG").exists()


@pytest.mark.parametrize("lost", ["optimizer.safetensors", "state.json", "model.safetensors"])
def test_an_incomplete_checkpoint_is_named_as_such(run_copy, lost):
    """A run directory that lost one of its checkpoint's files: a new run and --resume both say so (the
    resume said "no checkpoint ... start a new run", the new run "already holds a checkpoint")."""
    run, corpus = run_copy
    (run / lost).unlink()
    before = snapshot(run)
    said = f"{run} holds an incomplete checkpoint ({lost} missing): it cannot be resumed; start the run in"
    for resume in ([], ["--resume"], ["--resume", "auto"]):
        assert_user_error(invoke("train", corpus, "--out", run, *TINY_FLAGS, *resume), said)
    assert snapshot(run) == before


def test_a_first_save_cut_short_while_writing_is_no_checkpoint(run_copy):
    """A run killed while writing its first save (a hidden pending weights file, no pending state.json):
    no checkpoint, as --resume finds after dropping those files; a new run starts there (it was told the
    directory held an incomplete checkpoint)."""
    run, corpus = run_copy
    (run / "model.safetensors").rename(run / ".model.safetensors.pending")
    for name in ("optimizer.safetensors", "state.json", "best.safetensors"):  # (a first save commits it)
        (run / name).unlink(missing_ok=True)
    assert_user_error(
        invoke("train", "--out", run, "--resume", "--steps", 8), f"no checkpoint at {run}: start"
    )
    assert not (run / ".model.safetensors.pending").exists()
    (run / ".model.safetensors.pending").write_bytes(b"half")
    started = invoke("train", corpus, "--out", run, *TINY_FLAGS, "--steps", 2, "--device", "cpu")
    assert started.exit_code == 0, started.output
    assert (run / "state.json").exists() and not (run / ".model.safetensors.pending").exists()


def test_print_config_of_a_resume_after_a_save_cut_short_between_its_renames(run_copy):
    """A save that wrote all its pending files and was cut short before renaming them: --print-config
    --resume prints (the resume finishes the save first; it said "no checkpoint") and changes nothing,
    and still refuses another model."""
    run, _ = run_copy
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        (run / name).rename(run / f".{name}.pending")
    before = snapshot(run)
    printed = invoke("train", "--out", run, "--resume", "--steps", 8, "--print-config")
    assert printed.exit_code == 0, printed.output
    assert "steps = 8" in printed.stdout and snapshot(run) == before
    refused = invoke("train", "--out", run, "--resume", "--steps", 8, "--dim", 48, "--print-config")
    assert_user_error(refused, "the model differs from its checkpoint (--dim 32 in the checkpoint, 48 asked)")


def test_sample_and_eval_read_a_first_save_cut_short_between_its_renames(run_copy):
    """A run killed after its first save wrote all its pending files and before it renamed them (no weights
    in place): sample and eval read the pending weights, whole (the resume finishes that save), and change
    nothing; they said the checkpoint's weights were deleted."""
    run, _ = run_copy
    corpus = file_with(run.parent / "held_out.txt", make_text(500, seed=9))
    expected = invoke("eval", run, corpus, "--stride", 32, "--json", "--device", "cpu")
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        (run / name).rename(run / f".{name}.pending")
    before = snapshot(run)
    evaluated = invoke("eval", run, corpus, "--stride", 32, "--json", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["bits_per_byte"] == json.loads(expected.stdout)["bits_per_byte"]
    assert json.loads(evaluated.stdout)["checkpoint"] == str(
        run / "model.safetensors"
    )  # (not the pending one)
    sampled = invoke("sample", run, "--max-new-tokens", 4, "--device", "cpu")
    assert sampled.exit_code == 0, sampled.output
    assert snapshot(run) == before


@pytest.mark.parametrize("when", ["check_not_special", "_load_tensors"])
def test_a_model_read_while_its_save_is_renamed_into_place(run_copy, monkeypatch, when):
    """The pending weights a reader found are renamed into place by the run before the reader reads their
    metadata, or their tensors: it reads the checkpoint again where it is now (it said the file was corrupt,
    or named the pending file's step with the tensors of a later save)."""
    run, _ = run_copy
    expected = load_model(run)[0].state_dict()
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        (run / name).rename(run / f".{name}.pending")
    read = getattr(checkpoint, when)

    def renamed_first(*args):
        monkeypatch.setattr(checkpoint, when, read)
        checkpoint.commit_pending(run)  # (what the run's save does next)
        return read(*args)

    monkeypatch.setattr(checkpoint, when, renamed_first)
    model, info = checkpoint.load_model(run)
    assert info.path == run / "model.safetensors" and not (run / ".model.safetensors.pending").exists()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_a_lost_config_json_says_how_to_resume(run_copy):
    """A checkpoint without its config.json: --resume says to give the options again with --resume auto,
    and that resumes it."""
    run, corpus = run_copy
    (run / "config.json").unlink()
    refused = invoke("train", "--out", run, "--resume", "--steps", 8)
    assert_user_error(refused, f"cannot continue {run}: its config.json (the run's options) is missing")
    assert "with --resume auto" in refused.stderr
    flags = [*TINY_FLAGS, "--seq-len", 64, "--batch-size", 2, "--steps", 8, "--device", "cpu"]
    resumed = invoke("train", corpus, "--out", run, "--resume", "auto", *flags)
    assert resumed.exit_code == 0 and "resuming at step 6" in resumed.stderr, resumed.output
    assert (run / "config.json").exists()


def test_a_lost_config_json_resumed_without_the_preset_names_it(corpus, tmp_path):
    """A run of a preset whose config.json is lost, resumed with --resume auto and no model option: the
    default preset's sizes were refused with "drop those options", none given. The refusal names the
    checkpoint's preset (and its length), which then resumes it."""
    run = tmp_path / "run"
    flags = ["--seq-len", 64, "--batch-size", 2, "--warmup", 0, "--sample-every", 0, "--device", "cpu"]
    assert invoke("train", corpus, "--out", run, "--preset", "tiny", *flags, "--steps", 2).exit_code == 0
    (run / "config.json").unlink()
    refused = invoke("train", corpus, "--out", run, "--resume", "auto", *flags, "--steps", 4)
    assert_user_error(
        refused, "its checkpoint's sizes are --preset tiny's, the ones asked --preset small's ("
    )
    said = " ".join(refused.stderr.split())
    assert said.endswith("): give --preset tiny with --seq-len 64") and "drop those" not in said, said
    again = invoke(
        "train", corpus, "--out", run, "--resume", "auto", *flags, "--steps", 4, "--preset", "tiny"
    )
    assert again.exit_code == 0 and "resuming at step 2" in again.stderr, again.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["train", "sample", "eval"])
def test_cuda_without_gpu(run_copy, command):
    """--device cuda on a machine without a GPU says to use the CPU."""
    run, corpus = run_copy
    before = snapshot(run)
    args = {"train": ["train", corpus, "--out", run, "--resume", "--steps", 10], "sample": ["sample", run],
            "eval": ["eval", run, corpus]}[command]  # fmt: skip
    result = invoke(*args, "--device", "cuda")
    assert_user_error(result, "CUDA was requested but no GPU is available; use --device cpu")
    assert snapshot(run) == before


def _write_truncated(p):
    (p / "t.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    return p / "t.safetensors"


def _write_foreign(p):
    save_file({"w": torch.zeros(2)}, str(p / "f.safetensors"))
    return p / "f.safetensors"


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize(
    "make_checkpoint,message",
    [
        (lambda p: p / "nowhere", "nowhere does not exist: give a run directory (htcli train's out) or a"),
        (lambda p: p, "no checkpoint at"),
        (_write_truncated, "is not a readable safetensors file (truncated or corrupt?)"),
        (lambda p: file_with(p / "x.safetensors", b"hello"), "not a readable safetensors"),
        (_write_foreign, "is not an htcli checkpoint"),
        # (a corpus given as the checkpoint, or eval's two arguments swapped: it said "truncated or corrupt?")
        (
            lambda p: file_with(p / "my.txt", b"First Citizen:\nBefore we proceed"),
            "my.txt is not a checkpoint (not a safetensors file): give a run directory",
        ),
    ],
)
def test_bad_checkpoint(trained, tmp_path, command, make_checkpoint, message):
    """Missing, truncated, non-safetensors or foreign checkpoints: a clear error for sample and eval."""
    _, corpus = trained
    checkpoint = make_checkpoint(tmp_path)
    args = ["sample", checkpoint] if command == "sample" else ["eval", checkpoint, corpus]
    assert_user_error(invoke(*args, "--device", "cpu"), message)


def test_truncated_real_checkpoint(trained, tmp_path):
    """A real checkpoint cut in half is reported as truncated."""
    run, _ = trained
    whole = (run / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    assert_user_error(invoke("sample", tmp_path, "--device", "cpu"), "truncated or corrupt?")


def test_a_run_that_lost_its_weights_says_so(run_copy):
    """A run directory whose model.safetensors is gone (its optimizer and state there): it said "no
    checkpoint at RUN: train one", for sample and eval alike."""
    run, corpus = run_copy
    (run / "model.safetensors").unlink()
    for args in (["sample", run], ["eval", run, corpus]):
        result = invoke(*args, "--device", "cpu")
        assert_user_error(result, f"{run} holds a checkpoint without its model.safetensors, which holds the")


def test_bad_sample_options(trained, tmp_path):
    """Conflicting or impossible sampling options are refused."""
    run, _ = trained
    assert_user_error(invoke("sample", run, "--prompt", "a", "--prompt-file", tmp_path), "not both")
    assert_user_error(invoke("sample", run, "--top-p", "2"), "--top-p must be above 0 and at most 1 (the")
    assert_user_error(invoke("sample", run, "--top-k", "257"), "--top-k must be a positive integer up to 256")
    greedy = invoke("sample", run, "--temperature", 0, "--top-k", 5, "--top-p", 0.5)  # (both were ignored)
    assert_user_error(
        greedy, "--temperature 0 always takes the most likely byte: --top-k and --top-p would be"
    )
    assert_user_error(invoke("sample", run, "--prompt-file", tmp_path / "no.txt"), "prompt file")
    same = invoke("sample", run, "--temperature", 0, "--num-samples", 3)  # (the same text 3 times)
    assert_user_error(same, "--temperature 0 always takes the most likely byte: --num-samples 3 would give")
    # (an explicit --echo was ignored with --json; --no-echo agrees with it)
    assert_user_error(invoke("sample", run, "--echo", "--json"), "--json prints each sample's continuation")
    quiet = invoke("sample", run, "--no-echo", "--json", "--max-new-tokens", 3, "--device", "cpu")
    assert quiet.exit_code == 0 and json.loads(quiet.stdout)["bytes"] == 3, quiet.output
    # an empty --prompt (it started from a newline, as no --prompt does), as an empty --prompt-file
    assert_user_error(invoke("sample", run, "--prompt", ""), "--prompt is empty: give at least one character")
    (tmp_path / "empty.txt").write_bytes(b"")
    empty = invoke("sample", run, "--prompt-file", tmp_path / "empty.txt")  # (the file named; review)
    assert_user_error(empty, f"prompt file {tmp_path / 'empty.txt'} is empty: generation needs at least one")
    # a stop string longer than the sample can be (it was taken, void, without a word)
    void = invoke("sample", run, "--max-new-tokens", 3, "--stop", "abcd", "--stop", "a", "--device", "cpu")
    said = "a --stop string of 4 bytes cannot occur in --max-new-tokens (3) bytes: raise --max-new-tokens, or"
    assert_user_error(void, said)
    for count in (0, 4097, 10**10):  # (ten billion was taken, and memory grew until the machine ran out)
        assert_user_error(invoke("sample", run, "--num-samples", count), "--num-samples must be 1 to 4,096")
    too_far = invoke("sample", run, "--seed", 2**63 - 1, "--num-samples", 2)
    assert_user_error(too_far, "--seed 9223372036854775807 with --num-samples 2 takes seeds past 2**63 - 1")
    # a --stop that is not UTF-8 (taken byte for byte) with --json: the record's stop field has U+FFFD
    lines = invoke("sample", run, "--max-new-tokens", 5, "--stop", "\udcff", "--json", "--device", "cpu")
    assert lines.exit_code == 0, lines.output
    assert [json.loads(line)["sample"] for line in lines.stdout.splitlines()] == [1]


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    """Run as a real program, a bad corpus prints one line to stderr and exits 1."""
    command = [
        sys.executable,
        "-m",
        "htcli",
        "train",
        str(tmp_path / "missing.txt"),
        "--out",
        str(tmp_path / "r"),
    ]
    process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "40"})
    assert process.returncode == 1
    expected = (
        f"error: corpus {tmp_path / 'missing.txt'} does not exist: give a file, a directory or a glob pattern"
    )
    assert process.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "r").exists()


EMPTY_PATH = "an empty path was given (an unset shell variable?): name a file or directory"


@pytest.mark.parametrize(
    "args,said,command",
    [
        (["train", "a.txt", "--steps", "abc"], "error: Invalid value for '--steps': ", "htcli train"),
        (["train", "a.txt", "--stepz", "3"], "error: No such option: --stepz", "htcli train"),
        (["sampel"], "error: No such command 'sampel'. Did you mean 'sample'?", "htcli"),
        (["sample"], "error: Missing argument 'checkpoint'.", "htcli sample"),
        (["sample", "run", "--stop"], "error: Option '--stop' requires an argument.", "htcli sample"),
        (  # (a prompt without --prompt: said how to give one; review)
            ["sample", "run", "ROMEO:"],
            "error: Got unexpected extra argument(s) (ROMEO:); a prompt is given with --prompt TEXT (or",
            "htcli sample",
        ),
        (["--stop"], "error: No such option: --stop", "htcli"),
        # an empty path ("$RUN" unset) was the current directory: "no checkpoint at ."
        (["sample", ""], f"error: Invalid value for 'checkpoint': {EMPTY_PATH}", "htcli sample"),
        (["eval", "", "a.txt"], f"error: Invalid value for 'checkpoint': {EMPTY_PATH}", "htcli eval"),
        (["plot", "r", ""], f"error: Invalid value for 'runs': {EMPTY_PATH}", "htcli plot"),
        (["sample", "r", "--prompt-file", ""], "error: Invalid value for '--prompt-file': ", "htcli sample"),
        (
            ["train", "a.txt", "--config", ""],
            f"error: Invalid value for '--config': {EMPTY_PATH}",
            "htcli train",
        ),
    ],
)
def test_usage_errors_are_one_line_naming_the_help(tmp_path, args, said, command):
    """click's own errors (a value of the wrong type, an unknown option or command, a missing argument),
    run as a real program: one line naming the command's --help, exit 2, nothing written; typer drew a box
    of four lines or more."""
    env = {**os.environ, "COLUMNS": "40"}
    process = subprocess.run(
        [sys.executable, "-m", "htcli", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert process.returncode == 2, process.stderr
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(said), process.stderr
    assert lines[0].endswith(f"(see {command} --help)") and process.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,codes", [([], (0, 2)), (["--help"], (0,)), (["eval", "--help"], (0,)), (["--version"], (0,))]
)
def test_help_and_version_as_a_real_program(args, codes):
    """`htcli` alone prints the help (exit 2 as typer does with click 8.2 or later, 0 before); --help and
    --version exit 0."""
    process = subprocess.run([sys.executable, "-m", "htcli", *args], capture_output=True, text=True)
    assert process.returncode in codes and process.stderr == "", process.stderr
    assert ("htcli 0." if args == ["--version"] else "Usage: htcli") in process.stdout


def test_an_eval_error_off_a_terminal_is_one_line(trained, tmp_path):
    """eval's progress bar, off a terminal, left an empty line on stderr before the error."""
    run, _ = trained
    (tmp_path / "one.txt").write_bytes(b"x")
    command = [sys.executable, "-m", "htcli", "eval", str(run), str(tmp_path / "one.txt"), "--device", "cpu"]
    process = subprocess.run(command, capture_output=True, text=True)
    assert process.returncode == 1
    assert process.stderr.splitlines() == [
        "error: the corpus is 1 byte long: it must be at least 2 bytes long to be scored"
    ]


def test_triton_attention_on_a_cpu_is_refused_before_any_work(trained, tmp_path):
    """HTCLI_ATTENTION=triton on a CPU failed at the first attention call: after train had written its
    config.json and log, after sample had printed the prompt. Now before anything."""
    run, corpus = trained
    env = {**os.environ, "HTCLI_ATTENTION": "triton"}
    env.pop("TRITON_INTERPRET", None)
    said = (
        "error: HTCLI_ATTENTION=triton needs a CUDA GPU, not cpu: use --device cuda, or HTCLI_ATTENTION=auto"
    )
    for args in (
        ["sample", run, "--prompt", "the"],
        ["train", corpus, "--out", tmp_path / "new", *TINY_FLAGS],
    ):
        command = [sys.executable, "-m", "htcli", *map(str, args), "--device", "cpu"]
        process = subprocess.run(command, capture_output=True, text=True, env=env)
        assert process.returncode == 1 and process.stderr.splitlines() == [said], process.stderr
        assert process.stdout == ""
    assert not (tmp_path / "new").exists()


def test_library_fields_are_respelled_as_flags():
    """The CLI writes the config fields an error names as the flags that set them, and nothing else."""
    from htcli.cli import respell

    message = "min_lr must be between 0 and lr (0.1), got 1.0"
    assert respell(message, ["min_lr", "lr"]) == "--min-lr must be between 0 and --lr (0.1), got 1.0"
    message = (
        "the validation corpus (val) is short: with max_seq_len 64 add data, pass val or lower max_seq_len"
    )
    assert respell(message, ["max_seq_len", "val"]) == (
        "the validation corpus (--val) is short: with --seq-len 64 add data, pass --val or lower --seq-len"
    )
    assert respell("steps must be a positive integer", []) == "steps must be a positive integer"
    # the words of a path are not fields (runs/out became runs/--out)
    message = "runs/out holds an incomplete checkpoint: choose another out, or resume runs/resume/out.d."
    assert respell(message, ["out", "resume"]) == (
        "runs/out holds an incomplete checkpoint: choose another --out, or --resume runs/resume/out.d."
    )


def test_min_lr_error_names_both_flags(run_copy):
    """A field error from the training config reaches the user in flags."""
    run, corpus = run_copy
    result = invoke("train", corpus, "--out", run, "--resume", "--steps", 10, "--min-lr", "1")
    assert_user_error(result, "--min-lr must be between 0 and --lr (0.006), got 1.0")


def test_a_curves_label_names_the_checkpoint(trained, tmp_path):
    """eval --plot's legend: the run's name for its directory or its weights, a loose file's own name (it
    was the name of the folder the file lay in)."""
    from htcli.cli import curve_label

    run, _ = trained
    loose = shutil.copy(run / "model.safetensors", tmp_path / "step6.safetensors")
    assert [curve_label(path) for path in (run, run / "model.safetensors", loose)] == ["run", "run", "step6"]
    assert curve_label(Path(".")) == Path.cwd().name


def test_eval_by_position(trained, tmp_path):
    """eval --by-position: buckets in the table and in --json (their bytes add up), a PNG with --plot."""
    run, _ = trained
    held_out = tmp_path / "held_out.txt"
    held_out.write_bytes(make_text(3000, seed=9))
    result = invoke(
        "eval", run, held_out, "--by-position", "--json", "--plot", tmp_path / "p.png", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stride"] == 64 and [b["first"] for b in report["by_position"]] == [0]
    assert sum(b["bytes"] for b in report["by_position"]) == report["bytes_scored"] == 2999
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = invoke("eval", run, held_out, "--by-position", "--device", "cpu")
    assert "by position" in table.stdout and "0-63" in table.stdout
    assert_user_error(invoke("eval", run, held_out, "--plot", tmp_path / "q.png"), "add --by-position")
    result = invoke("eval", run, tmp_path / "missing.txt", "--by-position", "--stride", 32, "--device", "cpu")
    assert_user_error(result, "--by-position scores every position of each window, and --stride 32 scores")
    assert "leave --stride out" in result.stderr
    # options are checked before the corpus is opened (a long compressed one takes minutes), in one line
    for option, value in (("--stride", 0), ("--stride", 10**6), ("--batch-size", 0), ("--batch-size", 2**63)):
        result = invoke("eval", run, tmp_path / "missing.txt", option, value, "--device", "cpu")
        assert_user_error(result, option)
        assert result.stderr.startswith("error:"), result.stderr  # (no blank line first)
    # a path matplotlib cannot write is refused before the evaluation, not after it
    for path, message in [
        (tmp_path, f"--plot {tmp_path} is a directory: give a file name"),
        (tmp_path / "no" / "p.png", f"the directory {tmp_path / 'no'} does not exist"),
        (tmp_path / "p.xyz", "give a file name ending in .png, .pdf or .svg"),
        (tmp_path / "p", "give a file name ending in .png"),
        ("", "--plot names no file: give a file name, e.g. plot.png"),  # (said "--plot . is a directory")
        # (these three were found only after the evaluation, or named no option)
        (held_out / "p.png", f"--plot {held_out / 'p.png'}: {held_out} is a file, not a directory"),
        ("/proc/p.png", "--plot /proc/p.png: cannot write in the directory /proc"),
        (tmp_path / ("a" * 250 + ".png"), "--plot: the file name is longer than 242 bytes"),
    ]:
        assert_user_error(invoke("eval", run, held_out, "--by-position", "--plot", path), message)
    assert_user_error(
        invoke("bench", "--seq-len", "64", "--plot", tmp_path / "b.xyz", "--device", "cpu"), "ending in .png"
    )
    assert not (tmp_path / "no").exists() and not (tmp_path / "p.xyz").exists()


def test_exact_attention_run(corpus, tmp_path):
    """--attention exact trains the same model with softmax attention; sample and eval use it."""
    out = tmp_path / "exact"
    result = invoke("train", corpus, "--out", out, "--attention", "exact", "--steps", 2, *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model"]["attention"] == "exact"
    sampled = invoke("sample", out, "--max-new-tokens", 5, "--device", "cpu")
    assert sampled.exit_code == 0 and "5 bytes in" in sampled.stderr
    evaluated = invoke("eval", out, corpus, "--json", "--device", "cpu")
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["bits_per_byte"] > 0
    assert_user_error(invoke("train", corpus, "--out", tmp_path / "x", "--attention", "full", *TINY_FLAGS),
                      "--attention must be one of")  # fmt: skip


def test_an_exact_model_takes_a_context_that_is_no_multiple_of_the_block_size(corpus, tmp_path):
    """Exact attention has no blocks: --seq-len 60 with block size 8 trains (it was refused, the block size
    asked to divide it), samples (its KV cache equals recomputation: test_sample), and is scored at any
    --context; an H-model still needs the multiple."""
    out = tmp_path / "exact"
    flags = [*TINY_FLAGS, "--seq-len", 60]
    result = invoke("train", corpus, "--out", out, "--attention", "exact", "--steps", 2, *flags)
    assert result.exit_code == 0, result.output
    sampled = invoke("sample", out, "--max-new-tokens", 80, "--device", "cpu")  # (past its context)
    assert sampled.exit_code == 0 and "80 bytes in" in sampled.stderr, sampled.output
    for context in ([], ["--context", 90]):
        evaluated = invoke("eval", out, corpus, "--json", "--device", "cpu", *context)
        assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["context"] == (context or [0, 60])[1]
    refused = invoke("train", corpus, "--out", tmp_path / "h", "--steps", 2, *flags)
    assert_user_error(refused, "--seq-len (60) must be a multiple of --block-size (8)")


def test_eval_with_another_context(trained, tmp_path):
    """eval --context scores windows longer (or shorter) than the model trained on; a context that is
    not a multiple of the block size is refused in the flag's name."""
    run, _ = trained
    held_out = tmp_path / "held_out.txt"
    held_out.write_bytes(make_text(3000, seed=9))
    result = invoke("eval", run, held_out, "--context", 256, "--by-position", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["context"] == 256 and [b["first"] for b in report["by_position"]] == [0, 64, 128]
    assert sum(b["bytes"] for b in report["by_position"]) == report["bytes_scored"] == 2999
    short = json.loads(invoke("eval", run, held_out, "--context", 32, "--json", "--device", "cpu").stdout)
    assert short["context"] == 32 and short["stride"] == 16
    assert_user_error(invoke("eval", run, held_out, "--context", 36), "--context must be a positive multiple")
    # (said "a multiple of the block size" first, and then, given one, that it was too long)
    assert_user_error(
        invoke("eval", run, held_out, "--context", 10**11),
        "--context must be a positive number of bytes up to",
    )
    # a corpus shorter than the context is one window: the stride reported is its length (was half the
    # context)
    long = json.loads(invoke("eval", run, held_out, "--context", 4096, "--json", "--device", "cpu").stdout)
    assert long["context"] == long["stride"] == 2999
    stride = invoke("eval", run, held_out, "--context", 32, "--stride", 40)  # (named "the model's context")
    assert_user_error(stride, "--stride must be between 1 and the context (32), got 40")


def test_eval_refuses_the_files_of_the_run_it_evaluates(trained):
    """The run evaluated, named as its own corpus, was read as text (its weights and log; a log record
    without a text field pointed at --skip-bad-records, which then scored them); refused as train refuses
    its --out."""
    run, _ = trained
    said = f"is in the directory of the run evaluated ({run}), which is never corpus: name another"
    for corpus in (run, run / "log.jsonl", run / "model.safetensors"):
        assert_user_error(invoke("eval", run, corpus, "--device", "cpu"), f"{corpus} {said}")
    assert_user_error(invoke("eval", run / "model.safetensors", run, "--skip-bad-records"), said)


@pytest.mark.parametrize(
    "variable,value,message",
    [
        ("HTCLI_DECODE_GRAPH", "false", "HTCLI_DECODE_GRAPH must be 0 or 1 (or unset), got 'false'"),
        ("HTCLI_ATTENTION_GRAPHS", "off", "HTCLI_ATTENTION_GRAPHS must be 0 or 1 (or unset), got 'off'"),
        ("HTCLI_STEP_PRODUCT", "fast", "HTCLI_STEP_PRODUCT must be linear or columns (or unset), got 'fast'"),
        (
            "HTCLI_ATTENTION",
            "flash",
            "HTCLI_ATTENTION must be auto or eager or triton (or unset), got 'flash'",
        ),
    ],
)
def test_environment_variables_checked_before_any_work(tmp_path, monkeypatch, variable, value, message):
    """A variable of htcli's set to a value it does not take is one error line before any work (sample
    echoed its prompt and then failed at the first step; a misspelt switch was taken as on)."""
    monkeypatch.setenv(variable, value)
    result = invoke("sample", tmp_path / "no-run", "--prompt", "def ")
    assert_user_error(result, message)
    assert result.stdout == ""


def test_a_context_warmup_as_long_as_the_run_is_warned_of(corpus, tmp_path):
    """--context-warmup that leaves no step at --seq-len (1, or 0.9 of 4 steps): the run never trains at its
    context (it did so without a word); a warning says so, and the run trains. One step left: no word."""
    flags = [*TINY_FLAGS, "--context-warmup-start", 32]
    for fraction, steps in ((1, 2), (0.9, 4)):
        result = invoke("train", corpus, *flags, "--out", tmp_path / f"r{steps}", "--steps", steps,
                        "--context-warmup", fraction)  # fmt: skip
        assert result.exit_code == 0, result.output
        said = " ".join(result.stderr.split())
        assert (
            f"warning: --context-warmup ({fraction}) leaves no step of --steps ({steps}) at --seq-len (64):"
            in said
        )
        assert "every step trains on 32-byte windows; give a smaller --context-warmup" in said
        assert {e["context"] for e in events(tmp_path / f"r{steps}", "step")} == {32}
    one_left = invoke(
        "train", corpus, *flags, "--out", tmp_path / "r5", "--steps", 5, "--context-warmup", 0.8
    )
    assert one_left.exit_code == 0 and "context-warmup" not in one_left.stderr, one_left.output
    # a tiny fraction rounds up to a whole step: 0.01 of 4 steps is one, a quarter of the run (review)
    tiny = invoke("train", corpus, *flags, "--out", tmp_path / "r6", "--steps", 4, "--context-warmup", 0.01)
    said = " ".join(tiny.stderr.split())
    assert tiny.exit_code == 0 and (
        "warning: --context-warmup (0.01) of --steps (4) rounds up to 1 step(s) on short windows, 25% of"
        in said
    )
    resumed = invoke("train", "--out", tmp_path / "r6", "--resume", "--steps", 8)  # (its short step is done)
    assert resumed.exit_code == 0 and "context-warmup" not in resumed.stderr, resumed.output


def test_a_warmup_as_long_as_the_run_is_warned_of(corpus, tmp_path):
    """--warmup at or above --steps: the learning rate rises for the whole run, never decaying (it did so
    without a word); a warning says so once the run starts (an error in the inputs prints alone), and the
    run trains."""
    result = invoke("train", corpus, *TINY_FLAGS, "--out", tmp_path / "run", "--steps", 2, "--warmup", 5)
    assert result.exit_code == 0, result.output
    assert "warning: --warmup (5) is not below --steps (2): the learning rate rises for the whole run" in (
        result.stderr
    )
    one_left = invoke("train", corpus, *TINY_FLAGS, "--out", tmp_path / "r3", "--steps", 3, "--warmup", 2)
    assert one_left.exit_code == 0, one_left.output  # (its last step at the peak: no decay, no word)
    said = " ".join(one_left.stderr.split())
    assert "warning: --warmup (2) leaves one step of --steps (3) after it, which runs at the peak" in said
    quiet = invoke("train", corpus, *TINY_FLAGS, "--out", tmp_path / "r4", "--steps", 3, "--warmup", 1)
    assert "warning" not in quiet.stderr
    missing = invoke(
        "train", tmp_path / "none.txt", *TINY_FLAGS, "--out", tmp_path / "r2", "--steps", 2, "--warmup", 5
    )
    assert_user_error(missing, "does not exist")


def test_eval_refuses_record_options_for_plain_text(run_copy, tmp_path, monkeypatch):
    """eval --text-field on files that hold no records was ignored without a word; refused before a
    compressed file is unpacked into the cache (minutes of work for a large one)."""
    run, corpus = run_copy
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(tmp_path / "cache"))
    packed = tmp_path / "corpus.txt.gz"
    packed.write_bytes(gzip.compress(corpus.read_bytes()))
    for path in (corpus, packed):
        result = invoke("eval", run, path, "--text-field", "body", "--device", "cpu")
        assert_user_error(result, "--text-field concerns the records of JSONL and Parquet files, and the")
    assert not list((tmp_path / "cache").rglob("*"))
    result = invoke("eval", run, corpus, "--include-hidden", "--device", "cpu")  # (ignored too)
    assert_user_error(result, "--include-hidden reads the hidden files of directories and glob patterns")
    assert invoke("eval", run, corpus.parent, "--include-hidden", "--device", "cpu").exit_code == 0


def test_config_files_in_other_encodings_or_of_a_run_that_are_not_its_config(trained, tmp_path):
    """A byte-order mark (some Windows editors write one) is skipped; another encoding's byte is named, not
    taken for a checkpoint; a run's state.json or log.jsonl names the run's config.json (they were read as
    options: "world_size is not an option (did you mean block_size?)"); a config.json of a newer htcli
    says to upgrade; a run's own version of another type is refused."""
    run, corpus = trained
    for name, content in [("bom.toml", "steps = 5\n"), ("bom.json", '{"steps": 5}')]:
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode())
        config = tmp_path / name
        printed = invoke("train", corpus, "--config", config, "--out", tmp_path / "r", "--print-config")
        assert printed.exit_code == 0 and "steps = 5" in printed.stdout, printed.output
    latin = file_with(tmp_path / "latin.toml", b"steps = 5\n# caf\xe9\n")
    said = f"config file {latin} is not UTF-8 text (byte 0xe9 on line 2): save it as UTF-8"
    assert_user_error(invoke("train", corpus, "--config", latin, "--out", tmp_path / "r"), said)
    for name, what in [("state.json", "state"), ("log.jsonl", "log")]:
        said = f"config file {run / name} is a run's {what}, not its options: give {run / 'config.json'}"
        assert_user_error(invoke("train", corpus, "--config", run / name, "--out", tmp_path / "r"), said)
    saved = json.loads((run / "config.json").read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**saved, "htcli_version": "9.0", "new": 1}))
    said = f"{newer}: new is not an option of htcli train; htcli 9.0 wrote this file: upgrade htcli"
    assert_user_error(invoke("train", "--config", newer, "--out", tmp_path / "r"), said)
    odd = file_with(tmp_path / "odd.json", json.dumps({**saved, "htcli_version": 5}).encode())
    said = f'{odd}: htcli_version must be a version such as "{__version__}", got 5'
    assert_user_error(invoke("train", "--config", odd, "--out", tmp_path / "r"), said)


def test_a_preset_given_to_a_resume_is_named_where_it_differs_from_the_run(run_copy, tmp_path):
    """A preset that is not the run's model is refused naming the preset (the sizes were named as options
    never given: "--dim 64 in the checkpoint, 256 asked"); from a config file, as the file's; nothing of the
    run changes."""
    run, _ = run_copy
    before = snapshot(run)
    said = f"cannot resume {run} with --preset small: it gives dim 256 (the run's: 32)"
    assert_user_error(invoke("train", "--resume", "--out", run, "--preset", "small", "--steps", 9), said)
    assert_user_error(invoke("train", "--resume", "--out", run, "--preset", "small"), "drop --preset")
    path = file_with(tmp_path / "p.toml", b'preset = "small"\n')
    said = f"{path}: cannot resume {run} with preset small: it gives dim 256"
    assert_user_error(invoke("train", "--resume", "--out", run, "--config", path, "--steps", 9), said)
    assert snapshot(run) == before


INTERRUPTED_IN = """
import sys
import htcli.bench
from htcli.__main__ import main
# a Ctrl-C that lands while Python runs code made from a string (dataclasses make their __init__ so, and
# torch makes many in the imports a command's first operations start), or while a class is made
class Named:
    def __set_name__(self, owner, name):
        raise KeyboardInterrupt
ways = {
    "exec": lambda: exec("raise KeyboardInterrupt"),
    "class": lambda: type("Made", (), {"field": Named()}),
}
way = ways[sys.argv.pop(1)]
htcli.bench.decode_bench = lambda *args, **kwargs: way()
main()
"""


@pytest.mark.parametrize("way", ["exec", "class"])
def test_a_ctrl_c_inside_a_class_or_code_made_from_a_string_exits_130(tmp_path, way):
    """Ctrl-C at two places where Python hid it (one run in four of an interrupted decode bench, as torch
    imported its compiler). Inside code that exec() runs from a string (a dataclass's __init__), Python
    marks it "unhandled" however it is answered, and ends the process by SIGINT as it exits: exit -2, not
    130, after the command's line (CPython gh-128130; as `python -m`). Inside a class being made (a
    dataclass field's __set_name__), Python 3.11 raises RuntimeError from it: a traceback, exit 1."""
    (tmp_path / "interrupted_in.py").write_text(INTERRUPTED_IN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "interrupted_in", way, "bench", "--decode", "--json", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    said = done.stderr.splitlines()
    assert (done.returncode, said[1:]) == (130, ["interrupted: stopped; no file was changed"]), said
    assert json.loads(done.stdout)["interrupted"] is True
